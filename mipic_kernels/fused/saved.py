"""What the forward kernels hand to the backward kernels, and its shapes for the fake
(meta) implementations of the custom ops."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .stats import N_STATS


class Saved(NamedTuple):
    """The forward pass's intermediates that the backward pass reuses (all fp32)."""

    grams: torch.Tensor     # (B, S, k, k) shifted Grams of every column prefix
    shift: torch.Tensor     # (B, D) column mean subtracted before every Gram
    bw: torch.Tensor        # (B, W, 2) RBF bandwidths s^2 (x side, y side)
    stats: torch.Tensor     # (B, W, N_STATS) HSIC terms and totals
    rowsums: torch.Tensor   # (B, W, 2, k) kernel-matrix row sums


def fake_saved(x: torch.Tensor, slots: int, widths: int, k_top: int) -> Saved:
    """Empty tensors shaped like the :class:`Saved` of ``x (B, T, D)`` with ``slots``
    Gram slots, ``widths`` entries per example and Gram edge ``k_top``."""
    batch, depth = x.shape[0], x.shape[-1]
    f32 = dict(device=x.device, dtype=torch.float32)
    return Saved(
        torch.empty(batch, slots, k_top, k_top, **f32),
        torch.empty(batch, depth, **f32),
        torch.empty(batch, widths, 2, **f32),
        torch.empty(batch, widths, N_STATS, **f32),
        torch.empty(batch, widths, 2, k_top, **f32),
    )
