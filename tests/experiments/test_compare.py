"""The comparison suite: matched parameter counts, the table's arithmetic, and a micro end-to-end run."""

import dataclasses
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.timing import interleaved_median_seconds, saved_tensor_bytes
from gohgraph.data.corpus import load_corpus
from gohgraph.experiments.records import Comparison, SeedRun, TrainingCost
from gohgraph.experiments.report import is_tie, paired_difference, render_table
from gohgraph.experiments.run import run_comparison
from gohgraph.experiments.variants import (
    SETTINGS,
    VARIANT_NAMES,
    MatchedVariant,
    active_parameters,
    comparison_variants,
    match_parameters,
)
from gohgraph.training.config import TrainConfig


@pytest.fixture(scope="module")
def quick_variants():
    return match_parameters(comparison_variants(**SETTINGS["quick"][0]))


def test_every_variant_is_built_and_matched_within_two_percent(quick_variants):
    assert list(quick_variants) == list(VARIANT_NAMES)
    target = GoHTransformer(quick_variants["dense"].config).num_parameters()
    for name, variant in quick_variants.items():
        counted = GoHTransformer(variant.config).num_parameters()  # counted again, independently
        assert counted == variant.params
        assert abs(counted / target - 1) <= 0.02, name
        assert variant.target == target


def test_variants_are_the_configurations_they_claim(quick_variants):
    configs = {name: v.config for name, v in quick_variants.items()}
    assert (configs["dense"].router, configs["dense"].ffn) == ("dense", "dense")
    assert configs["MoH"].router == "linear" and configs["GoH"].router == "graph"
    assert configs["GoH"].inter_head_flow and configs["GoH"].head_graph == "complete"
    for name in ("MoH", "GoH"):  # at most 75% of the heads per token
        assert configs[name].active_heads / configs[name].n_heads <= 0.75
        assert quick_variants[name].heads_active == "6/8"
    assert [configs[n].ffn for n in ("SMoE", "fine-grained SMoE", "MH-MoE", "GoH-MoE")] == \
        ["moe", "moe", "mh-moe", "graph-moe"]
    fine, coarse = configs["fine-grained SMoE"], configs["SMoE"]
    assert fine.n_experts > coarse.n_experts and fine.top_k_experts == 2 * coarse.top_k_experts
    assert fine.expert_hidden_dim < coarse.expert_hidden_dim
    assert configs["MH-MoE"].n_subtokens == configs["GoH-MoE"].n_subtokens == 2
    unmatched = comparison_variants(**SETTINGS["quick"][0])
    for name in ("MH-MoE", "GoH-MoE"):  # MH-MoE's parity: m sub-tokens reach m times as many experts
        assert unmatched[name].n_experts == 2 * unmatched["SMoE"].n_experts, name
        assert configs[name].top_k_experts == configs["SMoE"].top_k_experts, name
    assert configs["MH-MoE"].n_experts == 2 * configs["SMoE"].n_experts  # matching kept the count
    # GoH-MoE's expert scores are a bilinear form in router_dim: it must cover every expert
    assert configs["GoH-MoE"].router_dim >= configs["GoH-MoE"].n_experts


