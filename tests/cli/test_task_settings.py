"""``--preset``, ``--config`` and ``--tokenizer`` mean the same for every task (issue 28, acceptance 3):
a tiny ``gohgraph train`` of each of lm, mlm, classify and seq2seq with all three, then the run's
saved ``train_config.json``, ``model_config.json``, ``data.json`` and ``tokenizer.json`` are read
back: the preset's values where nothing overrode them, the config file's where it did, and a
vocabulary of the trained BPE's ids plus the task's special tokens."""

import json

import pytest
import torch

from gohgraph.cli.main import main
from gohgraph.config import GoHConfig
from gohgraph.data.tokenizers import TOKENIZER_FILE, load_tokenizer
from gohgraph.training.config import TrainConfig
from gohgraph.training.run_dir import RunDir
from gohgraph.training.tasks import get_task

SPECIALS = {"lm": 0, "mlm": 3, "classify": 3, "seq2seq": 4}  # ids after the tokenizer's: mask, cls, pad (, eos)
# the config file: small sizes and values no preset has
CONFIG = {"d_model": 32, "router_dim": 4, "lr": 0.0037, "warmup_steps": 1, "eval_batches": 1, "save_every": 2}
FLAGS = ["--max-steps", "2", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--no-progress",
         "--set", "tensorboard=false"]
SET_BY_FLAGS = {"max_steps", "batch_size", "seq_len", "device", "tensorboard"}
FITTED_TO_DATA = {"vocab_size", "max_seq_len", "n_labels"}  # the task sizes these to the data and tokenizer
TEXT = "".join(f"def function_{i}(value):\n    return value * {i} + len('text {i}')\n" for i in range(120))


def data_for(task: str, root):
    if task in ("lm", "mlm"):
        path = root / "code.txt"
        path.write_text(TEXT, encoding="utf-8")
    elif task == "classify":  # files: the split is by file
        path = root / "labelled"
        path.mkdir()
        for n in range(10):
            (path / f"part{n}.tsv").write_text("".join(
                f"{'ab'[i % 2]}\t{'return value' if i % 2 else 'def function'} number {n * 10 + i}\n"
                for i in range(10)), encoding="utf-8")
    else:
        path = root / "pairs.tsv"
        path.write_text("".join(f"describe function_{i}\tdef function_{i}(value):\n" for i in range(60)),
                        encoding="utf-8")
    return path


@pytest.mark.parametrize("task", ["lm", "mlm", "classify", "seq2seq"])
def test_preset_config_and_tokenizer_are_what_the_run_saved(tmp_path, task, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG), encoding="utf-8")
    run_dir = tmp_path / "run"
    data = data_for(task, tmp_path)
    assert main(["train", "--objective", task, "--preset", "tiny", "--config", str(config), "--tokenizer", "bpe:300",
                 "--data", str(data), "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache"), *FLAGS]
                if task in ("lm", "mlm") else
                ["train", "--objective", task, "--preset", "tiny", "--config", str(config), "--tokenizer", "bpe:300",
                 "--data", str(data), "--run-dir", str(run_dir), *FLAGS]) == 0
    run = RunDir(run_dir)
    model_config = json.loads(run.model_config_file.read_text())
    train_config = json.loads(run.train_config_file.read_text())
    preset_model, preset_train = get_task(task).presets["tiny"]

    # the preset, where neither the config file, a flag nor the data set the field; some of those
    # differ from the configs' defaults, so a run that ignored the preset would fail here
    from_preset = [(saved, field, value) for saved, preset, defaults, overridden in (
        (model_config, preset_model, GoHConfig(model_type=preset_model.get("model_type", "decoder")).to_dict(),
         FITTED_TO_DATA), (train_config, preset_train, TrainConfig().to_dict(), SET_BY_FLAGS))
        for field, value in preset.items() if field not in CONFIG and field not in overridden
        and value != defaults[field]]
    assert len(from_preset) >= 2
    for saved, field, value in from_preset:
        assert saved[field] == value, field
    # the config file over the preset
    assert (model_config["d_model"], model_config["router_dim"]) == (32, 4)
    assert (train_config["lr"], train_config["warmup_steps"], train_config["eval_batches"]) == (0.0037, 1, 1)
    assert (train_config["max_steps"], train_config["seq_len"]) == (2, 16)

    # the tokenizer: recorded, saved beside the run and the final model, and the model's vocabulary
    assert json.loads(run.data_file.read_text())["tokenizer"] == "bpe:300"
    tokenizer = load_tokenizer(run_dir)
    assert type(tokenizer).__name__ == "BPETokenizer" and 256 < tokenizer.vocab_size <= 300
    assert (run_dir / "final" / TOKENIZER_FILE).read_text() == (run_dir / TOKENIZER_FILE).read_text()
    assert model_config["vocab_size"] == tokenizer.vocab_size + SPECIALS[task]
    assert json.loads((run_dir / "final" / "config.json").read_text())["vocab_size"] == model_config["vocab_size"]
    # the tokenizer was trained on the data's text: it merges the data's most frequent words
    assert len(tokenizer.encode("function")) < len("function")

    # eval of the run reads its texts with the run's tokenizer: the run's own last evaluation
    capsys.readouterr()
    cache = ["--cache-dir", str(tmp_path / "cache")] if task in ("lm", "mlm") else []
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--batch-size", "2", "--max-batches", "1",
                 *(["--seq-len", "16"] if task == "lm" else []), *cache]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] == pytest.approx(json.loads(run.evaluations_file.read_text())[-1]["loss"], abs=1e-5)


