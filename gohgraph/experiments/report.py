"""The comparison table and plot from a :class:`~gohgraph.experiments.records.Comparison`: Markdown
(:func:`render_table`) and matplotlib (:func:`plot_loss_curves`); the arithmetic of the table
(:func:`loss_summary`, :func:`bits_per_byte`, :func:`is_tie`) lives here so tests can check it alone.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ..analysis.student_t import student_t_quantile
from .records import Comparison
from .variants import reference_of

SIGNIFICANCE_LEVEL = 0.05  # two-sided


def loss_summary(losses: Sequence[float]) -> Tuple[float, Optional[float]]:
    """(mean, spread) of per-seed losses; the spread is the sample standard deviation (None for one seed)."""
    values = [float(v) for v in losses]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def bits_per_byte(loss_nats: float) -> float:
    """Bits per byte of a byte-level model: cross-entropy in nats per byte / ln 2."""
    return loss_nats / math.log(2)


# the orderings the comparison is meant to test: (variant, the one it should beat)
TARGET_PAIRS = (("MoH", "dense"), ("GoH", "MoH"), ("GoH", "dense"), ("SMoE", "dense"),
                ("fine-grained SMoE", "SMoE"), ("MH-MoE", "SMoE"), ("GoH-MoE", "MH-MoE"),
                # MH-MoE's Table 3 orderings among BitNet models, and what 1.58 bits cost dense
                ("dense BitNet", "dense"), ("SMoE BitNet", "dense BitNet"), ("fine-grained SMoE BitNet", "SMoE BitNet"),
                ("MH-MoE BitNet", "SMoE BitNet"), ("GoH-MoE BitNet", "MH-MoE BitNet"),
                # Mixture-of-Recursions at matched parameters (twice the depth) and at dense's depth
                ("MoR expert-choice", "dense"), ("MoR token-choice", "dense"),
                ("MoR expert-choice (matched depth)", "dense"), ("MoR token-choice (matched depth)", "dense"),
                # MoSA: better than dense at equal compute in its paper (--match flops)
                ("mosa", "dense"))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample std of the per-seed differences ``a[i] - b[i]`` (same seed = same data
    order and schedule, so pairing removes the seed-to-seed variation both share)."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds differ in number: {len(a)} vs {len(b)}")
    return loss_summary([x - y for x, y in zip(a, b)])


def is_tie(a: Sequence[float], b: Sequence[float]) -> bool:
    """A paired two-sided t-test at 95%: true unless the per-seed differences ``a - b`` are
    significantly non-zero. One seed leaves no spread to test against, so it is always a tie."""
    mean, spread = paired_difference(a, b)
    if spread is None:
        return True
    if spread == 0:
        return mean == 0
    critical = student_t_quantile(1.0 - SIGNIFICANCE_LEVEL / 2, dof=len(a) - 1)
    return abs(mean) <= critical * spread / math.sqrt(len(a))


# what the loss column is, per training task (gohgraph.training.tasks)
TASK_LOSSES = {"lm": "next-token cross-entropy", "mlm": "masked-LM cross-entropy at the masked positions",
               "classify": "classification cross-entropy per text", "seq2seq": "target-token cross-entropy"}


# the tasks whose loss is per byte token (bits / byte = loss / ln 2); a text's class is not a byte
BYTE_TOKEN_LOSSES = ("lm", "mlm", "seq2seq")


def render_table(comparison: Comparison, reference: str = "dense") -> str:
    """The Markdown comparison table, one row per variant, rows in the order of ``comparison.variants``.

    Loss columns are means over seeds ``± sample standard deviation``; "vs dense" is the mean
    per-seed difference ``± its sample std`` (:func:`paired_difference`), marked "(tie)" when a
    paired t-test at 95% cannot tell it from 0 (:func:`is_tie`). A second table tests the orderings
    of :data:`TARGET_PAIRS` the same way.
    """
    tc = comparison.train_config
    seeds = sorted({run.seed for run in comparison.runs})
    reference_losses = [run.val_loss for run in comparison.runs_of(reference)]
    reference_cost = comparison.costs.get(reference)
    # the task's other final scores (accuracy, exact match, ...), one column each after the loss
    score_names = list(dict.fromkeys(name for run in comparison.runs for name in run.scores))
    lines = [
        f"| variant | params | active params / token | heads active | experts active "
        f"| val loss (nats) | bits / byte | vs {reference} | "
        + "".join(f"val {name.replace('_', ' ')} | " for name in score_names)
        + f"train tok/s vs {reference} | train step memory (MB) "
        "| train MFLOPs / token | decode MFLOPs / token | load CV heads / experts |",
        "|---|---|---|---|---|---|---|---|" + "---|" * len(score_names) + "---|---|---|---|---|",
    ]
    for name, variant in comparison.variants.items():
        runs = comparison.runs_of(name)
        losses = [run.val_loss for run in runs]
        mean, spread = loss_summary(losses)
        spread_text = f" ± {spread:.3f}" if spread is not None else ""
        bpb_spread = f" ± {bits_per_byte(spread):.3f}" if spread is not None else ""
        bits = f"{bits_per_byte(mean):.3f}{bpb_spread}" if comparison.task in BYTE_TOKEN_LOSSES else "-"
        versus = "-" if name == reference or not reference_losses else \
            _versus(comparison, name, reference)
        cost = comparison.costs.get(name)
        speed = f"{cost.tokens_per_s / reference_cost.tokens_per_s:.2f}x" if cost and reference_cost else "-"
        memory = f"{cost.memory_mb:.1f}" if cost else "-"
        total, active = f"{variant.params:,}", f"{variant.active_params:,}"
        train_flops = _flops(cost, 'train', reference_cost)
        if variant.matched_on == "total":  # the match is shown next to the count that was matched
            total += f" ({variant.mismatch:+.2%})"
        elif variant.matched_on == "active":
            active += f" ({variant.mismatch:+.2%})"
        elif name != reference:
            train_flops += f" (matched {variant.mismatch:+.2%})"
        lines.append(
            f"| {name} | {total} | {active} "
            f"| {variant.heads_active} | {variant.experts_active} | {mean:.3f}{spread_text} "
            f"| {bits} | {versus} | "
            + "".join(f"{_score(runs, score)} | " for score in score_names)
            + f"{speed} | {memory} "
            f"| {train_flops} | {_flops(cost, 'decode', reference_cost)} "
            f"| {_mean_or_dash(r.head_load_cv for r in runs)} / {_mean_or_dash(r.expert_load_cv for r in runs)} |")
    pairs = [(a, b) for a, b in TARGET_PAIRS if a in comparison.variants and b in comparison.variants]
    if pairs:
        lines += ["", "| ordering tested | paired difference (nats) | verdict |", "|---|---|---|"]
        for better, worse in pairs:
            lines.append(f"| {better} < {worse} | {_versus(comparison, better, worse)} "
                         f"| {_verdict(comparison, better, worse)} |")
    first = next(iter(comparison.variants.values()))
    cfg = first.config
    lines += [
        "",
        f"Task: `{comparison.task}` ({TASK_LOSSES.get(comparison.task, 'its validation loss')}). "
        f"{len(seeds)} seed(s) {seeds}; d_model={cfg.d_model}, {cfg.n_layers} layers, {cfg.n_heads} heads, "
        + (f"{first.target / 1e6:,.3f} M target training FLOPs per token, counted on one {tc.seq_len}-token sequence "
           f"(the 'matched' % is the match to {reference}; the column itself is counted on the timing batch)"
           if first.matched_on == "flops" else
           f"{first.target:,} target {first.matched_on} parameters (the % is the match to {reference})")
        + f"; {tc.max_steps} steps x {tc.batch_size} x {tc.seq_len} tokens "
        f"= {tc.max_steps * tc.batch_size * tc.seq_len:,} training tokens, lr {tc.lr}, warmup {tc.warmup_steps}"
        + (f", routed heads annealed from dense over the first {tc.dense_anneal_steps} steps"
           if tc.dense_anneal_steps else "") + ". "
        "Validation loss: mean over seeds ± sample std; bits/byte = loss / ln 2 (byte tokens); differences "
        "are per-seed (paired) means ± std, a tie when a paired t-test at 95% cannot tell them from 0. "
        "Throughput: median of interleaved AdamW steps in one process. FLOPs: counted by "
        "torch.utils.flop_counter on one training step and on one cached decode step after a full-length "
        "prompt (gohgraph.analysis.flops), with the ratio to the reference. Memory: tensors saved for "
        "backward + 16 B/parameter (weights, grads, AdamW moments), counted. Load CV: coefficient of "
        "variation of routed-head / routed-expert load (gohgraph.analysis.stats), mean over layers and seeds.",
    ]
    lines.append("What each row computes: " + "; ".join(
        f"**{name}**: {reference_of(variant.config)}" for name, variant in comparison.variants.items()) + ".")
    if comparison.description:
        lines.append(comparison.description)
    return "\n".join(lines)


def _score(runs, name: str) -> str:
    """``"0.812 ± 0.010"``: a final score's mean over seeds ± its sample std."""
    mean, spread = loss_summary([run.scores[name] for run in runs if name in run.scores])
    return f"{mean:.3f}" + (f" ± {spread:.3f}" if spread is not None else "")


