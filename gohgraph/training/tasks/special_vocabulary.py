"""What the mlm, classify and seq2seq tasks share: presets, and a vocabulary of the data's
tokenizer followed by special tokens (:class:`~gohgraph.data.objectives.SpecialTokens`).

The presets are the encoder family's (``seq2seq`` adds as many decoder layers). RoPE, not
sinusoids: Vaswani's table has amplitude 1 against token embeddings of std ``init_std`` (0.02), so
without his ``sqrt(d_model)`` embedding scale the positions swamp token identity; the default MLM
run ended at 3.68 nats with sinusoids (above the 3.25 unigram entropy), 3.11 with a learned table
and 2.44 with RoPE (docs/encoder.md).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ...config import GoHConfig
from ...data.objectives import SpecialTokens
from ..config import TrainConfig
from .base import PresetPair

_ROUTED = dict(router="graph", router_rounds=2, head_graph="complete", inter_head_flow=True,
               position_embedding="rope", mlp="gelu-exact", norm="layer")
_TRAIN = dict(weight_decay=0.01)
# name -> (model sizes, train settings); tiny is what the objectives have always trained
_SIZES: Dict[str, PresetPair] = {
    "tiny": (dict(d_model=128, n_layers=2, n_heads=4, n_shared_heads=1, top_k_heads=2, router_dim=8,
                  max_seq_len=128),
             dict(batch_size=16, seq_len=128, lr=2e-3, warmup_steps=20, max_steps=300, eval_every=100,
                  eval_batches=50)),
    "small": (dict(d_model=256, n_layers=4, n_heads=8, n_shared_heads=2, top_k_heads=4, router_dim=16,
                   max_seq_len=256),
              dict(batch_size=16, seq_len=256, lr=1.5e-3, warmup_steps=50, max_steps=2000, eval_every=200,
                   eval_batches=16, save_every=500)),
    "base": (dict(d_model=768, n_layers=12, n_heads=12, n_shared_heads=4, top_k_heads=4, router_dim=32,
                  max_seq_len=512),
             dict(batch_size=32, seq_len=512, lr=6e-4, warmup_steps=500, max_steps=20000, eval_every=1000,
                  eval_batches=50, save_every=1000)),
}


def encoder_presets(model_extra: Optional[Dict[str, Any]] = None,
                    train_extra: Optional[Dict[str, Any]] = None) -> Dict[str, PresetPair]:
    """``tiny``, ``small`` and ``base`` of the encoder family, each with ``model_extra`` and
    ``train_extra`` (a task's head, its sequence length) on top."""
    return {name: (dict(model_type="encoder", **_ROUTED, **sizes, **(model_extra or {})),
                   dict(_TRAIN, **train, **(train_extra or {})))
            for name, (sizes, train) in _SIZES.items()}


def one_data_path(settings: Dict[str, Any], task: str) -> Optional[str]:
    """The one ``--data`` path of an objective with special tokens (``None``: the default data)."""
    if settings.get("sources"):
        raise ValueError(f"--objective {task} reads one --data path (a file, directory or glob); named sources "
                         "(NAME=PATH) are for --objective lm")
    return settings.get("data")


def check_special_vocabulary(cfg: GoHConfig, special: SpecialTokens, longest: int, task: str) -> None:
    """Refuse a model whose vocabulary is not the data's tokens and ``special`` tokens, or that
    cannot read ``longest`` tokens."""
    if cfg.vocab_size != special.vocab_size:
        raise ValueError(f"vocab_size={cfg.vocab_size}, but --objective {task} reads {special.base} data tokens and "
                         f"its special tokens: {special.vocab_size} ids")
    if longest > cfg.max_seq_len:
        raise ValueError(f"--objective {task} reads {longest} tokens per sequence (seq_len) but max_seq_len="
                         f"{cfg.max_seq_len}")


def fit_special_vocabulary(cfg: GoHConfig, special: SpecialTokens, tc: TrainConfig, task: str, continued,
                           longest: int) -> GoHConfig:
    """``cfg`` with the vocabulary of the data's tokenizer and ``special`` tokens, and positions for
    ``longest`` tokens. A continued model (``--init-from``, or the run being resumed) keeps its
    sizes: they must fit."""
    if continued is not None:
        if cfg.vocab_size != special.vocab_size:
            raise ValueError(f"the model at {continued} has vocab_size {cfg.vocab_size}; --objective {task} reads "
                             f"{special.base} data tokens and its special tokens ({special.vocab_size} ids): pass "
                             "the --tokenizer it was trained with")
        if longest > cfg.max_seq_len:
            raise ValueError(f"--seq-len {tc.seq_len} is longer than the model at {continued} can read "
                             f"(max_seq_len {cfg.max_seq_len})")
        return cfg
    return cfg.replace(vocab_size=special.vocab_size, max_seq_len=max(cfg.max_seq_len, longest))
