"""Tensor parallelism over 2 gloo ranks (real torchrun) against one process on the same batch.

This file is also the worker: ``python -m torch.distributed.run --nproc_per_node=2
tests/parallel/test_tensor_parallel.py OUT_DIR DATA CACHE SINGLE_CHECKPOINT``. For each head router
(dense, MoH's linear, GoH's graph with inter-head flow) every rank builds the same model, keeps an
unsharded copy as the single-process reference (run in the same process on the same batch), shards
the other with ``apply_tensor_parallel`` and compares forward, loss, gradients and 3 AdamW steps
(at eps=1, tests/parallel/determined_steps.py);
then checkpoints both ways and ``train(..., tensor_parallel=2)``. The numbers it measures are
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

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, GoHTransformer
from gohgraph.parallel.tensor_parallel import check_tensor_parallel_layout
from gohgraph.training.config import TrainConfig
from gohgraph.training.trainer import train, training_loss
from tests.parallel.determined_steps import ADAM_EPS, GRAD_ATOL, conditioned_adamw, weight_atol, weight_rtol

# GQA (4 query heads, 2 kv heads: one kv head per rank), SwiGLU, biases on (column shards and a
# replicated row bias), RoPE
BASE = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=33, linear_bias=True)
ROUTERS = {
    "dense": dict(router="dense"),
    # two-stage gating (a shared head), top-1 of 3 routed heads, aux-loss-free bias (replicated loads)
    "linear": dict(router="linear", n_shared_heads=1, top_k_heads=1, aux_free_bias=True, bias_update_rate=0.01),
    # message passing over a ring of all heads, flow between heads of both ranks, token logits too
    "graph": dict(router="graph", head_graph="ring", top_k_heads=2, inter_head_flow=True, router_token_logits=True),
}
# head-sparse execution on every rank's own heads (rank 0 holds the shared head) against the masked
# single process: the worker cuts the queries into chunks of SPARSE_QUERY_CHUNK
ROUTERS.update({f"{router} sparse": dict(ROUTERS[router], head_execution="sparse") for router in ("linear", "graph")})
SPARSE_QUERY_CHUNK = 4
TRAIN = dict(batch_size=4, seq_len=32, grad_accum_steps=2, max_steps=3, lr=5e-3, warmup_steps=1,
             eval_every=3, eval_batches=2, save_every=3, device="cpu", tensorboard=False)
BATCH, SEQ, STEPS = 4, 16, 3
COMPARE_LR, COMPARE_CLIP = 1e-3, 0.05  # the AdamW steps of the worker's side-by-side loop
ROOT = Path(__file__).resolve().parents[2]  # the worker imports tests.parallel.determined_steps


def _config(router: str) -> GoHConfig:
    return GoHConfig(**BASE, **ROUTERS[router])


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
    """Run the worker once under torchrun; ``(tmp dir, [rank0, rank1] results, single-process train)``."""
    from gohgraph.data.corpus import load_corpus

    tmp = tmp_path_factory.mktemp("tp")
    data = _text_file(tmp)
    corpus = load_corpus(str(data), cache_dir=tmp / "cache")
    torch.manual_seed(123)  # a single-process checkpoint that the ranks load sharded (the reverse way)
    single_model = GoHTransformer(_config("graph")).eval()
    with torch.no_grad():
        for block in single_model.blocks:
            block.attn.head_routing.flow_scale.normal_()
    single_model.save_pretrained(tmp / "single_ckpt")
    (tmp / "single_logits.json").write_text(json.dumps(single_model(_eval_batch()).logits.tolist()))

    with conditioned_adamw():
        single = train(_config("graph"), TrainConfig(**TRAIN), corpus, tmp / "single_run", progress=False)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp / "out"), str(data), str(tmp / "cache"), str(tmp / "single_ckpt"),
               str(tmp / "single_run")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=_worker_env())
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((tmp / "out" / f"rank{r}.json").read_text()) for r in range(2)]
    return tmp, results, single


@pytest.mark.slow
@pytest.mark.parametrize("router", list(ROUTERS))
def test_forward_losses_gradients_and_three_steps_equal_one_process(two_ranks, router):
    _, results, _ = two_ranks
    for result in results:
        result = result["compare"][router]
        assert result["steps"] == STEPS
        for name in ("logits", "loss", "sharded_grads", "replicated_grads", "grad_norm", "records", "buffers"):
            assert max(result[name], default=0.0) < GRAD_ATOL, (name, result[name])
        # AdamW with eps=1 on those gradients (determined_steps): the bound of its arithmetic
        tolerance = weight_atol(STEPS, COMPARE_LR, COMPARE_CLIP) + weight_rtol(STEPS) * result["parameter_magnitude"]
        assert max(result["parameters"]) < tolerance, (result["parameters"], tolerance)
        assert result["sharded_grad_tensors"] > 0 and result["replicated_grad_tensors"] > 0
        assert result["local_heads"] == BASE["n_heads"] // 2 and result["local_kv_heads"] == BASE["n_kv_heads"] // 2
        assert result.get("cached_decode_logits", 0.0) < GRAD_ATOL


@pytest.mark.slow
def test_head_sparse_execution_runs_on_each_ranks_heads(two_ranks):
    """The sparse rows above compare sparse ranks with a masked process; here: the kernel does run
    under TP (not a fallback to masked), and the shared heads are counted per rank."""
    _, results, _ = two_ranks
    for rank, result in enumerate(results):
        sparse = result["compare"]["linear sparse"]
        assert sparse["sparse_calls"] > 0 and result["compare"]["linear"]["sparse_calls"] == 0
        assert sparse["local_shared_heads"] == (1 if rank == 0 else 0)  # one shared head, on rank 0
        assert "cached_decode_logits" in sparse and "cached_decode_logits" in result["compare"]["graph sparse"]


@pytest.mark.slow
def test_routers_see_every_head_and_flow_crosses_ranks(two_ranks):
    """The values above would be equal by accident if nothing crossed ranks: the graph layers do
    exchange queries and head outputs, and the dense ones only the projections' all-reduces."""
    _, results, _ = two_ranks
    for result in results:
        graph, dense = result["compare"]["graph"], result["compare"]["dense"]
        assert graph["flow_weight"] > 0  # inter-head flow is on and weighs other heads
        assert graph["traffic_forward"] > dense["traffic_forward"] > 0
        assert graph["traffic_backward"] > dense["traffic_backward"] > 0