def test_active_parameters_leave_out_exactly_the_unused_experts(quick_variants):
    for name, variant in quick_variants.items():
        cfg = variant.config
        if cfg.ffn == "dense":
            assert variant.active_params == variant.params
            continue
        per_expert = 3 * (cfg.d_model // cfg.n_subtokens) * cfg.expert_hidden_dim  # SwiGLU: gate, up, down
        unused = cfg.n_routed_experts - min(cfg.n_routed_experts, cfg.n_subtokens * cfg.top_k_experts)
        assert variant.active_params == variant.params - cfg.n_layers * unused * per_expert, name


def test_match_parameters_rejects_an_impossible_tolerance():
    variants = comparison_variants(**SETTINGS["quick"][0], names=["dense", "MoH"])
    with pytest.raises(ValueError, match="MoH"):
        match_parameters(variants, tolerance=1e-9)
    with pytest.raises(ValueError, match="not among"):
        comparison_variants(**SETTINGS["quick"][0], names=["dense", "Switch"])


def _row(table: str, name: str) -> list:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in\n{table}")


def test_table_computes_mean_spread_bits_per_byte_and_ratios_from_given_numbers():
    config = GoHConfig(d_model=32, n_layers=1, n_heads=4)
    losses = {"dense": [2.0, 2.2, 2.4], "GoH": [1.5, 1.6, 1.7], "MoH": [2.1, 2.2, 2.3]}
    variants = {name: MatchedVariant(name, config, 1010 if name == "GoH" else 1000, 1000, 900, "3/4", "-")
                for name in losses}
    runs = [SeedRun(name, seed, loss, [(1, 64, loss)], 100.0, head_load_cv=0.5 if name != "dense" else None)
            for name, values in losses.items() for seed, loss in enumerate(values)]
    costs = {"dense": TrainingCost(1000.0, 2 ** 20, 2 ** 20, 2.0e6, 1.0e6),
             "GoH": TrainingCost(900.0, 3 * 2 ** 20, 2 ** 20, 1.8e6, 0.5e6),
             "MoH": TrainingCost(1250.0, 2 ** 20, 2 ** 20)}
    table = render_table(Comparison(variants, runs, costs, TrainConfig(max_steps=10)))

    dense, goh, moh = _row(table, "dense"), _row(table, "GoH"), _row(table, "MoH")
    # mean 2.2, sample std 0.2; bits/byte 2.2 / ln 2 = 3.1739, spread 0.2 / ln 2 = 0.2885
    assert dense[5] == "2.200 ± 0.200" and dense[6] == "3.174 ± 0.289"
    assert goh[5] == "1.600 ± 0.100" and goh[6] == "2.308 ± 0.144"
    # paired per-seed differences: GoH - dense = [-0.5, -0.6, -0.7] -> -0.6 ± 0.1, t = 10.4 > 4.30
    assert goh[7] == "-0.600 ± 0.100"
    assert moh[7] == "+0.000 ± 0.100 (tie)"  # [0.1, 0.0, -0.1]
    # GoH - MoH = [-0.6, -0.6, -0.6]: no spread, non-zero -> holds; MoH - dense ties
    assert _row(table, "GoH < MoH")[1:] == ["-0.600 ± 0.000", "holds"]
    assert _row(table, "MoH < dense")[2] == "tie (not significant)"
    assert _row(table, "GoH < dense")[2] == "holds"
    assert goh[1] == "1,010 (+1.00%)" and goh[2] == "900" and goh[3] == "3/4"
    assert dense[8] == "1.00x" and goh[8] == "0.90x" and moh[8] == "1.25x"
    assert dense[9] == "2.0" and goh[9] == "4.0"  # (activations + 16 B/param state) in MiB
    assert dense[10] == "2.00 (1.00x)" and goh[10] == "1.80 (0.90x)" and goh[11] == "0.50 (0.50x)"
    assert moh[10] == "-" and moh[11] == "-"  # not measured: shown as missing, never as 0
    assert goh[12] == "0.50 / -" and dense[12] == "- / -"
    assert "3 seed(s) [0, 1, 2]" in table


def test_paired_t_test_at_95_percent():
    dense = [2.0, 2.1, 2.2]
    # differences [-0.1, -0.2, -0.3]: mean -0.2, std 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.46 < 4.303 (df 2)
    assert is_tie([1.9, 1.9, 1.9], dense)
    # differences [-0.25, -0.3, -0.35]: t = 0.3 / (0.05 / sqrt 3) = 10.4 > 4.303
    assert not is_tie([1.75, 1.8, 1.85], dense)
    assert is_tie([1.0], [2.0])  # one seed cannot be told apart
    assert paired_difference([1.0, 3.0], [0.5, 2.0]) == pytest.approx((0.75, math.sqrt(0.125)))
    with pytest.raises(ValueError, match="differ"):
        paired_difference([1.0], [1.0, 2.0])


def test_single_seed_has_no_spread():
    config = GoHConfig(d_model=32, n_layers=1, n_heads=4)
    variants = {"dense": MatchedVariant("dense", config, 1000, 1000, 1000, "4/4", "-")}
    table = render_table(Comparison(variants, [SeedRun("dense", 0, math.log(2), [], 1.0)], {},
                                    TrainConfig(max_steps=10)))
    assert _row(table, "dense")[5:7] == ["0.693", "1.000"]


def test_micro_comparison_writes_table_json_and_a_non_blank_plot(tmp_path):
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))
    data = tmp_path / "data.txt"
    data.write_text(text, encoding="utf-8")
    corpus = load_corpus(str(data), cache_dir=tmp_path / "cache")
    shape = dict(SETTINGS["quick"][0], d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2,
                 router_dim=8, max_seq_len=64)
    variants = match_parameters(comparison_variants(**shape, names=["dense", "GoH"]))
    train_config = TrainConfig(batch_size=4, seq_len=32, max_steps=4, warmup_steps=1, eval_every=2,
                               eval_batches=2, lr=3e-3)
    out = tmp_path / "out"
    comparison = run_comparison(variants, train_config, corpus, out, seeds=[0], final_eval_batches=2,
                                stats_batches=1, timing_repeats=1, progress=False)

    assert [run.variant for run in comparison.runs] == ["dense", "GoH"]
    for run in comparison.runs:
        assert 0 < run.val_loss < math.log(256) + 1
        assert [(step, tokens) for step, tokens, _ in run.val_history] == [(2, 256), (4, 512)]
    table = (out / "compare.md").read_text()
    assert _row(table, "dense")[8] == "1.00x" and _row(table, "GoH")[3] == "3/4"
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"][1]["val_loss"] == pytest.approx(comparison.runs[1].val_loss)
    assert saved["costs"]["GoH"]["activation_bytes"] > saved["costs"]["dense"]["activation_bytes"] > 0
    image = matplotlib.image.imread(out / "compare_loss.png")
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert np.unique(image.reshape(-1, image.shape[-1]), axis=0).shape[0] > 10  # lines, text, not blank


