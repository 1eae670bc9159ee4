"""The bad-input contract, round two (docs/contract.md, issue 32): every case a new user's probe broke
ends in one line on stderr naming the flag, field or file (exit 1; 2 for what argparse cannot
read), or in a printed notice where a value is legitimately adjusted; never a traceback, and never
after expensive work that the check did not need.

The models are tiny ``save_pretrained`` directories of each family, built without training.
"""

import contextlib
import io
import json
import os
from types import SimpleNamespace

import pytest
import torch

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, GoHTransformer
from gohgraph.cli.main import main

FAMILY_CONFIGS = {
    "decoder": dict(vocab_size=256, d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="graph", router_rounds=1, router_dim=8, max_seq_len=64),
    "encoder": dict(vocab_size=256, d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", max_seq_len=64, model_type="encoder", position_embedding="sinusoidal"),
    "seq2seq": dict(vocab_size=256, d_model=32, n_layers=1, n_decoder_layers=1, n_heads=4, n_shared_heads=1,
                    top_k_heads=2, router="graph", router_rounds=1, router_dim=8, max_seq_len=64,
                    model_type="seq2seq", position_embedding="t5-relative", attention_scale="none"),
}
MODEL_CLASSES = {"decoder": GoHTransformer, "encoder": GoHEncoder, "seq2seq": GoHSeq2Seq}
TEXT = "".join(f"def function_{i}(x, y):\n    return x * {i} + y  # line {i}\n" for i in range(60))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return save_family_models(tmp_path_factory.mktemp("bad-input"))


def save_family_models(root):
    """A ``save_pretrained`` directory per family (``.decoder``, ...), a text file and a pair file, in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = {}
    for family, values in FAMILY_CONFIGS.items():
        MODEL_CLASSES[family](GoHConfig(**values)).save_pretrained(root / family)
        paths[family] = root / family
    (root / "code.txt").write_text(TEXT, encoding="utf-8")
    (root / "pairs.tsv").write_text("".join(f"reverse w{i}\t{i}w\n" for i in range(20)), encoding="utf-8")
    return SimpleNamespace(root=root, **paths)


def save_objective_run(run_dir, objective):
    """A run directory as ``gohgraph train --objective mlm|seq2seq`` leaves it, built without training:
    ``final/`` (the family's tiny model with the objective's special tokens), ``objective.json``."""
    family = "seq2seq" if objective == "seq2seq" else "encoder"
    values = dict(FAMILY_CONFIGS[family], vocab_size=260 if family == "seq2seq" else 259)
    if family == "seq2seq":
        values.update(pad_token_id=258, decoder_start_token_id=258)
    torch.manual_seed(0)
    MODEL_CLASSES[family](GoHConfig(**values)).save_pretrained(run_dir / "final")
    (run_dir / "train_config.json").write_text("{}")
    (run_dir / "objective.json").write_text(json.dumps({"objective": objective, "seq_len": 16, "data": None}))
    return run_dir


def cli(*argv, cwd=None):
    """Exit code, stdout and stderr of the CLI run in this process (argparse's exit included)."""
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(arg) for arg in argv])
            except SystemExit as stop:  # argparse
                code = stop.code
    finally:
        os.chdir(previous)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def assert_one_line_error(done, *fragments, code=1):
    assert done.returncode == code, (done.returncode, done.stdout[-500:], done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def assert_refused_before_model_work(monkeypatch):
    """Make building or loading a model fail the test: a refusal must come before it."""
    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr("gohgraph.cli.common.from_pretrained", fail)


# ---------------------------------------------------------------------- fields: --set, config files, saved configs
def test_a_mistyped_set_field_suggests_the_close_one_in_a_short_line(tmp_path):
    line = assert_one_line_error(cli("train", "--run-dir", tmp_path / "r", "--set", "n_haeds=4"),
                                 "'n_haeds' is not a field", "did you mean 'n_heads'?")
    assert len(line) < 200
    line = assert_one_line_error(cli("train", "--run-dir", tmp_path / "r", "--set", "zzzzqqq=4"), "'zzzzqqq'")
    assert len(line) < 200


def test_a_field_set_twice_is_refused(tmp_path):
    assert_one_line_error(cli("train", "--run-dir", tmp_path / "r", "--set", "n_heads=4", "--set", "n_heads=8"),
                          "--set n_heads is given twice", "'4'", "'8'")
    assert not (tmp_path / "r").exists()
    assert_one_line_error(cli("bench", "--out", tmp_path / "b", "--variants", "GoH",
                              "--set", "dropout=0.1", "dropout=0.2"), "--set dropout is given twice")


@pytest.mark.parametrize("content", [{"n_haeds": 4}, {"model": {"n_haeds": 4}}, {"train": {"n_haeds": 4}}])
def test_a_mistyped_config_file_field_suggests_the_close_one(tmp_path, content):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(content), encoding="utf-8")
    line = assert_one_line_error(cli("train", "--run-dir", tmp_path / "r", "--config", config),
                                 str(config), "'n_haeds'", "did you mean 'n_heads'?")
    assert len(line) < 300


