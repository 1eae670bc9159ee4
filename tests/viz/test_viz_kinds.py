"""One routing graph and heatmap per attention kind: seq2seq and encoder statistics drawn per kind."""

import json

import matplotlib.image as mpimg
import networkx as nx
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, viz
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.analysis.stats.kinds import collect_routing_stats_by_kind

VOCAB = 40
KINDS = ("encoder", "decoder_self", "cross")


@pytest.fixture(scope="module")
def seq2seq_stats():
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=3, n_heads=4, n_shared_heads=1,
                    top_k_heads=2, router="graph", router_rounds=1, router_dim=8, head_graph="ring",
                    inter_head_flow=True, max_seq_len=32, model_type="seq2seq",
                    position_embedding="t5-relative", attention_scale="none", ffn="moe", n_experts=4,
                    top_k_experts=2)
    model = GoHSeq2Seq(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, VOCAB, (2, 5), generator=generator)
    labels[1, 3:] = -100
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    batch = {"input_ids": torch.randint(0, VOCAB, (2, 6), generator=generator), "attention_mask": mask,
             "labels": labels}
    return model, collect_routing_stats_by_kind(model, [batch], progress=False)


def test_one_routing_graph_figure_per_kind_titled_with_the_kind(seq2seq_stats):
    _, stats = seq2seq_stats
    report = stats.report()
    figures = viz.routing_graphs_by_kind(stats)
    assert list(figures) == list(KINDS)
    for kind, figure in figures.items():
        assert isinstance(figure, Figure)
        n_layers = len(report["kinds"][kind]["layers"])
        titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
        assert titles == [f"{viz.KIND_TITLES[kind]}: layer {layer}" for layer in range(n_layers)]
        assert figure.get_suptitle().startswith(f"{viz.KIND_TITLES[kind]}: routing graphs")


def test_each_kind_graph_holds_that_kinds_statistics(seq2seq_stats):
    _, stats = seq2seq_stats
    report = stats.report()
    for layer in range(3):
        graphs = viz.routing_graphs_of_layer(stats, layer)
        assert list(graphs) == ([*KINDS] if layer < 2 else ["decoder_self", "cross"])
        for kind, graph in graphs.items():
            kind_layer = report["kinds"][kind]["layers"][layer]
            heads = [node for node, node_kind in graph.nodes(data="kind") if node_kind.endswith("head")]
            assert len(heads) == 4
            assert [graph.nodes[f"h{h}"]["activation_frequency"] for h in range(4)] == \
                kind_layer["heads"]["activation_frequency"]
            flow_edges = [edge for edge in graph.edges(data="kind") if edge[2] == "flow"]
            assert len(flow_edges) == len(report["kinds"][kind]["head_edges"])
            experts = [node for node, node_kind in graph.nodes(data="kind") if node_kind == "expert"]
            assert len(experts) == (0 if kind == "cross" else report["kinds"][kind]["config"]["n_experts"]
                                    - report["kinds"][kind]["config"]["n_shared_experts"])


def test_heatmaps_per_kind_hold_each_kinds_frequencies(seq2seq_stats):
    _, stats = seq2seq_stats
    report = stats.report()
    heads = viz.head_heatmaps_by_kind(stats)
    experts = viz.expert_heatmaps_by_kind(stats)
    assert list(heads) == list(KINDS) and list(experts) == ["encoder", "decoder_self"]
    for kind, figure in heads.items():
        ax = figure.axes[0]
        assert ax.get_title().startswith(f"{viz.KIND_TITLES[kind]}: head activation frequency")
        expected = np.array([layer["heads"]["activation_frequency"] for layer in report["kinds"][kind]["layers"]])
        np.testing.assert_allclose(ax.images[0].get_array(), expected)
    for kind, figure in experts.items():
        assert figure.axes[0].get_title().startswith(f"{viz.KIND_TITLES[kind]}: routed-expert utilisation")


