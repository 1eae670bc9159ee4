"""Train any gohgraph model: one flat loop for every task, callable from Python, the CLI and torchrun.

What differs between tasks (model family, presets, data, batches, loss, evaluation) comes from a
registered :class:`~gohgraph.training.tasks.base.Task` (``lm``, ``mlm``, ``classify``,
``seq2seq``); everything else is this loop's, the same for all of them.

Per optimizer step: learning rate from the step (warmup + cosine), ``grad_accum_steps``
micro-batches (a function of the step, sharded by rank), loss ``task_loss + aux_scale * aux_loss``
with ``aux_scale`` warming up from 0, a finite-loss check, gradient clipping, AdamW, then the
auxiliary-loss-free bias update (after the step, never inside ``forward``; docs/routing.md).
Micro-batch ``i`` is weighted ``n_i R / N`` (its loss terms over the step's, times the ``R`` data
ranks whose gradients DDP averages), so a step's gradient is that of the mean over all its terms,
as one batch ``grad_accum_steps * R`` times as large would give. With ``"global-batch"`` balance
pooling the step's micro-batch graphs are held and backpropagated once, after the balance counts of
all of them (and of every rank) are known, which makes the balance loss that of one big batch
(docs/routing.md). Periodic validation, metrics to ``metrics.csv`` (and TensorBoard if installed),
every evaluation to ``metrics.json``, checkpoints every ``save_every`` steps (see
:mod:`gohgraph.training.checkpoint`). With ``compile=True`` the forward and backward run through
``torch.compile``, or eagerly where it cannot compile (:mod:`gohgraph.training.compile`).

Faults: SIGINT/SIGTERM finish the current step, save a checkpoint and return
(``TrainResult.interrupted``); a second one during the save waits for it. A non-finite loss or
gradient raises :class:`TrainingDivergedError` before anything is saved, so the last good
checkpoint stays the latest. ``resume=True`` continues from ``run_dir/checkpoints/latest`` and, on
CPU, reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from ..config import GoHConfig
from ..models.families import family_of
from ..models.routed import global_batch_balance_loss, global_batch_kinds, weighted_aux_loss
from ..parallel import data_parallel as D
from ..storage import CheckpointError, load_state_strict
from .checkpoint import (
    check_optimizer_parameters,
    check_same_config,
    initialise_from,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .compile import TrainingForward
from .config import TrainConfig
from .interrupts import stop_signals
from .memory import available_memory, check_step_fits, estimate_step_memory
from .metrics import SOURCE_LOSS_PREFIX, MetricsLogger, routing_summary
from .optim import build_optimizer
from .parallel_plan import ParallelPlan
from .run_dir import RunDir
from .schedules import dense_to_sparse_schedule, learning_rate, recursion_capacity_warmup, set_learning_rate
from .tasks import Task, get_task
from .tasks.base import batch_to
from .tasks.lm import evaluate, evaluate_sources  # noqa: F401  (the LM's validation loss, public here since v0)

# per-rank seeds are seed + stride * rank (+ step on resume): a prime far above any step count, so
# no two ranks ever draw the same dropout stream
RANK_SEED_STRIDE = 1_000_003


class TrainingDivergedError(ValueError):
    """The loss or gradient became NaN/inf; the run stopped without saving the bad state."""

    @classmethod
    def at(cls, step: int, loss: float, grad_norm: float, last_checkpoint: Optional[Path]) -> "TrainingDivergedError":
        """The error of optimizer step ``step`` (1-based), naming the checkpoint to resume from."""
        return cls(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} at step {step} "
                   f"(loss={loss}, grad_norm={grad_norm}); stopped without saving. Last good checkpoint: "
                   f"{last_checkpoint or 'none yet'}. Lower the learning rate or raise warmup_steps, then resume.")


@dataclass
class TrainResult:
    """What :func:`train` returns. ``history`` holds every evaluation, ``{"step", "tokens_seen", "loss",
    ...the task's scores}``; ``tokens_per_s`` counts the optimizer steps of this call (evaluation
    and saving excluded); ``seconds`` is the call's wall-clock time."""

    model: torch.nn.Module
    history: List[Dict[str, float]]
    steps: int
    tokens_seen: int
    tokens_per_s: float
    checkpoint_path: Optional[Path]
    final_path: Optional[Path]
    metrics_path: Optional[Path] = None
    interrupted: bool = False
    losses: List[float] = field(default_factory=list)  # training loss of every step run here
    seconds: float = 0.0
    compiled: bool = False  # the training steps ran through torch.compile (TrainConfig.compile, no fallback)

    @property
    def metrics(self) -> Dict[str, float]:
        """The last evaluation's values (``{}`` before the first)."""
        return {k: v for k, v in self.history[-1].items() if k not in ("step", "tokens_seen")} if self.history else {}

    @property
    def final_val_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")

    @property
    def val_history(self) -> List[Tuple[int, int, float]]:
        """``(step, tokens_seen, val_loss)`` of every evaluation."""
        return [(int(e["step"]), int(e.get("tokens_seen", 0)), e["loss"]) for e in self.history]

    @property
    def val_by_source(self) -> Dict[str, float]:
        """The last per-source validation losses of an LM run on several ``--data`` sources."""
        return {k[len(SOURCE_LOSS_PREFIX):]: v for k, v in self.metrics.items() if k.startswith(SOURCE_LOSS_PREFIX)}

    @property
    def val_tokens(self) -> int:
        """Tokens the LM's periodic validation covers: the first ``eval_batches`` windows."""
        return int(self.metrics.get("val_tokens", 0))


