"""evaluate_seq2seq on padded batches equals the metrics of each pair alone, decoded by hand."""

import pytest
import torch

from gohgraph import GoHConfig, GoHSeq2Seq
from gohgraph.data.objectives.seq2seq import EncodedPairs
from gohgraph.training.seq2seq_metrics import evaluate_seq2seq

EOS, PAD = 11, 10


def hand_metrics(model, pairs):
    loss = correct = copied = tokens = exact = 0
    for source, target in pairs:
        src = torch.tensor([source])
        logits = model(src, labels=torch.tensor([target])).logits[0]
        loss += float(torch.nn.functional.cross_entropy(logits, torch.tensor(target), reduction="sum"))
        correct += sum(int(logits[t].argmax()) == target[t] for t in range(len(target)))
        copied += sum(t < len(source) and source[t] == target[t] for t in range(len(target)))
        tokens += len(target)
        decoded = [PAD]
        while len(decoded) <= len(target) and decoded[-1] != EOS:
            decoded.append(int(model(src, decoder_input_ids=torch.tensor([decoded])).logits[0, -1].argmax()))
        exact += decoded[1:] == target
    return {"loss": loss / tokens, "token_accuracy": correct / tokens, "exact_match": exact / len(pairs),
            "copy_token_accuracy": copied / tokens, "examples": len(pairs), "tokens": tokens}


def test_padded_batches_give_the_per_pair_metrics():
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=12, d_model=32, n_layers=1, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="graph", router_dim=8, max_seq_len=16, model_type="seq2seq", position_embedding="rope",
                    pad_token_id=PAD, decoder_start_token_id=PAD)
    model = GoHSeq2Seq(cfg).eval()
    # the model's own greedy output as one target (up to its eos, if any), so one pair matches exactly
    with torch.no_grad():
        greedy = model.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0.0)[0, 1:].tolist()
    own = greedy[:greedy.index(EOS) + 1] if EOS in greedy else greedy
    val = [([1, 2, 3], own), ([4, 5, 6, 7, 8], [4, 5, 9, EOS]), ([2], [2, 3, 4, 5, 6, EOS]), ([3, 3], [EOS]),
           ([5, 6, 7], [5, 1, EOS])]
    data = EncodedPairs(train=[], val=val, source="hand", pad_id=PAD, eos_id=EOS)
    with torch.no_grad():
        expected = hand_metrics(model, val)
    got = evaluate_seq2seq(model, data, batch_size=2)
    assert expected["exact_match"] >= 0.2
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-5), key
    assert "exact_match" not in evaluate_seq2seq(model, data, batch_size=2, exact_match=False)
