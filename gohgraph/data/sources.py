"""Several corpora at once: named sources with sampling weights and a validation split each.

A *source* is ``NAME=PATH[:WEIGHT]`` (the ``--data`` flag, repeatable): a text file, a directory or
a glob, loaded exactly like a single corpus (:func:`~gohgraph.data.corpus.load_corpus`: its own
cache, its own train/validation split by file). A :class:`MixedCorpus` draws every training
window from source ``s`` with probability

.. math::  p_s = w_s / \\sum_t w_t,

independently per window, then a uniformly random window inside that source's training tokens,
so a batch mixes sources in proportion to the weights whatever their sizes (small sources are
repeated, large ones sub-sampled: the usual data-mixture semantics). The draws of one micro-step
come from a generator seeded with ``(seed, step, micro_step)`` alone, as in
:func:`~gohgraph.data.batches.train_batch`, so resuming needs no sampler state and ``N`` ranks
together see the batch one process would.

Validation stays per source (:meth:`MixedCorpus.val_by_source`): the trainer reports one loss per
source and, as ``val_loss``, their mean weighted by the tokens each one scored (the loss over the
union of the evaluated windows).

The default run is a plain :class:`~gohgraph.data.corpus.Corpus` (one source, the standard
library); :func:`load_training_data` builds whichever of the two a run's data settings name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .batches import train_batch
from .corpus import Corpus, load_corpus
from .errors import DataError, quoted
from .tokenizers import parse_tokenizer

SOURCE_NAME = re.compile(r"[A-Za-z0-9_-]{1,40}")  # safe as a CSV column / TensorBoard tag suffix
PATH_SEPARATORS = ("/", "\\")
WEIGHT_TEXT = re.compile(r"[0-9.eE+-]+")
SPEC_FORM = "NAME=PATH[:WEIGHT] (e.g. code=src/:3 or prose=books/*.txt)"


@dataclass(frozen=True)
class SourceSpec:
    """One ``--data NAME=PATH[:WEIGHT]``: a name, a file/directory/glob and a sampling weight."""

    name: str
    path: str
    weight: float = 1.0

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "weight": self.weight}


def is_source_spec(text: str) -> bool:
    """Whether ``text`` names a source (``NAME=...``) rather than a bare path: a ``=`` with no path
    separator before it (a bad name, such as ``my:src=``, is then refused by name, not looked up as a
    file).

    An existing path that happens to contain ``=`` stays a path, so old commands keep working.
    """
    name, sep, _ = text.partition("=")
    return bool(sep and name) and not any(mark in name for mark in PATH_SEPARATORS) \
        and not Path(text).expanduser().exists()


def parse_source_spec(text: str) -> SourceSpec:
    """``"code=src/:3"`` -> ``SourceSpec("code", "src/", 3.0)``; the weight defaults to 1.

    The weight is the text after the last ``:`` when that text looks like a number; it must be a
    finite number > 0. Errors name the flag value and what is allowed.
    """
    if not isinstance(text, str):
        raise ValueError(f"--data {quoted(text)} must be a string of the form {SPEC_FORM}")
    name, sep, rest = text.partition("=")
    if not sep or not SOURCE_NAME.fullmatch(name):
        raise ValueError(f"--data {quoted(text)}: the source name {quoted(name)} must be 1-40 letters, digits, "
                         "'_' or '-', "
                         f"given as {SPEC_FORM}")
    path, weight = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    # ":abc" ends a weight, not the path, unless the path holds it (C:\\data, dir/a:b.txt)
    meant_as_weight = colon and head and tail and not any(mark in tail for mark in PATH_SEPARATORS) \
        and not Path(rest).expanduser().exists()
    if meant_as_weight and not WEIGHT_TEXT.fullmatch(tail):
        raise ValueError(f"--data {quoted(text)}: weight {quoted(tail)} is not a number; expected {SPEC_FORM}")
    if colon and WEIGHT_TEXT.fullmatch(tail):
        try:
            weight = float(tail)
        except ValueError:
            raise ValueError(f"--data {quoted(text)}: weight {quoted(tail)} is not a number") from None
        path = head
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"--data {quoted(text)}: weight {tail} must be a finite number > 0")
    if not path:
        raise ValueError(f"--data {quoted(text)}: no path after '{name}='; expected {SPEC_FORM}")
    return SourceSpec(name, path, weight)


def parse_data_flags(values: Union[None, str, Path, Sequence[str]]) -> Dict[str, object]:
    """The ``--data`` values of a command as data settings: ``{"data": PATH}`` for one bare path
    (today's single corpus), ``{"data": None, "sources": [...]}`` for named sources, ``{}`` for none."""
    if not values:
        return {}
    if isinstance(values, (str, Path)):  # one value given directly (the Python API) rather than a flag list
        values = [str(values)]
    named = [is_source_spec(value) for value in values]
    if not any(named):
        if len(values) > 1:
            raise ValueError(f"--data was given {len(values)} times without names; name each source as "
                             f"{SPEC_FORM}")
        return {"data": values[0]}
    if not all(named):
        bare = values[named.index(False)]
        raise ValueError(f"--data {quoted(bare)} has no name while other --data values do; name every source as "
                         f"{SPEC_FORM}")
    specs = [parse_source_spec(value) for value in values]
    names = [spec.name for spec in specs]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"--data names {duplicated} more than once; each source needs its own name")
    return {"data": None, "sources": [spec.to_dict() for spec in specs]}