@pytest.mark.slow
def test_bf16_autocast_gives_one_process_logits(two_ranks):
    _, results, _ = two_ranks
    # bf16 activations are exchanged; the ranks round partial sums where one matmul does not
    assert all(result["bf16_logits"] < 2e-2 for result in results), [result["bf16_logits"] for result in results]


@pytest.mark.slow
def test_checkpoint_from_two_ranks_loads_in_one_process_and_the_reverse(two_ranks):
    tmp, results, _ = two_ranks
    model = GoHTransformer.from_pretrained(tmp / "out" / "tp_ckpt").eval()
    with torch.no_grad():
        logits = model(_eval_batch()).logits
    torch.testing.assert_close(logits, torch.tensor(results[0]["tp_eval_logits"]), rtol=0, atol=1e-5)
    assert model.blocks[0].attn.qkv.weight.shape[0] == (BASE["n_heads"] + 2 * BASE["n_kv_heads"]) * 8
    for result in results:  # the single-process checkpoint, sharded: the same logits
        assert result["reverse_logits"] < 1e-5 and result["reverse_into_sharded_logits"] < 1e-5


@pytest.mark.slow
def test_train_with_tensor_parallel_matches_one_process(two_ranks):
    """Both train with AdamW at eps=1, where the weights are determined by the gradients; the
    tolerance is the bound of determined_steps (3 steps, lr, gradients clipped to grad_clip)."""
    tmp, results, single = two_ranks
    tc = TrainConfig(**TRAIN)
    assert results[0]["train_losses"] == results[1]["train_losses"]
    assert results[0]["train_losses"] == pytest.approx(single.losses, rel=1e-5)
    trained = GoHTransformer.from_pretrained(tmp / "out" / "run" / "final").state_dict()
    for name, tensor in single.model.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=weight_rtol(tc.max_steps),
                                   atol=weight_atol(tc.max_steps, tc.lr, tc.grad_clip), msg=name)


