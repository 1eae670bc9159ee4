"""Expert scoring against the released implementations, with copied weights (docs/experts.md):
Hugging Face's Mixtral block (softmax, renormalised top-k) and DeepSeek-V3 MoE (sigmoid scores,
selection bias on the scores, group-limited top-k, normalisation, routed scaling factor)."""

import pytest
import torch

from gohgraph import GoHConfig
from gohgraph.moe.layer import MoEFeedForward

transformers = pytest.importorskip("transformers")


def copy_expert_weights(layer, gate_up, down):
    """HF's stacked experts ``gate_up [E, 2h, d]`` (gate rows, then up), ``down [E, d, h]`` -> ours."""
    with torch.no_grad():
        layer.experts.w_in.copy_(gate_up.transpose(1, 2))
        layer.experts.w_out.copy_(down.transpose(1, 2))


def randomise(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)


def test_softmax_renormalised_top_k_equals_mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_config = transformers.MixtralConfig(hidden_size=32, intermediate_size=16, num_local_experts=8,
                                           num_experts_per_tok=2)
    block = MixtralSparseMoeBlock(hf_config).eval()
    randomise(block, 0)
    layer = MoEFeedForward(GoHConfig(d_model=32, n_heads=4, ffn="moe", n_experts=8, top_k_experts=2,
                                     expert_hidden=16)).eval()
    with torch.no_grad():
        layer.router.proj.weight.copy_(block.gate.weight)
    copy_expert_weights(layer, block.experts.gate_up_proj, block.experts.down_proj)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(1))
    expected = block(x)
    expected = expected[0] if isinstance(expected, tuple) else expected
    torch.testing.assert_close(layer(x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,top_groups,renormalise", [(4, 2, True), (1, 1, True), (4, 1, False)])
def test_sigmoid_group_limited_scoring_equals_deepseek_v3(groups, top_groups, renormalise):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = transformers.DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                              num_experts_per_tok=2, n_shared_experts=1, n_group=groups,
                                              topk_group=top_groups, routed_scaling_factor=2.5,
                                              norm_topk_prob=renormalise)
    block = DeepseekV3MoE(hf_config).eval()
    randomise(block, 2)
    with torch.no_grad():  # a spread of correction biases, so selection differs from the plain top-k
        block.gate.e_score_correction_bias.copy_(torch.linspace(-0.3, 0.3, 8)[torch.randperm(8)])
    cfg = GoHConfig(d_model=32, n_heads=4, ffn="moe", n_experts=9, n_shared_experts=1, top_k_experts=2,
                    expert_hidden=16, expert_score="sigmoid", expert_renormalise=renormalise,
                    n_expert_groups=groups, top_k_expert_groups=top_groups, routed_scaling_factor=2.5)
    layer = MoEFeedForward(cfg).eval()
    with torch.no_grad():
        layer.router.proj.weight.copy_(block.gate.weight)
        layer.gate.selection_bias.copy_(block.gate.e_score_correction_bias)
        shared = block.shared_experts
        layer.shared_experts.w_in.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        layer.shared_experts.w_out.weight.copy_(shared.down_proj.weight)
    copy_expert_weights(layer, block.experts.gate_up_proj, block.experts.down_proj)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(3))
    y, routing = layer(x)
    torch.testing.assert_close(y, block(x), rtol=1e-5, atol=1e-5)
    _, hf_weights, hf_indices = block.gate(x)
    ours = routing.expert_indices.reshape(-1, 2).sort(-1)
    theirs = hf_indices.sort(-1)
    assert torch.equal(ours.values, theirs.values)  # the same experts for every token
    torch.testing.assert_close(routing.expert_weights.reshape(-1, 2).gather(-1, ours.indices),
                               hf_weights.gather(-1, theirs.indices))


def test_softmax_without_renormalisation_keeps_the_full_softmax_values():
    cfg = GoHConfig(d_model=32, n_heads=4, ffn="moe", n_experts=6, top_k_experts=2, expert_renormalise=False)
    layer = MoEFeedForward(cfg).eval()
    logits = torch.randn(5, 1, 6)
    choice = layer.gate(logits)
    full = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(choice.weights, full.gather(-1, full.topk(2).indices))
    assert (choice.weights.sum(-1) < 1).all()  # Qwen2-MoE's norm_topk_prob=False: no renormalisation


