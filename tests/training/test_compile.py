"""TrainConfig.compile / ``gohgraph train --compile``: the compiled training step equals the eager one
(outputs, losses, gradients), and falls back to eager, exactly, with one line, where it cannot compile.

torch.compile's default backend (inductor) takes minutes per model on this machine's loaded CPUs, so
the equality tests compile with ``backend="aot_eager"``: the same Dynamo graph capture and AOT
autograd forward/backward split as inductor, without its C++ code generation (which
tests/models/test_compile.py exercises for the decode path).
"""

import copy
import functools
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.compile import CompileUnavailableWarning
from gohgraph.training.compile import TrainingForward
from gohgraph.training.trainer import training_loss

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32)
ROUTERS = {"dense": dict(router="dense"),
           "linear": dict(router="linear", n_shared_heads=1, top_k_heads=2),
           "graph": dict(router="graph", n_shared_heads=1, top_k_heads=2, router_dim=8, head_graph="ring")}


def micro_step(ids):
    def run(call):
        out = call(ids, labels=ids)
        loss = training_loss(out, 0.5)
        loss.backward()
        return out, loss
    return run


@pytest.mark.parametrize("router", list(ROUTERS))
def test_compiled_training_step_equals_eager(router, monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager_model = GoHTransformer(GoHConfig(**CFG, **ROUTERS[router])).train()
    compiled_model = copy.deepcopy(eager_model)
    ids = torch.randint(0, 64, (2, 12))
    forward = TrainingForward(compiled_model, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileUnavailableWarning)  # a fallback fails the test
        for _ in range(2):  # the second call reuses the compiled graphs
            compiled_model.zero_grad()
            out, loss = forward.run(micro_step(ids))
    assert forward.compiled and counters["stats"]["unique_graphs"] > 0  # it really ran compiled
    eager_model.zero_grad()
    eager_out, eager_loss = TrainingForward(eager_model).run(micro_step(ids))
    torch.testing.assert_close(out.logits, eager_out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, eager_out.aux_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled_model.named_parameters(), eager_model.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_a_compile_that_fails_midway_falls_back_to_exactly_the_eager_step(monkeypatch):
    """The fake compiled forward runs the model (dropout draws, aux-free load counts, gradients)
    and then fails, as a lazy compile after a graph break does: the step must equal eager."""
    cfg = GoHConfig(**CFG, **ROUTERS["graph"], dropout=0.1, aux_free_bias=True)
    torch.manual_seed(0)
    model = GoHTransformer(cfg).train()
    reference = copy.deepcopy(model)

    def compile_failing_after_running(module, **kwargs):
        def compiled(*args, **kw):
            module(*args, **kw).loss.backward()
            raise RuntimeError("inductor: C++ compile failed\nfull log follows")
        return compiled

    monkeypatch.setattr(torch, "compile", compile_failing_after_running)
    ids = torch.randint(0, 64, (2, 12))
    torch.manual_seed(5)
    forward = TrainingForward(model, compile=True)
    with pytest.warns(CompileUnavailableWarning) as warned:
        out, loss = forward.run(micro_step(ids))
    assert [str(w.message) for w in warned] == ["torch.compile is unavailable here (RuntimeError: inductor: C++ "
                                                "compile failed); training stays eager"]
    assert not forward.compiled and forward.forward is model
    after_fallback = torch.rand(3)
    torch.manual_seed(5)
    ref_out, ref_loss = TrainingForward(reference).run(micro_step(ids))
    assert torch.equal(after_fallback, torch.rand(3))  # the random stream is where eager leaves it
    assert torch.equal(loss, ref_loss) and torch.equal(out.logits, ref_out.logits)
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    for (name, b), c in zip(model.named_buffers(), reference.buffers()):
        assert torch.equal(b, c), name
    assert any(b.abs().sum() > 0 for name, b in model.named_buffers() if name.endswith("load_since_update"))


def test_cli_train_compile_falls_back_in_one_line(tmp_path, monkeypatch, capsys):
    from gohgraph.cli.main import main

    text = tmp_path / "text.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(200)))

    def unavailable(*args, **kwargs):
        raise RuntimeError("inductor needs a C++ compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--run-dir", str(run_dir),
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu", "--max-steps", "2",
                 "--set", "d_model=32", "--set", "n_layers=1", "--set", "eval_batches=1",
                 "--set", "tensorboard=false", "--compile"]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "compile" in line] == [
        "gohgraph train: --compile: torch.compile is unavailable here (RuntimeError: inductor needs a C++ "
        "compiler); training stays eager"]
    assert '"compile": true' in (run_dir / "train_config.json").read_text()
    # every task takes --compile through the same loop, and falls back the same way
    assert main(["train", "--objective", "mlm", "--data", str(text), "--run-dir", str(tmp_path / "mlm"),
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--max-steps", "1", "--set", "d_model=32",
                 "--set", "eval_batches=1", "--set", "tensorboard=false", "--compile"]) == 0
    assert [line for line in capsys.readouterr().err.splitlines() if "compile" in line] == [
        "gohgraph train: --compile: torch.compile is unavailable here (RuntimeError: inductor needs a C++ "
        "compiler); training stays eager"]


def test_the_training_loop_runs_compiled_steps_like_eager_ones(tmp_path, monkeypatch):
    from gohgraph.training.config import TrainConfig
    from gohgraph.training.trainer import train
    from tests.helpers import TINY, make_corpus

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    cfg = GoHConfig(**{**TINY, "n_layers": 1})
    corpus = make_corpus(n_train=4_000, n_val=1_000)
    results = {}
    for compile in (False, True):
        tc = TrainConfig(batch_size=2, seq_len=16, grad_accum_steps=2, max_steps=2, eval_every=2, eval_batches=1,
                         save_every=2, device="cpu", tensorboard=False, compile=compile)
        results[compile] = train(cfg, tc, corpus, tmp_path / str(compile), progress=False)
    assert results[True].compiled and not results[False].compiled
    torch.testing.assert_close(results[True].losses, results[False].losses, rtol=1e-5, atol=1e-5)
    for name, tensor in results[False].model.state_dict().items():
        torch.testing.assert_close(results[True].model.state_dict()[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
