"""One configuration object for every GoH model variant.

Dense MHA, MoH, GoH attention, SMoE, fine-grained SMoE, MH-MoE and GoH-MoE are all values of this
dataclass (DESIGN.md §1), so a comparison between them changes fields here and nothing else.
Every field is checked at construction; a bad value raises ``ValueError`` naming the field and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

ROUTERS = ("dense", "linear", "graph")
HEAD_GRAPH_NAMES = ("complete", "ring", "star", "none")
FFN_KINDS = ("dense", "moe", "mh-moe", "graph-moe")
NORMS = ("rms", "layer")
EXPERT_ACTIVATIONS = ("swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned")
MLP_KINDS = ("swiglu", "gelu")

HeadGraphSpec = Union[str, list]  # a name, or a list of [src, dst] head pairs


@dataclass
class GoHConfig:
    """Hyper-parameters of a :class:`~gohgraph.GoHTransformer`.

    Attention routing: ``router`` is ``"dense"`` (plain MHA, every head on with gate 1),
    ``"linear"`` (MoH: a linear router over the token) or ``"graph"`` (GoH: ``router_rounds`` of
    message passing over ``head_graph``). ``head_graph`` accepts a name, a ``networkx.DiGraph`` or a
    ``[2, E]`` ``edge_index`` tensor; it is stored as a name or a list of ``[src, dst]`` pairs so the
    config survives a JSON round-trip.

    Feed-forward: ``ffn`` is ``"dense"`` (SwiGLU), ``"moe"`` (SMoE; fine-grained with more, smaller
    experts), ``"mh-moe"`` (tokens split into ``n_subtokens`` sub-tokens) or ``"graph-moe"``
    (sub-tokens routed by message passing over the sub-token -> expert graph). ``router_dim`` is
    the node feature width of both graph routers; for ``"graph-moe"`` keep it at least the number
    of routed experts, since expert scores are a bilinear form in those features (8-wide features
    for 16 experts cost 0.05 nats in BENCHMARKS.md's full setting).
    """

    # model shape
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: Optional[int] = None  # None = n_heads (MHA); 1 = MQA; otherwise GQA
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm: str = "rms"
    norm_eps: float = 1e-5
    ffn_hidden: Optional[int] = None  # None = SwiGLU's 8/3 * d_model rounded up to a multiple of 8
    dropout: float = 0.0
    tie_embeddings: bool = True
    init_std: float = 0.02
    # architecture switches for converted models (GPT-2 style); defaults are the LLaMA-style model
    position_embedding: str = "rope"  # "learned": absolute position table added to the embedding
    linear_bias: bool = False  # biases in the qkv / out / dense-FFN linears
    mlp: str = "swiglu"  # dense FFN: "swiglu", or "gelu" (2-layer MLP, tanh GELU as GPT-2)

    # head routing
    router: str = "dense"
    n_shared_heads: int = 0
    top_k_heads: Optional[int] = None  # None = every routed head
    router_rounds: int = 2
    router_dim: int = 16
    head_graph: Any = "complete"
    inter_head_flow: bool = True
    # graph router: add MoH's linear logits of the whole token to the message-passing logits, so
    # GoH's head choice can do everything MoH's can and the graph refines it (off: it tied both GoH
    # and MoH in BENCHMARKS.md's full setting)
    router_token_logits: bool = False

    # routing losses and balancing
    balance_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    aux_free_bias: bool = False
    bias_update_rate: float = 1e-3

    # feed-forward experts
    ffn: str = "dense"
    n_experts: int = 8
    n_shared_experts: int = 0
    top_k_experts: int = 2
    n_subtokens: int = 1
    expert_hidden: Optional[int] = None  # None = ffn_hidden // top_k_experts (matched active size)
    capacity_factor: Optional[float] = None  # None = dropless
    expert_activation: str = "swiglu"
    expert_graph: Any = None  # None = every sub-token may reach every expert; else [[head, expert], ...]
    expert_load_feature: bool = True
    # MH-MoE's head and merge layers (d_model x d_model each) around the sub-token split; False splits
    # the token as it is and concatenates the results (the MH-MoE paper's ablation)
    subtoken_projections: bool = True

    def __post_init__(self) -> None:
        self.head_graph = _normalise_graph_spec(self.head_graph, "head_graph")
        if self.expert_graph is not None:
            self.expert_graph = _normalise_graph_spec(self.expert_graph, "expert_graph")
        self._validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def n_routed_heads(self) -> int:
        return self.n_heads - self.n_shared_heads

    @property
    def active_routed_heads(self) -> int:
        """Routed heads active per token (k_h); every head for the dense router."""
        if self.router == "dense":
            return self.n_routed_heads
        return self.n_routed_heads if self.top_k_heads is None else self.top_k_heads

    @property
    def active_heads(self) -> int:
        return self.n_shared_heads + self.active_routed_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden is not None:
            return self.ffn_hidden
        if self.mlp == "gelu":
            return 4 * self.d_model
        return 8 * math.ceil(8 * self.d_model / 3 / 8)

    @property
    def n_routed_experts(self) -> int:
        return self.n_experts - self.n_shared_experts

    @property
    def expert_hidden_dim(self) -> int:
        if self.expert_hidden is not None:
            return self.expert_hidden
        return max(8, self.hidden_dim // max(1, self.top_k_experts * self.n_subtokens))

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "router_dim")
        _choice(self, "router", ROUTERS)
        _choice(self, "ffn", FFN_KINDS)
        _choice(self, "norm", NORMS)
        _choice(self, "expert_activation", EXPERT_ACTIVATIONS)
        _choice(self, "position_embedding", POSITION_EMBEDDINGS)
        _choice(self, "mlp", MLP_KINDS)
        if not isinstance(self.linear_bias, bool):
            raise ValueError(f"linear_bias={self.linear_bias!r} must be True or False")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.position_embedding == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ValueError(
                f"n_kv_heads={self.n_kv_heads} must be a positive divisor of n_heads={self.n_heads}")
        if not 0 <= self.n_shared_heads <= self.n_heads:
            raise ValueError(f"n_shared_heads={self.n_shared_heads} must be in [0, n_heads={self.n_heads}]")
        if self.top_k_heads is not None and not 1 <= self.top_k_heads <= self.n_routed_heads:
            raise ValueError(f"top_k_heads={self.top_k_heads} must be in "
                             f"[1, n_routed_heads={self.n_routed_heads}] (n_heads - n_shared_heads)")
        if self.router_rounds < 0:
            raise ValueError(f"router_rounds={self.router_rounds} must be >= 0")
        if self.router == "graph" and self.router_rounds < 1:
            raise ValueError("router_rounds must be >= 1 for router='graph' (use router='linear' for 0 rounds)")
        if self.router != "dense" and self.n_routed_heads == 0 and self.n_shared_heads == 0:
            raise ValueError("a routed attention layer needs at least one head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        for name in ("balance_loss_coef", "z_loss_coef", "bias_update_rate", "norm_eps", "rope_theta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ValueError(f"ffn_hidden={self.ffn_hidden} must be >= 1")
        _check_graph_nodes(self.head_graph, "head_graph", self.n_heads)
        if self.ffn != "dense":
            self._validate_experts()

    def _validate_experts(self) -> None:
        _positive(self, "n_experts", "top_k_experts", "n_subtokens")
        if not 0 <= self.n_shared_experts < self.n_experts:
            raise ValueError(f"n_shared_experts={self.n_shared_experts} must be in [0, n_experts={self.n_experts})")
        if self.top_k_experts > self.n_routed_experts:
            raise ValueError(f"top_k_experts={self.top_k_experts} must be <= n_routed_experts="
                             f"{self.n_routed_experts} (n_experts - n_shared_experts)")
        if self.ffn == "moe" and self.n_subtokens != 1:
            raise ValueError(f"n_subtokens={self.n_subtokens} must be 1 for ffn='moe' (use 'mh-moe' to split tokens)")
        if self.d_model % self.n_subtokens:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_subtokens={self.n_subtokens}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            raise ValueError(f"expert_hidden={self.expert_hidden} must be >= 1")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0 or None (dropless)")
        if self.expert_graph is not None:
            if isinstance(self.expert_graph, str):
                raise ValueError("expert_graph must be None or a list of [sub-token, expert] pairs")
            for sub, expert in self.expert_graph:
                if not (0 <= sub < self.n_subtokens and 0 <= expert < self.n_routed_experts):
                    raise ValueError(f"expert_graph edge {[sub, expert]} out of range: sub-tokens "
                                     f"0..{self.n_subtokens - 1}, routed experts 0..{self.n_routed_experts - 1} "
                                     "(shared experts are always on and not in the graph)")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: Optional[Union[str, Path]] = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, values: dict) -> "GoHConfig":
        return dataclass_from_dict(cls, values)

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "GoHConfig":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text(encoding="utf-8")
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "GoHConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- helpers
def dataclass_from_dict(cls, values: dict):
    """``cls(**values)`` for a config dataclass, refusing unknown keys by name (JSON typos)."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; allowed: {sorted(known)}")
    return cls(**values)


