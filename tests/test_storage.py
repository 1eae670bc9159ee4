"""Checkpoints on disk: files written by main before the 2026-12 layout move load with the same logits."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gohgraph import GoHConfig, GoHTransformer, from_pretrained
from gohgraph.storage import CheckpointError, pin_legacy_expert_width, read_tensors, upgrade_legacy_names

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PRE_LAYOUT = ["pre_layout_tiny_graph", "pre_layout_graph_moe"]


@pytest.mark.parametrize("name", PRE_LAYOUT)
@pytest.mark.parametrize("loader", [GoHTransformer.from_pretrained, from_pretrained], ids=["class", "any-family"])
def test_checkpoint_from_before_the_move_gives_identical_logits(name, loader):
    expected = load_file(str(FIXTURES / name / "expected_logits.safetensors"))
    model = loader(FIXTURES / name).eval()
    assert isinstance(model, GoHTransformer)
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    # float32 rounding only: the expert router now runs the head router's softmax (one GAT round),
    # and small softmaxes without gradient run torch.softmax's kernel (ops/small_softmax.py)
    torch.testing.assert_close(logits, expected["logits"], rtol=0, atol=1e-6)


def test_pre_move_names_are_upgraded_and_nothing_else_is():
    names = ["blocks.0.attn.router.node_in.weight", "blocks.1.attn.flow_scale", "blocks.0.attn.gate.stage_mix.bias",
             "blocks.0.attn.token_router.proj.weight", "blocks.0.ffn.router.query.weight", "blocks.0.ffn.gate.expert_load",
             "blocks.0.attn.qkv.weight"]
    assert upgrade_legacy_names(names) == [
        "blocks.0.attn.head_routing.router.node_in.weight", "blocks.1.attn.head_routing.flow_scale",
        "blocks.0.attn.head_routing.gate.stage_mix.bias", "blocks.0.attn.head_routing.token_router.proj.weight",
        "blocks.0.ffn.router.query.weight", "blocks.0.ffn.gate.expert_load", "blocks.0.attn.qkv.weight"]
    assert upgrade_legacy_names(upgrade_legacy_names(names)) == upgrade_legacy_names(names)


def test_old_default_expert_width_is_pinned_from_the_weights():
    """Before the move, expert_hidden=None also divided by n_subtokens; such a checkpoint keeps its width."""
    config = GoHConfig.from_json(FIXTURES / "pre_layout_graph_moe" / "config.json")
    assert config.expert_hidden is None and config.n_subtokens == 2
    state = read_tensors(FIXTURES / "pre_layout_graph_moe" / "model.safetensors")
    pinned = pin_legacy_expert_width(config, state)
    legacy_width = config.hidden_dim // (config.top_k_experts * config.n_subtokens)
    assert pinned.expert_hidden == legacy_width == state["blocks.0.ffn.experts.w_out"].shape[1]
    assert config.expert_hidden_dim == config.hidden_dim // config.top_k_experts  # today's default
    # a checkpoint of today's default is left alone
    fresh = GoHTransformer(config)
    assert pin_legacy_expert_width(config, fresh.state_dict()) is config


def test_a_checkpoint_that_matches_neither_width_is_refused(tmp_path):
    config = GoHConfig(d_model=32, n_heads=4, n_layers=1, ffn="mh-moe", n_subtokens=2, n_experts=4, expert_hidden=12)
    GoHTransformer(config).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config.replace(expert_hidden=None).to_json(), encoding="utf-8")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        GoHTransformer.from_pretrained(tmp_path)


def test_nothing_loads_pickles():
    """Checkpoints are safetensors + JSON; no code path may unpickle (which runs code from a file)."""
    import re

    root = Path(__file__).resolve().parents[1]
    offending = []
    for folder in ("gohgraph", "viz", "examples", "benchmarks"):
        for path in (root / folder).rglob("*.py"):
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#", 1)[0]
                if re.search(r"\btorch\.load\(", code) and "weights_only=True" not in code:
                    offending.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
                if re.search(r"\b(import pickle|from pickle|cPickle|dill|allow_pickle\s*=\s*True)\b", code):
                    offending.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert not offending, "\n".join(offending)


def test_read_config_says_whether_the_directory_is_missing_or_a_file(tmp_path):
    from gohgraph.storage import read_config

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a file; expected the directory holding config"):
        read_config(weights)
    with pytest.raises(CheckpointError, match=r"nowhere does not exist; expected the directory"):
        read_config(tmp_path / "nowhere")
