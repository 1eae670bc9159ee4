"""Training and evaluating the non-LM objectives (masked LM, classification, seq2seq): one flat loop.

The causal-LM trainer (:mod:`.trainer`) stays as it is; this loop serves ``--objective mlm``,
``--objective classify`` (a :class:`~gohgraph.models.encoder.GoHEncoder`) and ``--objective
seq2seq`` (a :class:`~gohgraph.models.seq2seq.GoHSeq2Seq`) (DESIGN.md §13) on one process: AdamW with warmup + cosine, the routing
losses, auxiliary-loss-free bias updates, and at the end ``final/`` (``save_pretrained``),
``objective.json`` (what the model was trained on) and ``metrics.json`` (every evaluation).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..config import GoHConfig
from ..data.objectives import SpecialTokens
from ..data.objectives.classify import classification_batches
from ..data.objectives.mlm import mlm_eval_batches, mlm_train_batch
from ..data.objectives.seq2seq import seq2seq_batches
from ..models.encoder import GoHEncoder
from ..models.seq2seq import GoHSeq2Seq
from ..storage import atomic_write_text
from .config import TrainConfig
from .optim import build_optimizer
from .schedules import learning_rate, set_learning_rate
from .seq2seq_metrics import evaluate_seq2seq

OBJECTIVE_FILE = "objective.json"

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


@dataclass
class ObjectiveResult:
    model: torch.nn.Module  # GoHEncoder, or GoHSeq2Seq for "seq2seq"
    metrics: Dict[str, float]  # the final evaluation (tc.eval_batches validation batches)
    history: List[Dict[str, float]] = field(default_factory=list)
    final_path: Optional[Path] = None
    metrics_path: Optional[Path] = None
    seconds: float = 0.0


def train_objective(objective: str, cfg: GoHConfig, tc: TrainConfig, data, run_dir: Path,
                    log=print, data_path: Optional[str] = None) -> ObjectiveResult:
    """Train ``GoHEncoder(cfg)`` on ``data`` (a :class:`~gohgraph.data.corpus.Corpus` for ``"mlm"``, a
    :class:`~gohgraph.data.objectives.classify.ClassificationData` for ``"classify"``), or
    ``GoHSeq2Seq(cfg)`` for ``"seq2seq"`` (an :class:`~gohgraph.data.objectives.seq2seq.EncodedPairs`), for
    ``tc.max_steps`` steps; writes under ``run_dir``, with ``data_path`` (the user data it was read
    from, ``None`` for the default corpus) in ``objective.json``."""
    torch.manual_seed(tc.seed)
    model = (GoHSeq2Seq if objective == "seq2seq" else GoHEncoder)(cfg).train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    special = SpecialTokens.of_model(cfg)
    history, started = [], time.perf_counter()
    train_order = None
    for step in range(tc.max_steps):
        set_learning_rate(optimizer, learning_rate(step, tc.lr, tc.warmup_steps, tc.max_steps, tc.min_lr_ratio))
        if objective == "mlm":
            inputs, labels = mlm_train_batch(data.train, tc.batch_size, tc.seq_len, tc.seed, step,
                                             special.mask, special.base)
            out = model(inputs, labels=labels)
        elif objective == "seq2seq":
            batch = next(train_order, None) if train_order is not None else None
            if batch is None or len(batch["labels"]) < tc.batch_size:  # a new epoch, in a new order
                if len(data.train) < tc.batch_size:
                    raise ValueError(f"{len(data.train)} training pairs cannot fill one batch of "
                                     f"batch_size={tc.batch_size}")
                train_order = seq2seq_batches(data.train, tc.batch_size, data.pad_id, seed=tc.seed + step)
                batch = next(train_order)
            out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
        else:
            if train_order is None:
                train_order = classification_batches(data.train_x, data.train_mask, data.train_y,
                                                     tc.batch_size, seed=tc.seed + step)
            batch = next(train_order, None)
            if batch is None or len(batch[2]) < tc.batch_size:
                train_order = classification_batches(data.train_x, data.train_mask, data.train_y,
                                                     tc.batch_size, seed=tc.seed + step)
                batch = next(train_order)
            ids, mask, y = batch
            out = model(ids, mask, class_labels=y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        model.update_routing_biases()
        if (step + 1) % tc.eval_every == 0 and step + 1 < tc.max_steps:
            metrics = evaluate_objective(model, objective, data, tc.batch_size, tc.seq_len, tc.eval_batches)
            history.append({"step": step + 1, **metrics})
            log(f"step {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    final = evaluate_objective(model, objective, data, tc.batch_size, tc.seq_len, tc.eval_batches)
    history.append({"step": tc.max_steps, **final})
    run_dir = Path(run_dir)
    final_path = model.save_pretrained(run_dir / "final")
    atomic_write_text(run_dir / OBJECTIVE_FILE, json.dumps({"objective": objective, "seq_len": tc.seq_len,
                                                            "labels": getattr(data, "labels", None),
                                                            "data": data_path}, indent=2) + "\n")
    atomic_write_text(run_dir / "train_config.json", tc.to_json() + "\n")
    metrics_path = atomic_write_text(run_dir / "metrics.json", json.dumps(history, indent=2) + "\n")
    return ObjectiveResult(model, final, history, final_path, metrics_path, time.perf_counter() - started)


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
