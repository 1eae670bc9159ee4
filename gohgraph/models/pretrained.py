"""Load any saved gohgraph model: ``config.json`` says which family it is."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from torch import nn

from ..storage import CONFIG_NAME, CheckpointError, load_model, read_json
from .families import DEFAULT_MODEL_TYPE, FAMILIES
from .packed import unpack_ternary_state


def from_pretrained(directory: Union[str, Path], map_location: str = "cpu") -> nn.Module:
    """The model a ``save_pretrained`` directory holds, of the class its config names (a config
    without ``model_type`` is a decoder's: :data:`~gohgraph.models.families.DEFAULT_MODEL_TYPE`)."""
    values = read_json(Path(directory) / CONFIG_NAME)
    model_type = values.get("model_type", DEFAULT_MODEL_TYPE) if isinstance(values, dict) else None
    if model_type not in FAMILIES:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: model_type={model_type!r} is not one of "
                              f"{sorted(FAMILIES)}")
    return load_model(directory, FAMILIES[model_type].model_class, map_location=map_location,
                      restore_state=unpack_ternary_state)
