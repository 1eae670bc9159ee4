"""``gohgraph train --objective seq2seq``, ``eval`` and ``generate`` of such a run, end to end (tiny)."""

import json

import pytest
import torch

from gohgraph import GoHSeq2Seq, from_pretrained
from gohgraph.cli.main import main
from gohgraph.data.objectives import SpecialTokens
from gohgraph.data.record_files import load_records
from gohgraph.data.tokenizers import load_tokenizer

TINY = ["--set", "d_model=32", "--set", "n_layers=1", "--set", "n_decoder_layers=1", "--seq-len", "24",
        "--batch-size", "4"]
EOS, PAD = 259, 258  # after the 256 bytes: mask, cls, pad, eos


@pytest.fixture()
def pairs(tmp_path):
    """Reverse a short word: 60 pairs in one file (the last tenth validates)."""
    words = [f"w{i:02d}{'abcdef'[i % 6]}" for i in range(60)]
    path = tmp_path / "reverse.tsv"
    path.write_text("".join(f"reverse {word}\t{word[::-1]}\n" for word in words), encoding="utf-8")
    return path


@pytest.fixture()
def tiny_run(tmp_path, pairs):
    run_dir = tmp_path / "s2s"
    assert main(["train", "--objective", "seq2seq", "--data", str(pairs), "--run-dir", str(run_dir),
                 "--max-steps", "3", *TINY, "--set", "eval_batches=1"]) == 0
    return run_dir


def test_train_seq2seq_loss_goes_down(tmp_path, pairs, capsys):
    run_dir = tmp_path / "s2s"
    code = main(["train", "--objective", "seq2seq", "--data", str(pairs), "--run-dir", str(run_dir),
                 "--max-steps", "40", "--eval-every", "5", "--lr", "0.01", "--warmup-steps", "2", *TINY])
    assert code == 0
    printed = capsys.readouterr().out
    assert "token accuracy" in printed and "copy baseline" in printed and "exact match" in printed
    model = from_pretrained(run_dir / "final")
    assert isinstance(model, GoHSeq2Seq)
    assert (model.config.vocab_size, model.config.pad_token_id, model.config.decoder_start_token_id) == (260, PAD, PAD)
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [entry["step"] for entry in history] == list(range(5, 45, 5))
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    settings = json.loads((run_dir / "objective.json").read_text())
    assert settings["objective"] == "seq2seq" and settings["data"] == str(pairs) and settings["seq_len"] == 24


def byte_ids(text):
    return list(text.encode())


def hand_metrics(model, pairs, encode=byte_ids, eos=EOS, pad=PAD):
    """Loss, token accuracy, exact match and copy accuracy, one unpadded pair at a time, decoding
    greedily with full forward passes (no KV cache, no ``generate``)."""
    loss = correct = copied = tokens = exact = 0
    for source, target in pairs:
        src = torch.tensor([encode(source)])
        tgt = encode(target) + [eos]
        logits = model(src, labels=torch.tensor([tgt])).logits[0]
        loss += float(torch.nn.functional.cross_entropy(logits, torch.tensor(tgt), reduction="sum"))
        correct += sum(int(logits[t].argmax()) == tgt[t] for t in range(len(tgt)))
        copied += sum(t < src.shape[1] and int(src[0, t]) == tgt[t] for t in range(len(tgt)))
        tokens += len(tgt)
        decoded = [pad]
        while len(decoded) <= len(tgt) and decoded[-1] != eos:
            decoded.append(int(model(src, decoder_input_ids=torch.tensor([decoded])).logits[0, -1].argmax()))
        exact += decoded[1:] == tgt
    return {"loss": loss / tokens, "token_accuracy": correct / tokens, "exact_match": exact / len(pairs),
            "copy_token_accuracy": copied / tokens, "examples": len(pairs), "tokens": tokens}


def test_eval_reports_the_metrics_computed_by_hand(tiny_run, pairs, capsys):
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tiny_run), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = from_pretrained(tiny_run / "final").eval()
    _, val, _ = load_records(str(pairs), "pairs")
    with torch.no_grad():
        expected = hand_metrics(model, val)
    assert result["objective"] == "seq2seq"
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5), key
    assert main(["eval", "--checkpoint", str(tiny_run)]) == 0
    printed = capsys.readouterr().out
    assert f"token accuracy {expected['token_accuracy']:.4f} (copy baseline {expected['copy_token_accuracy']:.4f})" \
        in printed


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.9", "--top-k", "20", "--seed", "3"]])
def test_generate_prints_what_model_generate_returns(tiny_run, capsys, sampling):
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "reverse w07b", "--max-new-tokens", "12",
                 *sampling]) == 0
    printed = capsys.readouterr().out
    model = from_pretrained(tiny_run / "final")
    temperature = float(sampling[1])
    generator = torch.Generator().manual_seed(3 if temperature else 0)
    out = model.generate(torch.tensor([list(b"reverse w07b")]), 12, temperature=temperature,
                         top_k=20 if temperature else 50, eos_token_id=EOS, generator=generator)[0, 1:].tolist()
    if EOS in out:
        out = out[:out.index(EOS)]
    assert printed == bytes(i for i in out if i < 256).decode("utf-8", errors="replace") + "\n"


