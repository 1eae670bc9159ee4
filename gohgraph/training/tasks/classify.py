"""``classify``: the encoder family's sequence classification (which standard-library package a
snippet is from, or user-labelled ``.tsv`` / ``.jsonl`` texts).

Texts are bytes (``--tokenizer byte``, the default), or a BPE trained on the training texts alone
(``bpe[:N]``; the training-side package files of the default data, the training records of
``--data``) or read from a ``tokenizer.json`` (``file:PATH``); :func:`gohgraph.data.tokenizers.text_tokenizer`.
The BPE is trained in memory on each load (a second or so) and kept in no cache; the run saves it
as ``tokenizer.json``, which ``gohgraph eval`` reads back.

Batches walk seeded epochs of the training texts (:class:`~.epochs.EpochBatches`); the loss is
the mean cross-entropy over the batch's texts; evaluation scores loss and accuracy on a fixed
random order of the validation texts.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from ...config import GoHConfig
from ...data.objectives import SpecialTokens
from ...data.objectives.classify import (
    classification_batches,
    labelled_file_data,
    stdlib_package_files,
    stdlib_package_snippets,
    training_texts,
)
from ...data.record_files import load_records
from ...data.tokenizers import save_tokenizer, text_tokenizer
from ..config import TrainConfig
from .base import Batch, Task, rank_rows
from .epochs import EpochBatches
from .special_vocabulary import (
    check_special_vocabulary,
    encoder_presets,
    fit_special_vocabulary,
    one_data_path,
)


class ClassificationTask(Task):
    name = "classify"
    model_type = "encoder"
    presets = encoder_presets(dict(n_labels=8, classifier_pooling="mean"))
    loss_field = "class_loss"
    loss_column = "class_loss"
    rows = "texts"

    def load_data(self, settings, cache_dir, tc: TrainConfig, cfg: GoHConfig):
        spec, path = settings.get("tokenizer") or "byte", one_data_path(settings, self.name)
        if path is None:
            files = stdlib_package_files()
            tokenizer = text_tokenizer(spec, training_texts(files[1]))
            special = SpecialTokens(tokenizer.vocab_size)
            # a continued encoder without a head classifies the preset's number of packages
            data = stdlib_package_snippets(tc.seq_len, special.cls, special.pad,
                                           cfg.n_labels or self.presets["tiny"][0]["n_labels"],
                                           encode=tokenizer.encode, files=files)
        else:
            records = load_records(path, "labelled")
            tokenizer = text_tokenizer(spec, [text for text, _ in records[0]])
            special = SpecialTokens(tokenizer.vocab_size)
            data = labelled_file_data(path, tc.seq_len, special.cls, special.pad, tokenizer.encode, records)
        data.tokenizer = tokenizer
        return data

    def fit_model_config(self, cfg: GoHConfig, data, tc: TrainConfig, explicit: set, continued) -> GoHConfig:
        cfg = fit_special_vocabulary(cfg, SpecialTokens(data.tokenizer.vocab_size), tc, self.name, continued,
                                     tc.seq_len)
        if continued is None:
            return cfg.replace(n_labels=len(data.labels))
        if not cfg.n_labels:  # a new classification head on a continued encoder (e.g. MLM-pretrained): the preset's
            return cfg.replace(n_labels=len(data.labels),
                               classifier_pooling=self.presets["tiny"][0]["classifier_pooling"])
        if cfg.n_labels != len(data.labels):
            raise ValueError(f"the model at {continued} classifies {cfg.n_labels} labels; the data has "
                             f"{len(data.labels)}")
        return cfg

    def check_model_fits(self, cfg: GoHConfig, data, tc: TrainConfig) -> None:
        check_special_vocabulary(cfg, SpecialTokens(data.tokenizer.vocab_size), tc.seq_len, self.name)
        if cfg.n_labels != len(data.labels):
            raise ValueError(f"n_labels={cfg.n_labels}, but the data has {len(data.labels)} labels")

    def save_data_files(self, directory, data) -> None:
        save_tokenizer(data.tokenizer, directory)

    def run_settings(self, data) -> dict:
        return {"labels": data.labels}

    def training_batches(self, data, tc: TrainConfig):
        epochs = EpochBatches(lambda seed: classification_batches(data.train_x, data.train_mask, data.train_y,
                                                                  tc.batch_size, seed=seed),
                              len(data.train_y), tc.batch_size, tc.seed, "training texts")

        def batch(step: int, micro_step: int, rank: int, ranks: int) -> Batch:
            ids, mask, labels = epochs(step * tc.grad_accum_steps + micro_step)
            return rank_rows({"input_ids": ids, "attention_mask": mask, "class_labels": labels}, rank, ranks)
        return batch

    def loss_terms(self, batch: Batch) -> int:
        return int(batch["class_labels"].shape[0])

    @torch.no_grad()
    def evaluate(self, model, data, tc: TrainConfig, max_batches: Optional[int]) -> Dict[str, float]:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total = correct = count = 0.0
        try:
            # a fixed shuffle: validation snippets are stored file by file, so a bounded evaluation
            # in storage order would see only the first few classes
            for index, (ids, mask, y) in enumerate(classification_batches(data.val_x, data.val_mask, data.val_y,
                                                                          tc.batch_size, seed=0)):
                if max_batches is not None and index >= max_batches:
                    break
                ids, mask, y = ids.to(device), mask.to(device), y.to(device)
                out = model(ids, mask, class_labels=y)
                total += float(out.class_loss) * len(y)
                correct += float((out.class_logits.argmax(-1) == y).sum())
                count += len(y)
        finally:
            model.train(was_training)
        return {"loss": total / count, "accuracy": correct / count, "examples": count}

    def evaluation_columns(self, data) -> Dict[str, str]:
        return {"accuracy": "val_accuracy"}

    def summary(self, metrics: Dict[str, float], data, cfg: GoHConfig) -> List[str]:
        return [f"validation accuracy: {metrics['accuracy']:.4f} over {metrics['examples']:,.0f} validation texts "
                f"of {len(data.labels)} classes ({', '.join(data.labels[:20])}); majority class: "
                f"{data.majority_accuracy():.4f}"]