def test_a_mistyped_saved_config_field_names_the_file_and_suggests(models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models.decoder, broken)
    values = json.loads((broken / "config.json").read_text())
    values["n_haeds"] = values.pop("n_heads")
    (broken / "config.json").write_text(json.dumps(values))
    line = assert_one_line_error(cli("generate", "--checkpoint", broken),
                                 str(broken / "config.json"), "'n_haeds'", "did you mean 'n_heads'?")
    assert len(line) < 300


# ---------------------------------------------------------------------- argparse: exit 2, one line
@pytest.mark.parametrize("argv,fragment", [
    (["train", "--objective", "foo"], "--objective"),
    (["train", "--max-steps", "abc"], "--max-steps"),
    (["eval"], "--checkpoint"),
    (["stats", "--checkpoint", "x", "--out", "y", "--no-such-flag"], "--no-such-flag"),
])
def test_argparse_mistakes_exit_2_with_one_line(argv, fragment):
    done = cli(*argv)
    line = assert_one_line_error(done, fragment, "--help", code=2)
    assert done.stderr.strip() == line  # no usage block


# ---------------------------------------------------------------------- generate
def test_generate_on_an_encoder_says_the_family_cannot_generate(models, monkeypatch):
    assert_refused_before_model_work(monkeypatch)  # refused from config.json, before the weights are read
    assert_one_line_error(cli("generate", "--checkpoint", models.encoder), str(models.encoder),
                          "model_type='encoder'", "cannot generate text")


@pytest.mark.parametrize("family,asked,room", [("decoder", 1_000_000_000, 64 - 4), ("seq2seq", 100_000, 64 - 1)])
def test_generate_says_when_max_new_tokens_is_capped(models, family, asked, room):
    done = cli("generate", "--checkpoint", getattr(models, family), "--prompt", "def ", "--max-new-tokens", asked,
               "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert f"--max-new-tokens {asked} is more than the model's max_seq_len=64" in done.stderr
    assert f"generating at most {room} tokens" in done.stderr
    done = cli("generate", "--checkpoint", getattr(models, family), "--max-new-tokens", "3")
    assert done.returncode == 0 and "--max-new-tokens" not in done.stderr


# ---------------------------------------------------------------------- convert: the source is checked before it is loaded
LLAMA_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 12}


@pytest.fixture()
def no_model_loading(monkeypatch):
    """A ``transformers`` whose model classes fail the test when asked to load: every refusal below
    must come from the checks of the files, before a model is built."""
    class Refuse:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the model was loaded before the source was checked")

    fake = SimpleNamespace(LlamaForCausalLM=Refuse, GPT2LMHeadModel=Refuse, BertForMaskedLM=Refuse,
                           T5ForConditionalGeneration=Refuse,
                           logging=SimpleNamespace(get_verbosity=lambda: 30, set_verbosity_error=lambda: None,
                                                   set_verbosity=lambda level: None))
    monkeypatch.setitem(__import__("sys").modules, "transformers", fake)


def hf_source(directory, config=LLAMA_CONFIG, shards=None):
    """A source directory: ``config.json`` and one ``model.safetensors`` (or ``shards``: ``{file: names}``
    with an index)."""
    from safetensors.torch import save_file

    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    if shards is None:
        save_file({"model.embed_tokens.weight": torch.zeros(16, 8), "lm_head.weight": torch.zeros(16, 8)},
                  str(directory / "model.safetensors"))
        return directory
    weight_map = {}
    for file, names in shards.items():
        save_file({name: torch.zeros(4, 4) for name in names}, str(directory / file))
        weight_map.update({name: file for name in names})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def test_convert_of_a_truncated_safetensors_names_the_file(tmp_path, no_model_loading):
    source = hf_source(tmp_path / "hf")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"), str(weights), "truncated")
    weights.write_bytes(b"\xff" * 20)
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"), str(weights))
    weights.write_bytes(b"abc")
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"), str(weights), "too short")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("missing", [["hidden_size"], ["hidden_size", "num_attention_heads"], ["vocab_size"]])
def test_convert_of_a_config_missing_sizes_names_the_key(tmp_path, no_model_loading, missing):
    config = {key: value for key, value in LLAMA_CONFIG.items() if key not in missing}
    source = hf_source(tmp_path / "hf", config=config)
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"),
                          str(source / "config.json"), *(repr(key) for key in missing))


