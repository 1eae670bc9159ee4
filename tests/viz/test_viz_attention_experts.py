"""SwitchHead's experts and MoSA's sparse heads in the routing graph, its pictures, the HTML report and
``gohgraph viz`` / ``gohgraph report``: each number drawn is the statistics report's."""

import html
import json
import re

import matplotlib.image as mpimg
import networkx as nx
import numpy as np
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer, viz
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.cli.main import main
from gohgraph.viz.routing_graph import _layout

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
SWITCH = dict(n_attention_experts=4, top_k_attention_experts=2)
MOSA = dict(n_mosa_heads=3, mosa_sparsity=4)
HEADS, EXPERTS, SPARSE = 4, 4, 3


def model_and_report(**overrides):
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**{**TINY, **overrides})).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]
    return model, batches, collect_routing_stats(model, batches, progress=False).report()


@pytest.fixture(scope="module")
def switch_head():
    return model_and_report(**SWITCH)


@pytest.fixture(scope="module")
def mosa():
    return model_and_report(**MOSA)


# ---------------------------------------------------------------------- the networkx graph
def test_every_head_has_its_value_and_output_experts_with_the_reports_load(switch_head):
    _, _, report = switch_head
    for layer, layer_report in enumerate(report["layers"]):
        graph = viz.routing_graph(report, layer)
        for side, letter, kind in (("value", "v", "value expert"), ("output", "o", "output expert")):
            section = layer_report["attention_experts"][side]
            for head in range(HEADS):
                nodes = [graph.nodes[f"h{head}.{letter}{e}"] for e in range(EXPERTS)]
                assert [node["kind"] for node in nodes] == [kind] * EXPERTS
                assert [node["load"] for node in nodes] == section["load"][head]
                assert [node["assignment_count"] for node in nodes] == section["assignment_count"][head]
                assert [node["head"] for node in nodes] == [head] * EXPERTS
                assert sum(node["load"] for node in nodes) == pytest.approx(1.0)
                assert [node["utilisation"] for node in nodes] == pytest.approx(
                    [EXPERTS * load for load in section["load"][head]])
                assert {node["head_load_cv"] for node in nodes} == {section["load_cv"][head]}
                # every choice a head makes, top-k of E per token
                assert sum(node["assignment_count"] for node in nodes) == 2 * layer_report["tokens"]
        assert graph.number_of_nodes() == HEADS + 2 * HEADS * EXPERTS


def test_attention_dispatch_edges_go_from_each_head_to_its_own_experts_only(switch_head):
    _, _, report = switch_head
    graph = viz.routing_graph(report, 1)
    dispatch = {(src, dst): load for src, dst, kind in graph.edges(data="kind") if kind == "attention dispatch"
                for load in [graph.edges[src, dst]["load"]]}
    expected = {(f"h{h}", f"h{h}.{side}{e}") for h in range(HEADS) for side in "vo" for e in range(EXPERTS)}
    assert set(dispatch) == expected and graph.number_of_edges() == len(expected)  # dense router: no flow edges
    for (src, dst), load in dispatch.items():
        assert load == graph.nodes[dst]["load"]


def test_gqa_value_experts_belong_to_the_kv_head_and_are_fed_by_its_query_group():
    _, _, report = model_and_report(**SWITCH, n_kv_heads=2)
    graph = viz.routing_graph(report, 0)
    values = report["layers"][0]["attention_experts"]["value"]
    for kv_head in range(2):
        for e in range(EXPERTS):
            node = f"kv{kv_head}.v{e}"
            assert graph.nodes[node]["kv_head"] == kv_head
            assert graph.nodes[node]["load"] == values["load"][kv_head][e]
            assert set(graph.predecessors(node)) == {f"h{2 * kv_head}", f"h{2 * kv_head + 1}"}
    assert not any(node.startswith("h") and ".v" in node for node in graph.nodes)
    for head in range(HEADS):  # the output side stays per query head
        assert {f"h{head}.o{e}" for e in range(EXPERTS)} <= set(graph.successors(f"h{head}"))


