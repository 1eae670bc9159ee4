"""Training data: the default corpus, user text and a token cache.

The default corpus needs no download (docs/getting-started.md): the ``.py`` files of the running
interpreter's standard library (site-packages skipped), capped at a few MB, byte-level tokens.
Files are split into train and validation by a hash of their relative path, so the split is the
same on every machine with the same Python. Tokens are cached as ``uint16``/``uint32`` files
next to a JSON manifest (lengths, checksums, sources); a stale or damaged cache is rebuilt, and a
second run memory-maps the cache and starts at once.

Users pass ``data=PATH``: a text file, a directory of text files, or a glob. Optional BPE
(``tokenizer="bpe"`` or ``"bpe:<vocab>"``) trains a Hugging Face ``tokenizers`` byte-level BPE
on the training files offline; its ``tokenizer.json`` is kept in the cache and saved with a run.
Tokenizers live in :mod:`gohgraph.data.tokenizers`, batches in :mod:`gohgraph.data.batches`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..storage import atomic_write, atomic_write_text
from .errors import DataError, quoted
from .tokenizers import (
    TOKENIZER_FILE,
    BPETokenizer,
    ByteTokenizer,
    parse_tokenizer,
    read_tokenizer_file,
    save_tokenizer,
)

TRAINED_OR_GIVEN = ("bpe", "file")  # tokenizers kept as tokenizer.json in the cache

CACHE_ENV = "GOHGRAPH_CACHE"
CACHE_FORMAT = 1
DEFAULT_CORPUS_BYTES = 4_000_000  # enough for small models, a second to tokenize
VAL_PERCENT = 5
MIN_CORPUS_BYTES = 256
MAX_LISTED_PROBLEMS = 10  # bad files named in one error message


# ---------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Tokenized train/validation text; ``train``/``val`` are 1-D token ids memory-mapped from the cache."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str
    tokenizer: object
    cache_path: Optional[Path] = None

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def save_tokenizer(self, directory: Path) -> Optional[Path]:
        """Write ``tokenizer.json`` into ``directory`` when the tokenizer is not plain bytes."""
        return save_tokenizer(self.tokenizer, directory)


def load_corpus(data: Optional[str] = None, cache_dir: Optional[Path] = None,
                tokenizer: str = "byte", max_bytes: Optional[int] = None) -> Corpus:
    """Load (from cache) or build the corpus ``data`` names; ``None`` is the standard library.

    ``data``: a text file, a directory (every non-hidden file below it), or a glob pattern.
    ``cache_dir``: default ``$GOHGRAPH_CACHE`` or ``~/.cache/gohgraph``.
    ``max_bytes``: cap on the raw text (default: 4 MB for the standard library, none for user data).
    Raises :class:`DataError` (a ``ValueError``) or ``FileNotFoundError`` naming the bad file.
    """
    kind, vocab_size = parse_tokenizer(tokenizer)
    if data is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _stdlib_files(root, DEFAULT_CORPUS_BYTES if max_bytes is None else max_bytes)
        source, strict = f"Python {sysconfig.get_python_version()} standard library ({root})", False
    else:
        root, files = _user_files(data)
        source, strict = f"{data}", True
        if max_bytes is not None:
            files = _cap(files, max_bytes)
    cache_dir = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gohgraph")
    # a given tokenizer file is keyed by its content, so editing it rebuilds the cache
    key = _cache_key(root, files, tokenizer if kind != "file" else
                     "file:" + hashlib.sha256(Path(tokenizer[len("file:"):]).read_bytes()).hexdigest())
    cache = cache_dir / f"corpus-{key}"
    manifest = _read_valid_manifest(cache)
    if manifest is None:
        given = read_tokenizer_file(Path(tokenizer[len("file:"):])) if kind == "file" else None
        manifest = _build_cache(cache, root, files, kind, vocab_size, strict, source, given)
    tok = BPETokenizer.from_json((cache / TOKENIZER_FILE).read_text(encoding="utf-8")) \
        if kind in TRAINED_OR_GIVEN else ByteTokenizer()
    dtype = np.dtype(manifest["dtype"])
    return Corpus(train=_memmap(cache / "train.bin", dtype, manifest["train_tokens"]),
                  val=_memmap(cache / "val.bin", dtype, manifest["val_tokens"]),
                  vocab_size=manifest["vocab_size"], source=source, tokenizer=tok, cache_path=cache)


def _stdlib_files(root: Path, max_bytes: int) -> List[Path]:
    """Standard-library ``.py`` files in a fixed pseudo-random order (hash of the path), capped."""
    found = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in ("site-packages", "dist-packages", "__pycache__")
                            and not d.startswith("."))
        found += [Path(directory) / n for n in names if n.endswith(".py")]
    found.sort(key=lambda p: _path_hash(p.relative_to(root).as_posix()))
    return _cap(found, max_bytes)


def _cap(files: List[Path], max_bytes: int) -> List[Path]:
    kept, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        kept.append(path)
        total += path.stat().st_size
    return kept


def _user_files(data: str) -> Tuple[Path, List[Path]]:
    path = Path(data).expanduser()
    if any(ch in data for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"data={quoted(data)}: the glob matches no files")
        return Path(os.path.commonpath([str(f.parent) for f in files])), files
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"data={quoted(data)}: the directory holds no files")
        return path, files
    raise FileNotFoundError(f"data={quoted(data)}: no such file or directory")


def _path_hash(relative: str) -> int:
    return int.from_bytes(hashlib.sha1(relative.encode("utf-8")).digest()[:8], "big")


def _cache_key(root: Path, files: List[Path], tokenizer: str) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{tokenizer}|{root}".encode())
    for path in files:
        stat = path.stat()
        digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------- cache
def _read_valid_manifest(cache: Path) -> Optional[dict]:
    """The cache's manifest if every token file has the recorded size and checksum, else ``None``."""
    try:
        manifest = json.loads((cache / "manifest.json").read_text(encoding="utf-8"))
        if manifest.get("format") != CACHE_FORMAT:
            return None
        for split in ("train", "val"):
            blob = (cache / f"{split}.bin").read_bytes()
            expected = manifest[f"{split}_tokens"] * np.dtype(manifest["dtype"]).itemsize
            if len(blob) != expected or hashlib.sha256(blob).hexdigest() != manifest[f"{split}_sha256"]:
                return None
        if manifest["tokenizer"] in TRAINED_OR_GIVEN and not (cache / TOKENIZER_FILE).is_file():
            return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_cache(cache: Path, root: Path, files: List[Path], kind: str, vocab_size: int,
                 strict: bool, source: str, given: Optional[BPETokenizer] = None) -> dict:
    train_texts, val_texts = _read_split(root, files, strict)
    if kind in TRAINED_OR_GIVEN:
        tok = given if kind == "file" else BPETokenizer.train(train_texts, vocab_size)
        atomic_write_text(cache / TOKENIZER_FILE, tok.to_json())
    else:
        tok = ByteTokenizer()
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32)
    manifest = {"format": CACHE_FORMAT, "source": source, "tokenizer": kind,
                "vocab_size": tok.vocab_size, "dtype": dtype.name,
                "train_files": len(train_texts), "val_files": len(val_texts)}
    for split, texts in (("train", train_texts), ("val", val_texts)):
        ids = np.asarray([i for text in texts for i in tok.encode(text)], dtype=dtype) if kind in TRAINED_OR_GIVEN \
            else np.frombuffer("".join(texts).encode("utf-8"), dtype=np.uint8).astype(dtype)
        blob = ids.tobytes()
        atomic_write(cache / f"{split}.bin", lambda tmp, blob=blob: Path(tmp).write_bytes(blob))
        manifest[f"{split}_tokens"] = int(ids.size)
        manifest[f"{split}_sha256"] = hashlib.sha256(blob).hexdigest()
    atomic_write_text(cache / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def _read_split(root: Path, files: List[Path], strict: bool) -> Tuple[List[str], List[str]]:
    """Texts of the train and validation files; one file, or an empty side, splits 90/10 by position."""
    train, val, total, problems = [], [], 0, []
    for path in files:
        raw = path.read_bytes()
        if strict and not raw.strip():
            problems.append(f"{path} is empty")
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            if strict:  # every bad file is listed at once, not one per run
                problems.append(f"{path} is not UTF-8 text (byte {err.start}: {raw[err.start:err.start + 1]!r})")
            continue  # the standard library holds a few deliberately mis-encoded test files
        total += len(raw)
        relative = path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)
        (val if _path_hash(relative) % 100 < VAL_PERCENT else train).append(text + "\n")
    if problems:
        shown = "; ".join(problems[:MAX_LISTED_PROBLEMS])
        more = f"; and {len(problems) - MAX_LISTED_PROBLEMS} more" if len(problems) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(problems)} of {len(files)} data files cannot be used: {shown}{more}; "
                        "convert them or leave them out")
    if total < MIN_CORPUS_BYTES:
        names = ", ".join(str(p) for p in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DataError(f"{names}: only {total} bytes of text; need at least {MIN_CORPUS_BYTES}")
    if not train or not val:
        joined = "".join(train + val)
        cut = int(len(joined) * (100 - 2 * VAL_PERCENT) / 100)
        train, val = [joined[:cut]], [joined[cut:]]
    return train, val


def _memmap(path: Path, dtype: np.dtype, length: int) -> np.ndarray:
    if length == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(length,))
