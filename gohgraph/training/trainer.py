"""Train a GoH language model: one flat loop, callable from Python, the CLI and torchrun.

Per optimizer step: learning rate from the step (warmup + cosine), ``grad_accum_steps``
micro-batches of random windows (seeded by the step, sharded by rank), loss
``lm_loss + aux_scale * aux_loss`` with ``aux_scale`` warming up from 0, a finite-loss check,
gradient clipping, AdamW, then the auxiliary-loss-free bias update (after the step, never inside
``forward``; docs/routing.md). With ``"global-batch"`` balance pooling the step's micro-batch graphs are
held and backpropagated once, after the balance counts of all of them (and of every rank) are known,
which makes the balance loss that of one big batch (docs/routing.md). Periodic validation, metrics to
``metrics.csv`` (and TensorBoard if
installed), checkpoints every ``save_every`` steps (see :mod:`gohgraph.training.checkpoint`).
With ``compile=True`` the forward and backward run through ``torch.compile``, or eagerly where it
cannot compile (:mod:`gohgraph.training.compile`).

Faults: SIGINT/SIGTERM finish the current step, save a checkpoint and return
(``TrainResult.interrupted``); a non-finite loss or gradient raises :class:`TrainingDivergedError`
before anything is saved, so the last good checkpoint stays the latest. ``resume=True`` continues
from ``run_dir/checkpoints/latest`` and, on CPU, reproduces the uninterrupted run bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
import torch

from ..config import GoHConfig
from ..data.batches import eval_batches, eval_windows
from ..data.corpus import Corpus
from ..data.sources import MixedCorpus, corpus_train_batch, validation_sets
from ..models.decoder import GoHOutput, GoHTransformer
from ..models.routed import global_batch_balance_loss, global_batch_kinds, weighted_aux_loss
from ..parallel import data_parallel as D
from ..parallel import expert_parallel as EP
from ..parallel import tensor_parallel as TP
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
from .metrics import MetricsLogger, routing_summary, source_loss_column
from .optim import build_optimizer
from .run_dir import RunDir
from .schedules import dense_to_sparse_schedule, learning_rate, recursion_capacity_warmup, set_learning_rate

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
    """What :func:`train` returns; ``val_history`` holds ``(step, tokens_seen, val_loss)``;
    ``tokens_per_s`` counts the optimizer steps of this call (evaluation and saving excluded)."""

    final_val_loss: float
    val_history: List[Tuple[int, int, float]]
    tokens_per_s: float
    model: GoHTransformer
    checkpoint_path: Optional[Path]
    final_path: Optional[Path]
    steps: int
    tokens_seen: int
    interrupted: bool = False
    metrics_path: Optional[Path] = None
    val_tokens: int = 0  # tokens the periodic validation covers: the first eval_batches windows
    losses: List[float] = field(default_factory=list)  # training loss of every step run here
    val_by_source: Dict[str, float] = field(default_factory=dict)  # last per-source losses (several --data)
    compiled: bool = False  # the training steps ran through torch.compile (TrainConfig.compile, no fallback)


def training_loss(out: GoHOutput, aux_scale: float) -> torch.Tensor:
    """The optimised objective: next-token loss plus the (warming-up) routing losses."""
    return out.lm_loss + aux_scale * out.aux_loss


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokens, batch_size: int, seq_len: int,
             max_batches: Optional[int] = None) -> float:
    """Mean next-token cross-entropy (nats) over :func:`~gohgraph.data.batches.eval_batches` windows,
    weighted by the number of predicted tokens."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for batch in eval_batches(tokens, batch_size, seq_len, max_batches):
            batch = batch.to(device)
            out = model(batch, labels=batch)
            predicted = batch.shape[0] * (batch.shape[1] - 1)
            total += float(out.lm_loss) * predicted
            count += predicted
    finally:
        model.train(was_training)
    return total / count


def evaluate_sources(model: torch.nn.Module, val_sets: Dict[str, np.ndarray], batch_size: int, seq_len: int,
                     max_batches: Optional[int] = None) -> Tuple[float, Dict[str, float]]:
    r""":func:`evaluate` on each source alone, and their combination.

    Returns ``(overall, {source: loss})``; ``overall = \sum_s n_s L_s / \sum_s n_s`` with ``n_s`` the
    tokens predicted in source ``s``'s windows, i.e. the mean loss over the union of all windows.
    """
    per_source, total, count = {}, 0.0, 0
    for name, tokens in val_sets.items():
        per_source[name] = evaluate(model, tokens, batch_size, seq_len, max_batches)
        predicted = eval_windows(len(tokens), batch_size, seq_len, max_batches) * (seq_len - 1)
        total += per_source[name] * predicted
        count += predicted
    return total / count, per_source