def test_saved_tensor_bytes_counts_each_saved_storage_once_and_skips_excluded():
    a = torch.randn(1000, requires_grad=True)
    b = torch.randn(1000, requires_grad=True)
    assert saved_tensor_bytes(lambda: (a * b).sum().backward()) == 2 * 1000 * 4  # mul saves both factors
    assert saved_tensor_bytes(lambda: (a * a).sum().backward()) == 1000 * 4  # one storage, saved twice
    assert saved_tensor_bytes(lambda: (a * b).sum().backward(), exclude=[a]) == 1000 * 4
    assert saved_tensor_bytes(lambda: (a + b).sum().backward()) == 0  # add saves nothing


def test_interleaved_timing_runs_variants_in_turn():
    calls = []
    seconds = interleaved_median_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                         repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert set(seconds) == {"a", "b"} and all(value >= 0 for value in seconds.values())


@pytest.fixture
def bench_data(tmp_path, monkeypatch):
    """A small text file for ``gohgraph bench --data``, with the corpus cache kept in ``tmp_path``."""
    monkeypatch.setenv("GOHGRAPH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "data.txt"
    data.write_text("".join(f"print({i} * {i % 13})\n" for i in range(2000)), encoding="utf-8")
    return data


def test_bench_command_writes_the_table_for_the_chosen_variants(tmp_path, capsys, bench_data):
    from gohgraph.cli.main import main

    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--variants", "GoH", "--steps", "2", "--seeds", "1", "--first-seed", "4",
                 "--data", str(bench_data), "--eval-batches", "1", "--out", str(out), "--no-progress",
                 "--dense-anneal-steps", "1", "--router-rounds", "2", "--router-dim", "12"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())
    assert list(saved["variants"]) == ["dense", "GoH"]  # dense joins as the reference
    assert [(run["variant"], run["seed"]) for run in saved["runs"]] == [("dense", 4), ("GoH", 4)]
    assert saved["train_config"]["max_steps"] == 2
    assert saved["train_config"]["dense_anneal_steps"] == 1
    goh = saved["variants"]["GoH"]["config"]
    assert (goh["router_rounds"], goh["router_dim"]) == (2, 12)
    printed = capsys.readouterr().out
    assert "| GoH |" in printed and (out / "compare_loss.png").stat().st_size > 0
    assert "annealed from dense over the first 1 steps" in printed  # the table says how it was trained
    assert ("Graph routers: 2 round(s) of 12-wide node features (overridden; GoH-MoE's at least as wide "
            "as its expert count)") in printed


