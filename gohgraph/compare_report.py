"""The comparison table and plot from a :class:`~gohgraph.compare.Comparison`: Markdown
(:func:`render_table`) and matplotlib (:func:`plot_loss_curves`); the arithmetic of the table
(:func:`loss_summary`, :func:`bits_per_byte`, :func:`is_tie`) lives here so tests can check it alone.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence, Tuple

if TYPE_CHECKING:
    from .compare import Comparison


def loss_summary(losses: Sequence[float]) -> Tuple[float, Optional[float]]:
    """(mean, spread) of per-seed losses; the spread is the sample standard deviation (None for one seed)."""
    values = [float(v) for v in losses]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def bits_per_byte(loss_nats: float) -> float:
    """Bits per byte of a byte-level model: cross-entropy in nats per byte / ln 2."""
    return loss_nats / math.log(2)


def is_tie(a: Sequence[float], b: Sequence[float]) -> bool:
    """Two seed sets tie when their means differ by no more than the sum of their spreads."""
    (mean_a, spread_a), (mean_b, spread_b) = loss_summary(a), loss_summary(b)
    return abs(mean_a - mean_b) <= (spread_a or 0.0) + (spread_b or 0.0)


def render_table(comparison: Comparison, reference: str = "dense") -> str:
    """The Markdown comparison table, one row per variant, rows in the order of ``comparison.variants``.

    Loss columns are means over seeds ``± sample standard deviation``; "vs dense" is the difference
    of the means, marked "(tie)" when within the summed spreads (:func:`is_tie`).
    """
    tc = comparison.train_config
    seeds = sorted({run.seed for run in comparison.runs})
    reference_losses = [run.val_loss for run in comparison.runs_of(reference)]
    reference_cost = comparison.costs.get(reference)
    lines = [
        f"| variant | params (vs {reference}) | active params / token | heads active | experts active "
        f"| val loss (nats) | bits / byte | vs {reference} | train tok/s vs {reference} | train step memory (MB) "
        "| load CV heads / experts |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, variant in comparison.variants.items():
        runs = comparison.runs_of(name)
        losses = [run.val_loss for run in runs]
        mean, spread = loss_summary(losses)
        spread_text = f" ± {spread:.3f}" if spread is not None else ""
        bpb_spread = f" ± {bits_per_byte(spread):.3f}" if spread is not None else ""
        if name == reference or not reference_losses:
            versus = "-"
        else:
            delta = mean - loss_summary(reference_losses)[0]
            versus = f"{delta:+.3f}" + (" (tie)" if is_tie(losses, reference_losses) else "")
        cost = comparison.costs.get(name)
        speed = f"{cost.tokens_per_s / reference_cost.tokens_per_s:.2f}x" if cost and reference_cost else "-"
        memory = f"{cost.memory_mb:.1f}" if cost else "-"
        lines.append(
            f"| {name} | {variant.params:,} ({variant.mismatch:+.2%}) | {variant.active_params:,} "
            f"| {variant.heads_active} | {variant.experts_active} | {mean:.3f}{spread_text} "
            f"| {bits_per_byte(mean):.3f}{bpb_spread} | {versus} | {speed} | {memory} "
            f"| {_mean_or_dash(r.head_load_cv for r in runs)} / {_mean_or_dash(r.expert_load_cv for r in runs)} |")
    first = next(iter(comparison.variants.values()))
    cfg = first.config
    lines += [
        "",
        f"{len(seeds)} seed(s) {seeds}; d_model={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        f"{first.target:,} target parameters; {tc.max_steps} steps x {tc.batch_size} x {tc.seq_len} tokens "
        f"= {tc.max_steps * tc.batch_size * tc.seq_len:,} training tokens, lr {tc.lr}, warmup {tc.warmup_steps}. "
        "Validation loss: mean over seeds ± sample std; bits/byte = loss / ln 2 (byte tokens). "
        "Throughput: median of interleaved AdamW steps in one process. Memory: tensors saved for "
        "backward + 16 B/parameter (weights, grads, AdamW moments), counted. Load CV: coefficient of "
        "variation of routed-head / routed-expert load (gohgraph.stats), mean over layers and seeds.",
    ]
    if comparison.description:
        lines.append(comparison.description)
    return "\n".join(lines)


def _mean_or_dash(values: Iterable[Optional[float]]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.fmean(present):.2f}" if present else "-"


def plot_loss_curves(histories: Dict[str, List[List[Tuple[int, int, float]]]], path: Path) -> Path:
    """Validation loss against training tokens, one line per variant (mean over seeds, min-max band).

    ``histories[name]`` holds one ``[(step, tokens_seen, val_loss), ...]`` list per seed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, seeds in histories.items():
        seeds = [s for s in seeds if s]
        if not seeds:
            continue
        length = min(len(s) for s in seeds)
        tokens = [seeds[0][i][1] for i in range(length)]
        per_point = [[s[i][2] for s in seeds] for i in range(length)]
        means = [statistics.fmean(values) for values in per_point]
        line, = axes.plot(tokens, means, marker="o", markersize=3, label=name)
        if len(seeds) > 1:
            axes.fill_between(tokens, [min(v) for v in per_point], [max(v) for v in per_point],
                              color=line.get_color(), alpha=0.15)
    axes.set_xlabel("training tokens")
    axes.set_ylabel("validation loss (nats / byte)")
    axes.set_title("matched-parameter comparison (mean over seeds, band = min-max)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

