"""Routing statistics per attention kind (seq2seq) and of encoder models, against hand counts."""

import csv
import dataclasses

import pytest
import torch

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq, LayerRouting
from gohgraph.analysis.stats.collect import RoutingStats, collect_routing_stats
from gohgraph.analysis.stats.kinds import SEQ2SEQ_KINDS, KindRoutingStats, collect_routing_stats_by_kind
from gohgraph.models.seq2seq import ROUTING_KINDS

VOCAB = 40


def seq2seq_model(ffn="moe", n_decoder_layers=3):
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_decoder_layers=n_decoder_layers, n_heads=4,
                    n_shared_heads=1, top_k_heads=2, router="graph", router_rounds=1, router_dim=8,
                    max_seq_len=32, model_type="seq2seq", position_embedding="t5-relative",
                    attention_scale="none", ffn=ffn, n_experts=4, top_k_experts=2)
    return GoHSeq2Seq(cfg).eval()


def padded_batches(generator, n=2):
    """Dict batches with source padding (attention_mask 0) and label padding (-100) in different rows."""
    batches = []
    for _ in range(n):
        input_ids = torch.randint(0, VOCAB, (3, 7), generator=generator)
        attention_mask = torch.ones(3, 7, dtype=torch.long)
        attention_mask[0, 4:] = 0
        attention_mask[2, 6:] = 0
        labels = torch.randint(0, VOCAB, (3, 5), generator=generator)
        labels[1, 2:] = -100
        labels[2, 4:] = -100
        batches.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return batches


def hand_counts(records_per_batch, masks):
    """Per layer: [heads] activation counts and the number of counted tokens, by brute force."""
    n_layers = len(records_per_batch[0])
    counts = [torch.zeros(records_per_batch[0][0].head_gates.shape[-1], dtype=torch.float64)
              for _ in range(n_layers)]
    tokens = 0
    for records, mask in zip(records_per_batch, masks):
        batch, seq = mask.shape
        for b in range(batch):
            for t in range(seq):
                if not mask[b, t]:
                    continue
                tokens += 1
                for layer, record in enumerate(records):
                    counts[layer] += (record.head_gates[b, t] > 0).double()
    return counts, tokens


def test_seq2seq_stats_per_kind_equal_hand_counts_without_padding():
    model = seq2seq_model()
    batches = padded_batches(torch.Generator().manual_seed(1))
    stats = collect_routing_stats_by_kind(model, batches, progress=False)
    report = stats.report()
    assert list(report["kinds"]) == list(SEQ2SEQ_KINDS) == list(ROUTING_KINDS)
    with torch.no_grad():
        outs = [model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
                for batch in batches]
    source_masks = [batch["attention_mask"].bool() for batch in batches]
    target_masks = [batch["labels"] != -100 for batch in batches]
    assert report["tokens"] == {"source": int(sum(m.sum() for m in source_masks)),
                                "target": int(sum(m.sum() for m in target_masks))}
    assert report["batches"] == 2
    for kind in SEQ2SEQ_KINDS:
        masks = source_masks if kind == "encoder" else target_masks
        counts, tokens = hand_counts([out.routing[kind] for out in outs], masks)
        kind_report = report["kinds"][kind]
        assert len(kind_report["layers"]) == (2 if kind == "encoder" else 3)
        assert kind_report["tokens"] == tokens
        for layer, count in zip(kind_report["layers"], counts):
            assert layer["tokens"] == tokens
            assert layer["heads"]["activation_count"] == pytest.approx(count.tolist())
            assert layer["heads"]["activation_frequency"] == pytest.approx((count / tokens).tolist())
        # the FFN's experts follow the encoder and decoder self-attention records only
        assert all(("experts" in layer) == (kind != "cross") for layer in kind_report["layers"])


def test_seq2seq_expert_counts_equal_hand_counts_of_the_decoder_records():
    model = seq2seq_model()
    batches = padded_batches(torch.Generator().manual_seed(2), n=1)
    report = collect_routing_stats_by_kind(model, batches, progress=False).report()
    batch = batches[0]
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    mask = batch["labels"] != -100
    for layer, record in enumerate(out.routing["decoder_self"]):
        indices = record.experts.expert_indices  # [batch, tgt, subtokens, k]
        expected = torch.zeros(model.config.n_routed_experts, dtype=torch.float64)
        for b, t in mask.nonzero().tolist():
            for expert in indices[b, t].flatten().tolist():
                expected[expert] += 1
        assert report["kinds"]["decoder_self"]["layers"][layer]["experts"]["assignment_count"] == \
            pytest.approx(expected.tolist())