@pytest.mark.slow
def test_tensor_parallel_training_checkpoint_resumes_in_one_process(two_ranks):
    """Weights and AdamW moments are saved full: one process continues the TP=2 run as it continues
    its own (AdamW at eps=1: the bound of determined_steps over all 4 steps)."""
    import shutil

    from gohgraph.data.corpus import load_corpus

    tmp, _, _ = two_ranks
    corpus = load_corpus(str(tmp / "text.txt"), cache_dir=tmp / "cache")
    continued = {}
    for name, run in (("tp", tmp / "out" / "run"), ("single", tmp / "single_run")):
        shutil.copytree(run, tmp / f"resume_{name}")
        with conditioned_adamw():
            continued[name] = train(_config("graph"), TrainConfig(**{**TRAIN, "max_steps": 4}), corpus,
                                    tmp / f"resume_{name}", resume=True, progress=False)
    assert continued["tp"].losses == pytest.approx(continued["single"].losses, rel=1e-5)
    tc = TrainConfig(**TRAIN)
    single_state = continued["single"].model.state_dict()
    for name, tensor in continued["tp"].model.state_dict().items():
        torch.testing.assert_close(tensor, single_state[name], rtol=weight_rtol(4),
                                   atol=weight_atol(4, tc.lr, tc.grad_clip), msg=name)


@pytest.mark.slow
def test_single_process_checkpoint_resumes_under_tensor_parallel(two_ranks):
    """The reverse: the TP=2 ranks resumed the single process's checkpoint (moments sharded on load)
    and took the same step as one process."""
    import shutil

    from gohgraph.data.corpus import load_corpus

    tmp, results, _ = two_ranks
    corpus = load_corpus(str(tmp / "text.txt"), cache_dir=tmp / "cache")
    shutil.copytree(tmp / "single_run", tmp / "resume_single_again")
    with conditioned_adamw():
        single = train(_config("graph"), TrainConfig(**{**TRAIN, "max_steps": 4}), corpus,
                       tmp / "resume_single_again", resume=True, progress=False)
    for result in results:
        assert result["resumed_losses"] == pytest.approx(single.losses, rel=1e-5)


@pytest.mark.slow
def test_cli_trains_with_tensor_parallel(two_ranks):
    """``gohgraph train ... --tensor-parallel 2``, run by both ranks (the README's torchrun line)."""
    tmp, results, _ = two_ranks
    assert [result["cli_exit"] for result in results] == [0, 0]
    model = GoHTransformer.from_pretrained(tmp / "out" / "cli_run" / "final")
    assert model.blocks[0].attn.qkv.weight.shape[0] == (BASE["n_heads"] + 2 * BASE["n_kv_heads"]) * 8
    assert json.loads((tmp / "out" / "cli_run" / "train_config.json").read_text())["tensor_parallel"] == 2


@pytest.mark.slow
def test_tensor_parallel_beside_data_parallel_is_refused(two_ranks):
    _, results, _ = two_ranks
    for result in results:
        assert result["partial_group_error"].startswith("tensor_parallel=1 over 1 of 2 ranks is not supported")


def test_bad_layouts_name_the_numbers():
    with pytest.raises(ValueError, match=r"^n_heads=6 \(layer 0\) is not divisible by tensor_parallel=4"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**{**BASE, "d_model": 48, "n_heads": 6})), 4)
    with pytest.raises(ValueError, match=r"^n_kv_heads=2 \(layer 0\) is not divisible by tensor_parallel=4"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**{**BASE, "n_heads": 8, "n_kv_heads": 2})), 4)
    with pytest.raises(ValueError, match=r"^hidden_dim=90 \(FFN 0\) is not divisible by tensor_parallel=4"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**{**BASE, "n_kv_heads": 4, "ffn_hidden": 90})), 4)
    with pytest.raises(ValueError, match=r"^tensor_parallel=4 exceeds the 2 processes"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**BASE)), 4, world_size=2)
    with pytest.raises(ValueError, match=r"^tensor_parallel=2 does not shard MoE layers \(layer 0\)"):
        check_tensor_parallel_layout(GoHTransformer(GoHConfig(**BASE, ffn="moe", n_experts=4)), 2)
    with pytest.raises(ValueError, match=r"^TrainConfig.tensor_parallel=0 must be a positive integer"):
        TrainConfig(**TRAIN, tensor_parallel=0)


