"""Every task trains through the one loop (gohgraph.training.trainer): the encoder and seq2seq
tasks survive faults as the LM does (docs/contract.md: exact resume, Ctrl-C, non-finite losses,
the CLI's --resume / --overwrite), and take the loop's settings: gradient accumulation equal to a
batch as large, bf16 autocast, torch.compile, two data-parallel ranks equal to one process."""

import json
import math
import shutil
import signal
import sys

import pytest
import torch

from gohgraph import CheckpointError, GoHConfig
from gohgraph.cli.main import main
from gohgraph.data.objectives import SpecialTokens
from gohgraph.data.objectives.classify import classification_batches
from gohgraph.models.encoder import GoHEncoder
from gohgraph.training.checkpoint import latest_checkpoint, load_checkpoint
from gohgraph.training.config import TrainConfig
from gohgraph.training.metrics import read_metrics
from gohgraph.training.tasks import get_task
from gohgraph.training.tasks.epochs import EpochBatches
from gohgraph.training.trainer import TrainingDivergedError, train
from tests.helpers import at_training_forward, ctrl_c_after_logged_steps, make_corpus, nan_loss, send_ctrl_c

SMALL = dict(d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2, router="graph", router_rounds=1,
             router_dim=8, head_graph="complete", inter_head_flow=True, position_embedding="rope",
             mlp="gelu-exact", norm="layer", max_seq_len=32, dropout=0.1)  # dropout: the RNG must resume too


def _train_config(**changes):
    values = dict(batch_size=4, seq_len=24, max_steps=6, lr=5e-3, warmup_steps=2, eval_every=3, eval_batches=1,
                  save_every=3, keep_last=5, weight_decay=0.01, log_every=1)
    values.update(changes)
    return TrainConfig(**values)


def _labelled(tmp_path):
    lines = [f"{'loud' if i % 2 else 'quiet'}\t{('HELLO THERE' if i % 2 else 'hello there')} {i}" for i in range(22)]
    path = tmp_path / "labelled.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return get_task("classify").load_data({"data": str(path)}, None, _train_config(), None)


def _pairs(tmp_path):
    path = tmp_path / "reverse.tsv"
    # targets of 3, 6 or 9 bytes: batches hold different numbers of target tokens
    path.write_text("".join(f"reverse w{i:02d}\t{f'w{i:02d}'[::-1] * (1 + i % 3)}\n" for i in range(22)),
                    encoding="utf-8")
    return get_task("seq2seq").load_data({"data": str(path)}, None, _train_config(), None)


def train_objective(objective, cfg, tc, data, run_dir, log=lambda _: None, resume=False):
    return train(cfg, tc, data, run_dir, resume=resume, progress=False, task=objective, log=log)


