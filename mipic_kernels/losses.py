"""``nn.Module`` losses built on the functional API."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from .api import _check_dims, nested_cka
from .selection import ScoresSpec

REDUCTIONS = ("mean", "sum")


class NestedCKALoss(nn.Module):
    """``sum_i w_i * reduce(1 - CKA_i)`` over the nested widths ``dims``.

    ``reduce`` is the mean (or sum) over every defined entry of the leading dims (e.g.
    layers x batch); undefined entries (see :func:`mipic_kernels.nested_cka`) are left
    out, a width with none defined contributes 0, and the loss and its gradients are
    always finite.

    Args:
        dims: strictly increasing widths.
        weights: one non-negative weight per width (default 1 each).
        reduction: ``"mean"`` or ``"sum"`` over the defined entries of each width.
        **options: any keyword of :func:`mipic_kernels.nested_cka` (``k``, ``k_min``,
            ``kernel``, ``unbiased``, ``sigma``, ``rbf_threshold``, ``detach_full``,
            ``backend``).
    """

    def __init__(
        self,
        dims: Sequence[int],
        weights: Optional[Sequence[float]] = None,
        reduction: str = "mean",
        **options: Any,
    ) -> None:
        super().__init__()
        self.dims = _check_dims(dims, depth=None)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        if weights is None:
            weights = [1.0] * len(self.dims)
        weights = [float(w) for w in weights]
        if len(weights) != len(self.dims) or any(not w >= 0 or w == float("inf") for w in weights):
            raise ValueError(
                f"weights must be {len(self.dims)} finite non-negative floats, one per width; got {weights!r}"
            )
        forbidden = {"dims", "scores", "mask"} & set(options)
        if forbidden:
            raise TypeError(f"NestedCKALoss options must not include {sorted(forbidden)}: pass them to forward")
        self.reduction = reduction
        self.options = dict(options)
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float64), persistent=False)

    def per_width(
        self, x: torch.Tensor, scores: ScoresSpec = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """``reduce(1 - CKA_i)`` for each width, ``(len(dims),)``, unweighted."""
        values = nested_cka(x, self.dims, scores=scores, mask=mask, **self.options)
        defined = ~torch.isnan(values)
        gaps = torch.where(defined, 1 - values, torch.zeros_like(values))
        gaps = gaps.flatten(0, -2) if gaps.dim() > 1 else gaps[None]
        total = gaps.sum(0)
        if self.reduction == "sum":
            return total
        count = defined.reshape(-1, len(self.dims)).sum(0)
        return total / count.clamp(min=1)

    def forward(
        self, x: torch.Tensor, scores: ScoresSpec = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The weighted loss (a scalar) for token states ``x (*, T, D)``."""
        gaps = self.per_width(x, scores=scores, mask=mask)
        return (gaps * self.weights.to(gaps)).sum()

    def extra_repr(self) -> str:
        return f"dims={self.dims}, reduction={self.reduction!r}, options={self.options}"
