"""torchrun + DDP (gloo, CPU) for the encoder and seq2seq tasks: two ranks stay identical and match
one process on the same batch, through the one training loop (the LM's: test_data_parallel.py).

Each rank reads its contiguous half of every micro-batch's rows, and the loop weights micro-batch
losses by their share of the step's loss terms over both ranks (masked positions, texts, target
tokens), so the mean of the two ranks' gradients is one process's gradient of the whole batch.

This file is also the worker script: ``python -m torch.distributed.run --nproc_per_node=2
tests/parallel/test_task_data_parallel.py OBJECTIVE OUT_DIR DATA``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gohgraph import GoHConfig
from gohgraph.data.objectives import SpecialTokens
from gohgraph.models.pretrained import from_pretrained
from gohgraph.training.config import TrainConfig
from gohgraph.training.tasks import get_task
from gohgraph.training.trainer import train
from tests.parallel.determined_steps import conditioned_adamw, weight_atol, weight_rtol

ROOT = Path(__file__).resolve().parents[2]
# graph router, shared + top-k heads, aux-loss-free bias; the balance loss is off (a product of
# batch statistics: a per-rank loss differs from the global one); no dropout (ranks draw their own)
MODEL = dict(d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2, router="graph", router_rounds=1,
             router_dim=8, position_embedding="rope", mlp="gelu-exact", norm="layer", max_seq_len=32,
             aux_free_bias=True, bias_update_rate=0.01, balance_loss_coef=0.0)
TRAIN = dict(batch_size=4, seq_len=24, grad_accum_steps=2, max_steps=3, lr=5e-3, warmup_steps=1, eval_every=3,
             eval_batches=1, save_every=3, device="cpu", tensorboard=False, weight_decay=0.01)


def _data_file(directory: Path, objective: str) -> Path:
    """Text (mlm), labelled texts (classify) or pairs with targets of 3 to 9 bytes (seq2seq)."""
    path = directory / f"{objective}.{'txt' if objective == 'mlm' else 'tsv'}"
    if objective == "mlm":
        path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(300)))
    elif objective == "classify":
        path.write_text("".join(f"{'loud' if i % 2 else 'quiet'}\t{'HELLO THERE' if i % 2 else 'hello there'} {i}\n"
                                for i in range(60)))
    else:
        path.write_text("".join(f"reverse w{i:02d}\t{f'w{i:02d}'[::-1] * (1 + i % 3)}\n" for i in range(60)))
    return path


def _setup(objective: str, data_path: Path):
    task, tc = get_task(objective), TrainConfig(**TRAIN)
    data = task.load_data({"data": str(data_path)}, None, tc, GoHConfig(model_type="encoder", **MODEL))
    if objective == "seq2seq":
        special = SpecialTokens(256, with_eos=True)
        cfg = GoHConfig(model_type="seq2seq", n_decoder_layers=1, vocab_size=special.vocab_size,
                        pad_token_id=special.pad, decoder_start_token_id=special.pad, **MODEL)
    else:
        cfg = GoHConfig(model_type="encoder", vocab_size=SpecialTokens(256).vocab_size, **MODEL,
                        **({"n_labels": 2, "classifier_pooling": "mean"} if objective == "classify" else {}))
    return cfg, tc, data


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["mlm", "classify", "seq2seq"])
def test_two_gloo_ranks_match_one_process(tmp_path, objective):
    data_path = _data_file(tmp_path, objective)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               objective, str(tmp_path / "ddp"), str(data_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]

    cfg, tc, data = _setup(objective, data_path)
    with conditioned_adamw():
        single = train(cfg, tc, data, tmp_path / "single", progress=False, task=objective)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    states = [from_pretrained(tmp_path / "ddp" / f"rank{r}").state_dict() for r in range(2)]
    atol, rtol = weight_atol(tc.max_steps, tc.lr, tc.grad_clip), weight_rtol(tc.max_steps)
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), f"ranks differ in {name}"
        torch.testing.assert_close(tensor, single.model.state_dict()[name], rtol=rtol, atol=atol, msg=name)
    assert ranks[0]["losses"] == ranks[1]["losses"]
    assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-5)
    assert ranks[0]["metrics"]["loss"] == pytest.approx(single.metrics["loss"], rel=1e-5)
    # rank 0 alone wrote the run: one checkpoint, one final model
    assert (tmp_path / "ddp" / "run" / "checkpoints" / "step_000003" / "model.safetensors").is_file()
    assert (tmp_path / "ddp" / "run" / "final" / "model.safetensors").is_file()


def _worker(objective: str, out_dir: str, data_path: str) -> None:
    torch.set_num_threads(1)
    cfg, tc, data = _setup(objective, Path(data_path))
    with conditioned_adamw():
        result = train(cfg, tc, data, Path(out_dir) / "run", progress=False, task=objective)
    rank = int(os.environ["RANK"])
    result.model.save_pretrained(Path(out_dir) / f"rank{rank}")
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"losses": result.losses, "metrics": result.metrics}))


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
