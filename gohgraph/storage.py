"""Files on disk: atomic writes, safetensors and JSON reads, and the model checkpoint format.

A model checkpoint is ``config.json`` + ``model.safetensors``, written atomically and loaded
strictly. Nothing here unpickles: tensors come from safetensors and everything else from JSON, so
loading a checkpoint cannot run code. Every failure to load is a :class:`CheckpointError` naming
the file and what is wrong with it. This module sits below the models: :func:`load_model`
receives the class to build instead of importing it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from safetensors.torch import load_file, save_file

from .config import LEGACY_FIELD_VALUES, MIN_EXPERT_HIDDEN, GoHConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAFETENSORS_PREFIX_BYTES = 8  # a little-endian u64: the length of the JSON header that follows


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


# ---------------------------------------------------------------------- atomic writes
def atomic_write(path: Union[str, Path], write) -> Path:
    """Call ``write(tmp_path)`` on a temp file beside ``path``, fsync it, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: Union[str, Path], text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: Union[str, Path], value: Any) -> Path:
    """``value`` as indented JSON at ``path`` (parents created), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def atomic_save_tensors(path: Union[str, Path], tensors: Dict[str, torch.Tensor],
                        metadata: Optional[Dict[str, str]] = None) -> Path:
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


# ---------------------------------------------------------------------- reading
def read_json(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON (corrupt or truncated): {err}") from None


def read_tensors(path: Union[str, Path], map_location: str = "cpu") -> Dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        return load_file(str(path), device=map_location)
    except Exception as err:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated): {err}") from None


def safetensors_header(path: Union[str, Path]) -> Dict[str, Any]:
    """The tensor table of a safetensors file (``{name: {"dtype", "shape", "data_offsets"}}``), read
    without loading a tensor, after checking that the file holds every byte the table points to.

    Raises :class:`CheckpointError` naming the file: too short for a header, a header that is not
    JSON, or tensor data cut off (the file was truncated, e.g. by an interrupted download).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(SAFETENSORS_PREFIX_BYTES)
        if len(prefix) < SAFETENSORS_PREFIX_BYTES:
            raise CheckpointError(f"{path} is {size} bytes, too short for a safetensors header (truncated?)")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > size - SAFETENSORS_PREFIX_BYTES:
            raise CheckpointError(f"{path}: its safetensors header says {header_bytes:,} bytes but the file holds "
                                  f"{size:,} (truncated, or not a safetensors file)")
        try:
            table = json.loads(handle.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{path} has no readable safetensors header (corrupt, or not a safetensors file)") \
                from None
    if not isinstance(table, dict):
        raise CheckpointError(f"{path} has no readable safetensors header (corrupt, or not a safetensors file)")
    table.pop("__metadata__", None)
    try:
        data_bytes = max((int(entry["data_offsets"][1]) for entry in table.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path}: its safetensors header has a tensor without data_offsets (corrupt)") from None
    needed = SAFETENSORS_PREFIX_BYTES + header_bytes + data_bytes
    if size < needed:
        raise CheckpointError(f"{path} is truncated: its header lists {len(table)} tensors ending at byte {needed:,} "
                              f"but the file has {size:,} bytes")
    return table


def read_config(directory: Union[str, Path]) -> GoHConfig:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        state = "is a file" if Path(directory).exists() else "does not exist"
        raise CheckpointError(f"checkpoint directory {directory} {state}; expected the directory holding "
                              f"{CONFIG_NAME} and {WEIGHTS_NAME}")
    values = read_json(path)
    if isinstance(values, dict):  # a config.json from before a field existed keeps its old behaviour
        values = {**LEGACY_FIELD_VALUES, **values}
    try:
        return GoHConfig.from_dict(values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} does not hold a valid GoHConfig: {err}") from None


# ---------------------------------------------------------------------- model
def save_model(model: torch.nn.Module, directory: Union[str, Path],
               state: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory``; returns the directory.

    ``state`` replaces ``model.state_dict()`` (e.g. with packed ternary weights,
    :mod:`gohgraph.models.packed`)."""
    directory = Path(directory)
    atomic_save_tensors(directory / WEIGHTS_NAME, model.state_dict() if state is None else state,
                        metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, model.config.to_json() + "\n")
    return directory


# restore_state(model, tensors read from the file) -> the state_dict to load strictly
StateRestorer = Callable[[torch.nn.Module, Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]


def load_model(directory: Union[str, Path], model_class: type, map_location: str = "cpu",
               restore_state: Optional[StateRestorer] = None):
    """Build ``model_class(config)`` from ``config.json`` and load ``model.safetensors`` into it, strictly.

    ``restore_state`` turns the file's tensors into the model's ``state_dict`` first (e.g. unpacks
    ternary weights); the model family passes it, since this module sits below the models."""
    cfg = read_config(directory)
    state = read_tensors(Path(directory) / WEIGHTS_NAME, map_location)
    cfg = pin_legacy_expert_width(cfg, state)
    model = model_class(cfg)
    if restore_state is not None:
        state = restore_state(model, state)
    load_state_strict(model, state, Path(directory) / WEIGHTS_NAME)
    return model.to(map_location)


# ---------------------------------------------------------------------- checkpoints from before 2026-12
# The layout move (2026-12) nested each attention's routing modules under ``head_routing``.
LEGACY_KEY_RENAMES: List[Tuple[re.Pattern, str]] = [
    (re.compile(r"^(.*\.attn\.)(router|token_router|gate)\."), r"\1head_routing.\2."),
    (re.compile(r"^(.*\.attn\.)flow_scale$"), r"\1head_routing.flow_scale"),
]
# Before it, a default expert width (expert_hidden=None) was also divided by n_subtokens.
LEGACY_EXPERT_WEIGHT = re.compile(r"^blocks\.\d+\.ffn\.experts\.w_out$")


def upgrade_legacy_names(names: List[str]) -> List[str]:
    """Tensor (or parameter) names of a pre-2026-12 checkpoint, renamed to today's modules."""
    upgraded = []
    for name in names:
        for pattern, replacement in LEGACY_KEY_RENAMES:
            name = pattern.sub(replacement, name)
        upgraded.append(name)
    return upgraded


def pin_legacy_expert_width(cfg: GoHConfig, state: Dict[str, torch.Tensor]) -> GoHConfig:
    """``cfg`` with ``expert_hidden`` set to the width the weights have, for a checkpoint written
    before the default width stopped dividing by ``n_subtokens`` (only that case is changed)."""
    if cfg.expert_hidden is not None or cfg.ffn in ("dense", "moe"):
        return cfg
    widths = {tensor.shape[1] for name, tensor in state.items() if LEGACY_EXPERT_WEIGHT.match(name)}
    legacy = max(MIN_EXPERT_HIDDEN, cfg.hidden_dim // (cfg.top_k_experts * cfg.n_subtokens))
    if widths == {legacy} and legacy != cfg.expert_hidden_dim:
        return cfg.replace(expert_hidden=legacy)
    return cfg


def load_state_strict(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: Path) -> None:
    """``load_state_dict`` with every missing, unexpected or mis-shaped tensor listed by name.

    Names of checkpoints written before the 2026-12 layout move are upgraded first.
    """
    state = dict(zip(upgrade_legacy_names(list(state)), state.values()))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mis_shaped = [f"{name}: checkpoint {list(state[name].shape)} vs model {list(expected[name].shape)}"
                  for name in sorted(set(state) & set(expected)) if state[name].shape != expected[name].shape]
    if missing or unexpected or mis_shaped:
        problems = []
        if missing:
            problems.append(f"missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if mis_shaped:
            problems.append("shape mismatches " + "; ".join(mis_shaped[:8]))
        raise CheckpointError(f"{source} does not match the model: " + ", ".join(problems))
    model.load_state_dict(state, strict=True)