def train(model_config: GoHConfig, train_config: TrainConfig, corpus: Union[Corpus, MixedCorpus], run_dir: Path,
          resume: bool = False, progress: bool = True, check_memory: bool = True) -> TrainResult:
    """Train ``GoHTransformer(model_config)`` on ``corpus``; everything is written under ``run_dir``.

    ``corpus`` is one :class:`~gohgraph.data.corpus.Corpus` or a
    :class:`~gohgraph.data.sources.MixedCorpus` of several sources sampled by weight; then every
    validation also scores each source alone (``val_loss/<source>`` columns of ``metrics.csv``).

    ``resume`` continues ``run_dir``'s latest checkpoint (an error when it has none: starting
    afresh would overwrite the run's saved configs). ``check_memory`` refuses, before anything is
    allocated, a step that cannot fit in this machine's memory (:mod:`gohgraph.training.memory`).
    The main process holds ``run_dir``'s lock while it trains (:meth:`RunDir.lock`): a second
    writer is refused with :class:`~gohgraph.training.run_dir.RunDirLockedError`.
    """
    tc, run_dir = train_config, Path(run_dir)
    if resume and RunDir(run_dir).latest_checkpoint() is None:
        raise ValueError(f"nothing to resume: {run_dir} holds no checkpoint; start a new run without "
                         "--resume (resume=False)")
    if tc.seq_len + 1 > model_config.max_seq_len:
        raise ValueError(f"TrainConfig.seq_len={tc.seq_len} + 1 exceeds the model's max_seq_len="
                         f"{model_config.max_seq_len} (training windows hold seq_len + 1 tokens)")
    if corpus.vocab_size > model_config.vocab_size:
        raise ValueError(f"the corpus tokenizer has {corpus.vocab_size} tokens but the model's "
                         f"vocab_size={model_config.vocab_size}")
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
    if tc.batch_size % _data_ranks(tc, ctx):
        raise ValueError(f"TrainConfig.batch_size={tc.batch_size} must be divisible by the "
                         f"number of processes ({ctx.world_size})")
    if tc.expert_parallel > 1 and tc.expert_parallel != ctx.world_size:
        raise ValueError(f"TrainConfig.expert_parallel={tc.expert_parallel} must equal the number of processes "
                         f"({ctx.world_size}): run under torchrun --nproc_per_node={tc.expert_parallel}")
    if check_memory:
        # a rank of tensor parallelism runs the whole batch (an over-estimate: it holds a share of the weights)
        memory = estimate_step_memory(model_config, tc, GoHTransformer, _data_ranks(tc, ctx))
        check_step_fits(memory, available_memory(ctx.device), tc, model_config)
    try:
        with contextlib.ExitStack() as exits:
            if ctx.is_main:  # before the checkpoint is read and anything written
                exits.enter_context(RunDir(run_dir).lock(notice=lambda line: _log(True, line)))
            return _train(model_config, tc, corpus, run_dir, resume, progress, ctx, exits)
    finally:
        D.shutdown(ctx)


def _data_ranks(tc: TrainConfig, ctx: D.DistContext) -> int:
    """How many different batches the processes read: one under tensor parallelism (every rank
    computes a share of the same batch), else one per process."""
    return 1 if tc.tensor_parallel > 1 else ctx.world_size