def test_seq2seq_bad_inputs_are_one_line_errors(tmp_path, pairs, tiny_run, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "a", "target": "b"}\n{"source": "a"}\n', encoding="utf-8")
    commands = [
        (["train", "--objective", "seq2seq", "--data", str(bad), "--run-dir", str(tmp_path / "r"), *TINY],
         "bad.jsonl:2: expected a JSON object with keys ['source', 'target']"),
        (["train", "--objective", "seq2seq", "--data", f"a={pairs}", "--run-dir", str(tmp_path / "r"), *TINY],
         "reads one --data path"),
        (["train", "--objective", "seq2seq", "--tokenizer", "bpe:12", "--run-dir", str(tmp_path / "r"), *TINY],
         "tokenizer='bpe:12': the BPE vocabulary must be an integer in (256, 2^20]"),
        (["train", "--objective", "seq2seq", "--resume", "--run-dir", str(tiny_run), "--set", "d_model=48"],
         "the model config differs (d_model: checkpoint 32 vs given 48)"),
        (["train", "--objective", "seq2seq", "--run-dir", str(tiny_run), *TINY],
         "already holds a trained model or checkpoints; pass --resume to continue it, --overwrite"),
        (["train", "--objective", "seq2seq", "--data", str(pairs), "--run-dir", str(tmp_path / "r"), "--max-steps",
          "1", "--batch-size", "64", "--seq-len", "24", "--set", "d_model=32"],
         "54 training pairs cannot fill one batch of batch_size=64"),
        (["generate", "--checkpoint", str(tiny_run), "--prompt", "x" * 200], "--prompt is 200 tokens"),
        (["eval", "--checkpoint", str(tiny_run), "--data", str(bad)], "bad.jsonl:2:"),
    ]
    for argv, message in commands:
        capsys.readouterr()
        assert main(argv) == 1, argv
        err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("checkpoint: ")]
        assert len(err) == 1 and message in err[0], (argv, err)


# ---------------------------------------------------------------------- a BPE run
@pytest.fixture()
def bpe_run(tmp_path, pairs):
    run_dir = tmp_path / "s2s-bpe"
    assert main(["train", "--objective", "seq2seq", "--data", str(pairs), "--tokenizer", "bpe:300", "--run-dir",
                 str(run_dir), "--max-steps", "3", *TINY, "--set", "eval_batches=1"]) == 0
    tokenizer = load_tokenizer(run_dir / "final")
    assert type(tokenizer).__name__ == "BPETokenizer"
    return run_dir, tokenizer


def test_eval_of_a_bpe_run_encodes_with_the_runs_tokenizer(bpe_run, pairs, capsys):
    run_dir, tokenizer = bpe_run
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run_dir), "--json", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model = from_pretrained(run_dir / "final").eval()
    special = SpecialTokens(tokenizer.vocab_size, with_eos=True)
    assert model.config.vocab_size == special.vocab_size and model.config.pad_token_id == special.pad
    _, val, _ = load_records(str(pairs), "pairs")
    with torch.no_grad():
        expected = hand_metrics(model, val, tokenizer.encode, special.eos, special.pad)
    # the sources' BPE ids are not their bytes ("reverse" is merged), so bytes would score otherwise
    assert sum(len(tokenizer.encode(s)) for s, _ in val) < sum(len(s.encode()) for s, _ in val)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-5), key


def test_generate_of_a_bpe_run_encodes_the_prompt_and_decodes_with_the_runs_tokenizer(bpe_run, capsys):
    run_dir, tokenizer = bpe_run
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(run_dir), "--prompt", "reverse w07b", "--max-new-tokens", "12",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    model = from_pretrained(run_dir / "final")
    eos = SpecialTokens.of_model(model.config).eos
    out = model.generate(torch.tensor([tokenizer.encode("reverse w07b")]), 12, temperature=0, eos_token_id=eos,
                         generator=torch.Generator().manual_seed(0))[0, 1:].tolist()
    if eos in out:
        out = out[:out.index(eos)]
    assert printed == tokenizer.decode([i for i in out if i < tokenizer.vocab_size]) + "\n"


def test_stats_of_a_bpe_run_reads_its_pairs_with_the_runs_tokenizer(bpe_run, pairs, tmp_path):
    run_dir, tokenizer = bpe_run
    out = tmp_path / "stats.json"
    assert main(["stats", "--checkpoint", str(run_dir), "--batches", "1", "--batch-size", "4", "--seq-len", "16",
                 "--out", str(out), "--no-progress"]) == 0
    _, val, _ = load_records(str(pairs), "pairs")
    assert json.loads(out.read_text())["tokens"] == {
        "source": sum(len(tokenizer.encode(s)[:16]) for s, _ in val[:4]),
        "target": sum(len(tokenizer.encode(t)[:15]) + 1 for _, t in val[:4])}  # and the eos