def test_each_sparse_head_is_a_node_holding_the_share_of_tokens_it_kept(mosa):
    model, batches, report = mosa
    kept = torch.zeros(TINY["n_layers"], SPARSE)
    with torch.no_grad():
        for ids in batches:
            for layer, record in enumerate(model(ids).routing):
                kept[layer] += record.sparse_heads.selected.reshape(-1, SPARSE).sum(0)
    for layer, layer_report in enumerate(report["layers"]):
        graph = viz.routing_graph(report, layer)
        assert set(graph.nodes) == {f"h{h}" for h in range(HEADS)} | {f"m{i}" for i in range(SPARSE)}
        tokens = layer_report["tokens"]
        assert tokens == 2 * 2 * 16
        for i in range(SPARSE):
            node = graph.nodes[f"m{i}"]
            assert node["kind"] == "sparse head"
            assert node["kept_share"] == layer_report["sparse_heads"]["kept_share"][i]
            assert node["kept_count"] == int(kept[layer, i])
            assert node["kept_share"] == pytest.approx(int(kept[layer, i]) / tokens)
            assert node["mean_score_kept"] == layer_report["sparse_heads"]["mean_score_kept"][i]
            assert 0 < node["mean_score_kept"] < 1
            assert graph.degree(f"m{i}") == 0


@pytest.mark.parametrize("which", ["switch_head", "mosa"])
def test_graphml_round_trips_the_new_nodes(which, request, tmp_path):
    _, _, report = request.getfixturevalue(which)
    path = viz.write_graphml(report, tmp_path / "graph.graphml")
    back = nx.read_graphml(path)
    want = viz.layered_routing_graph(report)
    assert set(back.nodes) == set(want.nodes) and set(back.edges) == set(want.edges)
    for node, data in want.nodes(data=True):
        assert back.nodes[node] == pytest.approx(data)
    for src, dst, data in want.edges(data=True):
        assert back.edges[src, dst] == pytest.approx(data)
    new_kind = "value expert" if which == "switch_head" else "sparse head"
    assert sum(kind == new_kind for _, kind in back.nodes(data="kind")) == \
        TINY["n_layers"] * (HEADS * EXPERTS if which == "switch_head" else SPARSE)


# ---------------------------------------------------------------------- drawing
def test_each_heads_experts_sit_outside_the_ring_nearest_their_head(switch_head):
    _, _, report = switch_head
    graph = viz.routing_graph(report, 0)
    positions = _layout(graph)
    heads = {f"h{h}": np.array(positions[f"h{h}"]) for h in range(HEADS)}
    experts = [node for node, kind in graph.nodes(data="kind") if kind.endswith("expert")]
    assert len(experts) == 2 * HEADS * EXPERTS
    for node, kind in graph.nodes(data="kind"):
        if kind.endswith("expert"):
            xy = np.array(positions[node])
            assert np.linalg.norm(xy) > 1.0  # outside the head ring
            nearest = min(heads, key=lambda head: np.linalg.norm(heads[head] - xy))
            assert nearest == node.split(".")[0]
            # value experts on the inner arc, output experts on the outer one
            assert np.linalg.norm(xy) == pytest.approx(1.45 if kind == "value expert" else 1.8)


def legend_labels(legend):
    return [text.get_text() for text in legend.get_texts()]


@pytest.mark.parametrize("which, new_kinds", [("switch_head", ["value expert", "output expert"]),
                                               ("mosa", ["sparse head"])])
def test_drawings_name_the_new_kinds_in_their_legends(which, new_kinds, request, tmp_path):
    _, _, report = request.getfixturevalue(which)
    figure = viz.draw_routing_graph(report, 0, path=tmp_path / "layer.png")
    assert legend_labels(figure.axes[0].get_legend()) == ["routed head", *new_kinds]
    grid = viz.draw_routing_graphs(report, path=tmp_path / "grid.png")
    assert legend_labels(grid.legends[0]) == ["routed head", *new_kinds]
    title = grid._suptitle.get_text().replace("\n", " ")
    assert ("share of the head's choices" if which == "switch_head" else "share of the tokens each keeps") in title
    image = mpimg.imread(tmp_path / "grid.png")[..., :3].reshape(-1, 3)
    assert np.unique(image, axis=0).shape[0] > 10  # not a blank canvas
    # every node is drawn: one marker per node of the layer, in the node's kind's colour
    ax = figure.axes[0]
    drawn = sum(len(collection.get_offsets()) for collection in ax.collections
                if type(collection).__name__ == "PathCollection")
    assert drawn == viz.routing_graph(report, 0).number_of_nodes()


