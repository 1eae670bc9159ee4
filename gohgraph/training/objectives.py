"""Training and evaluating the non-LM objectives (masked LM, classification, seq2seq): one flat loop.

The causal-LM trainer (:mod:`.trainer`) stays as it is; this loop serves ``--objective mlm``,
``--objective classify`` (a :class:`~gohgraph.models.encoder.GoHEncoder`) and ``--objective
seq2seq`` (a :class:`~gohgraph.models.seq2seq.GoHSeq2Seq`) (docs/encoder.md, docs/seq2seq.md) on one process: AdamW
with warmup + cosine, the routing losses, auxiliary-loss-free bias updates, and at the end
``final/`` (``save_pretrained``) and ``metrics.json`` (every evaluation); ``objective.json`` (what
the model is trained on) is written first, so a run stopped early can still be evaluated.

Faults, as in the LM trainer (docs/contract.md): checkpoints every ``save_every`` steps in the same
format (:mod:`.checkpoint`); SIGINT/SIGTERM finish the step, save and return
(``ObjectiveResult.interrupted``), a second Ctrl-C during the save waits for it; a non-finite loss
or gradient raises :class:`~gohgraph.training.trainer.TrainingDivergedError` before anything is
saved. ``resume=True`` continues ``run_dir/checkpoints/latest``: every training batch is a function
of the step (:class:`EpochBatches`), so on CPU the resumed run equals the uninterrupted one bit for bit.
``tc.init_from`` starts a new run from a saved model (:func:`~.checkpoint.initialise_from`): an MLM-pretrained
encoder fine-tuned as a classifier, its classification head new.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from tqdm.auto import tqdm

from ..config import GoHConfig
from ..data.objectives import SpecialTokens
from ..data.objectives.classify import classification_batches
from ..data.objectives.mlm import mlm_eval_batches, mlm_train_batch
from ..data.objectives.seq2seq import seq2seq_batches
from ..models.encoder import GoHEncoder
from ..models.seq2seq import GoHSeq2Seq
from ..storage import CheckpointError, load_state_strict
from .checkpoint import (
    check_optimizer_parameters,
    check_same_config,
    initialise_from,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from .config import TrainConfig
from .interrupts import stop_signals
from .memory import available_memory, check_step_fits, estimate_step_memory
from .metrics import COLUMNS, MetricsLogger, routing_summary
from .optim import build_optimizer
from .run_dir import TRAINING_STATE, RunDir
from .schedules import learning_rate, set_learning_rate
from .seq2seq_metrics import evaluate_seq2seq
from .trainer import TrainingDivergedError

OBJECTIVE_FILE = RunDir.OBJECTIVE  # its former name here

# RoPE, not sinusoids: Vaswani's table has amplitude 1 against token embeddings of std init_std
# (0.02), so without his sqrt(d_model) embedding scale the positions swamp token identity; the
# default MLM run ended at 3.68 nats with sinusoids (above the 3.25 unigram entropy), 3.11 with a
# learned table and 2.44 with RoPE (BENCHMARKS.md, encoder section)
_ENCODER = dict(model_type="encoder", d_model=128, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                router="graph", router_rounds=2, router_dim=8, head_graph="complete", inter_head_flow=True,
                position_embedding="rope", mlp="gelu-exact", norm="layer", max_seq_len=128)
# objective -> (GoHConfig kwargs, TrainConfig kwargs): the encoder family's "tiny" presets
OBJECTIVE_PRESETS: Dict[str, Tuple[Dict, Dict]] = {
    "mlm": (dict(_ENCODER), dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=20, max_steps=300,
                                 eval_every=100, eval_batches=50, weight_decay=0.01)),
    "classify": (dict(_ENCODER, n_labels=8, classifier_pooling="mean"),
                 dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=20, max_steps=300,
                      eval_every=100, eval_batches=50, weight_decay=0.01)),
    # docstring -> def line: a 2-layer encoder and a 2-layer decoder, RoPE in both self-attentions
    # (cross-attention has no positions); sources and targets cut to 64 bytes (a docstring's first
    # sentence, most def lines): with 128-byte pairs and 400 steps the example had not finished
    # after 19 minutes on the shared 2-core machine. Four validation batches: every evaluation
    # also decodes them greedily for the exact match
    "seq2seq": (dict(_ENCODER, model_type="seq2seq", n_decoder_layers=2),
                dict(batch_size=16, seq_len=64, lr=2e-3, warmup_steps=20, max_steps=300,
                     eval_every=100, eval_batches=4, weight_decay=0.01)),
}


# the LM trainer's settings this loop does not implement, at the values that leave them off
_LM_ONLY_SETTINGS = {"grad_accum_steps": 1, "fsdp": False, "expert_parallel": 1, "tensor_parallel": 1,
                     "compile": False, "dense_anneal_steps": 0, "recursion_warmup_steps": 0}
# evaluation scores (besides the loss, logged as val_loss) -> their metrics.csv columns
_EVAL_SCORES: Dict[str, Dict[str, str]] = {
    "mlm": {}, "classify": {"accuracy": "val_accuracy"},
    "seq2seq": {"token_accuracy": "val_token_accuracy", "exact_match": "val_exact_match"}}
# objective -> (metrics.csv column, output field) of its own training loss
_OWN_LOSS = {"mlm": ("lm_loss", "mlm_loss"), "classify": ("class_loss", "class_loss"),
             "seq2seq": ("lm_loss", "lm_loss")}
# the columns metrics.csv adds to the LM's (gohgraph.training.metrics.COLUMNS) for each objective
_EXTRA_COLUMNS: Dict[str, List[str]] = {
    objective: [column for column in (_OWN_LOSS[objective][0], *scores.values()) if column not in COLUMNS]
    for objective, scores in _EVAL_SCORES.items()}
@dataclass
class ObjectiveResult:
    model: torch.nn.Module  # GoHEncoder, or GoHSeq2Seq for "seq2seq"
    metrics: Dict[str, float]  # the last evaluation (tc.eval_batches validation batches); {} if none yet
    history: List[Dict[str, float]] = field(default_factory=list)
    final_path: Optional[Path] = None  # None when interrupted
    metrics_path: Optional[Path] = None
    seconds: float = 0.0
    steps: int = 0  # optimizer steps taken, counting those of the run it resumed
    checkpoint_path: Optional[Path] = None  # the latest checkpoint written (or resumed from)
    interrupted: bool = False


class EpochBatches:
    """The training batch of step ``s`` for the epoch-based objectives (classify, seq2seq).

    An epoch is ``n // batch_size`` full batches; epoch ``e`` reads the examples in the order seeded
    ``seed + e * batches_per_epoch`` (the step at which it starts) and drops its short last batch.
    So a batch depends on the step alone: a resumed run reads exactly what the uninterrupted run
    read. ``make_order(seed)`` yields one epoch's batches in that seed's order.
    """

    def __init__(self, make_order: Callable[[int], Iterator], n_examples: int, batch_size: int, seed: int,
                 what: str = "training examples"):
        if n_examples < batch_size:
            raise ValueError(f"{n_examples} {what} cannot fill one batch of batch_size={batch_size}")
        self.batches_per_epoch = n_examples // batch_size
        self._make_order, self._seed = make_order, seed
        self._epoch, self._next_offset, self._batches = None, 0, iter(())

    def __call__(self, step: int):
        epoch, offset = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch or offset != self._next_offset:  # a new epoch, or a jump (resume)
            order = self._make_order(self._seed + epoch * self.batches_per_epoch)
            self._batches = itertools.islice(order, offset, None)
            self._epoch = epoch
        self._next_offset = offset + 1
        return next(self._batches)


def check_objective_settings(tc: TrainConfig, objective: str) -> None:
    """Refuse, in one line, the LM trainer's settings this loop does not implement: it trains on one
    CPU process, in float32, eagerly, one batch per step."""
    changed = [f"{name}={getattr(tc, name)!r}" for name, off in _LM_ONLY_SETTINGS.items() if getattr(tc, name) != off]
    if tc.device not in ("auto", "cpu"):
        changed.append(f"device={tc.device!r}")
    if tc.dtype == "bfloat16":
        changed.append("dtype='bfloat16'")
    if changed:
        raise ValueError(f"--objective {objective} trains eagerly on one CPU process in float32, one batch per "
                         f"step; {', '.join(changed)} (settings of the language-model trainer) cannot apply")


def train_objective(objective: str, cfg: GoHConfig, tc: TrainConfig, data, run_dir: Path,
                    log=print, data_path: Optional[str] = None, tokenizer: str = "byte", resume: bool = False,
                    progress: bool = False, check_memory: bool = True) -> ObjectiveResult:
    """Train ``GoHEncoder(cfg)`` on ``data`` (a :class:`~gohgraph.data.corpus.Corpus` for ``"mlm"``, a
    :class:`~gohgraph.data.objectives.classify.ClassificationData` for ``"classify"``), or
    ``GoHSeq2Seq(cfg)`` for ``"seq2seq"`` (an :class:`~gohgraph.data.objectives.seq2seq.EncodedPairs`), up
    to ``tc.max_steps`` steps; writes under ``run_dir``, with ``data_path`` (the user data it was read
    from, ``None`` for the default corpus) and ``tokenizer`` (its spec) in ``objective.json``.
    ``resume``: continue the run's latest checkpoint (its model config must equal ``cfg``).
    ``check_memory`` refuses, before anything is allocated, a step that cannot fit in memory.
    The run directory's lock is held throughout (:meth:`RunDir.lock`): a second writer is refused."""
    check_objective_settings(tc, objective)
    run = RunDir(run_dir)
    model_class = GoHSeq2Seq if objective == "seq2seq" else GoHEncoder
    if check_memory:
        check_step_fits(estimate_step_memory(cfg, tc, model_class), available_memory(torch.device("cpu")), tc, cfg)
    if resume and run.latest_checkpoint() is None:
        raise ValueError(f"nothing to resume: {run.path} holds no checkpoint; start a new run without --resume")
    with run.lock(notice=log):  # before the checkpoint is read and anything written
        return _train_objective(objective, model_class, cfg, tc, data, run, log, data_path, tokenizer, resume,
                                progress)


