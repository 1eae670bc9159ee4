"""Pictures are real images, and the routing graph carries exactly the statistics it should."""

import math
from xml.etree import ElementTree

import matplotlib.image as mpimg
import networkx as nx
import numpy as np
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer, viz
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.graph import expert_graph, head_graph
from gohgraph.viz.token_trace import token_labels

GRAPH_MOE_CFG = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                          router="graph", router_rounds=1, head_graph="ring", ffn="mh-moe", n_experts=5,
                          n_shared_experts=1, n_subtokens=2, top_k_experts=2)
DENSE_CFG = GoHConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, router="dense")


@pytest.fixture(scope="module")
def moe_model_and_stats():
    torch.manual_seed(0)
    model = GoHTransformer(GRAPH_MOE_CFG)
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, collect_routing_stats(model, batches, progress=False)


def assert_real_png(path, figure):
    image = mpimg.imread(path)
    width, height = figure.get_size_inches() * figure.dpi
    assert image.shape[:2] == (round(height), round(width))
    pixels = image[..., :3].reshape(-1, 3)
    assert np.unique(pixels, axis=0).shape[0] > 10  # not a blank, single-colour canvas


# ---------------------------------------------------------------------- the networkx graph
def test_routing_graph_has_the_head_graph_and_expert_edges_with_statistics(moe_model_and_stats):
    _, stats = moe_model_and_stats
    report = stats.report()
    for layer in range(GRAPH_MOE_CFG.n_layers):
        graph = viz.routing_graph(stats, layer)
        heads = {f"h{i}" for i in range(4)}
        subtokens, experts = {"s0", "s1"}, {f"e{i}" for i in range(4)}
        assert set(graph.nodes) == heads | subtokens | experts
        expected_head_edges = {(f"h{s}", f"h{d}") for s, d in head_graph("ring", 4).t().tolist()}
        expected_dispatch = {(f"s{s}", f"e{e}") for s, e in expert_graph(None, 2, 4).t().tolist()}
        assert set(graph.edges) == expected_head_edges | expected_dispatch
        assert len(expected_dispatch) == 2 * 4

        layer_report = report["layers"][layer]
        for head in range(4):
            node = graph.nodes[f"h{head}"]
            assert node["kind"] == ("shared head" if head == 0 else "routed head")
            assert node["activation_frequency"] == layer_report["heads"]["activation_frequency"][head]
            assert node["mean_gate"] == layer_report["heads"]["mean_gate"][head]
        for index, (src, dst) in enumerate(report["head_edges"]):
            edge = graph.edges[f"h{src}", f"h{dst}"]
            assert edge["mean_flow"] == layer_report["flow"]["mean_flow"][index]
            assert edge["coactivation"] == layer_report["heads"]["coactivation"][src][dst]
        for expert in range(4):
            assert graph.nodes[f"e{expert}"]["load"] == layer_report["experts"]["load"][expert]
            for slot in range(2):
                assert graph.edges[f"s{slot}", f"e{expert}"]["load"] == \
                    layer_report["experts"]["subtoken_load"][slot][expert]
        assert sum(graph.nodes[e]["load"] for e in experts) == pytest.approx(1.0)


def test_dense_router_graph_has_heads_only_and_no_edges():
    model = GoHTransformer(DENSE_CFG)
    stats = collect_routing_stats(model, [torch.randint(0, 256, (1, 8))], progress=False)
    graph = viz.routing_graph(stats, 2)
    assert set(graph.nodes) == {"h0", "h1", "h2", "h3"} and graph.number_of_edges() == 0
    assert all(data["activation_frequency"] == 1.0 for _, data in graph.nodes(data=True))
    with pytest.raises(ValueError, match="layer=3"):
        viz.routing_graph(stats, 3)
    with pytest.raises(ValueError, match="no experts"):
        viz.expert_load_heatmap(stats)


def test_graphml_reads_back_to_the_same_graph(moe_model_and_stats, tmp_path):
    _, stats = moe_model_and_stats
    path = viz.write_graphml(stats, tmp_path / "routing.graphml")
    read_back = nx.read_graphml(path)
    expected = viz.layered_routing_graph(stats)
    assert dict(read_back.nodes(data=True)) == dict(expected.nodes(data=True))
    assert {(s, d): data for s, d, data in read_back.edges(data=True)} == \
        {(s, d): data for s, d, data in expected.edges(data=True)}
    layer1 = viz.routing_graph(stats, 1)
    assert read_back.nodes["L1.h2"] == layer1.nodes["h2"]
    assert read_back.number_of_nodes() == 2 * layer1.number_of_nodes()