def test_convert_of_a_gpt2_config_accepts_either_name_of_a_size(tmp_path, no_model_loading):
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 16, "n_embd": 8,
              "num_hidden_layers": 1, "n_head": 2}
    source = hf_source(tmp_path / "hf", config=config)
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"), "'n_positions|max_position")
    config["n_positions"] = 32
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(AssertionError, match="loaded before the source was checked"):  # the checks pass
        cli("convert", "--from", source, "--out", tmp_path / "out")


def test_convert_of_sharded_weights_checks_every_shard(tmp_path, no_model_loading):
    source = hf_source(tmp_path / "hf", shards={"model-1.safetensors": ["a"], "model-2.safetensors": ["b"]})
    index = json.loads((source / "model.safetensors.index.json").read_text())
    index["weight_map"]["c"] = "model-2.safetensors"
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"),
                          str(source / "model-2.safetensors"), "'c'")
    (source / "model-2.safetensors").unlink()
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"),
                          "model.safetensors.index.json", "model-2.safetensors", "missing")
    (source / "model.safetensors.index.json").write_text("{not json")
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out"), "model.safetensors.index.json")


@pytest.mark.parametrize("flags,fragment", [
    (["--n-experts", "4"], "--n-experts 4"),
    (["--top-k-experts", "2"], "--top-k-experts 2"),
    (["--ffn", "dense", "--n-experts", "4"], "--n-experts 4"),
    (["--router", "dense", "--top-k-heads", "2"], "--router dense"),
    (["--router", "linear", "--router-rounds", "2"], "--router-rounds 2"),
])
def test_convert_refuses_flags_its_other_flags_make_unused(tmp_path, no_model_loading, flags, fragment):
    source = hf_source(tmp_path / "hf")
    assert_one_line_error(cli("convert", "--from", source, "--out", tmp_path / "out", *flags), fragment)


