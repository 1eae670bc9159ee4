"""Every benchmark script runs end to end on tiny sizes and prints what its docstring promises.

Timings are never checked here (they are noise on a shared machine); these tests keep the scripts
from rotting as the library changes, and check the facts a benchmark prints that are not timings
(cached generation equals recomputation, every comparison row present).
"""

import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_benchmark(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_moe_prints_every_layer_and_both_e_ratios():
    out = run_benchmark("bench_moe.py", "--quick")
    for label in ("dense SwiGLU", "SMoE E=8 top-2", "SMoE E=64 top-2 (fine-grained)", "MH-MoE m=4", "GoH-MoE m=4"):
        assert label in out
    assert "E=32 / E=8 time:" in out and "E=64 / E=8 time:" in out


def test_moe_expert_cost_splits_both_projections():
    out = run_benchmark("moe_expert_cost.py", "--tokens", "256", "--rounds", "1", "--d-model", "32", "--hidden", "16")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("256")]
    assert {row[2] for row in rows} == {"w_in", "w_out", "both"}
    assert len(rows) == 9  # 4 passes (3 + total) for each projection, then their sum
    floors = [line for line in out.splitlines() if line.startswith("memory passes")]
    assert [line.split()[2] for line in floors] == ["E=8", "E=64"]


def test_bench_layer_times_dense_moh_and_goh():
    out = run_benchmark("bench_layer.py", "--d-model", "32", "--heads", "8", "--seq", "16", "--batch", "1",
                        "--repeats", "1")
    assert "| dense MHA |" in out and "| MoH (linear router) |" in out and "| GoH (graph" in out


def test_bench_inference_checks_tokens_and_measures_cache_bytes():
    out = run_benchmark("bench_inference.py", "--d-model", "32", "--layers", "1", "--prompt", "8", "--new", "8",
                        "--repeats", "1", "--no-compile")
    decode, cache, memory_table = (section.splitlines() for section in out.split("### ")[1:])
    from_hf = [line for line in decode if line.startswith("| dense (from HF)")]
    assert from_hf and from_hf[0].rstrip(" |").endswith("HF Llama: yes")  # HF's tokens, from converted weights
    cached = [line for line in cache if line.startswith(("| dense", "| MoH", "| GoH"))]
    assert len(cached) == 6 and all(row.rstrip(" |").endswith("yes") for row in cached)
    memory = {line.split("|")[1].strip(): line.split("|")[3:5] for line in memory_table
              if line.startswith(("| MHA", "| GQA", "| MQA", "| MLA", "| sliding"))}
    assert len(memory) == 5
    for formula, measured in memory.values():  # the cache holds exactly what the formula says
        assert formula.strip() == measured.strip()


def test_bench_train_reports_every_attention_variant():
    out = run_benchmark("bench_train.py", "--preset", "tiny", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                        "--seq-len", "32")
    assert [line.split()[0] for line in out.splitlines() if line.split()[:1] in (["dense"], ["MoH"], ["GoH"])] \
        == ["dense", "MoH", "GoH"]


def test_bench_stats_reports_the_stats_overhead():
    out = run_benchmark("bench_stats.py", "--tokens", "256", "--batch-size", "2", "--seq-len", "32", "--repeats", "1")
    assert out.count("RoutingStats.update alone") == 2


def test_initial_routing_counts_both_routers():
    out = run_benchmark("initial_routing.py", "--seeds", "0", "--tokens", "64")
    assert "MoH  seed 0: layer 0" in out and "GoH  seed 0: layer 0" in out


def test_bench_scaling_quick_prints_every_sweep_and_draws_the_plot(tmp_path):
    import matplotlib.image
    import numpy as np

    png = tmp_path / "scaling.png"
    out = run_benchmark("bench_scaling.py", "--quick", "--out", str(png))
    for title in ("heads (GoH", "router rounds", "experts (top-2", "sequence length"):
        assert f"\n{title}" in out
    assert "| 16 | ring |" in out  # the sparse head graph at the larger head count
    image = matplotlib.image.imread(png)
    assert np.asarray(image).std() > 0.01  # not blank


