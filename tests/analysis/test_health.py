"""Routing-health scalars (issue 30, acceptance 5): hand-computed values on a fixed routing record,
and the same metrics.csv columns whatever the number of experts."""

import csv
import math

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.analysis.stats.health import HEALTH_COLUMNS, routing_health
from gohgraph.routing import ExpertRouting, LayerRouting
from gohgraph.training.metrics import COLUMNS, MetricsLogger, routing_summary
from gohgraph.training.run_dir import RunDir

SHARED = 10.0  # the shared head's gate and logit: never counted


def _layer_one():
    # 1 shared head + 3 routed heads, top-1; 4 tokens pick routed heads 0, 0, 1, 0
    gates = torch.tensor([[[1.0, 0.6, 0.0, 0.0], [1.0, 0.8, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0], [1.0, 0.5, 0.0, 0.0]]])
    logits = torch.tensor([[[SHARED, 2.0, 1.0, 0.0], [SHARED, 3.0, 0.0, 1.0], [SHARED, 0.0, 1.0, 0.5],
                            [SHARED, 1.0, 0.0, -1.0]]])
    # 4 routed experts, top-2: loads e0=4, e1=3, e2=1, e3=0
    indices = torch.tensor([[[[0, 1]], [[0, 2]], [[1, 0]], [[0, 1]]]])
    weights = torch.tensor([[[[0.5, 0.5]], [[0.75, 0.25]], [[0.5, 0.5]], [[0.25, 0.75]]]])
    return LayerRouting(head_gates=gates, head_logits=logits, router_input_rms=torch.tensor(0.5),
                        experts=ExpertRouting(expert_indices=indices, expert_weights=weights))


def _layer_two():
    # routed heads 0, 1, 2, 0 with gate 1; no experts (a dense FFN layer), no recorded RMS
    gates = torch.tensor([[[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0]]])
    logits = torch.tensor([[[SHARED, 1.0, 0.0, 0.0], [SHARED, 0.0, 2.0, 0.0], [SHARED, 0.0, 0.0, 3.0],
                            [SHARED, 1.0, 0.0, 0.0]]])
    return LayerRouting(head_gates=gates, head_logits=logits)


def _entropy(*shares):
    return -sum(p * math.log(p) for p in shares if p > 0) / math.log(len(shares))


def test_health_scalars_equal_hand_computed_values():
    health = routing_health([_layer_one(), _layer_two()], n_shared_heads=1, n_routed_experts=4)
    assert list(health) == HEALTH_COLUMNS
    expected = {
        # heads, layer 1: load [3, 1, 0] of 4 (fair share 4/3); layer 2: load [2, 1, 1]
        "util_min": 0.0,                                    # min(0, 0.75)
        "util_max": 2.25,                                   # max(2.25, 1.5)
        "dead": (1 / 3 + 0) / 2,
        "entropy": (_entropy(0.75, 0.25, 0.0) + _entropy(0.5, 0.25, 0.25)) / 2,
        "max_share": (0.75 + 0.5) / 2,
        # layer 1: gate mass [1.9, 0.5, 0] / 2.4 against [0.75, 0.25, 0]: L1 = 1/12; layer 2: 0
        "gate_gap": (1 / 12 + 0) / 2,
        # top-1 minus second logit: layer 1: 1, 2, 0.5, 1; layer 2: 1, 2, 3, 1
        "margin": (4.5 / 4 + 7 / 4) / 2,
        "input_rms": 0.5,                                   # only layer 1 records it
    }
    for stat, value in expected.items():
        assert health[f"health/heads/{stat}"] == pytest.approx(value, abs=1e-7), stat
    expected_experts = {
        # load [4, 3, 1, 0] of 8, fair share 2: utilisation [2, 1.5, 0.5, 0]
        "util_min": 0.0, "util_max": 2.0, "dead": 0.25,
        "entropy": _entropy(0.5, 0.375, 0.125, 0.0), "max_share": 0.5,
        # gate mass [2, 1.75, 0.25, 0] / 4 = [0.5, 0.4375, 0.0625, 0] against [0.5, 0.375, 0.125, 0]
        "gate_gap": 0.125,
    }
    for stat, value in expected_experts.items():
        assert health[f"health/experts/{stat}"] == pytest.approx(value, abs=1e-7), stat
    # a record without margins or input RMS (e.g. SwitchHead's, or one written while decoding): nan
    assert math.isnan(health["health/experts/margin"]) and math.isnan(health["health/experts/input_rms"])