# ---------------------------------------------------------------------- train and eval: flags that would be dropped
@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A one-step language-model run to resume."""
    root = tmp_path_factory.mktemp("lm-run")
    (root / "code.txt").write_text(TEXT, encoding="utf-8")
    done = cli("train", "--run-dir", root / "run", "--data", root / "code.txt", "--max-steps", "1", "--set",
               "d_model=32", "--set", "n_heads=4", "--batch-size", "2", "--seq-len", "16", "--no-progress",
               "--device", "cpu", "--set", "eval_batches=1", "--set", "tensorboard=false")
    assert done.returncode == 0, done.stderr
    return root / "run"


@pytest.mark.parametrize("flags,fragment", [
    (["--preset", "small"], "--preset"), (["--config", "c.json"], "--config"), (["--init-from", "x"], "--init-from")])
def test_resume_refuses_what_only_starts_a_new_run(lm_run, flags, fragment, monkeypatch):
    monkeypatch.setattr("gohgraph.cli.train.train", lambda *a, **k: pytest.fail("training started"))
    before = sorted(p.name for p in (lm_run / "checkpoints").iterdir())
    assert_one_line_error(cli("train", "--run-dir", lm_run, "--resume", "--max-steps", "2", *flags),
                          fragment, "--resume")
    assert sorted(p.name for p in (lm_run / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("objective,flags,fragment", [
    ("seq2seq", ["--cache-dir", "/nonexistent"], "--cache-dir"),
    ("classify", ["--cache-dir", "/nonexistent"], "--cache-dir"),
    ("classify", ["--tokenizer", "bpe:12"], "tokenizer='bpe:12'"),
    ("seq2seq", ["--tokenizer", "wordpiece"], "tokenizer='wordpiece'"),
    ("classify", ["--tokenizer", "file:/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
])
def test_objective_training_refuses_flags_it_cannot_use(tmp_path, objective, flags, fragment, monkeypatch):
    monkeypatch.setattr("gohgraph.cli.train.train", lambda *a, **k: pytest.fail("training started"))
    assert_one_line_error(cli("train", "--objective", objective, "--run-dir", tmp_path / "r", *flags), fragment)
    assert not (tmp_path / "r").exists()


def test_objective_training_applies_a_config_file_and_a_preset(tmp_path, monkeypatch):
    seen = {}

    def fake_train(cfg, tc, *args, **kwargs):
        seen.update(d_model=cfg.d_model, lr=tc.lr, task=kwargs["task"].name)
        raise KeyboardInterrupt  # stop here: the configs are what is checked

    monkeypatch.setattr("gohgraph.cli.train.train", fake_train)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"d_model": 48, "lr": 0.002}))
    assert cli("train", "--objective", "mlm", "--config", config, "--run-dir", tmp_path / "r").returncode == 130
    assert seen == {"d_model": 48, "lr": 0.002, "task": "mlm"}
    config.write_text(json.dumps({"preset": "small"}))  # the mlm task's small preset: a 256-wide encoder
    assert cli("train", "--objective", "mlm", "--config", config, "--run-dir", tmp_path / "r2").returncode == 130
    assert seen == {"d_model": 256, "lr": 0.0015, "task": "mlm"}


@pytest.mark.parametrize("objective", ["lm", "mlm"])
def test_training_without_tensorboard_says_so(models, tmp_path, monkeypatch, objective):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    tiny = ["--objective", objective, "--data", models.root / "code.txt", "--max-steps", "1", "--seq-len", "16",
            "--batch-size", "2", "--set", "d_model=32", "--set", "n_heads=4", "--set", "eval_batches=1",
            "--no-progress"]
    done = cli("train", "--run-dir", tmp_path / "r", *tiny)
    assert done.returncode == 0, done.stderr
    assert "tensorboard=true but the tensorboard package is not installed" in done.stderr
    assert "--set tensorboard=false" in done.stderr
    done = cli("train", "--run-dir", tmp_path / "r2", *tiny, "--set", "tensorboard=false")
    assert done.returncode == 0 and "tensorboard" not in done.stderr


def test_eval_refuses_cache_dir_where_no_cache_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr("gohgraph.training.tasks.seq2seq.SequenceToSequenceTask.evaluate",
                        lambda *a, **k: pytest.fail("evaluated"))
    run_dir = save_objective_run(tmp_path / "s2s", "seq2seq")
    assert_one_line_error(cli("eval", "--checkpoint", run_dir, "--cache-dir", "/nonexistent"), "--cache-dir")


@pytest.mark.parametrize("family", ["encoder", "seq2seq"])
def test_eval_of_a_bare_encoder_or_seq2seq_checkpoint_is_refused(models, family):
    assert_one_line_error(cli("eval", "--checkpoint", getattr(models, family)), f"model_type='{family}'")


# ---------------------------------------------------------------------- viz and report: checked before the statistics
@pytest.fixture()
def no_statistics(monkeypatch):
    """Collecting routing statistics (the slow part of viz and report) fails the test."""
    monkeypatch.setattr("gohgraph.cli.viz.collect_stats", lambda *a, **k: pytest.fail("statistics were collected"))
    monkeypatch.setattr("gohgraph.cli.report.collect_stats", lambda *a, **k: pytest.fail("statistics were collected"))


NOT_UTF8 = b"def \xff\xfe f():".decode("utf-8", "surrogateescape")  # what Python makes of such bytes in argv


@pytest.mark.parametrize("command,out", [("report", "r.html"), ("viz", "pictures")])
def test_text_that_is_not_utf8_or_too_long_is_refused_before_the_statistics(models, tmp_path, no_statistics,
                                                                            command, out):
    base = [command, "--checkpoint", models.decoder, "--out", tmp_path / out]
    assert_one_line_error(cli(*base, "--text", NOT_UTF8), "--text is not UTF-8")
    line = assert_one_line_error(cli(*base, "--text", "x" * 10_000), "--text is 10000 tokens")
    assert "at most 64" in line  # the model's max_seq_len (viz: the trace's default limit, also 64)


def test_viz_trace_tokens_is_bounded_by_the_model(models, tmp_path, no_statistics):
    assert_one_line_error(cli("viz", "--checkpoint", models.decoder, "--out", tmp_path / "p", "--trace-tokens",
                              "100000"), "--trace-tokens 100000 must be in [1, 64]")
    assert_one_line_error(cli("viz", "--checkpoint", models.decoder, "--out", tmp_path / "p", "--trace-tokens", "0"),
                          "--trace-tokens 0")
    assert_one_line_error(cli("viz", "--checkpoint", models.decoder, "--out", tmp_path / "p", "--trace-tokens", "4",
                              "--text", "def function(x): return x"), "--text is", "at most 4")


@pytest.mark.parametrize("flags", [["--text", "hello"], ["--trace-tokens", "8"]])
def test_viz_of_a_seq2seq_checkpoint_refuses_the_token_trace_flags(models, tmp_path, no_statistics, flags):
    assert_one_line_error(cli("viz", "--checkpoint", models.seq2seq, "--out", tmp_path / "p", *flags),
                          flags[0], "seq2seq")


def test_viz_trace_tokens_sets_the_default_traces_length(models, tmp_path, monkeypatch):
    drawn = {}

    def fake_pictures(model, stats, out, text=None, trace_tokens=None, encode=None, **kwargs):
        drawn.update(tokens=len(encode(text)), limit=trace_tokens)
        return []

    monkeypatch.setattr("gohgraph.viz.write_all_pictures", fake_pictures)
    done = cli("viz", "--checkpoint", models.decoder, "--data", models.root / "code.txt", "--out", tmp_path / "p",
               "--batches", "1", "--batch-size", "1", "--seq-len", "32", "--trace-tokens", "20", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert drawn == {"tokens": 20, "limit": 20}


@pytest.mark.parametrize("content,expected", [
    ("step,loss,val_loss\n1,2.0,\n2,1.9,1.8\n3,1.", "1 of 3 rows are malformed (line 4: 2 cells, the header has 3)"),
    ("step,loss\n1,2.0\n2,abc\n", "1 of 2 rows are malformed (line 3: a cell that is not a number)"),
])
def test_viz_says_how_many_metrics_rows_are_bad(models, tmp_path, monkeypatch, content, expected):
    monkeypatch.setattr("gohgraph.viz.write_all_pictures", lambda *a, **k: [])
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(content, encoding="utf-8")
    done = cli("viz", "--checkpoint", models.decoder, "--data", models.root / "code.txt", "--out", tmp_path / "p",
               "--metrics", metrics, "--batches", "1", "--batch-size", "1", "--seq-len", "16", "--no-progress")
    assert done.returncode == 0, done.stderr
    assert f"note: {metrics}: {expected}" in done.stderr


@pytest.mark.parametrize("content,fragment", [
    (b"step,loss\n1,abc\n2,\x00\n", "none of its 2 rows is readable"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8garbage", "not a readable UTF-8 CSV"),
    (b"step,loss\nabc,def\n", "none of its 1 rows is readable"),
])
def test_report_refuses_a_garbage_metrics_csv_before_the_statistics(models, tmp_path, no_statistics, content,
                                                                    fragment):
    metrics = tmp_path / "metrics.csv"
    metrics.write_bytes(content)
    assert_one_line_error(cli("report", "--checkpoint", models.decoder, "--out", tmp_path / "r.html",
                              "--metrics", metrics), str(metrics), fragment)


# ---------------------------------------------------------------------- --data messages
@pytest.mark.parametrize("values,fragments", [
    (["a={code}:abc"], ["weight 'abc' is not a number"]),
    (["my:src={code}"], ["--data 'my:src=", "source name 'my:src'"]),
    (["my:src={code}", "b={code}"], ["source name 'my:src'"]),
    ([r"C:\Users\me\code.txt"], [r"'C:\Users\me\code.txt'"]),  # shown as typed, backslashes not doubled
    ([r"a=C:\Users\me\code.txt", "b={code}"], [r"'C:\Users\me\code.txt'"]),
    ([r"a=C:\Users\me\code.txt:x", "b={code}"], ["weight 'x' is not a number"]),
])
def test_data_flag_messages_name_the_actual_problem(models, tmp_path, values, fragments, monkeypatch):
    monkeypatch.setattr("gohgraph.cli.train.train", lambda *a, **k: pytest.fail("training started"))
    data = [arg for value in values for arg in ("--data", value.format(code=models.root / "code.txt"))]
    line = assert_one_line_error(cli("train", "--run-dir", tmp_path / "r", *data), *fragments)
    assert "\\\\" not in line


def test_a_weighted_source_whose_path_holds_a_colon_still_reads(tmp_path, monkeypatch):
    from gohgraph.data.sources import parse_data_flags

    odd = tmp_path / "a:b.txt"
    odd.write_text(TEXT, encoding="utf-8")
    assert parse_data_flags([f"x={odd}", f"y={odd}:2"])["sources"] == [
        {"name": "x", "path": str(odd), "weight": 1.0}, {"name": "y", "path": str(odd), "weight": 2.0}]


def test_stats_compare_with_a_model_of_another_family_is_refused_before_the_statistics(models, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setattr("gohgraph.cli.stats.validation_batches", lambda *a, **k: pytest.fail("statistics collected"))
    assert_one_line_error(cli("stats", "--checkpoint", models.decoder, "--out", tmp_path / "s.json", "--compare",
                              models.encoder), "--compare", "model_type='encoder'")
