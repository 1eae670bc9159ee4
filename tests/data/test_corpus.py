"""Corpus loading, the token cache, user data errors, tokenizers and batches."""


import numpy as np
import pytest
import torch

from gohgraph.data.batches import eval_batches, train_batch
from gohgraph.data.corpus import load_corpus
from gohgraph.data.errors import DataError
from gohgraph.data.tokenizers import load_tokenizer
from tests.references import stdlib_split_reference

SMALL_STDLIB = 250_000  # bytes of the default corpus used here (the real default is 4 MB)


def test_default_corpus_is_the_stdlib_split_by_file(tmp_path):
    corpus = load_corpus(cache_dir=tmp_path, max_bytes=SMALL_STDLIB)
    train_ref, val_ref = stdlib_split_reference(SMALL_STDLIB)
    assert train_ref and val_ref  # this cap puts files on both sides (else the split is by position)
    assert corpus.vocab_size == 256 and "standard library" in corpus.source
    assert bytes(np.asarray(corpus.train, dtype=np.uint8)) == train_ref
    assert bytes(np.asarray(corpus.val, dtype=np.uint8)) == val_ref
    assert isinstance(corpus.train, np.memmap)
    assert corpus.decode(corpus.encode("déf x = 1")) == "déf x = 1"


def test_cache_is_reused_and_a_corrupt_cache_is_rebuilt(tmp_path):
    first = load_corpus(cache_dir=tmp_path, max_bytes=SMALL_STDLIB)
    reference = np.array(first.train)
    token_file = first.cache_path / "train.bin"
    stamp = token_file.stat().st_mtime_ns
    second = load_corpus(cache_dir=tmp_path, max_bytes=SMALL_STDLIB)
    assert token_file.stat().st_mtime_ns == stamp  # read from the cache, not rebuilt
    del first, second
    blob = bytearray(token_file.read_bytes())
    blob[10] ^= 0xFF
    token_file.write_bytes(bytes(blob))
    rebuilt = load_corpus(cache_dir=tmp_path, max_bytes=SMALL_STDLIB)
    np.testing.assert_array_equal(np.array(rebuilt.train), reference)
    (rebuilt.cache_path / "val.bin").write_bytes(b"")  # truncated file
    np.testing.assert_array_equal(np.array(load_corpus(cache_dir=tmp_path, max_bytes=SMALL_STDLIB).train), reference)


def test_user_text_file_directory_and_glob(tmp_path):
    texts = {f"doc{i}.txt": f"document number {i}: " + "abcdefghij" * 30 + "\n" for i in range(12)}
    (tmp_path / "docs").mkdir()
    for name, text in texts.items():
        (tmp_path / "docs" / name).write_text(text, encoding="utf-8")
    cache = tmp_path / "cache"
    directory = load_corpus(str(tmp_path / "docs"), cache_dir=cache)
    everything = bytes(np.asarray(directory.train, dtype=np.uint8)) + bytes(np.asarray(directory.val, dtype=np.uint8))
    assert len(everything) == sum(len(t) + 1 for t in texts.values())  # every file, one separator each
    for text in texts.values():
        assert (text + "\n").encode() in everything
    globbed = load_corpus(str(tmp_path / "docs" / "doc1*.txt"), cache_dir=cache)
    matched = ("doc1.txt", "doc10.txt", "doc11.txt")
    assert len(globbed.train) + len(globbed.val) == sum(len(texts[n]) + 1 for n in matched)
    single = load_corpus(str(tmp_path / "docs" / "doc3.txt"), cache_dir=cache)
    joined = bytes(np.asarray(single.train, dtype=np.uint8)) + bytes(np.asarray(single.val, dtype=np.uint8))
    assert joined == (texts["doc3.txt"] + "\n").encode() and len(single.val) > 0  # one file: split by position


def test_bad_data_gives_errors_naming_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_corpus(str(tmp_path / "no_such_dir"), cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="glob matches no files"):
        load_corpus(str(tmp_path / "*.nothing"), cache_dir=tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        load_corpus(str(empty), cache_dir=tmp_path)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 ".encode("latin-1") * 200)
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        load_corpus(str(latin1), cache_dir=tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("print('hi')\n")
    with pytest.raises(DataError, match="short.txt: only 12 bytes"):
        load_corpus(str(short), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizer='words' is not one of"):
        load_corpus(str(short), cache_dir=tmp_path, tokenizer="words")


def test_eval_batches_are_consecutive_windows():
    tokens = np.arange(1000, dtype=np.uint16)
    batches = list(eval_batches(tokens, batch_size=4, seq_len=32))
    assert [b.shape[0] for b in batches] == [4] * 7 + [3]  # 31 whole windows
    flat = torch.cat([b.reshape(-1) for b in batches])
    torch.testing.assert_close(flat, torch.arange(31 * 32))
    assert batches[0].dtype == torch.long
    limited = list(eval_batches(tokens, batch_size=4, seq_len=32, max_batches=2))
    assert len(limited) == 2 and torch.equal(limited[1], batches[1])
    with pytest.raises(DataError, match="fewer than seq_len=64"):
        list(eval_batches(tokens[:50], 4, 64))


def test_train_batches_are_seeded_windows_sharded_by_rank():
    tokens = np.arange(10_000, dtype=np.uint32)
    whole = train_batch(tokens, batch_size=6, seq_len=16, seed=3, step=7)
    assert whole.shape == (6, 17)
    # every row is one contiguous window of the token stream
    torch.testing.assert_close(whole - whole[:, :1], torch.arange(17).expand(6, 17))
    assert torch.equal(whole, train_batch(tokens, 6, 16, seed=3, step=7))
    assert not torch.equal(whole, train_batch(tokens, 6, 16, seed=3, step=8))
    shards = [train_batch(tokens, 6, 16, seed=3, step=7, rank=r, world_size=3) for r in range(3)]
    assert torch.equal(torch.cat(shards), whole)
    with pytest.raises(ValueError, match="divisible by world_size=4"):
        train_batch(tokens, 6, 16, 0, 0, rank=0, world_size=4)


def test_bpe_tokenizer_trains_round_trips_and_saves(tmp_path):
    pytest.importorskip("tokenizers")
    text = "".join(f"def function_{i}(x):\n    return x * {i} + offset\n\n" for i in range(400))
    (tmp_path / "code.py").write_text(text)
    corpus = load_corpus(str(tmp_path / "code.py"), cache_dir=tmp_path / "cache", tokenizer="bpe:300")
    assert 256 < corpus.vocab_size <= 300
    assert int(np.max(corpus.train)) < corpus.vocab_size
    assert len(corpus.train) + len(corpus.val) < len(text)  # merges compress the text
    sample = "def function_7(x):\n    return x * 7 + offset\n"
    assert corpus.decode(corpus.encode(sample)) == sample
    saved = corpus.save_tokenizer(tmp_path / "run")
    reloaded = load_tokenizer(saved.parent)
    assert reloaded.encode(sample) == corpus.encode(sample)


def test_a_directory_with_several_bad_files_names_them_all_at_once(tmp_path):
    (tmp_path / "good.txt").write_text("def f(x):\n    return x\n" * 40, encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 5)
    (tmp_path / "binary.bin").write_bytes(bytes(range(256)))
    with pytest.raises(DataError) as caught:
        load_corpus(str(tmp_path), cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert message.startswith("3 of 4 data files cannot be used")
    assert all(name in message for name in ("empty.txt is empty", "latin1.txt is not UTF-8", "binary.bin is not UTF-8"))