def test_expert_margin_and_input_rms_equal_hand_computed_values():
    one = _layer_one()
    # the k-th minus the (k+1)-th selection score of each sub-token; nan where the (k+1)-th was forbidden
    one.experts.router_margins = torch.tensor([[[0.5], [1.5], [float("nan")], [1.0]]])
    one.experts.router_input_rms = torch.tensor(0.25)
    health = routing_health([one, _layer_two()], n_shared_heads=1, n_routed_experts=4)
    assert health["health/experts/margin"] == pytest.approx((0.5 + 1.5 + 1.0) / 3)
    assert health["health/experts/input_rms"] == pytest.approx(0.25)


def test_the_expert_layer_records_its_ranking_margin_and_input_rms():
    """A real MoE layer's record: the margin is the gap between the k-th and (k+1)-th of the gate's
    selection scores recomputed by hand from the router, and the RMS is its sub-tokens'."""
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=4, ffn="moe", n_experts=4, top_k_experts=2,
                    max_seq_len=16)
    model = GoHTransformer(cfg).train()
    ids = torch.randint(0, 64, (2, 8))
    captured = {}
    moe = next(m for m in model.modules() if type(m).__name__ == "MoEFeedForward")
    moe.router.register_forward_hook(lambda _m, args, out: captured.update(sub=args[0].detach(), logits=out.detach()))
    record = model(ids).routing[0].experts
    scores = captured["logits"].float() + (moe.gate.selection_bias if moe.gate.aux_free_bias else 0)
    ranked = scores.sort(dim=-1, descending=True).values
    torch.testing.assert_close(record.router_margins.reshape(-1), (ranked[..., 1] - ranked[..., 2]).reshape(-1))
    torch.testing.assert_close(record.router_input_rms, captured["sub"].pow(2).mean().sqrt())
    health = routing_health([model(ids).routing[0]], n_routed_experts=4)
    assert math.isfinite(health["health/experts/margin"]) and math.isfinite(health["health/experts/input_rms"])


def test_padding_changes_no_health_scalar():
    one = _layer_one()
    pad_gates = torch.tensor([[[1.0, 0.0, 0.0, 9.0], [1.0, 0.0, 0.0, 9.0]]])
    pad_indices = torch.tensor([[[[3, 3]], [[3, 3]]]])
    padded = LayerRouting(
        head_gates=torch.cat([pad_gates, one.head_gates], 1),
        head_logits=torch.cat([torch.full((1, 2, 4), 7.0), one.head_logits], 1),
        router_input_rms=one.router_input_rms,
        experts=ExpertRouting(expert_indices=torch.cat([pad_indices, one.expert_indices], 1),
                              expert_weights=torch.cat([torch.ones(1, 2, 1, 2), one.expert_weights], 1)))
    mask = torch.tensor([[False, False, True, True, True, True]])
    plain = routing_health([one], n_shared_heads=1, n_routed_experts=4)
    masked = routing_health([padded], n_shared_heads=1, n_routed_experts=4, token_mask=mask)
    for column in HEALTH_COLUMNS:
        assert masked[column] == pytest.approx(plain[column], abs=1e-12, nan_ok=True), column


def test_absent_kinds_are_nan():
    dense = LayerRouting(head_gates=torch.ones(1, 3, 4))  # dense router: no logits, nothing routed
    assert all(math.isnan(value) for value in routing_health([dense]).values())


def _header(tmp_path, n_experts):
    cfg = GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, router="graph", top_k_heads=2,
                    max_seq_len=32, ffn="moe", n_experts=n_experts, top_k_experts=2)
    torch.manual_seed(0)
    model = GoHTransformer(cfg).eval()
    with torch.no_grad():
        summary = routing_summary(model(torch.randint(0, 64, (2, 16))).routing, cfg)
    run = RunDir(tmp_path / f"run{n_experts}")
    run.path.mkdir(parents=True, exist_ok=True)
    logger = MetricsLogger(run, 0, tensorboard=False)
    logger.log(step=1, loss=1.0, **summary)
    logger.close()
    with open(run.metrics_file, newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    return rows[0], dict(zip(rows[0], rows[1]))


def test_csv_columns_do_not_depend_on_the_number_of_experts(tmp_path):
    header4, row4 = _header(tmp_path, 4)
    header16, row16 = _header(tmp_path, 16)
    assert header4 == header16 == COLUMNS
    for row in (row4, row16):
        assert all(row[column] != "" for column in HEALTH_COLUMNS
                   if not column.endswith(("experts/margin", "experts/input_rms"))), row
    assert float(row16["health/heads/input_rms"]) > 0


def test_training_curves_draw_health_scalars_in_one_panel_per_kind():
    from gohgraph.viz.curves import _group

    panels = dict(_group(["loss", *HEALTH_COLUMNS, "lr"]))
    assert panels["routing health: heads"] == [c for c in HEALTH_COLUMNS if c.startswith("health/heads/")]
    assert panels["routing health: experts"] == [c for c in HEALTH_COLUMNS if c.startswith("health/experts/")]
    assert len(panels) == 4
