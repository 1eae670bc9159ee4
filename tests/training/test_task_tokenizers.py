"""``--tokenizer`` in the classify and seq2seq tasks: ``byte`` gives the data it always gave (bit for
bit, against the byte-slicing reference below); ``bpe:N`` trains a BPE on the training texts alone,
every id fits the tokenizer's vocabulary and the special tokens follow it; ``file:PATH`` reuses a
saved tokenizer; the run's ``tokenizer.json`` is written by ``save_data_files``."""

import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import torch

from gohgraph.config import GoHConfig
from gohgraph.data.corpus import DEFAULT_CORPUS_BYTES, _path_hash, _stdlib_files
from gohgraph.data.objectives import SpecialTokens
from gohgraph.data.objectives.classify import CLASSIFY_VAL_PERCENT, EXCLUDED_PACKAGES
from gohgraph.data.objectives.seq2seq import load_pair_data
from gohgraph.data.record_files import load_records
from gohgraph.data.tokenizers import TOKENIZER_FILE, BPETokenizer, ByteTokenizer, load_tokenizer, text_tokenizer
from gohgraph.training.config import TrainConfig
from gohgraph.training.tasks import get_task

SEQ_LEN = 48


def byte_package_snippets(seq_len, cls_id, pad_id, n_classes, max_bytes, min_snippet=32):
    """The package snippets as they were cut before tokenizers: byte slices of each file's UTF-8."""
    root = Path(sysconfig.get_paths()["stdlib"])
    per_file = []
    for path in _stdlib_files(root, max_bytes):
        parts = path.relative_to(root).parts
        if len(parts) < 2 or parts[0] in EXCLUDED_PACKAGES:
            continue
        try:
            data = path.read_bytes().decode("utf-8").encode("utf-8")
        except UnicodeDecodeError:
            continue
        width = seq_len - 1
        snippets = [data[i:i + width] for i in range(0, len(data), width) if len(data[i:i + width]) >= min(min_snippet, width)]
        per_file.append((parts[0], _path_hash(path.relative_to(root).as_posix()) % 100 < CLASSIFY_VAL_PERCENT, snippets))
    sizes, sides = Counter(), {}
    for package, is_val, snippets in per_file:
        sizes[package] += len(snippets)
        if snippets:
            sides.setdefault(package, set()).add(is_val)
    sizes = Counter({p: n for p, n in sizes.items() if len(sides.get(p, ())) == 2})
    labels = sorted(p for p, _ in sizes.most_common(n_classes))
    out = {}
    for side in (False, True):
        rows = [(s, labels.index(p)) for p, v, snippets in per_file if v == side and p in labels for s in snippets]
        ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for r, (snippet, _) in enumerate(rows):
            ids[r, 0] = cls_id
            ids[r, 1:1 + len(snippet)] = torch.tensor(list(snippet))
            mask[r, :1 + len(snippet)] = 1
        out[side] = (ids, mask, torch.tensor([y for _, y in rows]))
    return out, labels


def _tc(**changes):
    return TrainConfig(**dict(dict(batch_size=4, seq_len=SEQ_LEN, seed=3), **changes))


def _first_batches(task, data, tc, n=3):
    batch = task.training_batches(data, tc)
    return [batch(step, 0, 0, 1) for step in range(n)]


def test_byte_classification_data_and_batches_are_the_byte_slices_they_always_were():
    import gohgraph.data.objectives.classify as classify

    task, tc = get_task("classify"), _tc()
    data = task.load_data({"data": None, "tokenizer": "byte"}, None, tc, GoHConfig(model_type="encoder"))
    expected, labels = byte_package_snippets(SEQ_LEN, 257, 258, 8, DEFAULT_CORPUS_BYTES)
    assert data.labels == labels and isinstance(data.tokenizer, ByteTokenizer)
    for (x, mask, y), side in (((data.train_x, data.train_mask, data.train_y), False),
                               ((data.val_x, data.val_mask, data.val_y), True)):
        assert x.dtype == mask.dtype == torch.long
        assert torch.equal(x, expected[side][0]) and torch.equal(mask, expected[side][1])
        assert torch.equal(y, expected[side][2])
    reference = classify.classification_batches(*expected[False], tc.batch_size, seed=tc.seed)
    for got, (ids, mask, y) in zip(_first_batches(task, data, tc), reference):
        assert torch.equal(got["input_ids"], ids) and torch.equal(got["attention_mask"], mask)
        assert torch.equal(got["class_labels"], y)
    assert task.fit_model_config(GoHConfig(model_type="encoder"), data, tc, set(), None).vocab_size == 259


def test_byte_seq2seq_batches_are_the_byte_pairs_they_always_were(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"say {i} é\tsaid {i}\n" for i in range(30)), encoding="utf-8")
    task, tc = get_task("seq2seq"), _tc(seq_len=8)
    data = task.load_data({"data": str(path), "tokenizer": "byte"}, None, tc, GoHConfig(model_type="seq2seq"))
    assert (data.pad_id, data.eos_id) == (258, 259) and isinstance(data.tokenizer, ByteTokenizer)
    pairs = load_pair_data(str(path))
    assert data.train == [(list(s.encode())[:8], list(t.encode())[:7] + [259]) for s, t in pairs.train]
    first = _first_batches(task, data, tc, 1)[0]
    order = torch.randperm(len(pairs.train), generator=torch.Generator().manual_seed(tc.seed))[:4].tolist()
    source = [list(pairs.train[i][0].encode())[:8] for i in order]
    assert first["input_ids"].tolist() == [s + [258] * (8 - len(s)) for s in source]
    assert task.fit_model_config(GoHConfig(model_type="seq2seq"), data, tc, set(), None).vocab_size == 260