def test_bench_command_changes_config_fields_of_the_routed_variants(tmp_path, capsys, bench_data):
    from gohgraph.cli.main import main

    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--variants", "SMoE", "MH-MoE", "--steps", "1", "--seeds", "1",
                 "--data", str(bench_data), "--eval-batches", "1", "--out", str(out), "--no-progress",
                 "--set", "subtoken_projections=false", "capacity_factor=1.5"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())["variants"]
    assert saved["MH-MoE"]["config"]["subtoken_projections"] is False
    assert saved["SMoE"]["config"]["capacity_factor"] == 1.5 == saved["MH-MoE"]["config"]["capacity_factor"]
    assert saved["dense"]["config"]["subtoken_projections"] is True  # the reference stays as it is
    assert abs(saved["MH-MoE"]["mismatch"]) <= 0.02  # matched again without the 2 d^2 per layer
    assert "Changed in every variant but dense: subtoken_projections=False, capacity_factor=1.5." in capsys.readouterr().out


def test_bench_set_refuses_unknown_and_protocol_fields():
    from gohgraph.cli.bench import PROTOCOL_FIELDS, WHY_PROTECTED
    from gohgraph.cli.common import parse_overrides

    fields = [f.name for f in dataclasses.fields(GoHConfig)]
    overrides = parse_overrides(["inter_head_flow=false", "capacity_factor=1.5", "head_graph=ring"], fields)
    changed = GoHConfig(ffn="moe", **overrides)  # the config's typed parser reads the text
    assert (changed.inter_head_flow, changed.capacity_factor, changed.head_graph) == (False, 1.5, "ring")
    with pytest.raises(ValueError, match="interhead_flow"):
        parse_overrides(["interhead_flow=false"], fields)
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["inter_head_flow"], fields)
    with pytest.raises(ValueError, match="--router-dim"):  # would bypass GoH-MoE's width rule
        parse_overrides(["router_dim=16"], fields, protected=set(SETTINGS["full"][0]), why_protected=WHY_PROTECTED)
    with pytest.raises(ValueError, match="sets d_model itself"):  # dense keeps its shape: no longer like for like
        parse_overrides(["d_model=256"], fields, protected=set(SETTINGS["full"][0]), why_protected=WHY_PROTECTED)
    with pytest.raises(ValueError, match="sets expert_hidden itself"):  # the matching would overwrite it
        parse_overrides(["expert_hidden=16"], fields, protected=PROTOCOL_FIELDS, why_protected=WHY_PROTECTED)


def test_matching_on_active_parameters_grows_the_expert_models():
    variants = match_parameters(comparison_variants(**SETTINGS["quick"][0], names=["dense", "SMoE", "MH-MoE"]),
                                on="active")
    dense = variants["dense"]
    for name in ("SMoE", "MH-MoE"):
        model = GoHTransformer(variants[name].config)
        assert abs(active_parameters(model) / dense.active_params - 1) <= 0.02
        assert model.num_parameters() > 1.3 * dense.params  # more experts than one token uses
        assert variants[name].matched_on == "active"
    with pytest.raises(ValueError, match="on='memory'"):
        match_parameters(comparison_variants(**SETTINGS["quick"][0], names=["dense"]), on="memory")
    with pytest.raises(ValueError, match="on='flops' needs seq_len"):
        match_parameters(comparison_variants(**SETTINGS["quick"][0], names=["dense"]), on="flops")


@pytest.mark.slow
def test_matching_on_training_flops_sizes_every_default_variant_within_two_percent():
    from gohgraph.experiments.variants import MOSA, SWITCH_HEAD, count_training_flops

    shape, schedule = SETTINGS["quick"]
    names = [*VARIANT_NAMES, SWITCH_HEAD, MOSA]
    variants = match_parameters(comparison_variants(**shape, names=names), on="flops", seq_len=schedule["seq_len"])
    dense = count_training_flops(variants["dense"].config, schedule["seq_len"])
    assert variants["dense"].target == dense and list(variants) == names
    for name, variant in variants.items():
        counted = count_training_flops(variant.config, schedule["seq_len"])  # counted again, on its own
        assert counted == variant.flops_per_token
        assert abs(counted / dense - 1) <= 0.02, name
        assert variant.matched_on == "flops" and abs(variant.mismatch) <= 0.02
    # the knob moved where the variant costs more (MoSA's sparse heads) or less (MoH computes every head:
    # about the same) than dense per token; the expert models keep their expert count
    assert variants[MOSA].config.ffn_hidden < variants["dense"].config.hidden_dim
    assert variants["SMoE"].config.n_experts == shape["n_experts"]


