"""What several commands share: reading run directories, validation batches, ``--set`` overrides."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from ..config import did_you_mean
from ..data.batches import eval_batches
from ..data.corpus import load_corpus
from ..data.sources import load_sources, parse_data_flags
from ..data.tokenizers import TOKENIZER_FILE, ByteTokenizer, load_tokenizer
from ..models.pretrained import from_pretrained
from ..storage import read_config
from ..training.checkpoint import resolve_checkpoint
from ..training.run_dir import RunDir
from ..training.run_dir import find_run_file as _find_run_file

# flag name -> TrainConfig field (None = not given, keep the base value)
TRAIN_FLAGS = {"max_steps": "max_steps", "batch_size": "batch_size", "seq_len": "seq_len", "lr": "lr",
               "grad_accum": "grad_accum_steps", "warmup_steps": "warmup_steps", "eval_every": "eval_every",
               "save_every": "save_every", "seed": "seed", "device": "device", "dtype": "dtype",
               "dense_anneal_steps": "dense_anneal_steps", "expert_parallel": "expert_parallel",
               "tensor_parallel": "tensor_parallel"}
SEARCH_LEVELS = 2  # runs/<name>/checkpoints/step_N -> runs/<name>


def parse_overrides(pairs: List[str], fields: Iterable[str], protected: Iterable[str] = (),
                    why_protected: str = "this command sets {name} itself") -> Dict[str, str]:
    """``["inter_head_flow=false", "head_graph=ring"]`` -> ``{"inter_head_flow": "false", "head_graph": "ring"}``.

    Values stay text: the config's typed parser (:func:`gohgraph.config.parse_typed`) reads them,
    exactly as it reads a Python argument or a JSON value, so ``--set`` means what the constructor
    means. ``fields`` are the names allowed; ``protected`` ones are refused with ``why_protected``
    (formatted with the field's ``name``).
    """
    allowed, protected = set(fields), set(protected)
    overrides: Dict[str, str] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--set {pair!r} must look like FIELD=VALUE")
        if name not in allowed:
            raise ValueError(f"--set {pair!r}: {name!r} is not a field{did_you_mean(name, allowed)}")
        if name in protected:
            raise ValueError(f"--set {pair!r}: " + why_protected.format(name=name))
        if name in overrides:  # the last one would win without a word
            raise ValueError(f"--set {name} is given twice ({overrides[name]!r}, then {text.strip()!r}); "
                             "give each field once")
        overrides[name] = text.strip()
    return overrides


def note_missing_tensorboard(train_config) -> None:
    """One line when ``TrainConfig.tensorboard`` is on but TensorBoard is not installed (the run
    logs to ``metrics.csv`` only), instead of skipping the TensorBoard logs without a word."""
    import importlib.util

    if train_config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        print("note: tensorboard=true but the tensorboard package is not installed: metrics go to metrics.csv only "
              "(pip install 'gohgraph[tensorboard]', or --set tensorboard=false to silence this)", file=sys.stderr)


def load_model(checkpoint: Path, device: str = "cpu", families: Optional[Iterable[str]] = None,
               purpose: str = "") -> Tuple[torch.nn.Module, Path]:
    """The model a run directory or checkpoint holds, on ``device``, and the checkpoint used.

    Says on stderr which checkpoint it used (stdout stays the command's output): in a run
    directory the newest complete one, ``final/`` or ``checkpoints/latest``. With ``families``
    (``model_type`` values), a model of another family is refused from its config, before its
    weights are read, in one line saying that it cannot ``purpose``.
    """
    torch_device = check_device(device)
    directory = resolve_checkpoint(Path(checkpoint))
    print(f"checkpoint: {directory}", file=sys.stderr)
    if families is not None:
        model_type = read_config(directory).model_type
        if model_type not in families:
            raise ValueError(f"{directory} holds a model_type={model_type!r} model, which cannot {purpose}; "
                             f"only {' and '.join(families)} models can")
    return from_pretrained(directory, map_location=str(torch_device)), directory


def check_device(device: str) -> torch.device:
    """``--device`` as a ``torch.device``, or a one-line error when this machine cannot run on it."""
    try:
        torch_device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if torch_device.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
            raise ValueError(f"--device {device}: {build} (torch {torch.__version__}); use --device cpu")
        if torch_device.index is not None and torch_device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif torch_device.type != "cpu":
        raise ValueError(f"--device {device!r}: only cpu and cuda are supported")
    return torch_device


def prepare_output(path: Path, overwrite: bool, is_directory: bool, replaces: Iterable[str] = ()) -> Path:
    """Check that ``path`` may be written and create its folder.

    An existing file, or a directory that is not empty, is written into only with ``overwrite``;
    then the files named in ``replaces`` (what the command writes there) are deleted first, so no
    stale one survives, and nothing else in the directory is touched. Errors name the path and say
    how to proceed.
    """
    path = Path(path)
    if path.exists():
        if is_directory and not path.is_dir():
            raise ValueError(f"{path} is a file; the output must be a directory")
        if not is_directory and path.is_dir():
            raise ValueError(f"{path} is a directory; the output must be a file")
        occupied = any(path.iterdir()) if is_directory else True
        if occupied and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another path")
        for name in replaces if is_directory else ():
            if (path / name).is_file():
                (path / name).unlink()
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{parent} is a file, so {path} cannot be created below it")
    (path if is_directory else path.parent).mkdir(parents=True, exist_ok=True)
    return path


def check_utf8(text: Optional[str], flag: str) -> None:
    """A command-line text that is not UTF-8 (bytes Python kept as surrogates) refused, naming ``flag``."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{flag} is not UTF-8 text: character {err.start + 1} of {len(text)} is an undecodable "
                         "byte; pass UTF-8 text") from None


def check_text_tokens(text: str, flag: str, checkpoint: Path, limit: int, why: str) -> List[int]:
    """The ids of ``flag``'s ``text`` in the run's tokenizer (:func:`run_tokenizer`), checked before the
    (slow) statistics: not empty, at most ``limit`` tokens (``why`` says whose limit)."""
    check_utf8(text, flag)
    ids = run_tokenizer(checkpoint).encode(text)
    if not ids:
        raise ValueError(f"{flag} is empty")
    if len(ids) > limit:
        raise ValueError(f"{flag} is {len(ids)} tokens ({len(text)} characters); {why} at most {limit}: shorten it")
    return ids


def run_tokenizer(checkpoint: Path):
    """The tokenizer a command reads a checkpoint's text with: the run's ``tokenizer.json``, else bytes."""
    found = find_run_file(checkpoint, TOKENIZER_FILE)
    return load_tokenizer(found.parent) if found is not None else ByteTokenizer()


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace the output if it already exists")


def run_dir_of(directory: Path) -> Optional[Path]:
    """The run directory a checkpoint lives in (``run/final`` or ``run/checkpoints/step_N``), if any."""
    run = RunDir.of_checkpoint(directory)
    return run.path if run is not None else None


def add_data_arguments(parser: argparse.ArgumentParser, default_batches: int) -> None:
    parser.add_argument("--data", action="append", default=None, metavar="[NAME=]PATH",
                        help="text file, directory or glob (default: the Python standard library corpus); "
                             "repeat as NAME=PATH for several sources (default with --by-source: the run's)")
    parser.add_argument("--batches", type=int, default=default_batches, help="validation batches to run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per sequence (default: min(256, max_seq_len))")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def validation_batches(args: argparse.Namespace, model, checkpoint: Path) -> Tuple[List[torch.Tensor], object]:
    """``--batches`` batches ``[batch, seq]`` of validation tokens and the model's tokenizer.

    Text comes from ``--data`` (default corpus otherwise). If the run saved a ``tokenizer.json``
    (BPE), the validation text is re-encoded with it so ids match the model's vocabulary.
    """
    cfg = model.config
    seq_len = _batch_shape(args, cfg)
    settings = parse_data_flags(args.data)
    if "sources" in settings:  # several named sources, pooled
        by_source, tokenizer = source_validation_batches(args, model, checkpoint)
        return [batch for batches in by_source.values() for batch in batches], tokenizer
    corpus = load_corpus(settings.get("data"))
    tokenizer_dir = find_run_file(checkpoint, TOKENIZER_FILE)
    tokenizer = load_tokenizer(tokenizer_dir.parent) if tokenizer_dir else corpus.tokenizer
    tokens = corpus.val
    if tokenizer_dir is not None:
        needed = args.batches * args.batch_size * seq_len
        text = corpus.decode(corpus.val[:8 * needed].tolist())  # BPE tokens span several bytes
        tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long).numpy()
    if len(tokens) and int(tokens.max()) >= cfg.vocab_size:
        raise ValueError(f"the data's token ids reach {int(tokens.max())} but the checkpoint's vocab_size="
                         f"{cfg.vocab_size}; use the tokenizer the model was trained with")
    return list(eval_batches(tokens, args.batch_size, seq_len, max_batches=args.batches)), tokenizer