def _train_objective(objective: str, model_class, cfg: GoHConfig, tc: TrainConfig, data, run: RunDir, log,
                     data_path: Optional[str], tokenizer: str, resume: bool, progress: bool) -> ObjectiveResult:
    checkpoint = run.latest_checkpoint() if resume else None
    started = time.perf_counter()
    torch.manual_seed(tc.seed)
    model = model_class(cfg).train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    start_step, tokens_seen, history = 0, 0, []
    if checkpoint is not None:
        start_step, tokens_seen, history = _restore(checkpoint, objective, cfg, model, optimizer)
    elif tc.init_from is not None:
        fresh = initialise_from(model, Path(tc.init_from))
        log(f"initialised from {tc.init_from}" + (f"; new head: {', '.join(fresh)}" if fresh else ""))
    next_batch = _training_batches(objective, data, tc, SpecialTokens.of_model(cfg))

    run.path.mkdir(parents=True, exist_ok=True)
    for leftover in run.remove_stale_staging():
        log(f"removed {leftover}, left by a save that was killed before it completed")
    run.write_objective({"objective": objective, "seq_len": tc.seq_len, "labels": getattr(data, "labels", None),
                         "data": data_path, "tokenizer": tokenizer})
    run.write_train_config(tc)
    metrics_path = run.evaluations_file
    last_checkpoint, step, interrupted = checkpoint, start_step, False

    def save(at_step: int) -> Path:
        state = {"objective": objective, "tokens_seen": tokens_seen, "val_history": history,
                 "train_config": tc.to_dict(), "data": data_path, "optimizer_param_names": optimizer.param_names}
        with stop.saving():
            return save_checkpoint(run.path, at_step, cfg, model.state_dict(), optimizer.state_dict(), state,
                                   tc.keep_last)

    bar = tqdm(total=tc.max_steps, initial=start_step, disable=not progress, desc=objective, dynamic_ncols=True)
    step_log = MetricsLogger(run, start_step, tensorboard=tc.tensorboard, extra_columns=_EXTRA_COLUMNS[objective])
    train_seconds, timed_tokens = 0.0, 0  # optimizer steps only: evaluation and saving excluded
    with stop_signals() as stop:
        try:
            while step < tc.max_steps:
                step_started = time.perf_counter()
                lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio)
                set_learning_rate(optimizer, lr)
                inputs = next_batch(step)
                out = _forward(objective, model, inputs)
                loss = out.loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or math.inf))
                loss_value = float(loss.detach())
                if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                    raise TrainingDivergedError.at(step + 1, loss_value, grad_norm, last_checkpoint)
                optimizer.step()
                model.update_routing_biases()
                train_seconds += time.perf_counter() - step_started
                step += 1
                n_tokens = _token_count(inputs)
                tokens_seen, timed_tokens = tokens_seen + n_tokens, timed_tokens + n_tokens
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}")
                metrics = None
                if step % tc.eval_every == 0 or step == tc.max_steps:
                    metrics = evaluate_objective(model, objective, data, tc.batch_size, tc.seq_len,
                                                 tc.eval_batches)
                    history.append({"step": step, **metrics})
                    run.write_evaluations(history)
                    if step < tc.max_steps:
                        log(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if step % tc.log_every == 0 or metrics is not None or step == start_step + 1:
                    step_log.log(step=step, tokens=tokens_seen, lr=lr, loss=loss_value, grad_norm=grad_norm,
                                 tokens_per_s=timed_tokens / max(1e-9, train_seconds),
                                 **_step_columns(objective, out, cfg), **_eval_columns(objective, metrics))
                interrupted = stop.requested
                if interrupted or step % tc.save_every == 0 or step == tc.max_steps:
                    last_checkpoint = save(step)
                if interrupted:
                    log(f"interrupted: checkpoint saved at step {step} to {last_checkpoint}; continue with "
                        "resume=True (--resume)")
                    return ObjectiveResult(model, history[-1] if history else {}, history, None,
                                           metrics_path if history else None, time.perf_counter() - started,
                                           step, last_checkpoint, interrupted=True)
        finally:
            bar.close()
            step_log.close()
        if not history or history[-1]["step"] != step:  # a resumed run that had already finished
            history.append({"step": step, **evaluate_objective(model, objective, data, tc.batch_size, tc.seq_len,
                                                               tc.eval_batches)})
        final = {k: v for k, v in history[-1].items() if k != "step"}
        with stop.saving():
            final_path = model.save_pretrained(run.final_dir)
            run.write_evaluations(history)
    return ObjectiveResult(model, final, history, final_path, metrics_path, time.perf_counter() - started,
                           step, last_checkpoint)


def _restore(checkpoint: Path, objective: str, cfg: GoHConfig, model: torch.nn.Module, optimizer
             ) -> Tuple[int, int, List[Dict[str, float]]]:
    """Load ``checkpoint`` into ``model``, ``optimizer`` and the RNGs: ``(step, tokens_seen, history)``."""
    saved_config, model_state, optimizer_state, saved = load_checkpoint(checkpoint)
    if saved.get("objective") != objective:
        raise CheckpointError(f"cannot resume from {checkpoint}: it was trained with objective "
                              f"{saved.get('objective', 'lm')!r}, not {objective!r}")
    check_same_config(saved_config, cfg, checkpoint)
    if saved.get("optimizer_param_names") is None:  # every objective checkpoint records them
        raise CheckpointError(f"{checkpoint}: {TRAINING_STATE} lacks optimizer_param_names (damaged)")
    check_optimizer_parameters(saved["optimizer_param_names"], optimizer.param_names, checkpoint)
    load_state_strict(model, model_state, checkpoint)
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"{checkpoint}/optimizer.json does not fit this model's optimizer: {err}") from None
    restore_rng_state(saved["rng_tensors"], saved["rng"])
    return saved["step"], saved["tokens_seen"], list(saved["val_history"])