def test_every_row_names_the_released_code_it_computes():
    from gohgraph.experiments.variants import reference_of

    rows = {name: reference_of(cfg) for name, cfg in comparison_variants(**SETTINGS["quick"][0]).items()}
    assert "SkyworkAI/MoH's gating" in rows["MoH"] and "MoH gating" in rows["GoH"]
    assert "Mixtral" in rows["SMoE"] and "Mixtral" in rows["fine-grained SMoE"]
    assert "MH-MoE" in rows["MH-MoE"] and "graph router" in rows["GoH-MoE"]
    old_gating = comparison_variants(**SETTINGS["quick"][0])["MoH"].replace(head_gate_normalisation="mha")
    assert "not MoH's released gating" in reference_of(old_gating)
    deepseek = GoHConfig(ffn="moe", n_experts=8, expert_score="sigmoid")
    assert "DeepSeek-V3" in reference_of(deepseek)


def test_loss_figure_says_which_batches_each_panel_saw(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from gohgraph.experiments.report import plot_loss_curves

    saved = {}
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *args, **kwargs: saved.setdefault("figure", self))
    histories = {"dense": [[(1, 100, 3.0), (2, 200, 2.5)], [(1, 100, 3.1), (2, 200, 2.6)]],
                 "GoH": [[(1, 100, 3.2), (2, 200, 2.4)], [(1, 100, 3.0), (2, 200, 2.45)]]}
    finals = {"dense": [2.55, 2.65], "GoH": [2.42, 2.47]}
    plot_loss_curves(histories, tmp_path / "compare_loss.png", final_losses=finals, curve_batches=4)
    curves, final = saved["figure"].axes
    assert curves.get_title() == "during training: mean over seeds, on 4 validation batches"
    assert "the whole validation split" in final.get_title()
    assert [line.get_ydata().tolist() for line in curves.get_lines()] == [[3.05, 2.55], [3.1, 2.425]]
    assert not curves.collections  # no overlapping bands
    bars = [patch.get_height() for patch in final.patches]
    assert bars == pytest.approx([2.60, 2.445])  # the table's means, not the curves' last points
    dots = sorted(float(y) for points in final.collections for y in points.get_offsets()[:, 1])
    assert dots == pytest.approx(sorted(finals["dense"] + finals["GoH"]))
def test_bitnet_rows_are_their_full_precision_rows_with_bitnet_and_match_the_same():
    from gohgraph.experiments.variants import BITNET_OF, BITNET_VARIANT_NAMES, reference_of

    names = ["dense", *BITNET_OF[1:], *BITNET_VARIANT_NAMES]
    variants = comparison_variants(**SETTINGS["quick"][0], names=names)
    for name in BITNET_OF:
        assert variants[name + " BitNet"] == variants[name].replace(linear="bitnet")
    matched = match_parameters({name: variants[name] for name in ["dense", "MH-MoE", "MH-MoE BitNet"]})
    assert matched["MH-MoE BitNet"].params == matched["MH-MoE"].params  # BitLinear adds no parameters
    assert "BitNet b1.58" in reference_of(variants["SMoE BitNet"]) and "BitNet" not in reference_of(variants["SMoE"])


def test_bench_bitnet_runs_table_3_in_one_command(tmp_path, capsys, bench_data):
    from gohgraph.cli.main import main
    from gohgraph.experiments.variants import BITNET_VARIANT_NAMES

    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--bitnet", "--steps", "1", "--seeds", "1", "--data", str(bench_data),
                 "--eval-batches", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())["variants"]
    assert list(saved) == ["dense", *BITNET_VARIANT_NAMES]
    assert saved["dense"]["config"]["linear"] == "standard"
    assert all(saved[name]["config"]["linear"] == "bitnet" for name in BITNET_VARIANT_NAMES)
    assert "| MH-MoE BitNet |" in capsys.readouterr().out


