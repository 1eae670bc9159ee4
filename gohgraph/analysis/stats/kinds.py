"""Routing statistics per attention kind: one report each for the encoder, decoder-self and cross attention.

A :class:`~gohgraph.models.seq2seq.GoHSeq2Seq` routes the heads of three attentions, and returns
their records per kind (``out.routing = {"encoder": [...], "decoder_self": [...], "cross": [...]}``,
one :class:`~gohgraph.routing.LayerRouting` per layer each). Each kind is its own routing graph,
so :class:`KindRoutingStats` keeps one :class:`~gohgraph.analysis.stats.collect.RoutingStats` per
kind, built on the config with ``n_layers`` set to that kind's depth (``n_layers`` for the encoder,
``cfg.decoder_layers`` for the decoder's two). Which tokens count:

* ``encoder`` - the source tokens where ``attention_mask [batch, src]`` is 1;
* ``decoder_self`` and ``cross`` - the target positions whose ``labels [batch, tgt]`` are not
  ``-100`` (and, when given, whose ``decoder_attention_mask`` is 1). Both attentions route one
  query per target position, so both count the same positions; the token id of a position (for
  the token profiles) is the decoder's input there, ``labels`` shifted right.

Expert records hang on the encoder and decoder-self records (the FFN follows them in each block),
so those two kinds have ``experts`` sections when the model has experts and ``cross`` never does.
The report is ``{"model_type": "seq2seq", "batches", "tokens": {"source", "target"}, "kinds":
{kind: report}}`` where each kind's report is exactly a decoder model's
:meth:`RoutingStats.report`, so every per-layer reader and picture works on it unchanged.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import torch

from ...config import GoHConfig
from ...models.seq2seq import IGNORE_INDEX, ROUTING_KINDS
from ...routing import KIND_CROSS, KIND_DECODER_SELF, KIND_ENCODER, LayerRouting
from ...storage import write_json
from .collect import RoutingStats
from .report import csv_rows

# the keys of GoHSeq2Seq's out.routing, in its order; labels equal to IGNORE_INDEX (-100) are
# padding the loss skips, and so does every statistic
SEQ2SEQ_KINDS = ROUTING_KINDS

__all__ = ["SEQ2SEQ_KINDS", "KindRoutingStats", "collect_routing_stats_by_kind", "kind_layers"]


def kind_layers(config: GoHConfig) -> Dict[str, int]:
    """``{kind: number of layer records}`` of a seq2seq model."""
    if not config.is_encoder_decoder:
        raise ValueError(f"routing per attention kind needs model_type='seq2seq', got {config.model_type!r}")
    depth = {KIND_ENCODER: config.n_layers, KIND_DECODER_SELF: config.decoder_layers, KIND_CROSS: config.decoder_layers}
    return {kind: depth[kind] for kind in SEQ2SEQ_KINDS}


class KindRoutingStats:
    """Streaming routing statistics of a seq2seq model, one :class:`RoutingStats` per attention kind.

    ``update(routing, input_ids, attention_mask=None, labels=None, decoder_input_ids=None,
    decoder_attention_mask=None)``: ``routing`` is ``out.routing`` (a dict by kind);
    ``input_ids [batch, src]`` the source (token profiles of the encoder), ``attention_mask
    [batch, src]`` its padding; ``labels [batch, tgt]`` (``-100`` = padding) and/or
    ``decoder_attention_mask [batch, tgt]`` mark the counted target positions and
    ``decoder_input_ids [batch, tgt]`` are their token ids. Without any target mark every target
    position counts.
    """

    def __init__(self, config: GoHConfig) -> None:
        self.config = config
        self.kinds: Dict[str, RoutingStats] = {
            kind: RoutingStats(dataclasses.replace(config, n_layers=n_layers, n_decoder_layers=None))
            for kind, n_layers in kind_layers(config).items()}
        self.batches = 0

    @torch.no_grad()
    def update(self, routing: Mapping[str, Sequence[LayerRouting]], input_ids: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
               decoder_input_ids: Optional[torch.Tensor] = None,
               decoder_attention_mask: Optional[torch.Tensor] = None) -> None:
        if not isinstance(routing, Mapping) or set(routing) != set(self.kinds):
            got = sorted(routing) if isinstance(routing, Mapping) else type(routing).__name__
            raise ValueError(f"routing must be a dict with the kinds {list(self.kinds)}, got {got}")
        target_mask = _target_mask(labels, decoder_attention_mask)
        if (input_ids is None) != (decoder_input_ids is None):
            raise ValueError("pass input_ids and decoder_input_ids together, or neither (token profiles)")
        source = {"input_ids": input_ids, "attention_mask": attention_mask}
        target = {"input_ids": decoder_input_ids, "attention_mask": target_mask}
        # every kind checks the batch before any kind counts it: a rejected batch leaves all sums untouched
        for kind, stats in self.kinds.items():
            try:
                stats.check(routing[kind], **(source if kind == "encoder" else target))
            except ValueError as error:
                raise ValueError(f"routing[{kind!r}]: {error}") from None
        for kind, stats in self.kinds.items():
            stats.update(routing[kind], **(source if kind == "encoder" else target))
        self.batches += 1

    def report(self) -> Dict[str, Any]:
        """``{"model_type", "batches", "tokens": {"source", "target"}, "kinds": {kind: report}}``."""
        kinds = {kind: stats.report() for kind, stats in self.kinds.items()}
        return {"model_type": "seq2seq", "batches": self.batches,
                "tokens": {"source": kinds["encoder"]["tokens"], "target": kinds["decoder_self"]["tokens"]},
                "kinds": kinds}

    def to_json(self, path: Union[str, Path]) -> Path:
        return write_json(path, self.report())

    def to_csv(self, path: Union[str, Path]) -> Path:
        """The long table of :meth:`RoutingStats.to_csv` with a first column ``kind``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        report = self.report()
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["kind", "layer", "group", "item", "metric", "value"])
            for kind, kind_report in report["kinds"].items():
                writer.writerows((kind, *row) for row in csv_rows(kind_report))
        return path


