"""The families registry: what each ``model_type`` is, declared once for every consumer.

A :class:`Family` record says, for one value of :attr:`GoHConfig.model_type
<gohgraph.GoHConfig.model_type>`, which class builds the model, which attention kinds route
heads (the keys of ``out.routing_by_kind()``), whether and how it generates, and the few facts
statistics, pictures, the CLI and parallelism ask about. Those consumers look the record up
(:func:`family_of`) and ask it what they need to know, by meaning ("does it generate?", "does
its prompt become a source?"), instead of comparing ``model_type`` with a family's name::

    family = family_of(model.config)
    if family.generation is None:
        raise ValueError(f"a {family.model_type} model does not generate")
    room = family.generation.room(model.config, len(prompt_ids))

The choice set itself stays :data:`gohgraph.config.MODEL_TYPES` (the config is below the models
and cannot import them); a test keeps :data:`FAMILIES`' keys equal to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import GoHConfig
from ..routing import KIND_DECODER, KIND_ENCODER, LayerRouting, RecursionRouting
from .decoder import GoHTransformer
from .encoder import GoHEncoder
from .seq2seq import ROUTING_KINDS as SEQ2SEQ_ROUTING_KINDS
from .seq2seq import GoHSeq2Seq

# a config.json, checkpoint or statistics report without "model_type" is a decoder's: every file
# written before the other families existed
DEFAULT_MODEL_TYPE = "decoder"

TextRouting = Tuple[List[LayerRouting], Optional[RecursionRouting]]


@dataclass(frozen=True)
class Generation:
    """How a family's ``model.generate(input_ids [batch, prompt], max_new_tokens, ...)`` reads its
    prompt and what it returns.

    Attributes:
        prompt_is_source: ``False``: the model continues the prompt, and the output
            ``[batch, prompt + new]`` starts with it (a decoder). ``True``: the prompt is the
            source an encoder reads, and the output ``[batch, 1 + new]`` is the target, starting
            with the decoder's start token (seq2seq).
        output_start: what the new tokens follow in the output, in words (for messages).
        compiles_decode_step: whether ``generate(..., compile=True)`` compiles the one-token
            decode step (:mod:`gohgraph.models.compiled_decode`); else it decodes eagerly.
    """

    prompt_is_source: bool
    output_start: str
    compiles_decode_step: bool

    def room(self, config: GoHConfig, prompt_length: int) -> int:
        """The most new tokens the model's ``max_seq_len`` positions leave after a prompt of
        ``prompt_length`` tokens; below 1 when the prompt does not fit."""
        if self.prompt_is_source:  # the source has its own positions; the target starts with one token
            return config.max_seq_len - 1 if prompt_length <= config.max_seq_len else 0
        return config.max_seq_len - prompt_length

    def prefix_length(self, prompt_length: int) -> int:
        """How many tokens of ``generate``'s output come before the new ones."""
        return 1 if self.prompt_is_source else prompt_length


# a decoder: the prompt is the start of the text it writes on
CONTINUATION = Generation(prompt_is_source=False, output_start="the prompt", compiles_decode_step=True)
# seq2seq: the prompt is the source; the target is decoded from the start token
SOURCE_TO_TARGET = Generation(prompt_is_source=True, output_start="the decoder's start token",
                              compiles_decode_step=False)


def _own_routing(model: nn.Module, input_ids: torch.Tensor) -> TextRouting:
    """The records of the model's one stack over ``input_ids [batch, seq]`` (and the recursion
    record; an encoder's output has none: only the decoder-only model recurses)."""
    out = model(input_ids)
    return out.routing, getattr(out, "recursion", None)


def _source_routing(model: nn.Module, input_ids: torch.Tensor) -> TextRouting:
    """The encoder's records over ``input_ids [batch, src]`` read as a source (no target needed)."""
    return model.encode(input_ids)[1], None


