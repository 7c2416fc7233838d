"""Backward pass: per-width coefficient matrices, then one sweep over the columns.

For ``rho = a / sqrt(b c)`` with ``a = HSIC(K, L)``, ``b = HSIC(K, K)``,
``c = HSIC(L, L)`` and ``P(.)`` the centring of :func:`.tl_utils.centred_tile`,
``d rho / dK = (P(L) - (a / b) P(K)) / sqrt(b c)`` and symmetrically for ``L``.
A Gram ``G = Z Z^T`` with gradient ``E`` (symmetric) passes ``dZ = 2 E Z``:
linear ``2 E = 2 dK``; RBF ``2 E = 4 (diag(V 1) - V)`` with
``V = dK o K / (-2 s^2)`` off the diagonal (the bandwidth is a constant).

The prefix of width ``i`` feeds columns ``:dims[i]`` only, so column segment ``s``
gets the sum of the coefficients of widths ``>= s``: the coefficient kernel forms
that reverse cumulative sum itself, in registers, walking the widths downwards. The
shift by the column mean is treated as a constant: CKA is translation invariant,
so its gradient through the shift vanishes.

As in the forward statistics, the rows of each entry are split across programs and
every reduction is done in a fixed order (no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRETING, alignment, autotune, device_bounds, grad_dot, k_bucket
from .stats import (
    COL_A, COL_B, COL_C, COL_TOTAL_X, COL_TOTAL_Y, NUM_WARPS, ROW, entry_block, entry_kernel_tiles, load_bandwidths,
    row_block, safe_count,
)
from .tl_utils import centred_tile, dot_split, load_shifted, split, widest_count

# Output tiles of BM ranks x BLOCK_D columns, BK ranks per step of the sweep. The split
# dots' candidates compile for sm_90 without register spills, with the full-width
# coefficient too (docs/kernels.md); fp32 FMA dots ("ieee") need 16-rank steps.
_DX_FAST_CONFIGS = [
    triton.Config({"BM": 64, "BK": bk, "BLOCK_D": 64}, num_warps=warps, num_stages=3)
    for bk, warps in ((64, 8), (32, 8), (16, 4))
]
_DX_IEEE_CONFIGS = [
    triton.Config({"BM": 64, "BK": 16, "BLOCK_D": 64}, num_warps=8, num_stages=stages) for stages in (3, 1)
]
_DX_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BK": 16, "BLOCK_D": 64}, num_warps=4)


def _dx_candidates(kwargs: dict) -> list[triton.Config]:
    return _DX_IEEE_CONFIGS if kwargs["DOT"] == "ieee" else _DX_FAST_CONFIGS


@triton.jit
def _gram_grad(dk, k, bw, rows, cols, valid, RBF: tl.constexpr):
    """``2 E``, the coefficient of ``Z`` in the gradient, from the kernel gradient ``dk``."""
    if RBF:
        v = tl.where(valid & (rows[:, None] != cols[None, :]), dk * k / (-2.0 * bw), 0.0)
        row = tl.sum(v, axis=1)
        return 4.0 * (tl.where(rows[:, None] == cols[None, :], row[:, None], 0.0) - v)
    return tl.where(valid, 2.0 * dk, 0.0)


@triton.jit
def _entry_grads(
    gx_ptr, gy_ptr, bw_ptr, stats_ptr, rs_ptr, b, w, W, n, scale, rows, cols, row_ok, col_ok,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_rsb, stride_rsw, stride_rss, RBF: tl.constexpr, UNBIASED: tl.constexpr,
):
    """Kernel tiles ``K``, ``L`` and the unprojected gradients ``dK``, ``dL`` at rows
    ``rows`` of entry ``(b, w)``, rebuilt from the saved Grams, row sums and statistics."""
    entry = b * W + w
    a = tl.load(stats_ptr + entry * ROW + COL_A)
    nf = safe_count(n, UNBIASED)
    rs = rs_ptr + b * stride_rsb + w * stride_rsw
    valid = row_ok[:, None] & col_ok[None, :]
    _, kx, _, _, ky, _ = entry_kernel_tiles(
        gx_ptr, gy_ptr, bw_ptr, b, w, W, rows, cols, row_ok, col_ok,
        stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj, RBF, UNBIASED,
    )
    px = centred_tile(
        kx, tl.load(rs + rows, mask=row_ok, other=0.0), tl.load(rs + cols, mask=col_ok, other=0.0),
        tl.load(stats_ptr + entry * ROW + COL_TOTAL_X), nf, rows, cols, valid, UNBIASED,
    )
    py = centred_tile(
        ky, tl.load(rs + stride_rss + rows, mask=row_ok, other=0.0),
        tl.load(rs + stride_rss + cols, mask=col_ok, other=0.0),
        tl.load(stats_ptr + entry * ROW + COL_TOTAL_Y), nf, rows, cols, valid, UNBIASED,
    )
    ratio_x = a / tl.load(stats_ptr + entry * ROW + COL_B)
    ratio_y = a / tl.load(stats_ptr + entry * ROW + COL_C)
    return kx, ky, scale * (py - ratio_x * px), scale * (px - ratio_y * py)


@triton.jit
def _upstream_scale(grad_ptr, stride_ub, stride_uw, value_ptr, stats_ptr, b, w, W):
    """``upstream gradient / sqrt(b c)`` of entry ``(b, w)`` where it is defined (its value
    is finite), 0 where it is not, whatever the upstream gradient holds there."""
    entry = b * W + w
    defined = tl.abs(tl.load(value_ptr + entry)) < float("inf")
    bc = tl.load(stats_ptr + entry * ROW + COL_B) * tl.load(stats_ptr + entry * ROW + COL_C)
    grad = tl.load(grad_ptr + b * stride_ub + w * stride_uw).to(tl.float32)
    return tl.where(defined, grad / tl.sqrt_rn(tl.where(defined, bc, 1.0)), 0.0)


@triton.jit
def _coef_rowsum_kernel(
    gx_ptr, gy_ptr, n_ptr, bw_ptr, stats_ptr, rs_ptr, grad_ptr, value_ptr, ds_ptr, W, RB,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_rsb, stride_rsw, stride_rss, stride_ub, stride_uw, stride_dsb, stride_dsw, stride_dss,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, FULL_GRAD: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """Row sums of ``dK`` (and ``dL``) at the rows of block ``rb`` of entry ``(b, w)``:
    complete, and equal to the column sums, since both are symmetric. Undefined entries
    (scale 0) and blocks past ``n`` do nothing."""
    b, w, rb = entry_block(tl.program_id(0), W, RB)
    n = tl.load(n_ptr + b * W + w).to(tl.int32)
    scale = _upstream_scale(grad_ptr, stride_ub, stride_uw, value_ptr, stats_ptr, b, w, W)
    if (scale == 0.0) | (rb * BM >= n):
        return
    rows = rb * BM + tl.arange(0, BM)
    cols = tl.arange(0, KP)
    row_ok = rows < n
    _, _, dk, dl = _entry_grads(
        gx_ptr, gy_ptr, bw_ptr, stats_ptr, rs_ptr, b, w, W, n, scale, rows, cols, row_ok, cols < n,
        stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
        stride_rsb, stride_rsw, stride_rss, RBF, UNBIASED,
    )
    ds = ds_ptr + b * stride_dsb + w * stride_dsw
    tl.store(ds + rows, tl.sum(dk, axis=1), mask=row_ok)
    if FULL_GRAD:
        tl.store(ds + stride_dss + rows, tl.sum(dl, axis=1), mask=row_ok)


@triton.jit
def _coef_kernel(
    gx_ptr, gy_ptr, n_ptr, bw_ptr, stats_ptr, rs_ptr, grad_ptr, value_ptr, ds_ptr, coef_ptr, K, RB,
    stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_rsb, stride_rsw, stride_rss, stride_ub, stride_uw, stride_dsb, stride_dsw, stride_dss,
    stride_cb, stride_cs, stride_ci, stride_cj,
    W: tl.constexpr, WP: tl.constexpr, RBF: tl.constexpr, UNBIASED: tl.constexpr, FULL_GRAD: tl.constexpr,
    KP: tl.constexpr, BM: tl.constexpr,
):
    """Rows of block ``rb`` of every coefficient of example ``b``: slot ``w`` the sum of
    the prefix-Gram coefficients of widths ``>= w`` (a running sum, widths walked
    downwards in registers), and with ``FULL_GRAD`` slot ``W`` the sum of the
    full-Gram coefficients of every width. Each slot is written over ``kmax`` rows
    and all ``K`` columns, zeros included, so nothing is zero-filled first.

    Each entry's gradient is scaled by ``upstream gradient / sqrt(b c)``; undefined
    entries are skipped. ``dK`` is centred in exact arithmetic; in fp32 it carries
    rounding from ``K`` amplified by the centring, and centring it again (with the row
    sums of :func:`_coef_rowsum_kernel`, as autograd through the reference does
    implicitly) removes the part of that error that is not centred, which would
    otherwise reach the gradient.
    """
    pid = tl.program_id(0)
    b = (pid // RB).to(tl.int64)
    rb = pid % RB
    # One vector load (a scalar loop here costs the kernel ~40 registers on sm_90).
    widths = tl.arange(0, WP)
    kmax = tl.max(tl.load(n_ptr + b * W + widths, mask=widths < W, other=0), axis=0)
    if rb * BM >= kmax:
        return
    rows = rb * BM + tl.arange(0, BM)
    cols = tl.arange(0, KP)
    store_ok = (rows < kmax)[:, None] & (cols < K)[None, :]
    offs = b * stride_cb + rows[:, None] * stride_ci + cols[None, :] * stride_cj
    running = tl.zeros([BM, KP], dtype=tl.float32)
    full = tl.zeros([BM, KP], dtype=tl.float32)
    for i in range(W):
        w = W - 1 - i
        n = tl.load(n_ptr + b * W + w).to(tl.int32)
        scale = _upstream_scale(grad_ptr, stride_ub, stride_uw, value_ptr, stats_ptr, b, w, W)
        if (scale != 0.0) & (rb * BM < n):
            row_ok = rows < n
            col_ok = cols < n
            valid = row_ok[:, None] & col_ok[None, :]
            nf = safe_count(n, UNBIASED)
            bwx, bwy = load_bandwidths(bw_ptr, b * W + w)
            kx, ky, dk, dl = _entry_grads(
                gx_ptr, gy_ptr, bw_ptr, stats_ptr, rs_ptr, b, w, W, n, scale, rows, cols, row_ok, col_ok,
                stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
                stride_rsb, stride_rsw, stride_rss, RBF, UNBIASED,
            )
            ds = ds_ptr + b * stride_dsb + w * stride_dsw
            sum_c = tl.load(ds + cols, mask=col_ok, other=0.0)
            dk = centred_tile(dk, tl.load(ds + rows, mask=row_ok, other=0.0), sum_c, tl.sum(sum_c, axis=0),
                              nf, rows, cols, valid, UNBIASED)
            running += _gram_grad(dk, kx, bwx, rows, cols, valid, RBF)
            if FULL_GRAD:
                sum_c = tl.load(ds + stride_dss + cols, mask=col_ok, other=0.0)
                dl = centred_tile(dl, tl.load(ds + stride_dss + rows, mask=row_ok, other=0.0), sum_c,
                                  tl.sum(sum_c, axis=0), nf, rows, cols, valid, UNBIASED)
                full += _gram_grad(dl, ky, bwy, rows, cols, valid, RBF)
        tl.store(coef_ptr + offs + w * stride_cs, running, mask=store_ok)
    if FULL_GRAD:
        tl.store(coef_ptr + offs + W * stride_cs, full, mask=store_ok)


@autotune([*_DX_FAST_CONFIGS, *_DX_IEEE_CONFIGS], _dx_candidates, _DX_INTERPRETER_CONFIG, key=["K_BUCKET", "D", "DOT"])
@triton.jit
def _dx_kernel(
    x_ptr, order_ptr, n_ptr, shift_ptr, bounds_ptr, coef_ptr, dx_ptr,
    T, D, K_BUCKET, W, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot, stride_nb, stride_nw,
    stride_cb, stride_cs, stride_ci, stride_cj, stride_dxb, stride_dxt, stride_dxd,
    N_SEG: tl.constexpr, SEG_P2: tl.constexpr, N_PREFIX: tl.constexpr, FULL_GRAD: tl.constexpr,
    ALIGN: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
    BM: tl.constexpr, BK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dx[b, order[b, r], cols] = sum_s (coef_s Z)[r, cols in segment s]`` for the ranks
    ``r`` of one row block and one column block.

    The grid covers every rank and column, flattened with the example slowest and the
    column block fastest (neighbours share coefficient rows), so every entry of ``dx`` is
    written exactly once: blocks of unselected ranks (past ``kmax``) or of columns
    without a gradient (past the widest width when the full width is detached) store
    zeros and do nothing else. The selected positions of an example are distinct, so
    plain stores suffice (no atomics). A column block that straddles width bounds
    sweeps the selected rows once per segment it touches (one loop body, so the kernel
    stays within the register file; the repeated rows come from L2).
    """
    row_blocks = tl.cdiv(T, BM)
    col_blocks = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    b = (pid // (row_blocks * col_blocks)).to(tl.int64)
    rest = pid % (row_blocks * col_blocks)
    rows = (rest // col_blocks) * BM + tl.arange(0, BM)
    c_lo = (rest % col_blocks) * BLOCK_D
    cols = c_lo + tl.arange(0, BLOCK_D)
    kmax = widest_count(n_ptr, b, stride_nb, stride_nw, W)
    row_ok = rows < kmax
    # Segments with a gradient that meet this column block: [s_first, s_end).
    seg = tl.arange(0, SEG_P2)
    upper = tl.load(bounds_ptr + 1 + seg, mask=seg < N_SEG, other=0)
    lower = tl.load(bounds_ptr + seg, mask=seg < N_SEG, other=0)
    s_first = tl.sum(((seg < N_SEG) & (upper <= c_lo)).to(tl.int32), axis=0)
    s_end = tl.sum(((seg < N_SEG) & (lower < c_lo + BLOCK_D)).to(tl.int32), axis=0)
    if not FULL_GRAD:
        s_end = tl.minimum(s_end, N_PREFIX)
    if (rest // col_blocks) * BM >= kmax:
        s_end = s_first
    acc = tl.zeros([BM, BLOCK_D], dtype=tl.float32)
    coef = coef_ptr + b * stride_cb
    for s in range(s_first, s_end):
        lo = tl.load(bounds_ptr + s)
        hi = tl.load(bounds_ptr + s + 1)
        if ALIGN > 1:
            lo = tl.multiple_of(lo, ALIGN)
            hi = tl.multiple_of(hi, ALIGN)
        col_ok = (cols >= lo) & (cols < hi)
        for j0 in range(0, kmax, BK):
            js = j0 + tl.arange(0, BK)
            j_ok = js < kmax
            tile_ok = row_ok[:, None] & j_ok[None, :]
            offs = rows[:, None] * stride_ci + js[None, :] * stride_cj
            # Slot s: the coefficient of segment s (none past the widest width);
            # slot N_PREFIX: the full-width coefficient, which every column gets.
            if s < N_PREFIX:
                c = tl.load(coef + s * stride_cs + offs, mask=tile_ok, other=0.0)
            else:
                c = tl.zeros([BM, BK], dtype=tl.float32)
            if FULL_GRAD:
                c += tl.load(coef + N_PREFIX * stride_cs + offs, mask=tile_ok, other=0.0)
            pos = tl.load(order_ptr + b * stride_ob + js * stride_ot, mask=j_ok, other=0)
            _, z = load_shifted(x_ptr, b, stride_xb, stride_xt, stride_xd, pos, j_ok, shift_ptr, D, cols, col_ok)
            c_hi, c_lo_half = split(c, DOT, INTERPRET)
            z_hi, z_lo = split(z, DOT, INTERPRET)
            acc = dot_split(c_hi, c_lo_half, z_hi, z_lo, acc, DOT, INTERPRET)
    pos_r = tl.load(order_ptr + b * stride_ob + rows * stride_ot, mask=rows < T, other=0)
    out = dx_ptr + b * stride_dxb + pos_r[:, None] * stride_dxt + cols[None, :] * stride_dxd
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=(rows[:, None] < T) & (cols[None, :] < D))


def coefficients(
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, bw: torch.Tensor,
    stats: torch.Tensor, rowsums: torch.Tensor, grad: torch.Tensor, value: torch.Tensor, *,
    kernel: str, unbiased: bool, full_grad: bool,
) -> torch.Tensor:
    """``(B, W + full_grad, k, k)`` fp32 coefficients of the upstream gradient
    ``grad (B, W)`` of ``value (B, W)``: slot ``w`` the sum of the x-side coefficients of
    widths ``>= w`` (the coefficient of column segment ``w``), slot ``W`` the sum of the
    y-side (full-width) coefficients of every width; written over the leading
    ``kmax[b] = max_w n[b, w]`` rows (all columns) of each example and not elsewhere."""
    batch, widths, size, _ = gx.shape
    f32 = dict(device=gx.device, dtype=torch.float32)
    coef = torch.empty(batch, widths + int(full_grad), size, size, **f32)
    if batch == 0:
        return coef
    bm, kp = row_block(size)
    blocks = triton.cdiv(size, bm)
    dsums = torch.empty(batch, widths, 2, size, **f32)
    n, value = n.contiguous(), value.contiguous()
    strides = (*gx.stride(), *gy.stride(), *rowsums.stride()[:3], *grad.stride(), *dsums.stride()[:3])
    meta = dict(RBF=kernel == "rbf", UNBIASED=unbiased, FULL_GRAD=full_grad, KP=kp, BM=bm, num_warps=NUM_WARPS)
    _coef_rowsum_kernel[(batch * widths * blocks,)](
        gx, gy, n, bw, stats, rowsums, grad, value, dsums, widths, blocks, *strides, **meta,
    )
    _coef_kernel[(batch * blocks,)](
        gx, gy, n, bw, stats, rowsums, grad, value, dsums, coef, size, blocks, *strides, *coef.stride(),
        W=widths, WP=triton.next_power_of_2(widths), **meta,
    )
    return coef


def input_grad(
    x: torch.Tensor, order: torch.Tensor, n: torch.Tensor, shift: torch.Tensor,
    bounds: tuple[int, ...], coef: torch.Tensor, *, n_prefix: int, full_grad: bool, precision: str,
) -> torch.Tensor:
    """Gradient ``(B, T, D)`` in ``x.dtype``: zero except at the selected rows, the
    leading ``max_w n[b, w]`` of ``order`` for counts ``n (B, W)`` (every entry is
    written by the kernel; nothing is zero-filled first)."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.shape[0] > 0:
        launch_dx(x, order, n, shift, bounds, coef, dx, n_prefix=n_prefix, full_grad=full_grad,
                  precision=precision)
    return dx


def launch_dx(
    x: torch.Tensor, order: torch.Tensor, n: torch.Tensor, shift: torch.Tensor,
    bounds: tuple[int, ...], coef: torch.Tensor, dx: torch.Tensor, *, n_prefix: int, full_grad: bool,
    precision: str,
) -> None:
    """Write every entry of ``dx (B, T, D)`` from the coefficients ``coef (B, S', k, k)``
    (slots ``[0, n_prefix)`` per column segment, slot ``n_prefix`` the full width's)."""
    batch, tokens, depth = x.shape

    def grid(meta):
        return (batch * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(depth, meta["BLOCK_D"]),)

    _dx_kernel[grid](
        x, order, n, shift, device_bounds(bounds, x.device), coef, dx,
        tokens, depth, k_bucket(coef.shape[-1]), n.shape[1], *x.stride(), *order.stride(), *n.stride(),
        *coef.stride(), *dx.stride(),
        N_SEG=len(bounds) - 1, SEG_P2=triton.next_power_of_2(len(bounds) - 1), N_PREFIX=n_prefix,
        FULL_GRAD=full_grad, ALIGN=alignment(bounds), DOT=grad_dot(x.dtype, precision), INTERPRET=INTERPRETING,
    )