def test_mor_rows_match_parameters_or_depth():
    from gohgraph.experiments.variants import MOR_VARIANT_NAMES, reference_of

    variants = comparison_variants(**SETTINGS["quick"][0], names=["dense", *MOR_VARIANT_NAMES])
    shape = SETTINGS["quick"][0]
    for router in ("expert-choice", "token-choice"):
        same_params, same_depth = variants[f"MoR {router}"], variants[f"MoR {router} (matched depth)"]
        assert (same_params.recursion, same_params.recursion_router, same_params.n_layers) == ("mor", router, shape["n_layers"])
        assert same_depth.n_layers * same_depth.max_recursions == shape["n_layers"]
        assert "Mixture-of-Recursions" in reference_of(same_params) and "no FLOPs saved" in reference_of(same_params)
    matched = match_parameters(variants)
    dense = matched["dense"].params
    assert abs(matched["MoR token-choice"].params / dense - 1) <= 0.02
    # the matched-depth rows keep their size: half the blocks, so roughly the embedding plus half the rest
    depth_row = matched["MoR token-choice (matched depth)"]
    assert depth_row.config.n_layers == shape["n_layers"] // 2 and depth_row.mismatch < -0.2
    assert depth_row.params == GoHTransformer(variants["MoR token-choice (matched depth)"]).num_parameters()


def test_bench_runs_a_mor_row(tmp_path, capsys, bench_data):
    from gohgraph.cli.main import main

    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--variants", "MoR token-choice (matched depth)", "--steps", "1", "--seeds", "1",
                 "--data", str(bench_data), "--eval-batches", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())["variants"]
    assert list(saved) == ["dense", "MoR token-choice (matched depth)"]
    assert saved["MoR token-choice (matched depth)"]["config"]["recursion"] == "mor"
    assert "| MoR token-choice (matched depth) |" in capsys.readouterr().out


@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_bench_compares_the_rows_on_every_task(tmp_path, capsys, objective):
    """``gohgraph bench --objective X``: the rows as models of X's family, matched, trained by the one
    loop, scored by X's evaluation, with the paired tests."""
    from gohgraph.cli.main import main
    from gohgraph.models.families import FAMILIES

    out = tmp_path / "out"
    assert main(["bench", "--quick", "--objective", objective, "--variants", "dense", "GoH", "--steps", "2",
                 "--seeds", "2", "--eval-batches", "1", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    table = (out / "compare.md").read_text()
    saved = json.loads((out / "compare.json").read_text())
    assert saved["task"] == objective and f"Task: `{objective}`" in table
    family = FAMILIES[{"mlm": "encoder", "classify": "encoder", "seq2seq": "seq2seq"}[objective]]
    for name, variant in saved["variants"].items():
        assert variant["config"]["model_type"] == family.model_type, name
        assert abs(variant["mismatch"]) <= 0.02, name
    runs = {(run["variant"], run["seed"]): run for run in saved["runs"]}
    assert sorted(runs) == [("GoH", 0), ("GoH", 1), ("dense", 0), ("dense", 1)]
    assert _row(table, "GoH")[7].endswith(")") or "±" in _row(table, "GoH")[7]  # the paired difference vs dense
    if objective == "classify":
        assert "val accuracy" in table.splitlines()[0] and all(0 <= r["scores"]["accuracy"] <= 1 for r in runs.values())
    if objective == "seq2seq":
        assert "val exact match" in table.splitlines()[0]
    assert saved["costs"]["GoH"]["decode_flops_per_token"] is None  # decoders alone decode a continuation


def test_bench_matches_training_flops(tmp_path, capsys, bench_data):
    from gohgraph.cli.main import main
    from gohgraph.experiments.variants import MOSA

    out = tmp_path / "bench"
    code = main(["bench", "--quick", "--variants", MOSA, "--match", "flops", "--steps", "1", "--seeds", "1",
                 "--data", str(bench_data), "--eval-batches", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    saved = json.loads((out / "compare.json").read_text())["variants"]
    assert list(saved) == ["dense", MOSA] and saved[MOSA]["matched_on"] == "flops"
    assert abs(saved[MOSA]["flops_per_token"] / saved["dense"]["flops_per_token"] - 1) <= 0.02
    table = capsys.readouterr().out
    assert f"| {MOSA} |" in table and "(matched " in table and "target training FLOPs per token" in table