def _positive(cfg: GoHConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


def _choice(cfg: GoHConfig, name: str, allowed: tuple) -> None:
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")


def _normalise_graph_spec(spec: Any, name: str) -> HeadGraphSpec:
    """A graph name stays a name; a networkx graph or edge_index becomes a list of [src, dst]."""
    if isinstance(spec, str):
        if name == "head_graph" and spec not in HEAD_GRAPH_NAMES:
            raise ValueError(f"{name}={spec!r} is not one of {list(HEAD_GRAPH_NAMES)}, "
                             "a networkx.DiGraph or an edge_index tensor")
        return spec
    try:
        import networkx as nx
        if isinstance(spec, nx.Graph):
            directed = spec if spec.is_directed() else spec.to_directed()
            return sorted([int(s), int(d)] for s, d in directed.edges())
    except ImportError:  # pragma: no cover - networkx is a hard dependency
        pass
    try:
        import torch
        if isinstance(spec, torch.Tensor):
            if spec.dim() != 2 or spec.shape[0] != 2:
                raise ValueError(f"{name} edge_index must have shape [2, E], got {list(spec.shape)}")
            return [[int(s), int(d)] for s, d in spec.t().tolist()]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(spec, (list, tuple)):
        edges = []
        for edge in spec:
            if len(edge) != 2:
                raise ValueError(f"{name} edges must be [src, dst] pairs, got {edge!r}")
            edges.append([int(edge[0]), int(edge[1])])
        return edges
    raise ValueError(f"{name}={spec!r} must be one of {list(HEAD_GRAPH_NAMES)}, "
                     "a networkx.DiGraph, an edge_index tensor or a list of [src, dst] pairs")


def _check_graph_nodes(spec: HeadGraphSpec, name: str, n_nodes: int) -> None:
    if isinstance(spec, str):
        return
    for src, dst in spec:
        if not (0 <= src < n_nodes and 0 <= dst < n_nodes):
            raise ValueError(f"{name} edge {[src, dst]} names a head outside 0..{n_nodes - 1}")
        if src == dst:
            raise ValueError(f"{name} edge {[src, dst]} is a self-loop; self-loops are implicit")
