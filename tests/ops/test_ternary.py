"""BitNet's quantisers and the 2-bit packing against element-by-element references."""

import pytest
import torch

from gohgraph.ops.ternary import absmax_int8, absmean_ternary, pack_ternary, straight_through, unpack_ternary


def test_absmean_ternary_is_round_of_w_over_mean_abs_clamped_to_one():
    torch.manual_seed(0)
    w = torch.randn(7, 5)
    q, gamma = absmean_ternary(w)
    scale = w.abs().sum() / w.numel()
    torch.testing.assert_close(gamma, scale)
    for value, code in zip(w.reshape(-1).tolist(), q.reshape(-1).tolist()):
        ratio = value / scale.item()
        expected = 0.0 if abs(ratio) < 0.5 else (1.0 if ratio > 0 else -1.0)
        assert code == expected
    assert set(q.unique().tolist()) <= {-1.0, 0.0, 1.0}


def test_stacked_experts_get_one_scale_each():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 6) * torch.tensor([0.1, 1.0, 10.0])[:, None, None]
    q, gamma = absmean_ternary(w, dims=(1, 2))
    assert gamma.shape == (3,)
    for e in range(3):
        q_e, gamma_e = absmean_ternary(w[e])
        torch.testing.assert_close(gamma[e], gamma_e)
        assert torch.equal(q[e], q_e)


def test_absmax_int8_per_token():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16)
    q, gamma = absmax_int8(x)
    assert gamma.shape == (2, 3, 1)
    for token, codes, peak in zip(x.reshape(-1, 16), q.reshape(-1, 16), gamma.reshape(-1)):
        assert peak.item() == token.abs().max().item()
        assert codes.abs().max().item() == 127  # the token's largest entry maps to +-127
        torch.testing.assert_close(codes, torch.round(token * 127 / peak).clamp(-128, 127))
    assert torch.equal(q, q.to(torch.int8).float())


def test_straight_through_passes_the_gradient_unchanged():
    latent = torch.randn(5, requires_grad=True)
    out = straight_through(latent, latent.detach().round())
    assert torch.equal(out, latent.detach().round())
    out.backward(torch.arange(5.0))
    assert torch.equal(latent.grad, torch.arange(5.0))


@pytest.mark.parametrize("shape", [(4,), (3, 5), (2, 3, 7), (1,)])
def test_pack_unpack_round_trip_and_byte_layout(shape):
    torch.manual_seed(0)
    q = torch.randint(-1, 2, shape).float()
    packed = pack_ternary(q)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-q.numel() // 4)
    assert torch.equal(unpack_ternary(packed, shape), q)
    codes = (q.reshape(-1) + 1).int().tolist() + [1] * (-q.numel() % 4)  # reference: 4 codes per byte, low bits first
    expected = [sum(codes[4 * i + j] << (2 * j) for j in range(4)) for i in range(len(codes) // 4)]
    assert packed.tolist() == expected
    with pytest.raises(ValueError, match="packed ternary weights must be uint8"):
        unpack_ternary(packed[:-1] if packed.numel() > 1 else packed.int(), shape)
