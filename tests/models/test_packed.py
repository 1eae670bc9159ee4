"""Packed ternary checkpoints: 2 bits per weight plus scales, the same logits after loading."""

import pytest
import torch
from safetensors import safe_open

from gohgraph import GoHConfig, GoHTransformer, from_pretrained
from gohgraph.models.packed import PACKED_SUFFIX, SCALE_SUFFIX, ternary_weights
from gohgraph.storage import WEIGHTS_NAME

CFG = dict(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, linear="bitnet")


def tensor_bytes(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key).nbytes for key in handle.keys()}


@pytest.mark.parametrize("changes", [dict(ffn="dense"),
                                     dict(ffn="mh-moe", n_subtokens=2, n_experts=4, n_shared_experts=1,
                                          router="linear", n_shared_heads=1, top_k_heads=2)])
def test_packed_save_and_load_give_identical_logits_and_16x_smaller_matrices(tmp_path, changes):
    torch.manual_seed(0)
    model = GoHTransformer(GoHConfig(**CFG, **changes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (2, 12))
    for _ in range(3):  # trained latent weights, not their initialisation
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path / "latent")
    model.save_pretrained(tmp_path / "packed", packed_ternary=True)
    for loaded in (GoHTransformer.from_pretrained(tmp_path / "packed"), from_pretrained(tmp_path / "packed")):
        with torch.no_grad():
            assert torch.equal(loaded.eval()(ids).logits, model(ids).logits)
    latent, packed = tensor_bytes(tmp_path / "latent" / WEIGHTS_NAME), tensor_bytes(tmp_path / "packed" / WEIGHTS_NAME)
    keys = [key for key, _, _ in ternary_weights(model)]
    fp32 = sum(latent[key] for key in keys)
    two_bit = sum(packed[key + PACKED_SUFFIX] + packed[key + SCALE_SUFFIX] for key in keys)
    assert 15.0 < fp32 / two_bit <= 16.0
    untouched = set(latent) - set(keys)  # embeddings, norms, routers: as they were
    assert untouched == set(packed) - {key + suffix for key in keys for suffix in (PACKED_SUFFIX, SCALE_SUFFIX)}


def test_packing_needs_a_bitnet_model(tmp_path):
    with pytest.raises(ValueError, match="packed_ternary=True needs ternary weights"):
        GoHTransformer(GoHConfig(**{**CFG, "linear": "standard"})).save_pretrained(tmp_path, packed_ternary=True)


def test_a_packed_file_without_its_scales_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from gohgraph.storage import CheckpointError

    GoHTransformer(GoHConfig(**CFG)).save_pretrained(tmp_path, packed_ternary=True)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    del state["blocks.0.attn.qkv.weight" + SCALE_SUFFIX]
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match="without its scale"):
        GoHTransformer.from_pretrained(tmp_path)
