"""The new figures and the fixed ones: titles, labels and scales a reader needs, and no silent cut."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer, viz
from gohgraph.analysis.stats.collect import collect_routing_stats, collect_routing_stats_by_source

MOE = GoHConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, n_shared_heads=1, top_k_heads=2, router="graph",
                router_rounds=1, ffn="moe", n_experts=4, top_k_experts=2)
HEADS_ONLY = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                       router="graph", router_rounds=1)


@pytest.fixture(scope="module")
def moe_stats():
    torch.manual_seed(0)
    model = GoHTransformer(MOE)
    g = torch.Generator().manual_seed(0)
    batches = {"code": [torch.randint(32, 128, (2, 16), generator=g)],
               "bytes": [torch.randint(0, 256, (2, 16), generator=g)]}
    return model, collect_routing_stats_by_source(model, batches, progress=False)


def texts(figure):
    return [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]


def test_specialisation_heatmap_has_a_panel_per_layer_with_labels(moe_stats, tmp_path):
    _, stats = moe_stats
    figure = viz.specialisation_heatmap(stats, path=tmp_path / "s.png")
    panels = [ax for ax in figure.axes if ax.get_title().startswith("layer")]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1", "layer 2"]
    assert all(ax.get_xlabel() == "routed expert" and ax.get_ylabel() == "source" for ax in panels)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["code", "bytes"]
    assert "expert specialisation by source" in figure._suptitle.get_text()
    assert "specialisation (1 = no preference)" in [ax.get_ylabel() for ax in figure.axes]
    heads = viz.specialisation_heatmap(stats, kind="heads")
    assert [t.get_text() for t in heads.axes[0].get_xticklabels()] == ["h0", "h1", "h2", "h3"]
    with pytest.raises(ValueError, match="not collected by source"):
        viz.specialisation_heatmap(collect_routing_stats(moe_stats[0], [torch.zeros(1, 4, dtype=torch.long)],
                                                         progress=False))


def test_cross_layer_and_percentile_figures(moe_stats):
    _, stats = moe_stats
    figure = viz.cross_layer_heatmaps(stats)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0].startswith("layer 0 \u2192 1\ntop successor") and titles[1].startswith("layer 1 \u2192 2")
    assert figure.axes[0].get_xlabel() == "layer 1" and figure.axes[0].get_ylabel() == "layer 0"
    assert "P(expert in next layer | expert in this layer)" in [ax.get_ylabel() for ax in figure.axes]
    figure = viz.load_percentiles_figure(stats)
    assert [ax.get_title() for ax in figure.axes] == ["tokens per routed expert (assignments)",
                                                      "activations per routed head"]
    assert figure.axes[0].get_xlabel() == "layer"


def test_one_shared_head_is_titled_as_one_and_arrows_have_a_scale(moe_stats):
    _, stats = moe_stats
    assert viz.head_load_heatmap(stats).axes[0].get_title() == \
        "head activation frequency (head 0 shared, always on)"
    graph_texts = texts(viz.draw_routing_graphs(stats))
    assert sum(t.startswith("widest arrow: mean effective flow ") for t in graph_texts) == MOE.n_layers


def test_token_trace_labels_its_colour_bars_and_names_experts_only_when_there_are_some(moe_stats):
    model, _ = moe_stats
    figure = viz.token_trace(model, "ab c")
    labels = [ax.get_ylabel() for ax in figure.axes]
    assert labels.count("head gate") == MOE.n_layers and labels.count("expert weight") == MOE.n_layers
    assert "expert" in figure._suptitle.get_text()
    torch.manual_seed(0)
    dense = viz.token_trace(GoHTransformer(HEADS_ONLY), "ab")
    assert dense._suptitle.get_text() == "token trace: head gates per token (white = inactive head)"
    width, _ = dense.get_size_inches()
    assert width >= 7.0  # the title fits even for two tokens


def test_a_long_text_is_drawn_whole_or_refused(moe_stats):
    model, _ = moe_stats
    figure = viz.token_trace(model, "x" * 64)
    assert max(len(ax.get_xticks()) for ax in figure.axes) == 64  # every token has its column
    with pytest.raises(ValueError, match="this text is 1000 tokens; at most 64 fit"):
        viz.token_trace(model, "y" * 1000)


def test_bpe_pieces_are_drawn_whole():
    pieces = {1: "def", 2: " return", 3: "_value"}
    decode = lambda ids: "".join(pieces[int(i)] for i in ids)  # noqa: E731
    assert viz.token_labels([1, 2, 3], decode) == ["def", "\u2423return", "_value"]
    torch.manual_seed(0)
    figure = viz.token_trace(GoHTransformer(HEADS_ONLY), "", encode=lambda _: [1, 2, 3], decode=decode)
    shown = [[t.get_text() for t in ax.get_xticklabels()] for ax in figure.axes]
    assert ["def", "\u2423return", "_value"] in shown


def inside_figure(figure, text):
    """``text`` (drawn) lies within the figure's width: a centred title wider than that is cut at both edges."""
    renderer = figure.canvas.get_renderer()
    box = text.get_window_extent(renderer)
    return box.x0 >= 0 and box.x1 <= figure.bbox.width


