"""The rows of the comparison: seven configurations of one model shape, resized to one parameter count.

1. :func:`comparison_variants` - dense MHA, MoH, GoH, SMoE, fine-grained SMoE, MH-MoE and GoH-MoE;
   attention variants keep the dense FFN, expert variants keep dense attention, so each row changes
   one thing. On request, each FFN kind also with BitNet b1.58 projections and experts
   (:data:`BITNET_VARIANT_NAMES`, the MH-MoE paper's Table 3 setting), and Mixture-of-Recursions
   rows (:data:`MOR_VARIANT_NAMES`) at matched parameters and at matched depth, and a talking-heads
   row (:data:`TALKING_HEADS`).
2. :func:`match_parameters` - every variant is resized to the dense model's total (or active)
   parameter count, or to its training FLOPs per token (``on="flops"``,
   :func:`count_training_flops`), by one size knob (``ffn_hidden`` for dense FFNs; ``expert_hidden``
   and, where its step is too coarse, ``n_experts`` for expert FFNs), and the relative mismatch is
   recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..analysis.flops import count_flops
from ..config import GoHConfig
from ..models.families import family_of
from ..moe.layer import MoEFeedForward

VARIANT_NAMES = ("dense", "MoH", "GoH", "SMoE", "fine-grained SMoE", "MH-MoE", "GoH-MoE")
# one row per FFN kind with linear="bitnet" (MH-MoE's Table 3: dense, SMoE, fine-grained SMoE and
# MH-MoE, all trained as BitNet); built only when named, so the default table keeps its seven rows
BITNET_OF = ("dense", "SMoE", "fine-grained SMoE", "MH-MoE", "GoH-MoE")
BITNET_SUFFIX = " BitNet"
BITNET_VARIANT_NAMES = tuple(name + BITNET_SUFFIX for name in BITNET_OF)
# Mixture-of-Recursions on dense attention and FFN, built only when named: "MoR <router>" shares the
# dense model's n_layers blocks over MOR_RECURSIONS recursions and is matched to its parameters
# (twice the depth); "(matched depth)" shares n_layers / MOR_RECURSIONS blocks, so its effective
# depth equals dense's, and keeps its own (smaller) size: it is not resized. The MoR paper matches
# FLOPs; gohgraph runs every token in every recursion, so equal depth is the honest equal compute.
MOR_RECURSIONS = 2
MOR_ROUTERS = {"expert-choice": "MoR expert-choice", "token-choice": "MoR token-choice"}
MATCHED_DEPTH = " (matched depth)"
MOR_VARIANT_NAMES = tuple(MOR_ROUTERS.values()) + tuple(name + MATCHED_DEPTH for name in MOR_ROUTERS.values())
KEEPS_ITS_SIZE = frozenset(name + MATCHED_DEPTH for name in MOR_ROUTERS.values())
# talking-heads attention (Shazeer et al. 2020) on dense heads and FFN, built only when named: the dense
# "heads talk, nobody routes" control for GoH's inter-head flow; matched as dense is
TALKING_HEADS = "talking heads"
# SwitchHead (Csordás et al. 2024) on dense heads and FFN, built only when named: per-head value and
# output experts, sigmoid top-k (layers/switch_head.py); matched as the others are
SWITCH_HEAD = "switchhead"
SWITCH_HEAD_EXPERTS, SWITCH_HEAD_TOP_K = 4, 2
# MoSA (Piękos et al. 2025) on dense heads and FFN, built only when named: as many sparse heads as
# dense ones, each keeping k = T / MOSA_SPARSITY tokens (layers/mosa.py); matched as the others are
MOSA = "mosa"
MOSA_SPARSITY = 8
ALL_VARIANT_NAMES = VARIANT_NAMES + BITNET_VARIANT_NAMES + MOR_VARIANT_NAMES + (TALKING_HEADS, SWITCH_HEAD, MOSA)
MATCH_TOLERANCE = 0.02

# Model shape and schedule of the two settings; ``gohgraph bench --quick`` runs the first.
# The graph routers use one round of 8-wide node features: over 6 seeds of the quick setting this
# beat MoH by 0.072 ± 0.058 nats (paired), while 2 rounds of 16 gave 0.033 ± 0.055 (BENCHMARKS.md).
SETTINGS: Dict[str, Tuple[dict, dict]] = {
    "quick": (
        dict(d_model=64, n_layers=2, n_heads=8, n_shared_heads=2, top_k_heads=4, router_dim=8,
             router_rounds=1, n_experts=8, top_k_experts=2, n_subtokens=2, fine_grained=2, max_seq_len=128),
        dict(batch_size=16, seq_len=64, max_steps=150, lr=3e-3, warmup_steps=15, aux_warmup_steps=15,
             eval_every=25, eval_batches=4),
    ),
    "full": (
        dict(d_model=128, n_layers=4, n_heads=8, n_shared_heads=2, top_k_heads=4, router_dim=8,
             router_rounds=1, n_experts=8, top_k_experts=2, n_subtokens=2, fine_grained=2, max_seq_len=256),
        dict(batch_size=16, seq_len=128, max_steps=1000, lr=2e-3, warmup_steps=50, aux_warmup_steps=50,
             eval_every=100, eval_batches=8),
    ),
}


# ---------------------------------------------------------------------- 1. variants
def comparison_variants(d_model: int, n_layers: int, n_heads: int, n_shared_heads: int, top_k_heads: int,
                        router_dim: int, router_rounds: int, n_experts: int, top_k_experts: int,
                        n_subtokens: int, fine_grained: int, max_seq_len: int,
                        names: Optional[Sequence[str]] = None) -> Dict[str, GoHConfig]:
    """The unmatched configurations by name: :data:`VARIANT_NAMES` by default; ``names`` may also
    pick from :data:`BITNET_VARIANT_NAMES` (the same configuration with ``linear="bitnet"``),
    :data:`MOR_VARIANT_NAMES` and :data:`TALKING_HEADS` (dense with ``talking_heads=True``).

    MoH and GoH activate ``n_shared_heads + top_k_heads`` of ``n_heads`` heads per token; GoH routes
    with ``router_rounds`` of message passing over the complete head graph, inter-head flow on.
    Fine-grained SMoE splits every expert into ``fine_grained`` smaller ones and activates that many
    times more (DeepSeekMoE's granularity). MH-MoE and GoH-MoE split tokens into ``n_subtokens`` and
    have that many times more experts (the MH-MoE paper's parity with SMoE in total and active
    parameters).
    """
    base = GoHConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, router_dim=router_dim,
                     router_rounds=router_rounds, max_seq_len=max_seq_len)
    routed_heads = dict(n_shared_heads=n_shared_heads, top_k_heads=top_k_heads)
    experts = dict(n_experts=n_experts, top_k_experts=top_k_experts)
    # MH-MoE's parity (Huang et al. 2024): m sub-tokens of width d/m go to m times as many experts of
    # input width d/m, same top-k and hidden width, so total and active expert parameters both equal
    # SMoE's; the head and merge layers are what the matching then takes out of the expert width.
    sub_token_experts = dict(n_subtokens=n_subtokens, n_experts=n_experts * n_subtokens, top_k_experts=top_k_experts)
    variants = {
        "dense": base,
        "MoH": base.replace(router="linear", **routed_heads),
        "GoH": base.replace(router="graph", head_graph="complete", inter_head_flow=True, **routed_heads),
        "SMoE": base.replace(ffn="moe", **experts),
        "fine-grained SMoE": base.replace(ffn="moe", n_experts=n_experts * fine_grained,
                                          top_k_experts=top_k_experts * fine_grained),
        "MH-MoE": base.replace(ffn="mh-moe", **sub_token_experts),
        # node features at least as wide as the experts they score: with 8-wide features for 16
        # experts the bilinear expert scores are rank-deficient, and the full setting lost 0.05 nats
        "GoH-MoE": base.replace(ffn="graph-moe", router_dim=max(router_dim, sub_token_experts["n_experts"]),
                                **sub_token_experts),
    }
    if names is None:
        return variants
    variants.update({name + BITNET_SUFFIX: variants[name].replace(linear="bitnet") for name in BITNET_OF})
    for router, name in MOR_ROUTERS.items():
        mor = base.replace(recursion="mor", max_recursions=MOR_RECURSIONS, recursion_router=router)
        variants[name] = mor
        if n_layers % MOR_RECURSIONS == 0:
            variants[name + MATCHED_DEPTH] = mor.replace(n_layers=n_layers // MOR_RECURSIONS)
    variants[TALKING_HEADS] = base.replace(talking_heads=True)
    variants[SWITCH_HEAD] = base.replace(n_attention_experts=SWITCH_HEAD_EXPERTS, top_k_attention_experts=SWITCH_HEAD_TOP_K)
    variants[MOSA] = base.replace(n_mosa_heads=n_heads, mosa_sparsity=MOSA_SPARSITY)
    unknown = [name for name in names if name not in variants]
    if unknown:
        raise ValueError(f"variants {unknown} are not among {list(ALL_VARIANT_NAMES)}")
    return {name: variants[name] for name in names}


# ---------------------------------------------------------------------- 2. parameter matching
@dataclass
class MatchedVariant:
    """A variant resized to ``target``, counted as ``matched_on`` says: ``"total"`` or ``"active"``
    parameters (per token), or ``"flops"``, training FLOPs per token (``flops_per_token``, counted
    only then); ``mismatch`` is that count over the target, minus 1."""

    name: str
    config: GoHConfig
    params: int
    target: int
    active_params: int
    heads_active: str  # "6/8"
    experts_active: str  # "2/8", "2x2/8" (sub-tokens x top-k of routed experts), "-" without experts
    matched_on: str = "total"
    flops_per_token: Optional[float] = None

    @property
    def mismatch(self) -> float:
        matched = {"total": self.params, "active": self.active_params, "flops": self.flops_per_token}[self.matched_on]
        return matched / self.target - 1.0


def match_parameters(variants: Dict[str, GoHConfig], reference: str = "dense",
                     tolerance: float = MATCH_TOLERANCE, on: str = "total",
                     seq_len: Optional[int] = None) -> Dict[str, MatchedVariant]:
    """Resize every variant to the size of ``variants[reference]``: its ``"total"`` parameter
    count (the default), its ``"active"`` count per token (expert models then grow in total size,
    the compute-matched setting of the MH-MoE paper), or its training FLOPs per token (``"flops"``,
    counted on ``seq_len``-token sequences by :func:`count_training_flops`; MoSA and SwitchHead's
    published comparisons are at equal compute).

    Raises ``ValueError`` if a variant cannot be brought within ``tolerance`` (relative). Variants
    in :data:`KEEPS_ITS_SIZE` are compared at matched depth instead: not resized, and their
    mismatch is reported as it is.
    """
    if reference not in variants:
        raise ValueError(f"reference={reference!r} is not among the variants {list(variants)}")
    if on not in MATCH_ON:
        raise ValueError(f"on={on!r} is not one of {list(MATCH_ON)}")
    if on == "flops" and (type(seq_len) is not int or seq_len < 1):
        raise ValueError(f"on='flops' needs seq_len, the training sequence length the FLOPs are counted at; "
                         f"got seq_len={seq_len!r}")
    count = MATCH_ON[on] if on != "flops" else (lambda config: count_training_flops(config, seq_len))
    target = count(variants[reference])
    matched = {}
    for name, config in variants.items():
        keep = name == reference or name in KEEPS_ITS_SIZE
        fitted = config if keep else _fit_to_target(config, target, tolerance / 2, count)
        model = family_of(fitted).model_class(fitted)
        variant = MatchedVariant(name, fitted, model.num_parameters(), target, active_parameters(model),
                                 _heads_active(fitted), _experts_active(fitted), on,
                                 count(fitted) if on == "flops" else None)
        if abs(variant.mismatch) > tolerance and not keep:
            what = "training FLOPs per token" if on == "flops" else f"{on} parameters"
            raise ValueError(f"variant {name!r} has {variant.mismatch:+.1%} {what} from the target {target:,.0f}; "
                             f"allowed: within {tolerance:.0%}")
        matched[name] = variant
    return matched


def count_training_flops(config: GoHConfig, seq_len: int, seed: int = 0) -> float:
    """Training FLOPs per token of ``config``: forward and backward of the LM loss plus the routing
    losses (what the trainer differentiates) on one sequence of ``seq_len + 1`` tokens, as the
    comparison's batches are, counted by :func:`~gohgraph.analysis.flops.count_flops` and divided
    by ``seq_len`` (the table's train-FLOPs column counts the same on its timing batch). Fresh
    weights from ``seed`` and fixed random tokens: FLOPs that depend on routing (head-sparse
    execution) are those of the initial router."""
    family = family_of(config)
    if not family.predicts_next_token:
        raise ValueError(f"training FLOPs are counted on a next-token step; a {family.model_type} model trains "
                         "on another objective")
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (1, seq_len + 1), generator=generator)
    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = family.model_class(config).train()

    def step() -> None:
        out = model(ids, labels=ids)
        (out.lm_loss + out.aux_loss).backward()

    return count_flops(step)[0] / seq_len


def count_parameters(config: GoHConfig) -> int:
    return family_of(config).model_class(config).num_parameters()


def count_active_parameters(config: GoHConfig) -> int:
    return active_parameters(family_of(config).model_class(config))


def active_parameters(model) -> int:
    """Parameters one token's computation uses: everything except the routed experts it skips.

    Every attention head's parameters count as active: the query projection runs for every head in
    both execution modes, and head-sparse decoding still reads every head's keys and values (what
    routing saves is attention work and output columns, counted in FLOPs by the comparison table,
    not parameters). A token with ``m`` sub-tokens and top-``k`` routing uses at most ``m * k``
    routed experts.
    """
    total = model.num_parameters()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            per_expert = sum(p.numel() for p in module.experts.parameters()) // module.n_routed
            used = min(module.n_routed, module.n_subtokens * module.top_k)
            total -= (module.n_routed - used) * per_expert
    return total


# the fields a task's family sets in every variant alike (taken from the task's tiny preset): the
# encoder's positions, MLP and norm, a classifier head; the comparison's shape and routing stay
FAMILY_FIELDS = ("model_type", "position_embedding", "mlp", "norm", "n_labels", "classifier_pooling")


def task_variants(variants: Dict[str, GoHConfig], task, data, train_config) -> Dict[str, GoHConfig]:
    """The decoder ``variants`` as models of ``task``'s family (:mod:`gohgraph.training.tasks`),
    before matching: the family's fields of the task's ``tiny`` preset in every variant alike (a
    seq2seq model gets as many decoder as encoder layers), then sized to the task's data
    (vocabulary, positions, labels). A row the family cannot build (Mixture-of-Recursions on an
    encoder) is a one-line ``ValueError``."""
    if task.family is family_of(next(iter(variants.values()))):
        return {name: task.fit_model_config(config, data, train_config, set(), None) for name, config in variants.items()}
    preset = task.presets["tiny"][0]
    family = {field: preset[field] for field in FAMILY_FIELDS if field in preset}
    converted = {}
    for name, config in variants.items():
        if config.recursion != "none":
            raise ValueError(f"--objective {task.name}: the {name!r} row recurses (Mixture-of-Recursions), which only "
                             "decoders do")
        extra = {"n_decoder_layers": config.n_layers} if "n_decoder_layers" in preset else {}
        converted[name] = task.fit_model_config(config.replace(**family, **extra), data, train_config, set(), None)
    return converted


# how a variant's size is counted for each --match; "flops" (count_training_flops) also needs the
# training sequence length, so match_parameters binds it
MATCH_ON: Dict[str, Optional[Callable[[GoHConfig], int]]] = {"total": count_parameters, "active": count_active_parameters,
                                                            "flops": None}


def _heads_active(config: GoHConfig) -> str:
    """``"6/8"`` (active of all dense heads per token), with MoSA's sparse heads and the share of the
    sequence each keeps: ``"8/8 + 8 sparse (T/8)"``."""
    dense = f"{config.active_heads}/{config.n_heads}"
    return dense + (f" + {config.n_mosa_heads} sparse (T/{config.mosa_sparsity})" if config.n_mosa_heads else "")


def _experts_active(config: GoHConfig) -> str:
    if config.ffn == "dense":
        return "-"
    per_token = f"{config.top_k_experts}" if config.n_subtokens == 1 else f"{config.n_subtokens}x{config.top_k_experts}"
    return f"{per_token}/{config.n_routed_experts}"


def _fit_to_target(config: GoHConfig, target: int, good_enough: float,
                   count: Callable[[GoHConfig], int] = count_parameters) -> GoHConfig:
    """The size knob (``ffn_hidden`` or ``expert_hidden``, then ``n_experts``) closest to ``target``.

    Parameters are affine in each knob, so two counts give the slope; the neighbours of the
    solution are then counted exactly. Expert counts are tried nearest-first from the configured
    one, and the first within ``good_enough`` wins (so the configured count is kept when it fits).
    """
    if config.ffn == "dense":
        return _fit_knob(config, "ffn_hidden", target, count)[0]
    best, best_error = config, math.inf
    base = config.n_experts
    spread = max(2, base // 4)
    for offset in sorted(range(-spread, spread + 1), key=lambda o: (abs(o), o)):
        n_experts = base + offset
        if n_experts - config.n_shared_experts < config.top_k_experts:
            continue
        fitted, error = _fit_knob(config.replace(n_experts=n_experts), "expert_hidden", target, count)
        if error <= good_enough:
            return fitted
        if error < best_error:
            best, best_error = fitted, error
    return best


def _fit_knob(config: GoHConfig, knob: str, target: int,
              count: Callable[[GoHConfig], int]) -> Tuple[GoHConfig, float]:
    low, high = 8, 16
    count_low = count(config.replace(**{knob: low}))
    slope = (count(config.replace(**{knob: high})) - count_low) / (high - low)
    guess = max(1, round(low + (target - count_low) / slope))
    candidates = [config.replace(**{knob: value}) for value in (guess - 1, guess, guess + 1) if value >= 1]
    errors = [abs(count(c) / target - 1.0) for c in candidates]
    best = min(range(len(candidates)), key=errors.__getitem__)
    return candidates[best], errors[best]


def reference_of(config: GoHConfig) -> str:
    """What released code a configuration computes, and the test that checks it."""
    if config.router == "dense":
        heads = "multi-head attention as in HF Llama (tests/interop: converted logits equal)"
    elif config.router == "linear":
        heads = ("SkyworkAI/MoH's gating (tests/routers/test_moh_reference.py)"
                 if config.head_gate_normalisation == "moh" else
                 "MoH's router with gates summing to H_s + k (not MoH's released gating)")
    elif config.router == "query-norm":
        heads = "MoH-LLaMA3's parameter-free router (tests/routers/test_moh_reference.py)"
    else:
        heads = f"gohgraph's graph router with {'MoH' if config.head_gate_normalisation == 'moh' else 'H_s + k'} gating"
    if config.talking_heads:
        talking = "talking-heads attention, Shazeer et al. 2020 (tests/layers/test_talking_heads.py: the paper's equations)"
        heads = talking if config.router == "dense" else f"{heads}, on {talking}"
    if config.n_attention_experts:
        switch = (f"SwitchHead, Csordás et al. 2024, {config.n_attention_experts} value/output experts per head, "
                  f"top-{config.top_k_attention_experts} (tests/layers/test_switch_head.py: the released module)")
        heads = switch if config.router == "dense" else f"{heads}, on {switch}"
    if config.n_mosa_heads:
        mosa = (f"MoSA, Piękos et al. 2025, {config.n_mosa_heads} sparse heads keeping T/{config.mosa_sparsity} tokens "
                "each beside the dense ones (piotrpiekos/MoSA's PureMoSA: tests/layers/test_mosa.py; evaluated "
                "with the per-token inference router, docs/decoding.md)")
        heads = f"{heads}, plus {mosa}"
    bitnet = "; BitNet b1.58 projections and experts (tests/layers/test_bitlinear.py)" if config.linear == "bitnet" else ""
    if config.recursion == "mor":
        bitnet += (f"; Mixture-of-Recursions, {config.recursion_router}, {config.n_layers} shared block(s) x "
                   f"{config.max_recursions} recursions (every token computed in every recursion: no FLOPs saved)")
    if config.ffn == "dense":
        return heads + bitnet
    if config.ffn == "graph-moe":
        experts = "gohgraph's graph router over sub-tokens and experts"
    elif config.expert_score == "sigmoid":
        experts = "DeepSeek-V3's expert routing (tests/moe/test_hf_blocks.py)"
    elif not config.expert_renormalise:
        experts = "Qwen2-MoE's expert weighting (norm_topk_prob=False)"
    elif config.ffn == "moe":
        experts = "HF Mixtral's MoE block (tests/moe/test_hf_blocks.py)"
    else:
        experts = "MH-MoE (torchscale) with renormalised top-k"
    return (experts if config.router == "dense" else f"{heads}; {experts}") + bitnet

