"""Expert parallelism over 2 gloo ranks (real torchrun) against one process on the concatenated batch.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2
tests/parallel/test_expert_parallel.py OUT_DIR DATA CACHE SINGLE_CHECKPOINT``. Each rank builds the
same model, keeps an unsharded copy as the single-process reference (run on the whole batch in the
same process), shards the other with ``apply_expert_parallel``, wraps it in DDP (then, again, in
FSDP2) and feeds it its half of the batch; then it runs ``train(..., expert_parallel=2)`` with DDP
and with FSDP2 for the replicated parameters. The numbers it measures are
written to ``rank{r}.json`` and the tests below check them; one torchrun launch serves them all.
"""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.parallel.expert_parallel import check_expert_parallel_layout, expert_routing_stats
from gohgraph.training.config import TrainConfig
from gohgraph.training.trainer import train, training_loss
from tests.parallel.determined_steps import ADAM_EPS, GRAD_ATOL, conditioned_adamw, weight_atol, weight_rtol

# top-2 of 4 routed experts plus a shared one, a capacity that drops, aux-loss-free bias (global
# load), z-loss on; the balance loss is off: it is a product of batch statistics, per rank as in DDP
MOE = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, ffn="moe", n_experts=5, n_shared_experts=1,
           top_k_experts=2, capacity_factor=0.75, max_seq_len=33, aux_free_bias=True, bias_update_rate=0.01,
           balance_loss_coef=0.0)
TRAIN = dict(batch_size=4, seq_len=32, grad_accum_steps=2, max_steps=3, lr=5e-3, warmup_steps=1,
             eval_every=3, eval_batches=2, save_every=3, device="cpu", tensorboard=False)
BATCH, SEQ, STEPS = 4, 16, 3
COMPARE_LR, COMPARE_CLIP = 1e-2, 0.05  # the AdamW steps of the worker's side-by-side loop
ROOT = Path(__file__).resolve().parents[2]  # the worker imports tests.parallel.determined_steps


def _text_file(directory: Path) -> Path:
    path = directory / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(300)))
    return path


def _worker_env() -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