def _paired_losses(comparison: Comparison, a: str, b: str) -> Tuple[List[float], List[float]]:
    losses_a = {run.seed: run.val_loss for run in comparison.runs_of(a)}
    losses_b = {run.seed: run.val_loss for run in comparison.runs_of(b)}
    seeds = sorted(set(losses_a) & set(losses_b))
    return [losses_a[s] for s in seeds], [losses_b[s] for s in seeds]


def _versus(comparison: Comparison, a: str, b: str) -> str:
    losses_a, losses_b = _paired_losses(comparison, a, b)
    mean, spread = paired_difference(losses_a, losses_b)
    return f"{mean:+.3f}" + (f" ± {spread:.3f}" if spread is not None else "") + \
        (" (tie)" if is_tie(losses_a, losses_b) else "")


def _verdict(comparison: Comparison, better: str, worse: str) -> str:
    losses_a, losses_b = _paired_losses(comparison, better, worse)
    if is_tie(losses_a, losses_b):
        return "tie (not significant)"
    return "holds" if paired_difference(losses_a, losses_b)[0] < 0 else "reversed"


def _flops(cost, kind: str, reference_cost) -> str:
    """``"12.3 (0.87x)"``: MFLOPs per token of ``kind`` ("train" or "decode") and the ratio to the reference."""
    value = getattr(cost, f"{kind}_flops_per_token", None) if cost else None
    if value is None:
        return "-"
    reference = getattr(reference_cost, f"{kind}_flops_per_token", None) if reference_cost else None
    return f"{value / 1e6:.2f}" + (f" ({value / reference:.2f}x)" if reference else "")


