"""generate(compile=True): compiled head routers decode exactly as the eager ones, and fall back."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.routers.heads import HeadRouting

CFG = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, n_shared_heads=1, top_k_heads=2)


def test_compiled_routers_decode_exactly_as_eager():
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, router="graph", head_graph="ring")).eval()
    prompt = torch.randint(0, 64, (2, 5))
    eager = model.generate(prompt, max_new_tokens=12, temperature=0.0)
    compiled = model.generate(prompt, max_new_tokens=12, temperature=0.0, compile=True)
    routings = [m for m in model.modules() if isinstance(m, HeadRouting)]
    assert all(r.compiled_route is not None for r in routings)
    assert torch.equal(compiled, eager)
    x, q = torch.randn(2, 1, 32), torch.randn(2, 1, 4, 8)
    model._set_decoding(True)  # one-token decode calls go through the compiled route
    with torch.no_grad():
        got, want = routings[0](x, q), routings[0].route(x, q)
    model._set_decoding(False)
    for a, b in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "compiled_route" not in str(list(model.state_dict()))  # checkpoints never see it


def test_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nsecond line")

    monkeypatch.setattr(torch, "compile", unavailable)
    torch.manual_seed(1)
    model = GoHTransformer(GoHConfig(**CFG, router="linear")).eval()
    prompt = torch.randint(0, 64, (1, 4))
    with pytest.warns(RuntimeWarning, match="torch.compile is unavailable here .RuntimeError: no C.. compiler found.; "
                                            "decoding stays eager"):
        ids = model.generate(prompt, max_new_tokens=6, temperature=0.0, compile=True)
    assert torch.equal(ids, model.generate(prompt, max_new_tokens=6, temperature=0.0))
    assert all(m.compiled_route is None for m in model.modules() if isinstance(m, HeadRouting))


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