def _objective_setup(objective, tmp_path):
    """(GoHConfig, data) of a tiny run of ``objective``."""
    if objective == "mlm":
        return GoHConfig(**SMALL, model_type="encoder", vocab_size=SpecialTokens(256).vocab_size), make_corpus()
    if objective == "classify":
        return GoHConfig(**SMALL, model_type="encoder", vocab_size=SpecialTokens(256).vocab_size, n_labels=2,
                         classifier_pooling="mean"), _labelled(tmp_path)
    special = SpecialTokens(256, with_eos=True)
    return GoHConfig(**SMALL, model_type="seq2seq", n_decoder_layers=1, vocab_size=special.vocab_size,
                     pad_token_id=special.pad, decoder_start_token_id=special.pad), _pairs(tmp_path)


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, objective):
    cfg, data = _objective_setup(objective, tmp_path)
    # about 20 training texts/pairs, batches of 4: the 6 steps cross an epoch (classify, seq2seq)
    straight = train_objective(objective, cfg, _train_config(), data, tmp_path / "straight")
    assert straight.steps == 6 and not straight.interrupted

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_000006")
    shutil.rmtree(resumed_dir / "final")
    (resumed_dir / "checkpoints" / "latest").write_text("step_000003\n")
    resumed = train_objective(objective, cfg, _train_config(), data, resumed_dir, log=lambda _: None, resume=True)

    assert resumed.steps == 6 and resumed.history == straight.history
    for key, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[key]), key
    without_timing = lambda path: [{k: v for k, v in row.items() if k != "tokens_per_s"}  # noqa: E731
                                   for row in read_metrics(path)]
    assert without_timing(resumed_dir / "metrics.csv") == without_timing(tmp_path / "straight" / "metrics.csv")


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_metrics_csv_logs_every_step_and_the_evaluations(tmp_path, objective):
    cfg, data = _objective_setup(objective, tmp_path)
    result = train_objective(objective, cfg, _train_config(), data, tmp_path)
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    own = "class_loss" if objective == "classify" else "lm_loss"
    for row in rows:  # the logged loss is the objective's plus the routing loss
        assert row["loss"] == pytest.approx(row[own] + row["aux_loss"], rel=1e-4)
        assert 0 <= row["head_load_cv"] and row["active_heads"] == pytest.approx(3.0)  # 1 shared + top-2
    evaluated = {int(row["step"]): row for row in rows if "val_loss" in row}
    assert sorted(evaluated) == [3, 6]
    for entry in result.history:  # the CSV's validation cells are metrics.json's numbers
        assert evaluated[entry["step"]]["val_loss"] == pytest.approx(entry["loss"], rel=1e-5)
        if objective == "classify":
            assert evaluated[entry["step"]]["val_accuracy"] == pytest.approx(entry["accuracy"], rel=1e-5)
        if objective == "seq2seq":
            assert evaluated[entry["step"]]["val_token_accuracy"] == pytest.approx(entry["token_accuracy"], rel=1e-5)


def test_epoch_batches_are_the_loop_that_restarts_an_order_whenever_one_runs_short():
    x, mask, y = torch.arange(11 * 3).view(11, 3), torch.ones(11, 3), torch.arange(11)
    # the reference: the loop the trainer had, a new order (seeded by the step) when one ends short
    reference, order = [], None
    for step in range(9):
        batch = next(order, None) if order is not None else None
        if batch is None or len(batch[2]) < 4:
            order = classification_batches(x, mask, y, 4, seed=7 + step)
            batch = next(order)
        reference.append(batch[2])
    batches = EpochBatches(lambda seed: classification_batches(x, mask, y, 4, seed=seed), 11, 4, seed=7)
    assert [batches(step)[2].tolist() for step in range(9)] == [b.tolist() for b in reference]
    jumped = EpochBatches(lambda seed: classification_batches(x, mask, y, 4, seed=seed), 11, 4, seed=7)
    assert [jumped(step)[2].tolist() for step in (5, 6, 1)] == [reference[s].tolist() for s in (5, 6, 1)]
    with pytest.raises(ValueError, match="3 training texts cannot fill one batch of batch_size=4"):
        EpochBatches(lambda seed: iter(()), 3, 4, seed=0, what="training texts")


def test_sigint_finishes_the_step_then_saves_and_returns(tmp_path, monkeypatch):
    cfg, data = _objective_setup("mlm", tmp_path)
    at_training_forward(monkeypatch, GoHEncoder, 3, before=send_ctrl_c)  # Ctrl-C in the middle of step 3
    previous_handler = signal.getsignal(signal.SIGINT)
    result = train_objective("mlm", cfg, _train_config(max_steps=50, save_every=100), data, tmp_path)
    assert result.interrupted and result.steps == 3 and result.final_path is None
    assert signal.getsignal(signal.SIGINT) is previous_handler
    assert latest_checkpoint(tmp_path) == result.checkpoint_path == tmp_path / "checkpoints" / "step_000003"
    _, state, _, training_state = load_checkpoint(result.checkpoint_path)
    assert training_state["step"] == 3 and training_state["objective"] == "mlm"
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(state[name], tensor), name


