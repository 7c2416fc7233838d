"""Eager PyTorch CKA: the ground truth every fast path is held to, and the CPU fallback.

Vectorised over examples, leading dims and widths; differentiable with autograd;
float64 in, float64 arithmetic, otherwise float32 arithmetic. Arguments arrive
validated from :mod:`mipic_kernels.api`.

How an entry is computed (one example, ``n`` selected rows per side):

* Features are shifted by a mean of their rows before any Gram is formed. CKA is
  translation invariant, and the shift removes the common offset of hidden states
  that would otherwise cancel catastrophically in the centred statistics.
* Linear kernel ``K = Z Z^T``; RBF ``K = exp(-D / (2 sigma^2))`` with ``D`` the squared
  distances and, without ``sigma``, ``sigma^2 = threshold^2 * median(D)`` over all
  ``n * n`` entries (numpy's median), detached.
* Biased HSIC ``<HKH, HLH>``; unbiased HSIC ``<U(K), U(L)>`` with ``U`` the U-centring,
  equal to Song et al.'s formula times ``n (n - 3)``, a factor that cancels in CKA.

An entry is undefined, and NaN, when it has fewer than 2 rows (4 unbiased) or either
side has no variance: its rows coincide to working precision
(``sum_i |z_i - mean|^2 <= n eps sum_i |z_i|^2``), its RBF median bandwidth is zero
(more than half of the row pairs coincide), or its self-HSIC is not above
``(n eps)^2`` times its scale (``spread^2`` linear, ``n^2`` RBF): the unbiased
self-HSIC is zero for some spread-out sets too, e.g. one token away from three that
coincide. ``eps`` is the machine epsilon of the arithmetic dtype. The rule is
:func:`mipic_kernels.rules.defined_entries`, shared with the fused backend.
Gradients stay finite everywhere.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .rules import cka_value, defined_entries, segment_bounds
from .selection import accumulation_dtype


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    *,
    kernel: str,
    unbiased: bool,
    sigma: Optional[float],
    rbf_threshold: float,
    precision: str = "ieee",
) -> torch.Tensor:
    """CKA of the masked rows of ``x (*, n, p)`` and ``y (*, n, q)``; returns ``(*)``.
    ``precision`` is the fused backend's switch; the reference always computes in its
    accumulation dtype."""
    dtype = accumulation_dtype(x.dtype)
    rows = mask.to(dtype)
    gx, size_x = _centred_gram(x.to(dtype), rows)
    gy, size_y = _centred_gram(y.to(dtype), rows)
    return cka_from_grams(
        gx, gy, rows, size_x, size_y,
        kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold,
    )


def nested_cka_ranked(
    x: torch.Tensor,
    dims: tuple[int, ...],
    order: torch.Tensor,
    k: torch.Tensor,
    k_top: int,
    *,
    kernel: str,
    unbiased: bool,
    sigma: Optional[float],
    rbf_threshold: float,
    detach_full: bool,
    precision: str = "ieee",
) -> torch.Tensor:
    """CKA of each width prefix against the full width over its top-``k`` tokens.

    ``x (*, T, D)``; ``order (*, T)`` positions best first; ``k (*, W)`` token counts,
    each at most ``k_top``, the edge of the Grams. Returns ``(*, W)``. ``precision`` as
    in :func:`cka` (unused here).
    """
    dtype = accumulation_dtype(x.dtype)
    depth = x.shape[-1]
    index = order[..., :k_top, None].expand(*order.shape[:-1], k_top, depth)
    sel = torch.gather(x, -2, index).to(dtype)

    # Shift by the mean of each example's widest token set; the narrower sets'
    # means differ from it by a fraction of the spread, not by the offset.
    used = (torch.arange(k_top, device=x.device) < k.max(-1).values[..., None]).to(dtype)
    shift = (sel * used[..., None]).sum(-2, keepdim=True) / used.sum(-1)[..., None, None].clamp(min=1)
    z = (sel - shift) * used[..., None]

    # All prefix Grams from one sweep over the columns: G_d = sum of the block
    # products up to d (the nesting trick), so the cost is that of one full Gram.
    bounds = segment_bounds(dims, depth)
    seg_grams, seg_sq = [], []
    for lo, hi in zip(bounds, bounds[1:]):
        zs = z[..., lo:hi]
        seg_grams.append(zs @ zs.mT)
        seg_sq.append(sel[..., lo:hi].pow(2).sum(-1))
    n_widths = len(dims)
    prefix_gram = torch.cumsum(torch.stack(seg_grams[:n_widths], dim=-3), dim=-3)
    prefix_sq = torch.cumsum(torch.stack(seg_sq[:n_widths], dim=-2), dim=-2)
    full_gram = prefix_gram[..., -1, :, :]
    full_sq = prefix_sq[..., -1, :]
    if len(seg_grams) > n_widths:
        full_gram = full_gram + seg_grams[-1]
        full_sq = full_sq + seg_sq[-1]
    if detach_full:
        full_gram = full_gram.detach()

    rows = (torch.arange(k_top, device=x.device) < k[..., None]).to(dtype)
    size_x = (prefix_sq * rows).sum(-1)
    size_y = (full_sq[..., None, :] * rows).sum(-1)
    full = full_gram[..., None, :, :].expand_as(prefix_gram)
    return cka_from_grams(
        prefix_gram, full, rows, size_x.detach(), size_y.detach(),
        kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold,
    )


def cka_from_grams(
    gx: torch.Tensor,
    gy: torch.Tensor,
    rows: torch.Tensor,
    size_x: torch.Tensor,
    size_y: torch.Tensor,
    *,
    kernel: str,
    unbiased: bool,
    sigma: Optional[float],
    rbf_threshold: float,
) -> torch.Tensor:
    """CKA from two stacks of linear Grams of shifted features.

    ``gx, gy (..., n, n)``: Grams ``Z Z^T`` of features shifted by any common vector;
    ``rows (..., n)``: 1 for the rows of each entry, 0 for ignored rows;
    ``size_x, size_y (...)``: sum of squared norms of the unshifted rows, the scale
    against which "no variance" is judged. Returns ``(...)`` with NaN where undefined.
    """
    n = rows.sum(-1)
    pair = rows[..., :, None] * rows[..., None, :]
    kx, spread_x, ok_x = _kernel_matrix(gx, rows, pair, n, kernel, sigma, rbf_threshold)
    ky, spread_y, ok_y = _kernel_matrix(gy, rows, pair, n, kernel, sigma, rbf_threshold)
    a, b, c = _hsic_terms(kx, ky, pair, n, unbiased)
    defined = defined_entries(
        n, spread_x, spread_y, size_x, size_y, b, c, ok_x & ok_y, kernel=kernel, unbiased=unbiased
    )
    return cka_value(a, b, c, defined)


def _centred_gram(z: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    count = rows.sum(-1)[..., None, None].clamp(min=1)
    mean = (z * rows[..., None]).sum(-2, keepdim=True) / count
    zc = (z - mean) * rows[..., None]
    size = (z.pow(2) * rows[..., None]).sum((-2, -1))
    return zc @ zc.mT, size.detach()


def _kernel_matrix(
    gram: torch.Tensor,
    rows: torch.Tensor,
    pair: torch.Tensor,
    n: torch.Tensor,
    kernel: str,
    sigma: Optional[float],
    rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked kernel matrix, the spread ``sum_i |z_i - mean|^2`` and a usable-bandwidth flag."""
    sq = torch.diagonal(gram, dim1=-2, dim2=-1)
    n_safe = n.clamp(min=1)
    with torch.no_grad():
        spread = (sq * rows).sum(-1) - (gram * pair).sum((-2, -1)) / n_safe
    if kernel == "linear":
        return gram * pair, spread, torch.ones_like(n, dtype=torch.bool)
    dist = (sq[..., :, None] + sq[..., None, :] - 2 * gram).clamp(min=0)
    off_diagonal = 1 - torch.eye(dist.shape[-1], dtype=dist.dtype, device=dist.device)
    dist = dist * off_diagonal * pair
    if sigma is not None:
        bandwidth = torch.full_like(n, sigma * sigma)
    else:
        bandwidth = rbf_threshold**2 * _masked_median(dist.detach(), pair, n)
    ok = (bandwidth > 0) & torch.isfinite(bandwidth)
    bandwidth = torch.where(ok, bandwidth, torch.ones_like(bandwidth))
    k = torch.exp(-dist / (2 * bandwidth[..., None, None])) * pair
    return k, spread, ok