def training_loss(out, aux_scale: float, loss_field: str = "lm_loss") -> torch.Tensor:
    """The optimised objective: the task's loss (output field ``loss_field``) plus the
    (warming-up) routing losses."""
    return getattr(out, loss_field) + aux_scale * out.aux_loss


def train(model_config: GoHConfig, train_config: TrainConfig, data, run_dir: Path, resume: bool = False,
          progress: bool = True, check_memory: bool = True, task: Union[str, Task] = "lm",
          data_settings: Optional[Dict[str, Any]] = None, log: Optional[Callable[[str], None]] = None) -> TrainResult:
    """Train a fresh ``model_config`` model on ``data`` for ``task``; everything is written under ``run_dir``.

    ``data`` is what the task's :meth:`~gohgraph.training.tasks.base.Task.load_data` returns: for
    ``"lm"`` one :class:`~gohgraph.data.corpus.Corpus` or a
    :class:`~gohgraph.data.sources.MixedCorpus` of several sources sampled by weight (then every
    validation also scores each source alone, the ``val_loss/<source>`` columns of
    ``metrics.csv``). ``data_settings`` (``{"data", "tokenizer", ...}``) are recorded in
    ``objective.json`` so that ``gohgraph eval`` reads the same data.

    ``resume`` continues ``run_dir``'s latest checkpoint (an error when it has none: starting
    afresh would overwrite the run's saved configs). ``check_memory`` refuses, before anything is
    allocated, a step that cannot fit in this machine's memory (:mod:`gohgraph.training.memory`).
    The main process holds ``run_dir``'s lock while it trains (:meth:`RunDir.lock`): a second
    writer is refused with :class:`~gohgraph.training.run_dir.RunDirLockedError`. ``log`` receives
    the run's one-line notices (default: above the progress bar).
    """
    task = get_task(task) if isinstance(task, str) else task
    tc, run_dir = train_config, Path(run_dir)
    if family_of(model_config) is not task.family:
        raise ValueError(f"--objective {task.name} trains model_type={task.model_type!r} models, not "
                         f"model_type={model_config.model_type!r}")
    if resume and RunDir(run_dir).latest_checkpoint() is None:
        raise ValueError(f"nothing to resume: {run_dir} holds no checkpoint; start a new run without "
                         "--resume (resume=False)")
    task.check_model_fits(model_config, data, tc)
    check_task_settings(task, tc)
    if tc.tensor_parallel > 1 and (tc.expert_parallel > 1 or tc.fsdp):
        raise ValueError(f"TrainConfig.tensor_parallel={tc.tensor_parallel} with "
                         f"{f'expert_parallel={tc.expert_parallel}' if tc.expert_parallel > 1 else 'fsdp=True'} "
                         "is not supported: tensor parallel spans every process alone")
    pooled_kinds = global_batch_kinds(model_config)
    if pooled_kinds and (tc.fsdp or tc.expert_parallel > 1 or tc.tensor_parallel > 1):
        raise ValueError(f"{pooled_kinds[0].split('_')[0]}_balance_pooling='global-batch' works with plain data "
                         "parallelism only (not fsdp, expert_parallel or tensor_parallel)")
    ctx = D.init_distributed(tc.device)
    if tc.tensor_parallel > 1 and tc.tensor_parallel != ctx.world_size:
        raise ValueError(f"TrainConfig.tensor_parallel={tc.tensor_parallel} must equal the number of processes "
                         f"({ctx.world_size}): run under torchrun --nproc_per_node={tc.tensor_parallel} "
                         "(tensor parallel with data parallel beside it is not supported)")
    plan = ParallelPlan(tc, ctx)
    if tc.batch_size % plan.data_ranks:
        raise ValueError(f"TrainConfig.batch_size={tc.batch_size} must be divisible by the "
                         f"number of processes ({ctx.world_size})")
    if tc.expert_parallel > 1 and tc.expert_parallel != ctx.world_size:
        raise ValueError(f"TrainConfig.expert_parallel={tc.expert_parallel} must equal the number of processes "
                         f"({ctx.world_size}): run under torchrun --nproc_per_node={tc.expert_parallel}")
    if check_memory:
        # a rank of tensor parallelism runs the whole batch (an over-estimate: it holds a share of the weights)
        memory = estimate_step_memory(model_config, tc, task.model_class, plan.data_ranks)
        check_step_fits(memory, available_memory(ctx.device), tc, model_config)
    notice = log or (lambda line: _log(ctx.is_main, line))
    try:
        with contextlib.ExitStack() as exits:
            if ctx.is_main:  # before the checkpoint is read and anything written
                exits.enter_context(RunDir(run_dir).lock(notice=notice))
            return _train(task, model_config, tc, data, run_dir, resume, progress, plan, exits,
                          dict(data_settings or {}), notice)
    finally:
        D.shutdown(ctx)