def test_classify_from_a_bpe_mlm_encoder_reads_its_texts_with_that_encoders_tokenizer(tmp_path):
    """``--init-from`` a model saved with a ``tokenizer.json`` and no ``--tokenizer``: the
    continued model's own tokenizer, as for the LM (its embedding rows mean those ids)."""
    mlm, classify = tmp_path / "mlm", tmp_path / "classify"
    tiny = ["--set", "d_model=32", "--set", "eval_batches=1", *FLAGS]
    assert main(["train", "--objective", "mlm", "--tokenizer", "bpe:300", "--data", str(data_for("mlm", tmp_path)),
                 "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(mlm), *tiny]) == 0
    assert main(["train", "--objective", "classify", "--init-from", str(mlm / "final"), "--data",
                 str(data_for("classify", tmp_path)), "--run-dir", str(classify), *tiny]) == 0
    assert json.loads(RunDir(classify).data_file.read_text())["tokenizer"] == f"file:{mlm / 'final' / TOKENIZER_FILE}"
    assert (classify / TOKENIZER_FILE).read_text() == (mlm / TOKENIZER_FILE).read_text()
    vocab = load_tokenizer(mlm).vocab_size
    assert json.loads((classify / "final" / "config.json").read_text())["vocab_size"] == vocab + 3


@pytest.mark.parametrize("task", ["classify", "seq2seq"])
def test_a_resumed_bpe_run_trains_what_the_uninterrupted_run_trains(tmp_path, task):
    """The BPE is trained again when a run resumes (it is kept in no cache): on the same training
    texts it is the same tokenizer, so 2 + 2 steps give the weights of 4 steps, bit for bit."""
    from gohgraph import from_pretrained

    data = data_for(task, tmp_path)
    common = ["train", "--objective", task, "--no-progress", "--set", "tensorboard=false"]
    first = ["--tokenizer", "bpe:300", "--data", str(data), "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
             "--set", "d_model=32", "--set", "eval_batches=1", "--set", "save_every=2", "--set", "eval_every=2"]
    assert main([*common, *first, "--run-dir", str(tmp_path / "whole"), "--max-steps", "4"]) == 0
    assert main([*common, *first, "--run-dir", str(tmp_path / "parts"), "--max-steps", "2"]) == 0
    assert main([*common, "--resume", "--run-dir", str(tmp_path / "parts"), "--max-steps", "4"]) == 0
    whole = from_pretrained(tmp_path / "whole" / "final").state_dict()
    parts = from_pretrained(tmp_path / "parts" / "final").state_dict()
    assert whole.keys() == parts.keys()
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    assert (tmp_path / "parts" / TOKENIZER_FILE).read_text() == (tmp_path / "whole" / TOKENIZER_FILE).read_text()