Seq2SeqBatch = Mapping[str, torch.Tensor]


def collect_routing_stats_by_kind(model: torch.nn.Module, batches: Iterable[Seq2SeqBatch],
                                  progress: bool = True) -> KindRoutingStats:
    """Run a seq2seq ``model`` (eval mode, no grad) over ``batches``: dicts with ``input_ids [batch, src]``,
    optionally ``attention_mask [batch, src]``, ``labels [batch, tgt]`` (``-100`` = padding) and
    ``decoder_attention_mask``; ``decoder_input_ids`` instead of or besides ``labels``. Training
    mode is restored afterwards."""
    from tqdm.auto import tqdm

    stats = KindRoutingStats(model.config)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="routing stats", unit="batch", disable=not progress):
                if not isinstance(batch, Mapping) or "input_ids" not in batch or \
                        not ("labels" in batch or "decoder_input_ids" in batch):
                    raise ValueError("a seq2seq batch is a dict with input_ids and labels (or decoder_input_ids)")
                given = {name: batch.get(name) for name in ("input_ids", "attention_mask", "labels",
                                                            "decoder_input_ids", "decoder_attention_mask")}
                out = model(**{name: None if value is None else value.to(device) for name, value in given.items()})
                decoder_input_ids = given["decoder_input_ids"]
                if decoder_input_ids is None:
                    decoder_input_ids = model.shift_right(given["labels"])
                stats.update(out.routing_by_kind(), given["input_ids"], attention_mask=given["attention_mask"],
                             labels=given["labels"], decoder_input_ids=decoder_input_ids,
                             decoder_attention_mask=given["decoder_attention_mask"])
    finally:
        model.train(was_training)
    return stats


def _target_mask(labels: Optional[torch.Tensor], decoder_attention_mask: Optional[torch.Tensor]
                 ) -> Optional[torch.Tensor]:
    """Bool ``[batch, tgt]``: labelled (``!= -100``) and unmasked target positions; ``None`` = all."""
    mask = None if labels is None else labels != IGNORE_INDEX
    if decoder_attention_mask is not None:
        keep = decoder_attention_mask.bool()
        if mask is not None and keep.shape != mask.shape:
            raise ValueError(f"decoder_attention_mask has shape {list(keep.shape)}, labels {list(mask.shape)}")
        mask = keep if mask is None else mask & keep
    return mask