def test_the_default_models_routing_graphs_subtitle_is_wrapped_inside_the_figure(tmp_path):
    # HEADS_ONLY has the default preset's shape (2 layers, graph router, no experts): the narrowest
    # routing-graph figure, whose one-line explanation of the arrows used to run past both edges
    torch.manual_seed(0)
    stats = collect_routing_stats(GoHTransformer(HEADS_ONLY), [torch.randint(0, 256, (2, 16))], progress=False)
    figure = viz.draw_routing_graphs(stats, path=tmp_path / "g.png")
    title = figure.get_suptitle()
    assert title.startswith("routing graphs: graph router") and "mean effective flow" in title
    assert inside_figure(figure, figure._suptitle)


@pytest.mark.parametrize("width", [2.0, 4.0, 8.0])
def test_fitted_suptitle_wraps_only_what_does_not_fit(width):
    from gohgraph.viz.figures import fitted_suptitle, new_figure

    figure = new_figure(width, 2.0)
    words = "routing graphs: size = activation frequency, arrow width = mean effective flow of the widest arrow"
    title = fitted_suptitle(figure, f"short\n{words}", fontsize=9)
    lines = title.get_text().split("\n")
    assert lines[0] == "short" and " ".join(lines[1:]) == words  # only spaces became line breaks
    assert (len(lines) > 2) == (width < 8.0)  # the 8-inch figure holds the long line whole
    assert inside_figure(figure, title)
    assert fitted_suptitle(figure, "a b", fontsize=9).get_text() == "a b"


def test_coactivation_heatmaps_draw_p_b_given_a_per_layer(moe_stats, tmp_path):
    import numpy as np

    _, stats = moe_stats
    report = stats.report()
    figure = viz.coactivation_heatmaps(report, "experts", path=tmp_path / "c.png")
    panels = [ax for ax in figure.axes if ax.get_title().startswith("layer")]
    assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1", "layer 2"]
    for ax, layer in zip(panels, report["layers"]):
        drawn = ax.images[0].get_array()
        np.testing.assert_allclose(drawn.filled(np.nan), np.array(layer["experts"]["coactivation_given"], dtype=float))
    assert "P(b | a) per sub-token decision" in figure._suptitle.get_text()
    assert (tmp_path / "c.png").stat().st_size > 0
    one = viz.coactivation_heatmaps(report, "heads", layer=1)
    assert [ax.get_title() for ax in one.axes if ax.get_title()] == ["layer 1"]
    assert [t.get_text() for t in one.axes[0].get_xticklabels()] == ["h0", "h1", "h2", "h3"]
    with pytest.raises(ValueError, match="layer=5 is not one of"):
        viz.coactivation_heatmaps(report, "heads", layer=5)
    with pytest.raises(ValueError, match="kind='units'"):
        viz.coactivation_heatmaps(report, "units")


def test_saturation_figure_draws_a_line_per_layer_against_the_step():
    saturation = {"tokens": 48, "checkpoints": [
        {"step": 20, "heads": 1.0, "experts": None, "layers": [{"layer": 0, "heads": 1.0, "experts": None},
                                                               {"layer": 1, "heads": 1.0, "experts": None}]},
        {"step": 10, "heads": 0.7, "experts": None, "layers": [{"layer": 0, "heads": 0.9, "experts": None},
                                                               {"layer": 1, "heads": 0.5, "experts": None}]}]}
    figure = viz.saturation_figure(saturation)
    (ax,) = figure.axes  # heads only: no experts panel
    assert ax.get_title() == "heads" and ax.get_xlabel() == "checkpoint step"
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {"layer 0": ([10, 20], [0.9, 1.0]), "layer 1": ([10, 20], [0.5, 1.0])}
    assert "router saturation over 2 checkpoints" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="at least one checkpoint"):
        viz.saturation_figure({"checkpoints": []})
