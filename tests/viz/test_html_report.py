"""The HTML report in a real headless Chromium: no console error, no network, hover shows the routing record.

Chromium is Debian's ``chromium`` package (``.ci/run`` installs it); it is driven over the DevTools
protocol by the ``playwright`` package (the ``test`` extra) launched with ``executable_path``, so
no browser download is needed. Without either the browser tests skip, saying why, except under CI
(the ``CI`` environment variable set, as ``.ci/run`` and CI services set it): there they fail.
"""

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer, viz
from gohgraph.analysis.stats.collect import collect_routing_stats_by_source
from gohgraph.cli.main import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CFG = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2, router="graph",
                router_rounds=1, ffn="mh-moe", n_experts=5, n_shared_experts=1, n_subtokens=2, top_k_experts=2)
TEXT = "def add(x, y):\n    return x + y  # é"


@pytest.fixture(scope="module")
def model_and_stats():
    torch.manual_seed(0)
    model = GoHTransformer(CFG)
    g = torch.Generator().manual_seed(0)
    batches = {"code": [torch.randint(32, 128, (2, 24), generator=g)],
               "noise": [torch.randint(0, 256, (2, 24), generator=g)]}
    return model, collect_routing_stats_by_source(model, batches, progress=False)


@pytest.fixture
def metrics_csv(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = ["step,loss,val_loss,val_loss/code,val_loss/noise,head_load_cv"]
    rows += [f"{s},{5 - 0.1 * s},{'' if s % 2 else 5 - 0.09 * s},{'' if s % 2 else 4 - 0.1 * s},"
             f"{'' if s % 2 else 5.5 - 0.01 * s},{0.3 - 0.01 * s}" for s in range(1, 11)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_report_is_one_file_with_everything_inline(model_and_stats, metrics_csv, tmp_path):
    model, stats = model_and_stats
    page = viz.html_report(model, stats, text=TEXT, metrics_csv=metrics_csv)
    assert page.startswith("<!DOCTYPE html>") and page.count("<script") == 2  # the data and the code
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)  # nothing to fetch
    assert "@import" not in page and not re.search(r"url\((?!#)", page)  # only fragment refs (SVG clip paths)
    for section in ("Training curves", "Routing graph per layer", "Load heatmaps", "Across layers",
                    "Specialisation by source", "Routing of each token"):
        assert f"<h2>{section}</h2>" in page
    assert page.count('class="routing-graph"') == CFG.n_layers
    assert page.count('class="token"') == len(TEXT.encode())


def test_report_draws_within_layer_coactivation_and_vocabulary_specialisation(model_and_stats):
    model, stats = model_and_stats
    report = stats.report()
    page = viz.html_report(model, stats, text=TEXT)
    assert "<h2>Co-activation within each layer</h2>" in page and "<h2>Vocabulary specialisation</h2>" in page
    given = report["layers"][0]["heads"]["coactivation_given"]
    a, b = next((a, b) for a, row in enumerate(given) for b, value in enumerate(row) if value is not None and a != b)
    assert f"layer 0: P(h{b} | h{a}) = {given[a][b]:.3f}" in page  # the hover text carries the report's number
    expert_given = report["layers"][0]["experts"]["coactivation_given"]
    assert page.count("P(b | a)</text>") == 2 * CFG.n_layers and len(expert_given) == len(expert_given[0]) > 1
    units = report["vocabulary"]["layers"][0]["heads"]["input"]["units"]
    assert all(f"<td>0</td><td>h{unit}</td>" in page for unit in units)


def test_a_long_text_is_refused_with_a_message(model_and_stats):
    model, stats = model_and_stats
    with pytest.raises(ValueError, match="encodes to 600 tokens; its text box shows at most"):
        viz.html_report(model, stats, text="x" * 600)


def launch_chromium(playwright, user_data_dir):
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1300, "height": 900})