def _mean_or_dash(values: Iterable[Optional[float]]) -> str:
    present = [v for v in values if v is not None]
    return f"{statistics.fmean(present):.2f}" if present else "-"


def plot_loss_curves(histories: Dict[str, List[List[Tuple[int, int, float]]]], path: Path,
                     final_losses: Optional[Dict[str, List[float]]] = None,
                     curve_batches: Optional[int] = None, final_batches: Optional[int] = None) -> Path:
    """Validation loss against training tokens, and the table's final losses beside it.

    Left: one line per variant, the mean over seeds of ``histories[name]`` (one
    ``[(step, tokens_seen, val_loss), ...]`` list per seed), measured during training on
    ``curve_batches`` validation batches; no bands, which overlapped into one smear for seven
    variants. Right (with ``final_losses``): each variant's final loss per seed (dots) and mean
    (bar), on ``final_batches`` batches (``None`` = the whole validation split), i.e. the table's
    numbers; the curves' last points differ from them by the batches they saw, which both titles say.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if final_losses else 1
    figure, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4.5), squeeze=False,
                                gridspec_kw={"width_ratios": [7, 4][:panels]})
    curves, colours = axes[0][0], {}
    for name, seeds in histories.items():
        seeds = [s for s in seeds if s]
        if not seeds:
            continue
        length = min(len(s) for s in seeds)
        tokens = [seeds[0][i][1] for i in range(length)]
        means = [statistics.fmean(s[i][2] for s in seeds) for i in range(length)]
        line, = curves.plot(tokens, means, marker="o", markersize=3, label=name)
        colours[name] = line.get_color()
    curves.set_xlabel("training tokens")
    curves.set_ylabel("validation loss (nats / byte)")
    seen = f"{curve_batches} validation batches" if curve_batches else "validation batches"
    curves.set_title(f"during training: mean over seeds, on {seen}", fontsize=10)
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8)
    if final_losses:
        final = axes[0][1]
        names = [name for name in histories if final_losses.get(name)]
        for i, name in enumerate(names):
            values = final_losses[name]
            final.bar(i, statistics.fmean(values), color=colours.get(name), alpha=0.35)
            final.scatter([i] * len(values), values, color=colours.get(name), s=14, zorder=3)
        low = min(min(final_losses[n]) for n in names)
        high = max(max(final_losses[n]) for n in names)
        final.set_ylim(low - 0.15 * (high - low + 1e-3), high + 0.15 * (high - low + 1e-3))
        final.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=8)
        split = "the whole validation split" if final_batches is None else f"{final_batches} validation batches"
        final.set_title(f"final (the table): seeds and mean,\non {split}", fontsize=10)
        final.grid(alpha=0.3, axis="y")
    figure.suptitle("matched-parameter comparison", fontsize=11)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path

