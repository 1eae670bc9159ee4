"""Tokenizers: UTF-8 bytes (the default, nothing to train) and an optional byte-level BPE.

Both have ``encode(text) -> ids``, ``decode(ids) -> text``, ``vocab_size`` and ``to_json()``
(``None`` for bytes); a run saves a BPE's ``tokenizer.json`` beside its checkpoints
(:func:`save_tokenizer`). The LM corpus trains and caches its BPE with its tokens
(:func:`gohgraph.data.corpus.load_corpus`); tasks whose texts are held in memory (classify,
seq2seq) get theirs from :func:`text_tokenizer`.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..storage import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocabulary 256, nothing to train or save."""

    name, vocab_size = "byte", 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def to_json(self) -> Optional[str]:
        return None


class BPETokenizer:
    """A Hugging Face ``tokenizers`` byte-level BPE (optional dependency)."""

    name = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> "BPETokenizer":
        tokenizers = _import_tokenizers()
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_json(cls, text: str) -> "BPETokenizer":
        return cls(_import_tokenizers().Tokenizer.from_str(text))

    def encode(self, text: str) -> List[int]:
        return self._tokenizer.encode(text).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def to_json(self) -> Optional[str]:
        return self._tokenizer.to_str()


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ValueError("tokenizer='bpe' needs the Hugging Face 'tokenizers' package "
                         "(pip install tokenizers); or use tokenizer='byte'") from None
    return tokenizers


def load_tokenizer(directory: Path):
    """The tokenizer saved with a run or checkpoint (``tokenizer.json``), else bytes."""
    path = Path(directory) / TOKENIZER_FILE
    return BPETokenizer.from_json(path.read_text(encoding="utf-8")) if path.is_file() else ByteTokenizer()


def save_tokenizer(tokenizer, directory: Path) -> Optional[Path]:
    """Write ``tokenizer``'s ``tokenizer.json`` into ``directory``; nothing for plain bytes (``None``)."""
    text = tokenizer.to_json()
    if text is None:
        return None
    return atomic_write_text(Path(directory) / TOKENIZER_FILE, text)


def text_tokenizer(spec: str, training_texts: Sequence[str]):
    """The tokenizer ``spec`` names (:func:`parse_tokenizer`) for texts held in memory: bytes; a BPE
    trained on ``training_texts`` (the training split alone, so no validation text shapes a merge;
    training is deterministic, so a resumed run gets the same merges); or a given ``tokenizer.json``."""
    if spec.startswith("file:"):
        return read_tokenizer_file(Path(spec.partition(":")[2]))
    kind, vocab_size = parse_tokenizer(spec)
    return ByteTokenizer() if kind == "byte" else BPETokenizer.train(training_texts, vocab_size)


def parse_tokenizer(spec: str) -> Tuple[str, int]:
    """``(kind, vocab size)`` of a tokenizer spec: ``byte``; ``bpe`` / ``bpe:<vocab>`` (trained on the
    training files); ``file:<path to tokenizer.json>`` (a given Hugging Face ``tokenizers`` file,
    e.g. the one a converted model brought along)."""
    if spec == "byte":
        return "byte", 256
    if spec == "bpe" or spec.startswith("bpe:"):
        size = spec.partition(":")[2] or "4096"
        if not size.isdigit() or not 256 < int(size) <= 1 << 20:
            raise ValueError(f"tokenizer={spec!r}: the BPE vocabulary must be an integer in (256, 2^20]")
        return "bpe", int(size)
    if spec.startswith("file:"):
        return "file", read_tokenizer_file(Path(spec.partition(":")[2])).vocab_size
    raise ValueError(f"tokenizer={spec!r} is not one of 'byte', 'bpe', 'bpe:<vocab size>', 'file:<tokenizer.json>'")


def read_tokenizer_file(path: Path) -> "BPETokenizer":
    """A ``tokenizer.json`` (Hugging Face ``tokenizers`` format), with one-line errors naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        return BPETokenizer.from_json(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, Exception) as err:  # tokenizers raises its own exception type
        if isinstance(err, ValueError) and "needs the Hugging Face" in str(err):
            raise
        raise ValueError(f"{path} is not a readable tokenizer.json: {err}") from None


def byte_encode(text: str) -> List[int]:
    """UTF-8 bytes of ``text`` as token ids (the default tokenizer's ``encode``)."""
    return ByteTokenizer().encode(text)


def byte_decode(ids: Sequence[int]) -> str:
    """Token ids as UTF-8 bytes, undecodable bytes replaced (the default tokenizer's ``decode``)."""
    return ByteTokenizer().decode(ids)
