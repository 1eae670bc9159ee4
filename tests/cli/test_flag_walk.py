"""Applied or refused, never ignored (STYLE.md habit 20, issue 32): a walk over every flag of every
command's parser, for each model family (decoder, encoder, seq2seq).

:data:`FLAG_TABLE` says, per command and family, what each flag does: ``APPLIED`` (it changes the
run), or :func:`refused` with the arguments that are refused and the flag or field the one-line
error names. The walk fails when a parser grows a flag the table does not list, so a new flag has
to be classified for every family before it ships. Every refusal is run (on tiny
``save_pretrained`` models, with training and statistics mocked out: a refusal must come before
them); the training flags that end in ``TrainConfig`` are checked to arrive there for each family.
Which flag is applied where, beyond that, is covered by the command's own tests.
"""

import dataclasses
import json
from typing import Dict, Tuple

import pytest
import torch

from gohgraph.cli.common import TRAIN_FLAGS
from gohgraph.cli.main import build_parser
from tests.cli.test_bad_input import assert_one_line_error, cli, save_family_models, save_objective_run

FAMILIES = ("decoder", "encoder", "seq2seq")
APPLIED = "applied"


@dataclasses.dataclass(frozen=True)
class Refused:
    argv: Tuple[str, ...]  # the flag and the value that is refused (others may be accepted: see the comment)
    says: str  # what the one-line error names: the flag, or the config field it sets


def refused(*argv: str, says: str = None) -> Refused:
    return Refused(argv, says or argv[0])


def family_refused(says: str) -> Refused:
    """The whole command refuses the family, whatever the flags."""
    return Refused((), says)


def flags_of(command: str) -> Tuple[str, ...]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    return tuple(action.option_strings[-1] for action in sub._actions if action.option_strings and action.dest != "help")


def table(command: str, **exceptions) -> Dict[str, object]:
    """Every flag of ``command`` applied, but the ``exceptions`` (``--flag-name`` as ``flag_name``)."""
    names = {f"--{name.replace('_', '-')}": verdict for name, verdict in exceptions.items()}
    return {flag: names.pop(flag, APPLIED) for flag in ALL_FLAGS[command]} | names


ALL_FLAGS = {command: flags_of(command) for command in
             ("train", "eval", "generate", "stats", "ablate", "viz", "report", "bench", "convert")}
# the one loop trains every task; tensor parallelism shards decoders only
OBJECTIVE_LOOP = dict(tensor_parallel=refused("--tensor-parallel", "2"))
# classify and seq2seq tokenize their texts in memory (--tokenizer applied: tests/cli/test_task_settings.py)
NO_TOKEN_CACHE = dict(cache_dir=refused("--cache-dir", "/nonexistent"))
FLAG_TABLE = {
    # train: the family is the objective's (lm: decoder, mlm: encoder, seq2seq); --resume refuses
    # --preset/--config/--init-from in every family (tests/cli/test_bad_input.py)
    "train": {"decoder": table("train"), "encoder": table("train", **OBJECTIVE_LOOP),
              "seq2seq": table("train", **OBJECTIVE_LOOP, **NO_TOKEN_CACHE)},
    # eval: a decoder checkpoint, an --objective mlm run, an --objective seq2seq run
    "eval": {"decoder": table("eval"),
             "encoder": table("eval", split=refused("--split", "train")),
             "seq2seq": table("eval", split=refused("--split", "train"), **NO_TOKEN_CACHE)},
    "generate": {"decoder": table("generate"), "encoder": family_refused("model_type='encoder'"),
                 "seq2seq": table("generate", compile=refused("--compile"))},
    "stats": {"decoder": table("stats"), "encoder": table("stats"),
              "seq2seq": table("stats", by_source=refused("--by-source"), compare=refused("--compare", "x"))},
    # ablate: a decoder's next-token loss under knock-outs; other families are refused from their config
    "ablate": {"decoder": table("ablate"), "encoder": family_refused("model_type='encoder'"),
               "seq2seq": family_refused("model_type='seq2seq'")},
    "viz": {"decoder": table("viz"), "encoder": table("viz"),
            "seq2seq": table("viz", text=refused("--text", "hello"), trace_tokens=refused("--trace-tokens", "8"))},
    "report": {"decoder": table("report"), "encoder": table("report"), "seq2seq": table("report")},
    # bench: the family is its --objective's (lm, mlm, seq2seq); only decoders recurse (--mor)
    # --match flops counts a decoder's next-token step: refused for the other objectives (total/active apply)
    "bench": {"decoder": table("bench"), "encoder": table("bench", mor=refused("--mor"), match=refused("--match", "flops")),
              "seq2seq": table("bench", mor=refused("--mor"), match=refused("--match", "flops"))},
    # convert: the family is the source's (Llama, BERT, T5); --n-experts and --top-k-experts size
    # the experts of --ffn moe (applied with it), which only a decoder source can be upcycled into
    # (T5 and BERT refuse it after loading: tests/interop/test_t5.py)
    "convert": {"decoder": table("convert", n_experts=refused("--n-experts", "4"),
                                 top_k_experts=refused("--top-k-experts", "2")),
                "encoder": table("convert", ffn=refused("--ffn", "moe", says="ffn='moe'"),
                                 n_experts=refused("--n-experts", "4"), top_k_experts=refused("--top-k-experts", "2")),
                "seq2seq": table("convert", ffn=refused("--ffn", "moe", says="ffn='moe'"),
                                 n_experts=refused("--n-experts", "4"), top_k_experts=refused("--top-k-experts", "2"))},
}


