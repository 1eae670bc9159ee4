"""Upcycle a pretrained dense Hugging Face model (Llama, GPT-2; BERT; T5) into a graph-routed GoH
model: a GoHTransformer, a GoHEncoder (BERT) or a GoHSeq2Seq (T5).

MoH (Jin et al. 2024) continue-tuned a dense LLaMA3-8B into a mixture-of-heads model. This module
does the same with graph routing, in two steps:

1. :func:`convert_hf_model` copies every pretrained tensor into a :class:`GoHTransformer` (for
   BERT a :class:`~gohgraph.GoHEncoder`) whose heads are the dense model's heads (q/k/v/o per
   head, GQA and RoPE theta kept), whose FFN is the dense MLP (or ``n_experts`` copies of it for
   ``ffn="moe"``: sparse upcycling), and whose routers are fresh. It returns the model with
   ``dense_blend = 1``: every head on with gate 1 and the inter-head flow scaled by 0, so at step 0
   it computes exactly the dense model.
2. Continued training anneals ``dense_blend`` from 1 to 0 with
   :func:`gohgraph.training.schedules.dense_to_sparse_schedule`
   (``model.set_dense_blend(dense_to_sparse_schedule(step, warmup_steps))`` before each step), so
   the model moves gradually from dense attention to the configured top-k routing.

Weights are copied into a float32 model whatever the checkpoint's dtype (continued training wants
float32 master weights; cast afterwards for inference). Only local directories are read:
``from_pretrained(directory, local_files_only=True)``; nothing is downloaded. ``transformers`` is
the optional ``hf`` extra (``pip install 'gohgraph[hf]'``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch
from torch import nn

from ..config import GoHConfig
from ..models.families import family_of
from ..models.routed import RoutedModel
from ..storage import CheckpointError, safetensors_header
from .bert import BERT_CLASSIFIER, BERT_MLM
from .deepseek_v3 import DEEPSEEK_V3
from .gpt2 import GPT2
from .llama import LLAMA, MISTRAL
from .mixtral import MIXTRAL
from .qwen2_moe import QWEN2_MOE
from .source import ConversionError, SourceFamily
from .t5 import T5

# model_type in config.json -> the family whose weights we know how to map
SOURCE_FAMILIES: Dict[str, SourceFamily] = {"llama": LLAMA, "mistral": MISTRAL, "gpt2": GPT2, "mixtral": MIXTRAL,
                                             "qwen2_moe": QWEN2_MOE, "deepseek_v3": DEEPSEEK_V3, "t5": T5,
                                             "bert": BERT_MLM}
# further head classes of a model_type above, whose family is the default: model_type -> families
HEAD_VARIANTS: Dict[str, Tuple[SourceFamily, ...]] = {"bert": (BERT_CLASSIFIER,)}
# model_type -> the Hugging Face classes it may be saved as, the default first
SUPPORTED_ARCHITECTURES: Dict[str, Tuple[str, ...]] = {
    model_type: tuple(f.hf_class for f in (family, *HEAD_VARIANTS.get(model_type, ())))
    for model_type, family in SOURCE_FAMILIES.items()}
# Hugging Face class -> its family
FAMILIES_BY_CLASS: Dict[str, SourceFamily] = {
    f.hf_class: f for model_type, family in SOURCE_FAMILIES.items() for f in (family, *HEAD_VARIANTS.get(model_type, ()))}
# safetensors only, one file or shards listed by an index: nothing here loads a pickle
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# GoHConfig fields the pretrained weights fix; everything else (routing, experts, dropout) may be overridden
SOURCE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "rope_theta", "norm",
                 "norm_eps", "ffn_hidden", "tie_embeddings", "position_embedding", "linear_bias", "mlp",
                 "rope_scaling", "rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                 "rope_original_max_seq_len", "sliding_window", "attention", "kv_lora_rank", "q_lora_rank",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_dense_layers")
UPCYCLE_FFNS = ("dense", "moe")
# tensors of the converted model that do not come from the source: routers, gates, flow scales
ROUTING_TENSOR_MARKERS = (".router.", ".gate.", ".flow_scale")


# ---------------------------------------------------------------------- public entry points
def convert_hf_model(hf_model_or_dir: Union[str, Path, nn.Module], **overrides: Any) -> RoutedModel:
    """Build a GoH model computing exactly the ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` /
    ``MixtralForCausalLM`` / ``Qwen2MoeForCausalLM`` given (sparse sources keep their own experts
    and routers), the :class:`~gohgraph.GoHEncoder` computing a ``BertForMaskedLM`` /
    ``BertForSequenceClassification``, or the :class:`~gohgraph.GoHSeq2Seq` computing a
    ``T5ForConditionalGeneration``.

    Args:
        hf_model_or_dir: a loaded Hugging Face model, or a local checkpoint directory.
        overrides: GoHConfig fields for routing and training, e.g. ``router="graph",
            n_shared_heads=2, top_k_heads=4, ffn="moe", n_experts=4, dropout=0.1``. Default
            router: ``"graph"``. Fields in :data:`SOURCE_FIELDS` come from the source and cannot
            be overridden; ``max_seq_len`` may change (with learned positions only downward).
    Returns:
        a :class:`GoHTransformer` (or the class the source's ``model_type`` field names: GoHEncoder
        for BERT, GoHSeq2Seq for T5) in train mode with ``dense_blend = 1`` in every routed layer.
    """
    hf_model = load_hf_model(hf_model_or_dir) if isinstance(hf_model_or_dir, (str, Path)) else hf_model_or_dir
    family = FAMILIES_BY_CLASS[_check_model_class(hf_model)]
    source = family.source_config(hf_model.config)
    if family.model_fields is not None:
        source.update(family.model_fields(hf_model))
    cfg = _target_config(source, overrides)
    state = family.weights(hf_model, cfg)
    if cfg.ffn == "moe" and source.get("ffn") != "moe":  # a dense source's MLP is copied into experts
        state = _upcycle_experts(state, cfg)
    model = family_of(cfg).model_class(cfg)
    _load_converted_state(model, state)
    model.set_dense_blend(1.0)
    return model


def read_hf_config(directory: Union[str, Path]) -> dict:
    """The ``config.json`` of a supported local checkpoint, after checking the directory holds weights.

    Raises :class:`ConversionError` naming the directory, the file, or the architecture found.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ConversionError(f"Hugging Face checkpoint directory {directory} does not exist")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{directory} has no config.json (found: {_listing(directory)}); "
                              "expected a Hugging Face checkpoint saved with save_pretrained()")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConversionError(f"{config_path} is not valid JSON: {err}") from None
    model_type = values.get("model_type")
    architectures = values.get("architectures") or []
    if model_type not in SUPPORTED_ARCHITECTURES or any(a not in SUPPORTED_ARCHITECTURES[model_type]
                                                         for a in architectures):
        raise ConversionError(
            f"{config_path}: model_type={model_type!r}, architectures={architectures} is not supported; "
            f"supported: {_supported_text()}")
    if not any((directory / name).is_file() for name in WEIGHT_FILES):
        pickled = [name for name in PICKLE_WEIGHT_FILES if (directory / name).is_file()]
        if pickled:
            raise ConversionError(f"{directory} holds only pickled weights ({pickled[0]}), which gohgraph never loads; "
                                  "save the model with safetensors first (save_pretrained(..., safe_serialization=True))")
        raise ConversionError(f"{directory} has no weights: expected one of {list(WEIGHT_FILES)}, "
                              f"found {_listing(directory)}")
    return values


def load_hf_model(directory: Union[str, Path]) -> nn.Module:
    """Load a local checkpoint of a supported class (no download), in eval mode, from
    ``model.safetensors`` or from the shards a ``model.safetensors.index.json`` lists. The class is
    the first of config.json's ``architectures`` (the model_type's default class without one).

    Missing tensors (e.g. a bare ``LlamaModel`` checkpoint without ``lm_head``) raise
    :class:`ConversionError` instead of being silently initialised at random.
    """
    values = read_hf_config(directory)
    class_name = (values.get("architectures") or SUPPORTED_ARCHITECTURES[values["model_type"]])[0]
    try:
        import transformers
    except ImportError:
        raise ImportError("converting Hugging Face checkpoints needs transformers: "
                          "pip install 'gohgraph[hf]'") from None
    check_source_files(directory, values, FAMILIES_BY_CLASS[class_name])  # before transformers reads a byte
    model_class = getattr(transformers, class_name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report table; the mismatches are our one line below
    try:  # mismatched sizes are loaded (and re-initialised) so that the loading info can name them
        hf_model, info = model_class.from_pretrained(str(directory), local_files_only=True, use_safetensors=True,
                                                     output_loading_info=True, ignore_mismatched_sizes=True)
    except (RuntimeError, ValueError, OSError) as err:  # what the checks above cannot foresee
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise ConversionError(f"{directory}: transformers cannot load {class_name} from it: {first[:300]}") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if info.get("mismatched_keys"):
        name, saved, expected = sorted(info["mismatched_keys"])[0]
        raise ConversionError(f"{directory}: config.json does not fit the weights: {name} is {list(saved)} in the "
                              f"safetensors but {list(expected)} by config.json "
                              f"({len(info['mismatched_keys'])} tensor(s) differ)")
    if info.get("missing_keys"):
        raise ConversionError(f"{directory}: the checkpoint lacks tensors {sorted(info['missing_keys'])[:8]} "
                              f"of {model_class.__name__}")
    return hf_model.eval()


def check_source_files(directory: Union[str, Path], values: dict, family: SourceFamily) -> None:
    """Check a local checkpoint before it is loaded: ``config.json`` states the sizes ``family``
    needs (:attr:`SourceFamily.config_keys`), and every safetensors file, one or the shards its
    index lists, is present, whole, and holds the tensors the index says. Raises
    :class:`ConversionError` naming the file and the key or tensor.
    """
    directory = Path(directory)
    missing = [names for names in family.config_keys if not any(name in values for name in names.split("|"))]
    if missing:
        raise ConversionError(f"{directory / 'config.json'} lacks {', '.join(repr(k) for k in missing)}, which "
                              f"{family.hf_class} needs (transformers would fill in its defaults, e.g. a 4096-wide "
                              "model, that do not fit the weights)")
    single = directory / WEIGHT_FILES[0]
    if single.is_file():
        _header(single)
        return
    index_path = directory / WEIGHT_FILES[1]
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = {name: str(shard) for name, shard in weight_map.items()}
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise ConversionError(f"{index_path} is not a safetensors index (JSON with a weight_map of tensor -> shard)") \
            from None
    for shard in sorted(set(shards.values())):
        if not (directory / shard).is_file():
            raise ConversionError(f"{index_path} lists shard {shard}, which is missing from {directory}")
        listed = [name for name, file in shards.items() if file == shard]
        absent = sorted(set(listed) - set(_header(directory / shard)))
        if absent:
            raise ConversionError(f"{directory / shard} lacks tensor(s) {absent[:4]} that {index_path.name} puts there")


def _header(path: Path) -> dict:
    try:
        return safetensors_header(path)
    except CheckpointError as err:
        raise ConversionError(str(err)) from None


# ---------------------------------------------------------------------- configuration
def _check_model_class(hf_model: nn.Module) -> str:
    """The class name of a supported ``hf_model``, or :class:`ConversionError` naming what was found."""
    found = type(hf_model).__name__
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if found not in SUPPORTED_ARCHITECTURES.get(model_type, ()):
        raise ConversionError(f"cannot convert {found} (model_type={model_type!r}); supported: {_supported_text()}")
    return found


def _target_config(source: Dict[str, Any], overrides: Dict[str, Any]) -> GoHConfig:
    # every field the source sets is fixed, but the context length and the init scale of new weights
    source_fields = set(SOURCE_FIELDS) | (set(source) - {"max_seq_len", "init_std"})
    fixed = sorted(set(overrides) & source_fields)
    if fixed:
        raise ConversionError(f"cannot override {fixed}: they come from the source model "
                              f"(fixed fields: {sorted(source_fields)})")
    if source.get("ffn") == "moe":  # a sparse source keeps its own experts
        return GoHConfig.from_dict({"router": "graph", **source, **overrides})
    if overrides.get("ffn", "dense") not in UPCYCLE_FFNS:
        raise ConversionError(f"ffn={overrides['ffn']!r} cannot be upcycled from a dense MLP; "
                              f"supported: {list(UPCYCLE_FFNS)}")
    max_seq_len = overrides.get("max_seq_len", source["max_seq_len"])
    if source["position_embedding"] == "learned" and max_seq_len > source["max_seq_len"]:
        raise ConversionError(f"max_seq_len={max_seq_len} exceeds the source's {source['max_seq_len']} "
                              "learned positions")
    values = {"router": "graph", "ffn": "dense", **source, **overrides}
    if values["ffn"] != "dense" and values.get("model_type", "decoder") != "decoder":
        raise ConversionError(f"ffn={values['ffn']!r}: upcycling into experts is implemented for decoder-only "
                              f"sources; a {values['model_type']} source converts with ffn='dense'")
    if values["ffn"] == "moe":  # every expert is a full copy of the dense MLP (sparse upcycling)
        if source["mlp"] != "swiglu" or source["linear_bias"]:
            raise ConversionError("ffn='moe' upcycles a bias-free SwiGLU MLP (Llama); this source has "
                                  f"mlp={source['mlp']!r}, linear_bias={source['linear_bias']}, which the "
                                  "bias-free experts of gohgraph.moe cannot reproduce; use ffn='dense'")
        values.update(expert_hidden=source["ffn_hidden"], expert_activation="swiglu")
    return GoHConfig.from_dict(values)


# ---------------------------------------------------------------------- weights
def _upcycle_experts(state: Dict[str, torch.Tensor], cfg: GoHConfig) -> Dict[str, torch.Tensor]:
    """Replace each dense SwiGLU MLP by ``n_experts`` copies of it (sparse upcycling, Komatsuzaki et al.).

    The routed experts' weights are renormalised to sum to 1 per token, so routed copies alone
    compute the dense MLP; shared experts (always on, weight 1) would add more copies, so every
    copy's output projection is divided by ``n_shared_experts + 1`` to keep the sum exact.
    Layout (:class:`gohgraph.moe.experts.GroupedExperts`): ``w_in [E, d_model, 2 * hidden]`` (gate
    columns, then up) and ``w_out [E, hidden, d_model]``.
    """
    state = dict(state)
    copies = cfg.n_shared_experts + 1
    for i in range(cfg.n_layers):
        prefix = f"blocks.{i}.ffn."
        gate_up = state.pop(prefix + "mlp.gate_up.weight")  # [2 * hidden, d_model]
        down = state.pop(prefix + "mlp.down.weight") / copies  # [d_model, hidden]
        state[prefix + "experts.w_in"] = gate_up.t().expand(cfg.n_routed_experts, -1, -1)
        state[prefix + "experts.w_out"] = down.t().expand(cfg.n_routed_experts, -1, -1)
        if cfg.n_shared_experts:
            # the shared experts run as one MLP whose hidden layer concatenates theirs: [gates | ups]
            gate, up = gate_up.chunk(2, dim=0)
            shared = cfg.n_shared_experts
            state[prefix + "shared_experts.w_in.weight"] = torch.cat([gate] * shared + [up] * shared)
            state[prefix + "shared_experts.w_out.weight"] = torch.cat([down] * shared, dim=1)
    return state


def _load_converted_state(model: nn.Module, state: Dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; every model tensor but the fresh routing ones must be covered."""
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    uncovered = sorted(name for name in set(expected) - set(state)
                       if not any(marker in name for marker in ROUTING_TENSOR_MARKERS))
    mis_shaped = [f"{name}: source {list(state[name].shape)} vs model {list(expected[name].shape)}"
                  for name in sorted(set(state) & set(expected)) if state[name].shape != expected[name].shape]
    if unexpected or uncovered or mis_shaped:
        raise ConversionError(f"converted weights do not fit the GoH model: unexpected {unexpected[:8]}, "
                              f"not converted {uncovered[:8]}, shape mismatches {mis_shaped[:8]}")
    with torch.no_grad():
        for name, tensor in state.items():
            expected[name].copy_(tensor.detach())


def _supported_text() -> str:
    return ", ".join(f"{model_type} ({', '.join(classes)})" for model_type, classes in SUPPORTED_ARCHITECTURES.items())


def _listing(directory: Path) -> list:
    return sorted(path.name for path in directory.iterdir())[:20]
