"""Load any saved gohgraph model: ``config.json`` says which family it is."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

from torch import nn

from ..storage import CONFIG_NAME, CheckpointError, load_model, read_json
from .decoder import GoHTransformer
from .encoder import GoHEncoder
from .packed import unpack_ternary_state
from .seq2seq import GoHSeq2Seq

# config.json's "model_type" (GoHConfig.model_type) -> the class it describes; configs without
# the key are decoders
MODEL_TYPES: Dict[str, type] = {"decoder": GoHTransformer, "encoder": GoHEncoder, "seq2seq": GoHSeq2Seq}
DEFAULT_MODEL_TYPE = "decoder"


def from_pretrained(directory: Union[str, Path], map_location: str = "cpu") -> nn.Module:
    """The model a ``save_pretrained`` directory holds, of the class its config names."""
    values = read_json(Path(directory) / CONFIG_NAME)
    model_type = values.get("model_type", DEFAULT_MODEL_TYPE) if isinstance(values, dict) else None
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME}: model_type={model_type!r} is not one of "
                              f"{sorted(MODEL_TYPES)}")
    return load_model(directory, MODEL_TYPES[model_type], map_location=map_location,
                      restore_state=unpack_ternary_state)
