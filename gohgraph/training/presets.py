"""Named model + training presets (``tiny``, ``small``, ``base``), and configs from files and flags.

Each preset is a pair of keyword dicts, ``(GoHConfig kwargs, TrainConfig kwargs)``. The model is
graph-routed by default (router="graph", two shared heads, top-k routed heads, inter-head flow),
so "train the default model" means training a GoH transformer, not a dense one.

* ``tiny``: about a minute for 50 steps on 2 CPU cores; validation loss on the default corpus
  falls well below ln 256 = 5.55 nats in that time (tests/test_cli_train.py checks it).
* ``small``: minutes per hundred steps on a laptop CPU; the throughput benchmark's model.
* ``base``: a GPU-sized model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Dict, Tuple

from ..config import GoHConfig, did_you_mean
from .config import TrainConfig

PresetPair = Tuple[Dict, Dict]

_GRAPH_ROUTED = dict(router="graph", router_rounds=2, head_graph="complete", inter_head_flow=True)

PRESETS: Dict[str, PresetPair] = {
    "tiny": (
        dict(vocab_size=256, d_model=128, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2,
             router_dim=8, max_seq_len=256, **_GRAPH_ROUTED),
        dict(batch_size=8, seq_len=128, lr=3e-3, warmup_steps=5, max_steps=50,
             eval_every=25, eval_batches=4, save_every=25, aux_warmup_steps=10),
    ),
    "small": (
        dict(vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_shared_heads=2, top_k_heads=4,
             router_dim=16, max_seq_len=512, **_GRAPH_ROUTED),
        dict(batch_size=16, seq_len=256, lr=1.5e-3, warmup_steps=50, max_steps=2000,
             eval_every=200, eval_batches=16, save_every=500, aux_warmup_steps=100),
    ),
    "base": (
        dict(vocab_size=256, d_model=768, n_layers=12, n_heads=12, n_shared_heads=4, top_k_heads=4,
             router_dim=32, max_seq_len=2048, **_GRAPH_ROUTED),
        dict(batch_size=32, seq_len=1024, lr=6e-4, warmup_steps=500, max_steps=20000,
             eval_every=1000, eval_batches=50, save_every=1000, aux_warmup_steps=1000),
    ),
}


def get_preset(name: str) -> PresetPair:
    """A deep copy of the named ``(model kwargs, train kwargs)`` pair."""
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not one of {sorted(PRESETS)}")
    model_kwargs, train_kwargs = PRESETS[name]
    return copy.deepcopy(model_kwargs), copy.deepcopy(train_kwargs)


# ---------------------------------------------------------------------- configs from files and flags
def read_config_file(path: Path) -> dict:
    """A JSON or YAML (``.yaml``/``.yml``, needs pyyaml) mapping.

    Either ``{"model": {...}, "train": {...}}`` or one flat mapping whose keys are
    :class:`~gohgraph.GoHConfig` and :class:`~gohgraph.training.config.TrainConfig` field names (and
    ``preset``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: YAML configs need pyyaml (pip install gohgraph[yaml]); or use JSON") from None
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); YAML files must end in .yaml or .yml") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of config fields, not {type(values).__name__}")
    return values


def split_fields(values: dict, source: str) -> Tuple[Dict, Dict]:
    """Sort a flat or ``{"model", "train"}`` mapping into (GoHConfig kwargs, TrainConfig kwargs)."""
    model_fields = {f.name for f in dataclasses.fields(GoHConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_kwargs, train_kwargs = dict(values.get("model", {})), dict(values.get("train", {}))
    for section, kwargs, known in (("model", model_kwargs, model_fields), ("train", train_kwargs, train_fields)):
        for key in kwargs:
            if key not in known:
                other = "a TrainConfig field" if key in train_fields else "a GoHConfig field"
                hint = f" ({other}: move it)" if key in model_fields | train_fields else did_you_mean(
                    key, model_fields | train_fields)
                raise ValueError(f"{source}: unknown field {key!r} in its {section} section{hint}")
    for key, value in values.items():
        if key in ("model", "train", "preset"):
            continue
        if key in model_fields:
            model_kwargs[key] = value
        elif key in train_fields:
            train_kwargs[key] = value
        else:
            raise ValueError(f"{source}: unknown field {key!r}"
                             f"{did_you_mean(key, model_fields | train_fields | {'model', 'train', 'preset'})} "
                             "(a config holds GoHConfig and TrainConfig fields, flat or in model/train sections)")
    return model_kwargs, train_kwargs