@pytest.mark.parametrize("model_type, model_class", [("encoder", GoHEncoder), ("seq2seq", GoHSeq2Seq)])
def test_families_tensor_parallel_cannot_shard_are_refused_in_one_line(model_type, model_class):
    config = GoHConfig(**BASE, model_type=model_type, position_embedding="sinusoidal")
    with pytest.raises(ValueError, match=rf"^tensor_parallel=2 supports decoder models, not model_type='{model_type}'$"):
        check_tensor_parallel_layout(model_class(config), 2)


def test_training_with_tensor_parallel_needs_that_many_processes(tmp_path):
    from gohgraph.data.corpus import load_corpus

    corpus = load_corpus(str(_text_file(tmp_path)), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"tensor_parallel=2 must equal the number of processes \(1\)"):
        train(_config("dense"), TrainConfig(**TRAIN, tensor_parallel=2), corpus, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"^TrainConfig.tensor_parallel=2 with expert_parallel=2"):
        train(_config("dense"), TrainConfig(**TRAIN, tensor_parallel=2, expert_parallel=2), corpus,
              tmp_path / "run", progress=False)


# ---------------------------------------------------------------------- the worker
def _max_diff(pairs):
    """Largest difference, relative to the reference's largest magnitude where that exceeds 1 (the
    ranks sum the row-parallel partial products in another order than one matmul does)."""
    return max((float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in pairs), default=0.0)


def _compare_with_one_process(router: str) -> dict:
    """STEPS training steps of one process beside TP over the ranks, both on the same batch; the
    largest differences of each step, and how often the head-sparse kernel ran."""
    import gohgraph.layers.attention as attention_module

    kernel, sparse_calls = attention_module.head_sparse_attention, []
    attention_module.head_sparse_attention = lambda *args, **kwargs: sparse_calls.append(1) or kernel(*args, **kwargs)
    try:
        return _compare_runs(router, sparse_calls)
    finally:
        attention_module.head_sparse_attention = kernel


