"""Training checkpoints that survive faults: model, optimizer, step, data position and RNG.

Layout of one checkpoint, ``run_dir/checkpoints/step_000100/`` (the names are
:mod:`gohgraph.training.run_dir`'s, which owns every file of a run directory)::

    config.json, model.safetensors      the save_pretrained format (loadable by from_pretrained)
    optimizer.safetensors               every optimizer state tensor, flattened by name
    optimizer.json                      param-group hyper-parameters and non-tensor state
    rng.safetensors                     torch CPU (and CUDA) generator states (uint8 tensors)
    training_state.json                 step, tokens seen, validation history, numpy/python RNG,
                                        the TrainConfig; written last, so it marks completeness

Nothing is pickled: tensors go to safetensors and everything else to JSON. A checkpoint is built
in a temporary directory and renamed into place, then ``checkpoints/latest`` (a one-line text
file naming it) is replaced atomically, then old checkpoints beyond the last ``keep_last`` are
removed. A crash at any point leaves ``latest`` naming a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from ..config import GoHConfig
from ..storage import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_save_tensors,
    atomic_write_text,
    load_state_strict,
    read_config,
    read_json,
    read_tensors,
    upgrade_legacy_names,
)
from .run_dir import OPTIMIZER_STATE, OPTIMIZER_TENSORS, RNG_TENSORS, TRAINING_STATE, RunDir

# the run directory's names under their former names here (scripts import them)
CHECKPOINTS_DIR, FINAL_DIR, LATEST_POINTER, STATE_NAME = RunDir.CHECKPOINTS, RunDir.FINAL, RunDir.LATEST, TRAINING_STATE


# ---------------------------------------------------------------------- save
def save_checkpoint(run_dir: Path, step: int, model_config: GoHConfig, model_state: Dict[str, torch.Tensor],
                    optimizer_state: dict, training_state: dict, keep_last: int = 3) -> Path:
    """Write ``run_dir/checkpoints/step_{step:06d}/`` atomically, point ``latest`` at it, prune.

    ``training_state`` is any JSON-serialisable dict (step, tokens, config, history); the RNG
    states of this process are added to it here.
    """
    run = RunDir(run_dir)
    root = run.checkpoints_dir
    root.mkdir(parents=True, exist_ok=True)
    final = run.checkpoint_dir(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        atomic_save_tensors(staging / WEIGHTS_NAME, model_state, metadata={"format": "pt"})
        atomic_write_text(staging / CONFIG_NAME, model_config.to_json() + "\n")
        tensors, meta = optimizer_state_to_flat(optimizer_state)
        atomic_save_tensors(staging / OPTIMIZER_TENSORS, tensors)
        atomic_write_text(staging / OPTIMIZER_STATE, json.dumps(meta, indent=1) + "\n")
        rng_tensors, rng_json = capture_rng_state()
        atomic_save_tensors(staging / RNG_TENSORS, rng_tensors)
        state = {**training_state, "step": step, "rng": rng_json}
        atomic_write_text(staging / TRAINING_STATE, json.dumps(state, indent=1) + "\n")
        if final.exists():  # the same step saved twice (e.g. interrupted right after a periodic save)
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    atomic_write_text(run.latest_pointer, final.name + "\n")
    _prune(run, keep_last, keep=final)
    return final


def _prune(run: RunDir, keep_last: int, keep: Path) -> None:
    steps = run.step_dirs()
    for old in steps[:max(0, len(steps) - keep_last)]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def remove_stale_staging(run_dir: Path) -> List[Path]:
    """:meth:`RunDir.remove_stale_staging` of ``run_dir``."""
    return RunDir(run_dir).remove_stale_staging()


# ---------------------------------------------------------------------- find and load
def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The checkpoint ``run_dir/checkpoints/latest`` names; ``None`` if the run has none yet
    (:meth:`RunDir.latest_checkpoint`)."""
    return RunDir(run_dir).latest_checkpoint()