def _batch_shape(args: argparse.Namespace, cfg) -> int:
    """Check ``--batches`` / ``--batch-size``; the ``--seq-len`` to use."""
    for name in ("batches", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    seq_len = args.seq_len if args.seq_len is not None else min(256, cfg.max_seq_len)
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise ValueError(f"--seq-len={seq_len} must be in [1, max_seq_len={cfg.max_seq_len}]")
    return seq_len


def run_sources(args: argparse.Namespace, checkpoint: Path) -> Optional[list]:
    """The named sources to analyse: ``--data NAME=PATH`` flags, else the run's own (``data.json``), else ``None``."""
    settings = parse_data_flags(args.data)
    if "sources" in settings:
        return settings["sources"]
    if settings:  # one bare --data path: no sources
        return None
    data_file = find_run_file(checkpoint, RunDir.DATA)
    if data_file is None:
        return None
    import json

    return json.loads(data_file.read_text(encoding="utf-8")).get("sources") or None


def source_validation_batches(args: argparse.Namespace, model, checkpoint: Path) -> Tuple[Dict[str, List[torch.Tensor]], object]:
    """``{source: --batches batches [batch, seq]}`` of each named source's validation split, and the tokenizer.

    Sources come from :func:`run_sources`; the text is tokenized with the run's own
    ``tokenizer.json`` when it has one (bytes otherwise), so ids match the model.
    """
    sources = run_sources(args, checkpoint)
    if not sources:
        raise ValueError("routing by source needs named sources: pass --data NAME=PATH (repeatable), or a run "
                         "trained on several --data NAME=PATH sources")
    seq_len = _batch_shape(args, model.config)
    tokenizer_file = find_run_file(checkpoint, TOKENIZER_FILE)
    mixed = load_sources(sources, tokenizer=f"file:{tokenizer_file}" if tokenizer_file else "byte")
    if mixed.vocab_size > model.config.vocab_size:
        raise ValueError(f"the sources' tokenizer has {mixed.vocab_size} tokens but the checkpoint's vocab_size="
                         f"{model.config.vocab_size}; use the tokenizer the model was trained with")
    batches = {source.name: list(eval_batches(source.corpus.val, args.batch_size, seq_len, max_batches=args.batches))
               for source in mixed.sources}
    return batches, mixed.tokenizer


def find_run_file(checkpoint: str, name: str) -> Optional[Path]:
    """``name`` in the checkpoint directory or up to two parents (``runs/<run>/checkpoints/step_N``)."""
    return _find_run_file(checkpoint, name, SEARCH_LEVELS)
