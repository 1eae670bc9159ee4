"""generate(compile=True): the whole compiled one-token step decodes exactly as eager, with one graph
for every step, and falls back to eager, with one warning, where it cannot compile.

Inductor (torch.compile's default backend) takes minutes per model on this machine's loaded CPUs,
so the equality tests compile with ``backend="aot_eager"``: the same Dynamo graph capture (graph
breaks, guards, recompilation) without the C++ code generation; the compiled-routers test keeps
inductor on the router alone (seconds).
"""

import functools
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import gohgraph.layers.attention as attention_module
from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.compile import CompileUnavailableWarning
from gohgraph.models.compiled_decode import CompiledDecoder, compiled_step, whole_step_unsupported
from gohgraph.routers.heads import HeadRouting

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_shared_heads=1, top_k_heads=2)
ROUTERS = {"dense": dict(router="dense"),
           "linear": dict(router="linear"),
           "graph": dict(router="graph", router_dim=8, head_graph="ring", inter_head_flow=True, n_kv_heads=2)}


def aot_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("router", list(ROUTERS))
def test_compiled_step_equals_eager_in_one_graph(router, monkeypatch):
    aot_eager(monkeypatch)
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, **ROUTERS[router])).eval()
    prompt = torch.randint(0, 64, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # row 0 left-padded
    new = 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileUnavailableWarning)  # a fallback fails the test
        compiled = model.generate(prompt, new, temperature=0.0, attention_mask=mask, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]  # the whole step, one graph
    assert torch.equal(compiled, model.generate(prompt, new, temperature=0.0, attention_mask=mask))

    # logits, step by step, on tokens fed in (not the model's own greedy choices)
    fed = torch.randint(0, 64, (2, new - 1))
    caches = [model.new_cache("static", 5 + new) for _ in range(2)]
    model._set_decoding(True)
    with torch.inference_mode():
        for cache in caches:
            model(prompt, cache=cache, attention_mask=mask)
        decoder = CompiledDecoder(model, caches[0], mask, compiled_step(model))
        running_mask = mask
        for t in range(new - 1):
            running_mask = torch.cat([running_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            want = model(fed[:, t:t + 1], cache=caches[1], attention_mask=running_mask).logits[:, -1]
            torch.testing.assert_close(decoder(fed[:, t:t + 1]), want, rtol=1e-5, atol=1e-5)
        decoder.sync()
    model._set_decoding(False)
    assert caches[0].lengths == caches[1].lengths

    # eos handling, another prompt of the same shapes: still the same graph, no recompilation
    eos = int(compiled[1, 7])
    other = torch.randint(0, 64, (2, 5))
    for ids in (prompt, other):
        got = model.generate(ids, new, temperature=0.0, attention_mask=mask, eos_token_id=eos, compile=True)
        assert torch.equal(got, model.generate(ids, new, temperature=0.0, attention_mask=mask, eos_token_id=eos))
    assert counters["stats"]["unique_graphs"] == 1 and not counters["recompiles"] and not counters["graph_break"]


@pytest.mark.parametrize("router", ["linear", "graph"])
def test_compiled_step_gathers_the_active_heads_and_decodes_as_eager(router, monkeypatch):
    """head_execution="sparse" inside the compiled step: the active heads gathered by index
    (gathered_head_attention), still one graph, the same tokens and logits as eager masked decoding."""
    aot_eager(monkeypatch)
    calls = []
    original = attention_module.gathered_head_attention
    monkeypatch.setattr(attention_module, "gathered_head_attention",
                        lambda *args, **kwargs: calls.append(args[4]) or original(*args, **kwargs))
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, **ROUTERS[router], head_execution="sparse")).eval()
    prompt = torch.randint(0, 64, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    model.generate(prompt, 8, temperature=0.0, attention_mask=mask, compile=True)
    assert calls and set(calls) == {1 + 2}  # traced, with shared + top-k heads
    # without the counter (a Python side effect the graph guards on): one graph for every step
    monkeypatch.setattr(attention_module, "gathered_head_attention", original)
    aot_eager(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CompileUnavailableWarning)
        compiled = model.generate(prompt, 8, temperature=0.0, attention_mask=mask, compile=True)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    model.set_execution(head_execution="masked")
    assert torch.equal(compiled, model.generate(prompt, 8, temperature=0.0, attention_mask=mask))

    fed = torch.randint(0, 64, (2, 4))
    caches = [model.new_cache("static", 10) for _ in range(2)]
    model._set_decoding(True)
    with torch.inference_mode():
        for cache in caches:
            model(prompt, cache=cache, attention_mask=mask)
        model.set_execution(head_execution="sparse")
        decoder = CompiledDecoder(model, caches[0], mask, compiled_step(model))
        got = [decoder(fed[:, t:t + 1]) for t in range(4)]
        model.set_execution(head_execution="masked")
        running_mask = mask
        for t in range(4):
            running_mask = torch.cat([running_mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            want = model(fed[:, t:t + 1], cache=caches[1], attention_mask=running_mask).logits[:, -1]
            torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)
    model._set_decoding(False)


def test_sampled_compiled_decoding_equals_eager(monkeypatch):
    aot_eager(monkeypatch)
    torch.manual_seed(4)
    model = GoHTransformer(GoHConfig(**CFG, router="linear")).eval()
    prompt = torch.randint(0, 64, (1, 3))
    runs = [model.generate(prompt, 10, temperature=1.0, top_k=20, compile=flag,
                           generator=torch.Generator().manual_seed(7)) for flag in (True, False)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("changes, reason", [
    (dict(sliding_window=4), "a sliding window"),
    (dict(position_embedding="alibi"), "position_embedding='alibi'"),
    (dict(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4), "MLA"),
])
def test_configurations_the_static_step_cannot_express_compile_only_the_routers(changes, reason, monkeypatch):
    aot_eager(monkeypatch)
    cfg = GoHConfig(**CFG, router="linear", **changes)
    assert reason in whole_step_unsupported(cfg)
    torch.manual_seed(5)
    model = GoHTransformer(cfg).eval()
    prompt = torch.randint(0, 64, (2, 5))
    eager = model.generate(prompt, max_new_tokens=8, temperature=0.0)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=0.0, compile=True), eager)
    assert "_compiled_decode_step" not in model.__dict__
    assert all(r.compiled_route is not None for r in model.modules() if isinstance(r, HeadRouting))


def test_compiled_routers_decode_exactly_as_eager():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, router="graph", head_graph="ring")).eval()
    prompt = torch.randint(0, 64, (2, 5))
    eager = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    assert model.compile_routers()
    routings = [m for m in model.modules() if isinstance(m, HeadRouting)]
    assert all(r.compiled_route is not None for r in routings)
    assert torch.equal(model.generate(prompt, max_new_tokens=12, temperature=0.0), eager)
    x, q = torch.randn(2, 1, 32), torch.randn(2, 1, 4, 8)
    model._set_decoding(True)  # one-token decode calls go through the compiled route
    with torch.no_grad():
        got, want = routings[0](x, q), routings[0].route(x, q)
    model._set_decoding(False)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "compiled_route" not in str(list(model.state_dict()))  # checkpoints never see it


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", unavailable)
    torch.manual_seed(1)
    model = GoHTransformer(GoHConfig(**CFG, router="linear")).eval()
    prompt = torch.randint(0, 64, (1, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = [model.generate(prompt, max_new_tokens=6, temperature=0.0, compile=True) for _ in range(2)]
    messages = [str(w.message) for w in caught if issubclass(w.category, CompileUnavailableWarning)]
    assert messages == ["torch.compile is unavailable here (RuntimeError: no C++ compiler found); "
                        "decoding stays eager"]  # once, in one line, not again on the next call
    eager = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    assert all(torch.equal(ids, eager) for ids in runs)


def test_a_compiler_failing_at_the_first_step_falls_back_to_eager(monkeypatch):
    def broken_backend(graph, example_inputs):
        raise RuntimeError("inductor crashed")

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken_backend))
    torch._dynamo.reset()
    torch.manual_seed(2)
    model = GoHTransformer(GoHConfig(**CFG, router="graph")).eval()
    prompt = torch.randint(0, 64, (2, 4))
    eager = model.generate(prompt, max_new_tokens=6, temperature=0.0)
    with pytest.warns(CompileUnavailableWarning, match="torch.compile is unavailable here .*decoding stays eager"):
        ids = model.generate(prompt, max_new_tokens=6, temperature=0.0, compile=True)
    assert torch.equal(ids, eager)


def test_cli_generate_compile_falls_back_in_one_line(tmp_path, monkeypatch, capsys):
    from gohgraph.cli.main import main

    torch.manual_seed(2)
    model = GoHTransformer(GoHConfig(**{**CFG, "vocab_size": 256}, router="graph"))
    model.save_pretrained(tmp_path / "model")

    def unavailable(*args, **kwargs):
        raise RuntimeError("inductor needs a C++ compiler")

    monkeypatch.setattr(torch, "compile", unavailable)
    assert main(["generate", "--checkpoint", str(tmp_path / "model"), "--prompt", "def f", "--max-new-tokens", "5",
                 "--temperature", "0", "--compile"]) == 0
    captured = capsys.readouterr()
    message = [line for line in captured.err.splitlines() if "--compile" in line]
    assert message == ["gohgraph generate: --compile: torch.compile is unavailable here (RuntimeError: inductor "
                       "needs a C++ compiler); decoding stays eager"]
    greedy = model.eval().generate(torch.tensor([list(b"def f")]), max_new_tokens=5, temperature=0)
    assert captured.out == bytes(greedy[0].tolist()).decode("utf-8", errors="replace") + "\n"