def test_write_all_pictures_writes_each_kind_and_reads_back_from_json(seq2seq_stats, tmp_path):
    model, stats = seq2seq_stats
    written = viz.write_all_pictures(model, stats, tmp_path, text="ignored for seq2seq")
    names = {path.name for path in written}
    for kind in KINDS:
        for name in ("routing_graphs.png", "head_load_heatmap.png", "routing_graph.graphml", "cross_layer.png"):
            assert viz.kind_file(name, kind) in names
    assert ("expert_load_heatmap_cross.png" in names) is False
    assert {"expert_load_heatmap_encoder.png", "expert_load_heatmap_decoder_self.png"} <= names
    assert "token_trace.png" not in names and "routing_graphs.png" not in names
    assert names <= set(viz.PICTURE_FILES)
    image = mpimg.imread(tmp_path / "routing_graphs_cross.png")
    assert image.ndim == 3 and image.shape[0] > 100 and float(image.std()) > 0
    graph = nx.read_graphml(tmp_path / "routing_graph_decoder_self.graphml")
    cfg = model.config  # decoder layers x (heads + sub-token slots + routed experts)
    assert graph.number_of_nodes() == 3 * (cfg.n_heads + cfg.n_subtokens + cfg.n_routed_experts)
    # a report read back from JSON draws the same per-kind graphs
    report = json.loads(stats.to_json(tmp_path / "stats.json").read_text())
    for kind in KINDS:
        assert nx.utils.graphs_equal(viz.routing_graphs_of_layer(report, 1)[kind],
                                     viz.routing_graphs_of_layer(stats, 1)[kind])


def test_encoder_statistics_are_drawn_titled_encoder(tmp_path):
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", max_seq_len=32, model_type="encoder", position_embedding="sinusoidal")
    model = GoHEncoder(cfg).eval()
    stats = collect_routing_stats(model, [torch.randint(0, VOCAB, (2, 6))], progress=False)
    assert list(viz.kind_reports(stats)) == ["encoder"]
    figure = viz.routing_graphs_by_kind(stats)["encoder"]
    assert [ax.get_title() for ax in figure.axes if ax.get_title()] == \
        ["encoder self-attention: layer 0", "encoder self-attention: layer 1"]
    names = {path.name for path in viz.write_all_pictures(model, stats, tmp_path)}
    assert {"routing_graphs.png", "head_load_heatmap.png", "routing_graph.graphml"} <= names


def test_a_kinds_report_passed_to_a_single_report_picture_says_what_to_do(seq2seq_stats):
    _, stats = seq2seq_stats
    with pytest.raises(ValueError, match="per attention kind"):
        viz.draw_routing_graphs(stats.report())
    with pytest.raises(ValueError, match="not an attention kind"):
        viz.head_load_heatmap(stats.report()["kinds"]["cross"], kind="crossed")


@pytest.mark.parametrize("bpe", [False, True])
def test_token_labels_name_the_special_ids_after_the_tokenizers_vocabulary(bpe):
    """The objectives put their special tokens after the tokenizer's ids: bytes refuse to decode
    them, a BPE decodes them to nothing; either way the hover label names them."""
    from types import SimpleNamespace

    from gohgraph.data.objectives import SpecialTokens
    from gohgraph.data.tokenizers import BPETokenizer, ByteTokenizer
    from gohgraph.viz.html_report import _token_labeller

    tokenizer = BPETokenizer.train(["def add(x, y):\n    return x + y\n"] * 20, 270) if bpe else ByteTokenizer()
    special = SpecialTokens(tokenizer.vocab_size, with_eos=True)
    cfg = GoHConfig(vocab_size=special.vocab_size, model_type="seq2seq", d_model=32, n_heads=4, n_shared_heads=1,
                    top_k_heads=2, router_dim=8)
    label = _token_labeller(SimpleNamespace(config=cfg), tokenizer.decode)
    assert [label(special.mask), label(special.cls), label(special.pad), label(special.eos)] == \
        ["[MASK]", "[CLS]", "[PAD]", "[EOS]"]
    first = tokenizer.encode("return")[0]
    assert label(first) == tokenizer.decode([first]) and label(first) != "\u00b7"
    assert (len(tokenizer.encode("return")) < 6) == bpe  # a BPE merges it
