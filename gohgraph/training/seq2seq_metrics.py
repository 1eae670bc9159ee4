"""Validation metrics of a seq2seq model (docs/seq2seq.md): loss, token accuracy, exact match, copy baseline.

Over ``max_batches`` batches of validation pairs in a fixed random order (the pairs are stored
file by file, so a bounded evaluation in storage order would see only the first few files):

* ``loss``: mean cross-entropy in nats over the scored target tokens (every non-padding target
  position, the end-of-sequence token included), teacher-forced;
* ``token_accuracy``: fraction of those positions where the teacher-forced argmax is the target token;
* ``exact_match``: fraction of pairs whose greedy generation (``temperature=0``, stopping at the
  end-of-sequence token) reproduces the whole target, end token included;
* ``copy_token_accuracy``: the token accuracy of copying the source, target token ``t`` predicted
  to be source token ``t`` (:func:`~gohgraph.data.objectives.seq2seq.copy_baseline_counts`): the
  floor a model must beat to have learned more than the overlap of the two sides;
* ``examples`` (pairs) and ``tokens`` (scored target tokens).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from ..data.objectives.seq2seq import IGNORE_INDEX, EncodedPairs, copy_baseline_counts, seq2seq_batches


@torch.no_grad()
def evaluate_seq2seq(model, data: EncodedPairs, batch_size: int, max_batches: Optional[int] = None,
                     exact_match: bool = True) -> Dict[str, float]:
    """The module docstring's metrics of ``model`` (a :class:`~gohgraph.models.seq2seq.GoHSeq2Seq`)
    on ``data.val``; ``exact_match=False`` skips generation (and the ``exact_match`` key)."""
    was_training = model.training
    model.eval()
    loss_sum = correct = copied = tokens = matched = examples = 0.0
    try:
        for index, batch in enumerate(seq2seq_batches(data.val, batch_size, data.pad_id, seed=0)):
            if max_batches is not None and index >= max_batches:
                break
            device = next(model.parameters()).device
            batch = {name: value.to(device) for name, value in batch.items()}
            labels = batch["labels"]
            scored = labels != IGNORE_INDEX
            n = int(scored.sum())
            out = model(batch["input_ids"], batch["attention_mask"], labels=labels)
            loss_sum += float(out.lm_loss) * n
            correct += float(((out.logits.argmax(-1) == labels) & scored).sum())
            copy_correct, _ = copy_baseline_counts(batch)
            copied += copy_correct
            tokens += n
            examples += labels.shape[0]
            if exact_match:
                matched += float(exact_matches(model, batch, data.eos_id).sum())
    finally:
        model.train(was_training)
    if not tokens:
        raise ValueError("no validation pairs to evaluate")
    metrics = {"loss": loss_sum / tokens, "token_accuracy": correct / tokens}
    if exact_match:
        metrics["exact_match"] = matched / examples
    return {**metrics, "copy_token_accuracy": copied / tokens, "examples": examples, "tokens": tokens}


def exact_matches(model, batch: Dict[str, torch.Tensor], eos_id: Optional[int]) -> torch.Tensor:
    """Bool ``[batch]``: greedy generation of each source equals its target on every scored position.

    Generation runs for the target width (at most ``max_seq_len - 1`` tokens) and stops a row at
    ``eos_id``; a row cut short of its target counts as a miss.
    """
    labels = batch["labels"]
    steps = min(labels.shape[1], model.config.max_seq_len - 1)
    generated = model.generate(batch["input_ids"], steps, attention_mask=batch["attention_mask"],
                               temperature=0.0, eos_token_id=eos_id)[:, 1:]
    padded = torch.full_like(labels, IGNORE_INDEX)
    padded[:, :generated.shape[1]] = generated
    scored = labels != IGNORE_INDEX
    return ((padded == labels) | ~scored).all(dim=1)