def _train(model_config: GoHConfig, tc: TrainConfig, corpus: Union[Corpus, MixedCorpus], run_dir: Path, resume: bool,
           progress: bool, ctx: D.DistContext, exits: contextlib.ExitStack) -> TrainResult:
    tensor_parallel = tc.tensor_parallel > 1
    # under tensor parallelism the ranks are one data rank: same batch, same dropout and router noise
    data_ranks = _data_ranks(tc, ctx)
    data_rank = ctx.rank if data_ranks > 1 else 0
    run = RunDir(run_dir)
    torch.manual_seed(tc.seed)  # the same initial weights on every rank
    model = GoHTransformer(model_config)
    start_step, tokens_seen, history = 0, 0, []
    checkpoint = run.latest_checkpoint() if resume else None
    saved_optimizer = None
    if checkpoint is not None:
        saved_config, model_state, saved_optimizer, saved = load_checkpoint(checkpoint)
        check_same_config(saved_config, model_config, checkpoint)
        load_state_strict(model, model_state, checkpoint)
        start_step, tokens_seen = saved["step"], saved["tokens_seen"]
        history = [tuple(entry) for entry in saved["val_history"]]
        if data_rank == 0:
            restore_rng_state(saved["rng_tensors"], saved["rng"])
        else:
            torch.manual_seed(tc.seed + RANK_SEED_STRIDE * data_rank + start_step)
    else:
        if tc.init_from is not None:
            initialise_from(model, Path(tc.init_from))
        torch.manual_seed(tc.seed + RANK_SEED_STRIDE * data_rank)  # dropout differs per data rank
    model.to(ctx.device).train()
    expert_parallel = tc.expert_parallel > 1
    if expert_parallel:  # before DDP, which then leaves the expert shards alone
        EP.apply_expert_parallel(model)
    if tensor_parallel:  # no data parallel beside it: nothing to wrap
        wrapped = TP.apply_tensor_parallel(model)
    else:
        wrapped = D.wrap_model(model, ctx, tc.fsdp,
                               ignored_params=EP.expert_shard_parameters(model) if expert_parallel else None)
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    forward = TrainingForward(wrapped, tc.compile)  # eager unless tc.compile (and compiling works)
    if saved_optimizer is not None:
        check_optimizer_parameters(saved.get("optimizer_param_names"), optimizer.param_names, checkpoint)
        if expert_parallel:
            saved_optimizer = EP.local_optimizer_state(model, optimizer, saved_optimizer)
        if tensor_parallel:
            saved_optimizer = TP.local_optimizer_state(model, optimizer, saved_optimizer)
        try:
            D.load_optimizer_state(model, optimizer, saved_optimizer, tc.fsdp)
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(f"{checkpoint}/optimizer.json does not fit this model's optimizer: {err}") from None

    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for leftover in run.remove_stale_staging():
            _log(progress, f"removed {leftover}, left by a save that was killed before it completed")
        run.write_train_config(tc)
        run.write_model_config(model_config)
        corpus.save_tokenizer(run_dir)
    val_sets = validation_sets(corpus)  # {} for a single corpus: one val_loss, as always
    metrics = MetricsLogger(run, start_step, enabled=ctx.is_main, tensorboard=tc.tensorboard,
                            extra_columns=[source_loss_column(name) for name in val_sets])
    val_by_source: Dict[str, float] = {}
    autocast = _autocast(ctx.device, tc.dtype)
    tokens_per_step = tc.batch_size * tc.grad_accum_steps * tc.seq_len
    last_checkpoint, interrupted, losses = checkpoint, False, []
    step = start_step
    # global-batch balance (docs/routing.md): the step's forwards are held and backpropagated once
    global_batch = bool(global_batch_kinds(model_config))

    def global_balance_aux(out: GoHOutput) -> torch.Tensor:
        return weighted_aux_loss(model_config, out.routing, out.logits, out.recursion, leave_out_global=True)

    stop = exits.enter_context(stop_signals())  # until the final model is written too

    def save(at_step: int) -> Path:
        with stop.saving():
            return _save(at_step)

    def _save(at_step: int) -> Path:
        model_state = D.full_model_state(model, tc.fsdp)
        optimizer_state = D.full_optimizer_state(model, optimizer, tc.fsdp)
        if expert_parallel:
            optimizer_state = EP.full_optimizer_state(model, optimizer, optimizer_state)
        if tensor_parallel:
            optimizer_state = TP.full_optimizer_state(model, optimizer, optimizer_state)
        path = None
        if ctx.is_main:
            state = {"tokens_seen": tokens_seen, "val_history": history, "data_position": at_step,
                     "train_config": tc.to_dict(), "corpus": corpus.source,
                     "optimizer_param_names": optimizer.param_names}
            path = save_checkpoint(run_dir, at_step, model_config, model_state, optimizer_state,
                                   state, tc.keep_last)
        D.barrier(ctx)
        return path or run.checkpoint_dir(at_step)

    bar = _progress_bar(progress and ctx.is_main, start_step, tc.max_steps)
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
            parts = torch.zeros(3, device=ctx.device)  # loss, lm_loss, aux_loss
            held, held_loss = [], 0.0  # global-batch balance: the step's records and local losses
            for micro in range(tc.grad_accum_steps):
                batch = corpus_train_batch(corpus, tc.batch_size, tc.seq_len, tc.seed, step, micro,
                                           data_rank, data_ranks).to(ctx.device)
                last_micro = micro == tc.grad_accum_steps - 1

                def micro_step(call):
                    with autocast:
                        out = call(batch, labels=batch)
                        if global_batch:
                            aux = global_balance_aux(out)
                            loss = out.lm_loss + aux_scale * aux
                        else:
                            aux, loss = out.aux_loss, training_loss(out, aux_scale)
                    if not global_batch:
                        (loss / tc.grad_accum_steps).backward()
                    return out, loss, aux

                with D.gradient_sync(wrapped, last_micro and not global_batch):
                    out, loss, aux = forward.run(micro_step)
                if global_batch:
                    held.append(out.routing)
                    held_loss = held_loss + loss / tc.grad_accum_steps
                parts += torch.stack([loss.detach(), out.lm_loss.detach(), aux.detach()]).float()
            if global_batch:  # one backward over the step's graphs, after the counts are known
                pooled = global_batch_balance_loss(model_config, held, D.all_reduce_sum_fn(ctx), ctx.world_size)
                (held_loss + aux_scale * pooled).backward()
                D.all_reduce_gradients_mean(model, ctx)
                pooled = pooled.detach().to(parts.device) * tc.grad_accum_steps
                parts += torch.stack([aux_scale * pooled, torch.zeros_like(pooled), pooled]).float()
                del held, held_loss
            parts = D.all_reduce_mean(parts / tc.grad_accum_steps, ctx)
            grad_norm = (EP.clip_grad_norm_(model, tc.grad_clip) if expert_parallel or tensor_parallel
                         else _clip_gradients(model, tc.grad_clip))
            if not (math.isfinite(float(parts[0])) and math.isfinite(grad_norm)):
                raise TrainingDivergedError.at(step + 1, float(parts[0]), grad_norm, last_checkpoint)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not tensor_parallel:  # tensor-parallel ranks count the same (replicated) routing loads
                D.sync_routing_loads(model, ctx)
            model.update_routing_biases()
            train_seconds += time.perf_counter() - step_started

            step += 1
            tokens_seen += tokens_per_step
            timed_tokens += tokens_per_step
            losses.append(float(parts[0]))
            tokens_per_s = timed_tokens / max(1e-9, train_seconds)
            val_loss, source_losses = None, {}
            if step % tc.eval_every == 0 or step == tc.max_steps:
                if val_sets:
                    val_loss, val_by_source = evaluate_sources(model, val_sets, tc.batch_size, tc.seq_len,
                                                               tc.eval_batches)
                    source_losses = {source_loss_column(name): loss for name, loss in val_by_source.items()}
                else:
                    val_loss = evaluate(model, corpus.val, tc.batch_size, tc.seq_len, tc.eval_batches)
                history.append((step, tokens_seen, val_loss))
            if ctx.is_main and (step % tc.log_every == 0 or val_loss is not None or step == start_step + 1):
                metrics.log(step=step, tokens=tokens_seen, lr=lr, loss=float(parts[0]),
                            lm_loss=float(parts[1]), aux_loss=float(parts[2]), aux_scale=aux_scale,
                            grad_norm=grad_norm, val_loss=val_loss, tokens_per_s=tokens_per_s,
                            **routing_summary(out.routing, model_config), **source_losses)
            bar.update(1)
            bar.set_postfix(loss=f"{float(parts[0]):.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}",
                            **({"val": f"{val_loss:.3f}"} if val_loss is not None else {}))
            interrupted = D.any_rank(stop.requested, ctx)
            if interrupted or step % tc.save_every == 0 or step == tc.max_steps:
                last_checkpoint = save(step)
            if interrupted:
                _log(progress and ctx.is_main, f"interrupted: checkpoint saved at step {step} to "
                     f"{last_checkpoint}; continue with resume=True (--resume)")
                break
    finally:
        bar.close()
        metrics.close()

    # hand back an ordinary model, not one sharded over a group about to close
    if (tc.fsdp or expert_parallel or tensor_parallel) and ctx.enabled:
        full_state = D.full_model_state(model, fsdp=tc.fsdp)
        model = GoHTransformer(model_config)
        model.load_state_dict(full_state)
        model.to(ctx.device)
    final_path = None
    if not interrupted and ctx.is_main:
        with stop.saving():
            final_path = model.save_pretrained(run.final_dir)
            corpus.save_tokenizer(final_path)
    return TrainResult(
        final_val_loss=history[-1][2] if history else float("nan"), val_history=history,
        tokens_per_s=timed_tokens / train_seconds if train_seconds > 0 else 0.0, model=model,
        checkpoint_path=last_checkpoint, final_path=final_path, steps=step, tokens_seen=tokens_seen,
        interrupted=interrupted, metrics_path=run.metrics_file, losses=losses,
        val_tokens=sum(eval_windows(len(tokens), tc.batch_size, tc.seq_len, tc.eval_batches) * tc.seq_len
                       for tokens in (val_sets or {"": corpus.val}).values()),
        val_by_source=val_by_source, compiled=forward.compiled)


# ---------------------------------------------------------------------- helpers
def _clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    """Clip to ``max_norm`` (0 = measure only) and return the total gradient norm."""
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


def _autocast(device: torch.device, dtype: str):
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _progress_bar(enabled: bool, start: int, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, desc="train", dynamic_ncols=True)


def _log(enabled: bool, message: str) -> None:
    if enabled:
        from tqdm.auto import tqdm

        tqdm.write(message)
