"""Data (DDP), expert (EP) and tensor parallel (TP) on 2 gloo processes: tokens/s and bytes exchanged.

    python benchmarks/bench_parallel.py            # launches itself under torchrun, 2 ranks, CPU
    python benchmarks/bench_parallel.py --quick    # a smoke run

One training step = forward + backward + AdamW of a small MoE GoHTransformer on each rank's half
of a global batch. Honest about CPU: two gloo processes on a shared 2-core machine say nothing
about speed at scale; what this measures exactly is the *volume* each scheme exchanges, printed
beside its formula:

* DDP all-reduces every replicated gradient each step: ``P x b`` bytes (``P`` parameters of
  dtype size ``b``) per rank, counted by a DDP communication hook. A ring all-reduce sends
  ``2 (N-1)/N`` times that per rank. Under EP the expert shards are left out of it.
* EP's all-to-all sends each kept (sub-token, expert) row to its expert's rank and back. Summed
  over ranks, per MoE layer and forward, each way:
  ``tokens x top-k x d_model x b x (N-1)/N`` when the routed experts are spread uniformly over
  ranks (the issue's formula); the measured count (``ExpertParallelDispatcher.sent_bytes``) is
  printed beside it, with the same formula evaluated at the measured off-rank fraction, which it
  equals exactly. The backward exchanges the same volume again.
* TP (:mod:`gohgraph.parallel.tensor_parallel`) runs a dense-FFN GoH model of the same shape (graph
  router, inter-head flow; TP does not shard MoE layers), every rank on the *whole* batch of ``T``
  tokens. Bytes sent per rank and step, counted by ``TensorParallelTraffic`` (ring collectives):
  forward ``L [2 x T d b x 2(N-1)/N  +  T H d_h b (N-1)/N (queries to the router)  +  T H d_h b (N-1)/N
  (head outputs for flow)]``, backward ``L [2 x T d b x 2(N-1)/N  +  T H^2 b (N-1)/N (mixing rows)  +
  T H d_h b x 2(N-1)/N (flow gradients, gloo's all-reduce)]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.parallel import data_parallel as D
from gohgraph.parallel.expert_parallel import ExpertParallelDispatcher, apply_expert_parallel, is_expert_shard
from gohgraph.parallel.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

N_RANKS = 2


def model_config(quick: bool) -> GoHConfig:
    return GoHConfig(vocab_size=256, d_model=64 if quick else 128, n_layers=2, n_heads=4, ffn="moe",
                     n_experts=8, top_k_experts=2, max_seq_len=129, balance_loss_coef=0.0)


def tensor_parallel_config(cfg: GoHConfig) -> GoHConfig:
    """The MoE model's shape with dense FFNs and GoH's router with flow: what TP shards."""
    return GoHConfig(**{**cfg.to_dict(), "ffn": "dense", "router": "graph", "inter_head_flow": True})


def run(mode: str, cfg: GoHConfig, ctx: D.DistContext, batch: int, seq: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = GoHTransformer(cfg).train()
    reduced = [0]
    if mode == "tp":  # every rank runs the whole batch; nothing to wrap
        wrapped = apply_tensor_parallel(model)
        traffic = tensor_parallel_plan(model).traffic
    else:
        if mode == "ep":
            apply_expert_parallel(model)
        wrapped = D.wrap_model(model, ctx)

        def count_allreduce(state, bucket):  # DDP's default all-reduce, counting what it reduces
            reduced[0] += bucket.buffer().numel() * bucket.buffer().element_size()
            work = dist.all_reduce(bucket.buffer() / ctx.world_size, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])

        wrapped.register_comm_hook(None, count_allreduce)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    local = batch // ctx.world_size if mode != "tp" else batch
    ranks_batches = ctx.world_size if mode != "tp" else 1
    dispatchers = [m.dispatcher for m in model.modules() if isinstance(getattr(m, "dispatcher", None),
                                                                         ExpertParallelDispatcher)]
    times = []
    for step in range(steps + 1):  # step 0 warms up and is not counted
        x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(step))
        x = x[ctx.rank % ranks_batches * local:(ctx.rank % ranks_batches + 1) * local]
        if step == 1:
            reduced[0] = 0
            for dispatcher in dispatchers:
                dispatcher.sent_bytes = 0
            if mode == "tp":
                traffic.reset()
        dist.barrier()
        started = time.perf_counter()
        out = wrapped(x, labels=x)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.barrier()
        if step:
            times.append(time.perf_counter() - started)
    replicated = sum(p.numel() * p.element_size() for p in model.parameters() if not is_expert_shard(model, p))
    sent = torch.tensor([float(sum(d.sent_bytes for d in dispatchers))])
    dist.all_reduce(sent)
    result = {"tokens_per_s": batch * seq * steps / sum(times), "allreduce_bytes": reduced[0] / steps,
              "replicated_bytes": replicated, "a2a_bytes_all_ranks": float(sent) / steps,
              "n_moe_layers": len(dispatchers)}
    if mode == "tp":
        result.update(tp_forward=traffic.sent_bytes_forward / steps, tp_backward=traffic.sent_bytes_backward / steps)
    return result


def tensor_parallel_formula(cfg: GoHConfig, tokens: int, n: int, b: int) -> tuple:
    """Bytes one rank sends per step under TP (module docstring): ``(forward, backward)``."""
    d, heads, head_dim, ring = cfg.d_model, cfg.n_heads, cfg.head_dim, (n - 1) / n
    forward = cfg.n_layers * (2 * tokens * d * b * 2 * ring + 2 * tokens * heads * head_dim * b * ring)
    backward = cfg.n_layers * (2 * tokens * d * b * 2 * ring + tokens * heads ** 2 * b * ring
                               + tokens * heads * head_dim * b * 2 * ring)
    return forward, backward


def worker(quick: bool) -> None:
    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    cfg = model_config(quick)
    batch, seq, steps = (4, 32, 2) if quick else (8, 128, 5)
    results = {mode: run(mode, cfg, ctx, batch, seq, steps) for mode in ("dp", "ep")}
    tp_cfg = tensor_parallel_config(cfg)
    results["tp"] = run("tp", tp_cfg, ctx, batch, seq, steps)
    if ctx.is_main:
        n, b, k, d = ctx.world_size, 4, cfg.top_k_experts, cfg.d_model
        tokens = batch * seq
        print(f"{n} gloo ranks, CPU, fp32; MoE d_model={d}, E={cfg.n_routed_experts}, top-{k}, "
              f"{cfg.n_layers} layers; global batch {batch} x {seq} = {tokens} tokens/step; {steps} timed steps")
        print(f"{'':4} {'tokens/s':>9} {'all-reduce B/step/rank':>23} {'formula P*b':>12} "
              f"{'all-to-all B/step (all ranks, fwd)':>35} {'formula':>10}")
        for mode, r in results.items():
            if mode == "tp":
                print(f"{mode:4} {r['tokens_per_s']:>9,.0f} {'-':>23} {'-':>12} {'-':>35} {'-':>10}")
                continue
            layers = r["n_moe_layers"]
            uniform = 2 * layers * tokens * k * d * b * (n - 1) / n  # both ways, every MoE layer
            a2a = f"{r['a2a_bytes_all_ranks']:>35,.0f} {uniform:>10,.0f}" if layers else f"{'-':>35} {'-':>10}"
            print(f"{mode:4} {r['tokens_per_s']:>9,.0f} {r['allreduce_bytes']:>23,.0f} "
                  f"{r['replicated_bytes']:>12,} {a2a}")
        ep = results["ep"]
        rows = ep["a2a_bytes_all_ranks"] / (2 * ep["n_moe_layers"] * d * b)
        print(f"EP all-to-all: formula = 2 (ways) x {ep['n_moe_layers']} layers x tokens x top-k x d_model x b x "
              f"(N-1)/N; measured off-rank fraction {rows / (tokens * k):.4f} vs (N-1)/N = {(n - 1) / n:.4f} "
              f"(the measured count is 2 x layers x {rows:.0f} off-rank rows x d_model x b exactly); "
              "the backward exchanges the same again. A ring all-reduce sends 2(N-1)/N x the reduced bytes.")
        tp, (forward, backward) = results["tp"], tensor_parallel_formula(tp_cfg, tokens, n, b)
        print(f"TP (dense FFN, graph router with flow, every rank on all {tokens} tokens): bytes sent per rank "
              f"and step: forward {tp['tp_forward']:,.0f} (formula {forward:,.0f}), backward "
              f"{tp['tp_backward']:,.0f} (formula {backward:,.0f}); formula = L [2 x T d b x 2(N-1)/N "
              "+ 2 T H d_h b (N-1)/N] forward, L [2 x T d b x 2(N-1)/N + T H^2 b (N-1)/N + "
              "T H d_h b x 2(N-1)/N] backward (module docstring of gohgraph.parallel.tensor_parallel)")
    D.shutdown(ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (small model, 2 steps)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.quick)
        return
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={N_RANKS}",
               __file__, "--worker"] + (["--quick"] if args.quick else [])
    sys.exit(subprocess.call(command, env=dict(os.environ, OMP_NUM_THREADS="1")))


if __name__ == "__main__":
    main()
