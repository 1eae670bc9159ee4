"""GoHConfig: every bad value is refused at construction with the field and allowed values named."""

import dataclasses
import json
import math

import networkx as nx
import pytest
import torch

from gohgraph import GoHConfig


@pytest.mark.parametrize("changes,message", [
    (dict(d_model=100, n_heads=8), r"d_model=100 must be divisible by n_heads=8"),
    (dict(n_shared_heads=9), r"n_shared_heads=9 must be in \[0, n_heads=8\]"),
    (dict(n_shared_heads=2, top_k_heads=7), r"top_k_heads=7 must be in \[1, n_routed_heads=6\]"),
    (dict(n_kv_heads=3), r"n_kv_heads=3 must be a positive divisor of n_heads=8"),
    (dict(router="gat"), r"router='gat' is not one of \['dense', 'linear', 'graph', 'query-norm'\]"),
    (dict(head_graph="grid"), r"head_graph='grid' is not one of \['complete', 'ring', 'star', 'none'\]"),
    (dict(ffn="sparse"), r"ffn='sparse' is not one of \['dense', 'moe', 'mh-moe', 'graph-moe'\]"),
    (dict(router_rounds=-1), r"router_rounds=-1 must be >= 0"),
    (dict(router="graph", router_rounds=0), r"router_rounds must be >= 1 for router='graph'"),
    (dict(norm="batch"), r"norm='batch' is not one of \['rms', 'layer'\]"),
    (dict(n_layers=0), r"n_layers=0 must be a positive integer"),
    (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
    (dict(head_graph=[[0, 9]]), r"head_graph edge \[0, 9\] names a node outside 0..7"),
    (dict(head_graph=[[2, 2]]), r"self-loop"),
    (dict(ffn="moe", n_experts=4, top_k_experts=5), r"top_k_experts=5 must be <= n_routed_experts=4"),
    (dict(ffn="moe", n_subtokens=2), r"n_subtokens=2 must be 1 for ffn='moe'"),
    (dict(ffn="mh-moe", n_subtokens=3), r"d_model=256 must be divisible by n_subtokens=3"),
    (dict(ffn="moe", capacity_factor=0.0), r"capacity_factor=0.0 must be > 0 or None"),
    (dict(balance_loss_coef=-1.0), r"balance_loss_coef=-1.0 must be >= 0"),
    (dict(n_mosa_heads=-2), r"n_mosa_heads=-2 must be >= 0 \(0 = no sparse heads\)"),
    (dict(n_mosa_heads=4, mosa_sparsity=0), r"mosa_sparsity=0 must be a positive integer"),
    (dict(mosa_aux_loss_coef=-0.5), r"mosa_aux_loss_coef=-0.5 must be >= 0"),
    (dict(n_mosa_heads=4, sliding_window=16), r"n_mosa_heads=4 needs sliding_window=None, got sliding_window=16"),
])
def test_bad_values_raise_value_error_naming_the_field(changes, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**changes)


def test_json_round_trip_keeps_every_field(tmp_path):
    cfg = GoHConfig(router="graph", n_shared_heads=2, top_k_heads=3, n_kv_heads=4, ffn="mh-moe",
                    n_subtokens=4, n_experts=16, capacity_factor=1.25, head_graph="ring")
    assert GoHConfig.from_json(cfg.to_json()) == cfg
    cfg.to_json(tmp_path / "c.json")
    assert GoHConfig.from_json(tmp_path / "c.json") == cfg


def test_graph_given_as_networkx_or_edge_index_is_stored_as_edge_list():
    graph = nx.DiGraph([(0, 1), (1, 2), (2, 0)])
    from_nx = GoHConfig(n_heads=4, d_model=32, head_graph=graph)
    from_tensor = GoHConfig(n_heads=4, d_model=32, head_graph=torch.tensor([[0, 1, 2], [1, 2, 0]]))
    assert from_nx.head_graph == from_tensor.head_graph == [[0, 1], [1, 2], [2, 0]]
    assert GoHConfig.from_json(from_nx.to_json()) == from_nx


def test_unknown_json_field_is_refused():
    with pytest.raises(ValueError, match=r"unknown GoHConfig field\(s\) \['heads'\]"):
        GoHConfig.from_dict({"heads": 8})


def test_derived_sizes():
    cfg = GoHConfig(d_model=256, n_heads=8, n_shared_heads=2, top_k_heads=3, router="graph")
    assert (cfg.head_dim, cfg.n_routed_heads, cfg.active_heads, cfg.kv_heads) == (32, 6, 5, 8)
    assert GoHConfig(router="dense", n_shared_heads=2, top_k_heads=3).active_heads == 8


def test_sections_hold_every_field_once():
    from gohgraph.config import SECTIONS

    names = [name for section in SECTIONS for name in GoHConfig.section_fields(section)]
    assert sorted(names) == sorted(GoHConfig().to_dict()) and len(names) == len(set(names))
    assert "n_kv_heads" in GoHConfig.section_fields("attention")
    assert "top_k_experts" in GoHConfig.section_fields("experts")
    with pytest.raises(ValueError, match="section='heads' is not one of"):
        GoHConfig.section_fields("heads")


@pytest.mark.parametrize("ffn,n_subtokens", [("moe", 1), ("mh-moe", 2), ("graph-moe", 4)])
def test_default_expert_width_matches_the_dense_ffn_in_active_parameters(ffn, n_subtokens):
    """expert_hidden=None: the k experts each of the m sub-tokens (width d/m) reaches hold exactly the
    dense SwiGLU's 3 * d * hidden weights, whatever m is."""
    cfg = GoHConfig(d_model=96, n_heads=4, ffn=ffn, n_subtokens=n_subtokens, n_experts=8, top_k_experts=2,
                    ffn_hidden=128)
    per_expert = 3 * (cfg.d_model // n_subtokens) * cfg.expert_hidden_dim
    active_expert_weights = n_subtokens * cfg.top_k_experts * per_expert
    assert cfg.expert_hidden_dim == 64
    assert active_expert_weights == 3 * cfg.d_model * cfg.hidden_dim


def test_output_init_std_is_the_one_formula():
    cfg = GoHConfig(n_layers=8, init_std=0.04)
    assert cfg.output_init_std == pytest.approx(0.04 / 4)
    from gohgraph import GoHTransformer

    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(d_model=64, n_heads=4, n_layers=8, init_std=0.04, ffn_hidden=512))
    stds = [block.attn.out.weight.std().item() for block in model.blocks]
    assert sum(stds) / len(stds) == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("value,expected", [("False", False), ("false", False), ("0", False), (0, False),
                                            ("TRUE", True), ("1", True), (True, True), (1, True)])
def test_booleans_are_parsed_strictly(value, expected):
    assert GoHConfig(inter_head_flow=value).inter_head_flow is expected


@pytest.mark.parametrize("changes,message", [
    (dict(inter_head_flow="maybe"), r"inter_head_flow='maybe' must be True or False"),
    (dict(inter_head_flow="no"), r"inter_head_flow='no' must be True or False"),
    (dict(inter_head_flow=2), r"inter_head_flow=2 must be True or False"),
    (dict(top_k_heads=2.5, n_shared_heads=1), r"top_k_heads=2.5 must be an integer"),
    (dict(top_k_heads="2.5"), r"top_k_heads='2.5' must be an integer"),
    (dict(d_model=True), r"d_model=True must be an integer"),
    (dict(dropout="a lot"), r"dropout='a lot' must be a finite number"),
    (dict(rope_theta=float("nan")), r"rope_theta=nan must be a finite number"),
    (dict(router=3), r"router=3 must be a string"),
])
def test_wrongly_typed_values_name_the_field_value_and_type(changes, message):
    with pytest.raises(ValueError, match=message):
        GoHConfig(**changes)


def test_text_values_mean_what_typed_ones_mean():
    from_text = GoHConfig(d_model="64", n_heads="4", dropout="0.1", top_k_heads="null", n_kv_heads="none",
                          head_graph="[[0, 1], [1, 0]]")
    assert (from_text.d_model, from_text.dropout, from_text.top_k_heads, from_text.n_kv_heads) == (64, 0.1, None, None)
    assert from_text.head_graph == [[0, 1], [1, 0]]
    assert GoHConfig.from_dict({"dropout": "0.1", "inter_head_flow": "false"}).inter_head_flow is False
    with pytest.raises(ValueError, match="inter_head_flow='no'"):  # a saved config.json saying "no"
        GoHConfig.from_dict({"inter_head_flow": "no"})


# ---------------------------------------------------------------------- three paths, one parser
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

FIELDS = [f.name for f in dataclasses.fields(GoHConfig)]
SPECIAL_TEXT = ["true", "False", "0", "1", "maybe", "no", "none", "null", "2", "2.5", "-1", "1e-3", "nan", "inf",
                "ring", "complete", "moe", "graph", "linear", "rms", "gelu", "[[0, 1], [1, 0]]", "[[0, 9]]", ""]


def _outcome(build):
    try:
        return "value", build().to_dict()
    except ValueError as err:
        return "error", str(err)


def _via_set(name, text):
    from gohgraph.cli.common import parse_overrides
    from gohgraph.training.presets import split_fields

    model_kwargs, _ = split_fields(parse_overrides([f"{name}={text}"], FIELDS), "--set")
    return GoHConfig.from_dict(model_kwargs)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(FIELDS), text=st.one_of(st.sampled_from(SPECIAL_TEXT), st.text(max_size=6)))
def test_text_means_the_same_through_set_json_and_the_constructor(name, text):
    direct = _outcome(lambda: GoHConfig(**{name: text}))
    from_json = _outcome(lambda: GoHConfig.from_dict(json.loads(json.dumps({name: text}))))
    assert from_json == direct
    if text == text.strip() and "=" not in text:  # --set strips around the value, like a shell user expects
        assert _outcome(lambda: _via_set(name, text)) == direct


@settings(max_examples=300, deadline=None, derandomize=True)
@given(name=st.sampled_from(FIELDS),
       value=st.one_of(st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True, allow_infinity=True)))
def test_numbers_mean_the_same_through_set_json_and_the_constructor(name, value):
    direct = _outcome(lambda: GoHConfig(**{name: value}))
    if isinstance(value, float) and not math.isfinite(value):
        assert direct[0] == "error" or name in ("head_graph", "expert_graph")
    else:
        assert _outcome(lambda: GoHConfig.from_dict(json.loads(json.dumps({name: value})))) == direct
    via_set = _outcome(lambda: _via_set(name, json.dumps(value) if not isinstance(value, bool) else str(value)))
    if direct[0] == "value":
        assert via_set == direct  # the text of an accepted number means that number
    else:
        assert via_set[0] == "error"