def no_browser(reason: str):
    """Skip on a developer's machine; fail under CI, which must run the browser tests."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI (the CI environment variable is set) must run the browser tests",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def browser_context(tmp_path):
    if not CHROMIUM.is_file():
        no_browser(f"no browser: {CHROMIUM} is missing (.ci/run installs Debian's chromium with apt-get)")
    try:
        from playwright import sync_api
    except ImportError:
        no_browser("no browser driver: the playwright package (test extra) is missing")
    with sync_api.sync_playwright() as playwright:
        context = launch_chromium(playwright, tmp_path / "profile")
        try:
            yield context
        finally:
            context.close()


def test_report_in_chromium_hover_shows_the_routing_record(model_and_stats, metrics_csv, tmp_path, browser_context):
    model, stats = model_and_stats
    path = viz.write_html_report(tmp_path / "report.html", model, stats, text=TEXT, metrics_csv=metrics_csv)
    page = browser_context.new_page()
    errors, requests = [], []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: requests.append(request.url))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")

    ids = torch.tensor([list(TEXT.encode())])
    with torch.no_grad():
        routing = model.eval()(ids).routing
    for index in (0, 5, len(TEXT.encode()) - 1):
        page.hover(f'#text-box .token[data-index="{index}"]')
        heads_text = page.inner_text('#token-detail tr[data-layer="0"] td.heads')
        shown = {int(h): float(g) for h, g in re.findall(r"h(\d+) ([\d.]+)", heads_text)}
        gates = routing[0].head_gates[0, index]
        assert set(shown) == {h for h in range(CFG.n_heads) if gates[h] > 0}
        for head, gate in shown.items():
            assert gate == pytest.approx(float(gates[head]), abs=5e-4)
        experts_text = page.inner_text('#token-detail tr[data-layer="1"] td.experts')
        chosen = {int(e) for e in re.findall(r"e(\d+)", experts_text)}
        assert chosen == set(routing[1].expert_indices[0, index].flatten().tolist())

    page.hover(".routing-graph .node.head >> nth=1")
    assert "active for" in page.inner_text("#tooltip") and page.is_visible("#tooltip")
    page.locator(".routing-graph .edge").first.dispatch_event("mouseover", {"bubbles": True})  # a thin curve
    assert "mean flow" in page.inner_text("#tooltip")

    screenshot = page.screenshot(full_page=True)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(io.BytesIO(screenshot), format="png")[..., :3].reshape(-1, 3)
    assert np.unique((pixels * 255).astype(np.uint8), axis=0).shape[0] > 50  # not a blank page
    assert pixels.mean() < 0.995
    assert errors == []
    assert all(url.startswith(("file://", "data:")) for url in requests), requests
    assert requests[0] == path.resolve().as_uri()


@pytest.mark.slow
def test_report_command_on_a_run(tmp_path, capsys):
    torch.manual_seed(0)
    GoHTransformer(CFG).save_pretrained(tmp_path / "model")
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return x\n" * 200)
    prose = tmp_path / "prose.txt"
    prose.write_text("A cat sat on the mat. " * 200)
    out = tmp_path / "report.html"
    argv = ["report", "--checkpoint", str(tmp_path / "model"), "--out", str(out), "--data", f"code={code}",
            "--data", f"prose={prose}", "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    assert main(argv) == 0
    page = out.read_text()
    assert "Specialisation by source" in page and "layer 0: experts by source" in page
    assert main(argv) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--text", "y" * 40]) == 0
    assert main(["report", "--checkpoint", str(tmp_path / "model"), "--out", str(tmp_path / "r.txt")]) == 1
    assert "must end in .html" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "model")


SEQ2SEQ_SOURCE, SEQ2SEQ_TARGET = list(b"reverse abc"), list(b"cba") + [259]


@pytest.fixture(scope="module")
def seq2seq_model_and_stats():
    from gohgraph import GoHSeq2Seq
    from gohgraph.analysis.stats.kinds import collect_routing_stats_by_kind

    torch.manual_seed(0)
    # an objective's byte model: 256 bytes, then [MASK] 256, [CLS] 257, [PAD] 258, [EOS] 259
    cfg = GoHConfig(vocab_size=260, d_model=32, n_layers=2, n_decoder_layers=3, n_heads=4, n_shared_heads=1,
                    top_k_heads=2, router="graph", router_rounds=1, router_dim=8, max_seq_len=32,
                    model_type="seq2seq", pad_token_id=258, decoder_start_token_id=258, ffn="moe", n_experts=4,
                    top_k_experts=2)
    model = GoHSeq2Seq(cfg).eval()
    batch = {"input_ids": torch.tensor([SEQ2SEQ_SOURCE]),
             "attention_mask": torch.ones(1, len(SEQ2SEQ_SOURCE), dtype=torch.long),
             "labels": torch.tensor([SEQ2SEQ_TARGET])}
    return model, collect_routing_stats_by_kind(model, [batch], progress=False)


def test_a_seq2seq_report_has_the_routing_sections_of_each_attention_kind(seq2seq_model_and_stats):
    model, stats = seq2seq_model_and_stats
    source, target = SEQ2SEQ_SOURCE, SEQ2SEQ_TARGET
    page = viz.html_report(model, stats, text="reverse abc")

    for kind in ("encoder self-attention", "decoder self-attention", "cross-attention"):
        for section in ("Routing graph per layer", "Load heatmaps"):
            assert f"<h2>{section} ({kind})</h2>" in page
    assert page.count('class="routing-graph"') == 2 + 3 + 3  # encoder layers + decoder layers x 2 kinds
    assert f"Statistics over {len(source)} source and {len(target)} target tokens" in page
    assert "[PAD]" in page  # the decoder's start token, among decoder self-attention's top tokens
    # the text box shows the encoder's routing of the text as a source
    data = json.loads(re.search(r'id="report-data">(.*?)</script>', page).group(1).replace("<\\/", "</"))
    assert [token["id"] for token in data["tokens"]] == source
    with torch.no_grad():
        encoder_routing = model.encode(torch.tensor([source]))[1]
    for t, token in enumerate(data["tokens"]):
        gates = encoder_routing[1].head_gates[0, t]
        assert {h for h, _ in token["layers"][1]["heads"]} == {h for h in range(4) if gates[h] > 0}


def test_seq2seq_report_in_chromium_hover_shows_the_encoder_routing(seq2seq_model_and_stats, tmp_path,
                                                                     browser_context):
    model, stats = seq2seq_model_and_stats
    path = viz.write_html_report(tmp_path / "report.html", model, stats, text="reverse abc")
    page = browser_context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")
    with torch.no_grad():
        encoder_routing = model.encode(torch.tensor([SEQ2SEQ_SOURCE]))[1]
    page.hover('#text-box .token[data-index="3"]')
    shown = {int(h) for h in re.findall(r"h(\d+)", page.inner_text('#token-detail tr[data-layer="1"] td.heads'))}
    assert shown == {h for h in range(4) if encoder_routing[1].head_gates[0, 3, h] > 0}
    cross_graph = page.locator("section", has_text="Routing graph per layer (cross-attention)").locator(
        ".routing-graph .node.head").first
    cross_graph.hover()
    assert "active for" in page.inner_text("#tooltip") and page.is_visible("#tooltip")
    assert errors == []


@pytest.mark.slow
def test_report_command_on_a_seq2seq_run_draws_its_curves(tmp_path, capsys):
    pairs = tmp_path / "reverse.tsv"
    pairs.write_text("".join(f"reverse w{i:02d}\t{f'w{i:02d}'[::-1]}\n" for i in range(40)), encoding="utf-8")
    run_dir = tmp_path / "s2s"
    assert main(["train", "--objective", "seq2seq", "--data", str(pairs), "--run-dir", str(run_dir), "--max-steps",
                 "3", "--seq-len", "16", "--batch-size", "4", "--set", "d_model=32", "--set", "n_layers=1",
                 "--set", "n_decoder_layers=1", "--set", "eval_batches=1", "--no-progress"]) == 0
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(run_dir), "--out", str(out), "--batches", "2", "--no-progress"]) == 0
    page = out.read_text()
    assert "<h2>Training curves</h2>" in page and "<h2>Routing graph per layer (cross-attention)</h2>" in page
    assert "Routing of each token (encoder, the text as a source)" in page


@pytest.fixture(scope="module")
def ablation_and_lens(model_and_stats):
    from gohgraph.analysis.ablation import ablate
    from gohgraph.analysis.logit_lens import collect_expert_logit_lens, collect_logit_lens

    model, _ = model_and_stats
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(32, 128, (2, 12), generator=g)]
    ablation = json.loads(json.dumps(ablate(model, batches).to_dict()))
    lens = {"heads": collect_logit_lens(model, batches, top_k=10),
            "experts": collect_expert_logit_lens(model, batches, top_k=10)}
    return ablation, lens


def test_report_in_chromium_hover_shows_a_units_delta_loss_and_top_tokens(model_and_stats, ablation_and_lens,
                                                                          tmp_path, browser_context):
    from gohgraph.viz.html_report import _token_labeller

    model, stats = model_and_stats
    ablation, lens = ablation_and_lens
    path = viz.write_html_report(tmp_path / "report.html", model, stats, text=TEXT, ablation=ablation,
                                 logit_lens=lens)
    label = _token_labeller(model, viz.byte_decode)
    delta = {(row["kind"], row["layer"], row["unit"]): row["delta_loss"] for row in ablation["interventions"]}
    page = browser_context.new_page()
    errors = []
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(path.resolve().as_uri())
    page.wait_for_load_state("load")

    # layer 0's routing graph, routed head h1: forced off and on, and the tokens its output promotes
    page.hover(".routing-graph >> nth=0 >> .node.head >> nth=1")
    tip = page.inner_text("#tooltip")
    assert page.is_visible("#tooltip")
    assert f"Δ loss off {delta[('head_off', 0, '1')]:+.4f}, on {delta[('head_on', 0, '1')]:+.4f} nats/token" in tip
    top = [label(row[0]) for row in lens["heads"]["0"]["1"][:5]]
    assert f"promotes {', '.join(top)}" in tip
    # layer 1's expert e2: forced off, and its expert lens
    page.hover(".routing-graph >> nth=1 >> .node.expert >> nth=2")
    tip = page.inner_text("#tooltip")
    assert f"Δ loss off {delta[('expert_off', 1, '2')]:+.4f} nats/token" in tip
    if lens["experts"]["1"]["2"]:
        assert f"promotes {', '.join(label(row[0]) for row in lens['experts']['1']['2'][:5])}" in tip
    # the Δ loss heatmap: a cell names its unit, Δ loss and top tokens
    section = page.locator("section", has_text="Ablation: Δ loss per unit")
    section.locator(".heatmap >> nth=0 >> .cell >> nth=1").hover()  # head forced off, layer 0, h1
    tip = page.inner_text("#tooltip")
    assert f"layer 0, head h1 forced off: Δ loss {delta[('head_off', 0, '1')]:+.4f} nats/token" in tip
    assert f"promotes {', '.join(top)}" in tip
    assert page.locator("table.ablation-wide tr").count() > 1  # k and message ablations, every layer
    lens_rows = page.locator("table.lens tr[data-layer='0'][data-unit='h1'] td").all_inner_texts()
    assert lens_rows[-1] == ", ".join(top)
    assert errors == []


def test_ablation_and_lens_are_refused_for_a_seq2seq_report(seq2seq_model_and_stats, ablation_and_lens):
    model, stats = seq2seq_model_and_stats
    with pytest.raises(ValueError, match="decoder's analyses"):
        viz.html_report(model, stats, logit_lens=ablation_and_lens[1])
    decoder_model = GoHTransformer(CFG)
    decoder_stats = collect_routing_stats_by_source(decoder_model, {"a": [torch.randint(0, 256, (1, 8))]},
                                                    progress=False)
    with pytest.raises(ValueError, match="gohgraph ablate's ablation.json"):
        viz.html_report(decoder_model, decoder_stats, ablation={"rows": []})


@pytest.mark.slow
def test_report_command_shows_the_ablation_the_run_holds(tmp_path, capsys):
    from gohgraph.training.run_dir import RunDir

    torch.manual_seed(0)
    run = RunDir(tmp_path / "run")
    GoHTransformer(CFG).save_pretrained(run.final_dir)
    run.train_config_file.write_text("{}\n", encoding="utf-8")
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return x\n" * 200)
    common = ["--data", str(code), "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(run.path), "--out", str(out), *common]) == 0
    page = out.read_text()
    assert "Logit lens: the tokens each unit promotes" in page and "Ablation: Δ loss per unit" not in page
    assert main(["ablate", "--checkpoint", str(run.path), "--out", str(run.path / "ablation"), *common]) == 0
    ablation = json.loads((run.path / "ablation" / "ablation.json").read_text())
    assert main(["report", "--checkpoint", str(run.path), "--out", str(out), "--overwrite", *common]) == 0
    page = out.read_text()
    assert "<h2>Ablation: Δ loss per unit</h2>" in page
    head_off = next(row for row in ablation["interventions"] if row["kind"] == "head_off")
    assert f"Δ loss off {head_off['delta_loss']:+.4f}" in page
    assert f"ablation: {run.path / 'ablation' / 'ablation.json'}" in capsys.readouterr().err
    (run.path / "ablation" / "ablation.json").write_text("{not json", encoding="utf-8")
    assert main(["report", "--checkpoint", str(run.path), "--out", str(out), "--overwrite", *common]) == 1
    assert "cannot be read as gohgraph ablate's JSON" in capsys.readouterr().err


def test_report_of_a_run_with_kept_checkpoints_draws_its_router_saturation(tmp_path, capsys):
    """Two kept models (a step checkpoint and final/): the report draws the saturation of the step
    against the final model (its values: tests/analysis/test_saturation.py)."""
    from gohgraph.training.run_dir import RunDir

    torch.manual_seed(0)
    run = RunDir(tmp_path / "run")
    final, earlier = GoHTransformer(CFG), GoHTransformer(CFG)  # two different initialisations
    final.save_pretrained(run.final_dir)
    earlier.save_pretrained(run.checkpoint_dir(1))
    run.train_config_file.write_text("{}\n", encoding="utf-8")
    code = tmp_path / "code.txt"
    code.write_text("def f(x):\n    return x\n" * 200)
    out = tmp_path / "report.html"
    assert main(["report", "--checkpoint", str(run.path), "--out", str(out), "--data", str(code), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress"]) == 0
    page = out.read_text()
    assert "<h2>Router saturation across the run&#x27;s checkpoints</h2>" in page
    assert "router saturation over 1 checkpoints" in page  # the picture's title, inline SVG text
