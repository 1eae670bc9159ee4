"""The comparison table: dense MHA, MoH, GoH, SMoE, fine-grained SMoE, MH-MoE and GoH-MoE at
matched total parameters, trained on the same tokens with the same seeds and schedule, for any
training task (``lm``, ``mlm``, ``classify``, ``seq2seq``: :mod:`gohgraph.training.tasks`).

Every variant is a :class:`~gohgraph.GoHConfig` (docs/index.md), so the comparison only changes
config fields. The steps, in the order :func:`run_comparison` runs them:

1. :func:`~gohgraph.experiments.variants.comparison_variants` - the seven configurations of
   one model shape, each changing one thing against dense.
2. :func:`~gohgraph.experiments.variants.match_parameters` - every variant resized to the
   dense model's parameter count, the mismatch recorded.
3. :func:`gohgraph.training.trainer.train` per (seed, variant), seed-major so machine noise spreads over all
   variants; the final validation loss over a fixed validation set (the task's own evaluation, and
   its scores such as accuracy); routing statistics from
   :func:`gohgraph.analysis.stats.collect.collect_routing_stats` for ``lm``, from the run's last
   logged routing summary (``metrics.csv``) for the other tasks.
4. :func:`measure_training_cost` - training throughput of every variant, timed interleaved
   (dense, MoH, ..., dense, MoH, ...) and reduced by the median, plus the memory one training step
   holds (deterministic: see :class:`TrainingCost`).
5. :func:`~gohgraph.experiments.report.render_table` (Markdown, ``compare.md``) and
   :func:`~gohgraph.experiments.report.plot_loss_curves` (``compare_loss.png``).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from ..analysis.flops import count_flops
from ..analysis.stats.collect import collect_routing_stats
from ..analysis.timing import interleaved_median_seconds, saved_tensor_bytes
from ..config import GoHConfig
from ..data.batches import eval_batches, train_batch
from ..data.corpus import Corpus
from ..models.families import family_of
from ..training.config import TrainConfig
from ..training.metrics import read_metrics
from ..training.tasks import Task, get_task
from ..training.trainer import evaluate, train
from .records import Comparison, SeedRun, TrainingCost
from .report import plot_loss_curves, render_table
from .variants import MatchedVariant

ADAMW_BYTES_PER_PARAM = 16  # float32 weight, gradient and AdamW's two moments


def run_comparison(variants: Dict[str, MatchedVariant], train_config: TrainConfig, corpus: Corpus,
                   out_dir: Path, seeds: Sequence[int] = (0, 1, 2), final_eval_batches: Optional[int] = None,
                   stats_batches: int = 4, timing_repeats: int = 10, run_dir: Optional[Path] = None,
                   progress: bool = True, description: str = "", task: str = "lm") -> Comparison:
    """Train every variant with every seed, measure cost, write ``compare.md``, ``compare.json``
    and ``compare_loss.png`` into ``out_dir``; return the :class:`Comparison`.

    ``corpus`` is ``task``'s data (what its :meth:`~gohgraph.training.tasks.base.Task.load_data`
    returns: a corpus for ``lm`` and ``mlm``, labelled texts, pairs), and every variant is a model
    of its family (:func:`~gohgraph.experiments.variants.task_variants`).

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
                               progress=False, task=task)
                runs.append(_seed_run(get_task(task), name, seed, result, corpus, config, final_eval_batches,
                                      stats_batches))
                _log(progress, f"{name:>18} seed {seed}: val loss {runs[-1].val_loss:.4f} "
                               f"({runs[-1].train_tokens_per_s:.0f} tok/s)")
    costs = measure_training_cost({name: v.config for name, v in variants.items()}, corpus,
                                  train_config.batch_size, train_config.seq_len, timing_repeats, task=task)
    comparison = Comparison(variants, runs, costs, train_config, description, time.perf_counter() - started, task)
    (out_dir / "compare.md").write_text(render_table(comparison) + "\n", encoding="utf-8")
    (out_dir / "compare.json").write_text(json.dumps(_to_json(comparison), indent=2) + "\n", encoding="utf-8")
    plot_loss_curves({name: [run.val_history for run in comparison.runs_of(name)] for name in variants},
                     out_dir / "compare_loss.png",
                     final_losses={name: [run.val_loss for run in comparison.runs_of(name)] for name in variants},
                     curve_batches=train_config.eval_batches, final_batches=final_eval_batches)
    return comparison


