"""``gohgraph stats`` / ``gohgraph viz`` on seq2seq (TSV pairs, per attention kind) and encoder checkpoints."""

import json

import matplotlib.image as mpimg
import networkx as nx
import pytest
import torch

from gohgraph import GoHConfig, GoHEncoder, GoHSeq2Seq
from gohgraph.analysis.stats.collect import collect_routing_stats
from gohgraph.analysis.stats.kinds import collect_routing_stats_by_kind
from gohgraph.cli.main import main
from gohgraph.data.batches import eval_batches
from gohgraph.data.corpus import load_corpus
from gohgraph.data.objectives.seq2seq import stdlib_docstring_pairs

KINDS = ("encoder", "decoder_self", "cross")
PAIRS = [("translate: the cat", "le chat"), ("translate: a dog sleeps", "un chien dort"),
         ("hi", "salut tout le monde"), ("translate: the red house is big", "la maison rouge")]


@pytest.fixture()
def seq2seq_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("GOHGRAPH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_decoder_layers=1, n_heads=4, n_shared_heads=1,
                    top_k_heads=2, router="graph", router_rounds=1, router_dim=8, max_seq_len=64,
                    model_type="seq2seq", position_embedding="t5-relative", attention_scale="none",
                    ffn="moe", n_experts=4, top_k_experts=2)
    GoHSeq2Seq(cfg).save_pretrained(tmp_path / "s2s")
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{source}\t{target}\n" for source, target in PAIRS) + "\n", encoding="utf-8")
    return tmp_path / "s2s", pairs


def hand_batches(pairs, batch_size, pad_token_id):
    """Byte-encoded, right-padded dict batches built without the CLI's helper."""
    batches = []
    for start in range(0, len(pairs), batch_size):
        chunk = [(list(s.encode()), list(t.encode())) for s, t in pairs[start:start + batch_size]]
        src, tgt = max(len(s) for s, _ in chunk), max(len(t) for _, t in chunk)
        batches.append({
            "input_ids": torch.tensor([s + [pad_token_id] * (src - len(s)) for s, _ in chunk]),
            "attention_mask": torch.tensor([[1] * len(s) + [0] * (src - len(s)) for s, _ in chunk]),
            "labels": torch.tensor([t + [-100] * (tgt - len(t)) for _, t in chunk]),
        })
    return batches


def test_stats_of_a_seq2seq_checkpoint_has_a_section_per_kind(seq2seq_checkpoint, tmp_path, capsys):
    checkpoint, pairs = seq2seq_checkpoint
    out, table = tmp_path / "stats.json", tmp_path / "stats.csv"
    assert main(["stats", "--checkpoint", str(checkpoint), "--data", str(pairs), "--batches", "2",
                 "--batch-size", "2", "--out", str(out), "--csv", str(table), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert list(report["kinds"]) == list(KINDS)
    assert report["tokens"] == {"source": sum(len(s.encode()) for s, _ in PAIRS),
                                "target": sum(len(t.encode()) for _, t in PAIRS)}
    model = GoHSeq2Seq.from_pretrained(checkpoint)
    expected = collect_routing_stats_by_kind(model, hand_batches(PAIRS, 2, model.config.pad_token_id),
                                             progress=False).report()
    assert report == json.loads(json.dumps(expected))
    assert table.read_text().startswith("kind,layer,group,item,metric,value")
    printed = capsys.readouterr().out
    assert all(f"{kind} layer 0:" in printed for kind in KINDS)


def test_viz_of_a_seq2seq_checkpoint_writes_one_graph_per_kind(seq2seq_checkpoint, tmp_path):
    checkpoint, pairs = seq2seq_checkpoint
    out = tmp_path / "pictures"
    assert main(["viz", "--checkpoint", str(checkpoint), "--data", str(pairs), "--batches", "1",
                 "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    cfg = GoHSeq2Seq.from_pretrained(checkpoint).config
    for kind in KINDS:
        image = mpimg.imread(out / f"routing_graphs_{kind}.png")
        assert image.ndim == 3 and float(image.std()) > 0
        assert (out / f"head_load_heatmap_{kind}.png").is_file()
        graph = nx.read_graphml(out / f"routing_graph_{kind}.graphml")
        layers = 2 if kind == "encoder" else 1
        experts = 0 if kind == "cross" else cfg.n_subtokens + cfg.n_routed_experts  # the FFN follows self-attention
        assert graph.number_of_nodes() == layers * (cfg.n_heads + experts)
    assert not (out / "token_trace.png").exists()
    assert list(json.loads((out / "stats.json").read_text())["kinds"]) == list(KINDS)


def test_seq2seq_checkpoint_refuses_bad_pairs(seq2seq_checkpoint, tmp_path, capsys):
    checkpoint, pairs = seq2seq_checkpoint
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab here\n", encoding="utf-8")
    for data in (["--data", str(bad)], ["--data", f"a={pairs}"], ["--data", str(pairs), "--data", str(pairs)]):
        code = main(["stats", "--checkpoint", str(checkpoint), *data, "--out", str(tmp_path / "s.json"),
                     "--no-progress", "--overwrite"])
        assert code != 0
    err = capsys.readouterr().err
    assert "source<TAB>target" in err and "bad.tsv:1" in err
    assert len(err.strip().splitlines()) == 3 + 3  # per command: the checkpoint line and one error line


def test_stats_of_a_seq2seq_checkpoint_without_data_reads_the_default_pairs(seq2seq_checkpoint, tmp_path):
    checkpoint, _ = seq2seq_checkpoint
    out = tmp_path / "stats.json"
    assert main(["stats", "--checkpoint", str(checkpoint), "--batches", "1", "--batch-size", "2",
                 "--seq-len", "16", "--out", str(out), "--no-progress"]) == 0
    expected = [(s.encode()[:16], t.encode()[:16]) for s, t in stdlib_docstring_pairs().val[:2]]
    assert json.loads(out.read_text())["tokens"] == {"source": sum(len(s) for s, _ in expected),
                                                     "target": sum(len(t) for _, t in expected)}


def test_stats_and_viz_of_an_encoder_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("GOHGRAPH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    cfg = GoHConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
                    router="linear", max_seq_len=64, model_type="encoder", position_embedding="sinusoidal")
    GoHEncoder(cfg).save_pretrained(tmp_path / "enc")
    data = tmp_path / "data.txt"
    data.write_text("".join(f"def f_{i}(x):\n    return x + {i}\n" for i in range(100)), encoding="utf-8")
    out = tmp_path / "stats.json"
    assert main(["stats", "--checkpoint", str(tmp_path / "enc"), "--data", str(data), "--batches", "2",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    model = GoHEncoder.from_pretrained(tmp_path / "enc")
    batches = list(eval_batches(load_corpus(str(data)).val, 2, 16, max_batches=2))
    assert report == json.loads(json.dumps(collect_routing_stats(model, batches, progress=False).report()))
    assert report["config"]["model_type"] == "encoder"
    pictures = tmp_path / "pictures"
    assert main(["viz", "--checkpoint", str(tmp_path / "enc"), "--data", str(data), "--batches", "1",
                 "--batch-size", "2", "--seq-len", "16", "--out", str(pictures), "--no-progress"]) == 0
    assert (pictures / "routing_graphs.png").is_file() and (pictures / "head_load_heatmap.png").is_file()
    assert (pictures / "token_trace.png").is_file()  # the encoder output has no recursion field
