"""GoHEncoder: the encoder-only member of the family (BERT; docs/encoder.md).

Token embedding (+ learned or sinusoidal positions, or T5's relative bias in the attention) ->
``n_layers`` blocks with **bidirectional** routed self-attention under a padding mask, and a dense
or expert FFN -> a final norm (pre-norm) -> a masked-LM head tied to the embedding and, with
``cfg.n_labels > 0``, a sequence-classification head. The blocks, attention, routers and FFNs are
the decoder's: only the call differs (``causal=False``, ``mask=padding``). :class:`EncoderStack`
is the part shared with :class:`~gohgraph.models.seq2seq.GoHSeq2Seq`'s encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..layers.norm import build_norm
from ..routing import KIND_ENCODER, LayerRouting
from .block import GoHBlock
from .output_head import build_lm_head, output_logits
from .routed import RoutedModel, weighted_aux_loss
from .stacks import LayerStack


def padding_mask(attention_mask: Optional[torch.Tensor], shape: torch.Size) -> Optional[torch.Tensor]:
    """``attention_mask [batch, seq]`` (1 = token, 0 = padding, anywhere in the row) as the
    attention's key mask ``[batch, 1, 1, seq]``; ``None`` stays ``None`` (no padding)."""
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, input_ids {list(shape)}")
    return attention_mask.bool()[:, None, None, :]


class EncoderStack(LayerStack):
    """Positions, ``n_layers`` bidirectional blocks and the final norm, on embedded tokens
    (:class:`~gohgraph.models.stacks.LayerStack`).

    ``forward(x [batch, seq, d_model], attention_mask [batch, seq] | None)`` ->
    ``(hidden [batch, seq, d_model], routing: one LayerRouting per layer)``. Every token sees
    every real token on both sides; padded keys are invisible, so a padded position's content
    never reaches a real token's output, and padding is routed nowhere that counts (no expert
    compute or capacity, no routing-loss term, no balancing count). Positions count from 0 in
    every row (right padding).
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__(cfg, GoHBlock, cfg.n_layers, bidirectional=True)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, List[LayerRouting]]:
        mask = padding_mask(attention_mask, x.shape[:2])
        x, bias = self.enter(x)
        routing = []
        for block in self.blocks:
            x, layer_routing = block(x, causal=False, mask=mask, bias=bias,
                                     token_mask=None if mask is None else mask[:, 0, 0])
            routing.append(layer_routing)
        return self.leave(x), routing


@dataclass
class EncoderOutput:
    """What :meth:`GoHEncoder.forward` returns.

    ``hidden [batch, seq, d_model]`` the last layer's states; ``logits [batch, seq, vocab]`` the
    masked-LM logits (``None`` for a classifier called without MLM labels); ``class_logits
    [batch, n_labels]`` (``None`` without a classification head); ``mlm_loss`` / ``class_loss`` the
    cross-entropies of the labels given; ``aux_loss`` the weighted routing losses; ``loss`` their
    sum; ``routing`` one record per layer.
    """

    hidden: torch.Tensor
    logits: Optional[torch.Tensor] = None
    class_logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    mlm_loss: Optional[torch.Tensor] = None
    class_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    routing: List[LayerRouting] = field(default_factory=list)

    def routing_by_kind(self) -> Dict[str, List[LayerRouting]]:
        """``{"encoder": routing}``: the records of the one routed attention kind, bidirectional self-attention."""
        return {KIND_ENCODER: self.routing}


class GoHEncoder(RoutedModel, nn.Module):
    """Bidirectional encoder with routed heads; masked-LM and sequence-classification heads.

    ``forward(input_ids [batch, seq], attention_mask [batch, seq] | None, labels [batch, seq] | None,
    class_labels [batch] | None)``. ``labels`` are MLM targets at masked positions and ``-100``
    elsewhere (not shifted: the encoder predicts the token at its own position). The MLM head is
    ``W_E^T`` (tied), after BERT's transform ``norm(GELU(W h + b))`` with ``cfg.mlm_transform``.
    The classifier reads ``cfg.classifier_pooling``: the first token's state, the mean over real
    tokens, or BERT's pooler ``tanh(W h_0 + b)``.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        if cfg.model_type != "encoder":
            raise ValueError(f"GoHEncoder needs model_type='encoder', got {cfg.model_type!r}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.encoder = EncoderStack(cfg)
        self.mlm_transform = None
        if cfg.mlm_transform:
            self.mlm_transform = nn.Sequential(nn.Linear(cfg.d_model, cfg.d_model), nn.GELU(), build_norm(cfg))
        self.lm_head = build_lm_head(cfg)
        self.lm_bias = nn.Parameter(torch.zeros(cfg.vocab_size)) if cfg.linear_bias else None
        self.pooler = self.classifier = None
        if cfg.n_labels:
            if cfg.classifier_pooling == "first-tanh":
                self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
            self.classifier = nn.Linear(cfg.d_model, cfg.n_labels)
            nn.init.normal_(self.classifier.weight, std=cfg.init_std)
            nn.init.zeros_(self.classifier.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None
                ) -> EncoderOutput:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        hidden, routing = self.encoder(self.embed(input_ids), attention_mask)
        out = EncoderOutput(hidden=hidden, routing=routing,
                            aux_loss=weighted_aux_loss(self.config, routing, hidden))
        out.loss = out.aux_loss
        if self.classifier is None or labels is not None:
            out.logits = self.mlm_logits(hidden)
        if labels is not None:
            out.mlm_loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                           labels.reshape(-1), ignore_index=-100)
            out.loss = out.loss + out.mlm_loss
        if self.classifier is not None:
            out.class_logits = self.classifier(self.dropout(self.pool(hidden, attention_mask)))
            if class_labels is not None:
                out.class_loss = F.cross_entropy(out.class_logits.float(), class_labels)
                out.loss = out.loss + out.class_loss
        return out

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [batch, seq, d_model]`` -> ``[batch, seq, vocab]``."""
        if self.mlm_transform is not None:
            hidden = self.mlm_transform(hidden)
        return output_logits(self, hidden, self.lm_bias)

    def pool(self, hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``hidden [batch, seq, d_model]`` -> ``[batch, d_model]`` (padding excluded from the mean)."""
        if self.config.classifier_pooling == "mean":
            if attention_mask is None:
                return hidden.mean(dim=1)
            weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
            return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        first = hidden[:, 0]
        return torch.tanh(self.pooler(first)) if self.pooler is not None else first
