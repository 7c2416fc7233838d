"""The rules every backend shares, written once: the column segments of the nested
widths and when a CKA entry is defined (and its value then).

Torch only: imported by :mod:`mipic_kernels.reference` and by the fused backend
(the segments). The fused backend's epilogue kernel
(:func:`mipic_kernels.fused.stats._values_kernel`) applies :func:`defined_entries`
and :func:`cka_value` operation for operation in fp32, in one launch; the
interpreter tests hold its NaN positions equal to these functions' on statistics at
every threshold, so the two backends agree on which entries are NaN.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch


def segment_bounds(dims: Sequence[int], depth: int) -> tuple[int, ...]:
    """Column bounds ``(0, d_1, ..., d_W)``, plus ``D`` when ``d_W < D``: segment ``s``
    is the columns ``[bounds[s], bounds[s + 1])``, and the prefix Gram of width
    ``d_s`` is the sum of the Grams of segments ``0 .. s - 1``."""
    return (0, *dims) + ((depth,) if dims[-1] < depth else ())


def defined_entries(
    n: torch.Tensor,
    spread_x: torch.Tensor,
    spread_y: torch.Tensor,
    size_x: torch.Tensor,
    size_y: torch.Tensor,
    hsic_xx: torch.Tensor,
    hsic_yy: torch.Tensor,
    bandwidth_ok: torch.Tensor,
    *,
    kernel: str,
    unbiased: bool,
) -> torch.Tensor:
    """Which entries are defined (bool, the broadcast shape of the arguments).

    ``n``: token count (a floating tensor of the arithmetic dtype, whose machine
    epsilon ``eps`` sets the tolerance); ``spread_*``: ``sum_i |z_i - mean|^2`` of each
    side; ``size_*``: ``sum_i |x_i|^2`` of the unshifted rows, the scale against which
    "no variance" is judged; ``hsic_xx``, ``hsic_yy``: the self-HSIC of each side;
    ``bandwidth_ok``: both RBF bandwidths are positive and finite (True for linear).

    An entry is defined when it has at least 2 rows (4 unbiased), usable bandwidths,
    spread above ``n eps`` times its size on each side, and self-HSIC above
    ``(n eps)^2`` times its scale (``spread^2`` linear, ``n^2`` RBF).
    """
    with torch.no_grad():
        tol = n * torch.finfo(spread_x.dtype).eps
        scale_x = spread_x.square() if kernel == "linear" else n.square()
        scale_y = spread_y.square() if kernel == "linear" else n.square()
        return (
            (n >= (4 if unbiased else 2))
            & bandwidth_ok
            & (spread_x > tol * size_x) & (spread_y > tol * size_y)
            & (hsic_xx > tol.square() * scale_x) & (hsic_yy > tol.square() * scale_y)
        )


def cka_value(
    hsic_xy: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor, defined: torch.Tensor
) -> torch.Tensor:
    """``hsic_xy / sqrt(hsic_xx hsic_yy)`` where defined, NaN elsewhere; the gradient
    is zero (never NaN) at undefined entries."""
    one = torch.ones_like(hsic_xy)
    denom = torch.sqrt(torch.where(defined, hsic_xx, one) * torch.where(defined, hsic_yy, one))
    value = torch.where(defined, hsic_xy, torch.zeros_like(hsic_xy)) / denom
    return torch.where(defined, value, torch.full_like(value, math.nan))