def _training_batches(objective: str, data, tc: TrainConfig, special: SpecialTokens) -> Callable[[int], object]:
    """``step -> batch``: MLM windows are drawn from ``(seed, step)``; classify and seq2seq read
    epochs (:class:`EpochBatches`)."""
    if objective == "mlm":
        return lambda step: mlm_train_batch(data.train, tc.batch_size, tc.seq_len, tc.seed, step,
                                            special.mask, special.base)
    if objective == "seq2seq":
        return EpochBatches(lambda seed: seq2seq_batches(data.train, tc.batch_size, data.pad_id, seed=seed),
                            len(data.train), tc.batch_size, tc.seed, "training pairs")
    return EpochBatches(lambda seed: classification_batches(data.train_x, data.train_mask, data.train_y,
                                                            tc.batch_size, seed=seed),
                        len(data.train_y), tc.batch_size, tc.seed, "training texts")


def _forward(objective: str, model: torch.nn.Module, batch):
    """The model's output on one training batch; ``.loss`` is the objective's plus the routing losses."""
    if objective == "mlm":
        inputs, labels = batch
        return model(inputs, labels=labels)
    if objective == "seq2seq":
        return model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
    ids, mask, y = batch
    return model(ids, mask, class_labels=y)


def _step_columns(objective: str, out, cfg: GoHConfig) -> Dict[str, Optional[float]]:
    """``metrics.csv`` cells of one training step: the objective's own loss, the routing loss and
    the routing summary (over every attention kind of a seq2seq model)."""
    column, field_name = _OWN_LOSS[objective]
    routing = [layer for layers in out.routing.values() for layer in layers] if isinstance(out.routing, dict) \
        else out.routing
    return {column: float(getattr(out, field_name).detach()), "aux_loss": float(out.aux_loss.detach()),
            **routing_summary(routing, cfg)}