def check_task_settings(task: Task, tc: TrainConfig) -> None:
    """Refuse, in one line, the settings of the loop that cannot apply to ``task``'s models."""
    if tc.tensor_parallel > 1 and not task.family.tensor_parallel:
        raise ValueError(f"--tensor-parallel {tc.tensor_parallel}: tensor parallelism shards decoder models; "
                         f"--objective {task.name} trains {task.model_type} models (use data parallelism: torchrun "
                         "without --tensor-parallel)")
    if tc.recursion_warmup_steps and not task.recursion:
        raise ValueError(f"recursion_warmup_steps={tc.recursion_warmup_steps}: only decoders recurse "
                         f"(Mixture-of-Recursions); --objective {task.name} trains {task.model_type} models")


def _train(task: Task, model_config: GoHConfig, tc: TrainConfig, data, run_dir: Path, resume: bool,
           progress: bool, plan: ParallelPlan, exits: contextlib.ExitStack, data_settings: Dict[str, Any],
           notice: Callable[[str], None]) -> TrainResult:
    started = time.perf_counter()
    ctx, data_rank, data_ranks = plan.ctx, plan.data_rank, plan.data_ranks
    run = RunDir(run_dir)
    model_class = task.model_class
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = model_class(model_config)
    start_step, tokens_seen, history = 0, 0, []
    checkpoint = run.latest_checkpoint() if resume else None
    saved_optimizer = None
    if checkpoint is not None:
        saved_config, model_state, saved_optimizer, saved = load_checkpoint(checkpoint)
        if saved.get("objective", "lm") != task.name:
            raise CheckpointError(f"cannot resume from {checkpoint}: it was trained with --objective "
                                  f"{saved.get('objective', 'lm')}, not {task.name}")
        check_same_config(saved_config, model_config, checkpoint)
        load_state_strict(model, model_state, checkpoint)
        start_step, tokens_seen = saved["step"], saved["tokens_seen"]
        history = [_history_entry(entry) for entry in saved["val_history"]]
        if data_rank == 0:
            restore_rng_state(saved["rng_tensors"], saved["rng"])
        else:
            torch.manual_seed(tc.seed + RANK_SEED_STRIDE * data_rank + start_step)
    else:
        if tc.init_from is not None:
            fresh = initialise_from(model, Path(tc.init_from))
            if fresh:
                notice(f"initialised from {tc.init_from}; new: {', '.join(fresh)}")
        torch.manual_seed(tc.seed + RANK_SEED_STRIDE * data_rank)  # dropout differs per data rank
    model.to(ctx.device).train()
    wrapped = plan.wrap(model)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    forward = TrainingForward(wrapped, tc.compile)  # eager unless tc.compile (and compiling works)
    if saved_optimizer is not None:
        check_optimizer_parameters(saved.get("optimizer_param_names"), optimizer.param_names, checkpoint)
        try:
            plan.load_optimizer_state(model, optimizer, saved_optimizer)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}/optimizer.json does not fit this model's optimizer: {err}") from None
    next_batch = task.training_batches(data, tc)

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in run.remove_stale_staging():
            notice(f"removed {leftover}, left by a save that was killed before it completed")
        run.write_objective({"objective": task.name, "seq_len": tc.seq_len, "data": data_settings.get("data"),
                             "tokenizer": data_settings.get("tokenizer", "byte"), **task.run_settings(data)})
        run.write_train_config(tc)
        run.write_model_config(model_config)
        task.save_data_files(run_dir, data)
    columns = task.evaluation_columns(data)
    metrics = MetricsLogger(run, start_step, enabled=ctx.is_main, tensorboard=tc.tensorboard,
                            extra_columns=[task.loss_column, *columns.values()])
    autocast = _autocast(ctx.device, tc.dtype)
    last_checkpoint, interrupted, losses = checkpoint, False, []
    step = start_step
    # global-batch balance (docs/routing.md): the step's forwards are held and backpropagated once
    global_batch = bool(global_batch_kinds(model_config))

    def global_balance_aux(out) -> torch.Tensor:
        return weighted_aux_loss(model_config, _records(out), out.aux_loss, getattr(out, "recursion", None),
                                 leave_out_global=True)

    stop = exits.enter_context(stop_signals())  # until the final model is written too

    def save(at_step: int) -> Path:
        with stop.saving():
            return _save(at_step)

    def _save(at_step: int) -> Path:
        model_state = plan.full_model_state(model)
        optimizer_state = plan.full_optimizer_state(model, optimizer)
        path = None
        if ctx.is_main:
            state = {"objective": task.name, "tokens_seen": tokens_seen, "val_history": history,
                     "data_position": at_step, "train_config": tc.to_dict(), "data": data_settings.get("data"),
                     "corpus": task.describe_data(data),
                     "optimizer_param_names": optimizer.param_names}
            path = save_checkpoint(run_dir, at_step, model_config, model_state, optimizer_state,
                                   state, tc.keep_last)
        D.barrier(ctx)
        return path or run.checkpoint_dir(at_step)

    def evaluate_now() -> Dict[str, float]:
        values = task.evaluate(model, data, tc, tc.eval_batches)
        history.append({"step": step, "tokens_seen": tokens_seen, **values})
        if ctx.is_main:
            run.write_evaluations(history)
        return values

    bar = _progress_bar(progress and ctx.is_main, start_step, tc.max_steps, task.name)
    train_seconds, timed_tokens = 0.0, 0  # optimizer steps only: evaluation and saving excluded
    try:
        while step < tc.max_steps:
            step_started = time.perf_counter()
            lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
            set_learning_rate(optimizer, lr)
            aux_scale = min(1.0, step / tc.aux_warmup_steps) if tc.aux_warmup_steps else 1.0
            if tc.dense_anneal_steps:
                model.set_dense_blend(dense_to_sparse_schedule(step, tc.dense_anneal_steps))
            if tc.recursion_warmup_steps:
                model.set_recursion_capacity_warmup(recursion_capacity_warmup(step, tc.recursion_warmup_steps))
            batches = [next_batch(step, micro, data_rank, data_ranks) for micro in range(tc.grad_accum_steps)]
            weights, step_tokens = _micro_batch_weights(task, batches, ctx, data_ranks)
            parts = torch.zeros(3, device=ctx.device)  # loss, task loss, aux_loss
            held, held_loss = [], 0.0  # global-batch balance: the step's records and local losses
            for micro, batch in enumerate(batches):
                batch = batch_to(batch, ctx.device)
                weight = weights[micro]
                last_micro = micro == tc.grad_accum_steps - 1

                def micro_step(call):
                    with autocast:
                        out = call(**batch)
                        own = getattr(out, task.loss_field)
                        aux = global_balance_aux(out) if global_batch else out.aux_loss
                        # the task's mean weighted by its share of the step's terms; the routing
                        # losses are per-micro-batch means, averaged over the micro-batches
                        loss = own * weight + aux_scale * aux / tc.grad_accum_steps
                    if not global_batch:
                        loss.backward()
                    return out, own, aux, loss

                with plan.gradient_sync(last_micro and not global_batch):
                    out, own, aux, loss = forward.run(micro_step)
                if global_batch:
                    held.append(_records(out))
                    held_loss = held_loss + loss
                parts += torch.stack([loss.detach(), own.detach() * weight,
                                      aux.detach() / tc.grad_accum_steps]).float()
            if global_batch:  # one backward over the step's graphs, after the counts are known
                pooled = global_batch_balance_loss(model_config, held, D.all_reduce_sum_fn(ctx), ctx.world_size)
                (held_loss + aux_scale * pooled).backward()
                D.all_reduce_gradients_mean(model, ctx)
                pooled = pooled.detach().to(parts.device)
                parts += torch.stack([aux_scale * pooled, torch.zeros_like(pooled), pooled]).float()
                del held, held_loss
            # task parts are already shares of the step's total (times the data ranks): the mean over ranks sums them
            parts = D.all_reduce_mean(parts, ctx)
            grad_norm = plan.clip_gradients(model, tc.grad_clip)
            if not (math.isfinite(float(parts[0])) and math.isfinite(grad_norm)):
                raise TrainingDivergedError.at(step + 1, float(parts[0]), grad_norm, last_checkpoint)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            plan.sync_routing_loads(model)
            model.update_routing_biases()
            train_seconds += time.perf_counter() - step_started

            step += 1
            tokens_seen += step_tokens
            timed_tokens += step_tokens
            losses.append(float(parts[0]))
            tokens_per_s = timed_tokens / max(1e-9, train_seconds)
            evaluation = None
            if step % tc.eval_every == 0 or step == tc.max_steps:
                evaluation = evaluate_now()
            if ctx.is_main and (step % tc.log_every == 0 or evaluation is not None or step == start_step + 1):
                metrics.log(step=step, tokens=tokens_seen, lr=lr, loss=float(parts[0]),
                            **{task.loss_column: float(parts[1])}, aux_loss=float(parts[2]), aux_scale=aux_scale,
                            grad_norm=grad_norm, tokens_per_s=tokens_per_s,
                            **routing_summary(_records(out), model_config),
                            **_evaluation_cells(evaluation, columns))
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts[0]):.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}",
                            **({"val": f"{evaluation['loss']:.3f}"} if evaluation is not None else {}))
            interrupted = D.any_rank(stop.requested, ctx)
            if interrupted or step % tc.save_every == 0 or step == tc.max_steps:
                last_checkpoint = save(step)
            if interrupted:
                notice(f"interrupted: checkpoint saved at step {step} to {last_checkpoint}; continue with "
                       "resume=True (--resume)")
                break
    finally:
        bar.close()
        metrics.close()

    model = plan.ordinary_model(model, lambda: model_class(model_config))
    final_path = None
    if not interrupted:
        if not history or history[-1]["step"] != step:  # a resumed run that had already finished
            evaluate_now()
        if ctx.is_main:
            with stop.saving():
                final_path = model.save_pretrained(run.final_dir)
                task.save_data_files(final_path, data)
    return TrainResult(model=model, history=history, steps=step, tokens_seen=tokens_seen,
                       tokens_per_s=timed_tokens / train_seconds if train_seconds > 0 else 0.0,
                       checkpoint_path=last_checkpoint, final_path=final_path, metrics_path=run.metrics_file,
                       interrupted=interrupted, losses=losses, seconds=time.perf_counter() - started,
                       compiled=forward.compiled)


