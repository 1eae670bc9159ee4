"""Train the default graph-routed language model and look at how it routes.

    python examples/train_lm.py                      # preset tiny: about a minute on 2 CPU cores
    python examples/train_lm.py --preset small --max-steps 500
    python examples/train_lm.py --data my_texts/     # your own text files instead of the stdlib

Trains a GoH transformer (graph router, shared + top-k heads, inter-head flow) on the default
corpus (this Python's standard library, byte-level tokens), then collects routing statistics over
validation text and draws the routing pictures. Everything lands in ``runs/<name>/``:
checkpoints, ``final/`` (save_pretrained format), ``metrics.csv``, ``stats/`` and ``pictures/``.
Running it again continues the same run (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from gohgraph import GoHConfig
from gohgraph.data.batches import eval_batches
from gohgraph.data.corpus import load_corpus
from gohgraph.training.checkpoint import latest_checkpoint
from gohgraph.training.config import TrainConfig
from gohgraph.training.presets import PRESETS, get_preset
from gohgraph.training.trainer import evaluate, train

# validation tokens the token-trace picture draws (one column each; the picture refuses more)
TRACE_TOKENS = 64


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--max-steps", type=int, help="default: the preset's")
    parser.add_argument("--name", help="run name (default: the preset name)")
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="parent folder of runs")
    parser.add_argument("--data", help="text file, directory or glob (default: the Python standard library)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--stats-batches", type=int, default=8, help="validation batches for routing statistics")
    parser.add_argument("--fresh", action="store_true", help="delete an earlier run of this name first")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    run_dir = args.runs / (args.name or args.preset)
    model_kwargs, train_kwargs = get_preset(args.preset)
    if args.max_steps is not None:
        train_kwargs["max_steps"] = args.max_steps
    train_kwargs["device"] = args.device
    model_config, train_config = GoHConfig(**model_kwargs), TrainConfig(**train_kwargs)

    if args.fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    resume = latest_checkpoint(run_dir) is not None
    if resume:
        print(f"continuing the run in {run_dir} (pass --fresh to start over)")

    corpus = load_corpus(args.data)
    print(f"data: {corpus.source}: {len(corpus.train):,} train / {len(corpus.val):,} validation tokens")
    result = train(model_config, train_config, corpus, run_dir, resume=resume)

    # routing statistics and pictures over held-out text
    from gohgraph.analysis.stats.collect import collect_routing_stats
    from gohgraph.viz import write_all_pictures

    batches = eval_batches(corpus.val, train_config.batch_size, train_config.seq_len, args.stats_batches)
    stats = collect_routing_stats(result.model, batches)
    stats_dir = run_dir / "stats"
    stats_dir.mkdir(parents=True, exist_ok=True)
    stats_json = stats.to_json(stats_dir / "routing_stats.json")
    stats_csv = stats.to_csv(stats_dir / "routing_stats.csv")
    sample = corpus.decode(corpus.val[:TRACE_TOKENS].tolist())
    pictures = write_all_pictures(result.model, stats, run_dir / "pictures", text=sample,
                                  metrics_csv=result.metrics_path, encode=corpus.encode, decode=corpus.decode,
                                  trace_tokens=TRACE_TOKENS)

    print()
    print(f"model: {result.model.num_parameters():,} parameters, router={model_config.router}, "
          f"{model_config.n_shared_heads} shared + top-{model_config.top_k_heads} of "
          f"{model_config.n_routed_heads} routed heads per layer")
    if result.val_history:
        step, tokens, _ = result.val_history[-1]
        full = evaluate(result.model, corpus.val, train_config.batch_size, train_config.seq_len)
        covered = len(corpus.val) // train_config.seq_len * train_config.seq_len
        print(f"validation loss after {step} steps ({tokens:,} training tokens): {full:.3f} nats/token over the "
              f"whole validation split ({covered:,} tokens; ln 256 = 5.545 for a uniform byte model)")
    print(f"checkpoint:  {result.checkpoint_path}")
    print(f"final model: {result.final_path}")
    print(f"metrics:     {result.metrics_path}")
    print(f"stats:       {stats_json}, {stats_csv}")
    print(f"pictures:    {run_dir / 'pictures'} ({', '.join(p.name for p in pictures)})")
    return 0


def run_main() -> int:
    """``main()`` with the command line's contract: a user error is one line, Ctrl-C exits 130."""
    try:
        return main()
    except KeyboardInterrupt:
        print("train_lm: interrupted; run it again to continue from the last checkpoint", file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        print(f"train_lm: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(run_main())