def test_pooled_expert_balance_equals_hugging_face_over_layers():
    """expert_balance_pooling="model" pools counts and probabilities over layers before the product,
    as HF's load_balancing_loss_func does; ours is 1 at uniform load, HF's k, so ours = HF / k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from gohgraph import GoHTransformer

    cfg = GoHConfig(vocab_size=64, d_model=32, n_heads=4, n_layers=3, max_seq_len=16, ffn="moe", n_experts=6,
                    top_k_experts=2, expert_balance_pooling="model", balance_loss_coef=1.0, z_loss_coef=0.0)
    torch.manual_seed(0)
    model = GoHTransformer(cfg)
    logits = []
    for block in model.blocks:
        block.ffn.router.register_forward_hook(lambda module, args, out: logits.append(out.reshape(-1, 6)))
        with torch.no_grad():
            block.ffn.router.proj.weight.normal_(std=1.0)  # a skewed load, different in every layer
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    expected = load_balancing_loss_func(tuple(logits), 6, 2) / 2
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    per_layer = sum(layer.aux_losses["expert_balance"] for layer in out.routing)
    per_layer_model = GoHTransformer(cfg.replace(expert_balance_pooling="layer"))
    per_layer_model.load_state_dict(model.state_dict())
    assert per_layer_model(ids).aux_loss.item() == pytest.approx(per_layer.item(), rel=1e-5)
    assert abs(per_layer.item() - 3 * expected.item()) > 1e-3  # the two conventions differ on skewed loads
    out.aux_loss.backward()  # the pooled loss carries gradient to every layer's router
    assert all(block.ffn.router.proj.weight.grad.abs().sum() > 0 for block in model.blocks)


def mh_moe_gshard_l_aux(logits):
    """MH-MoE's released GShard loss (torchscale top2gating): me = mean softmax, ce = mean one-hot
    of each row's first choice, l_aux = mean(me * ce) * E * E."""
    gates = torch.softmax(logits, dim=-1)
    n_experts = gates.shape[1]
    mask1 = torch.nn.functional.one_hot(gates.argmax(dim=1), n_experts).float()
    return torch.mean(gates.mean(dim=0) * mask1.mean(dim=0)) * n_experts * n_experts


def test_top1_balance_counting_equals_the_gshard_loss_of_mh_moe():
    cfg = GoHConfig(d_model=32, n_heads=4, ffn="mh-moe", n_subtokens=2, n_experts=8, top_k_experts=2,
                    expert_balance_top1=True)
    torch.manual_seed(0)
    layer = MoEFeedForward(cfg)
    with torch.no_grad():
        layer.router.proj.weight.normal_(std=1.0)  # a skewed load
    logits = []
    layer.router.register_forward_hook(lambda module, args, out: logits.append(out.reshape(-1, 8)))
    _, routing = layer(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1)))
    expected = mh_moe_gshard_l_aux(logits[0])
    assert routing.aux_losses["expert_balance"].item() == pytest.approx(expected.item(), rel=1e-5)
    top_k_count = MoEFeedForward(cfg.replace(expert_balance_top1=False))
    top_k_count.load_state_dict(layer.state_dict())
    assert abs(top_k_count(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1)))[1]
               .aux_losses["expert_balance"].item() - expected.item()) > 1e-4  # the conventions differ


def test_qwen2_moe_routing_and_gated_shared_expert_equal_hugging_face():
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_config = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=16, num_experts=8,
                                            num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                            norm_topk_prob=False)
    block = Qwen2MoeSparseMoeBlock(hf_config).eval()
    randomise(block, 5)
    cfg = GoHConfig(d_model=32, n_heads=4, ffn="moe", n_experts=9, n_shared_experts=1, top_k_experts=2,
                    expert_hidden=16, expert_renormalise=False, shared_expert_hidden=40, shared_expert_gate=True)
    layer = MoEFeedForward(cfg).eval()
    with torch.no_grad():
        layer.router.proj.weight.copy_(block.gate.weight)
        shared = block.shared_expert
        layer.shared_experts.w_in.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        layer.shared_experts.w_out.weight.copy_(shared.down_proj.weight)
        layer.shared_experts.output_gate.weight.copy_(block.shared_expert_gate.weight)
    copy_expert_weights(layer, block.experts.gate_up_proj, block.experts.down_proj)
    x = torch.randn(2, 11, 32, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(layer(x)[0], block(x), rtol=1e-5, atol=1e-5)
