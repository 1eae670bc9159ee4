"""One configuration object for every GoH model variant.

Dense MHA, MoH, GoH attention, SMoE, fine-grained SMoE, MH-MoE and GoH-MoE are all values of this
dataclass (docs/index.md), so a comparison between them changes fields here and nothing else.
Every field is checked at construction; a bad value raises ``ValueError`` naming the field and the
allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from .graph import normalise_graph_spec

MIN_EXPERT_HIDDEN = 8  # the default expert width never drops below this

ROUTERS = ("dense", "linear", "graph", "query-norm")
FFN_KINDS = ("dense", "moe", "mh-moe", "graph-moe")
NORMS = ("rms", "layer")
EXPERT_ACTIVATIONS = ("swiglu", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned", "alibi", "sinusoidal", "t5-relative")
ROPE_SCALINGS = ("none", "linear", "ntk", "llama3")
ATTENTION_KINDS = ("mha", "mla")
MLP_KINDS = ("swiglu", "gelu", "gelu-exact", "relu", "geglu")
MODEL_TYPES = ("decoder", "encoder", "seq2seq")  # the three members of the family
NORM_POSITIONS = ("pre", "post")
CLASSIFIER_POOLINGS = ("first", "mean", "first-tanh")
ATTENTION_SCALES = ("sqrt", "none")
LINEAR_KINDS = ("standard", "bitnet")  # gohgraph.layers.linear builds them
ROUTER_NOISES = ("none", "noisy-top-k", "gumbel", "jitter")  # gohgraph.routers.noise applies them
RECURSIONS = ("none", "mor")
RECURSION_SHARINGS = ("cycle", "middle-cycle")
RECURSION_ROUTERS = ("expert-choice", "token-choice")
RECURSION_KV = ("recursion", "shared")
RECURSION_INFERENCE = ("aux-router", "router-bce")
MOSA_INFERENCE = ("aux-router", "score-threshold")
RECURSION_SCORERS = ("linear", "graph")
EXECUTIONS = ("auto", "masked", "sparse")
RECURSION_EXECUTIONS = ("auto", "masked", "gather")  # docs/skipping-work.md: skip the work routing rules out, or compute all

GATE_NORMALISATIONS = ("moh", "mha")
EXPERT_SCORES = ("softmax", "sigmoid")
BALANCE_POOLINGS = ("layer", "model", "global-batch")
HEAD_BALANCE_POOLINGS = ("layer", "global-batch")
HeadGraphSpec = Union[str, list]  # a name, or a list of [src, dst] head pairs
# fields added after checkpoints were written, with the value that reproduces those checkpoints;
# applied to a saved config.json that lacks them (storage.read_config), never to new configs
LEGACY_FIELD_VALUES = {"head_gate_normalisation": "mha"}

SECTIONS = ("shape", "attention", "head routing", "routing losses", "recursion", "experts")


def _in(section: str, default: Any) -> Any:
    """A dataclass field of ``section`` (one of :data:`SECTIONS`) with its default."""
    return field(default=default, metadata={"section": section})


@dataclass
class GoHConfig:
    """Hyper-parameters of a :class:`~gohgraph.GoHTransformer`, in five sections.

    * **shape**: vocabulary, widths, depth, norms, dense FFN, initialisation.
    * **attention**: key/value heads (GQA/MQA), positions, projection biases.
    * **head routing**: ``router`` is ``"dense"`` (plain MHA, every head on with gate 1),
      ``"linear"`` (MoH: a linear router over the token), ``"graph"`` (GoH: ``router_rounds`` of
      message passing over ``head_graph``) or ``"query-norm"`` (MoH-LLaMA3's parameter-free
      router: top-k heads by query norm, 0/1 gates; for continue-tuning). ``head_graph`` accepts a name, a ``networkx.DiGraph``
      or a ``[2, E]`` ``edge_index`` tensor; it is stored as a name or a list of ``[src, dst]``
      pairs so the config survives a JSON round-trip.
    * **routing losses**: coefficients of the balance and z losses and the auxiliary-loss-free bias.
    * **experts**: ``ffn`` is ``"dense"`` (SwiGLU), ``"moe"`` (SMoE; fine-grained with more, smaller
      experts), ``"mh-moe"`` (tokens split into ``n_subtokens`` sub-tokens) or ``"graph-moe"``
      (sub-tokens routed by message passing over the sub-token -> expert graph). ``router_dim`` is
      the node feature width of both graph routers; for ``"graph-moe"`` keep it at least the number
      of routed experts, since expert scores are a bilinear form in those features (8-wide features
      for 16 experts cost 0.05 nats in BENCHMARKS.md's full setting).

    It stays one flat object: the field names and the JSON are those of every saved config.json.
    Every value is parsed by :func:`parse_typed` from its annotation, whatever path it came by
    (Python argument, ``--set``, JSON), and checked at construction; a bad value raises
    ``ValueError`` naming the field, the value and what is allowed.
    """

    # ---- shape
    vocab_size: int = _in("shape", 256)
    d_model: int = _in("shape", 256)
    n_layers: int = _in("shape", 4)
    n_heads: int = _in("shape", 8)
    max_seq_len: int = _in("shape", 1024)
    norm: str = _in("shape", "rms")
    norm_eps: float = _in("shape", 1e-5)
    ffn_hidden: Optional[int] = _in("shape", None)  # None = SwiGLU's 8/3 * d_model rounded up to a multiple of 8
    mlp: str = _in("shape", "swiglu")  # dense FFN: "swiglu", or "gelu" (2-layer MLP, tanh GELU as GPT-2)
    dropout: float = _in("shape", 0.0)
    tie_embeddings: bool = _in("shape", True)
    init_std: float = _in("shape", 0.02)
    # the transformer family: "decoder" (GoHTransformer), "encoder" (GoHEncoder,
    # BERT) or "seq2seq" (GoHSeq2Seq, T5 / Vaswani); from_pretrained builds the class it names
    model_type: str = _in("shape", "decoder")
    # "pre": x + f(norm(x)) and a final norm (GPT-2, LLaMA, T5); "post": norm(x + f(x)) and no final
    # norm (Vaswani, BERT)
    norm_position: str = _in("shape", "pre")
    embedding_norm: bool = _in("shape", False)  # a norm after the embeddings (BERT; BLOOM in a decoder)
    n_decoder_layers: Optional[int] = _in("shape", None)  # seq2seq decoder depth; None = n_layers
    # seq2seq: the token the decoder starts from (labels shifted right behind it) and the id that
    # replaces -100 in those shifted labels (T5: 0 and 0)
    decoder_start_token_id: int = _in("shape", 0)
    pad_token_id: int = _in("shape", 0)
    # seq2seq: multiply the decoder's last hidden state by d_model**-0.5 before the output head
    # (T5 v1.0, whose head is the embedding; v1.1 has an untied head and no scaling)
    scale_decoder_output: bool = _in("shape", False)
    n_labels: int = _in("shape", 0)  # encoder: classes of the sequence-classification head (0 = none)
    # what the classifier reads: the first token, the mean over real tokens, or BERT's pooler
    # tanh(W h_first + b)
    classifier_pooling: str = _in("shape", "first")
    # encoder: BERT's MLM transform norm(GELU(W h + b)) before the tied output layer
    mlm_transform: bool = _in("shape", False)
    # every projection but routers, embeddings and the output head: "standard" (nn.Linear) or
    # "bitnet" (BitNet b1.58: ternary weights, int8 activations; routed experts per expert)
    linear: str = _in("shape", "standard")

    # ---- attention (the defaults are the LLaMA-style model; converted GPT-2 models switch them)
    n_kv_heads: Optional[int] = _in("attention", None)  # None = n_heads (MHA); 1 = MQA; otherwise GQA
    position_embedding: str = _in("attention", "rope")  # "learned": absolute position table added to the embedding
    rope_theta: float = _in("attention", 10000.0)
    linear_bias: bool = _in("attention", False)  # biases in the qkv / out / dense-FFN linears
    # RoPE for contexts longer than trained on: "linear" (positions / factor), "ntk" (NTK-aware:
    # theta * factor^(d/(d-2))), "llama3" (Llama-3.1's rope_scaling: low frequencies / factor, high
    # ones kept, a smooth ramp between, set by the three fields after the factor)
    rope_scaling: str = _in("attention", "none")
    rope_scaling_factor: float = _in("attention", 1.0)
    rope_low_freq_factor: float = _in("attention", 1.0)
    rope_high_freq_factor: float = _in("attention", 4.0)
    rope_original_max_seq_len: int = _in("attention", 8192)
    # Mistral's sliding window: a query sees the last W positions (itself included); the decode
    # cache then keeps only W - 1 positions per layer, flat in the generated length
    sliding_window: Optional[int] = _in("attention", None)
    # "mla": DeepSeek's multi-head latent attention (docs/decoding.md): keys and values from a latent
    # c = RMSNorm(W_DKV x) of width kv_lora_rank plus one shared RoPE key of width qk_rope_head_dim;
    # queries optionally low-rank (q_lora_rank); the decode cache holds only c and the RoPE key
    attention: str = _in("attention", "mha")
    kv_lora_rank: int = _in("attention", 32)
    q_lora_rank: Optional[int] = _in("attention", None)  # None = queries straight from x
    qk_rope_head_dim: int = _in("attention", 8)
    qk_nope_head_dim: Optional[int] = _in("attention", None)  # None = head_dim
    v_head_dim: Optional[int] = _in("attention", None)  # None = head_dim
    # encoder-decoder family: "none" = T5's unscaled scores q.k (its init folds 1/sqrt(d_h) into W_q)
    attention_scale: str = _in("attention", "sqrt")
    relative_buckets: int = _in("attention", 32)  # position_embedding="t5-relative": T5's bucket count
    relative_max_distance: int = _in("attention", 128)  # ... and the distance the log buckets reach
    # talking-heads attention (Shazeer et al. 2020): the attention logits are mixed across heads by
    # a learned [n_heads, n_heads] matrix before the softmax and the weights by another after it
    # (gohgraph.layers.attention.talking_heads_attention); both start at the identity, so a fresh
    # layer is dense attention. Every head then feeds every other: no head is ever skipped
    talking_heads: bool = _in("attention", False)
    # SwitchHead (Csordás et al. 2024, NeurIPS): with n_attention_experts = E >= 2, every
    # head's value and output projections are E experts, top_k_attention_experts of them chosen per
    # token by a non-competitive sigmoid (no softmax, no balance loss): the value side by the token
    # the value is read from, the output side by the token being written
    # (gohgraph.layers.attention.SwitchHeadProjections). 0 = single projections (every other row)
    n_attention_experts: int = _in("attention", 0)
    top_k_attention_experts: int = _in("attention", 2)
    # the width of one head; None = d_model // n_heads. SwitchHead's saving needs heads narrower in
    # total than the model (n_heads * attention_head_dim < d_model: few heads, each of a usual width)
    attention_head_dim: Optional[int] = _in("attention", None)
    # MoSA (Piękos, Csordás, Schmidhuber 2025, arXiv 2505.00315): n_mosa_heads sparse heads of
    # head_dim beside the n_heads dense ones. In training each sparse head's router sigma(w_h . x)
    # picks the top k = max(2, T // mosa_sparsity) tokens of the sequence (expert choice), attends
    # among them causally by their positions and writes back scaled by the router score
    # (gohgraph.layers.mosa). Expert choice reads the whole sequence, so evaluation and generation
    # decide per token (mosa_inference below; the inference router it may use is trained with a BCE
    # loss of weight mosa_aux_loss_coef to predict the choice; docs/decoding.md). mosa_include_first: the first token is
    # always kept (the released include_first). 0 = no sparse heads (every other row)
    n_mosa_heads: int = _in("attention", 0)
    mosa_sparsity: int = _in("attention", 8)
    mosa_include_first: bool = _in("attention", False)
    mosa_aux_loss_coef: float = _in("attention", 0.1)
    # how evaluation and generation decide per token: "aux-router" (the BCE-trained inference router's
    # logit > 0) or "score-threshold" (the head's own score above a moving average of the training
    # sequences' k-th score)
    mosa_inference: str = _in("attention", "aux-router")

    # ---- head routing
    router: str = _in("head routing", "dense")
    n_shared_heads: int = _in("head routing", 0)
    top_k_heads: Optional[int] = _in("head routing", None)  # None = every routed head
    router_rounds: int = _in("head routing", 2)
    router_dim: int = _in("head routing", 16)
    head_graph: Any = _in("head routing", "complete")
    inter_head_flow: bool = _in("head routing", True)
    # graph router: add MoH's linear logits of the whole token to the message-passing logits, so
    # GoH's head choice can do everything MoH's can and the graph refines it (off: it tied both GoH
    # and MoH in BENCHMARKS.md's full setting)
    router_token_logits: bool = _in("head routing", False)
    # "moh": SkyworkAI/MoH's released gating (shared softmax x H_s, routed renormalised top-k x k,
    # stage weights 2 softmax(W_0 x)): the gate mass varies per token. "mha": gates always sum to
    # H_s + k, so all heads on with uniform gates is exactly MHA (gohgraph's gating before 2026-12;
    # not MoH's unless n_shared_heads == top_k_heads)
    head_gate_normalisation: str = _in("head routing", "moh")
    # docs/skipping-work.md: "sparse" attends only for the (token, head) pairs with a non-zero gate, "masked"
    # computes every head and zeroes the inactive ones (the reference), "auto" picks per call
    # (gohgraph.layers.head_sparse.picks_head_sparse). How it runs, not what: no weight depends on it
    head_execution: str = _in("head routing", "auto")

    # ---- routing losses and balancing (heads and experts)
    balance_loss_coef: float = _in("routing losses", 0.01)
    z_loss_coef: float = _in("routing losses", 1e-3)
    aux_free_bias: bool = _in("routing losses", False)
    bias_update_rate: float = _in("routing losses", 1e-3)
    # "layer": the expert balance loss is summed over layers, each its own product of load and
    # probability (the coefficient then means the same per layer); "model": counts and
    # probabilities are pooled over all layers first, as Hugging Face's load_balancing_loss_func
    # "global-batch" (Qwen's global-batch balance): each layer's counts and probabilities are
    # summed over the micro-batches of gradient accumulation and the data-parallel ranks of an
    # optimizer step before the product, as one big batch would. A forward alone counts its own
    # batch (as "layer"); the LM trainer pools (gohgraph.models.routed.global_batch_balance_loss)
    expert_balance_pooling: str = _in("routing losses", "layer")
    # the same for the head balance loss: "layer" (each micro-batch's own product) or "global-batch"
    head_balance_pooling: str = _in("routing losses", "layer")
    # the load f_i counts every one of a sub-token's top-k choices (default), or only its first
    # (GShard, and MH-MoE's released code); both are 1 at uniform load
    expert_balance_top1: bool = _in("routing losses", False)
    # stochastic routing, in training only (evaluation routes exactly as "none"): "noisy-top-k"
    # (Shazeer 2017: softplus(W_noise x) N(0,1) added to the logits), "gumbel" (Gumbel-top-k: top-k
    # sampled without replacement in proportion to softmax(logits)), "jitter" (Switch: logits times
    # U(1 - router_jitter_eps, 1 + router_jitter_eps))
    head_router_noise: str = _in("routing losses", "none")
    expert_router_noise: str = _in("routing losses", "none")
    router_jitter_eps: float = _in("routing losses", 0.01)

    # ---- recursion: Mixture-of-Recursions (Bae et al. 2025; gohgraph.models.recursion)
    # "mor": a shared stack of blocks is applied up to max_recursions times; every token takes the
    # first recursion, a router picks which tokens continue into each later one
    recursion: str = _in("recursion", "none")
    max_recursions: int = _in("recursion", 2)
    # "cycle": all n_layers blocks are the shared stack; "middle-cycle": the first and the last block
    # are unique and the n_layers - 2 between them are shared
    recursion_sharing: str = _in("recursion", "cycle")
    # "expert-choice": recursion r keeps the top ceil((max_recursions - r) / max_recursions * T) of
    # the tokens still going, with an auxiliary router deciding causally at evaluation;
    # "token-choice": a depth per token from a softmax over depths, with a balance loss
    recursion_router: str = _in("recursion", "expert-choice")
    recursion_gate_scale: float = _in("recursion", 1.0)  # alpha in the gate g = alpha sigmoid(theta^T h)
    recursion_aux_loss_coef: float = _in("recursion", 0.1)  # weight of expert-choice's BCE loss
    # how expert-choice decides causally at evaluation: "aux-router" (a second router trained with
    # BCE to predict the top-k) or "router-bce" (a BCE loss on the router's own scores; a token
    # continues when sigmoid(score) > 1/2)
    recursion_inference: str = _in("recursion", "aux-router")
    # keys/values: "recursion" (recursion-wise caching: recursion r attends to the tokens that took r)
    # or "shared" (KV sharing: every recursion attends to the first recursion's keys of all tokens)
    recursion_kv: str = _in("recursion", "recursion")
    # where the recursion router's scores (expert-choice) or depth logits (token-choice) come from:
    # "linear" (theta^T h) or "graph" (the token's heads as nodes of head_graph, router_rounds of the
    # GoH head router's message passing with router_dim features, mean of the node scores)
    recursion_scorer: str = _in("recursion", "linear")
    # docs/skipping-work.md: "gather" runs each recursion only on the tokens that take it, "masked" runs it
    # on every token and discards the rest (the reference), "auto" gathers where it can
    # (GoHConfig.can_gather_recursions). How it runs, not what: no weight depends on it
    recursion_execution: str = _in("recursion", "auto")

    # ---- feed-forward experts
    ffn: str = _in("experts", "dense")
    n_experts: int = _in("experts", 8)
    n_shared_experts: int = _in("experts", 0)
    top_k_experts: int = _in("experts", 2)
    n_subtokens: int = _in("experts", 1)
    # None = ffn_hidden // top_k_experts: the k experts a (sub-)token reaches then hold as many
    # parameters as the dense FFN, however many sub-tokens it is split into
    expert_hidden: Optional[int] = _in("experts", None)
    capacity_factor: Optional[float] = _in("experts", None)  # None = dropless
    expert_activation: str = _in("experts", "swiglu")
    expert_graph: Optional[Any] = _in("experts", None)  # None = every sub-token may reach every expert; else [[slot, expert], ...]
    expert_load_feature: bool = _in("experts", True)
    # ffn="graph-moe": expert <-> expert graph over the routed experts (GMoE, Bai et al. 2024): in
    # each router round the experts also attend to their neighbours here before scoring; a name
    # as for head_graph or [[src, dst], ...] expert pairs; "none" keeps only the bipartite rounds
    expert_peer_graph: Any = _in("experts", "none")
    # the first this many layers keep the dense FFN (DeepSeek-V3's first_k_dense_replace)
    n_dense_layers: int = _in("experts", 0)
    # how selected experts are weighted (docs/experts.md): "softmax" with renormalisation is Mixtral's,
    # softmax without it Qwen2-MoE's default; "sigmoid" scores with the selection bias added to the
    # scores, group-limited top-k and a scaling factor are DeepSeek-V3's
    expert_score: str = _in("experts", "softmax")
    expert_renormalise: bool = _in("experts", True)
    n_expert_groups: int = _in("experts", 1)  # DeepSeek-V3's n_group: experts in this many equal groups
    top_k_expert_groups: int = _in("experts", 1)  # ... of which a token's top_k come from the best this many
    routed_scaling_factor: float = _in("experts", 1.0)
    # the shared experts' total width (None = n_shared_experts * expert width) and Qwen2-MoE's
    # sigmoid gate on their output, sigmoid(w^T x) per token
    shared_expert_hidden: Optional[int] = _in("experts", None)
    shared_expert_gate: bool = _in("experts", False)
    # MH-MoE's head and merge layers (d_model x d_model each) around the sub-token split; False splits
    # the token as it is and concatenates the results (the MH-MoE paper's ablation)
    subtoken_projections: bool = _in("experts", True)

    def __post_init__(self) -> None:
        parse_fields(self)
        self.head_graph = normalise_graph_spec(self.head_graph, "head_graph")
        if self.expert_graph is not None:
            self.expert_graph = normalise_graph_spec(self.expert_graph, "expert_graph")
        self.expert_peer_graph = normalise_graph_spec(self.expert_peer_graph, "expert_peer_graph")
        self._validate()

    @classmethod
    def section_fields(cls, section: str) -> Tuple[str, ...]:
        """The field names of one of :data:`SECTIONS`, in declaration order."""
        if section not in SECTIONS:
            raise ValueError(f"section={section!r} is not one of {list(SECTIONS)}")
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("section") == section)

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.attention_head_dim is None else self.attention_head_dim

    @property
    def query_head_dim(self) -> int:
        """Width of one head's query (what the head routers read): ``head_dim``, or for MLA
        ``qk_nope_head_dim + qk_rope_head_dim``."""
        if self.attention == "mla":
            return self.mla_nope_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        """Width of one head's output: ``head_dim``, or MLA's ``v_head_dim``."""
        if self.attention == "mla" and self.v_head_dim is not None:
            return self.v_head_dim
        return self.head_dim

    @property
    def mla_nope_dim(self) -> int:
        return self.head_dim if self.qk_nope_head_dim is None else self.qk_nope_head_dim

    @property
    def rope_dim(self) -> int:
        """Width RoPE rotates per head: ``head_dim``, or MLA's decoupled ``qk_rope_head_dim``."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

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
        if self.mlp in ("gelu", "gelu-exact", "relu"):  # two-layer MLPs: Vaswani's and BERT's 4 d_model
            return 4 * self.d_model
        return 8 * math.ceil(8 * self.d_model / 3 / 8)

    @property
    def can_gather_recursions(self) -> bool:
        """Whether a Mixture-of-Recursions stack's attention takes a gathered run's mask as the whole
        truth (``recursion_execution``): not MLA, ALiBi, T5 bias or sliding windows, whose masks are
        written in relative positions."""
        return (self.attention == "mha" and self.sliding_window is None
                and self.position_embedding not in ("alibi", "t5-relative"))

    @property
    def is_encoder_decoder(self) -> bool:
        """Whether the model has a decoder stack beside its encoder (``model_type='seq2seq'``): the
        one place outside ``models/`` that tells the families apart by name, as Hugging Face's
        ``PretrainedConfig.is_encoder_decoder``."""
        return self.model_type == "seq2seq"

    @property
    def decoder_layers(self) -> int:
        """Depth of a seq2seq model's decoder stack."""
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    @property
    def n_routed_experts(self) -> int:
        return self.n_experts - self.n_shared_experts

    @property
    def expert_hidden_dim(self) -> int:
        """Expert width; by default the ``top_k_experts`` experts a sub-token reaches hold, over
        all ``n_subtokens`` sub-tokens of input width ``d_model / n_subtokens``, as many weights as
        the dense FFN (``k * 3 * d/m * h * m = 3 * d * hidden``): matched active parameters."""
        if self.expert_hidden is not None:
            return self.expert_hidden
        return max(MIN_EXPERT_HIDDEN, self.hidden_dim // self.top_k_experts)

    @property
    def output_init_std(self) -> float:
        """Init std of every projection that writes into the residual stream (attention output,
        FFN and expert down-projections): GPT-2's ``init_std / sqrt(2 * n_layers)``, so the
        residual's variance does not grow with depth."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        _positive(self, "vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "router_dim")
        _choice(self, "router", ROUTERS)
        _choice(self, "head_execution", EXECUTIONS)
        _choice(self, "ffn", FFN_KINDS)
        _choice(self, "norm", NORMS)
        _choice(self, "expert_activation", EXPERT_ACTIVATIONS)
        _choice(self, "position_embedding", POSITION_EMBEDDINGS)
        _choice(self, "mlp", MLP_KINDS)
        _choice(self, "rope_scaling", ROPE_SCALINGS)
        _choice(self, "attention", ATTENTION_KINDS)
        if self.attention == "mla":
            self._validate_latent_attention()
        if self.talking_heads:
            self._validate_talking_heads()
        if self.n_attention_experts:
            self._validate_attention_experts()
        self._validate_sparse_heads()
        self._validate_positions()
        _choice(self, "head_gate_normalisation", GATE_NORMALISATIONS)
        _choice(self, "expert_score", EXPERT_SCORES)
        _choice(self, "expert_balance_pooling", BALANCE_POOLINGS)
        _choice(self, "head_balance_pooling", HEAD_BALANCE_POOLINGS)
        self._validate_family()
        _choice(self, "linear", LINEAR_KINDS)
        _choice(self, "head_router_noise", ROUTER_NOISES)
        _choice(self, "expert_router_noise", ROUTER_NOISES)
        if not 0.0 <= self.router_jitter_eps < 1.0:
            raise ValueError(f"router_jitter_eps={self.router_jitter_eps} must be in [0, 1)")
        self._validate_recursion()
        if self.attention_head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} (or set "
                             "attention_head_dim)")
        if self.attention_head_dim is not None and self.attention_head_dim < 1:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} must be >= 1 (or None: d_model // n_heads)")
        if self.position_embedding == "rope" and self.attention == "mha" and self.head_dim % 2:
            width = "attention_head_dim" if self.attention_head_dim is not None else "head_dim=d_model/n_heads"
            raise ValueError(f"{width}={self.head_dim} must be even for RoPE")
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

    def _validate_talking_heads(self) -> None:
        if self.attention != "mha":
            raise ValueError(f"talking_heads=True needs attention='mha', got attention={self.attention!r} "
                             "(MLA's absorbed decode path has no per-head score tensor to mix)")
        if self.head_execution == "sparse":
            raise ValueError("talking_heads=True cannot run head_execution='sparse': every head's logits mix into "
                             "every other head, so no (token, head) pair can be skipped; use 'auto' or 'masked'")

    def _validate_attention_experts(self) -> None:
        if self.n_attention_experts < 2:
            raise ValueError(f"n_attention_experts={self.n_attention_experts} must be 0 (off) or >= 2")
        if not 1 <= self.top_k_attention_experts <= self.n_attention_experts:
            raise ValueError(f"top_k_attention_experts={self.top_k_attention_experts} must be in "
                             f"[1, n_attention_experts={self.n_attention_experts}]")
        for name, allowed in (("attention", "mha"), ("linear", "standard"), ("talking_heads", False),
                              ("linear_bias", False)):
            if getattr(self, name) != allowed:
                raise ValueError(f"n_attention_experts={self.n_attention_experts} needs {name}={allowed!r}, "
                                 f"got {name}={getattr(self, name)!r}")

    def _validate_sparse_heads(self) -> None:
        if self.n_mosa_heads < 0:
            raise ValueError(f"n_mosa_heads={self.n_mosa_heads} must be >= 0 (0 = no sparse heads)")
        _positive(self, "mosa_sparsity")
        if self.mosa_aux_loss_coef < 0:
            raise ValueError(f"mosa_aux_loss_coef={self.mosa_aux_loss_coef} must be >= 0")
        _choice(self, "mosa_inference", MOSA_INFERENCE)
        if not self.n_mosa_heads:
            return
        # the sparse heads are self-attention heads of a decoder with their own projections and a
        # cache slot per layer; what they would need beside that (cross-attention, relative-position
        # masks, quantised or expert projections, a recursion's cache) is refused, not ignored
        for name, allowed in (("model_type", "decoder"), ("attention", "mha"), ("linear", "standard"),
                              ("n_attention_experts", 0), ("recursion", "none"), ("sliding_window", None)):
            if getattr(self, name) != allowed:
                raise ValueError(f"n_mosa_heads={self.n_mosa_heads} needs {name}={allowed!r}, "
                                 f"got {name}={getattr(self, name)!r}")
        if self.position_embedding in ("alibi", "t5-relative"):
            raise ValueError(f"n_mosa_heads={self.n_mosa_heads} needs position_embedding 'rope', 'learned' or "
                             f"'sinusoidal' (a score bias has no per-head token subset), got "
                             f"{self.position_embedding!r}")

    def _validate_latent_attention(self) -> None:
        if self.attention_head_dim is not None:
            raise ValueError(f"attention_head_dim={self.attention_head_dim} with attention='mla': latent attention "
                             "sets its heads' widths with qk_nope_head_dim, qk_rope_head_dim and v_head_dim")
        _positive(self, "kv_lora_rank", "qk_rope_head_dim")
        for name in ("q_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer or None")
        if self.position_embedding != "rope" or self.qk_rope_head_dim % 2:
            raise ValueError(f"attention='mla' needs position_embedding='rope' and an even qk_rope_head_dim, got "
                             f"{self.position_embedding!r} and {self.qk_rope_head_dim}")
        if self.n_kv_heads is not None:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} does not apply to attention='mla' (every head reads "
                             "the one shared latent); leave it None")
        if self.linear != "standard":
            # the absorbed decode path folds kv_up's full-precision weight into the queries: a
            # quantised projection would compute another function there
            raise ValueError(f"attention='mla' needs linear='standard', got linear={self.linear!r}")

    def _validate_positions(self) -> None:
        if self.rope_scaling != "none" and self.position_embedding != "rope":
            raise ValueError(f"rope_scaling={self.rope_scaling!r} needs position_embedding='rope', "
                             f"got {self.position_embedding!r}")
        if not (math.isfinite(self.rope_scaling_factor) and self.rope_scaling_factor >= 1.0):
            raise ValueError(f"rope_scaling_factor={self.rope_scaling_factor} must be a finite number >= 1")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"rope_low_freq_factor={self.rope_low_freq_factor} and rope_high_freq_factor="
                             f"{self.rope_high_freq_factor} must satisfy 0 < low < high")
        _positive(self, "rope_original_max_seq_len")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window={self.sliding_window} must be >= 1 or None (full attention)")

    def _validate_family(self) -> None:
        _choice(self, "model_type", MODEL_TYPES)
        _choice(self, "norm_position", NORM_POSITIONS)
        _choice(self, "classifier_pooling", CLASSIFIER_POOLINGS)
        _choice(self, "attention_scale", ATTENTION_SCALES)
        _positive(self, "relative_buckets", "relative_max_distance")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            raise ValueError(f"n_decoder_layers={self.n_decoder_layers} must be >= 1 or None (= n_layers)")
        if self.n_labels < 0 or (self.n_labels and self.model_type != "encoder"):
            raise ValueError(f"n_labels={self.n_labels} must be >= 0, and > 0 only for model_type='encoder' "
                             f"(got model_type={self.model_type!r})")
        for name in ("decoder_start_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name}={getattr(self, name)} must be a token id in [0, vocab_size={self.vocab_size})")
        if self.model_type == "seq2seq":
            self._validate_seq2seq()
        elif self.scale_decoder_output:
            raise ValueError(f"scale_decoder_output=True applies to model_type='seq2seq' only (got {self.model_type!r})")
        if self.position_embedding == "t5-relative" and self.model_type == "decoder":
            raise ValueError("position_embedding='t5-relative' is built by the encoder and seq2seq models; "
                             "the decoder-only model takes 'rope', 'learned', 'alibi' or 'sinusoidal'")

    def _validate_seq2seq(self) -> None:
        # the decoder's cross-attention projects the encoder output through GoHAttention's memory
        # path: a slice of the full-precision qkv weight, which neither MLA's latent projections
        # nor BitNet's quantised linears have; recursion re-applies decoder-only stacks
        for name, allowed in (("attention", "mha"), ("linear", "standard"), ("recursion", "none")):
            if getattr(self, name) != allowed:
                raise ValueError(f"model_type='seq2seq' needs {name}={allowed!r}, got {name}={getattr(self, name)!r}")

    def _validate_recursion(self) -> None:
        _choice(self, "recursion", RECURSIONS)
        _choice(self, "recursion_sharing", RECURSION_SHARINGS)
        _choice(self, "recursion_router", RECURSION_ROUTERS)
        _choice(self, "recursion_kv", RECURSION_KV)
        _choice(self, "recursion_inference", RECURSION_INFERENCE)
        _choice(self, "recursion_scorer", RECURSION_SCORERS)
        _choice(self, "recursion_execution", RECURSION_EXECUTIONS)
        if self.recursion == "mor" and self.recursion_execution == "gather" and not self.can_gather_recursions:
            raise ValueError("recursion_execution='gather' needs attention='mha' without sliding_window, ALiBi or "
                             "T5 bias (their masks are written in relative positions); use 'auto' or 'masked'")
        _positive(self, "max_recursions")
        if self.recursion == "mor" and self.recursion_scorer == "graph" and self.router_rounds < 1:
            raise ValueError(f"recursion_scorer='graph' needs router_rounds >= 1 (its message-passing rounds), "
                             f"got router_rounds={self.router_rounds}")
        if not self.recursion_gate_scale > 0:
            raise ValueError(f"recursion_gate_scale={self.recursion_gate_scale} must be > 0")
        if self.recursion_aux_loss_coef < 0:
            raise ValueError(f"recursion_aux_loss_coef={self.recursion_aux_loss_coef} must be >= 0")
        if self.recursion == "mor" and self.recursion_sharing == "middle-cycle" and self.n_layers < 3:
            raise ValueError(f"recursion_sharing='middle-cycle' needs n_layers >= 3 (a unique first and last "
                             f"block around a shared middle), got n_layers={self.n_layers}")

    def _validate_experts(self) -> None:
        if not 0 <= self.n_dense_layers < self.n_layers:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} must be in [0, n_layers={self.n_layers}) "
                             "(all layers dense is ffn='dense')")
        _positive(self, "n_experts", "top_k_experts", "n_subtokens", "n_expert_groups", "top_k_expert_groups")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"routed_scaling_factor={self.routed_scaling_factor} must be > 0")
        if self.shared_expert_hidden is not None and self.shared_expert_hidden < 1:
            raise ValueError(f"shared_expert_hidden={self.shared_expert_hidden} must be >= 1")
        if (self.shared_expert_gate or self.shared_expert_hidden is not None) and not self.n_shared_experts:
            raise ValueError("shared_expert_gate / shared_expert_hidden need n_shared_experts >= 1")
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
        if self.n_expert_groups > 1:
            per_group, groups = self.n_routed_experts // self.n_expert_groups, self.n_expert_groups
            if self.n_routed_experts % groups or per_group < 2:
                raise ValueError(f"n_expert_groups={groups} must divide n_routed_experts={self.n_routed_experts} "
                                 "into groups of at least 2 (a group's score is its top-2 sum)")
            if not self.top_k_expert_groups <= groups or self.top_k_expert_groups * per_group < self.top_k_experts:
                raise ValueError(f"top_k_expert_groups={self.top_k_expert_groups} must be <= n_expert_groups={groups} "
                                 f"and hold at least top_k_experts={self.top_k_experts} experts")
        if self.expert_peer_graph != "none" and self.ffn != "graph-moe":
            raise ValueError(f"expert_peer_graph={self.expert_peer_graph!r} needs ffn='graph-moe' "
                             f"(got ffn={self.ffn!r}): only the graph router passes messages between experts")
        _check_graph_nodes(self.expert_peer_graph, "expert_peer_graph", self.n_routed_experts)
        if self.expert_graph is not None:
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
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}{did_you_mean(unknown[0], known)}")
    return cls(**values)


def did_you_mean(name: str, known) -> str:
    """``"; did you mean 'n_heads'?"`` for the name of ``known`` closest to a mistyped ``name``
    (the whole list would make the error line thousands of characters long)."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return f"; no close match among the {len(known)} known names"


def _positive(cfg: GoHConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name}={getattr(cfg, name)!r} must be a positive integer")


def _choice(cfg: GoHConfig, name: str, allowed: tuple) -> None:
    if getattr(cfg, name) not in allowed:
        raise ValueError(f"{name}={getattr(cfg, name)!r} is not one of {list(allowed)}")


def _check_graph_nodes(spec: HeadGraphSpec, name: str, n_nodes: int) -> None:
    if isinstance(spec, str):
        return
    for src, dst in spec:
        if not (0 <= src < n_nodes and 0 <= dst < n_nodes):
            raise ValueError(f"{name} edge {[src, dst]} names a node outside 0..{n_nodes - 1}")
        if src == dst:
            raise ValueError(f"{name} edge {[src, dst]} is a self-loop; self-loops are implicit")


# ---------------------------------------------------------------------- the one typed parser
_TRUE, _FALSE = ("true", "1"), ("false", "0")
_NONE = ("none", "null")
_INT_TEXT = re.compile(r"^[+-]?\d+$")


def parse_fields(config: Any, owner: str = "") -> None:
    """Parse every field of the dataclass ``config`` in place with :func:`parse_typed`.

    ``owner`` prefixes the field in error messages (``"TrainConfig."``).
    """
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        setattr(config, item.name, parse_typed(f"{owner}{item.name}", value, hints[item.name]))


def parse_typed(name: str, value: Any, annotation: Any) -> Any:
    """``value`` as the type ``annotation`` names, or a ``ValueError`` naming field, value and type.

    The same rules whatever the value came from (Python argument, CLI flag, ``--set``, YAML/JSON,
    a saved config.json), so the three paths agree:

    * ``bool``: ``True``/``False``, or ``"true"``/``"false"``/``"1"``/``"0"``/``1``/``0``
      (case-insensitive); never a truthy string such as ``"False"`` taken as true;
    * ``int``: an int or a string of digits (never a bool, a float or ``"2.5"``);
    * ``float``: a finite float, an int, or a string of one;
    * ``str``: a string;
    * ``Optional[...]``: ``None`` or ``"none"``/``"null"``, else the inner type;
    * ``Any``: unchanged (the field's own validation checks it).
    """
    if typing.get_origin(annotation) is Union:
        inner = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        annotation = inner[0] if len(inner) == 1 else Any
    if annotation is bool:
        return _parse_bool(name, value)
    if annotation is int:
        return _parse_int(name, value)
    if annotation is float:
        return _parse_float(name, value)
    if annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{name}={value!r} must be a string")
        return value
    return value


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else value if type(value) is int else None
    if text in _TRUE or text == 1:
        return True
    if text in _FALSE or text == 0:
        return False
    raise ValueError(f"{name}={value!r} must be True or False (or one of true/false/1/0)")


def _parse_int(name: str, value: Any) -> int:
    if type(value) is int:
        return value
    if isinstance(value, str) and _INT_TEXT.match(value.strip()):
        return int(value.strip())
    raise ValueError(f"{name}={value!r} must be an integer")


def _parse_float(name: str, value: Any) -> float:
    number = None
    if type(value) in (int, float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return number
