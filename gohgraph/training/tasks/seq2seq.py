"""``seq2seq``: the encoder-decoder family's sequence-to-sequence objective (a docstring's first
sentence -> its ``def`` line from the standard library, or user pair files).

Texts are bytes (``--tokenizer byte``, the default), or a BPE trained on the training pairs'
sources and targets alone (``bpe[:N]``) or read from a ``tokenizer.json`` (``file:PATH``):
:func:`gohgraph.data.tokenizers.text_tokenizer`, trained in memory on each load (under a second on
the default pairs) and kept in no cache; the run saves it as ``tokenizer.json`` beside the model,
which ``gohgraph eval``, ``generate``, ``stats`` and ``viz`` read.

Targets end with ``eos``; ``pad`` pads and starts the decoder, as in T5. Batches walk seeded epochs
of the training pairs (:class:`~.epochs.EpochBatches`), right-padded; the loss is the mean
cross-entropy over the batch's target tokens. Evaluation: :mod:`gohgraph.training.seq2seq_metrics`
(loss, token accuracy, greedy exact match, the copy baseline).
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ...config import GoHConfig
from ...data.objectives import SpecialTokens
from ...data.objectives.seq2seq import IGNORE_INDEX, encode_pair_data, load_pair_data, pair_texts, seq2seq_batches
from ...data.tokenizers import save_tokenizer, text_tokenizer
from ..config import TrainConfig
from ..seq2seq_metrics import evaluate_seq2seq
from .base import Batch, Task, rank_rows
from .epochs import EpochBatches
from .special_vocabulary import (
    check_special_vocabulary,
    encoder_presets,
    fit_special_vocabulary,
    one_data_path,
)

# sources and targets cut to 64 bytes (a docstring's first sentence, most def lines): with 128-byte
# pairs and 400 steps the example had not finished after 19 minutes on a shared 2-core machine.
# Four validation batches: every evaluation also decodes them greedily for the exact match
_PRESETS = {name: (dict(model, model_type="seq2seq", n_decoder_layers=model["n_layers"]),
                   dict(train, seq_len=min(train["seq_len"], 64) if name == "tiny" else train["seq_len"],
                        eval_batches=4 if name == "tiny" else train["eval_batches"]))
            for name, (model, train) in encoder_presets().items()}


class SequenceToSequenceTask(Task):
    name = "seq2seq"
    model_type = "seq2seq"
    presets = _PRESETS
    loss_field = "lm_loss"
    loss_column = "lm_loss"
    rows = "pairs"

    def load_data(self, settings, cache_dir, tc: TrainConfig, cfg: GoHConfig):
        pairs = load_pair_data(one_data_path(settings, self.name))
        tokenizer = text_tokenizer(settings.get("tokenizer") or "byte", pair_texts(pairs))
        special = SpecialTokens(tokenizer.vocab_size, with_eos=True)
        return encode_pair_data(pairs, tokenizer.encode, tc.seq_len, special.pad, special.eos, tokenizer)

    def fit_model_config(self, cfg: GoHConfig, data, tc: TrainConfig, explicit: set, continued) -> GoHConfig:
        special = SpecialTokens(data.tokenizer.vocab_size, with_eos=True)
        # the decoder reads the start token and then up to seq_len target tokens
        cfg = fit_special_vocabulary(cfg, special, tc, self.name, continued, tc.seq_len + 1)
        return cfg if continued is not None else cfg.replace(pad_token_id=special.pad,
                                                             decoder_start_token_id=special.pad)

    def check_model_fits(self, cfg: GoHConfig, data, tc: TrainConfig) -> None:
        check_special_vocabulary(cfg, SpecialTokens(data.tokenizer.vocab_size, with_eos=True), tc.seq_len + 1,
                                 self.name)

    def save_data_files(self, directory, data) -> None:
        save_tokenizer(data.tokenizer, directory)

    def training_batches(self, data, tc: TrainConfig):
        epochs = EpochBatches(lambda seed: seq2seq_batches(data.train, tc.batch_size, data.pad_id, seed=seed),
                              len(data.train), tc.batch_size, tc.seed, "training pairs")

        def batch(step: int, micro_step: int, rank: int, ranks: int) -> Batch:
            return rank_rows(epochs(step * tc.grad_accum_steps + micro_step), rank, ranks)
        return batch

    def loss_terms(self, batch: Batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def evaluate(self, model, data, tc: TrainConfig, max_batches: Optional[int]) -> Dict[str, float]:
        return evaluate_seq2seq(model, data, tc.batch_size, max_batches)

    def evaluation_columns(self, data) -> Dict[str, str]:
        return {"token_accuracy": "val_token_accuracy", "exact_match": "val_exact_match"}

    def summary(self, metrics: Dict[str, float], data, cfg: GoHConfig) -> List[str]:
        return [seq2seq_summary(metrics)]


def seq2seq_summary(metrics: Dict[str, float]) -> str:
    """One line of the seq2seq metrics, the copy baseline beside the token accuracy."""
    return (f"validation loss {metrics['loss']:.4f} nats/token, token accuracy {metrics['token_accuracy']:.4f} "
            f"(copy baseline {metrics['copy_token_accuracy']:.4f}), exact match {metrics['exact_match']:.4f} "
            f"over {metrics['examples']:,.0f} pairs ({metrics['tokens']:,.0f} target tokens)")