def test_stats_report_read_from_json_draws_the_same_graph(moe_model_and_stats, tmp_path):
    _, stats = moe_model_and_stats
    import json

    report = json.loads(stats.to_json(tmp_path / "stats.json").read_text())
    assert nx.utils.graphs_equal(viz.routing_graph(report, 0), viz.routing_graph(stats, 0))


# ---------------------------------------------------------------------- pictures
@pytest.mark.parametrize("draw", ["routing_graphs", "routing_graph", "head_heatmap", "expert_heatmap"])
def test_each_statistics_picture_is_a_real_png(moe_model_and_stats, tmp_path, draw):
    _, stats = moe_model_and_stats
    path = tmp_path / f"{draw}.png"
    figure = {
        "routing_graphs": lambda: viz.draw_routing_graphs(stats, path=path),
        "routing_graph": lambda: viz.draw_routing_graph(stats, 1, path=path),
        "head_heatmap": lambda: viz.head_load_heatmap(stats, path=path),
        "expert_heatmap": lambda: viz.expert_load_heatmap(stats, path=path),
    }[draw]()
    assert_real_png(path, figure)


def test_heatmap_cells_hold_the_statistics(moe_model_and_stats):
    _, stats = moe_model_and_stats
    report = stats.report()
    image = viz.expert_load_heatmap(stats).axes[0].images[0]
    expected = [layer["experts"]["utilisation"] for layer in report["layers"]]
    np.testing.assert_allclose(np.asarray(image.get_array()), expected)
    image = viz.head_load_heatmap(stats).axes[0].images[0]
    expected = [layer["heads"]["activation_frequency"] for layer in report["layers"]]
    np.testing.assert_allclose(np.asarray(image.get_array()), expected)


def test_token_labels_show_control_characters_as_their_pictures():
    """Byte tokens hold control characters, most of them not allowed in XML (an SVG, the report's
    hover text): every one is shown as its Unicode control picture, whitespace as before."""
    text = "a\x0b\x0c\x00\x7fb \n"
    labels = token_labels(list(range(len(text))), lambda ids: "".join(text[i] for i in ids))
    assert labels == ["a", "\u240b", "\u240c", "\u2400", "\u2421", "b", "\u2423", "\u21b5"]
    ElementTree.fromstring(f"<text>{''.join(labels)}</text>")  # parses: nothing raw is left


def test_token_trace_is_a_png_with_the_characters_on_the_axis(moe_model_and_stats, tmp_path):
    model, _ = moe_model_and_stats
    figure = viz.token_trace(model, "ab c\n", path=tmp_path / "trace.png")
    assert_real_png(tmp_path / "trace.png", figure)
    bottom_panel = figure.axes[2 * GRAPH_MOE_CFG.n_layers - 1]  # heads + experts panel per layer
    labels = [tick.get_text() for tick in bottom_panel.get_xticklabels()]
    assert labels == ["a", "b", "\u2423", "c", "\u21b5"]
    svg = tmp_path / "trace.svg"
    viz.save_figure(figure, svg)
    assert svg.read_text().lstrip().startswith("<?xml")


def test_token_routing_equals_the_model_records(moe_model_and_stats):
    model, _ = moe_model_and_stats
    ids = torch.tensor([5, 70, 200, 3, 9])
    traces = viz.token_routing(model, ids)
    with torch.no_grad():
        routing = model.eval()(ids[None]).routing
    for trace, record in zip(traces, routing):
        np.testing.assert_allclose(trace["head_gates"], record.head_gates[0].numpy())
        expected = np.zeros((5, GRAPH_MOE_CFG.n_routed_experts))
        for token in range(5):
            for slot in range(2):
                for choice in range(2):
                    expert = int(record.expert_indices[0, token, slot, choice])
                    expected[token, expert] += float(record.expert_weights[0, token, slot, choice]) / 2
        np.testing.assert_allclose(trace["expert_weight"], expected, rtol=1e-6)
        np.testing.assert_allclose(trace["expert_weight"].sum(1), 1.0, rtol=1e-6)


def test_token_labels_show_multibyte_characters_on_their_last_byte():
    assert viz.token_labels(viz.byte_encode("é\tx"), viz.byte_decode) == ["\u00b7", "é", "\u21e5", "x"]