@dataclass
class Source:
    """A loaded source: its name, sampling weight and :class:`~gohgraph.data.corpus.Corpus`."""

    name: str
    weight: float
    corpus: Corpus
    path: str = ""


class MixedCorpus:
    """Several named :class:`~gohgraph.data.corpus.Corpus` sources sampled by weight.

    Has what the trainer and the commands read from a corpus (``vocab_size``, ``tokenizer``,
    ``source``, ``encode``/``decode``, ``save_tokenizer``, ``train_batch``, ``val_by_source``);
    ``train`` / ``val`` are the sources' splits concatenated (for counting and whole-split scoring).
    """

    def __init__(self, sources: Sequence[Source]) -> None:
        if not sources:
            raise ValueError("MixedCorpus needs at least one source")
        self.sources: List[Source] = list(sources)
        weights = np.array([source.weight for source in self.sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()  # [sources]
        vocabs = {source.corpus.vocab_size for source in self.sources}
        if len(vocabs) != 1:
            raise DataError(f"the sources were tokenized into different vocabularies {sorted(vocabs)}; "
                            "use one tokenizer for all of them")
        self.vocab_size = vocabs.pop()
        self.tokenizer = self.sources[0].corpus.tokenizer
        self.source = "; ".join(f"{s.name} (weight {s.weight:g}, p={p:.3f}): {s.corpus.source}"
                                for s, p in zip(self.sources, self.probabilities))
        self._train: Optional[np.ndarray] = None
        self._val: Optional[np.ndarray] = None

    @property
    def names(self) -> List[str]:
        return [source.name for source in self.sources]

    @property
    def train(self) -> np.ndarray:
        if self._train is None:
            self._train = np.concatenate([np.asarray(s.corpus.train) for s in self.sources])
        return self._train

    @property
    def val(self) -> np.ndarray:
        if self._val is None:
            self._val = np.concatenate([np.asarray(s.corpus.val) for s in self.sources])
        return self._val

    def val_by_source(self) -> Dict[str, np.ndarray]:
        """``{name: 1-D validation token ids}`` in the order the sources were given."""
        return {source.name: source.corpus.val for source in self.sources}

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids)

    def save_tokenizer(self, directory: Path) -> Optional[Path]:
        return self.sources[0].corpus.save_tokenizer(directory)

    def train_batch(self, batch_size: int, seq_len: int, seed: int, step: int, micro_step: int = 0,
                    rank: int = 0, world_size: int = 1) -> torch.LongTensor:
        """This rank's share ``[batch_size / world_size, seq_len + 1]`` of windows, each from a
        source drawn with probability :attr:`probabilities` (see the module docstring)."""
        return mixed_train_batch([s.corpus.train for s in self.sources], self.probabilities, batch_size, seq_len,
                                 seed, step, micro_step, rank, world_size, names=self.names)


def mixed_train_batch(trains: Sequence[np.ndarray], probabilities: np.ndarray, batch_size: int, seq_len: int,
                      seed: int, step: int, micro_step: int = 0, rank: int = 0, world_size: int = 1,
                      names: Optional[Sequence[str]] = None) -> torch.LongTensor:
    """Windows ``[batch_size / world_size, seq_len + 1]``: window ``b`` comes from source
    ``s_b ~ Categorical(probabilities)`` at a uniform start in that source's ``trains[s_b]``."""
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} must be divisible by world_size={world_size}")
    names = list(names) if names is not None else [str(i) for i in range(len(trains))]
    for name, tokens in zip(names, trains):
        if len(tokens) < seq_len + 2:
            raise DataError(f"source {name!r} has {len(tokens)} training tokens; seq_len={seq_len} needs at "
                            f"least {seq_len + 2}")
    rng = np.random.default_rng([seed, step, micro_step])
    which = rng.choice(len(trains), size=batch_size, p=probabilities)  # every rank draws the whole batch
    starts = [int(rng.integers(0, len(trains[s]) - seq_len - 1, endpoint=True)) for s in which]
    per_rank = batch_size // world_size
    mine = range(rank * per_rank, (rank + 1) * per_rank)
    windows = np.stack([np.asarray(trains[which[b]][starts[b]:starts[b] + seq_len + 1], dtype=np.int64)
                        for b in mine])
    return torch.from_numpy(windows)


