"""Centred HSIC statistics of every (width, token count) block, and the CKA they give.

One program per (example, width) streams its ``n x n`` leading blocks of the two
Grams in row blocks of ``BM`` rows (all ``KP >= n`` columns at once), forms the
kernel matrices on the fly (linear: the Gram itself; RBF: ``exp(-dist / (2 s^2))``
with ``dist`` from the Gram) and reduces them to scalars. The centred matrices are
never written to memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..rules import cka_value, defined_entries
from .tl_utils import centred_tile, distance_tile, load_gram_tile, load_kernel_tile


# Elements of one (BM x KP) register tile. With 8 warps the statistics, median and
# coefficient kernels (up to about ten live tiles) compile to at most ~150
# registers per thread without spills on sm_90 (checked with ptxas, KP 16 ... 512).
_TILE_ELEMENTS = 2048
NUM_WARPS = 8

# Columns of the per-(example, width) statistics record, for torch and (as
# constexpr globals) for the kernels.
A, B, C, SPREAD_X, SPREAD_Y, TOTAL_X, TOTAL_Y = range(7)
N_STATS = 7
COL_A, COL_B, COL_C, COL_SPREAD_X, COL_SPREAD_Y, COL_TOTAL_X, COL_TOTAL_Y = (
    tl.constexpr(i) for i in range(N_STATS)
)
ROW = tl.constexpr(N_STATS)


def row_block(k_top: int) -> tuple[int, int]:
    """(BM, KP): rows per block and the padded column count for ``k_top`` columns."""
    kp = max(16, triton.next_power_of_2(k_top))
    return max(1, min(kp, _TILE_ELEMENTS // kp)), kp


@triton.jit
def _stats_kernel(
    gx_ptr, gy_ptr, n_ptr, bw_ptr, out_ptr, rs_ptr,
    W, stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_rsb, stride_rsw, stride_rss,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """Statistics record and kernel row sums of entry ``(b, w)``: its ``n x n`` blocks
    of ``gx[b, w]`` and ``gy[b, w]``, with ``n = n[b, w]``."""
    b = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    n = tl.load(n_ptr + b * W + w).to(tl.int32)
    # Undefined entries (n too small) are masked later; safe n keeps them finite.
    if UNBIASED:
        nf = tl.maximum(n, 4).to(tl.float32)
    else:
        nf = tl.maximum(n, 1).to(tl.float32)
    bwx = tl.load(bw_ptr + (b * W + w) * 2)
    bwy = tl.load(bw_ptr + (b * W + w) * 2 + 1)
    gx = gx_ptr + b * stride_gxb + w * stride_gxw
    gy = gy_ptr + b * stride_gyb + w * stride_gyw
    rs = rs_ptr + b * stride_rsb + w * stride_rsw
    cols = tl.arange(0, KP)
    col_ok = cols < n
    dx_c = tl.load(gx + cols * (stride_gxi + stride_gxj), mask=col_ok, other=0.0)
    dy_c = tl.load(gy + cols * (stride_gyi + stride_gyj), mask=col_ok, other=0.0)

    # Pass 1: row sums and totals of the kernel matrices.
    col_x = tl.zeros([KP], dtype=tl.float32)
    col_y = tl.zeros([KP], dtype=tl.float32)
    raw_x = 0.0
    raw_y = 0.0
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < n
        g1, kx = load_kernel_tile(gx, stride_gxi, stride_gxj, rows, cols, row_ok, col_ok, dx_c, bwx, RBF, UNBIASED)
        g2, ky = load_kernel_tile(gy, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, dy_c, bwy, RBF, UNBIASED)
        raw_x += tl.sum(tl.sum(g1, axis=1), axis=0)
        raw_y += tl.sum(tl.sum(g2, axis=1), axis=0)
        tl.store(rs + rows, tl.sum(kx, axis=1), mask=row_ok)
        tl.store(rs + stride_rss + rows, tl.sum(ky, axis=1), mask=row_ok)
        col_x += tl.sum(kx, axis=0)
        col_y += tl.sum(ky, axis=0)
    t_x = tl.sum(col_x, axis=0)
    t_y = tl.sum(col_y, axis=0)

    # Pass 2: inner products of the centred matrices. Biased: double centring, as the
    # reference does. Unbiased: U-centring, an orthogonal projection, so
    # <U(K), U(L)> equals Song's bracket <U(K), L~>; the centred form avoids the
    # cancellation of the expanded bracket (sum K o L + totals - row sums) in fp32.
    a = 0.0
    bb = 0.0
    c = 0.0
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < n
        valid = row_ok[:, None] & col_ok[None, :]
        _, kx = load_kernel_tile(gx, stride_gxi, stride_gxj, rows, cols, row_ok, col_ok, dx_c, bwx, RBF, UNBIASED)
        _, ky = load_kernel_tile(gy, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, dy_c, bwy, RBF, UNBIASED)
        px = centred_tile(kx, tl.sum(kx, axis=1), col_x, t_x, nf, rows, cols, valid, UNBIASED)
        py = centred_tile(ky, tl.sum(ky, axis=1), col_y, t_y, nf, rows, cols, valid, UNBIASED)
        a += tl.sum(tl.sum(px * py, axis=1), axis=0)
        bb += tl.sum(tl.sum(px * px, axis=1), axis=0)
        c += tl.sum(tl.sum(py * py, axis=1), axis=0)

    n_safe = tl.maximum(n, 1).to(tl.float32)
    out = out_ptr + (b * W + w) * ROW
    tl.store(out + COL_A, a)
    tl.store(out + COL_B, bb)
    tl.store(out + COL_C, c)
    tl.store(out + COL_SPREAD_X, tl.sum(dx_c, axis=0) - raw_x / n_safe)
    tl.store(out + COL_SPREAD_Y, tl.sum(dy_c, axis=0) - raw_y / n_safe)
    tl.store(out + COL_TOTAL_X, t_x)
    tl.store(out + COL_TOTAL_Y, t_y)


@triton.jit
def _median_kernel(
    g_ptr, n_ptr, out_ptr, W, stride_gb, stride_gw, stride_gi, stride_gj, scale,
    KP: tl.constexpr, BM: tl.constexpr,
):
    """``scale * median`` of the ``n * n`` squared distances of one Gram's leading
    block (numpy's median: mean of the two middle values), NaN when not positive.

    Exact selection by bisection on the bit patterns of the (non-negative) fp32
    distances, whose integer order is their numeric order: 31 counting sweeps over
    the block find the two middle values at once. Nothing is written but the result.
    """
    b = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    n = tl.load(n_ptr + b * W + w).to(tl.int32)
    g = g_ptr + b * stride_gb + w * stride_gw
    cols = tl.arange(0, KP)
    col_ok = cols < n
    sq_c = tl.load(g + cols * (stride_gi + stride_gj), mask=col_ok, other=0.0)
    # 0-based ranks of the two middle values; searched as "smallest v with more
    # than rank values <= v".
    need_lo = (n * n - 1) // 2 + 1
    need_hi = (n * n) // 2 + 1
    lo_a = 0
    hi_a = 0x7F800000  # +inf
    lo_b = 0
    hi_b = 0x7F800000
    for _ in range(31):
        mid_a = lo_a + (hi_a - lo_a) // 2
        mid_b = lo_b + (hi_b - lo_b) // 2
        count_a = 0
        count_b = 0
        for r0 in range(0, n, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < n
            valid = row_ok[:, None] & col_ok[None, :]
            tile, sq_r = load_gram_tile(g, stride_gi, stride_gj, rows, cols, row_ok, col_ok)
            bits = distance_tile(tile, sq_r, sq_c, rows, cols).to(tl.int32, bitcast=True)
            count_a += tl.sum(tl.sum(tl.where(valid & (bits <= mid_a), 1, 0), axis=1), axis=0)
            count_b += tl.sum(tl.sum(tl.where(valid & (bits <= mid_b), 1, 0), axis=1), axis=0)
        hi_a = tl.where(count_a >= need_lo, mid_a, hi_a)
        lo_a = tl.where(count_a >= need_lo, lo_a, mid_a + 1)
        hi_b = tl.where(count_b >= need_hi, mid_b, hi_b)
        lo_b = tl.where(count_b >= need_hi, lo_b, mid_b + 1)
    v_lo = hi_a.to(tl.float32, bitcast=True)
    v_hi = hi_b.to(tl.float32, bitcast=True)
    median = scale * (0.5 * v_lo + 0.5 * v_hi)
    ok = (median > 0.0) & (median < float("inf")) & (n > 0)
    tl.store(out_ptr + b * W + w, tl.where(ok, median, float("nan")))


def bandwidths(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, *, kernel: str,
    sigma: Optional[float], rbf_threshold: float,
) -> torch.Tensor:
    """``(B, W, 2)`` fp32 RBF bandwidths ``s^2`` of the x and y Grams of every entry.

    With ``sigma=None`` this is ``threshold^2 * median`` of the ``n * n`` squared
    distances (numpy's median, zero diagonal included) from :func:`_median_kernel`;
    unusable (zero or non-finite) medians come back as NaN and make the entry
    undefined.
    """
    batch, widths, size, _ = gx.shape
    shape = (batch, widths, 2)
    if kernel == "linear":
        return torch.ones(shape, device=gx.device, dtype=torch.float32)
    if sigma is not None:
        return torch.full(shape, sigma * sigma, device=gx.device, dtype=torch.float32)
    out = torch.empty(2, batch, widths, device=gx.device, dtype=torch.float32)
    if batch > 0:
        bm, kp = row_block(size)
        for side, gram in enumerate((gx, gy)):
            _median_kernel[(batch, widths)](
                gram, n.contiguous(), out[side], widths, *gram.stride(), rbf_threshold**2,
                KP=kp, BM=bm, num_warps=NUM_WARPS,
            )
    return out.permute(1, 2, 0).contiguous()


def hsic_stats(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, bw: torch.Tensor, *,
    kernel: str, unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Statistics of every entry from the ``(B, W, k, k)`` Gram views ``gx`` and ``gy``
    (any strides, e.g. a width stride of 0 for the shared full-width Gram).

    Returns ``stats (B, W, N_STATS)`` fp32 (columns ``A`` ... ``TOTAL_Y``) and the
    kernel-matrix row sums ``(B, W, 2, k)`` fp32 that the backward pass reuses.
    """
    batch, widths, size, _ = gx.shape
    stats = torch.empty(batch, widths, N_STATS, device=gx.device, dtype=torch.float32)
    rowsums = torch.zeros(batch, widths, 2, size, device=gx.device, dtype=torch.float32)
    if batch == 0:
        return stats, rowsums
    bm, kp = row_block(size)
    # A NaN bandwidth marks an unusable median; any positive value keeps the kernel finite.
    bw_safe = torch.nan_to_num(bw, nan=1.0)
    _stats_kernel[(batch, widths)](
        gx, gy, n.contiguous(), bw_safe, stats, rowsums,
        widths, *gx.stride(), *gy.stride(), *rowsums.stride()[:3],
        RBF=kernel == "rbf", UNBIASED=unbiased, KP=kp, BM=bm, num_warps=NUM_WARPS,
    )
    return stats, rowsums


def cka_from_grams(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor,
    *, kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CKA of every entry from its ``(B, W, k, k)`` Gram views, ``n (B, W)`` token counts
    and the running squared row norms ``sq_*`` of the unshifted rows.

    Returns ``(value (B, W), bw, stats, rowsums)``: the values and what the backward
    pass reuses.
    """
    bw = bandwidths(gx, gy, n, kernel=kernel, sigma=sigma, rbf_threshold=rbf_threshold)
    stats, rowsums = hsic_stats(gx, gy, n, bw, kernel=kernel, unbiased=unbiased)
    # sq is written only over the rows each slot uses: select, never multiply by a mask.
    rows = torch.arange(gx.shape[-1], device=n.device) < n[..., None]
    defined = defined_entries(
        n.to(torch.float32), stats[..., SPREAD_X], stats[..., SPREAD_Y],
        torch.where(rows, sq_x, 0.0).sum(-1), torch.where(rows, sq_y, 0.0).sum(-1), stats[..., B], stats[..., C],
        torch.isfinite(bw).all(-1), kernel=kernel, unbiased=unbiased,
    )
    return cka_value(stats[..., A], stats[..., B], stats[..., C], defined), bw, stats, rowsums
