"""GoHTransformer: a decoder-only language model whose layers route heads (and experts) over graphs.

Token embedding -> ``n_layers`` pre-norm blocks (GoH attention, then a dense or expert FFN) ->
final norm -> output head tied to the embedding. The loop over blocks lives here, in the model,
so per-token recursion (Mixture-of-Recursions) is a change to that loop, not a new model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..config import GoHConfig
from ..layers.kv_cache import KVCache
from ..layers.norm import build_norm
from ..layers.positions import build_embedding_positions
from ..routers.heads import HeadRouting
from ..routers.recursion import ExpertChoiceRecursionRouter
from ..routing import KIND_DECODER, LayerRouting, RecursionRouting
from ..storage import load_model, save_model
from .block import GoHBlock
from .compile import warn_compile_unavailable
from .compiled_decode import CompiledDecoder, compiled_step, decode_step, whole_step_unsupported
from .generation import check_generation_arguments, make_decode_cache, positions_from_mask, sample_next_token
from .output_head import build_lm_head, output_logits
from .packed import packed_state, unpack_ternary_state
from .recursion import MixtureOfRecursions, RecursionKVCache
from .routed import RoutedModel, weighted_aux_loss


@dataclass
class GoHOutput:
    """What :meth:`GoHTransformer.forward` returns.

    ``logits [batch, seq, vocab]``; ``loss = lm_loss + aux_loss`` when labels are given;
    ``lm_loss`` the next-token cross-entropy (nats per token); ``aux_loss`` the weighted sum of
    every layer's routing losses (0 for dense models); ``routing`` one record per layer (per block
    application for Mixture-of-Recursions); ``recursion`` the recursion record (``None`` without
    recursion); ``cache`` the KV cache passed in (now holding this call's positions too).
    """

    logits: torch.Tensor
    loss: Optional[torch.Tensor] = None
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    routing: List[LayerRouting] = field(default_factory=list)
    cache: Optional[KVCache] = None
    recursion: Optional[RecursionRouting] = None

    def routing_by_kind(self) -> Dict[str, List[LayerRouting]]:
        """``{"decoder": routing}``: the records of the one routed attention kind, causal self-attention."""
        return {KIND_DECODER: self.routing}


class GoHTransformer(RoutedModel, nn.Module):
    """Decoder-only LM; see :class:`~gohgraph.GoHConfig` for the variants it covers.

    ``forward(input_ids [batch, seq], labels [batch, seq] | None)``: labels are the input ids
    themselves (shifted inside, as in Hugging Face); ``-100`` marks positions to ignore. Routing
    upkeep and checkpoints come from :class:`~gohgraph.models.routed.RoutedModel`.
    """

    def __init__(self, cfg: GoHConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        # RoPE lives in the attention; GPT-2 style models add a learned table here
        self.position_embed = build_embedding_positions(cfg)
        # a norm after the embeddings (BLOOM's word_embeddings_layernorm), as the encoder's
        self.embedding_norm = build_norm(cfg) if cfg.embedding_norm else None
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GoHBlock(cfg, i) for i in range(cfg.n_layers))
        # Mixture-of-Recursions: the same blocks, applied up to max_recursions times per token
        self.recursion = MixtureOfRecursions(cfg) if cfg.recursion == "mor" else None
        self.final_norm = build_norm(cfg)
        self.lm_head = build_lm_head(cfg)

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, attention_mask: Optional[torch.Tensor] = None) -> GoHOutput:
        """``input_ids [batch, seq]``; ``attention_mask [batch, cached + seq]`` (1 = token, 0 =
        left padding) covers the cached positions too, so a padded batch decodes step by step.
        Padding is invisible to every real token: it is masked out of attention, and positions
        count from each row's first real token. Padding is routed nowhere that counts: no expert
        compute or capacity, no routing-loss term, no balancing count."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {list(input_ids.shape)}")
        offset = cache.length() if cache is not None else 0
        positions = mask = token_mask = None
        if attention_mask is not None:
            if attention_mask.shape != (input_ids.shape[0], offset + input_ids.shape[1]):
                raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}; expected "
                                 f"[batch, cached + seq] = {[input_ids.shape[0], offset + input_ids.shape[1]]}")
            positions = positions_from_mask(attention_mask)[:, offset:]
            mask = attention_mask.bool()[:, None, None, :]  # [batch, 1, 1, keys]
            token_mask = mask[:, 0, 0, offset:]  # [batch, seq]: this call's tokens, for the routers
        x = self.dropout(self.embed_tokens(input_ids, offset if positions is None else positions))
        routing, recursion = [], None
        if self.recursion is not None:
            x, routing, recursion = self.recursion(self.blocks, x, cache=cache, mask=mask, positions=positions,
                                                   token_mask=token_mask)
        else:
            for block in self.blocks:
                x, layer_routing = block(x, cache=cache, causal=True, mask=mask, positions=positions,
                                         token_mask=token_mask)
                routing.append(layer_routing)
        x = self.final_norm(x)
        logits = output_logits(self, x)

        aux_loss = weighted_aux_loss(self.config, routing, logits, recursion)
        out = GoHOutput(logits=logits, aux_loss=aux_loss, routing=routing, cache=cache, recursion=recursion)
        if labels is not None:
            out.lm_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                          labels[:, 1:].reshape(-1), ignore_index=-100)
            out.loss = out.lm_loss + aux_loss
        return out

    def embed_tokens(self, input_ids: torch.Tensor, positions: Union[int, torch.Tensor]) -> torch.Tensor:
        """``input_ids [batch, seq]`` at ``positions`` (the first one's index, or ``[batch, seq]``)
        -> the blocks' input ``[batch, seq, d_model]`` before dropout: the token embeddings, plus the
        learned position table where there is one, through the embedding norm where there is one."""
        x = self.embed(input_ids)
        if self.position_embed is not None:
            x = self.position_embed(x, positions)
        return x if self.embedding_norm is None else self.embedding_norm(x)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: Optional[int] = None, use_cache: bool = True,
                 generator: Optional[torch.Generator] = None, attention_mask: Optional[torch.Tensor] = None,
                 top_p: Optional[float] = None, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, cache: str = "auto", compile: bool = False) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``input_ids [batch, seq]``.

        ``temperature=0`` is greedy (argmax); ``top_k`` / ``top_p`` cut the distribution first
        (:func:`~gohgraph.models.generation.sample_next_token`). Prompts of different lengths go
        in one batch left-padded, with ``attention_mask [batch, seq]`` (0 = padding): each row then
        generates exactly what it generates alone. A row that produced ``eos_token_id`` is done:
        its later positions hold ``pad_token_id`` (default: the eos id), and generation stops when
        every row is done. With ``use_cache`` each step feeds only the newest token and reads
        earlier keys/values from a :class:`KVCache` (``cache``: ``"auto"`` preallocates one for the
        whole generation, or keeps only a sliding window's positions;
        :func:`~gohgraph.models.generation.make_decode_cache`); without it every step recomputes
        the whole (cropped to ``max_seq_len``) sequence.

        ``compile=True`` runs every one-token step through one ``torch.compile``'d graph
        (:mod:`gohgraph.models.compiled_decode`): the prompt goes through eagerly into a static
        cache, then each step writes its keys and values by index and attends over the whole
        capacity under a mask, so all steps share the graph (the first generation of a batch size
        and capacity compiles it; later ones reuse it). It needs ``use_cache`` and a static cache
        (``cache="auto"`` or ``"static"``); Mixture-of-Recursions, MLA, sliding windows and score
        biases (ALiBi, T5) are not expressed by the static step, so for them (and with
        ``use_cache=False`` or ``cache="dynamic"``) ``compile=True`` compiles only the head routers
        (:meth:`compile_routers`). Where ``torch.compile`` cannot build a graph, one
        :class:`~gohgraph.models.compile.CompileUnavailableWarning` says so and decoding stays eager
        (the same tokens). Decoding runs under ``torch.inference_mode()``,
        where routed layers skip their training losses; the returned ids are an ordinary tensor.
        """
        check_generation_arguments(input_ids, attention_mask, self.config.vocab_size, max_new_tokens,
                                   temperature, top_k, top_p, eos_token_id)
        if use_cache and input_ids.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(f"prompt length {input_ids.shape[1]} + max_new_tokens={max_new_tokens} "
                             f"exceeds max_seq_len={self.config.max_seq_len}")
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        was_training = self.training
        self.eval()
        whole_step = compile and use_cache and cache != "dynamic" and whole_step_unsupported(self.config) is None
        if compile and not whole_step:
            self.compile_routers()
        self._set_decoding(True)
        try:
            return self._generate(input_ids, max_new_tokens, temperature, top_k, use_cache, generator,
                                  attention_mask, top_p, eos_token_id, pad_token_id, cache, whole_step)
        finally:
            self._set_decoding(False)
            self.train(was_training)

    def compile_routers(self) -> bool:
        """Compile every head router's one-token path (once; later calls keep it). Returns whether
        compiled routers are in use: where ``torch.compile`` cannot build them (no C++ compiler,
        an unsupported platform) a warning says why and decoding stays eager."""
        routings = [module for module in self.modules() if isinstance(module, HeadRouting)]
        if not routings or all(r.compiled_route is not None for r in routings):
            return bool(routings)
        try:  # compilation is lazy: build it now on a one-token input, to fail here if it fails
            for routing in routings:
                routing.compile_for_decoding()
            self.eval()
            self._set_decoding(True)
            with torch.inference_mode():
                self(torch.zeros(1, 1, dtype=torch.long, device=self.embed.weight.device))
        except Exception as err:  # torch.compile's failures have no common type
            for routing in routings:
                routing.compile_for_decoding(False)
            warn_compile_unavailable(err, "decoding stays eager")
            return False
        finally:
            self._set_decoding(False)
        return True

    def _generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float, top_k: Optional[int],
                  use_cache: bool, generator: Optional[torch.Generator], attention_mask: Optional[torch.Tensor],
                  top_p: Optional[float], eos_token_id: Optional[int], pad_token_id: Optional[int],
                  cache: str, whole_step: bool = False) -> torch.Tensor:
        with torch.inference_mode():
            kv_cache = self.new_cache(cache, input_ids.shape[1] + max_new_tokens) if use_cache else None
            ids, mask = input_ids, attention_mask
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
            logits = self(ids, cache=kv_cache, attention_mask=mask).logits[:, -1]
            compiled = self._compiled_decoder(kv_cache, mask) if whole_step and max_new_tokens > 1 else None
            for step in range(max_new_tokens):
                next_ids = sample_next_token(logits, temperature, top_k, generator, top_p)
                if eos_token_id is not None:
                    next_ids = next_ids.masked_fill(done[:, None], pad_token_id)
                    done |= next_ids[:, 0] == eos_token_id
                ids = torch.cat([ids, next_ids], dim=1)
                if mask is not None:
                    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                if step + 1 == max_new_tokens or bool(done.all()):
                    break
                if compiled is not None:
                    try:
                        logits = compiled(next_ids)
                    except Exception as err:  # torch.compile fails lazily, with no common type
                        self.__dict__["_compiled_decode_step"] = decode_step  # do not retry, warn once
                        warn_compile_unavailable(err, "decoding stays eager", stacklevel=4)
                        compiled.sync()  # the static cache goes on eagerly from this step's slot
                        compiled = None
                if compiled is not None:
                    continue
                if use_cache:
                    logits = self(next_ids, cache=kv_cache, attention_mask=mask).logits[:, -1]
                else:
                    window = slice(-self.config.max_seq_len, None)
                    logits = self(ids[:, window], attention_mask=None if mask is None else mask[:, window]
                                  ).logits[:, -1]
            if compiled is not None:
                compiled.sync()
        return ids.clone()  # outside inference mode: a normal tensor, usable with autograd later

    def _compiled_decoder(self, kv_cache: KVCache, mask: Optional[torch.Tensor]) -> Optional[CompiledDecoder]:
        """The compiled one-token steps after the prompt filled ``kv_cache``; ``None`` (eager
        steps, one warning) where ``torch.compile`` itself is unavailable."""
        step = self.__dict__.get("_compiled_decode_step")
        if step is None:
            try:
                step = compiled_step(self)
            except Exception as err:  # e.g. an unsupported Python or platform
                self.__dict__["_compiled_decode_step"] = decode_step
                warn_compile_unavailable(err, "decoding stays eager", stacklevel=5)
                return None
        if step is decode_step:  # compiling failed before: eager, as without compile
            return None
        return CompiledDecoder(self, kv_cache, mask, step)

    def new_cache(self, kind: str = "dynamic", capacity: Optional[int] = None) -> KVCache:
        """An empty KV cache for this model: one slot per (recursion, block) with
        Mixture-of-Recursions (:class:`~gohgraph.models.recursion.RecursionKVCache`), else the
        ``kind`` :func:`~gohgraph.models.generation.make_decode_cache` builds for ``capacity``
        positions (default ``max_seq_len``)."""
        if self.recursion is not None:
            return RecursionKVCache(self.config.n_layers, self.config.max_recursions)
        return make_decode_cache(self.config, kind, self.config.max_seq_len if capacity is None else capacity)

    def set_recursion_capacity_warmup(self, value: float) -> None:
        """Mixture-of-Recursions' expert-choice capacity warm-up share: 1.0 keeps every token in every
        recursion, 0.0 (the default) the configured capacities (schedule:
        :func:`gohgraph.training.schedules.recursion_capacity_warmup`). Call before a step, never
        between a forward and its recompute."""
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"capacity warm-up={value} must be in [0, 1]")
        for module in self.modules():
            if isinstance(module, ExpertChoiceRecursionRouter):
                module.capacity_warmup = float(value)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: Union[str, Path], packed_ternary: bool = False) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically).

        ``packed_ternary`` (BitNet models, ``linear="bitnet"``): write the ternary weights as 2-bit
        codes and their scales (:mod:`gohgraph.models.packed`) instead of the latent weights."""
        return save_model(self, directory, state=packed_state(self) if packed_ternary else None)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location: str = "cpu") -> "GoHTransformer":
        """Load a model written by :meth:`save_pretrained` (packed or not); mismatches raise
        ``CheckpointError``."""
        return load_model(directory, cls, map_location=map_location, restore_state=unpack_ternary_state)
