"""``--init-from`` for the encoder objectives: fine-tune an MLM-pretrained encoder as a classifier."""

import torch

from gohgraph import GoHConfig, GoHEncoder, GoHTransformer, from_pretrained
from gohgraph.cli.main import main
from gohgraph.training.checkpoint import initialise_from

ENCODER = dict(model_type="encoder", vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_shared_heads=1,
               top_k_heads=2, router="graph", router_dim=8, position_embedding="rope", max_seq_len=32)


def test_an_mlm_encoder_starts_a_classifier_with_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    pretrained = GoHEncoder(GoHConfig(**ENCODER))
    pretrained.save_pretrained(tmp_path / "mlm")
    for pooling, head in (("mean", ["classifier.weight", "classifier.bias"]),
                          ("first-tanh", ["pooler.weight", "pooler.bias", "classifier.weight", "classifier.bias"])):
        torch.manual_seed(1)
        classifier = GoHEncoder(GoHConfig(**ENCODER, n_labels=3, classifier_pooling=pooling))
        untouched = {name: tensor.clone() for name, tensor in classifier.state_dict().items()}
        assert sorted(initialise_from(classifier, tmp_path / "mlm")) == sorted(head)
        for name, tensor in classifier.state_dict().items():
            expected = untouched[name] if name in head else pretrained.state_dict()[name]
            assert torch.equal(tensor, expected), name

    # a classifier for 3 labels continued for 5: its own head starts fresh, the rest is kept
    classifier.save_pretrained(tmp_path / "three")
    five = GoHEncoder(GoHConfig(**ENCODER, n_labels=5, classifier_pooling="first-tanh"))
    assert initialise_from(five, tmp_path / "three") == ["classifier.weight", "classifier.bias"]
    assert torch.equal(five.pooler.weight, classifier.pooler.weight)


def test_cli_pretrains_with_mlm_then_fine_tunes_a_classifier(tmp_path, capsys):
    tiny = ["--seq-len", "32", "--batch-size", "4", "--max-steps", "2", "--no-progress"]
    assert main(["train", "--objective", "mlm", "--run-dir", str(tmp_path / "mlm"), *tiny,
                 "--set", "d_model=32", "--set", "eval_batches=1"]) == 0
    capsys.readouterr()
    assert main(["train", "--objective", "classify", "--run-dir", str(tmp_path / "cls"), *tiny,
                 "--init-from", str(tmp_path / "mlm" / "final"), "--set", "eval_batches=1"]) == 0
    printed = capsys.readouterr().out
    assert "initialised from" in printed and "new: classifier.weight, classifier.bias" in printed
    model = from_pretrained(tmp_path / "cls" / "final")
    assert model.config.d_model == 32 and model.config.n_labels == 8  # the MLM model's width, the preset's labels


def test_init_from_refuses_a_model_the_objective_cannot_continue(tmp_path, capsys):
    GoHTransformer(GoHConfig(vocab_size=256, d_model=32, n_layers=1, n_heads=4)).save_pretrained(tmp_path / "lm")
    GoHEncoder(GoHConfig(**{**ENCODER, "vocab_size": 300})).save_pretrained(tmp_path / "wide")
    for source, message in (("lm", "holds a model_type='decoder' model; --objective mlm continues encoder models"),
                            ("wide", "has vocab_size 300; --objective mlm reads 256 data tokens")):
        code = main(["train", "--objective", "mlm", "--run-dir", str(tmp_path / "run"), "--max-steps", "1",
                     "--seq-len", "16", "--init-from", str(tmp_path / source)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and message in err and "\n" not in err