# ---------------------------------------------------------------------- the HTML report
def test_html_report_draws_each_heads_experts_and_their_load_heatmaps(switch_head):
    model, _, report = switch_head
    page = viz.html_report(model, report)
    layers = TINY["n_layers"]
    assert page.count('class="node value-expert"') == layers * HEADS * EXPERTS
    assert page.count('class="node output-expert"') == layers * HEADS * EXPERTS
    load = report["layers"][1]["attention_experts"]["output"]["load"][2][3]
    count = report["layers"][1]["attention_experts"]["output"]["assignment_count"][2][3]
    assert html.escape(f"output expert 3 of head h2: {load:.1%} of its choices ({count})") in page
    assert html.escape("value experts: share of each head's choices") in page
    cell = html.escape(f"L1 h2, output expert 3: {load:.1%} of the head's choices ({count})", quote=True)
    assert f'data-tip="{cell}"' in page
    assert "SwitchHead with 4 value and output experts per head" in page


def test_html_report_draws_the_sparse_heads(mosa):
    model, _, report = mosa
    page = viz.html_report(model, report)
    assert page.count('class="node sparse-head"') == TINY["n_layers"] * SPARSE
    stats = report["layers"][0]["sparse_heads"]
    tip = (f"sparse head m1: keeps {stats['kept_share'][1]:.1%} of tokens ({stats['kept_count'][1]}), mean router "
           f"score {stats['mean_score_kept'][1]:.3f} on them")
    assert html.escape(tip, quote=True) in page
    assert "sparse heads: share of tokens kept" in page and "3 MoSA sparse heads" in page


# ---------------------------------------------------------------------- the commands on a checkpoint
@pytest.mark.parametrize("overrides, new_kind, per_layer", [(SWITCH, "output expert", HEADS * EXPERTS),
                                                            (MOSA, "sparse head", SPARSE)])
def test_viz_and_report_commands_draw_the_new_nodes(overrides, new_kind, per_layer, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GOHGRAPH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    GoHTransformer(GoHConfig(**{**TINY, "vocab_size": 256, **overrides})).save_pretrained(tmp_path / "model")
    data = tmp_path / "data.txt"
    data.write_text("".join(f"def f_{i}(x):\n    return x * {i}\n" for i in range(200)), encoding="utf-8")
    common = ["--checkpoint", tmp_path / "model", "--data", data, "--batches", 1, "--batch-size", 2,
              "--seq-len", 16, "--no-progress"]
    assert main([str(arg) for arg in ["viz", *common, "--out", tmp_path / "pictures"]]) == 0
    graph = nx.read_graphml(tmp_path / "pictures" / viz.GRAPHML)
    assert sum(kind == new_kind for _, kind in graph.nodes(data="kind")) == TINY["n_layers"] * per_layer
    stats = json.loads((tmp_path / "pictures" / "stats.json").read_text())
    section = "attention_experts" if overrides is SWITCH else "sparse_heads"
    assert all(section in layer for layer in stats["layers"])
    if overrides is MOSA:
        assert [graph.nodes[f"L0.m{i}"]["kept_share"] for i in range(SPARSE)] == \
            stats["layers"][0]["sparse_heads"]["kept_share"]
    assert (tmp_path / "pictures" / viz.ROUTING_GRAPHS).stat().st_size > 0
    out = tmp_path / "report.html"
    assert main([str(arg) for arg in ["report", *common, "--out", out]]) == 0
    page = out.read_text(encoding="utf-8")
    css_class = "output-expert" if overrides is SWITCH else "sparse-head"
    assert len(re.findall(f'class="node {css_class}"', page)) == TINY["n_layers"] * per_layer
    capsys.readouterr()
