"""``mlm``: the encoder family's masked-LM objective (BERT's 15% of positions, 80/10/10).

Batches are random windows of ``seq_len`` tokens seeded by ``(seed, step, micro_step)``, masked by
a generator of the same seeds over the whole micro-batch before it is split over ranks. The loss
is the mean cross-entropy over the masked positions; evaluation scores the masked positions of
fixed-seed masked validation windows.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ...config import GoHConfig
from ...data.corpus import load_corpus
from ...data.objectives import SpecialTokens
from ...data.objectives.mlm import mlm_eval_batches, mlm_train_batch, unigram_entropy
from ..config import TrainConfig
from .base import Batch, Task, rank_rows
from .special_vocabulary import (
    check_special_vocabulary,
    encoder_presets,
    fit_special_vocabulary,
    one_data_path,
)


class MaskedLanguageModelTask(Task):
    name = "mlm"
    model_type = "encoder"
    presets = encoder_presets()
    loss_field = "mlm_loss"
    loss_column = "lm_loss"
    rows = "windows"
    token_cache = True

    def load_data(self, settings, cache_dir, tc: TrainConfig, cfg: GoHConfig):
        return load_corpus(one_data_path(settings, self.name), cache_dir, settings.get("tokenizer") or "byte")

    def fit_model_config(self, cfg: GoHConfig, data, tc: TrainConfig, explicit: set, continued) -> GoHConfig:
        return fit_special_vocabulary(cfg, SpecialTokens(data.vocab_size), tc, self.name, continued, tc.seq_len)

    def check_model_fits(self, cfg: GoHConfig, data, tc: TrainConfig) -> None:
        check_special_vocabulary(cfg, SpecialTokens(data.vocab_size), tc.seq_len, self.name)

    def save_data_files(self, directory, data) -> None:
        data.save_tokenizer(directory)

    def training_batches(self, data, tc: TrainConfig):
        special = SpecialTokens(data.vocab_size)

        def batch(step: int, micro_step: int, rank: int, ranks: int) -> Batch:
            inputs, labels = mlm_train_batch(data.train, tc.batch_size, tc.seq_len, tc.seed, step, special.mask,
                                             special.base, micro_step)
            return rank_rows({"input_ids": inputs, "labels": labels}, rank, ranks)
        return batch

    def loss_terms(self, batch: Batch) -> int:
        return int((batch["labels"] != -100).sum())

    @torch.no_grad()
    def evaluate(self, model, data, tc: TrainConfig, max_batches: Optional[int]) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        special = SpecialTokens.of_model(model.config)
        total = count = 0.0
        try:
            for inputs, labels in mlm_eval_batches(data.val, tc.batch_size, tc.seq_len, special.mask, special.base,
                                                   max_batches):
                n = int((labels != -100).sum())
                total += float(model(inputs.to(device), labels=labels.to(device)).mlm_loss) * n
                count += n
        finally:
            model.train(was_training)
        return {"loss": total / max(count, 1), "examples": count}

    def summary(self, metrics: Dict[str, float], data, cfg: GoHConfig) -> List[str]:
        entropy = unigram_entropy(data.train, data.vocab_size)
        uniform = torch.log(torch.tensor(float(data.vocab_size))).item()
        return [f"validation MLM loss: {metrics['loss']:.4f} nats/token at {metrics['examples']:,.0f} masked "
                f"validation positions (unigram entropy of the training split: {entropy:.4f}; uniform: {uniform:.4f})"]
