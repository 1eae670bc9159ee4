"""Training throughput of dense, MoH and GoH attention at the ``small`` preset, in one run.

    python benchmarks/bench_train.py                 # a few minutes on 2 CPU cores
    python benchmarks/bench_train.py --steps 10 --threads 4 --seq-len 128
    python benchmarks/bench_train.py --compile       # each variant eager and through train --compile

Times the trainer's optimizer step (forward, backward, gradient clipping, AdamW, routing-bias
update; batches drawn exactly as :func:`gohgraph.training.trainer.train` draws them, no evaluation or
checkpointing) for three configurations of the same model, and reports

* tokens/s and the ratio to dense (measured in this run, same threads, same batches; the three
  variants take turns step by step and each keeps its fastest step, so background load on a shared
  machine slows them alike);
* with ``--compile``, each variant also through the trainer's ``torch.compile`` path
  (:class:`~gohgraph.training.compile.TrainingForward`, what ``gohgraph train --compile`` runs),
  its compile time (the first step) reported apart and excluded from the rate;
* model FLOPs utilisation (MFU): ``(6 N + 12 L d T) * tokens/s`` (PaLM's count; ``N`` all
  parameters, which with tied embeddings includes the output projection) divided by the rate of a
  large float32 matmul measured here. Every variant computes every head (routing gates heads, it
  does not skip them), so the model FLOPs are the dense count for all three.
"""

from __future__ import annotations

import argparse
import time

import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.data.batches import train_batch
from gohgraph.data.corpus import load_corpus
from gohgraph.training.compile import TrainingForward
from gohgraph.training.config import TrainConfig
from gohgraph.training.optim import build_optimizer
from gohgraph.training.presets import get_preset
from gohgraph.training.trainer import training_loss


def variants(model_kwargs: dict) -> dict:
    """Dense MHA, MoH (linear router) and GoH (the preset) at the same shape."""
    dense = dict(model_kwargs, router="dense", n_shared_heads=0, top_k_heads=None)
    moh = dict(model_kwargs, router="linear")
    return {"dense": dense, "MoH": moh, "GoH": dict(model_kwargs)}


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    """Best-of rate of a ``[size, size] @ [size, size]`` float32 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and allocator
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def model_flops_per_token(cfg: GoHConfig, seq_len: int, n_params: int) -> float:
    return 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq_len


def training_step(cfg: GoHConfig, tc: TrainConfig, tokens, compile: bool = False):
    """A function ``step(i) -> seconds`` running optimizer step ``i`` of a fresh model, eagerly or
    (``compile``) through the trainer's compiled forward and backward."""
    torch.manual_seed(0)
    model = GoHTransformer(cfg).train()
    optimizer = build_optimizer(model, tc.lr, tc.weight_decay, (tc.beta1, tc.beta2))
    forward = TrainingForward(model, compile)

    def step(index: int) -> float:
        start = time.perf_counter()
        batch = train_batch(tokens, tc.batch_size, tc.seq_len, tc.seed, index)

        def micro_step(call):
            out = call(batch, labels=batch)
            loss = training_loss(out, 1.0)
            loss.backward()
            return out, loss

        forward.run(micro_step)
        if compile and not forward.compiled:
            raise RuntimeError("torch.compile fell back to eager: nothing compiled to time")
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_routing_biases()
        return time.perf_counter() - start

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--compile", action="store_true", help="time each variant compiled too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_kwargs, train_kwargs = get_preset(args.preset)
    if args.batch_size:
        train_kwargs["batch_size"] = args.batch_size
    if args.seq_len:
        train_kwargs["seq_len"] = args.seq_len
    tc = TrainConfig(**train_kwargs)
    corpus = load_corpus()
    tokens_per_step = tc.batch_size * tc.seq_len
    print(f"torch {torch.__version__}, {args.threads} threads; preset {args.preset}: batch {tc.batch_size} x "
          f"seq {tc.seq_len} = {tokens_per_step} tokens/step; {args.steps} timed steps per variant after "
          f"{args.warmup}, variants interleaved step by step; fastest step and fastest matmul kept")

    configs = {name: GoHConfig(**kwargs) for name, kwargs in variants(model_kwargs).items()}
    steps = {name: training_step(cfg, tc, corpus.train) for name, cfg in configs.items()}
    if args.compile:
        for name, cfg in list(configs.items()):
            configs[f"{name} compiled"] = cfg
            steps[f"{name} compiled"] = training_step(cfg, tc, corpus.train, compile=True)
    fastest = {name: float("inf") for name in configs}
    first_step = {}
    peak = 0.0
    # one step of each variant in turn (rotating the order), keeping each one's fastest step: on a
    # shared machine background load then slows every variant and the matmul reference alike
    for index in range(args.warmup + args.steps):
        peak = max(peak, matmul_flops_per_s(repeats=2))
        names = list(configs)[index % len(configs):] + list(configs)[:index % len(configs)]
        for name in names:
            seconds = steps[name](index)
            if index == 0:
                first_step[name] = seconds
            if index >= args.warmup:
                fastest[name] = min(fastest[name], seconds)
    best = {name: tokens_per_step / seconds for name, seconds in fastest.items()}
    print(f"measured fp32 matmul (2048^3): {peak / 1e9:.1f} GFLOP/s")

    print(f"{'variant':14} {'params':>10} {'tokens/s':>10} {'vs dense':>9} {'GFLOP/s':>9} {'MFU':>7} "
          f"{'first step (s)':>15}")
    for name, cfg in configs.items():
        n_params = GoHTransformer(cfg).num_parameters()
        achieved = model_flops_per_token(cfg, tc.seq_len, n_params) * best[name]
        print(f"{name:14} {n_params:>10,} {best[name]:>10,.0f} {best[name] / best['dense']:>8.2f}x "
              f"{achieved / 1e9:>9.1f} {achieved / peak:>6.1%} {first_step[name]:>15.1f}")


if __name__ == "__main__":
    main()