def test_token_trace_rejects_ids_outside_the_vocabulary():
    model = GoHTransformer(DENSE_CFG.replace(vocab_size=64))
    with pytest.raises(ValueError, match="vocab_size=64"):
        viz.token_trace(model, "z")  # 'z' is byte 122


def test_training_curves_tolerate_missing_columns_and_empty_cells(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,loss,val_loss,head_load_cv,note\n"
                        "0,5.0,,0.5,warmup\n10,4.0,4.5,,x\n20,3.0,,0.25,y\n", encoding="utf-8")
    columns = viz.read_metrics_csv(csv_path)
    assert columns["loss"] == [5.0, 4.0, 3.0] and math.isnan(columns["val_loss"][0])
    figure = viz.training_curves(csv_path, path=tmp_path / "curves.png")
    assert_real_png(tmp_path / "curves.png", figure)
    lines = {line.get_label(): line for ax in figure.axes for line in ax.get_lines()}
    assert set(lines) == {"loss", "val_loss", "head_load_cv"}  # 'note' is not numeric
    assert list(lines["val_loss"].get_xdata()) == [10.0] and list(lines["val_loss"].get_ydata()) == [4.5]
    assert list(lines["head_load_cv"].get_xdata()) == [0.0, 20.0]


def test_training_curves_reject_a_csv_without_curves(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("step,note\n1,a\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no numeric column"):
        viz.training_curves(csv_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        viz.training_curves(tmp_path / "missing.csv")


def test_write_all_pictures_writes_every_file(moe_model_and_stats, tmp_path):
    model, stats = moe_model_and_stats
    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss,aux_loss\n0,5.5,0.1\n1,5.0,0.09\n", encoding="utf-8")
    paths = viz.write_all_pictures(model, stats, tmp_path / "pictures", text="def f(x):", metrics_csv=metrics)
    names = sorted(path.name for path in paths)
    assert names == ["cross_layer.png", "expert_coactivation.png", "expert_load_heatmap.png", "head_coactivation.png",
                     "head_load_heatmap.png", "load_percentiles.png", "routing_graph.graphml", "routing_graphs.png",
                     "token_trace.png", "training_curves.png"]
    for path in paths:
        assert path.is_file() and path.parent == tmp_path / "pictures"
        if path.suffix == ".png":
            assert np.unique(mpimg.imread(path)[..., :3].reshape(-1, 3), axis=0).shape[0] > 10
    without_extras = viz.write_all_pictures(GoHTransformer(DENSE_CFG), collect_routing_stats(
        GoHTransformer(DENSE_CFG), [torch.randint(0, 256, (1, 4))], progress=False), tmp_path / "dense")
    assert sorted(p.name for p in without_extras) == ["cross_layer.png", "head_coactivation.png",
                                                       "head_load_heatmap.png", "load_percentiles.png", "routing_graph.graphml",
                                                       "routing_graphs.png"]


def test_token_trace_of_a_recursion_model_has_a_depth_row_and_blanks_skipped_tokens(tmp_path):
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, recursion="mor",
                    max_recursions=2, recursion_router="token-choice", router="linear", top_k_heads=2)
    model = GoHTransformer(cfg).eval()
    with torch.no_grad():
        model.recursion.router.proj.weight.mul_(300.0)
    text = "def f(x): return x"
    ids = torch.tensor(list(text.encode()))
    layers = viz.token_routing(model, ids)
    with torch.no_grad():
        out = model(ids[None])
    depth = out.recursion.depth[0].numpy()
    assert [layer["label"] for layer in layers] == ["B0 R0", "B1 R0", "B0 R1", "B1 R1"]
    assert (layers[0]["depth"] == depth).all() and 1 in depth and 2 in depth
    skipped = depth < 2
    for layer, record in zip(layers, out.routing):
        gates = record.head_gates[0].numpy()
        if layer["label"].endswith("R1"):
            assert (layer["head_gates"][skipped] == 0).all()
            assert np.allclose(layer["head_gates"][~skipped], gates[~skipped])
        else:
            assert np.allclose(layer["head_gates"], gates)
    figure = viz.token_trace(model, text, path=tmp_path / "trace.png")
    assert len(figure.axes[0].images) == 1 and figure.axes[0].images[0].get_array().shape == (1, len(ids))
    assert np.array_equal(figure.axes[0].images[0].get_array().data[0], depth)
    assert mpimg.imread(tmp_path / "trace.png").std() > 0
