"""Seq2seq pairs: docstring -> def line extraction, the standard-library split, encoding and batches."""

import pytest

from gohgraph.data.objectives.seq2seq import (
    IGNORE_INDEX,
    collate_seq2seq,
    copy_baseline_counts,
    docstring_def_pairs,
    encode_pair_data,
    encode_pairs,
    load_pair_data,
    seq2seq_batches,
    stdlib_docstring_pairs,
)

SOURCE = '''
import functools

def plain(a, b=1):
    """Add b to a."""
    return a + b

def undocumented(x):
    return x

class Box:
    """A class docstring is not a function's."""

    @functools.lru_cache(maxsize=None)
    def method(self, key: str, *args, flag: bool = False, **kw) -> "Box":
        """Look up key.

        Args:
            key: the key.
        """
        return self

async def fetch(url,
                timeout=3.0):
    """Fetch url."""

def outer():
    """Outer."""
    def inner(y):
        """Inner."""
'''


def test_docstring_def_pairs_of_a_small_source():
    assert docstring_def_pairs(SOURCE) == [
        ("Add b to a.", "def plain(a, b=1):"),
        ("Look up key.\n\nArgs:\n    key: the key.",  # common indentation removed, relative kept
         "def method(self, key: str, *args, flag: bool=False, **kw) -> 'Box':"),
        ("Fetch url.", "async def fetch(url, timeout=3.0):"),  # a two-line signature on one line
        ("Outer.", "def outer():"),
        ("Inner.", "def inner(y):"),
    ]
    with pytest.raises(SyntaxError):
        docstring_def_pairs("def broken(:\n")


def byte_encode(text):
    return list(text.encode("utf-8"))


def test_encoding_cuts_and_ends_targets_with_eos():
    encoded = encode_pairs([("abcdef", "xyz"), ("ab", "longer target")], byte_encode, max_source_len=4,
                           max_target_len=5, eos_id=300)
    assert encoded == [([97, 98, 99, 100], [120, 121, 122, 300]), ([97, 98], [108, 111, 110, 103, 300])]
    with pytest.raises(ValueError, match="max_target_len=1"):
        encode_pairs([("a", "b")], byte_encode, 4, 1, eos_id=300)


def test_batches_pad_sources_with_pad_and_mask_and_targets_with_minus_100():
    encoded = encode_pairs([("abc", "x"), ("a", "xyz")], byte_encode, 8, 8, eos_id=300)
    batch = collate_seq2seq(encoded, pad_id=301)
    assert batch["input_ids"].tolist() == [[97, 98, 99], [97, 301, 301]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[120, 300, IGNORE_INDEX, IGNORE_INDEX], [120, 121, 122, 300]]
    # in order without a seed; a seeded order is a permutation of the same pairs, reproducible
    ordered = list(seq2seq_batches(encoded * 3, batch_size=4, pad_id=301))
    assert [len(b["labels"]) for b in ordered] == [4, 2]
    shuffled = [b["labels"].tolist() for b in seq2seq_batches(encoded * 3, 4, 301, seed=5)]
    assert shuffled == [b["labels"].tolist() for b in seq2seq_batches(encoded * 3, 4, 301, seed=5)]


def test_copy_baseline_counts_tokens_equal_to_the_source_at_the_same_position():
    encoded = encode_pairs([("abc", "abz"), ("q", "qq")], byte_encode, 8, 8, eos_id=300)
    batch = collate_seq2seq(encoded, pad_id=301)
    # row 0: a, b right; z, eos wrong. row 1: q right; second q meets padding; eos wrong
    assert copy_baseline_counts(batch) == (3, 7)


def test_stdlib_pairs_are_split_by_file():
    data = stdlib_docstring_pairs(max_bytes=600_000)
    assert len(data.train) > 50 and len(data.val) > 5
    for docstring, header in data.train[:200] + data.val:
        assert header.startswith(("def ", "async def ")) and header.endswith(":") and "\n" not in header
        assert docstring.strip()
    # the same cap twice gives the same pairs: the split is a function of the files alone
    assert stdlib_docstring_pairs(max_bytes=600_000).val == data.val


def test_pair_files_and_encoding_without_eos(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(f'{{"source": "s{i}", "target": "t\\t{i}"}}\n' for i in range(20)), encoding="utf-8")
    data = load_pair_data(str(path))
    assert data.train + data.val == [(f"s{i}", f"t\t{i}") for i in range(20)] and len(data.val) == 2
    encoded = encode_pair_data(data, lambda text: list(text.encode()), 3, pad_id=7, eos_id=None)
    assert encoded.val == [(list(b"s18"), list(b"t\t1")), (list(b"s19"), list(b"t\t1"))]
    assert encode_pair_data(data, lambda text: list(text.encode()), 3, 7, 9).val[0][1] == list(b"t\t") + [9]