def test_decode_before_after_prints_every_variant():
    out = run_benchmark("decode_before_after.py", "--new", "4", "--repeats", "1", "--d-model", "32")
    assert [line.split(":")[0] for line in out.splitlines()[1:]] == ["dense", "MoH", "GoH"]


def test_bench_head_sparse_prints_every_table_and_row():
    out = run_benchmark("bench_head_sparse.py", "--d-model", "48", "--heads", "12", "--contexts", "40",
                        "--batch", "2", "--steps", "2", "--train-tokens", "40", "--repeats", "1",
                        "--decode-layers", "1", "--train-layers", "1")
    assert out.count("### Decode") == 2 and "### Training step" in out and "### Mixture-of-Recursions" in out
    for row in ("| dense |", "| MoH 8/12 sparse |", "| MoH 8/12 masked |", "| GoH 4/12 sparse |", "| HF Llama |",
                "| MoR expert-choice, recursion KV gathered |", "| MoR token-choice, recursion KV masked |"):
        assert row in out
    flops = [line for line in out.splitlines() if line.startswith("| MoH 4/12 ")]
    assert len(flops) >= 2


def test_bench_mosa_counts_sparse_heads_below_dense():
    out = run_benchmark("bench_mosa.py", "--d-model", "32", "--heads", "4", "--tokens", "64", "--sparsity", "8",
                        "--repeats", "1", "--contexts", "32", "--decode-layers", "1", "--steps", "2")
    train, evaluation = out.split("### Evaluation forward")
    evaluation, decode = evaluation.split("### Decode")
    assert {line.split("|")[2].strip() for line in decode.splitlines() if line.startswith("| 32 ")} == {
        "dense", "MoSA, masked steps", "MoSA, head-run steps"}
    rows = {line.split("|")[2].strip(): line.split("|") for line in train.splitlines() if line.startswith("| 64 ")}
    assert set(rows) == {"dense", "MoSA k=T/8"} and rows["MoSA k=T/8"][3].strip() == "8"
    assert float(rows["MoSA k=T/8"][7]) < 1.0  # fewer FLOPs than dense attention with as many heads
    rows = {line.split("|")[2].strip(): line.split("|") for line in evaluation.splitlines() if line.startswith("| 64 ")}
    assert set(rows) == {"dense", "MoSA k~T/8 gathered", "MoSA k~T/8 masked"}
    # the gathered rule computes only what it keeps: fewer FLOPs than dense and than the masked rule
    assert float(rows["MoSA k~T/8 gathered"][6]) < min(float(rows["dense"][6]), float(rows["MoSA k~T/8 masked"][6]))


def test_mosa_decode_gap_reports_both_rules():
    out = run_benchmark("mosa_decode_gap.py", "--steps", "2", "--eval-batches", "1")
    lines = [line for line in out.splitlines() if line.startswith(("init:", "step 2:"))]
    assert len(lines) == 4 and all("training rule" in line and "gap" in line for line in lines)
    for rule in ("decode rule aux-router", "decode rule score-threshold"):
        assert sum(rule in line for line in lines) == 2  # at initialisation and after the steps


def test_bench_switchhead_counts_few_heads_below_dense():
    out = run_benchmark("bench_switchhead.py", "--d-model", "48", "--heads", "6", "--tokens", "64", "--repeats", "1")
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    few = rows["SwitchHead 2 x 5 top-2"]
    # 2 heads of 8 with 5 + 5 experts hold about dense's attention parameters and compute about half its FLOPs
    assert 0.9 < float(few[3]) < 1.2 and float(few[7]) < 0.6
    assert float(rows["SwitchHead 6 x 4 top-2"][7]) > 1.0  # as many heads as dense: no saving