def test_every_flag_of_every_command_is_classified_for_every_family():
    assert sorted(FLAG_TABLE) == sorted(ALL_FLAGS)
    for command, families in FLAG_TABLE.items():
        assert sorted(families) == sorted(FAMILIES), command
        for family, verdicts in families.items():
            if not isinstance(verdicts, dict):  # the family as a whole is refused or not offered
                continue
            unlisted = sorted(set(ALL_FLAGS[command]) - set(verdicts))
            assert not unlisted, f"gohgraph {command} ({family}): classify {unlisted} in FLAG_TABLE"
            stale = sorted(set(verdicts) - set(ALL_FLAGS[command]))
            assert not stale, f"gohgraph {command} ({family}): {stale} are no longer flags"


# ---------------------------------------------------------------------- every refusal, run
@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The bare models, two objective runs (for eval) and the files the commands read."""
    root = tmp_path_factory.mktemp("flag-walk")
    models = save_family_models(root / "models")
    for objective in ("mlm", "seq2seq"):
        save_objective_run(root / f"{objective}-run", objective)
    (root / "labels.tsv").write_text("".join(f"{'ab'[i % 2]}\ttext {i}\n" for i in range(20)), encoding="utf-8")
    (root / "llama").mkdir()
    (root / "llama" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 16, "hidden_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 12}))
    from safetensors.torch import save_file

    save_file({"lm_head.weight": torch.zeros(16, 8)}, str(root / "llama" / "model.safetensors"))
    return root, models


def base_argv(command: str, family: str, workspace, tmp_path) -> list:
    """A command line of ``command`` on a model of ``family`` that runs (training and statistics mocked)."""
    root, models = workspace
    checkpoint = getattr(models, family)
    if command == "train":
        data = {"decoder": models.root / "code.txt", "encoder": models.root / "code.txt",
                "seq2seq": models.root / "pairs.tsv"}[family]
        objective = {"decoder": "lm", "encoder": "mlm", "seq2seq": "seq2seq"}[family]
        return ["train", "--objective", objective, "--data", data, "--run-dir", tmp_path / "run", "--seq-len", "16",
                "--batch-size", "2", "--set", "d_model=32", "--no-progress"]
    if command == "eval":
        run = {"decoder": models.decoder, "encoder": root / "mlm-run", "seq2seq": root / "seq2seq-run"}[family]
        return ["eval", "--checkpoint", run, "--max-batches", "1", "--batch-size", "2"]
    if command == "generate":
        return ["generate", "--checkpoint", checkpoint, "--max-new-tokens", "2"]
    if command in ("stats", "ablate", "viz", "report"):
        out = {"stats": "stats.json", "ablate": "ablation", "viz": "pictures", "report": "report.html"}[command]
        return [command, "--checkpoint", checkpoint, "--out", tmp_path / out, "--batches", "1", "--batch-size", "1",
                "--seq-len", "16", "--no-progress"]
    if command == "bench":
        objective = {"decoder": "lm", "encoder": "mlm", "seq2seq": "seq2seq"}[family]
        return ["bench", "--quick", "--objective", objective, "--out", tmp_path / "bench", "--steps", "1", "--seeds", "1",
                "--no-progress"]
    if command == "convert":
        return ["convert", "--from", root / "llama", "--out", tmp_path / "converted"]
    raise AssertionError(command)


REFUSALS = [(command, family, verdict) for command, families in FLAG_TABLE.items()
            for family, verdicts in families.items()
            for verdict in ([verdicts] if isinstance(verdicts, Refused) else
                            verdicts.values() if isinstance(verdicts, dict) else [])
            if isinstance(verdict, Refused) and not (command == "convert" and family != "decoder")]


@pytest.fixture()
def no_expensive_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the command went on to expensive work instead of refusing")

    for target in ("gohgraph.cli.train.train", "gohgraph.training.tasks.mlm.MaskedLanguageModelTask.evaluate",
                   "gohgraph.training.tasks.classify.ClassificationTask.evaluate",
                   "gohgraph.training.tasks.seq2seq.SequenceToSequenceTask.evaluate", "gohgraph.cli.viz.collect_stats",
                   "gohgraph.cli.report.collect_stats", "gohgraph.cli.stats.collect_seq2seq_stats",
                   "gohgraph.cli.eval.evaluate", "gohgraph.analysis.ablation.ablate"):
        monkeypatch.setattr(target, fail)

    class Refuse:  # convert: a transformers that must not be asked to load
        from_pretrained = staticmethod(fail)

    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "transformers", SimpleNamespace(LlamaForCausalLM=Refuse))


@pytest.mark.parametrize("command,family,verdict", REFUSALS,
                         ids=[f"{c}-{f}-{' '.join(v.argv) or 'any'}" for c, f, v in REFUSALS])
def test_each_refused_flag_ends_in_one_line_naming_it(workspace, tmp_path, no_expensive_work, command, family,
                                                      verdict):
    argv = base_argv(command, family, workspace, tmp_path)
    done = cli(*argv, *verdict.argv)
    assert_one_line_error(done, verdict.says)


# ---------------------------------------------------------------------- the training flags reach TrainConfig
TRAIN_VALUES = {"max_steps": "7", "batch_size": "4", "seq_len": "12", "lr": "0.0042", "warmup_steps": "3",
                "eval_every": "5", "save_every": "6", "seed": "11"}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_training_flags_a_family_applies_arrive_in_its_train_config(workspace, tmp_path, monkeypatch, family):
    """Every TRAIN_FLAGS flag the table calls applied is set to a distinctive value and read back
    from the TrainConfig the (mocked) trainer receives."""
    seen = {}

    def capture(*args, **kwargs):
        configs = [arg for arg in args if type(arg).__name__ in ("GoHConfig", "TrainConfig")]
        seen.update(model=configs[0], train=configs[1])
        raise KeyboardInterrupt

    monkeypatch.setattr("gohgraph.cli.train.train", capture)
    verdicts = FLAG_TABLE["train"][family]
    applied = {flag: field for flag, field in TRAIN_FLAGS.items() if flag in TRAIN_VALUES
               and verdicts[f"--{flag.replace('_', '-')}"] == APPLIED}
    assert set(applied) == set(TRAIN_VALUES)
    argv = base_argv("train", family, workspace, tmp_path)
    argv = [arg for arg in argv if arg not in ("--seq-len", "16", "--batch-size", "2")]
    for flag in applied:
        argv += [f"--{flag.replace('_', '-')}", TRAIN_VALUES[flag]]
    done = cli(*argv, "--router", "linear")
    assert done.returncode == 130, done.stderr
    for flag, field in applied.items():
        assert str(getattr(seen["train"], field)) == TRAIN_VALUES[flag], (flag, field)
    assert seen["model"].router == "linear"


# the loop's settings every task takes (the walk above runs --objective lm, mlm and seq2seq; classify too here)
LOOP_VALUES = {"grad_accum": ("2", "grad_accum_steps", 2), "dtype": ("bfloat16", "dtype", "bfloat16"),
               "device": ("cpu", "device", "cpu"), "dense_anneal_steps": ("5", "dense_anneal_steps", 5),
               "expert_parallel": ("2", "expert_parallel", 2), "fsdp": (None, "fsdp", True),
               "compile": (None, "compile", True)}


@pytest.mark.parametrize("objective", ["lm", "mlm", "classify", "seq2seq"])
def test_every_task_takes_the_loops_settings(workspace, tmp_path, monkeypatch, objective):
    """--grad-accum, --dtype, --device, --dense-anneal-steps, --expert-parallel, --fsdp and --compile
    reach the TrainConfig of every task (the trainer refuses a setting the run cannot use, e.g.
    --expert-parallel 2 on one process, in one line: tests/parallel)."""
    from gohgraph.training.tasks import TASKS

    root, models = workspace
    seen = {}

    def capture(cfg, tc, *args, **kwargs):
        seen.update(train=tc, task=kwargs["task"].name)
        raise KeyboardInterrupt

    monkeypatch.setattr("gohgraph.cli.train.train", capture)
    data = {"lm": models.root / "code.txt", "mlm": models.root / "code.txt", "classify": root / "labels.tsv",
            "seq2seq": models.root / "pairs.tsv"}[objective]
    argv = ["train", "--objective", objective, "--data", data, "--run-dir", tmp_path / "run", "--seq-len", "16",
            "--batch-size", "2", "--set", "d_model=32", "--no-progress"]
    for flag, (value, _, _) in LOOP_VALUES.items():
        argv += [f"--{flag.replace('_', '-')}", *([value] if value is not None else [])]
    done = cli(*argv)
    assert done.returncode == 130, done.stderr
    assert seen["task"] == objective and set(TASKS) == {"lm", "mlm", "classify", "seq2seq"}
    for flag, (_, field, expected) in LOOP_VALUES.items():
        assert getattr(seen["train"], field) == expected, flag
