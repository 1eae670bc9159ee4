"""Generation: left-padded batches, end-of-sequence, nucleus sampling and argument checks."""

import pytest
import torch

from gohgraph import GoHConfig, GoHTransformer
from gohgraph.models.generation import sample_next_token

ROUTED = dict(n_shared_heads=1, top_k_heads=2)
VARIANTS = {
    "dense": dict(router="dense"),
    "MoH": dict(router="linear", **ROUTED),
    "GoH": dict(router="graph", router_rounds=2, **ROUTED),
    "GoH-MoE": dict(router="graph", **ROUTED, ffn="graph-moe", n_experts=4, n_subtokens=2),
    "GPT-2 style": dict(router="graph", **ROUTED, position_embedding="learned", norm="layer", mlp="gelu"),
}


def model_of(variant, seed=0):
    torch.manual_seed(seed)
    model = GoHTransformer(GoHConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=40,
                                     **VARIANTS[variant])).eval()
    with torch.no_grad():  # sharper logits than the init, so greedy choices are not near-ties
        for param in model.parameters():
            param.mul_(3.0) if param.dim() > 1 else None
    return model


def left_padded(prompts, pad=0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "recompute"])
def test_padded_batch_generates_what_each_prompt_generates_alone(variant, use_cache):
    model = model_of(variant)
    prompts = [[5, 9, 13, 2, 7, 30, 31], [3], [40, 41, 1, 8]]
    ids, mask = left_padded(prompts, pad=63)
    batched = model.generate(ids, max_new_tokens=12, temperature=0, attention_mask=mask, use_cache=use_cache)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, temperature=0, use_cache=use_cache)
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist(), f"row {row}"


@pytest.mark.parametrize("variant", ["dense", "GoH"])
def test_padding_does_not_change_the_logits_of_real_tokens(variant):
    model = model_of(variant)
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    ids, mask = left_padded([prompt[0].tolist()], pad=0)
    padded_ids = torch.cat([torch.full((1, 3), 11), ids], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], dim=1)
    with torch.no_grad():
        alone = model(prompt).logits
        padded = model(padded_ids, attention_mask=padded_mask).logits[:, 3:]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(model(padded_ids, attention_mask=padded_mask).logits).all()  # pad rows too


def test_generation_stops_rows_at_end_of_sequence():
    model = model_of("GoH")
    prompt = torch.tensor([[5, 9, 13], [7, 7, 7]])
    free = model.generate(prompt, max_new_tokens=8, temperature=0)
    generated = free[0, 3:].tolist()
    eos = generated[1]
    cut = generated.index(eos) + 1  # row 0 stops right after its first eos
    stopped = model.generate(prompt, max_new_tokens=8, temperature=0, eos_token_id=eos, pad_token_id=0)
    row0 = stopped[0, 3:].tolist()
    assert row0[:cut] == generated[:cut] and all(t == 0 for t in row0[cut:])
    row1_free = free[1, 3:].tolist()
    if eos in row1_free:
        cut = row1_free.index(eos) + 1
        assert stopped[1, 3:3 + cut].tolist() == row1_free[:cut]
    else:
        assert stopped[1, 3:].tolist() == row1_free
    everyone_done = model.generate(torch.tensor([[5, 9, 13]]), max_new_tokens=8, temperature=0, eos_token_id=eos)
    assert everyone_done.shape[1] == 3 + cut  # stops once every row is done


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    draws = {int(sample_next_token(logits, 1.0, None, generator, top_p=0.75)) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.75 <= 0.8: the first two tokens
    draws = {int(sample_next_token(logits, 1.0, None, generator, top_p=0.1)) for _ in range(50)}
    assert draws == {0}  # the most likely token always stays
    draws = {int(sample_next_token(logits.flip(-1), 1.0, None, generator, top_p=0.75)) for _ in range(300)}
    assert draws == {2, 3}  # order of the vocabulary does not matter


@pytest.mark.parametrize("kwargs,message", [
    (dict(input_ids=torch.tensor([1, 2, 3])), r"input_ids must be a \[batch, seq\] tensor"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), r"seq >= 1"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), r"integer token ids"),
    (dict(input_ids=torch.tensor([[1, 64]])), r"\[0, vocab_size=64\)"),
    (dict(temperature=-1.0), r"temperature=-1.0 must be a finite number >= 0"),
    (dict(temperature=float("nan")), r"temperature=nan"),
    (dict(max_new_tokens=-3), r"max_new_tokens=-3 must be an integer >= 1"),
    (dict(max_new_tokens=0), r"max_new_tokens=0"),
    (dict(top_k=0), r"top_k=0 must be an integer >= 1"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
    (dict(eos_token_id=99), r"eos_token_id=99"),
    (dict(attention_mask=torch.tensor([[1, 0, 1]])), r"pad on the left"),
    (dict(attention_mask=torch.tensor([[0, 0, 0]])), r"row without any token"),
    (dict(attention_mask=torch.tensor([[0, 2, 1]])), r"only 0 \(padding\) and 1"),
    (dict(attention_mask=torch.tensor([[1, 1]])), r"attention_mask has shape \[1, 2\]"),
])
def test_bad_generation_arguments_give_one_clear_error(kwargs, message):
    model = model_of("dense")
    call = dict(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=2, temperature=0.0)
    with pytest.raises(ValueError, match=message):
        model.generate(**{**call, **kwargs})