@dataclass(frozen=True)
class Family:
    """One member of the model family, as every consumer outside ``models/`` sees it.

    Attributes:
        model_type: the :attr:`GoHConfig.model_type <gohgraph.GoHConfig.model_type>` value.
        model_class: the ``nn.Module`` class ``model_class(config)`` builds (and
            ``from_pretrained`` loads).
        routing_kinds: the attention kinds whose routing its outputs carry, in order: the keys of
            ``out.routing_by_kind()`` (:data:`gohgraph.routing.KIND_DECODER` etc.).
        generation: how it generates (:class:`Generation`), or ``None``: it does not generate.
        predicts_next_token: whether its ``lm_loss`` scores a text on its own, as the next-token
            cross-entropy over ``input_ids`` (what ``gohgraph eval`` reports as perplexity); a
            seq2seq model's targets need a source, an encoder predicts masked tokens.
        special_tokens: whether its vocabulary ends with the special tokens gohgraph's objectives
            add after the tokenizer's ids (:class:`~gohgraph.data.objectives.SpecialTokens`).
        tensor_parallel: whether :mod:`gohgraph.parallel.tensor_parallel` can shard it.
        stack_depths: ``config -> {stack: layers}``, its layer stacks in data-flow order.
        text_routing: ``(model, input_ids [batch, seq]) -> (records, recursion record or None)``:
            the routing of a text on its own (a seq2seq model's is its encoder's, the text as a
            source).
    """

    model_type: str
    model_class: type
    routing_kinds: Tuple[str, ...]
    generation: Optional[Generation]
    predicts_next_token: bool
    special_tokens: bool
    tensor_parallel: bool
    stack_depths: Callable[[GoHConfig], Dict[str, int]]
    text_routing: Callable[[nn.Module, torch.Tensor], TextRouting]

    @property
    def several_routing_kinds(self) -> bool:
        """Whether more than one attention kind routes heads: statistics and pictures then come
        once per kind (:mod:`gohgraph.analysis.stats.kinds`), and no one token trace covers them."""
        return len(self.routing_kinds) > 1

    @property
    def is_default(self) -> bool:
        """Whether a file without ``model_type`` (config, statistics report) is this family's."""
        return self.model_type == DEFAULT_MODEL_TYPE


FAMILIES: Dict[str, Family] = {
    "decoder": Family(
        model_type="decoder", model_class=GoHTransformer, routing_kinds=(KIND_DECODER,),
        generation=CONTINUATION, predicts_next_token=True, special_tokens=False, tensor_parallel=True,
        stack_depths=lambda cfg: {"decoder": cfg.n_layers}, text_routing=_own_routing),
    "encoder": Family(
        model_type="encoder", model_class=GoHEncoder, routing_kinds=(KIND_ENCODER,),
        generation=None, predicts_next_token=False, special_tokens=True, tensor_parallel=False,
        stack_depths=lambda cfg: {"encoder": cfg.n_layers}, text_routing=_own_routing),
    "seq2seq": Family(
        model_type="seq2seq", model_class=GoHSeq2Seq, routing_kinds=SEQ2SEQ_ROUTING_KINDS,
        generation=SOURCE_TO_TARGET, predicts_next_token=False, special_tokens=True, tensor_parallel=False,
        stack_depths=lambda cfg: {"encoder": cfg.n_layers, "decoder": cfg.decoder_layers},
        text_routing=_source_routing),
}


def family_of(config: GoHConfig) -> Family:
    """The :class:`Family` of ``config.model_type`` (a :class:`GoHConfig`, or anything with the
    attribute); a one-line ``ValueError`` for a value no family has."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"model_type={model_type!r} is not one of {list(FAMILIES)}")
    return FAMILIES[model_type]


def model_types(where: Callable[[Family], bool]) -> Tuple[str, ...]:
    """The ``model_type`` of every family for which ``where(family)`` holds, in registry order
    (e.g. ``model_types(lambda f: f.generation is not None)``: the ones that generate)."""
    return tuple(name for name, family in FAMILIES.items() if where(family))