# ---------------------------------------------------------------------- helpers
def _micro_batch_weights(task: Task, batches: List[Dict[str, torch.Tensor]], ctx: D.DistContext,
                         data_ranks: int) -> Tuple[List[float], int]:
    """Each micro-batch's weight ``n_i R / N`` (module docstring) and the step's input tokens over
    every data rank (padding included)."""
    terms = [task.loss_terms(batch) for batch in batches]
    tokens = sum(task.batch_tokens(batch) for batch in batches)
    counts = torch.tensor([float(sum(terms)), float(tokens)], dtype=torch.float64, device=ctx.device)
    if data_ranks > 1:
        D.all_reduce_sum_fn(ctx)(counts)
    total, step_tokens = float(counts[0]), int(counts[1])
    if total == 0:
        raise ValueError(f"optimizer step's batches hold no {task.name} loss terms (e.g. no masked position)")
    return [n * data_ranks / total for n in terms], step_tokens


def _records(out) -> list:
    """The routing records of a model output, every attention kind's (the family contract's
    ``routing_by_kind()``)."""
    return [layer for layers in out.routing_by_kind().values() for layer in layers]


def _history_entry(entry) -> Dict[str, float]:
    """An evaluation of a checkpoint's history; LM checkpoints saved ``[step, tokens, loss]``."""
    if isinstance(entry, dict):
        return dict(entry)
    step, tokens_seen, loss = entry
    return {"step": step, "tokens_seen": tokens_seen, "loss": loss}


def _evaluation_cells(evaluation: Optional[Dict[str, float]], columns: Dict[str, str]) -> Dict[str, float]:
    """``metrics.csv`` cells of an evaluation, if one ran: ``val_loss`` and the task's columns."""
    if evaluation is None:
        return {}
    return {"val_loss": evaluation["loss"], **{column: evaluation[key] for key, column in columns.items()}}


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress_bar(enabled: bool, start: int, total: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc=description, dynamic_ncols=True)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(message)