def _eval_columns(objective: str, metrics: Optional[Dict[str, float]]) -> Dict[str, Optional[float]]:
    """``metrics.csv`` cells of an evaluation (``val_loss`` and the objective's scores), if one ran."""
    if metrics is None:
        return {}
    return {"val_loss": metrics["loss"], **{column: metrics[key] for key, column in _EVAL_SCORES[objective].items()}}


def _token_count(batch) -> int:
    """Input tokens of one training batch (padding included)."""
    return int(batch["input_ids"].numel() if isinstance(batch, dict) else batch[0].numel())


@torch.no_grad()
def evaluate_objective(model: torch.nn.Module, objective: str, data, batch_size: int, seq_len: int,
                       max_batches: Optional[int] = None) -> Dict[str, float]:
    """``{"loss": nats}`` for MLM (at the masked positions of fixed-seed masked validation windows),
    ``{"loss", "accuracy"}`` for classification (a fixed random order of the validation snippets),
    the :mod:`.seq2seq_metrics` for seq2seq,
    over ``max_batches`` batches (``None``: all); ``"examples"``: how many were scored."""
    if objective == "seq2seq":
        return evaluate_seq2seq(model, data, batch_size, max_batches)
    was_training = model.training
    model.eval()
    special = SpecialTokens.of_model(model.config)
    total = correct = count = 0.0
    try:
        if objective == "mlm":
            for inputs, labels in mlm_eval_batches(data.val, batch_size, seq_len, special.mask, special.base,
                                                   max_batches):
                n = int((labels != -100).sum())
                total += float(model(inputs, labels=labels).mlm_loss) * n
                count += n
            return {"loss": total / max(count, 1), "examples": count}
        # a fixed shuffle: validation snippets are stored file by file, so a bounded evaluation in
        # storage order would see only the first few classes
        for index, (ids, mask, y) in enumerate(classification_batches(data.val_x, data.val_mask, data.val_y,
                                                                      batch_size, seed=0)):
            if max_batches is not None and index >= max_batches:
                break
            out = model(ids, mask, class_labels=y)
            total += float(out.class_loss) * len(y)
            correct += float((out.class_logits.argmax(-1) == y).sum())
            count += len(y)
        return {"loss": total / count, "accuracy": correct / count, "examples": count}
    finally:
        model.train(was_training)
