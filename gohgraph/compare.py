"""The comparison table: dense MHA, MoH, GoH, SMoE, fine-grained SMoE, MH-MoE and GoH-MoE at
matched total parameters, trained on the same tokens with the same seeds and schedule.

Every variant is a :class:`~gohgraph.GoHConfig` (DESIGN.md §1), so the comparison only changes
config fields. The steps, in the order :func:`run_comparison` runs them:

1. :func:`comparison_variants` - the seven configurations of one model shape; attention variants
   keep the dense FFN, expert variants keep dense attention, so each row changes one thing.
2. :func:`match_parameters` - every variant is resized to the dense model's total parameter count
   (``ffn_hidden`` for dense FFNs; ``expert_hidden`` and, where its step is too coarse,
   ``n_experts`` for expert FFNs) and the relative mismatch is recorded.
3. :func:`gohgraph.train.train` per (seed, variant), seed-major so machine noise spreads over all
   variants; the final validation loss over a fixed validation set; routing statistics from
   :func:`gohgraph.stats.collect_routing_stats`.
4. :func:`measure_training_cost` - training throughput of every variant, timed interleaved
   (dense, MoH, ..., dense, MoH, ...) and reduced by the median, plus the memory one training step
   holds (deterministic: see :class:`TrainingCost`).
5. :func:`~gohgraph.compare_report.render_table` (Markdown, ``compare.md``) and
   :func:`~gohgraph.compare_report.plot_loss_curves` (``compare_loss.png``).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

# the table and plot are re-exported: ``from gohgraph.compare import render_table``
from .compare_report import bits_per_byte, is_tie, loss_summary, plot_loss_curves, render_table  # noqa: F401
from .config import GoHConfig
from .data import Corpus, eval_batches, train_batch
from .model import GoHTransformer
from .stats import collect_routing_stats
from .train import TrainConfig, evaluate, train

VARIANT_NAMES = ("dense", "MoH", "GoH", "SMoE", "fine-grained SMoE", "MH-MoE", "GoH-MoE")
MATCH_TOLERANCE = 0.02
ADAMW_BYTES_PER_PARAM = 16  # float32 weight, gradient and AdamW's two moments

# Model shape and schedule of the two settings; ``gohgraph bench --quick`` runs the first.
# The graph routers use one round of 8-wide node features: over 6 seeds of the quick setting this
# beat MoH by 0.072 ± 0.058 nats (paired), while 2 rounds of 16 gave 0.033 ± 0.055 (BENCHMARKS.md).
SETTINGS: Dict[str, Tuple[dict, dict]] = {
    "quick": (
        dict(d_model=64, n_layers=2, n_heads=8, n_shared_heads=2, top_k_heads=4, router_dim=8,
             router_rounds=1, n_experts=8, top_k_experts=2, n_subtokens=2, fine_grained=2, max_seq_len=128),
        dict(batch_size=16, seq_len=64, max_steps=150, lr=3e-3, warmup_steps=15, aux_warmup_steps=15,
             eval_every=25, eval_batches=4),
    ),
    "full": (
        dict(d_model=128, n_layers=4, n_heads=8, n_shared_heads=2, top_k_heads=4, router_dim=8,
             router_rounds=1, n_experts=8, top_k_experts=2, n_subtokens=2, fine_grained=2, max_seq_len=256),
        dict(batch_size=16, seq_len=128, max_steps=1000, lr=2e-3, warmup_steps=50, aux_warmup_steps=50,
             eval_every=100, eval_batches=8),
    ),
}


# ---------------------------------------------------------------------- 1. variants
def comparison_variants(d_model: int, n_layers: int, n_heads: int, n_shared_heads: int, top_k_heads: int,
                        router_dim: int, router_rounds: int, n_experts: int, top_k_experts: int,
                        n_subtokens: int, fine_grained: int, max_seq_len: int,
                        names: Optional[Sequence[str]] = None) -> Dict[str, GoHConfig]:
    """The unmatched configurations by name (see :data:`VARIANT_NAMES`).

    MoH and GoH activate ``n_shared_heads + top_k_heads`` of ``n_heads`` heads per token; GoH routes
    with ``router_rounds`` of message passing over the complete head graph, inter-head flow on.
    Fine-grained SMoE splits every expert into ``fine_grained`` smaller ones and activates that many
    times more (DeepSeekMoE's granularity). MH-MoE and GoH-MoE split tokens into ``n_subtokens`` and
    have that many times more experts (the MH-MoE paper's parity with SMoE in total and active
    parameters).
    """
    base = GoHConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, router_dim=router_dim,
                     router_rounds=router_rounds, max_seq_len=max_seq_len)
    routed_heads = dict(n_shared_heads=n_shared_heads, top_k_heads=top_k_heads)
    experts = dict(n_experts=n_experts, top_k_experts=top_k_experts)
    # MH-MoE's parity (Huang et al. 2024): m sub-tokens of width d/m go to m times as many experts of
    # input width d/m, same top-k and hidden width, so total and active expert parameters both equal
    # SMoE's; the head and merge layers are what the matching then takes out of the expert width.
    sub_token_experts = dict(n_subtokens=n_subtokens, n_experts=n_experts * n_subtokens, top_k_experts=top_k_experts)
    variants = {
        "dense": base,
        "MoH": base.replace(router="linear", **routed_heads),
        "GoH": base.replace(router="graph", head_graph="complete", inter_head_flow=True, **routed_heads),
        "SMoE": base.replace(ffn="moe", **experts),
        "fine-grained SMoE": base.replace(ffn="moe", n_experts=n_experts * fine_grained,
                                          top_k_experts=top_k_experts * fine_grained),
        "MH-MoE": base.replace(ffn="mh-moe", **sub_token_experts),
        # node features at least as wide as the experts they score: with 8-wide features for 16
        # experts the bilinear expert scores are rank-deficient, and the full setting lost 0.05 nats
        "GoH-MoE": base.replace(ffn="graph-moe", router_dim=max(router_dim, sub_token_experts["n_experts"]),
                                **sub_token_experts),
    }
    if names is None:
        return variants
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise ValueError(f"variants {unknown} are not among {list(VARIANT_NAMES)}")
    return {name: variants[name] for name in names}


# ---------------------------------------------------------------------- 2. parameter matching
@dataclass
class MatchedVariant:
    """A variant resized to ``target`` parameters, counted as ``matched_on`` says (``"total"`` or
    ``"active"`` per token); ``mismatch`` is that count over the target, minus 1."""

    name: str
    config: GoHConfig
    params: int
    target: int
    active_params: int
    heads_active: str  # "6/8"
    experts_active: str  # "2/8", "2x2/8" (sub-tokens x top-k of routed experts), "-" without experts
    matched_on: str = "total"

    @property
    def mismatch(self) -> float:
        matched = self.params if self.matched_on == "total" else self.active_params
        return matched / self.target - 1.0


def match_parameters(variants: Dict[str, GoHConfig], reference: str = "dense",
                     tolerance: float = MATCH_TOLERANCE, on: str = "total") -> Dict[str, MatchedVariant]:
    """Resize every variant to the parameter count of ``variants[reference]``: its ``"total"``
    count (the default), or its ``"active"`` count per token (expert models then grow in total size,
    the compute-matched setting of the MH-MoE paper).

    Raises ``ValueError`` if a variant cannot be brought within ``tolerance`` (relative).
    """
    if reference not in variants:
        raise ValueError(f"reference={reference!r} is not among the variants {list(variants)}")
    if on not in MATCH_ON:
        raise ValueError(f"on={on!r} is not one of {list(MATCH_ON)}")
    count = MATCH_ON[on]
    target = count(variants[reference])
    matched = {}
    for name, config in variants.items():
        fitted = config if name == reference else _fit_to_target(config, target, tolerance / 2, count)
        model = GoHTransformer(fitted)
        variant = MatchedVariant(name, fitted, model.num_parameters(), target, active_parameters(model),
                                 f"{fitted.active_heads}/{fitted.n_heads}", _experts_active(fitted), on)
        if abs(variant.mismatch) > tolerance:
            raise ValueError(f"variant {name!r} has {variant.mismatch:+.1%} {on} parameters "
                             f"from the target {target}; allowed: within {tolerance:.0%}")
        matched[name] = variant
    return matched


def count_parameters(config: GoHConfig) -> int:
    return GoHTransformer(config).num_parameters()


def count_active_parameters(config: GoHConfig) -> int:
    return active_parameters(GoHTransformer(config))


def active_parameters(model: GoHTransformer) -> int:
    """Parameters one token's computation uses: everything except the routed experts it skips.

    Every attention head counts as active: this implementation computes every head and zeroes the
    unselected ones (DESIGN.md §10, compute honesty). A token with ``m`` sub-tokens and top-``k``
    routing uses at most ``m * k`` routed experts.
    """
    from .moe import MoEFeedForward

    total = model.num_parameters()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            per_expert = sum(p.numel() for p in module.experts.parameters()) // module.n_routed
            used = min(module.n_routed, module.n_subtokens * module.top_k)
            total -= (module.n_routed - used) * per_expert
    return total


MATCH_ON: Dict[str, Callable[[GoHConfig], int]] = {"total": count_parameters, "active": count_active_parameters}


def _experts_active(config: GoHConfig) -> str:
    if config.ffn == "dense":
        return "-"
    per_token = f"{config.top_k_experts}" if config.n_subtokens == 1 else f"{config.n_subtokens}x{config.top_k_experts}"
    return f"{per_token}/{config.n_routed_experts}"


def _fit_to_target(config: GoHConfig, target: int, good_enough: float,
                   count: Callable[[GoHConfig], int] = count_parameters) -> GoHConfig:
    """The size knob (``ffn_hidden`` or ``expert_hidden``, then ``n_experts``) closest to ``target``.

    Parameters are affine in each knob, so two counts give the slope; the neighbours of the
    solution are then counted exactly. Expert counts are tried nearest-first from the configured
    one, and the first within ``good_enough`` wins (so the configured count is kept when it fits).
    """
    if config.ffn == "dense":
        return _fit_knob(config, "ffn_hidden", target, count)[0]
    best, best_error = config, math.inf
    base = config.n_experts
    spread = max(2, base // 4)
    for offset in sorted(range(-spread, spread + 1), key=lambda o: (abs(o), o)):
        n_experts = base + offset
        if n_experts - config.n_shared_experts < config.top_k_experts:
            continue
        fitted, error = _fit_knob(config.replace(n_experts=n_experts), "expert_hidden", target, count)
        if error <= good_enough:
            return fitted
        if error < best_error:
            best, best_error = fitted, error
    return best


def _fit_knob(config: GoHConfig, knob: str, target: int,
              count: Callable[[GoHConfig], int]) -> Tuple[GoHConfig, float]:
    low, high = 8, 16
    count_low = count(config.replace(**{knob: low}))
    slope = (count(config.replace(**{knob: high})) - count_low) / (high - low)
    guess = max(1, round(low + (target - count_low) / slope))
    candidates = [config.replace(**{knob: value}) for value in (guess - 1, guess, guess + 1) if value >= 1]
    errors = [abs(count(c) / target - 1.0) for c in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    return candidates[best], errors[best]


# ---------------------------------------------------------------------- 3. training runs
@dataclass
class SeedRun:
    """One trained (variant, seed): final validation loss (nats/token), its curve, routing balance."""

    variant: str
    seed: int
    val_loss: float
    val_history: List[Tuple[int, int, float]]  # (step, tokens_seen, val_loss)
    train_tokens_per_s: float
    head_load_cv: Optional[float] = None
    expert_load_cv: Optional[float] = None
    active_heads_per_token: Optional[float] = None


@dataclass
class TrainingCost:
    """Throughput and memory of one training step (forward, backward, AdamW) of one variant.

    ``tokens_per_s``: median over interleaved repeats. ``activation_bytes``: bytes of the distinct
    tensors autograd saves for backward in one step (``saved_tensors_hooks``; parameters excluded).
    ``state_bytes``: weights, gradients and AdamW moments, 16 bytes per float32 parameter.
    The memory is counted, not sampled, so it is the same on every run and machine.
    """

    tokens_per_s: float
    activation_bytes: int
    state_bytes: int

    @property
    def memory_mb(self) -> float:
        return (self.activation_bytes + self.state_bytes) / 2 ** 20


@dataclass
class Comparison:
    """Everything :func:`run_comparison` measured; :func:`render_table` turns it into the table."""

    variants: Dict[str, MatchedVariant]
    runs: List[SeedRun]
    costs: Dict[str, TrainingCost]
    train_config: TrainConfig
    description: str = ""
    elapsed_s: float = 0.0

    def runs_of(self, name: str) -> List[SeedRun]:
        return [run for run in self.runs if run.variant == name]


def run_comparison(variants: Dict[str, MatchedVariant], train_config: TrainConfig, corpus: Corpus,
                   out_dir: Path, seeds: Sequence[int] = (0, 1, 2), final_eval_batches: Optional[int] = None,
                   stats_batches: int = 4, timing_repeats: int = 10, run_dir: Optional[Path] = None,
                   progress: bool = True, description: str = "") -> Comparison:
    """Train every variant with every seed, measure cost, write ``compare.md``, ``compare.json``
    and ``compare_loss.png`` into ``out_dir``; return the :class:`Comparison`.

    The final validation loss is measured over ``final_eval_batches`` batches of the validation
    split (``None``: all of it), the same windows for every variant. Runs (checkpoints, metrics)
    go to ``run_dir``, or a temporary directory that is removed afterwards.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: List[SeedRun] = []
    with tempfile.TemporaryDirectory(prefix="gohgraph-bench-") as scratch:
        root = Path(run_dir) if run_dir is not None else Path(scratch)
        for seed in seeds:  # seed-major: a noisy minute on a shared machine hits every variant
            for name, variant in variants.items():
                config = TrainConfig(**{**train_config.to_dict(), "seed": seed, "tensorboard": False,
                                        "save_every": train_config.max_steps})
                result = train(variant.config, config, corpus, root / _slug(name) / f"seed{seed}",
                               progress=False)
                runs.append(_seed_run(name, seed, result, corpus, config, final_eval_batches, stats_batches))
                _log(progress, f"{name:>18} seed {seed}: val loss {runs[-1].val_loss:.4f} "
                               f"({runs[-1].train_tokens_per_s:.0f} tok/s)")
    costs = measure_training_cost({name: v.config for name, v in variants.items()}, corpus,
                                  train_config.batch_size, train_config.seq_len, timing_repeats)
    comparison = Comparison(variants, runs, costs, train_config, description, time.perf_counter() - started)
    (out_dir / "compare.md").write_text(render_table(comparison) + "\n", encoding="utf-8")
    (out_dir / "compare.json").write_text(json.dumps(_to_json(comparison), indent=2) + "\n", encoding="utf-8")
    plot_loss_curves({name: [run.val_history for run in comparison.runs_of(name)] for name in variants},
                     out_dir / "compare_loss.png")
    return comparison


def _seed_run(name: str, seed: int, result, corpus: Corpus, config: TrainConfig,
              final_eval_batches: Optional[int], stats_batches: int) -> SeedRun:
    model = result.model
    val_loss = evaluate(model, corpus.val, config.batch_size, config.seq_len, final_eval_batches)
    summary = collect_routing_stats(model, eval_batches(corpus.val, config.batch_size, config.seq_len,
                                                        stats_batches), progress=False).report()["summary"]
    routed_heads = model.config.router != "dense"
    return SeedRun(name, seed, val_loss, [tuple(entry) for entry in result.val_history], result.tokens_per_s,
                   head_load_cv=summary.get("head_load_cv") if routed_heads else None,
                   expert_load_cv=summary.get("expert_load_cv"),
                   active_heads_per_token=summary.get("active_heads_per_token"))


# ---------------------------------------------------------------------- 4. cost
def measure_training_cost(configs: Dict[str, GoHConfig], corpus: Corpus, batch_size: int, seq_len: int,
                          repeats: int = 10, warmup: int = 2, seed: int = 0) -> Dict[str, TrainingCost]:
    """Time one AdamW training step of every variant, interleaved, on the same batch."""
    torch.manual_seed(seed)
    models = {name: GoHTransformer(config).train() for name, config in configs.items()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    batch = train_batch(corpus.train, batch_size, seq_len, seed, step=0)

    def loss_of(model: GoHTransformer):
        out = model(batch, labels=batch)
        return out.lm_loss + out.aux_loss

    activation = {name: saved_tensor_bytes(lambda m=model: loss_of(m).backward(), exclude=model.parameters())
                  for name, model in models.items()}
    for model in models.values():
        model.zero_grad(set_to_none=True)

    def step(name: str):
        def run() -> None:
            loss_of(models[name]).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            models[name].update_routing_biases()
        return run

    seconds = interleaved_median_seconds({name: step(name) for name in models}, repeats, warmup)
    return {name: TrainingCost(batch_size * seq_len / seconds[name], activation[name],
                               ADAMW_BYTES_PER_PARAM * models[name].num_parameters())
            for name in models}


def interleaved_median_seconds(runs: Dict[str, Callable[[], object]], repeats: int,
                               warmup: int = 1) -> Dict[str, float]:
    """Median wall-clock seconds of every callable, timed in turn (a, b, c, a, b, c, ...) so that a
    noisy stretch of a shared machine hits all of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    samples: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def saved_tensor_bytes(run: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``run()`` builds its graph.

    The activation memory of a training step, counted rather than sampled: tensors sharing a
    storage count once, and storages of ``exclude`` (e.g. the parameters) not at all. ``run`` may
    call ``backward()`` itself; saved tensors are recorded when they are packed, in the forward pass.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    storages: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


def _to_json(comparison: Comparison) -> dict:
    return {
        "train_config": comparison.train_config.to_dict(),
        "elapsed_s": comparison.elapsed_s,
        "variants": {name: {"config": v.config.to_dict(), "params": v.params, "target": v.target,
                            "mismatch": v.mismatch, "active_params": v.active_params,
                            "heads_active": v.heads_active, "experts_active": v.experts_active}
                     for name, v in comparison.variants.items()},
        "runs": [asdict(run) for run in comparison.runs],
        "costs": {name: {**asdict(cost), "memory_mb": cost.memory_mb} for name, cost in comparison.costs.items()},
    }


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)
