"""What every model of the family shares: the weighted routing loss, routing upkeep, checkpoints.

:class:`RoutedModel` is a mixin of :class:`~gohgraph.GoHTransformer`, :class:`~gohgraph.GoHEncoder`
and :class:`~gohgraph.GoHSeq2Seq`; each holds ``self.config`` and returns its layers' routing records.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, List, Optional, Tuple, Union

import torch

from ..config import GoHConfig
from ..routers.heads import HeadGate
from ..routers.losses import (
    EXPERT_BALANCE,
    HEAD_BALANCE,
    BalancedRouting,
    global_balance_loss,
    loss_coefficients,
    pooled_balance_loss,
)
from ..routing import LayerRouting, RecursionRouting
from ..storage import load_model, save_model


def global_batch_kinds(cfg: GoHConfig) -> Tuple[str, ...]:
    """The balance losses pooled over the global batch (``*_balance_pooling="global-batch"``)."""
    return tuple(name for name, pooling in ((HEAD_BALANCE, cfg.head_balance_pooling),
                                            (EXPERT_BALANCE, cfg.expert_balance_pooling))
                 if pooling == "global-batch")


def weighted_aux_loss(cfg: GoHConfig, routing: List[LayerRouting], like: torch.Tensor,
                      recursion: Optional[RecursionRouting] = None, leave_out_global: bool = False) -> torch.Tensor:
    """``sum_layers sum_losses coef * loss`` over the records (0 for dense models), float32 scalar,
    plus Mixture-of-Recursions' router losses (``recursion``); with ``expert_balance_pooling="model"``
    the expert balance loss is pooled over all layers first. A ``"global-batch"`` balance loss
    counts this batch alone (as ``"layer"``), or is left out with ``leave_out_global`` (for
    :func:`global_batch_balance_loss` to add over the whole optimizer step)."""
    coefficients = loss_coefficients(cfg)
    pooled = cfg.expert_balance_pooling == "model"
    left_out = global_batch_kinds(cfg) if leave_out_global else ()
    total = like.new_zeros((), dtype=torch.float32)
    if recursion is not None:
        for name, value in recursion.aux_losses.items():
            total = total + coefficients[name] * value
    for layer in routing:
        for name, value in layer.aux_losses.items():
            if not (pooled and name == EXPERT_BALANCE) and name not in left_out:
                total = total + coefficients[name] * value
    tallies = [layer.experts.balance for layer in routing
               if layer.experts is not None and layer.experts.balance is not None]  # none while decoding
    if pooled and tallies:
        total = total + coefficients[EXPERT_BALANCE] * pooled_balance_loss(tallies)
    return total


def global_batch_balance_loss(cfg: GoHConfig, micro_batches: List[List[LayerRouting]],
                              all_reduce: Optional[Callable[[torch.Tensor], None]] = None,
                              world_size: int = 1) -> torch.Tensor:
    """The weighted ``"global-batch"`` balance losses of one optimizer step, this rank's share.

    ``micro_batches``: the routing records of every micro-batch this rank ran in the step (the
    same layers each time); ``all_reduce`` sums a tensor over the ``world_size`` data-parallel
    ranks. Per layer and kind (head, expert), counts and probabilities are pooled over all of them
    before the product (:func:`~gohgraph.routers.losses.global_balance_loss`); the mean over ranks
    of what this returns, and of its gradient, is the loss of the one big batch. Every rank must
    call it (a collective), also when it has no tally. 0 without ``"global-batch"`` pooling.
    """
    coefficients = loss_coefficients(cfg)
    kinds = global_batch_kinds(cfg)
    total = torch.zeros((), dtype=torch.float32)
    if not kinds or not micro_batches:
        return total
    for index in range(len(micro_batches[0])):
        records = [routing[index] for routing in micro_batches]
        for name in kinds:
            if name == HEAD_BALANCE:
                tallies = [record.head_balance for record in records]
            else:
                tallies = [None if record.experts is None else record.experts.balance for record in records]
            if any(t is None for t in tallies):  # an unrouted layer (the same on every rank)
                continue
            loss = global_balance_loss(tallies, all_reduce, world_size)
            total = total.to(loss.device) + coefficients[name] * loss
    return total


class RoutedModel:
    """Routing upkeep and checkpoint methods for a ``nn.Module`` with a ``config`` attribute."""

    config: GoHConfig

    def update_routing_biases(self) -> None:
        """Apply auxiliary-loss-free bias updates in every layer; call after ``optimizer.step()``."""
        for module in self.modules():
            if isinstance(module, BalancedRouting):
                module.update_bias()

    def set_dense_blend(self, value: float) -> None:
        """Blend every routed layer's head gates toward dense attention (MoH-style continue-tuning).

        ``1.0``: every head on with gate 1 (a converted model computes its dense source exactly);
        ``0.0`` (the default): the configured top-k routing. Dense-router layers have no gates.
        """
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"dense_blend={value} must be in [0, 1]")
        for module in self.modules():
            if isinstance(module, HeadGate):
                module.dense_blend.fill_(float(value))

    def set_execution(self, head_execution: Optional[str] = None, recursion_execution: Optional[str] = None) -> None:
        """Switch how routing runs (docs/skipping-work.md) without touching a weight: ``head_execution`` in
        ``"auto" | "masked" | "sparse"``, ``recursion_execution`` in ``"auto" | "masked" | "gather"``.
        The config records the choice, so a saved model keeps it."""
        for name, value in (("head_execution", head_execution), ("recursion_execution", recursion_execution)):
            if value is None:
                continue
            # validated by the config's own check, so the message names the field and the choices
            self.config = dataclasses.replace(self.config, **{name: value})
            for module in self.modules():
                if module is not self and hasattr(module, name):
                    setattr(module, name, value)

    def _set_decoding(self, decoding: bool) -> None:
        """Tell balanced routers a decoding loop runs (they skip their training losses and tallies)."""
        for module in self.modules():
            if isinstance(module, BalancedRouting):
                module.set_decoding(decoding)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write ``config.json`` and ``model.safetensors`` into ``directory`` (atomically)."""
        return save_model(self, directory)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], map_location: str = "cpu"):
        """Load a model written by :meth:`save_pretrained`; mismatches raise ``CheckpointError``."""
        return load_model(directory, cls, map_location=map_location)