def test_token_profiles_of_the_decoder_kinds_read_the_shifted_labels():
    model = seq2seq_model(ffn="dense", n_decoder_layers=1)
    batch = padded_batches(torch.Generator().manual_seed(3), n=1)[0]
    report = collect_routing_stats_by_kind(model, [batch], progress=False).report()
    decoder_ids = model.shift_right(batch["labels"])[batch["labels"] != -100]
    occurrences = torch.bincount(decoder_ids, minlength=VOCAB)
    for kind in ("decoder_self", "cross"):
        entropy = report["kinds"][kind]["layers"][0]["token_entropy"]
        assert dict(zip(entropy["token_id"], entropy["occurrences"])) == \
            {i: int(n) for i, n in enumerate(occurrences.tolist()) if n}


def test_padding_content_does_not_change_any_kind():
    """Changing the padded source tokens leaves every kind's report as it was."""
    model = seq2seq_model(ffn="dense")
    batch = padded_batches(torch.Generator().manual_seed(4), n=1)[0]
    other = {name: value.clone() for name, value in batch.items()}
    other["input_ids"][batch["attention_mask"] == 0] = 3
    first = collect_routing_stats_by_kind(model, [batch], progress=False).report()
    second = collect_routing_stats_by_kind(model, [other], progress=False).report()
    assert first == second


def test_csv_has_a_kind_column_and_every_kind(tmp_path):
    model = seq2seq_model(ffn="dense", n_decoder_layers=1)
    stats = collect_routing_stats_by_kind(model, padded_batches(torch.Generator().manual_seed(5), n=1), progress=False)
    with stats.to_csv(tmp_path / "s.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["kind"] for row in rows} == set(SEQ2SEQ_KINDS)
    tokens = {row["kind"]: int(row["value"]) for row in rows if row["metric"] == "tokens" and row["layer"] == "0"}
    report = stats.report()
    assert tokens == {kind: report["kinds"][kind]["tokens"] for kind in SEQ2SEQ_KINDS}


def test_bad_seq2seq_inputs_raise_clear_errors():
    model = seq2seq_model(ffn="dense")
    with pytest.raises(ValueError, match="collect_routing_stats_by_kind"):
        collect_routing_stats(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    with pytest.raises(ValueError, match="dict with input_ids and labels"):
        collect_routing_stats_by_kind(model, [torch.zeros(1, 4, dtype=torch.long)], progress=False)
    stats = KindRoutingStats(model.config)
    with pytest.raises(ValueError, match="kinds"):
        stats.update([])
    with pytest.raises(ValueError, match="model_type='seq2seq'"):
        KindRoutingStats(GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4))


def test_a_batch_refused_by_one_kind_is_counted_by_none():
    model = seq2seq_model(ffn="dense", n_decoder_layers=1)
    batch = padded_batches(torch.Generator().manual_seed(7), n=1)[0]
    stats = collect_routing_stats_by_kind(model, [batch], progress=False)
    before = stats.report()
    with torch.no_grad():
        out = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    routing = dict(out.routing)
    routing["cross"] = [dataclasses.replace(record, head_gates=record.head_gates[..., :3]) for record in routing["cross"]]
    with pytest.raises(ValueError, match=r"routing\['cross'\]: layer 0: head_gates has 3 heads"):
        stats.update(routing, batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     decoder_input_ids=model.shift_right(batch["labels"]))
    assert stats.report() == before


def test_encoder_stats_count_real_tokens_only():
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", max_seq_len=32, model_type="encoder", position_embedding="sinusoidal")
    model = GoHEncoder(cfg).eval()
    generator = torch.Generator().manual_seed(6)
    ids = torch.randint(0, VOCAB, (3, 6), generator=generator)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 3:] = 0
    report = collect_routing_stats(model, [(ids, mask)], progress=False).report()
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    counts, tokens = hand_counts([out.routing], [mask.bool()])
    assert report["tokens"] == tokens == int(mask.sum())
    assert report["config"]["model_type"] == "encoder"
    for layer, count in zip(report["layers"], counts):
        assert layer["heads"]["activation_count"] == pytest.approx(count.tolist())


def test_decoder_reports_name_no_model_type():
    """Decoder-only reports keep their old keys."""
    cfg = GoHConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4)
    stats = RoutingStats(cfg)
    stats.update([LayerRouting(head_gates=torch.ones(1, 3, 4))])
    assert "model_type" not in stats.report()["config"]
