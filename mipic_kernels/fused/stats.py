"""Centred HSIC statistics of every (width, token count) block, and the CKA they give.

The rows of each entry's ``n x n`` blocks are split across programs: one program per
(example, width, block of ``BM`` rows) holds its rows times all ``KP >= n`` columns,
forms the kernel matrices on the fly (linear: the Gram itself; RBF:
``exp(-dist / (2 s^2))`` with ``dist`` from the Gram) and reduces them. A kernel matrix
is symmetric, so a program's row sums are complete; the scalars are reduced in two
levels, within the program and then over the row blocks in a fixed order (no atomics:
results are reproducible bit for bit). The centred matrices never reach memory.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import row_block
from .tl_utils import centred_tile, distance_tile, load_gram_tile, load_kernel_tile


NUM_WARPS = 8
# Entries per program of the epilogue (:func:`_values_kernel`): one program for every
# benchmarked batch of a few hundred entries or fewer.
_EPILOGUE_ENTRIES = 128

# Columns of the per-(example, width) statistics record, for torch and (as constexpr
# globals) for the kernels: the HSIC terms a = <P(K), P(L)>, b = <P(K), P(K)>,
# c = <P(L), P(L)>, the spreads sum_i |z_i - mean|^2 = trace(G) - sum(G) / n and sizes
# sum_i |x_i|^2 (unshifted rows) of the two sides, and the totals of the two kernel
# matrices. Every column is a sum over row blocks of per-block partials.
# The first five come from the HSIC pass, the last four from the row-sum pass.
A, B, C, TOTAL_X, TOTAL_Y, SPREAD_X, SPREAD_Y, SIZE_X, SIZE_Y = range(9)
N_STATS = 9
COL_A, COL_B, COL_C, COL_TOTAL_X, COL_TOTAL_Y, COL_SPREAD_X, COL_SPREAD_Y, COL_SIZE_X, COL_SIZE_Y = (
    tl.constexpr(i) for i in range(N_STATS)
)
ROW = tl.constexpr(N_STATS)


@triton.jit
def entry_block(pid, W, RB):
    """``(b, w, rb)`` of a program of a grid over examples x widths x row blocks, the
    example slowest."""
    return (pid // (W * RB)).to(tl.int64), (pid // RB) % W, pid % RB


@triton.jit
def load_bandwidths(bw_ptr, entry):
    """The two RBF bandwidths of an entry; a NaN one (an unusable median, which makes
    the entry undefined) reads as 1 so that the kernel values stay finite."""
    bwx = tl.load(bw_ptr + entry * 2)
    bwy = tl.load(bw_ptr + entry * 2 + 1)
    return tl.where(bwx == bwx, bwx, 1.0), tl.where(bwy == bwy, bwy, 1.0)


@triton.jit
def safe_count(n, UNBIASED: tl.constexpr):
    """The token count as fp32, raised to the estimator's minimum (4 unbiased, 1 biased)
    so that undefined entries (masked later) stay finite."""
    if UNBIASED:
        return tl.maximum(n, 4).to(tl.float32)
    return tl.maximum(n, 1).to(tl.float32)


@triton.jit
def entry_kernel_tiles(
    gx_ptr, gy_ptr, bw_ptr, b, w, W, rows, cols, row_ok, col_ok,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    RBF: tl.constexpr, UNBIASED: tl.constexpr,
):
    """``(G, K, diag G, H, L, diag H)`` of entry ``(b, w)`` at rows ``rows``: its two Gram
    blocks (prefix and full width), their kernel matrices and their diagonals at
    ``cols``."""
    bwx, bwy = load_bandwidths(bw_ptr, b * W + w)
    gx = gx_ptr + b * stride_gxb + w * stride_gxw
    gy = gy_ptr + b * stride_gyb + w * stride_gyw
    dx_c = tl.load(gx + cols * (stride_gxi + stride_gxj), mask=col_ok, other=0.0)
    dy_c = tl.load(gy + cols * (stride_gyi + stride_gyj), mask=col_ok, other=0.0)
    g1, kx = load_kernel_tile(gx, stride_gxi, stride_gxj, rows, cols, row_ok, col_ok, dx_c, bwx, RBF, UNBIASED)
    g2, ky = load_kernel_tile(gy, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, dy_c, bwy, RBF, UNBIASED)
    return g1, kx, dx_c, g2, ky, dy_c


@triton.jit
def _zero_partials(part, FIRST: tl.constexpr, COUNT: tl.constexpr):
    """Zero the ``COUNT`` partial columns from ``FIRST`` of a row block past ``n``."""
    cols = tl.arange(0, 8)
    tl.store(part + FIRST + cols, tl.zeros([8], dtype=tl.float32), mask=cols < COUNT)


@triton.jit
def _row_block(n_ptr, part_ptr, W, RB, stride_pb, stride_pw, stride_pr, BM: tl.constexpr, KP: tl.constexpr):
    """``(b, w, rb, n, partials pointer, rows, cols)`` of a program of the statistics grid."""
    b, w, rb = entry_block(tl.program_id(0), W, RB)
    n = tl.load(n_ptr + b * W + w).to(tl.int32)
    part = part_ptr + b * stride_pb + w * stride_pw + rb * stride_pr
    return b, w, rb, n, part, rb * BM + tl.arange(0, BM), tl.arange(0, KP)


@triton.jit
def _rowsum_kernel(
    gx_ptr, gy_ptr, sqx_ptr, sqy_ptr, n_ptr, bw_ptr, part_ptr, rs_ptr, W, RB,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_sqxb, stride_sqxw, stride_sqyb, stride_sqyw,
    stride_pb, stride_pw, stride_pr, stride_rsb, stride_rsw, stride_rss,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """Pass 1 for the rows of block ``rb`` of entry ``(b, w)``: the kernel-matrix row sums
    (complete: the matrices are symmetric) and the partial spreads and sizes of the two
    sides (``sq*``: squared norms of the unshifted rows). Row blocks past ``n`` write zero
    partials and nothing else."""
    b, w, rb, n, part, rows, cols = _row_block(n_ptr, part_ptr, W, RB, stride_pb, stride_pw, stride_pr, BM, KP)
    if rb * BM >= n:
        _zero_partials(part, COL_SPREAD_X, 4)
        return
    row_ok = rows < n
    col_ok = cols < n
    g1, kx, dx_c, g2, ky, dy_c = entry_kernel_tiles(
        gx_ptr, gy_ptr, bw_ptr, b, w, W, rows, cols, row_ok, col_ok,
        stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj, RBF, UNBIASED,
    )
    rs = rs_ptr + b * stride_rsb + w * stride_rsw
    tl.store(rs + rows, tl.sum(kx, axis=1), mask=row_ok)
    tl.store(rs + stride_rss + rows, tl.sum(ky, axis=1), mask=row_ok)
    # Spread = trace(G) - sum(G) / n: linear in the entries, so it splits by rows.
    mine = (cols >= rb * BM) & (cols < rb * BM + BM) & col_ok
    n_safe = tl.maximum(n, 1).to(tl.float32)
    spread_x = tl.sum(tl.where(mine, dx_c, 0.0), axis=0) - tl.sum(tl.sum(g1, axis=1), axis=0) / n_safe
    spread_y = tl.sum(tl.where(mine, dy_c, 0.0), axis=0) - tl.sum(tl.sum(g2, axis=1), axis=0) / n_safe
    tl.store(part + COL_SPREAD_X, spread_x)
    tl.store(part + COL_SPREAD_Y, spread_y)
    sqx = tl.load(sqx_ptr + b * stride_sqxb + w * stride_sqxw + rows, mask=row_ok, other=0.0)
    sqy = tl.load(sqy_ptr + b * stride_sqyb + w * stride_sqyw + rows, mask=row_ok, other=0.0)
    tl.store(part + COL_SIZE_X, tl.sum(sqx, axis=0))
    tl.store(part + COL_SIZE_Y, tl.sum(sqy, axis=0))


@triton.jit
def _hsic_kernel(
    gx_ptr, gy_ptr, n_ptr, bw_ptr, part_ptr, rs_ptr, W, RB,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_pb, stride_pw, stride_pr, stride_rsb, stride_rsw, stride_rss,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """Pass 2 for the rows of block ``rb`` of entry ``(b, w)``: partial inner products of
    the centred matrices. Biased: double centring, as the reference does. Unbiased:
    U-centring, an orthogonal projection, so ``<U(K), U(L)>`` equals Song's bracket
    ``<U(K), L~>``; the centred form avoids the cancellation of the expanded bracket in
    fp32. Every program of an entry sums the same row sums to the kernel totals, the
    same way; block 0 records them."""
    b, w, rb, n, part, rows, cols = _row_block(n_ptr, part_ptr, W, RB, stride_pb, stride_pw, stride_pr, BM, KP)
    if rb * BM >= n:
        _zero_partials(part, COL_A, 5)
        return
    row_ok = rows < n
    col_ok = cols < n
    valid = row_ok[:, None] & col_ok[None, :]
    nf = safe_count(n, UNBIASED)
    _, kx, _, _, ky, _ = entry_kernel_tiles(
        gx_ptr, gy_ptr, bw_ptr, b, w, W, rows, cols, row_ok, col_ok,
        stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj, RBF, UNBIASED,
    )
    rs = rs_ptr + b * stride_rsb + w * stride_rsw
    rx_c = tl.load(rs + cols, mask=col_ok, other=0.0)
    ry_c = tl.load(rs + stride_rss + cols, mask=col_ok, other=0.0)
    t_x = tl.sum(rx_c, axis=0)
    t_y = tl.sum(ry_c, axis=0)
    rx_r = tl.load(rs + rows, mask=row_ok, other=0.0)
    ry_r = tl.load(rs + stride_rss + rows, mask=row_ok, other=0.0)
    px = centred_tile(kx, rx_r, rx_c, t_x, nf, rows, cols, valid, UNBIASED)
    py = centred_tile(ky, ry_r, ry_c, t_y, nf, rows, cols, valid, UNBIASED)
    tl.store(part + COL_A, tl.sum(tl.sum(px * py, axis=1), axis=0))
    tl.store(part + COL_B, tl.sum(tl.sum(px * px, axis=1), axis=0))
    tl.store(part + COL_C, tl.sum(tl.sum(py * py, axis=1), axis=0))
    tl.store(part + COL_TOTAL_X, tl.where(rb == 0, t_x, 0.0))
    tl.store(part + COL_TOTAL_Y, tl.where(rb == 0, t_y, 0.0))


@triton.jit
def _median_kernel(
    gx_ptr, gy_ptr, n_ptr, out_ptr, W,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj, scale,
    KP: tl.constexpr, BM: tl.constexpr,
):
    """``scale * median`` of the ``n * n`` squared distances of one Gram's leading block
    (numpy's median: mean of the two middle values), NaN when not positive. Program
    ``(b, w, side)``: side 0 the prefix Gram, side 1 the full-width Gram.

    Exact selection by radix on the bit patterns of the (non-negative) fp32 distances,
    whose integer order is their numeric order: four counting sweeps over the block,
    each a 256-bin histogram of the next 8 bits among the values that share the bits
    found so far, give the lower middle value; a fifth sweep finds the next larger
    value when the two middle ranks differ. Nothing is written but the result.
    """
    pid = tl.program_id(0)
    b = (pid // (2 * W)).to(tl.int64)
    w = (pid // 2) % W
    side = pid % 2
    if side == 0:
        g = gx_ptr + b * stride_gxb + w * stride_gxw
        stride_gi = stride_gxi
        stride_gj = stride_gxj
    else:
        g = gy_ptr + b * stride_gyb + w * stride_gyw
        stride_gi = stride_gyi
        stride_gj = stride_gyj
    n = tl.load(n_ptr + b * W + w).to(tl.int32)
    cols = tl.arange(0, KP)
    col_ok = cols < n
    sq_c = tl.load(g + cols * (stride_gi + stride_gj), mask=col_ok, other=0.0)
    bins = tl.arange(0, 256)
    # 0-based ranks of the two middle values.
    rank = tl.maximum(n * n - 1, 0) // 2
    rank_hi = (n * n) // 2
    prefix = rank * 0
    below = rank * 0
    at = rank * 0
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros([256], dtype=tl.int32)
        for r0 in range(0, n, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < n
            valid = row_ok[:, None] & col_ok[None, :]
            tile, sq_r = load_gram_tile(g, stride_gi, stride_gj, rows, cols, row_ok, col_ok)
            bits = distance_tile(tile, sq_r, sq_c, rows, cols).to(tl.int32, bitcast=True)
            if p > 0:
                valid = valid & ((bits >> (shift + 8)) == (prefix >> (shift + 8)))
            digit = tl.where(valid, (bits >> shift) & 0xFF, 0)
            # Values left out were counted in bin 0: take them back out.
            hist += tl.histogram(tl.reshape(digit, [BM * KP]), 256)
            hist -= tl.where(bins == 0, BM * KP - tl.sum(tl.sum(valid.to(tl.int32), axis=1), axis=0), 0)
        cum = tl.cumsum(hist, 0)
        d = tl.sum((cum <= rank).to(tl.int32), axis=0)
        before = tl.sum(tl.where(bins < d, hist, 0), axis=0)
        at = tl.sum(tl.where(bins == d, hist, 0), axis=0)
        rank -= before
        below += before
        prefix = prefix | (d << shift)
    # The upper middle value: the same one when enough values equal it, else the
    # smallest larger one.
    upper = prefix * 0 + 0x7F800000
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM)
        row_ok = rows < n
        valid = row_ok[:, None] & col_ok[None, :]
        tile, sq_r = load_gram_tile(g, stride_gi, stride_gj, rows, cols, row_ok, col_ok)
        bits = distance_tile(tile, sq_r, sq_c, rows, cols).to(tl.int32, bitcast=True)
        upper = tl.minimum(upper, tl.min(tl.min(tl.where(valid & (bits > prefix), bits, 0x7F800000), axis=1), axis=0))
    upper = tl.where(below + at > rank_hi, prefix, upper)
    v_lo = prefix.to(tl.float32, bitcast=True)
    v_hi = upper.to(tl.float32, bitcast=True)
    median = scale * (0.5 * v_lo + 0.5 * v_hi)
    ok = (median > 0.0) & (median < float("inf")) & (n > 0)
    tl.store(out_ptr + (b * W + w) * 2 + side, tl.where(ok, median, float("nan")))


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
    out = torch.empty(shape, device=gx.device, dtype=torch.float32)
    if batch > 0:
        bm, kp = row_block(size)
        _median_kernel[(batch * widths * 2,)](
            gx, gy, n.contiguous(), out, widths, *gx.stride(), *gy.stride(), rbf_threshold**2,
            KP=kp, BM=bm, num_warps=NUM_WARPS,
        )
    return out


@triton.jit
def _values_kernel(
    part_ptr, n_ptr, bw_ptr, stats_ptr, value_ptr, E, RB,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """The epilogue of ``BLOCK_E`` entries: their statistics (the row-block partials
    summed in block order) and their values, ``a / sqrt(b c)`` where defined and NaN
    elsewhere. The definedness rule is :func:`mipic_kernels.rules.defined_entries`
    operation for operation, in fp32 with correctly rounded square root and division,
    so both backends mark the same entries NaN (``tests/test_triton.py`` holds the two
    equal bit for bit)."""
    entries = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    ok = entries < E
    cols = tl.arange(0, 16)
    tile_ok = ok[:, None] & (cols < ROW)[None, :]
    part = part_ptr + entries.to(tl.int64)[:, None] * (RB * ROW) + cols[None, :]
    stats = tl.zeros([BLOCK_E, 16], dtype=tl.float32)
    for rb in range(RB):
        stats += tl.load(part + rb * ROW, mask=tile_ok, other=0.0)
    tl.store(stats_ptr + entries.to(tl.int64)[:, None] * ROW + cols[None, :], stats, mask=tile_ok)
    a = tl.sum(tl.where(cols == COL_A, stats, 0.0), axis=1)
    b = tl.sum(tl.where(cols == COL_B, stats, 0.0), axis=1)
    c = tl.sum(tl.where(cols == COL_C, stats, 0.0), axis=1)
    spread_x = tl.sum(tl.where(cols == COL_SPREAD_X, stats, 0.0), axis=1)
    spread_y = tl.sum(tl.where(cols == COL_SPREAD_Y, stats, 0.0), axis=1)
    size_x = tl.sum(tl.where(cols == COL_SIZE_X, stats, 0.0), axis=1)
    size_y = tl.sum(tl.where(cols == COL_SIZE_Y, stats, 0.0), axis=1)
    n = tl.load(n_ptr + entries, mask=ok, other=0)
    nf = n.to(tl.float32)
    bwx = tl.load(bw_ptr + entries * 2, mask=ok, other=1.0)
    bwy = tl.load(bw_ptr + entries * 2 + 1, mask=ok, other=1.0)
    tol = nf * 1.1920928955078125e-07  # n times the machine epsilon of float32
    if RBF:
        scale_x = nf * nf
        scale_y = nf * nf
    else:
        scale_x = spread_x * spread_x
        scale_y = spread_y * spread_y
    defined = (
        (n >= (4 if UNBIASED else 2))
        & (tl.abs(bwx) < float("inf")) & (tl.abs(bwy) < float("inf"))
        & (spread_x > tol * size_x) & (spread_y > tol * size_y)
        & (b > (tol * tol) * scale_x) & (c > (tol * tol) * scale_y)
    )
    value = tl.div_rn(a, tl.sqrt_rn(tl.where(defined, b * c, 1.0)))
    tl.store(value_ptr + entries, tl.where(defined, value, float("nan")), mask=ok)


def hsic_stats(
    gx: torch.Tensor, gy: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor, n: torch.Tensor,
    bw: torch.Tensor, *, kernel: str, unbiased: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Statistics and CKA values of every entry from the ``(B, W, k, k)`` Gram views
    ``gx`` and ``gy`` and the ``(B, W, k)`` squared norms of their unshifted rows (any
    strides, e.g. a width stride of 0 for the shared full width); ``n (B, W)`` the
    token counts, ``bw (B, W, 2)`` the bandwidths (contiguous).

    Returns ``value (B, W)`` fp32 (NaN where undefined), ``stats (B, W, N_STATS)`` fp32
    (columns ``A`` ... ``SIZE_Y``) and the kernel-matrix row sums ``(B, W, 2, k)`` fp32
    that the backward pass reuses, written over each entry's ``n`` rows only.
    """
    batch, widths, size, _ = gx.shape
    bm, kp = row_block(size)
    blocks = triton.cdiv(size, bm)
    f32 = dict(device=gx.device, dtype=torch.float32)
    part = torch.empty(batch, widths, blocks, N_STATS, **f32)
    rowsums = torch.empty(batch, widths, 2, size, **f32)
    stats = torch.empty(batch, widths, N_STATS, **f32)
    value = torch.empty(batch, widths, **f32)
    if batch > 0:
        n = n.contiguous()
        grams = (*gx.stride(), *gy.stride())
        outputs = (*part.stride()[:3], *rowsums.stride()[:3])
        meta = dict(RBF=kernel == "rbf", UNBIASED=unbiased, KP=kp, BM=bm, num_warps=NUM_WARPS)
        grid = (batch * widths * blocks,)
        _rowsum_kernel[grid](
            gx, gy, sq_x, sq_y, n, bw, part, rowsums, widths, blocks,
            *grams, *sq_x.stride()[:2], *sq_y.stride()[:2], *outputs, **meta,
        )
        _hsic_kernel[grid](gx, gy, n, bw, part, rowsums, widths, blocks, *grams, *outputs, **meta)
        entries = batch * widths
        _values_kernel[(triton.cdiv(entries, _EPILOGUE_ENTRIES),)](
            part, n, bw, stats, value, entries, blocks,
            RBF=kernel == "rbf", UNBIASED=unbiased, BLOCK_E=_EPILOGUE_ENTRIES, num_warps=4,
            enable_fp_fusion=False,  # every product rounded on its own, as in torch
        )
    return value, stats, rowsums


def cka_from_grams(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, sq_x: torch.Tensor, sq_y: torch.Tensor,
    *, kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CKA of every entry from its ``(B, W, k, k)`` Gram views, ``n (B, W)`` token counts
    and the ``(B, W, k)`` running squared row norms ``sq_*`` of the unshifted rows.

    Returns ``(value (B, W), bw, stats, rowsums)``: the values and what the backward
    pass reuses.
    """
    bw = bandwidths(gx, gy, n, kernel=kernel, sigma=sigma, rbf_threshold=rbf_threshold)
    value, stats, rowsums = hsic_stats(gx, gy, sq_x, sq_y, n, bw, kernel=kernel, unbiased=unbiased)
    return value, bw, stats, rowsums