def load_sources(specs: Sequence[Union[SourceSpec, dict]], cache_dir: Optional[Path] = None,
                 tokenizer: str = "byte") -> MixedCorpus:
    """Load every source (each through :func:`~gohgraph.data.corpus.load_corpus`, one tokenizer).

    A BPE trained on the data (``bpe``) would be trained on one source and read the others with
    another source's merges, so several sources need ``byte`` or a given ``file:`` tokenizer.
    """
    specs = [spec if isinstance(spec, SourceSpec) else SourceSpec(**spec) for spec in specs]
    kind, _ = parse_tokenizer(tokenizer)
    if kind == "bpe" and len(specs) > 1:
        raise ValueError(f"tokenizer={tokenizer!r} trains a BPE on one corpus; with {len(specs)} --data sources "
                         "use tokenizer 'byte' or a tokenizer file shared by all (--tokenizer file:tokenizer.json)")
    sources = []
    for spec in specs:
        try:
            corpus = load_corpus(spec.path, cache_dir, tokenizer)
        except (DataError, FileNotFoundError) as err:
            raise type(err)(f"source {spec.name!r}: {err}") from None
        sources.append(Source(spec.name, spec.weight, corpus, spec.path))
    return MixedCorpus(sources)


def load_training_data(settings: dict, cache_dir: Optional[Path] = None) -> Union[Corpus, MixedCorpus]:
    """The corpus a run's data settings (``data.json``: ``data``, ``tokenizer``, optional ``sources``) name."""
    tokenizer = settings.get("tokenizer") or "byte"
    if settings.get("sources"):
        return load_sources(settings["sources"], cache_dir, tokenizer)
    return load_corpus(settings.get("data"), cache_dir, tokenizer)


def corpus_train_batch(corpus: Union[Corpus, MixedCorpus], batch_size: int, seq_len: int, seed: int, step: int,
                       micro_step: int = 0, rank: int = 0, world_size: int = 1) -> torch.LongTensor:
    """The training batch of either kind of corpus (a single corpus exactly as before)."""
    if isinstance(corpus, MixedCorpus):
        return corpus.train_batch(batch_size, seq_len, seed, step, micro_step, rank, world_size)
    return train_batch(corpus.train, batch_size, seq_len, seed, step, micro_step, rank, world_size)


def validation_sets(corpus: Union[Corpus, MixedCorpus]) -> Dict[str, np.ndarray]:
    """``{source: validation tokens}`` of a mixed corpus; ``{}`` for a single corpus."""
    return corpus.val_by_source() if isinstance(corpus, MixedCorpus) else {}