def _masked_median(values: torch.Tensor, pair: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """numpy's median (mean of the two middle values) of the ``n * n`` selected entries."""
    flat = torch.where(pair > 0, values, torch.full_like(values, math.inf)).flatten(-2)
    ordered = torch.sort(flat, dim=-1).values
    count = (n * n).to(torch.int64)
    lo = ((count - 1) // 2).clamp(min=0)[..., None]
    hi = (count // 2).clamp(max=flat.shape[-1] - 1)[..., None]
    return 0.5 * (ordered.gather(-1, lo) + ordered.gather(-1, hi)).squeeze(-1)


def _hsic_terms(
    kx: torch.Tensor, ky: torch.Tensor, pair: torch.Tensor, n: torch.Tensor, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``HSIC(K, L), HSIC(K, K), HSIC(L, L)`` of masked kernel matrices.

    Both estimators centre first and take inner products after (double centring, or
    U-centring for the unbiased one, which equals Song et al.'s formula): products of
    centred matrices lose far less to cancellation than the expanded sums, and a
    self-HSIC stays a sum of squares, never negative.
    """
    if unbiased:
        centre, n_safe = _u_centre, torch.where(n >= 4, n, torch.full_like(n, 4))
    else:
        centre, n_safe = _double_centre, n.clamp(min=1)
    kc = centre(kx, pair, n_safe)
    lc = centre(ky, pair, n_safe)
    return (kc * lc).sum((-2, -1)), kc.square().sum((-2, -1)), lc.square().sum((-2, -1))


def _double_centre(k: torch.Tensor, pair: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    row_mean = k.sum(-1) / n[..., None]
    total_mean = row_mean.sum(-1) / n
    centred = k - row_mean[..., :, None] - row_mean[..., None, :] + total_mean[..., None, None]
    return centred * pair


def _u_centre(k: torch.Tensor, pair: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Székely and Rizzo's U-centring: ``<U(K), U(L)> / (n (n - 3))`` is the unbiased HSIC."""
    off_diagonal = 1 - torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
    kt = k * off_diagonal
    row = kt.sum(-1) / (n[..., None] - 2)
    total = kt.sum((-2, -1)) / ((n - 1) * (n - 2))
    centred = kt - row[..., :, None] - row[..., None, :] + total[..., None, None]
    return centred * off_diagonal * pair
