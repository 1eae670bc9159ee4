"""The order that puts the selected entries of a mask first: how every gathered kernel packs its rows."""

from __future__ import annotations

import torch


def selected_first(selected: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices along ``dim`` of the bool mask ``selected`` with its ``True`` entries first, in their
    order, then the ``False`` ones, in theirs (a stable sort): the first ``n`` are the selected
    positions, padded to ``n`` with unselected ones where fewer than ``n`` are selected.

    Shapes: ``selected [..., L, ...]`` -> ``[..., L, ...]`` (long), ``L`` the size of ``dim``.
    """
    return torch.sort((~selected).to(torch.uint8), dim=dim, stable=True).indices
