"""The families registry: one record per model_type, and the family contract every output keeps
(``loss``, ``aux_loss``, ``routing_by_kind()`` keyed by the family's declared kinds)."""

import dataclasses

import pytest
import torch

from gohgraph import EncoderOutput, GoHConfig, GoHOutput, Seq2SeqOutput
from gohgraph.config import MODEL_TYPES
from gohgraph.models.families import (
    DEFAULT_MODEL_TYPE,
    FAMILIES,
    Family,
    family_of,
    model_types,
)
from gohgraph.routing import LayerRouting
from tests.helpers import TINY

OUTPUTS = {"decoder": GoHOutput, "encoder": EncoderOutput, "seq2seq": Seq2SeqOutput}
# decoder layers of the seq2seq model, different from n_layers so a swapped depth shows
N_DECODER_LAYERS = 3


def tiny_config(model_type: str) -> GoHConfig:
    extra = {"decoder": {}, "encoder": {"position_embedding": "sinusoidal"},
             "seq2seq": {"position_embedding": "t5-relative", "n_decoder_layers": N_DECODER_LAYERS}}
    return GoHConfig(**{**TINY, "model_type": model_type, **extra[model_type]})


def forward_with_labels(model, model_type: str):
    torch.manual_seed(0)
    ids = torch.randint(0, 200, (2, 6))
    if model_type == "seq2seq":
        return model(ids, labels=torch.randint(0, 200, (2, 5)))
    return model(ids, labels=ids)


def test_the_registry_has_exactly_the_config_choices_in_order():
    assert tuple(FAMILIES) == MODEL_TYPES
    assert all(family.model_type == name for name, family in FAMILIES.items())
    assert DEFAULT_MODEL_TYPE in FAMILIES and [f.is_default for f in FAMILIES.values()].count(True) == 1
    assert GoHConfig().model_type == DEFAULT_MODEL_TYPE  # a config without the field is the default family's


def test_an_unknown_model_type_is_one_line():
    with pytest.raises(ValueError, match=r"^model_type='gpt' is not one of \['decoder', 'encoder', 'seq2seq'\]$"):
        family_of(dataclasses.make_dataclass("Config", [("model_type", str)])("gpt"))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_output_keeps_the_family_contract(model_type):
    family = family_of(tiny_config(model_type))
    torch.manual_seed(0)
    model = family.model_class(tiny_config(model_type))
    out = forward_with_labels(model, model_type)
    assert type(out) is OUTPUTS[model_type]
    assert out.loss is not None and out.loss.dim() == 0 and out.aux_loss is not None and out.aux_loss.dim() == 0
    by_kind = out.routing_by_kind()
    assert tuple(by_kind) == family.routing_kinds
    assert all(isinstance(record, LayerRouting) for records in by_kind.values() for record in records)
    # every record appears under exactly one kind, the same objects the output holds
    flat = [id(r) for records in by_kind.values() for r in records]
    held = out.routing.values() if isinstance(out.routing, dict) else [out.routing]
    assert sorted(flat) == sorted(id(r) for records in held for r in records)


def test_routing_depth_per_kind_follows_the_stacks():
    out = forward_with_labels(FAMILIES["seq2seq"].model_class(tiny_config("seq2seq")), "seq2seq")
    assert {kind: len(records) for kind, records in out.routing_by_kind().items()} == {
        "encoder": TINY["n_layers"], "decoder_self": N_DECODER_LAYERS, "cross": N_DECODER_LAYERS}
    assert FAMILIES["seq2seq"].stack_depths(tiny_config("seq2seq")) == {
        "encoder": TINY["n_layers"], "decoder": N_DECODER_LAYERS}
    assert FAMILIES["decoder"].stack_depths(tiny_config("decoder")) == {"decoder": TINY["n_layers"]}


def test_what_the_switches_ask():
    generating = model_types(lambda family: family.generation is not None)
    assert generating == ("decoder", "seq2seq")
    assert model_types(lambda family: family.predicts_next_token) == ("decoder",)
    assert model_types(lambda family: family.tensor_parallel) == ("decoder",)
    assert model_types(lambda family: family.special_tokens) == ("encoder", "seq2seq")
    assert model_types(lambda family: family.several_routing_kinds) == ("seq2seq",)
    assert all(isinstance(family, Family) for family in FAMILIES.values())


@pytest.mark.parametrize("model_type", ["decoder", "seq2seq"])
def test_the_generation_adapter_says_where_the_new_tokens_start(model_type):
    config = tiny_config(model_type)
    generation = family_of(config).generation
    torch.manual_seed(0)
    model = family_of(config).model_class(config)
    prompt = torch.randint(0, 200, (1, 5))
    out = model.generate(prompt, max_new_tokens=3, temperature=0)
    start = generation.prefix_length(prompt.shape[1])
    assert out.shape[1] == start + 3
    if generation.prompt_is_source:
        assert out[0, 0].item() == config.decoder_start_token_id
    else:
        assert torch.equal(out[:, :start], prompt)


def test_room_counts_the_positions_the_prompt_leaves():
    decoder, seq2seq = tiny_config("decoder"), tiny_config("seq2seq")
    most = decoder.max_seq_len
    assert FAMILIES["decoder"].generation.room(decoder, 5) == most - 5
    assert FAMILIES["decoder"].generation.room(decoder, most) == 0
    assert FAMILIES["seq2seq"].generation.room(seq2seq, 5) == most - 1  # the target starts with one token
    assert FAMILIES["seq2seq"].generation.room(seq2seq, most + 1) < 1  # the source does not fit
    assert FAMILIES["encoder"].generation is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_text_routing_is_one_stack_over_the_text(model_type):
    config = tiny_config(model_type)
    torch.manual_seed(0)
    model = family_of(config).model_class(config).eval()
    ids = torch.randint(0, 200, (1, 7))
    routing, recursion = family_of(config).text_routing(model, ids)
    assert recursion is None and len(routing) == config.n_layers
    assert all(tuple(record.head_gates.shape[:2]) == (1, 7) for record in routing)
    if model_type == "seq2seq":  # the text as a source: the encoder's routing
        expected = model.encode(ids)[1]
    else:
        expected = model(ids).routing
    assert all(torch.equal(a.head_gates, b.head_gates) for a, b in zip(routing, expected))