def _compare_runs(router: str, sparse_calls: list) -> dict:
    from gohgraph.parallel.expert_parallel import clip_grad_norm_
    from gohgraph.parallel.tensor_parallel import apply_tensor_parallel, tensor_parallel_plan

    torch.manual_seed(0)
    single = GoHTransformer(_config(router)).train()
    with torch.no_grad():  # flow starts at 0 (a fresh GoH layer is MoH): switch it on
        for block in single.blocks:
            if block.attn.head_routing is not None and block.attn.head_routing.flow_scale is not None:
                block.attn.head_routing.flow_scale.normal_()
    sharded = apply_tensor_parallel(copy.deepcopy(single))
    single.set_execution(head_execution="masked")  # the reference computes every head
    plan = tensor_parallel_plan(sharded)
    # Adam at eps=1e-8 divides by each gradient's own scale, so a rounding difference in a near-zero
    # gradient moves its parameter by up to lr; at eps=1 the steps are determined (determined_steps)
    opt_single = torch.optim.AdamW(single.parameters(), lr=COMPARE_LR, eps=ADAM_EPS)
    opt_sharded = torch.optim.AdamW(sharded.parameters(), lr=COMPARE_LR, eps=ADAM_EPS)
    names = dict(sharded.named_parameters())
    full_params = dict(single.named_parameters())
    result = {name: [] for name in ("logits", "loss", "sharded_grads", "replicated_grads", "grad_norm", "records")}
    for step in range(STEPS):
        batch = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(step))
        out_single = single(batch, labels=batch)
        out = sharded(batch, labels=batch)
        result["logits"].append(_max_diff([(out.logits, out_single.logits)]))
        loss_single, loss = training_loss(out_single, 1.0), training_loss(out, 1.0)
        result["loss"].append(float((loss - loss_single).abs()))
        result["records"].append(_max_diff([(a.head_gates, b.head_gates) for a, b in zip(out.routing, out_single.routing)]
                                           + [(a.flow, b.flow) for a, b in zip(out.routing, out_single.routing)
                                              if a.flow is not None]))
        loss_single.backward()
        loss.backward()
        split = [(plan.layouts[id(p)].full(p.grad), full_params[n].grad) for n, p in names.items()
                 if id(p) in plan.layouts]
        whole = [(p.grad, full_params[n].grad) for n, p in names.items() if id(p) not in plan.layouts]
        result["sharded_grads"].append(_max_diff(split))
        result["replicated_grads"].append(_max_diff(whole))
        result["sharded_grad_tensors"], result["replicated_grad_tensors"] = len(split), len(whole)
        norm_single = float(torch.nn.utils.clip_grad_norm_(single.parameters(), COMPARE_CLIP))
        result["grad_norm"].append(abs(clip_grad_norm_(sharded, COMPARE_CLIP) - norm_single))
        for optimizer in (opt_single, opt_sharded):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sharded.update_routing_biases()  # loads are counted whole on every rank: no sum over ranks
        single.update_routing_biases()
    result["steps"] = STEPS
    gathered, reference = sharded.state_dict(), single.state_dict()
    params = {n for n, _ in single.named_parameters()}
    result["parameters"] = [float((gathered[n] - reference[n]).abs().max()) for n in sorted(params)]
    result["parameter_magnitude"] = max(float(reference[n].abs().max()) for n in params)
    result["buffers"] = [_max_diff([(gathered[n], reference[n])]) for n in sorted(set(reference) - params)]
    if sharded.config.head_execution == "sparse":
        result["cached_decode_logits"] = _cached_decode_difference(sharded, single)
    result["sparse_calls"] = len(sparse_calls)  # only the sharded model may run sparse
    result["local_shared_heads"] = sharded.blocks[0].attn.n_shared_heads
    result["local_heads"] = sharded.blocks[0].attn.n_heads
    result["local_kv_heads"] = sharded.blocks[0].attn.n_kv_heads
    result["flow_weight"] = max((float(record.flow.abs().max()) for record in out.routing if record.flow is not None),
                                default=0.0)
    result["traffic_forward"] = plan.traffic.sent_bytes_forward
    result["traffic_backward"] = plan.traffic.sent_bytes_backward
    return result, sharded


def _cached_decode_difference(sharded, single) -> float:
    """Largest difference of one-token cached steps of ``sharded`` (head-sparse decode kernel on
    each rank's heads) from ``single``'s full recompute (masked), over a fixed continuation. Not
    greedy tokens: a fresh model's logits are near ties that a rounding difference can flip."""
    from gohgraph.models.generation import make_decode_cache

    ids = torch.randint(0, 256, (2, 15), generator=torch.Generator().manual_seed(5))
    sharded.eval(), single.eval()
    cache = make_decode_cache(sharded.config, "dynamic", ids.shape[1])
    with torch.no_grad():
        sharded._set_decoding(True)
        steps = [sharded(ids[:, :9], cache=cache).logits[:, -1:]]
        steps += [sharded(ids[:, t:t + 1], cache=cache).logits for t in range(9, ids.shape[1] - 1)]
        sharded._set_decoding(False)
        reference = single(ids[:, :-1]).logits[:, 8:]
    return _max_diff([(torch.cat(steps, dim=1), reference)])