def resolve_checkpoint(path: Path) -> Path:
    """A model directory from a run directory, a ``checkpoints`` folder, or a checkpoint/model
    directory itself.

    In a run directory the newest complete model wins: ``final/`` (written when a run finishes) or
    ``checkpoints/latest`` (written every ``save_every`` steps and on interrupt), whichever was
    completed last (:meth:`RunDir.newest_model`); so a resumed run that was interrupted is read at
    its latest step, not at the older ``final/`` of the run it continued.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is a file; expected a run or checkpoint directory")
    if (path / CONFIG_NAME).is_file():
        return path
    found = RunDir(path).newest_model()
    if found is None:  # the checkpoints folder of a run
        found = RunDir(path.parent).latest_checkpoint()
    if found is None:
        raise CheckpointError(f"{path} holds no checkpoint (no config.json, checkpoints/latest or final/)")
    return found


def load_checkpoint(directory: Path, map_location: str = "cpu"
                    ) -> Tuple[GoHConfig, Dict[str, torch.Tensor], dict, dict]:
    """Read one checkpoint: ``(model_config, model_state, optimizer_state, training_state)``.

    Every damaged or missing file raises :class:`CheckpointError` naming it. RNG states are not
    restored here (see :func:`restore_rng_state`), so a caller can read a checkpoint to inspect it.
    """
    directory = Path(directory)
    training_state = read_json(directory / TRAINING_STATE)
    missing = [key for key in ("step", "tokens_seen", "val_history", "rng") if key not in training_state]
    if missing:
        raise CheckpointError(f"{directory / TRAINING_STATE} lacks {missing} (not a training checkpoint, or damaged)")
    config = read_config(directory)
    model_state = read_tensors(directory / WEIGHTS_NAME, map_location)
    optimizer_state = optimizer_state_from_flat(read_tensors(directory / OPTIMIZER_TENSORS, map_location),
                                                read_json(directory / OPTIMIZER_STATE),
                                                directory / OPTIMIZER_STATE)
    training_state["rng_tensors"] = read_tensors(directory / RNG_TENSORS)
    return config, model_state, optimizer_state, training_state


def check_same_config(saved: GoHConfig, given: GoHConfig, checkpoint: Path) -> None:
    """Refuse to resume ``checkpoint`` (saved with ``saved``) as a model of another config."""
    differing = {k: (v, getattr(given, k)) for k, v in saved.to_dict().items() if getattr(given, k) != v}
    if differing:
        listed = ", ".join(f"{k}: checkpoint {a!r} vs given {b!r}" for k, (a, b) in sorted(differing.items()))
        raise CheckpointError(f"cannot resume from {checkpoint}: the model config differs ({listed})")


def check_optimizer_parameters(saved_names: Optional[List[str]], names: List[str], checkpoint: Path) -> None:
    """Refuse optimizer state saved for other parameters (``saved_names``: the checkpoint's
    ``optimizer_param_names``, ``None`` in checkpoints that predate them), naming the first difference."""
    if saved_names is None:
        return
    saved_names = upgrade_legacy_names(saved_names)
    if saved_names != names:
        first = next((a, b) for a, b in zip(saved_names + [None], names + [None]) if a != b)
        raise CheckpointError(f"{checkpoint}: the optimizer state is for other parameters (first difference: "
                              f"checkpoint {first[0]!r} vs model {first[1]!r})")


# tensors of GoHEncoder's classification head: what a fine-tuning run may add or replace
_HEAD_PREFIXES = ("classifier.", "pooler.")


def initialise_from(model: torch.nn.Module, directory: Path) -> List[str]:
    """Load the ``save_pretrained`` model at ``directory`` into ``model`` (a run's ``init_from``);
    returns the names of the classification-head tensors that start fresh instead (an encoder
    fine-tuned as a classifier: the model had no head, or one for other labels). Every other tensor
    must be there with its shape; routing settings such as ``top_k_heads`` may differ."""
    read_config(directory)  # a clear error for a missing or foreign directory
    source = read_tensors(directory / WEIGHTS_NAME)
    own = model.state_dict()
    fresh = [name for name in own if name.startswith(_HEAD_PREFIXES)
             and (name not in source or source[name].shape != own[name].shape)]
    kept = {name: tensor for name, tensor in source.items()
            if not (name.startswith(_HEAD_PREFIXES) and (name not in own or name in fresh))}
    load_state_strict(model, {**kept, **{name: own[name] for name in fresh}}, directory / WEIGHTS_NAME)
    return fresh


# ---------------------------------------------------------------------- optimizer state
def optimizer_state_to_flat(state_dict: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors named ``state/<key>/<field>``, JSON for the rest).

    Keys may be parameter indices (plain optimizers) or parameter names (FSDP full state dicts);
    the JSON records which, so the round-trip gives back the same dict.
    """
    tensors, entries = {}, []
    for key, fields in state_dict["state"].items():
        scalars = {}
        for field_name, value in fields.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state/{key}/{field_name}"] = value
            else:
                scalars[field_name] = value
        tensor_fields = sorted(f for f, v in fields.items() if isinstance(v, torch.Tensor))
        entries.append({"key": key, "tensor_fields": tensor_fields, "scalars": scalars})
    return tensors, {"state": entries, "param_groups": state_dict["param_groups"]}


def optimizer_state_from_flat(tensors: Dict[str, torch.Tensor], meta: dict, source: Path) -> dict:
    state = {}
    try:
        for entry in meta["state"]:
            key = entry["key"]
            fields = dict(entry["scalars"])
            for field_name in entry["tensor_fields"]:
                fields[field_name] = tensors[f"state/{key}/{field_name}"]
            state[key] = fields
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else dict(g) for g in meta["param_groups"]]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{source} does not match its {OPTIMIZER_TENSORS} (missing {err})") from None
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------------- RNG
def capture_rng_state() -> Tuple[Dict[str, torch.Tensor], dict]:
    """Torch generator states as uint8 tensors; numpy's and Python's as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(internal), gauss]}


def restore_rng_state(tensors: Dict[str, torch.Tensor], rng_json: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8).cpu())
    cuda_states: List[torch.Tensor] = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda_states])
    kind, keys, pos, has_gauss, cached = rng_json["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = rng_json["python"]
    random.setstate((version, tuple(internal), gauss))
