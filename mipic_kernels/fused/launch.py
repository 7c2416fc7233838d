"""Forward and backward of the two operations on 3-d inputs, built from the kernels.

Everything here works on flattened inputs (leading dims folded into one batch dim)
and returns the intermediates the backward pass needs; :mod:`mipic_kernels.fused.ops`
wraps these functions as custom ops.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .backward import coefficients, input_grad
from .gram import nested_grams
from .stats import B, C, bandwidths, cka_values, defined_entries, hsic_stats


class Saved(NamedTuple):
    """What the forward pass hands to the backward pass (all fp32)."""

    grams: torch.Tensor     # (B, S, k, k) shifted Grams of every column prefix
    shift: torch.Tensor     # (B, D) column mean subtracted before every Gram
    bw: torch.Tensor        # (B, W, 2) RBF bandwidths s^2 (x side, y side)
    stats: torch.Tensor     # (B, W, N_STATS) HSIC terms and totals
    rowsums: torch.Tensor   # (B, W, 2, k) kernel-matrix row sums


def _segment_bounds(dims: tuple[int, ...], depth: int) -> tuple[int, ...]:
    return (0, *dims) + ((depth,) if dims[-1] < depth else ())


def _finish(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor,
    *, kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CKA of every entry from its Gram views; ``sq_*`` are running squared row norms."""
    bw = bandwidths(gx, gy, n, kernel=kernel, sigma=sigma, rbf_threshold=rbf_threshold)
    stats, rowsums = hsic_stats(gx, gy, n, bw, kernel=kernel, unbiased=unbiased)
    rows = (torch.arange(gx.shape[-1], device=n.device) < n[..., None]).to(torch.float32)
    defined = defined_entries(
        stats, n, bw, (sq_x * rows).sum(-1), (sq_y * rows).sum(-1), kernel=kernel, unbiased=unbiased
    )
    return cka_values(stats, defined), bw, stats, rowsums


def _k_top(counts: torch.Tensor) -> int:
    return max(int(counts.max()) if counts.numel() else 1, 1)


def nested_forward(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: tuple[int, ...], *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, Saved]:
    """``x (B, T, D)``, ``order (B, T)``, ``k (B, W)`` -> CKA ``(B, W)`` and intermediates."""
    batch, _, depth = x.shape
    widths = len(dims)
    k_top = _k_top(k)
    grams, sq, shift = nested_grams(x, order, k.amax(-1), _segment_bounds(dims, depth), k_top)
    gy = grams[:, -1:].expand(batch, widths, k_top, k_top)
    value, bw, stats, rowsums = _finish(
        grams[:, :widths], gy, k, sq[:, :widths], sq[:, -1:], kernel=kernel, unbiased=unbiased,
        sigma=sigma, rbf_threshold=rbf_threshold,
    )
    return value, Saved(grams, shift, bw, stats, rowsums)


def _scale(grad: torch.Tensor, value: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``grad / sqrt(b c)`` at defined entries, 0 at undefined ones (whatever grad holds)."""
    defined = torch.isfinite(value)
    denom = torch.sqrt(torch.where(defined, stats[..., B] * stats[..., C], torch.ones_like(value)))
    return torch.where(defined, grad.to(torch.float32) / denom, torch.zeros_like(value))


def nested_backward(
    grad: torch.Tensor, x: torch.Tensor, order: torch.Tensor, k: torch.Tensor,
    dims: tuple[int, ...], value: torch.Tensor, saved: Saved, *,
    kernel: str, unbiased: bool, detach_full: bool,
) -> torch.Tensor:
    """Gradient wrt ``x (B, T, D)`` of ``sum(grad * value)``."""
    batch, _, depth = x.shape
    widths = len(dims)
    k_top = saved.grams.shape[-1]
    gy = saved.grams[:, -1:].expand(batch, widths, k_top, k_top)
    coef = coefficients(
        saved.grams[:, :widths], gy, k, saved.bw, saved.stats, saved.rowsums,
        _scale(grad, value, saved.stats), kernel=kernel, unbiased=unbiased, full_grad=not detach_full,
    )
    return input_grad(
        x, order, k.amax(-1), saved.shift, _segment_bounds(dims, depth), coef,
        n_prefix=widths, full_grad=not detach_full,
    )


def cka_forward(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, Saved, Saved]:
    """``x (B, n, p)``, ``y (B, n, q)``, ``order (B, n)`` real rows first, ``n (B)`` counts
    -> CKA ``(B)``, the x-side intermediates and the y side's Grams and shift."""
    k_top = _k_top(n)
    gx, sq_x, shift_x = nested_grams(x, order, n, (0, x.shape[-1]), k_top)
    gy, sq_y, shift_y = nested_grams(y, order, n, (0, y.shape[-1]), k_top)
    value, bw, stats, rowsums = _finish(
        gx, gy, n[:, None], sq_x, sq_y, kernel=kernel, unbiased=unbiased,
        sigma=sigma, rbf_threshold=rbf_threshold,
    )
    return value[:, 0], Saved(gx, shift_x, bw, stats, rowsums), Saved(gy, shift_y, bw, stats, rowsums)


def cka_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor,
    value: torch.Tensor, sx: Saved, sy: Saved, *, kernel: str, unbiased: bool,
    need_x: bool, need_y: bool,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients wrt ``x`` and ``y`` of ``sum(grad * value)``, each only where needed."""
    # The y side's coefficient is the "full-width" slot of the coefficient kernel.
    coef = coefficients(
        sx.grams, sy.grams, n[:, None], sx.bw, sx.stats, sx.rowsums,
        _scale(grad[:, None], value[:, None], sx.stats), kernel=kernel, unbiased=unbiased,
        full_grad=need_y,
    )
    dx = dy = None
    if need_x:
        dx = input_grad(x, order, n, sx.shift, (0, x.shape[-1]), coef, n_prefix=1, full_grad=False)
    if need_y:
        dy = input_grad(y, order, n, sy.shift, (0, y.shape[-1]), coef[:, 1:], n_prefix=1, full_grad=False)
    return dx, dy