def test_a_non_finite_loss_stops_before_saving(tmp_path, monkeypatch):
    cfg, data = _objective_setup("classify", tmp_path)
    at_training_forward(monkeypatch, GoHEncoder, 5, after=nan_loss("class_loss"))
    with pytest.raises(TrainingDivergedError, match="non-finite loss at step 5.*Last good checkpoint: .*step_000003"):
        train_objective("classify", cfg, _train_config(), data, tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_000003" and not (tmp_path / "final").exists()


def test_resume_refuses_another_model_or_objective(tmp_path):
    cfg, data = _objective_setup("mlm", tmp_path)
    labelled = _labelled(tmp_path)
    train_objective("mlm", cfg, _train_config(max_steps=3), data, tmp_path)
    with pytest.raises(CheckpointError, match=r"model config differs \(d_model: checkpoint 32 vs given 64"):
        train_objective("mlm", cfg.replace(d_model=64), _train_config(max_steps=4), data, tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="trained with --objective mlm, not classify"):
        train_objective("classify", cfg.replace(n_labels=len(labelled.labels)), _train_config(max_steps=4), labelled,
                        tmp_path, resume=True)
    with pytest.raises(ValueError, match="nothing to resume"):
        train_objective("mlm", cfg, _train_config(), data, tmp_path / "empty", resume=True)
    state_file = latest_checkpoint(tmp_path) / "training_state.json"
    state = json.loads(state_file.read_text())
    state["optimizer_param_names"] = state["optimizer_param_names"][::-1]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="optimizer state is for other parameters \\(first difference"):
        train_objective("mlm", cfg, _train_config(max_steps=4), data, tmp_path, resume=True)


