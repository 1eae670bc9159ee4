"""How the cost of one GoH layer grows: heads (complete and ring head graphs), router rounds,
experts and sequence length, as ratios to the dense layer of the same size, in one run.

Every point times forward+backward of one :class:`gohgraph.models.block.GoHBlock` (loss: mean square of
the output + routing losses) interleaved with its dense twin (same d_model, heads, seq) and takes
the median; memory per token counts the tensors saved for backward
(:func:`gohgraph.analysis.timing.saved_tensor_bytes`). The heads sweep also times the head router alone on
both of its paths (fused dense ``[heads, heads]`` softmax; PyG ``propagate`` over the edges) and
the path :class:`~gohgraph.routers.heads.HeadRouter` picks by itself, to show which one grows with the
edges. Writes ``benchmarks/results/scaling.png`` (log-log).

    python benchmarks/bench_scaling.py              # ~5 minutes on 2 CPU cores
    python benchmarks/bench_scaling.py --repeats 3  # faster, noisier
    python benchmarks/bench_scaling.py --quick --out /tmp/scaling.png  # smoke run of every path
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

import torch

from gohgraph import GoHConfig
from gohgraph.analysis.timing import interleaved_median_seconds, saved_tensor_bytes
from gohgraph.graph import head_graph
from gohgraph.models.block import GoHBlock
from gohgraph.routers.heads import HeadRouter

RESULTS = Path(__file__).resolve().parent / "results"
GOH = dict(router="graph", router_rounds=2, inter_head_flow=True)
# the sizes each sweep visits; --quick is a smoke run of every code path, not a measurement
SWEEPS = {"heads": (8, 16, 32, 64), "experts": (8, 16, 32, 64), "seq": (128, 256, 512, 1024, 2048)}
QUICK_SWEEPS = {"heads": (8, 16), "experts": (8, 16), "seq": (32, 64)}


def block_step(block: GoHBlock, x: torch.Tensor):
    def run() -> None:
        y, routing = block(x)
        (y.square().mean() + sum(routing.aux_losses.values(), torch.zeros(()))).backward()
    return run


def compare_blocks(configs: Dict[str, GoHConfig], batch: int, seq: int, repeats: int) -> Dict[str, dict]:
    """Median fwd+bwd time and saved bytes per token of one block per config; ``configs['dense']`` first."""
    torch.manual_seed(0)
    blocks = {name: GoHBlock(cfg, 0) for name, cfg in configs.items()}
    x = torch.randn(batch, seq, next(iter(configs.values())).d_model, requires_grad=True)
    runs = {name: block_step(block, x) for name, block in blocks.items()}
    seconds = interleaved_median_seconds(runs, repeats, warmup=1)
    tokens = batch * seq
    out = {}
    for name, block in blocks.items():
        memory = saved_tensor_bytes(runs[name], exclude=[*block.parameters(), x])
        out[name] = {"us_per_token": 1e6 * seconds[name] / tokens, "bytes_per_token": memory / tokens}
    for name in out:
        out[name]["time_ratio"] = out[name]["us_per_token"] / out["dense"]["us_per_token"]
        out[name]["memory_ratio"] = out[name]["bytes_per_token"] / out["dense"]["bytes_per_token"]
    return out


def sweep_heads(args) -> List[dict]:
    rows = []
    for heads in args.sweeps["heads"]:
        base = dict(d_model=args.d_model, n_heads=heads, n_layers=1, max_seq_len=args.seq,
                    n_shared_heads=heads // 4, top_k_heads=heads // 2)
        for graph in ("complete", "ring"):
            configs = {"dense": GoHConfig(**{**base, "n_shared_heads": 0, "top_k_heads": None}),
                       "GoH": GoHConfig(**base, **GOH, head_graph=graph)}
            block = compare_blocks(configs, args.batch, args.seq, args.repeats)["GoH"]
            rows.append({"heads": heads, "graph": graph, **router_only(heads, graph, args), **block})
    return rows


def router_only(heads: int, graph: str, args) -> dict:
    """Head router fwd+bwd, µs per token, on the fused and the propagate path and the automatic choice."""
    torch.manual_seed(0)
    edge_index = head_graph(graph, heads)
    router = HeadRouter(args.d_model // heads, heads, edge_index, router_dim=16, rounds=2)
    q = torch.randn(args.batch * args.seq, heads, args.d_model // heads, requires_grad=True)

    def run(fused: bool):
        def step() -> None:
            logits, edge_weights = router(q, fused=fused)
            (logits.square().mean() + edge_weights.square().mean()).backward()
        return step

    paths = {"fused": run(True), "propagate": run(False)}
    repeats = args.repeats if edge_index.shape[1] <= 1024 else max(2, args.repeats // 3)  # propagate is slow there
    seconds = interleaved_median_seconds(paths, repeats, warmup=1)
    per_token = {f"router_{name}_us": 1e6 * s / q.shape[0] for name, s in seconds.items()}
    per_token["auto_path"] = "fused" if router.fused else "propagate"
    per_token["edges"] = int(edge_index.shape[1])
    return per_token


def sweep_rounds(args) -> List[dict]:
    base = dict(d_model=args.d_model, n_heads=8, n_layers=1, max_seq_len=args.seq)
    configs = {"dense": GoHConfig(**base),
               "0 (MoH, linear)": GoHConfig(**base, router="linear", n_shared_heads=2, top_k_heads=4)}
    for rounds in (1, 2, 3):
        configs[f"{rounds}"] = GoHConfig(**base, **{**GOH, "router_rounds": rounds}, n_shared_heads=2, top_k_heads=4)
    result = compare_blocks(configs, args.batch, args.seq, args.repeats)
    return [{"rounds": name, **values} for name, values in result.items() if name != "dense"]


def sweep_experts(args) -> List[dict]:
    rows = []
    base = GoHConfig(d_model=args.d_model, n_heads=8, n_layers=1, max_seq_len=args.seq)
    for experts in args.sweeps["experts"]:
        # top-2 experts of half the dense FFN width: the same active FFN size as the dense layer
        moe = dict(n_experts=experts, top_k_experts=2, expert_hidden=base.hidden_dim // 2)
        configs = {"dense": base, "SMoE": base.replace(ffn="moe", **moe),
                   "GoH-MoE": base.replace(ffn="graph-moe", n_subtokens=2, **moe)}
        result = compare_blocks(configs, args.batch, args.seq, args.repeats)
        rows += [{"experts": experts, "ffn": name, **result[name]} for name in ("SMoE", "GoH-MoE")]
    return rows


def sweep_seq(args) -> List[dict]:
    rows = []
    base = dict(d_model=args.d_model, n_heads=8, n_layers=1, max_seq_len=2048)
    for seq in args.sweeps["seq"]:
        configs = {"dense": GoHConfig(**base),
                   "GoH": GoHConfig(**base, **GOH, n_shared_heads=2, top_k_heads=4)}
        batch = max(1, args.batch * args.seq // seq)
        rows.append({"seq": seq, "batch": batch, **compare_blocks(configs, batch, seq, args.repeats)["GoH"]})
    return rows


def print_table(title: str, rows: List[dict], columns: List[str]) -> None:
    print(f"\n{title}\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("| " + " | ".join(cells) + " |")


def plot(heads_rows, rounds_rows, expert_rows, seq_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, ((a, b), (c, d)) = plt.subplots(2, 2, figsize=(11, 8))
    for graph, marker in (("complete", "o"), ("ring", "s")):
        rows = [r for r in heads_rows if r["graph"] == graph]
        heads = [r["heads"] for r in rows]
        a.loglog(heads, [r["router_fused_us"] for r in rows], marker=marker, label=f"{graph}: fused (heads²)")
        a.loglog(heads, [r["router_propagate_us"] for r in rows], marker=marker, linestyle="--",
                 label=f"{graph}: propagate (edges)")
    a.set(title="head router alone, fwd+bwd", xlabel="heads", ylabel="µs per token")
    for graph in ("complete", "ring"):
        _plot_time_and_memory(b, [r for r in heads_rows if r["graph"] == graph], "heads", f"GoH {graph}")
    b.loglog([r["seq"] for r in seq_rows], [r["time_ratio"] for r in seq_rows], marker="^",
             label="GoH 8 heads vs seq len: time (x = seq)")
    b.set(title="GoH block / dense block (per token)", xlabel="heads  (or sequence length, ^)", ylabel="ratio")
    for ffn in ("SMoE", "GoH-MoE"):
        _plot_time_and_memory(c, [r for r in expert_rows if r["ffn"] == ffn], "experts", ffn)
    c.set(title="expert block / dense block (top-2, equal active FFN)", xlabel="experts", ylabel="ratio")
    labels = [r["rounds"] for r in rounds_rows]
    d.bar(range(len(labels)), [r["time_ratio"] for r in rounds_rows], color="tab:blue", alpha=0.8)
    d.set_xticks(range(len(labels)), labels=labels)
    d.axhline(1.0, color="gray", linewidth=0.8)
    d.set(title="router rounds: block time / dense", xlabel="rounds", ylabel="ratio")
    for axes, ticks in ((a, [8, 16, 32, 64]), (b, [8, 16, 32, 64, 128, 512, 2048]), (c, [8, 16, 32, 64])):
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.set_xticks(ticks, labels=[str(t) for t in ticks])
        axes.grid(alpha=0.3, which="both")
        axes.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _plot_time_and_memory(axes, rows: List[dict], x_key: str, label: str) -> None:
    """Time ratio (solid) and memory ratio (dotted) of ``rows`` against ``row[x_key]``, log-log."""
    x = [r[x_key] for r in rows]
    axes.loglog(x, [r["time_ratio"] for r in rows], marker="o", label=f"{label}: time")
    axes.loglog(x, [r["memory_ratio"] for r in rows], marker="x", linestyle=":", label=f"{label}: memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "scaling.png")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in seconds: d_model 64, 2 sizes per sweep, 1 repeat (not a measurement)")
    args = parser.parse_args()
    args.sweeps = QUICK_SWEEPS if args.quick else SWEEPS
    if args.quick:
        args.d_model, args.seq, args.batch, args.repeats = 64, 16, 1, 1
    torch.set_num_threads(args.threads)
    print(f"one GoHBlock fwd+bwd, d_model={args.d_model}, {args.batch * args.seq} tokens per call, float32, "
          f"{args.threads} threads, torch {torch.__version__}; ratios to the dense block of the same size")

    heads_rows = sweep_heads(args)
    print_table("heads (GoH: 2 rounds, flow, H/4 shared + H/2 routed active; router alone in µs/token)", heads_rows,
                ["heads", "graph", "edges", "router_fused_us", "router_propagate_us", "auto_path",
                 "time_ratio", "memory_ratio"])
    rounds_rows = sweep_rounds(args)
    print_table("router rounds (8 heads, complete graph, 2 shared + top-4)", rounds_rows,
                ["rounds", "us_per_token", "time_ratio", "memory_ratio"])
    expert_rows = sweep_experts(args)
    print_table("experts (top-2, expert_hidden = dense hidden / 2; GoH-MoE: 2 sub-tokens)", expert_rows,
                ["experts", "ffn", "us_per_token", "time_ratio", "memory_ratio"])
    seq_rows = sweep_seq(args)
    print_table("sequence length (GoH, 8 heads, complete)", seq_rows,
                ["seq", "batch", "us_per_token", "time_ratio", "memory_ratio"])
    plot(heads_rows, rounds_rows, expert_rows, seq_rows, args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
