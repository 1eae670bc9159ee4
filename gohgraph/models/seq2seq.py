"""GoHSeq2Seq: the encoder–decoder member of the family (Vaswani; T5; docs/seq2seq.md).

One token embedding shared by both stacks -> :class:`~gohgraph.models.encoder.EncoderStack`
(bidirectional, padding mask) over the source -> :class:`DecoderStack` over the target:
``cfg.decoder_layers`` :class:`~gohgraph.models.decoder_block.DecoderBlock` s of causal
self-attention, cross-attention over the encoder output and a dense or expert FFN -> final norm
(pre-norm) -> output head (the embedding, tied, or its own matrix). Every attention routes its
heads with the configured router; the routing records come back per attention kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..layers.kv_cache import KVCache
from ..routing import KIND_CROSS, KIND_DECODER_SELF, KIND_ENCODER, LayerRouting
from .decoder_block import DecoderBlock
from .encoder import EncoderStack, padding_mask
from .generation import check_generation_arguments, check_token_mask, make_decode_cache, sample_next_token
from .output_head import build_lm_head, output_logits
from .routed import RoutedModel, weighted_aux_loss
from .stacks import LayerStack

# the keys of Seq2SeqOutput.routing: one routing graph per attention kind
ROUTING_KINDS = (KIND_ENCODER, KIND_DECODER_SELF, KIND_CROSS)
IGNORE_INDEX = -100  # label positions the loss skips (Hugging Face's convention)

MemoryKV = List[Tuple[torch.Tensor, torch.Tensor]]


class DecoderStack(LayerStack):
    """Positions, ``cfg.decoder_layers`` decoder blocks and the final norm, on embedded target tokens
    (:class:`~gohgraph.models.stacks.LayerStack`; T5's bias here has causal buckets).

    ``forward(x [batch, tgt, d_model], memory_kv, memory_mask, cache, mask)`` ->
    ``(hidden [batch, tgt, d_model], self_routing, cross_routing)`` (one record per block each).
    ``memory_kv``: per block, the cross-attention keys and values of the encoder output
    (:meth:`project_memory`); ``cache``: the self-attention KV cache (new tokens then sit at
    ``cache.length() + t``); ``mask``: bool ``[batch, 1, 1, tgt]`` target padding, also what
    tells the routers which target positions are padding.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__(cfg, DecoderBlock, cfg.decoder_layers, bidirectional=False)

    def project_memory(self, memory: torch.Tensor) -> MemoryKV:
        """``memory [batch, src, d_model]`` -> per block ``(k, v)``, each ``[batch, kv_heads, src, head_dim]``."""
        return [block.cross_attn.project_memory(memory) for block in self.blocks]

    def forward(self, x: torch.Tensor, memory_kv: MemoryKV, memory_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, mask: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, List[LayerRouting], List[LayerRouting]]:
        x, bias = self.enter(x, cache.length() if cache is not None else 0)
        seq = x.shape[1]
        self_routing, cross_routing = [], []
        for block, kv in zip(self.blocks, memory_kv):
            x, self_record, cross_record = block(x, kv, memory_mask, cache=cache, mask=mask, bias=bias,
                                                 token_mask=None if mask is None else mask[:, 0, 0, -seq:])
            self_routing.append(self_record)
            cross_routing.append(cross_record)
        return self.leave(x), self_routing, cross_routing


@dataclass
class Seq2SeqOutput:
    """What :meth:`GoHSeq2Seq.forward` returns.

    ``logits [batch, tgt, vocab]``; ``lm_loss`` the cross-entropy of ``labels`` (nats per target
    token, ``-100`` ignored); ``aux_loss`` the weighted routing losses of every attention and FFN;
    ``loss = lm_loss + aux_loss`` when labels are given; ``routing`` one list of per-layer records
    per attention kind (:data:`ROUTING_KINDS`: ``"encoder"``, ``"decoder_self"``, ``"cross"``;
    expert records hang on ``"encoder"`` and ``"decoder_self"``); ``encoder_hidden
    [batch, src, d_model]`` the encoder output.
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    routing: Dict[str, List[LayerRouting]] = field(default_factory=dict)
    encoder_hidden: Optional[torch.Tensor] = None

    def routing_by_kind(self) -> Dict[str, List[LayerRouting]]:
        """``{kind: records}`` for the three routed attention kinds, in :data:`ROUTING_KINDS` order
        (``routing`` itself, which is already keyed by kind)."""
        return {kind: self.routing[kind] for kind in ROUTING_KINDS}


class GoHSeq2Seq(RoutedModel, nn.Module):
    """Encoder–decoder with routed heads in all three attention kinds.

    ``forward(input_ids [batch, src], attention_mask [batch, src] | None, decoder_input_ids
    [batch, tgt] | None, labels [batch, tgt] | None, decoder_attention_mask [batch, tgt] | None)``.
    ``attention_mask`` marks source tokens (1) and padding (0, anywhere in a row); padding is
    invisible to the encoder's real tokens and to every cross-attention query. ``labels`` are the
    target tokens themselves, aligned with the decoder's outputs: without ``decoder_input_ids``
    the decoder reads ``labels`` shifted right behind ``cfg.decoder_start_token_id`` (``-100``
    read as ``cfg.pad_token_id``), as Hugging Face's T5 does. The output head is the shared
    embedding (``cfg.tie_embeddings``) or its own matrix; ``cfg.scale_decoder_output`` multiplies
    the decoder output by ``d_model**-0.5`` first (T5 v1.0).
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        if cfg.model_type != "seq2seq":
            raise ValueError(f"GoHSeq2Seq needs model_type='seq2seq', got {cfg.model_type!r}")
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.encoder = EncoderStack(cfg)
        self.decoder = DecoderStack(cfg)
        self.lm_head = build_lm_head(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None) -> Seq2SeqOutput:
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("GoHSeq2Seq.forward needs decoder_input_ids or labels (shifted right into them)")
            decoder_input_ids = self.shift_right(labels)
        for name, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids.dim() != 2:
                raise ValueError(f"{name} must be [batch, seq], got shape {list(ids.shape)}")
        if labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(f"labels have shape {list(labels.shape)}, decoder_input_ids {list(decoder_input_ids.shape)}")
        encoder_hidden, encoder_routing, memory_mask = self.encode(input_ids, attention_mask)
        target_mask = padding_mask(decoder_attention_mask, decoder_input_ids.shape)
        hidden, self_routing, cross_routing = self.decoder(
            self.embed(decoder_input_ids), self.decoder.project_memory(encoder_hidden), memory_mask, mask=target_mask)
        logits = self.output_logits(hidden)
        routing = dict(zip(ROUTING_KINDS, (encoder_routing, self_routing, cross_routing)))
        records = [record for kind in ROUTING_KINDS for record in routing[kind]]
        out = Seq2SeqOutput(logits=logits, aux_loss=weighted_aux_loss(self.config, records, logits),
                            routing=routing, encoder_hidden=encoder_hidden)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                          ignore_index=IGNORE_INDEX)
            out.loss = out.lm_loss + out.aux_loss
        return out

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, List[LayerRouting], Optional[torch.Tensor]]:
        """``input_ids [batch, src]`` -> the encoder output ``[batch, src, d_model]``, its routing
        records, and the cross-attention's key mask ``[batch, 1, 1, src]`` (``None``: no padding)."""
        if attention_mask is not None:
            check_token_mask(attention_mask, input_ids.shape)
        hidden, routing = self.encoder(self.embed(input_ids), attention_mask)
        return hidden, routing, padding_mask(attention_mask, input_ids.shape)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Decoder states ``[batch, tgt, d_model]`` -> ``[batch, tgt, vocab]``."""
        if self.config.scale_decoder_output:
            hidden = hidden * self.config.d_model ** -0.5
        return output_logits(self, hidden)

    def shift_right(self, labels: torch.Tensor) -> torch.Tensor:
        """``labels [batch, tgt]`` -> decoder inputs ``[start, labels[:, :-1]]``, ``-100`` -> pad."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        return shifted.masked_fill(shifted == IGNORE_INDEX, self.config.pad_token_id)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                 temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 generator: Optional[torch.Generator] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None) -> torch.Tensor:
        """Decode up to ``max_new_tokens`` tokens for the sources ``input_ids [batch, src]``.

        Returns ``[batch, 1 + new]``: ``cfg.decoder_start_token_id`` then the generated tokens, as
        Hugging Face's ``generate`` returns for T5. ``attention_mask [batch, src]`` marks source
        padding (anywhere in a row). ``temperature=0`` is greedy; ``top_k`` / ``top_p`` cut the
        distribution first (:func:`~gohgraph.models.generation.sample_next_token`). A row that
        produced ``eos_token_id`` is done: its later tokens are ``pad_token_id`` (default
        ``cfg.pad_token_id``), and decoding stops when every row is done.

        The encoder runs once; each decoder block's cross-attention keys and values are projected
        once per call (:meth:`DecoderStack.project_memory`); each step feeds only the newest token,
        its self-attention reading earlier keys and values from a KV cache.
        """
        check_generation_arguments(input_ids, None, self.config.vocab_size, max_new_tokens,
                                   temperature, top_k, top_p, eos_token_id)
        if 1 + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"1 + max_new_tokens={max_new_tokens} exceeds max_seq_len={self.config.max_seq_len}")
        pad_token_id = self.config.pad_token_id if pad_token_id is None else pad_token_id
        was_training = self.training
        self.eval()
        self._set_decoding(True)
        try:
            with torch.inference_mode():
                ids = self._generate(input_ids, attention_mask, max_new_tokens, temperature, top_k, top_p,
                                     generator, eos_token_id, pad_token_id)
        finally:
            self._set_decoding(False)
            self.train(was_training)
        return ids.clone()  # outside inference mode: a normal tensor

    def _generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], max_new_tokens: int,
                  temperature: float, top_k: Optional[int], top_p: Optional[float],
                  generator: Optional[torch.Generator], eos_token_id: Optional[int], pad_token_id: int) -> torch.Tensor:
        encoder_hidden, _, memory_mask = self.encode(input_ids, attention_mask)
        memory_kv = self.decoder.project_memory(encoder_hidden)
        # static, never the sliding-window cache: T5's relative bias is computed for every cached
        # position, and the target is short (the window's mask still applies)
        cache = make_decode_cache(self.config, "static", 1 + max_new_tokens, n_layers=self.config.decoder_layers)
        ids = input_ids.new_full((input_ids.shape[0], 1), self.config.decoder_start_token_id)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        next_ids = ids
        for _ in range(max_new_tokens):
            hidden, _, _ = self.decoder(self.embed(next_ids), memory_kv, memory_mask, cache=cache)
            next_ids = sample_next_token(self.output_logits(hidden[:, -1]), temperature, top_k, generator, top_p)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(done[:, None], pad_token_id)
                done |= next_ids[:, 0] == eos_token_id
            ids = torch.cat([ids, next_ids], dim=1)
            if bool(done.all()):
                break
        return ids