def test_cli_resume_continues_with_the_runs_data_and_config(tmp_path, capsys):
    lines = [f"{'loud' if i % 2 else 'quiet'}\t{('HELLO THERE' if i % 2 else 'hello there')} {i}" for i in range(44)]
    data = tmp_path / "labelled.tsv"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run_dir = tmp_path / "cls"
    common = ["train", "--objective", "classify", "--run-dir", str(run_dir), "--no-progress"]
    assert main([*common, "--data", str(data), "--max-steps", "4", "--seq-len", "24", "--batch-size", "4",
                 "--set", "d_model=32", "--set", "eval_batches=1", "--set", "save_every=2"]) == 0
    capsys.readouterr()

    # the same command again would replace the run: refused in one line
    assert main([*common, "--data", str(data), "--max-steps", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert "already holds a trained model or checkpoints; pass --resume" in err and "\n" not in err

    # --resume needs only the run: data, labels, model and batch size come from it; --max-steps extends
    assert main([*common, "--resume", "--max-steps", "6"]) == 0
    assert "steps: 6 of 6" in capsys.readouterr().out
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == [4, 6]
    assert latest_checkpoint(run_dir).name == "step_000006"
    _, _, _, state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["train_config"]["batch_size"] == 4 and state["data"] == str(data)

    assert main(["train", "--objective", "mlm", "--run-dir", str(run_dir), "--resume"]) == 1
    assert "is an --objective classify run; resume it with that objective" in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_on_the_command_exits_130_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "mlm"
    command = [sys.executable, "-m", "gohgraph", "train", "--objective", "mlm", "--run-dir", str(run_dir),
               "--max-steps", "100000", "--batch-size", "2", "--seq-len", "16", "--no-progress",
               "--set", "d_model=32", "--set", "n_layers=1", "--set", "log_every=1", "--set", "eval_every=100000",
               "--set", "save_every=100000", "--set", "eval_batches=1"]
    returncode, stdout, stderr = ctrl_c_after_logged_steps(command, run_dir / "metrics.csv")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout and "--resume" in stdout
    stopped = load_checkpoint(latest_checkpoint(run_dir))[3]["step"]
    assert stopped >= 3

    # the continued run starts where the interrupted one stopped, with its settings
    assert main(["train", "--objective", "mlm", "--run-dir", str(run_dir), "--resume", "--no-progress",
                 "--max-steps", str(stopped + 2)]) == 0
    assert load_checkpoint(latest_checkpoint(run_dir))[3]["step"] == stopped + 2
    assert (run_dir / "final" / "model.safetensors").is_file()


# ---------------------------------------------------------------------- the loop's settings, for every task
LINEAR = dict(router="dense", n_shared_heads=0, top_k_heads=None, dropout=0.0)  # no routing loss: losses are linear


def _linear_setup(objective, tmp_path):
    cfg, data = _objective_setup(objective, tmp_path)
    return cfg.replace(**LINEAR), data


def _padded_cat(batches, objective, cfg):
    """The micro-batches as one batch (seq2seq's are padded to their own widths: pad to the widest)."""
    if objective != "seq2seq":
        return {name: torch.cat([b[name] for b in batches]) for name in batches[0]}
    fill = {"input_ids": cfg.pad_token_id, "attention_mask": 0, "labels": -100}
    joined = {}
    for name in batches[0]:
        width = max(b[name].shape[1] for b in batches)
        joined[name] = torch.cat([torch.nn.functional.pad(b[name], (0, width - b[name].shape[1]), value=fill[name])
                                  for b in batches])
    return joined


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_grad_accum_equals_one_batch_twice_as_large(tmp_path, objective):
    """Two micro-batches of 4 == the same 8 rows in one batch, also where the micro-batches hold
    different numbers of loss terms (masked positions, target tokens)."""
    from gohgraph.models.families import FAMILIES
    from gohgraph.training.optim import build_optimizer
    from gohgraph.training.schedules import learning_rate

    cfg, data = _linear_setup(objective, tmp_path)
    tc = _train_config(grad_accum_steps=2, max_steps=1, warmup_steps=0, grad_clip=0.0, lr=1e-3, eval_every=1)
    task = get_task(objective)
    micro = [task.training_batches(data, tc)(0, m, 0, 1) for m in range(2)]
    if objective != "classify":
        terms = [task.loss_terms(b) for b in micro]
        assert terms[0] != terms[1], "the check needs micro-batches of different sizes"
    result = train_objective(objective, cfg, tc, data, tmp_path / "run")

    torch.manual_seed(tc.seed)
    reference = FAMILIES[cfg.model_type].model_class(cfg)
    optimizer = build_optimizer(reference, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(0, tc.lr, 0, 1)
    getattr(reference(**_padded_cat(micro, objective, cfg)), task.loss_field).backward()
    optimizer.step()
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(result.model.state_dict()[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("objective", ["lm", "mlm", "classify", "seq2seq"])
def test_bf16_autocast_trains_every_task_on_cpu(tmp_path, objective, monkeypatch):
    from gohgraph.models.families import FAMILIES

    if objective == "lm":
        from tests.helpers import TINY
        cfg, data = GoHConfig(**{**TINY, "n_layers": 1}), make_corpus(n_train=4_000, n_val=1_000)
    else:
        cfg, data = _objective_setup(objective, tmp_path)
    model_class, seen = FAMILIES[cfg.model_type].model_class, []
    real_forward = model_class.forward

    def forward(model, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real_forward(model, *args, **kwargs)

    monkeypatch.setattr(model_class, "forward", forward)
    tc = _train_config(dtype="bfloat16", max_steps=3, eval_every=3, seq_len=16 if objective == "lm" else 24)
    result = train_objective(objective, cfg, tc, data, tmp_path / "run")
    assert result.steps == 3 and all(map(math.isfinite, result.losses))
    assert seen[:3] == [True, True, True]  # the training forwards ran under bf16 autocast
    assert result.model.embed.weight.dtype == torch.float32  # the weights stay float32


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_compile_equals_eager(tmp_path, objective, monkeypatch):
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    cfg, data = _objective_setup(objective, tmp_path)
    cfg = cfg.replace(dropout=0.0)  # compiled dropout draws other random numbers than eager dropout
    results = {}
    for compile in (False, True):
        tc = _train_config(max_steps=2, eval_every=2, save_every=2, compile=compile, grad_accum_steps=2)
        results[compile] = train_objective(objective, cfg, tc, data, tmp_path / str(compile))
    assert results[True].compiled and not results[False].compiled
    torch.testing.assert_close(results[True].losses, results[False].losses, rtol=1e-5, atol=1e-5)
    for name, tensor in results[False].model.state_dict().items():
        torch.testing.assert_close(results[True].model.state_dict()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