def _bf16_autocast_difference() -> float:
    """Largest logit difference of TP and one process under bf16 autocast (GoH with flow)."""
    from gohgraph.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(1)
    single = GoHTransformer(_config("graph")).train()
    sharded = apply_tensor_parallel(copy.deepcopy(single))
    batch = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(11))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_single, out = single(batch, labels=batch), sharded(batch, labels=batch)
    training_loss(out, 1.0).backward()  # the backward exchanges run in bf16 too
    assert out.logits.dtype == torch.bfloat16
    return _max_diff([(out.logits.float(), out_single.logits.float())])


def _worker(out_dir: Path, data: str, cache: str, single_checkpoint: str, single_run: str) -> None:
    import gohgraph.layers.head_sparse as head_sparse
    from gohgraph.data.corpus import load_corpus
    from gohgraph.parallel import data_parallel as D
    from gohgraph.parallel.tensor_parallel import apply_tensor_parallel
    from gohgraph.storage import load_state_strict, read_tensors

    torch.set_num_threads(1)
    head_sparse.QUERY_CHUNK = SPARSE_QUERY_CHUNK
    ctx = D.init_distributed("cpu")
    result = {"compare": {}}
    for router in ROUTERS:
        result["compare"][router], sharded = _compare_with_one_process(router)

    result["bf16_logits"] = _bf16_autocast_difference()
    try:  # tensor parallel over fewer ranks than the processes (data parallel beside it) is refused
        apply_tensor_parallel(GoHTransformer(_config("dense")), n_ranks=1)
        result["partial_group_error"] = None
    except ValueError as err:
        result["partial_group_error"] = str(err)

    # TP -> one process: every rank takes part in the gather; rank 0's directory is the checkpoint
    sharded.save_pretrained(out_dir / ("tp_ckpt" if ctx.rank == 0 else f"tp_ckpt_rank{ctx.rank}"))
    sharded.eval()
    with torch.no_grad():
        result["tp_eval_logits"] = sharded(_eval_batch()).logits.tolist()
        # one process -> TP: the single-process checkpoint, sharded after loading and loaded into shards
        expected = torch.tensor(json.loads((Path(single_checkpoint).parent / "single_logits.json").read_text()))
        loaded = apply_tensor_parallel(GoHTransformer.from_pretrained(single_checkpoint)).eval()
        result["reverse_logits"] = _max_diff([(loaded(_eval_batch()).logits, expected)])
        load_state_strict(sharded, read_tensors(Path(single_checkpoint) / "model.safetensors"), Path(single_checkpoint))
        result["reverse_into_sharded_logits"] = _max_diff([(sharded(_eval_batch()).logits, expected)])

    corpus = load_corpus(data, cache_dir=Path(cache))
    with conditioned_adamw():
        trained = train(_config("graph"), TrainConfig(**TRAIN, tensor_parallel=ctx.world_size), corpus,
                        out_dir / "run", progress=False)
    result["train_losses"] = trained.losses
    # one process -> TP, mid-run: resume the single process's run (its AdamW moments sharded on load)
    if ctx.rank == 0:
        import shutil

        shutil.copytree(single_run, out_dir / "resumed")
    D.barrier(ctx)
    with conditioned_adamw():
        resumed = train(_config("graph"), TrainConfig(**{**TRAIN, "max_steps": 4}, tensor_parallel=ctx.world_size),
                        corpus, out_dir / "resumed", resume=True, progress=False)
    result["resumed_losses"] = resumed.losses
    # the CLI's flag, in this process group (what torchrun -m gohgraph train ... runs)
    from gohgraph.cli.main import main

    routing = [f"--set={name}={value}" for name, value in {**BASE, **ROUTERS["graph"]}.items()
               if name not in ("vocab_size", "max_seq_len")]
    result["cli_exit"] = main(["train", "--data", data, "--cache-dir", cache, "--run-dir", str(out_dir / "cli_run"),
                               "--max-steps", "2", "--batch-size", "4", "--seq-len", "16", "--eval-every", "2",
                               "--device", "cpu", "--no-progress", "--set", "max_seq_len=17", "--set",
                               "eval_batches=1", "--set", "tensorboard=false", *routing, "--tensor-parallel", "2"])
    (out_dir / f"rank{ctx.rank}.json").write_text(json.dumps(result))
    D.shutdown(ctx)


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