def _labelled_file(tmp_path):
    path = tmp_path / "labels"
    path.mkdir()
    for n in range(12):  # files: split into train and validation by file
        (path / f"f{n}.tsv").write_text("".join(f"{'ab'[i % 2]}\t{'alpha beta' if i % 2 else 'gamma delta'} "
                                                f"file{n} row{i}\n" for i in range(10)), encoding="utf-8")
    return path


def test_bpe_classification_trains_on_the_training_texts_and_specials_follow_its_vocabulary(tmp_path):
    path = _labelled_file(tmp_path)
    task, tc = get_task("classify"), _tc(seq_len=16)
    data = task.load_data({"data": str(path), "tokenizer": "bpe:300"}, None, tc, GoHConfig(model_type="encoder"))
    train, val, _ = load_records(str(path), "labelled")
    assert val  # some files are validation files, and their text trained no merge
    assert data.tokenizer.to_json() == BPETokenizer.train([text for text, _ in train], 300).to_json()
    vocab = data.tokenizer.vocab_size  # at most 300: a small text runs out of pairs to merge
    special = SpecialTokens(vocab)
    assert 256 < vocab <= 300
    assert (data.train_x[:, 0] == special.cls).all()
    assert torch.equal(data.train_x == special.pad, data.train_mask == 0)
    assert int(data.train_x[:, 1:][data.train_mask[:, 1:].bool()].max()) < vocab
    assert data.train_x[0, 1:][data.train_mask[0, 1:].bool()].tolist() == data.tokenizer.encode(train[0][0])[:15]
    cfg = task.fit_model_config(GoHConfig(model_type="encoder"), data, tc, set(), None)
    assert cfg.vocab_size == vocab + 3 and cfg.n_labels == 2
    task.check_model_fits(cfg, data, tc)
    with pytest.raises(ValueError, match="vocab_size=259"):
        task.check_model_fits(cfg.replace(vocab_size=259), data, tc)
    (tmp_path / "run").mkdir()
    task.save_data_files(tmp_path / "run", data)
    assert load_tokenizer(tmp_path / "run").to_json() == data.tokenizer.to_json()
    # file:PATH reads that tokenizer back: the same ids
    again = task.load_data({"data": str(path), "tokenizer": f"file:{tmp_path / 'run' / TOKENIZER_FILE}"}, None, tc,
                           None)
    assert torch.equal(again.train_x, data.train_x) and torch.equal(again.val_x, data.val_x)


def test_bpe_stdlib_snippets_are_cut_from_each_files_tokens():
    import gohgraph.data.objectives.classify as classify

    task, tc = get_task("classify"), _tc()
    data = task.load_data({"data": None, "tokenizer": "bpe:300"}, None, tc, GoHConfig(model_type="encoder"))
    _, files = classify.stdlib_package_files()
    trained = BPETokenizer.train(classify.training_texts(files), 300)
    assert data.tokenizer.to_json() == trained.to_json()
    assert int(data.train_x.max()) == SpecialTokens(300).pad and int(data.val_x.max()) <= SpecialTokens(300).pad
    # the first training snippet is the first seq_len - 1 tokens of the first training file of its package
    package = data.labels[int(data.train_y[0])]
    text = next(text for p, is_val, text in files if p == package and not is_val)
    assert data.train_x[0, 1:].tolist() == trained.encode(text)[:SEQ_LEN - 1]


def test_bpe_seq2seq_trains_on_the_training_pairs_and_ends_targets_with_eos(tmp_path):
    path = _labelled_file(tmp_path)  # "a<TAB>text" rows are pairs too: source a, target the text
    task, tc = get_task("seq2seq"), _tc(seq_len=12)
    data = task.load_data({"data": str(path), "tokenizer": "bpe:300"}, None, tc, None)
    pairs = load_pair_data(str(path))
    assert data.tokenizer.to_json() == text_tokenizer("bpe:300", [t for pair in pairs.train for t in pair]).to_json()
    vocab = data.tokenizer.vocab_size
    special = SpecialTokens(vocab, with_eos=True)
    assert (data.pad_id, data.eos_id) == (special.pad, special.eos) == (vocab + 2, vocab + 3)
    source, target = data.train[0]
    assert source == data.tokenizer.encode(pairs.train[0][0])[:12]
    assert target == data.tokenizer.encode(pairs.train[0][1])[:11] + [vocab + 3]
    assert max(max(s + t[:-1]) for s, t in data.train + data.val) < vocab
    cfg = task.fit_model_config(GoHConfig(model_type="seq2seq"), data, tc, set(), None)
    assert (cfg.vocab_size, cfg.pad_token_id, cfg.decoder_start_token_id) == (vocab + 4, vocab + 2, vocab + 2)
    again = task.load_data({"data": str(path), "tokenizer": "bpe:300"}, None, tc, None)  # a resumed run's load
    assert again.tokenizer.to_json() == data.tokenizer.to_json() and again.train == data.train


def test_a_bad_tokenizer_spec_is_refused_in_one_line(tmp_path):
    path = _labelled_file(tmp_path)
    for objective in ("classify", "seq2seq"):
        with pytest.raises(ValueError, match="tokenizer='bpe:12'"):
            get_task(objective).load_data({"data": str(path), "tokenizer": "bpe:12"}, None, _tc(), None)
        with pytest.raises(FileNotFoundError, match="nope.json"):
            get_task(objective).load_data({"data": str(path), "tokenizer": f"file:{tmp_path}/nope.json"}, None,
                                          _tc(), None)
