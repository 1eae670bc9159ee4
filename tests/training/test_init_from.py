"""Continue-training a saved model (e.g. a converted dense one): init_from + dense-to-sparse anneal."""

import pytest
import torch

from gohgraph import CheckpointError, GoHConfig, GoHTransformer
from gohgraph.cli.main import main as cli_main
from gohgraph.data.batches import train_batch
from gohgraph.training.config import TrainConfig
from gohgraph.training.trainer import train
from tests.helpers import TINY, make_corpus

MODEL = dict(TINY, aux_free_bias=False)


def _config(**changes):
    values = dict(batch_size=4, seq_len=32, max_steps=6, lr=5e-3, warmup_steps=2, eval_every=6,
                  eval_batches=2, save_every=3, keep_last=5, log_every=1, device="cpu")
    values.update(changes)
    return TrainConfig(**values)


def dense_start(tmp_path):
    """A routed model switched fully dense (as `gohgraph convert` leaves it), saved to disk."""
    torch.manual_seed(123)
    model = GoHTransformer(GoHConfig(**MODEL))
    model.set_dense_blend(1.0)
    return model, model.save_pretrained(tmp_path / "start")


def test_init_from_starts_at_the_saved_weights_and_anneals_to_top_k(tmp_path):
    start, start_dir = dense_start(tmp_path)
    corpus = make_corpus()
    tc = _config(init_from=str(start_dir), dense_anneal_steps=4, lr=1e-9)  # lr ~ 0: weights stay put
    result = train(GoHConfig(**MODEL), tc, corpus, tmp_path / "run", progress=False)

    # step 0 ran the saved model, fully dense (blend 1): its loss is the saved model's loss
    batch = train_batch(corpus.train, 4, 32, tc.seed, 0, 0, 0, 1)
    start.train()
    with torch.no_grad():
        expected_first = start(batch, labels=batch).loss.item()
    assert result.losses[0] == pytest.approx(expected_first, rel=1e-5)
    # after the anneal, exactly the shared + top-k heads are on for every token
    routing = result.model.eval()(batch).routing
    for layer in routing:
        assert ((layer.head_gates > 0).sum(-1) == 1 + 2).all()
    assert float(result.model.blocks[0].attn.head_routing.gate.dense_blend) == 0.0


def test_anneal_resumes_exactly(tmp_path):
    _, start_dir = dense_start(tmp_path)
    tc = _config(init_from=str(start_dir), dense_anneal_steps=5)
    corpus = make_corpus()
    straight = train(GoHConfig(**MODEL), tc, corpus, tmp_path / "straight", progress=False)
    partial = train(GoHConfig(**MODEL), _config(init_from=str(start_dir), dense_anneal_steps=5, max_steps=3),
                    corpus, tmp_path / "resumed", progress=False)
    assert partial.losses == straight.losses[:3]
    resumed = train(GoHConfig(**MODEL), tc, corpus, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.losses == straight.losses[3:]
    for key, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key


def test_init_from_a_mismatched_or_missing_model_is_a_clear_error(tmp_path):
    _, start_dir = dense_start(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        train(GoHConfig(**dict(MODEL, d_model=64)), _config(init_from=str(start_dir)), make_corpus(),
              tmp_path / "run", progress=False)
    with pytest.raises(CheckpointError, match="does not exist"):
        train(GoHConfig(**MODEL), _config(init_from=str(tmp_path / "nope")), make_corpus(),
              tmp_path / "run2", progress=False)


def test_cli_init_from_takes_the_saved_model_config(tmp_path, capsys):
    _, start_dir = dense_start(tmp_path)
    data = tmp_path / "text.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 400)
    code = cli_main(["train", "--init-from", str(start_dir), "--dense-anneal-steps", "2", "--max-steps", "3",
                     "--batch-size", "4", "--seq-len", "32", "--eval-every", "3", "--data", str(data),
                     "--run-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 0
    final = GoHTransformer.from_pretrained(tmp_path / "run" / "final")
    assert final.config.d_model == MODEL["d_model"] and final.config.router == "graph"
    assert float(final.blocks[0].attn.head_routing.gate.dense_blend) == 0.0
