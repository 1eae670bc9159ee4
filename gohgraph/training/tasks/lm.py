"""``lm``: the decoder family's next-token objective on one corpus or several weighted sources.

Batches are random windows of ``seq_len + 1`` tokens (:func:`~gohgraph.data.batches.train_batch`),
seeded by ``(seed, step, micro_step)``; the loss is the mean next-token cross-entropy over the
``batch * seq_len`` predicted tokens. Evaluation scores the first ``eval_batches`` validation
windows; a :class:`~gohgraph.data.sources.MixedCorpus` is also scored per source (``val_loss/<source>``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ...config import GoHConfig
from ...data.batches import eval_batches, eval_windows
from ...data.sources import corpus_train_batch, load_training_data, validation_sets
from ...data.tokenizers import TOKENIZER_FILE
from ..config import TrainConfig
from ..metrics import source_loss_column
from ..presets import PRESETS
from .base import Batch, Task


class LanguageModelTask(Task):
    name = "lm"
    model_type = "decoder"
    presets = PRESETS
    loss_field = "lm_loss"
    loss_column = "lm_loss"
    rows = "windows"
    token_cache = True
    recursion = True

    def load_data(self, settings, cache_dir, tc: TrainConfig, cfg: GoHConfig):
        return load_training_data(settings, cache_dir)

    def fit_model_config(self, cfg: GoHConfig, data, tc: TrainConfig, explicit: set, init_from) -> GoHConfig:
        cfg = cfg.replace(max_seq_len=fit_max_seq_len(cfg, tc.seq_len, "max_seq_len" in explicit, init_from))
        return fit_vocabulary(cfg, data.vocab_size, explicit, init_from)

    def check_model_fits(self, cfg: GoHConfig, data, tc: TrainConfig) -> None:
        if tc.seq_len + 1 > cfg.max_seq_len:
            raise ValueError(f"TrainConfig.seq_len={tc.seq_len} + 1 exceeds the model's max_seq_len="
                             f"{cfg.max_seq_len} (training windows hold seq_len + 1 tokens)")
        if data.vocab_size > cfg.vocab_size:
            raise ValueError(f"the corpus tokenizer has {data.vocab_size} tokens but the model's "
                             f"vocab_size={cfg.vocab_size}")

    def describe_data(self, data) -> str:
        return data.source

    def save_data_files(self, directory, data) -> None:
        data.save_tokenizer(directory)

    def training_batches(self, data, tc: TrainConfig):
        def batch(step: int, micro_step: int, rank: int, ranks: int) -> Batch:
            windows = corpus_train_batch(data, tc.batch_size, tc.seq_len, tc.seed, step, micro_step, rank, ranks)
            return {"input_ids": windows, "labels": windows}
        return batch

    def loss_terms(self, batch: Batch) -> int:
        rows, width = batch["labels"].shape
        return rows * (width - 1)

    def batch_tokens(self, batch: Batch) -> int:
        return self.loss_terms(batch)  # the predicted tokens: a window of seq_len + 1 trains seq_len

    def evaluate(self, model, data, tc: TrainConfig, max_batches: Optional[int]) -> Dict[str, float]:
        sources = validation_sets(data)
        if not sources:
            loss = evaluate(model, data.val, tc.batch_size, tc.seq_len, max_batches)
            return {"loss": loss, "val_tokens": _scored_tokens(data.val, tc, max_batches)}
        loss, by_source = evaluate_sources(model, sources, tc.batch_size, tc.seq_len, max_batches)
        return {"loss": loss, **{source_loss_column(name): value for name, value in by_source.items()},
                "val_tokens": sum(_scored_tokens(tokens, tc, max_batches) for tokens in sources.values())}

    def evaluation_columns(self, data) -> Dict[str, str]:
        return {source_loss_column(name): source_loss_column(name) for name in validation_sets(data)}

    def final_lines(self, model, data, tc: TrainConfig) -> List[str]:
        """The loss over the whole validation split (and per source, with several sources)."""
        seq_len, batch_size = tc.seq_len, tc.batch_size
        sources = validation_sets(data)
        if not sources:
            full = evaluate(model, data.val, batch_size, seq_len)
            windows = len(data.val) // seq_len * seq_len
            return [f"validation loss: {full:.4f} nats/token over the whole validation split ({windows:,} tokens)"]
        full, per_source = evaluate_sources(model, sources, batch_size, seq_len)
        windows = sum(len(tokens) // seq_len * seq_len for tokens in sources.values())
        return [f"validation loss: {full:.4f} nats/token over the whole validation splits ({windows:,} tokens); "
                + ", ".join(f"{name} {loss:.4f}" for name, loss in per_source.items())]

    def summary(self, metrics: Dict[str, float], data, cfg: GoHConfig) -> List[str]:
        return [f"validation loss: {metrics['loss']:.4f} nats/token over the first {metrics['val_tokens']:,.0f} "
                "validation tokens"]


def _scored_tokens(tokens: np.ndarray, tc: TrainConfig, max_batches: Optional[int]) -> int:
    return eval_windows(len(tokens), tc.batch_size, tc.seq_len, max_batches) * tc.seq_len


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


def fit_max_seq_len(cfg: GoHConfig, seq_len: int, explicit: bool, init_from) -> int:
    """``max_seq_len`` large enough for training windows of ``seq_len + 1`` tokens.

    A preset's value grows to fit (positions are cheap; the memory check guards the step itself);
    a value the user set, or a learned position table the model was trained with, is never
    changed: too small is an error naming both numbers.
    """
    needed = seq_len + 1  # windows hold seq_len + 1 tokens: the inputs and the shifted labels
    if cfg.max_seq_len >= needed:
        return cfg.max_seq_len
    if explicit:
        raise ValueError(f"seq_len={seq_len} needs max_seq_len >= {needed}, but max_seq_len={cfg.max_seq_len} "
                         "was set; raise it or lower seq_len")
    if init_from is not None and cfg.position_embedding == "learned":
        raise ValueError(f"seq_len={seq_len} needs {needed} positions, but the model at {init_from} has a learned "
                         f"position table of {cfg.max_seq_len}; use seq_len <= {cfg.max_seq_len - 1}")
    return needed


def fit_vocabulary(cfg: GoHConfig, data_vocab: int, explicit: set, init_from) -> GoHConfig:
    """The model's ``vocab_size`` against the data tokenizer's: a preset's grows to fit; a value
    set by the user, or a pretrained model's, must match (a smaller one cannot embed the data, and a
    pretrained embedding read through another tokenizer would give its rows other meanings)."""
    if init_from is not None and data_vocab != cfg.vocab_size:
        raise ValueError(f"the model at {init_from} has vocab_size={cfg.vocab_size} but the data's tokenizer "
                         f"has {data_vocab} tokens; train with the model's tokenizer (--tokenizer "
                         f"file:PATH/{TOKENIZER_FILE}, which convert saves beside the model)")
    if data_vocab <= cfg.vocab_size:
        return cfg
    if "vocab_size" in explicit:
        raise ValueError(f"vocab_size={cfg.vocab_size} is smaller than the data's tokenizer ({data_vocab} "
                         f"tokens); set vocab_size >= {data_vocab} or leave it out")
    return cfg.replace(vocab_size=data_vocab)
