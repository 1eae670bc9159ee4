"""User record files: TSV/JSONL pairs and labelled texts, their one-line errors and the split by file."""

import json

import pytest
import torch

from gohgraph.data import record_files
from gohgraph.data.errors import DataError
from gohgraph.data.objectives.classify import labelled_file_data
from gohgraph.data.record_files import label_names, load_records, read_records


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_tsv_and_jsonl_pairs_read_the_same_records(tmp_path):
    tsv = write(tmp_path / "pairs.tsv", "hello\tbonjour\n\n  cat \tchat\n")
    jsonl = write(tmp_path / "pairs.jsonl", json.dumps({"source": "hello", "target": "bonjour"}) + "\n\n"
                  + json.dumps({"target": "chat", "source": "  cat ", "note": "extra keys are ignored"}) + "\n")
    expected = [("hello", "bonjour"), ("  cat ", "chat")]  # texts are kept as written; blank lines skipped
    assert read_records(tsv, "pairs") == expected == read_records(jsonl, "pairs")


def test_labelled_records_are_text_then_label(tmp_path):
    tsv = write(tmp_path / "a.tsv", "pos\tgreat film\nneg\tdull\n")
    jsonl = write(tmp_path / "a.jsonl", '{"text": "great film", "label": "pos"}\n{"text": "dull", "label": 0}\n')
    assert read_records(tsv, "labelled") == [("great film", "pos"), ("dull", "neg")]
    assert read_records(jsonl, "labelled") == [("great film", "pos"), ("dull", "0")]  # an int label is its text


@pytest.mark.parametrize("name, text, message", [
    ("p.tsv", "a\tb\nno tab here\n", r"p.tsv:2: expected 'source<TAB>target', found no tab"),
    ("p.tsv", "a\tb\n\na\tb\tc\n", r"p.tsv:3: expected 'source<TAB>target', found 2 tabs"),
    ("p.tsv", "a\t \n", r"p.tsv:1: 'target' is empty"),
    ("p.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"\n', r"p.jsonl:2: not valid JSON"),
    ("p.jsonl", '{"source": "a", "tgt": "b"}\n', r"p.jsonl:1: expected a JSON object with keys \['source', 'target'\]"),
    ("p.jsonl", '["a", "b"]\n', r"p.jsonl:1: expected a JSON object"),
    ("p.jsonl", '{"source": 3, "target": "b"}\n', r"p.jsonl:1: 'source' must be a string, got int"),
    ("p.csv", "a,b\n", r"p.csv: pairs files must end in .tsv or .jsonl"),
    ("p.tsv", "\n \n", r"p.tsv: no records"),
])
def test_malformed_pair_files_name_file_and_line(tmp_path, name, text, message):
    path = write(tmp_path / name, text)
    with pytest.raises(DataError, match=message) as info:
        read_records(path, "pairs")
    assert "\n" not in str(info.value)


def test_labelled_errors_and_bounds(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"l.jsonl:1: 'label' must be a string or an integer, got float"):
        read_records(write(tmp_path / "l.jsonl", '{"text": "x", "label": 1.5}\n'), "labelled")
    with pytest.raises(DataError, match=r"l.tsv:1: expected 'label<TAB>text'"):
        read_records(write(tmp_path / "l.tsv", "just text\n"), "labelled")
    raw = tmp_path / "bad.tsv"
    raw.write_bytes(b"a\tb\nc\t\xff\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: not UTF-8 text"):
        read_records(raw, "pairs")
    monkeypatch.setattr(record_files, "MAX_TEXT_CHARS", 5)
    with pytest.raises(DataError, match=r"long.tsv:2: 'text' has 6 characters, over the limit of 5"):
        read_records(write(tmp_path / "long.tsv", "a\tshort\nb\tlonger\n"), "labelled")
    monkeypatch.setattr(record_files, "MAX_RECORD_FILE_BYTES", 10)
    with pytest.raises(DataError, match=r"big.tsv: 12 bytes exceeds the 10-byte limit"):
        read_records(write(tmp_path / "big.tsv", "aaaaa\tbbbbb\n"), "pairs")


def test_one_file_splits_its_last_tenth_for_validation(tmp_path):
    path = write(tmp_path / "p.tsv", "".join(f"s{i}\tt{i}\n" for i in range(20)))
    train, val, files = load_records(str(path), "pairs")
    assert files == [path]
    assert train == [(f"s{i}", f"t{i}") for i in range(18)] and val == [("s18", "t18"), ("s19", "t19")]


def test_a_directory_splits_by_file(tmp_path):
    for i in range(40):
        write(tmp_path / f"part{i:02d}.tsv", f"s{i}\tt{i}\n")
    train, val, _ = load_records(str(tmp_path), "pairs")
    assert len(train) + len(val) == 40 and val  # 40 files: some hash into the 5% validation side
    assert not set(train) & set(val)
    again_train, again_val, _ = load_records(str(tmp_path), "pairs")
    assert (again_train, again_val) == (train, val)


def test_label_names_and_labelled_classification_data(tmp_path):
    path = write(tmp_path / "l.tsv", "".join(f"{'pos' if i % 2 else 'neg'}\ttext {i}\n" for i in range(20)))
    data = labelled_file_data(str(path), seq_len=8, cls_id=256, pad_id=258,
                              encode=lambda text: list(text.encode("utf-8")))
    assert data.labels == ["neg", "pos"]
    assert data.train_y.tolist() == [i % 2 for i in range(18)] and data.val_y.tolist() == [0, 1]
    # "text 0" -> [cls] + 6 bytes + 1 pad; "text 10" is 7 bytes: cut to seq_len - 1 = 7 after [cls]
    assert data.train_x[0].tolist() == [256, *b"text 0", 258] and data.train_mask[0].tolist() == [1] * 7 + [0]
    assert data.train_x[10].tolist() == [256, *b"text 10"] and data.train_mask[10].tolist() == [1] * 8
    assert data.val_x.shape == (2, 8) and data.val_x.dtype == torch.long
    with pytest.raises(DataError, match=r"validation labels \['c'\] never occur"):
        label_names([("x", "a"), ("y", "b")], [("z", "c")], "somewhere")
    with pytest.raises(DataError, match="1 distinct labels; classification needs 2"):
        label_names([("x", "a")], [("y", "a")], "somewhere")
