"""torchrun + DDP / FSDP2 (gloo, CPU): two ranks stay identical and match one process on the same batch.

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node=2
tests/parallel/test_data_parallel.py OUT_DIR DATA CACHE [--fsdp] [--moe]`` trains and writes each rank's result.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.parallel.data_parallel import may_leave_parameters_unused
from gohgraph.training.config import TrainConfig
from gohgraph.training.trainer import train, training_loss
from tests.parallel.determined_steps import conditioned_adamw, weight_atol, weight_rtol

# graph router, shared + top-k heads, flow and aux-loss-free bias; the balance loss is off because
# it is a product of batch statistics, so a per-rank loss would differ from the global one
MODEL = dict(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
             router="graph", router_rounds=1, router_dim=8, max_seq_len=33, aux_free_bias=True,
             bias_update_rate=0.01, balance_loss_coef=0.0)
TRAIN = dict(batch_size=4, seq_len=32, grad_accum_steps=2, max_steps=4, lr=5e-3, warmup_steps=1,
             eval_every=4, eval_batches=2, save_every=4, device="cpu", tensorboard=False)
ROOT = Path(__file__).resolve().parents[2]  # the worker imports tests.parallel.determined_steps


def _text_file(directory: Path) -> Path:
    path = directory / "text.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(300)))
    return path


def test_heads_always_get_gradients_so_attention_routing_needs_no_unused_search():
    model = GoHTransformer(GoHConfig(**MODEL))
    x = torch.randint(0, 256, (2, 16))
    out = model(x, labels=x)
    training_loss(out, aux_scale=0.0).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert not may_leave_parameters_unused(model.config)
    assert may_leave_parameters_unused(GoHConfig(**{**MODEL, "ffn": "moe", "n_experts": 4, "top_k_experts": 1}))


MOE = dict(MODEL, ffn="moe", n_experts=4, top_k_experts=1)  # experts can get no token: unused parameters
# global-batch balance: counts all-reduced over ranks before the product, so the balance loss is on
GLOBAL_BALANCE = dict(MOE, balance_loss_coef=0.01, head_balance_pooling="global-batch",
                      expert_balance_pooling="global-batch")


def _model(experts: bool, global_balance: bool = False) -> dict:
    return GLOBAL_BALANCE if global_balance else MOE if experts else MODEL


@pytest.mark.slow
@pytest.mark.parametrize("fsdp, experts, global_balance",
                         [(False, False, False), (True, False, False), (False, True, False), (False, True, True)],
                         ids=["ddp", "fsdp2", "ddp-moe", "ddp-global-balance"])
def test_two_gloo_ranks_match_one_process(tmp_path, fsdp, experts, global_balance):
    from gohgraph.data.corpus import load_corpus

    data = _text_file(tmp_path)
    corpus = load_corpus(str(data), cache_dir=tmp_path / "cache")  # built once, before the ranks start
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp_path / "ddp"), str(data), str(tmp_path / "cache")]
    command += (["--fsdp"] if fsdp else []) + (["--moe"] if experts else []) + (["--global"] if global_balance else [])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    with conditioned_adamw():
        single = train(GoHConfig(**_model(experts, global_balance)), TrainConfig(**TRAIN), corpus, tmp_path / "single",
                       progress=False)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    states = [GoHTransformer.from_pretrained(tmp_path / "ddp" / f"rank{r}").state_dict() for r in range(2)]
    # both train with AdamW at eps=1 (determined_steps); DDP's gradient, the mean of two half-batch
    # gradients, differs from one process's by float32 rounding of entries <= grad_clip, below GRAD_ATOL
    tc = TrainConfig(**TRAIN)
    atol, rtol = weight_atol(tc.max_steps, tc.lr, tc.grad_clip), weight_rtol(tc.max_steps)
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), f"ranks differ in {name}"
        torch.testing.assert_close(tensor, single.model.state_dict()[name], rtol=rtol, atol=atol, msg=name)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert ranks[0]["final_val_loss"] == pytest.approx(single.final_val_loss, rel=1e-5)
    # rank 0 alone wrote the checkpoint and metrics, and it resumes like any other run
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "step_000004" / "model.safetensors").is_file()
    assert (tmp_path / "ddp" / "run" / "final" / "model.safetensors").is_file()


def _worker(out_dir: str, data: str, cache: str, fsdp: bool, experts: bool, global_balance: bool) -> None:
    from gohgraph.data.corpus import load_corpus

    torch.set_num_threads(1)
    corpus = load_corpus(data, cache_dir=Path(cache))
    with conditioned_adamw():
        result = train(GoHConfig(**_model(experts, global_balance)), TrainConfig(**TRAIN, fsdp=fsdp), corpus,
                       Path(out_dir) / "run", progress=False)
    rank = int(os.environ["RANK"])
    result.model.save_pretrained(Path(out_dir) / f"rank{rank}")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(
        {"losses": result.losses, "final_val_loss": result.final_val_loss}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3], "--fsdp" in sys.argv[4:], "--moe" in sys.argv[4:],
            "--global" in sys.argv[4:])
