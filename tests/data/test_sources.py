"""Several corpora at once: --data NAME=PATH[:WEIGHT], sampling by weight, a validation split per source."""

import math

import numpy as np
import pytest

from gohgraph.data.corpus import load_corpus
from gohgraph.data.sources import MixedCorpus, SourceSpec, load_sources, parse_data_flags, parse_source_spec

# each source is written in its own alphabet, so a window's letters say which source it came from
ALPHABETS = {"lower": "abcdefghij", "digits": "0123456789", "upper": "KLMNOPQRST"}


def write_source(root, name, alphabet, files=12, length=400, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir()
    for i in range(files):
        text = "".join(rng.choice(list(alphabet), size=length))
        (folder / f"part{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def three_sources(tmp_path):
    return {name: write_source(tmp_path, name, alphabet, seed=i)
            for i, (name, alphabet) in enumerate(ALPHABETS.items())}


def test_source_specs_parse_strictly():
    assert parse_source_spec("code=src/:3") == SourceSpec("code", "src/", 3.0)
    assert parse_source_spec("web=data/*.txt") == SourceSpec("web", "data/*.txt", 1.0)
    assert parse_source_spec("a-b_1=x:y.txt:0.25") == SourceSpec("a-b_1", "x:y.txt", 0.25)
    for bad, message in [("=x", "source name"), ("a b=x", "source name"), ("web=", "no path"),
                         ("web=x:0", "must be a finite number > 0"), ("web=x:-1", "must be a finite number > 0"),
                         ("web=x:1e999", "must be a finite number > 0"), ("web=x:1.2.3", "is not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_source_spec(bad)


def test_data_flags_single_path_named_sources_and_mistakes(tmp_path):
    assert parse_data_flags(None) == {}
    assert parse_data_flags(["corpus.txt"]) == {"data": "corpus.txt"}
    assert parse_data_flags(["a=x:2", "b=y"]) == {
        "data": None, "sources": [{"name": "a", "path": "x", "weight": 2.0}, {"name": "b", "path": "y", "weight": 1.0}]}
    existing = tmp_path / "k=v.txt"  # an existing path that looks like a spec stays a path
    existing.write_text("x")
    assert parse_data_flags([str(existing)]) == {"data": str(existing)}
    with pytest.raises(ValueError, match="without names"):
        parse_data_flags(["x.txt", "y.txt"])
    with pytest.raises(ValueError, match="has no name while other"):
        parse_data_flags(["a=x", "y.txt"])
    with pytest.raises(ValueError, match=r"names \['a'\] more than once"):
        parse_data_flags(["a=x", "a=y"])


def test_sampling_matches_the_weights_within_binomial_error(three_sources, tmp_path):
    weights = {"lower": 1.0, "digits": 3.0, "upper": 6.0}
    mixed = load_sources([SourceSpec(name, str(three_sources[name]), weight) for name, weight in weights.items()],
                         cache_dir=tmp_path / "cache")
    draws, batch, seq_len = 10_000, 100, 8
    windows = np.concatenate([mixed.train_batch(batch, seq_len, seed=7, step=step).numpy()
                              for step in range(draws // batch)])
    assert windows.shape == (draws, seq_len + 1)
    total = sum(weights.values())
    for name, alphabet in ALPHABETS.items():
        count = int(np.isin(windows, [ord(c) for c in alphabet]).any(axis=1).sum())
        p = weights[name] / total
        sigma = math.sqrt(draws * p * (1 - p))
        assert abs(count - draws * p) <= 4 * sigma, (name, count, draws * p, sigma)
    # every window lies inside one source: its letters come from one alphabet (files end in a newline)
    for window in windows[:500]:
        letters = {chr(b) for b in window} - {"\n"}
        assert sum(letters <= set(alphabet) for alphabet in ALPHABETS.values()) == 1, letters


def test_ranks_together_draw_the_single_process_batch(three_sources, tmp_path):
    mixed = load_sources([SourceSpec(n, str(p), 1.0 + i) for i, (n, p) in enumerate(three_sources.items())],
                         cache_dir=tmp_path / "cache")
    whole = mixed.train_batch(8, 16, seed=1, step=3, micro_step=1)
    parts = [mixed.train_batch(8, 16, seed=1, step=3, micro_step=1, rank=r, world_size=2) for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([p.numpy() for p in parts]), whole.numpy())
    assert not np.array_equal(whole.numpy(), mixed.train_batch(8, 16, seed=1, step=4).numpy())


def test_each_source_keeps_its_own_split_by_file(three_sources, tmp_path):
    cache = tmp_path / "cache"
    mixed = load_sources([SourceSpec(n, str(p)) for n, p in three_sources.items()], cache_dir=cache)
    assert isinstance(mixed, MixedCorpus) and mixed.names == list(ALPHABETS)
    for name, val in mixed.val_by_source().items():
        alone = load_corpus(str(three_sources[name]), cache_dir=cache)
        np.testing.assert_array_equal(np.asarray(val), np.asarray(alone.val))
    assert len(mixed.val) == sum(len(v) for v in mixed.val_by_source().values())
    np.testing.assert_allclose(mixed.probabilities, [1 / 3] * 3)


def test_bpe_trained_on_one_source_is_refused_for_several(three_sources, tmp_path):
    with pytest.raises(ValueError, match="trains a BPE on one corpus"):
        load_sources([SourceSpec(n, str(p)) for n, p in three_sources.items()], tmp_path, tokenizer="bpe")
    with pytest.raises(FileNotFoundError, match="source 'gone'"):
        load_sources([SourceSpec("gone", str(tmp_path / "missing"))], tmp_path)