def _eval_batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run the worker once under torchrun; ``(out_dir, [rank0, rank1] results, single-process train)``."""
    from gohgraph.data.corpus import load_corpus

    tmp = tmp_path_factory.mktemp("ep")
    data = _text_file(tmp)
    corpus = load_corpus(str(data), cache_dir=tmp / "cache")
    torch.manual_seed(123)  # a single-process checkpoint that the ranks load sharded (the reverse way)
    single_model = GoHTransformer(GoHConfig(**MOE)).eval()
    for layer in single_model.blocks:
        layer.ffn.gate.selection_bias.normal_(std=0.1)
    single_model.save_pretrained(tmp / "single_ckpt")
    (tmp / "single_logits.json").write_text(json.dumps(single_model(_eval_batch()).logits.tolist()))

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp / "out"), str(data), str(tmp / "cache"), str(tmp / "single_ckpt")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_worker_env())
    assert done.returncode == 0, done.stderr[-4000:]
    with conditioned_adamw():
        single = train(GoHConfig(**MOE), TrainConfig(**TRAIN), corpus, tmp / "single_run", progress=False)
    results = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, results, single


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_forward_losses_gradients_and_three_steps_equal_one_process(two_ranks, fsdp):
    _, results, _ = two_ranks
    for result in results:
        result = result["fsdp"] if fsdp else result
        assert result["steps"] == STEPS
        for name in ("logits", "lm_loss", "replicated_grads", "expert_grads", "grad_norm", "buffers"):
            assert max(result[name]) < GRAD_ATOL, (name, result[name])
        # AdamW with eps=1 on those gradients (determined_steps): the bound of its arithmetic
        tolerance = weight_atol(STEPS, COMPARE_LR, COMPARE_CLIP) + weight_rtol(STEPS) * result["parameter_magnitude"]
        assert max(result["parameters"]) < tolerance, (result["parameters"], tolerance)
        assert result["expert_grad_tensors"] > 0 and result["replicated_grad_tensors"] > 0


@pytest.mark.slow
def test_bf16_autocast_gives_one_process_logits(two_ranks):
    _, results, _ = two_ranks
    # the same bf16 rows meet the same bf16 weights (equal here; a BLAS may block rows differently)
    assert all(result["bf16_logits"] < 1e-2 for result in results), [result["bf16_logits"] for result in results]


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp2"])
def test_capacity_drops_and_routing_stats_equal_one_process(two_ranks, fsdp):
    _, results, _ = two_ranks
    for result in results:
        result = result["fsdp"] if fsdp else result
        for step in range(STEPS):
            ep, single = result["stats"][step], result["single_stats"][step]
            assert ep == single
            assert sum(ep["dropped_subtokens"]) > 0 and sum(ep["dropped_assignments"]) > 0  # capacity binds
            assert sum(map(sum, ep["expert_load"])) == 2 * BATCH * SEQ * MOE["top_k_experts"]


@pytest.mark.slow
def test_checkpoint_from_two_ranks_loads_in_one_process_and_the_reverse(two_ranks):
    tmp, results, _ = two_ranks
    model = GoHTransformer.from_pretrained(tmp / "out" / "ep_ckpt").eval()
    with torch.no_grad():
        logits = model(_eval_batch()).logits
    torch.testing.assert_close(logits, torch.tensor(results[0]["ep_eval_logits"]), rtol=0, atol=1e-6)
    assert model.blocks[0].ffn.experts.w_in.shape[0] == MOE["n_experts"] - MOE["n_shared_experts"]
    for result in results:  # the single-process checkpoint, sharded: the same logits
        assert result["reverse_logits"] < 1e-6 and result["reverse_into_sharded_logits"] < 1e-6


@pytest.mark.slow
def test_train_with_expert_parallel_matches_one_process(two_ranks):
    """Both train with AdamW at eps=1, where the weights are determined by the gradients; the
    tolerance is the bound of determined_steps (3 steps, lr, gradients clipped to grad_clip)."""
    tmp, results, single = two_ranks
    tc = TrainConfig(**TRAIN)
    atol, rtol = weight_atol(tc.max_steps, tc.lr, tc.grad_clip), weight_rtol(tc.max_steps)
    for key, run in (("train_losses", "run"), ("fsdp_train_losses", "fsdp_run")):  # DDP, FSDP2 for the rest
        assert results[0][key] == results[1][key]
        assert results[0][key] == pytest.approx(single.losses, rel=1e-5)
        trained = GoHTransformer.from_pretrained(tmp / "out" / run / "final").state_dict()
        for name, tensor in single.model.state_dict().items():
            torch.testing.assert_close(trained[name], tensor, rtol=rtol, atol=atol, msg=f"{run}: {name}")


@pytest.mark.slow
def test_expert_parallel_training_checkpoint_resumes_in_one_process(two_ranks):
    """Weights and AdamW moments are saved full: one process continues the EP=2 run as it continues
    its own (AdamW at eps=1: the bound of determined_steps over all 4 steps)."""
    import shutil

    from gohgraph.data.corpus import load_corpus

    tmp, _, _ = two_ranks
    corpus = load_corpus(str(tmp / "text.txt"), cache_dir=tmp / "cache")
    continued = {}
    for name, run in (("ep", tmp / "out" / "run"), ("single", tmp / "single_run")):
        shutil.copytree(run, tmp / f"resume_{name}")
        with conditioned_adamw():
            continued[name] = train(GoHConfig(**MOE), TrainConfig(**{**TRAIN, "max_steps": 4}), corpus,
                                    tmp / f"resume_{name}", resume=True, progress=False)
    assert continued["ep"].losses == pytest.approx(continued["single"].losses, rel=1e-5)
    tc = TrainConfig(**TRAIN)
    atol, rtol = weight_atol(4, tc.lr, tc.grad_clip), weight_rtol(4)
    single_state = continued["single"].model.state_dict()
    for name, tensor in continued["ep"].model.state_dict().items():
        torch.testing.assert_close(tensor, single_state[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.slow
def test_cli_trains_with_expert_parallel_under_torchrun(two_ranks):
    """The README line: ``torchrun --nproc_per_node=2 -m gohgraph train ... --expert-parallel 2``."""
    tmp, _, _ = two_ranks
    moe = [f"--set={name}={value}" for name, value in MOE.items() if name not in ("vocab_size", "max_seq_len")]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "gohgraph", "train", "--data", str(tmp / "text.txt"), "--cache-dir", str(tmp / "cache"),
               "--run-dir", str(tmp / "cli_run"), "--max-steps", "2", "--batch-size", "4", "--seq-len", "16",
               "--eval-every", "2", "--device", "cpu", "--no-progress", "--set", "max_seq_len=17",
               "--set", "eval_batches=1", "--set", "tensorboard=false", *moe, "--expert-parallel", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_worker_env())
    assert done.returncode == 0, done.stderr[-4000:]
    model = GoHTransformer.from_pretrained(tmp / "cli_run" / "final")
    assert model.blocks[0].ffn.experts.w_in.shape[0] == 4
    assert json.loads((tmp / "cli_run" / "train_config.json").read_text())["expert_parallel"] == 2


def test_bad_layouts_name_the_numbers():
    with pytest.raises(ValueError, match=r"^n_routed_experts=4 \(layer 0\) is not divisible by expert_parallel=3"):
        check_expert_parallel_layout(GoHTransformer(GoHConfig(**MOE)), 3)
    with pytest.raises(ValueError, match=r"^expert_parallel=2 needs MoE layers, but the model has none \(ffn='dense'"):
        check_expert_parallel_layout(GoHTransformer(GoHConfig(**{**MOE, "ffn": "dense"})), 2)
    with pytest.raises(ValueError, match=r"^TrainConfig.expert_parallel=0 must be a positive integer"):
        TrainConfig(**TRAIN, expert_parallel=0)


def test_training_with_expert_parallel_needs_that_many_processes(tmp_path):
    from gohgraph.data.corpus import load_corpus

    corpus = load_corpus(str(_text_file(tmp_path)), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"expert_parallel=2 must equal the number of processes \(1\)"):
        train(GoHConfig(**MOE), TrainConfig(**TRAIN, expert_parallel=2), corpus, tmp_path / "run", progress=False)


# ---------------------------------------------------------------------- the worker
def _max_diff(pairs):
    return max((float((a - b).abs().max()) for a, b in pairs), default=0.0)


def _stats(out, n_experts, across_ranks=True):
    stats = expert_routing_stats([record.experts for record in out.routing], n_experts, across_ranks=across_ranks)
    return {name: value.tolist() for name, value in stats.items()}


def _compare_with_one_process(ctx, fsdp: bool) -> dict:
    """STEPS training steps of one process on the whole batch beside EP over the ranks, each rank on
    its slice (DDP or FSDP2 for the replicated parameters); the largest differences of each step."""
    from gohgraph.parallel import data_parallel as D
    from gohgraph.parallel.expert_parallel import apply_expert_parallel, clip_grad_norm_, expert_shard_parameters

    rank, n_ranks = ctx.rank, ctx.world_size
    cfg = GoHConfig(**MOE)
    n_routed = cfg.n_routed_experts
    torch.manual_seed(0)
    single = GoHTransformer(cfg).train()
    sharded = apply_expert_parallel(copy.deepcopy(single))
    shard_ids = {id(p) for p in expert_shard_parameters(sharded)}
    wrapped = D.wrap_model(sharded, ctx, fsdp, ignored_params=expert_shard_parameters(sharded))
    mine = slice(rank * BATCH // n_ranks, (rank + 1) * BATCH // n_ranks)
    experts_slice = slice(rank * n_routed // n_ranks, (rank + 1) * n_routed // n_ranks)
    opt_single = torch.optim.AdamW(single.parameters(), lr=COMPARE_LR, eps=ADAM_EPS)  # see determined_steps
    opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=COMPARE_LR, eps=ADAM_EPS)
    names = dict(sharded.named_parameters())
    result = {name: [] for name in ("logits", "lm_loss", "replicated_grads", "expert_grads", "grad_norm")}
    result.update(stats=[], single_stats=[])
    for step in range(STEPS):
        batch = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
        out_single = single(batch, labels=batch)
        out = wrapped(batch[mine], labels=batch[mine])
        result["logits"].append(_max_diff([(out.logits, out_single.logits[mine])]))
        result["lm_loss"].append(float((D.all_reduce_mean(out.lm_loss, ctx) - out_single.lm_loss).abs()))
        result["stats"].append(_stats(out, n_routed))
        result["single_stats"].append(_stats(out_single, n_routed, across_ranks=False))
        training_loss(out_single, 1.0).backward()
        training_loss(out, 1.0).backward()
        full_grads = dict(single.named_parameters())
        replicated = [(_full(p.grad), full_grads[n].grad) for n, p in names.items()
                      if p.grad is not None and id(p) not in shard_ids]
        experts = [(p.grad, full_grads[n].grad[experts_slice]) for n, p in names.items()
                   if p.grad is not None and id(p) in shard_ids]
        result["replicated_grads"].append(_max_diff(replicated))
        result["expert_grads"].append(_max_diff(experts))
        result["replicated_grad_tensors"], result["expert_grad_tensors"] = len(replicated), len(experts)
        norm_single = float(torch.nn.utils.clip_grad_norm_(single.parameters(), COMPARE_CLIP))
        result["grad_norm"].append(abs(clip_grad_norm_(sharded, COMPARE_CLIP) - norm_single))
        for optimizer in (opt_single, opt_sharded):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        D.sync_routing_loads(sharded, ctx)
        sharded.update_routing_biases()
        single.update_routing_biases()
    result["steps"] = STEPS
    gathered = D.full_model_state(sharded, fsdp)  # every rank: the shards are gathered
    reference = single.state_dict()
    params = {n for n, _ in single.named_parameters()}
    result["parameters"] = [_max_diff([(gathered[n], reference[n])]) for n in sorted(params)]
    result["parameter_magnitude"] = max(float(reference[n].abs().max()) for n in params)
    result["buffers"] = [_max_diff([(gathered[n], reference[n])]) for n in sorted(set(reference) - params)]
    return result, sharded


def _bf16_autocast_difference(ctx) -> float:
    """Largest logit difference of EP and one process under bf16 autocast (bf16 rows exchanged)."""
    from gohgraph.parallel.expert_parallel import apply_expert_parallel

    torch.manual_seed(1)
    single = GoHTransformer(GoHConfig(**MOE)).train()
    sharded = apply_expert_parallel(copy.deepcopy(single))
    batch = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))
    mine = slice(ctx.rank * BATCH // ctx.world_size, (ctx.rank + 1) * BATCH // ctx.world_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_single, out = single(batch, labels=batch), sharded(batch[mine], labels=batch[mine])
    training_loss(out, 1.0).backward()  # the backward exchange runs in bf16 too
    assert out.logits.dtype == torch.bfloat16
    return _max_diff([(out.logits.float(), out_single.logits[mine].float())])


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP2's gradients are DTensors


def _worker(out_dir: Path, data: str, cache: str, single_checkpoint: str) -> None:
    from gohgraph.data.corpus import load_corpus
    from gohgraph.parallel import data_parallel as D
    from gohgraph.parallel.expert_parallel import apply_expert_parallel
    from gohgraph.storage import load_state_strict, read_tensors

    torch.set_num_threads(1)
    ctx = D.init_distributed("cpu")
    result, sharded = _compare_with_one_process(ctx, fsdp=False)
    result["fsdp"], _ = _compare_with_one_process(ctx, fsdp=True)
    result["bf16_logits"] = _bf16_autocast_difference(ctx)

    # EP -> one process: every rank takes part in the gather; rank 0's directory is the checkpoint
    sharded.save_pretrained(out_dir / ("ep_ckpt" if ctx.rank == 0 else f"ep_ckpt_rank{ctx.rank}"))
    sharded.eval()
    with torch.no_grad():
        result["ep_eval_logits"] = sharded(_eval_batch()).logits.tolist()
        # one process -> EP: the single-process checkpoint, sharded after loading and loaded into shards
        expected = torch.tensor(json.loads((Path(single_checkpoint).parent / "single_logits.json").read_text()))
        loaded = apply_expert_parallel(GoHTransformer.from_pretrained(single_checkpoint)).eval()
        result["reverse_logits"] = _max_diff([(loaded(_eval_batch()).logits, expected)])
        load_state_strict(sharded, read_tensors(Path(single_checkpoint) / "model.safetensors"), Path(single_checkpoint))
        result["reverse_into_sharded_logits"] = _max_diff([(sharded(_eval_batch()).logits, expected)])

    corpus = load_corpus(data, cache_dir=Path(cache))
    for key, fsdp in (("train_losses", False), ("fsdp_train_losses", True)):
        with conditioned_adamw():
            trained = train(GoHConfig(**MOE), TrainConfig(**TRAIN, expert_parallel=ctx.world_size, fsdp=fsdp),
                            corpus, out_dir / ("fsdp_run" if fsdp else "run"), progress=False)
        result[key] = trained.losses
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    D.shutdown(ctx)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