def _seed_run(task: Task, name: str, seed: int, result, corpus, config: TrainConfig,
              final_eval_batches: Optional[int], stats_batches: int) -> SeedRun:
    model = result.model
    routed_heads = model.config.router != "dense"
    if task.name == "lm":  # the decoder's statistics over validation windows, as the table always had
        val_loss = evaluate(model, corpus.val, config.batch_size, config.seq_len, final_eval_batches)
        summary = collect_routing_stats(model, eval_batches(corpus.val, config.batch_size, config.seq_len,
                                                            stats_batches), progress=False).report()["summary"]
        head_cv, expert_cv, active = (summary.get("head_load_cv"), summary.get("expert_load_cv"),
                                      summary.get("active_heads_per_token"))
        scores = {}
    else:
        final = task.evaluate(model, corpus, config, final_eval_batches)
        val_loss, scores = final["loss"], {k: v for k, v in final.items() if k in task.evaluation_columns(corpus)}
        last = read_metrics(result.metrics_path)[-1]  # the last step's routing summary
        head_cv, expert_cv, active = (last.get("head_load_cv"), last.get("expert_load_cv"), last.get("active_heads"))
    return SeedRun(name, seed, val_loss, [tuple(entry) for entry in result.val_history], result.tokens_per_s,
                   head_load_cv=head_cv if routed_heads else None, expert_load_cv=expert_cv,
                   active_heads_per_token=active, scores=scores)


# ---------------------------------------------------------------------- 4. cost
def measure_training_cost(configs: Dict[str, GoHConfig], corpus: Corpus, batch_size: int, seq_len: int,
                          repeats: int = 10, warmup: int = 2, seed: int = 0, task: str = "lm"
                          ) -> Dict[str, TrainingCost]:
    """Time one AdamW training step of every variant, interleaved, on the same batch of ``task``'s
    data (``corpus``). Per token means per token the batch trains on (for ``lm`` the predicted
    tokens; for the other tasks its input tokens, padding included); a cached decode step is
    counted for decoders only."""
    torch.manual_seed(seed)
    spec = get_task(task)
    models = {name: family_of(config).model_class(config).train() for name, config in configs.items()}
    optimizers = {name: torch.optim.AdamW(model.parameters(), lr=1e-4) for name, model in models.items()}
    if spec.name == "lm":  # the windows the table has always timed
        windows = train_batch(corpus.train, batch_size, seq_len, seed, step=0)
        batch = {"input_ids": windows, "labels": windows}
        tokens = batch_size * seq_len
    else:
        batch = spec.training_batches(corpus, TrainConfig(batch_size=batch_size, seq_len=seq_len, seed=seed))(0, 0, 0, 1)
        tokens = spec.batch_tokens(batch)

    def loss_of(model):
        out = model(**batch)
        return getattr(out, spec.loss_field) + out.aux_loss

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
    generation = spec.family.generation  # a cached decode step continues a prompt: decoders
    generates_continuations = generation is not None and not generation.prompt_is_source
    return {name: TrainingCost(tokens / seconds[name], activation[name],
                               ADAMW_BYTES_PER_PARAM * models[name].num_parameters(),
                               count_flops(lambda m=model: loss_of(m).backward())[0] / tokens,
                               decode_flops_per_token(model, batch["input_ids"][:1]) if generates_continuations
                               else None)
            for name, model in models.items()}


def decode_flops_per_token(model, prompt: torch.Tensor) -> float:
    """FLOPs of one cached greedy decode step after ``prompt [1, seq]`` (what generation pays per token)."""
    was_training = model.training
    model.eval()
    model._set_decoding(True)
    try:
        with torch.inference_mode():
            cache = model.new_cache("static", prompt.shape[1] + 1)
            next_id = model(prompt, cache=cache).logits[:, -1:].argmax(-1)
            flops, _ = count_flops(lambda: model(next_id, cache=cache))
    finally:
        model._set_decoding(False)
        model.train(was_training)
    return float(flops)


def _to_json(comparison: Comparison) -> dict:
    return {
        "task": comparison.task,
        "train_config": comparison.train_config.to_dict(),
        "elapsed_s": comparison.elapsed_s,
        "variants": {name: {"config": v.config.to_dict(), "params": v.params, "target": v.target,
                            "mismatch": v.mismatch, "active_params": v.active_params,
                            "heads_active": v.heads_active, "experts_active": v.experts_active,
                            "matched_on": v.matched_on, "flops_per_token": v.flops_per_token}
                     for name, v in comparison.variants.items()},
        "runs": [asdict(run) for run in comparison.runs],
        "costs": {name: {**asdict(cost), "memory_mb": cost.memory_mb} for name, cost in comparison.costs.items()},
    }


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


def _log(enabled: bool, message: str) -> None:
    if enabled:
        print(message, flush=True)
