"""Backward pass: per-width coefficient matrices, then one sweep over the columns.

For ``rho = a / sqrt(b c)`` with ``a = HSIC(K, L)``, ``b = HSIC(K, K)``,
``c = HSIC(L, L)`` and ``P(.)`` the centring of :func:`.tl_utils.centred_tile`,
``d rho / dK = (P(L) - (a / b) P(K)) / sqrt(b c)`` and symmetrically for ``L``.
A Gram ``G = Z Z^T`` with gradient ``E`` (symmetric) passes ``dZ = 2 E Z``:
linear ``2 E = 2 dK``; RBF ``2 E = 4 (diag(V 1) - V)`` with
``V = dK o K / (-2 s^2)`` off the diagonal (the bandwidth is a constant).

The prefix of width ``i`` feeds columns ``:dims[i]`` only, so column segment ``s``
gets the sum of the coefficients of widths ``>= s`` (a reverse cumulative sum over
the per-width coefficients of the coefficient kernel). The
shift by the column mean is treated as a constant: CKA is translation invariant,
so its gradient through the shift vanishes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRETING, alignment, autotune, device_bounds, grad_dot, k_bucket
from .stats import B, C, COL_A, COL_B, COL_C, COL_TOTAL_X, COL_TOTAL_Y, NUM_WARPS, ROW, row_block
from .tl_utils import centred_tile, dot_split, load_kernel_tile, load_shifted, split

# Output tiles of BM ranks x BLOCK_D columns, BK ranks per step of the sweep; fp32 FMA
# dots ("ieee") need 16-rank steps to stay within the register file on sm_90.
_DX_FAST_CONFIGS = [
    triton.Config({"BM": bm, "BK": bk, "BLOCK_D": 64}, num_warps=warps, num_stages=3)
    for bm, bk, warps in ((64, 64, 4), (128, 32, 8), (64, 32, 4))
]
_DX_IEEE_CONFIGS = [
    triton.Config({"BM": 64, "BK": 16, "BLOCK_D": 64}, num_warps=8, num_stages=stages) for stages in (3, 1)
]
_DX_INTERPRETER_CONFIG = triton.Config({"BM": 16, "BK": 16, "BLOCK_D": 64}, num_warps=4)

@triton.jit
def _gram_grad(dk, k, bw, rows, cols, valid, RBF: tl.constexpr):
    """``2 E``, the coefficient of ``Z`` in the gradient, from the kernel gradient ``dk``."""
    if RBF:
        v = tl.where(valid & (rows[:, None] != cols[None, :]), dk * k / (-2.0 * bw), 0.0)
        row = tl.sum(v, axis=1)
        return 4.0 * (tl.where(rows[:, None] == cols[None, :], row[:, None], 0.0) - v)
    return tl.where(valid, 2.0 * dk, 0.0)


@triton.jit
def _kernel_grads(
    gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rs, stride_rss, rows, cols, row_ok, col_ok,
    sqx_c, sqy_c, bwx, bwy, t_x, t_y, nf, scale, ratio_x, ratio_y, RBF: tl.constexpr, UNBIASED: tl.constexpr,
):
    """Kernel tiles ``K``, ``L`` and the unprojected gradients ``dK``, ``dL`` of a row block."""
    valid = row_ok[:, None] & col_ok[None, :]
    _, kx = load_kernel_tile(gx, stride_gxi, stride_gxj, rows, cols, row_ok, col_ok, sqx_c, bwx, RBF, UNBIASED)
    _, ky = load_kernel_tile(gy, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, sqy_c, bwy, RBF, UNBIASED)
    px = centred_tile(
        kx, tl.load(rs + rows, mask=row_ok, other=0.0), tl.load(rs + cols, mask=col_ok, other=0.0),
        t_x, nf, rows, cols, valid, UNBIASED,
    )
    py = centred_tile(
        ky, tl.load(rs + stride_rss + rows, mask=row_ok, other=0.0),
        tl.load(rs + stride_rss + cols, mask=col_ok, other=0.0), t_y, nf, rows, cols, valid, UNBIASED,
    )
    return kx, ky, scale * (py - ratio_x * px), scale * (px - ratio_y * py)


@triton.jit
def _coef_kernel(
    gx_ptr, gy_ptr, n_ptr, bw_ptr, stats_ptr, rs_ptr, scale_ptr, ex_ptr, ey_ptr,
    W, stride_gxb, stride_gxw, stride_gxi, stride_gxj, stride_gyb, stride_gyw, stride_gyi, stride_gyj,
    stride_rsb, stride_rsw, stride_rss, stride_eb, stride_ew, stride_ei, stride_ej,
    RBF: tl.constexpr, UNBIASED: tl.constexpr, FULL_GRAD: tl.constexpr,
    KP: tl.constexpr, BM: tl.constexpr,
):
    """Coefficients of entry ``(b, w)``: ``ex[b, w]`` for its prefix Gram and, with
    ``FULL_GRAD``, ``ey[b, w]`` for the full-width Gram (both pre-zeroed).

    ``scale[b, w]`` is ``upstream gradient / sqrt(b c)`` and 0 for undefined entries.
    ``dK`` is centred in exact arithmetic; in fp32 it carries rounding from ``K``
    amplified by the centring, and centring it again (pass 2, as autograd through the
    reference does implicitly) removes the part of that error that is not centred,
    which would otherwise reach the gradient.
    """
    b = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    entry = b * W + w
    n = tl.load(n_ptr + entry).to(tl.int32)
    scale = tl.load(scale_ptr + entry)
    if scale != 0.0:
        if UNBIASED:
            nf = tl.maximum(n, 4).to(tl.float32)
        else:
            nf = tl.maximum(n, 1).to(tl.float32)
        a = tl.load(stats_ptr + entry * ROW + COL_A)
        ratio_x = a / tl.load(stats_ptr + entry * ROW + COL_B)
        ratio_y = a / tl.load(stats_ptr + entry * ROW + COL_C)
        t_x = tl.load(stats_ptr + entry * ROW + COL_TOTAL_X)
        t_y = tl.load(stats_ptr + entry * ROW + COL_TOTAL_Y)
        bwx = tl.load(bw_ptr + entry * 2)
        bwy = tl.load(bw_ptr + entry * 2 + 1)
        gx = gx_ptr + b * stride_gxb + w * stride_gxw
        gy = gy_ptr + b * stride_gyb + w * stride_gyw
        rs = rs_ptr + b * stride_rsb + w * stride_rsw
        cols = tl.arange(0, KP)
        col_ok = cols < n
        sqx_c = tl.load(gx + cols * (stride_gxi + stride_gxj), mask=col_ok, other=0.0)
        sqy_c = tl.load(gy + cols * (stride_gyi + stride_gyj), mask=col_ok, other=0.0)

        # Pass 1: column sums of dK and dL.
        col_k = tl.zeros([KP], dtype=tl.float32)
        col_l = tl.zeros([KP], dtype=tl.float32)
        for r0 in range(0, n, BM):
            rows = r0 + tl.arange(0, BM)
            _, _, dk, dl = _kernel_grads(
                gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rs, stride_rss, rows, cols,
                rows < n, col_ok, sqx_c, sqy_c, bwx, bwy, t_x, t_y, nf, scale, ratio_x, ratio_y, RBF, UNBIASED,
            )
            col_k += tl.sum(dk, axis=0)
            col_l += tl.sum(dl, axis=0)
        tot_k = tl.sum(col_k, axis=0)
        tot_l = tl.sum(col_l, axis=0)

        # Pass 2: centre dK (dL) again and turn it into the Gram coefficient.
        for r0 in range(0, n, BM):
            rows = r0 + tl.arange(0, BM)
            row_ok = rows < n
            valid = row_ok[:, None] & col_ok[None, :]
            kx, ky, dk, dl = _kernel_grads(
                gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rs, stride_rss, rows, cols,
                row_ok, col_ok, sqx_c, sqy_c, bwx, bwy, t_x, t_y, nf, scale, ratio_x, ratio_y, RBF, UNBIASED,
            )
            offs = rows[:, None] * stride_ei + cols[None, :] * stride_ej
            dk = centred_tile(dk, tl.sum(dk, axis=1), col_k, tot_k, nf, rows, cols, valid, UNBIASED)
            e_offs = b * stride_eb + w * stride_ew + offs
            tl.store(ex_ptr + e_offs, _gram_grad(dk, kx, bwx, rows, cols, valid, RBF), mask=valid)
            if FULL_GRAD:
                dl = centred_tile(dl, tl.sum(dl, axis=1), col_l, tot_l, nf, rows, cols, valid, UNBIASED)
                tl.store(ey_ptr + e_offs, _gram_grad(dl, ky, bwy, rows, cols, valid, RBF), mask=valid)


@autotune(_DX_FAST_CONFIGS, _DX_IEEE_CONFIGS, _DX_INTERPRETER_CONFIG, key=["K_BUCKET", "D", "DOT"])
@triton.jit
def _dx_kernel(
    x_ptr, order_ptr, kmax_ptr, shift_ptr, bounds_ptr, coef_ptr, dx_ptr,
    T, D, K_BUCKET, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot,
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
    kmax = tl.load(kmax_ptr + b)
    row_ok = rows < kmax
    # Segments with a gradient that meet this column block: [s_first, s_end).
    seg = tl.arange(0, SEG_P2)
    upper = tl.load(bounds_ptr + 1 + seg, mask=seg < N_SEG, other=0)
    lower = tl.load(bounds_ptr + seg, mask=seg < N_SEG, other=0)
    s_first = tl.sum((seg < N_SEG) & (upper <= c_lo), axis=0)
    s_end = tl.sum((seg < N_SEG) & (lower < c_lo + BLOCK_D), axis=0)
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
            c = tl.load(coef + s * stride_cs + offs, mask=tile_ok & (s < N_PREFIX), other=0.0)
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
    gx: torch.Tensor, gy: torch.Tensor, n: torch.Tensor, bw: torch.Tensor, stats: torch.Tensor,
    rowsums: torch.Tensor, scale: torch.Tensor, *, kernel: str, unbiased: bool, full_grad: bool,
) -> torch.Tensor:
    """``(B, W + full_grad, k, k)`` fp32 coefficients: slot ``w`` the sum of the x-side
    coefficients of widths ``>= w`` (the coefficient of column segment ``w``), slot
    ``W`` the sum of the y-side (full-width) coefficients of every width."""
    batch, widths, size, _ = gx.shape
    # Slots [0, W): x side; W: the full-width sum; (W, 2W]: y side per width.
    slots = 2 * widths + 1 if full_grad else widths
    buf = torch.zeros(batch, slots, size, size, device=gx.device, dtype=torch.float32)
    if batch == 0:
        return buf[:, : widths + int(full_grad)]
    bm, kp = row_block(size)
    _coef_kernel[(batch, widths)](
        gx, gy, n.contiguous(), torch.nan_to_num(bw, nan=1.0), stats, rowsums,
        scale.contiguous(), buf, buf[:, widths + 1:] if full_grad else buf, widths,
        *gx.stride(), *gy.stride(), *rowsums.stride()[:3], *buf.stride(),
        RBF=kernel == "rbf", UNBIASED=unbiased, FULL_GRAD=full_grad, KP=kp, BM=bm, num_warps=NUM_WARPS,
    )
    for w in range(widths - 2, -1, -1):
        buf[:, w] += buf[:, w + 1]
    if full_grad:
        torch.sum(buf[:, widths + 1:], dim=1, out=buf[:, widths])
    return buf[:, : widths + int(full_grad)]


def input_grad(
    x: torch.Tensor, order: torch.Tensor, kmax: torch.Tensor, shift: torch.Tensor,
    bounds: tuple[int, ...], coef: torch.Tensor, *, n_prefix: int, full_grad: bool, precision: str,
) -> torch.Tensor:
    """Gradient ``(B, T, D)`` in ``x.dtype``: zero except at the selected rows (every
    entry is written by the kernel; nothing is zero-filled first)."""
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    if x.shape[0] > 0:
        launch_dx(x, order, kmax, shift, bounds, coef, dx, n_prefix=n_prefix, full_grad=full_grad,
                  precision=precision)
    return dx


def launch_dx(
    x: torch.Tensor, order: torch.Tensor, kmax: torch.Tensor, shift: torch.Tensor,
    bounds: tuple[int, ...], coef: torch.Tensor, dx: torch.Tensor, *, n_prefix: int, full_grad: bool,
    precision: str,
) -> None:
    """Write every entry of ``dx (B, T, D)`` from the coefficients ``coef (B, S', k, k)``
    (slots ``[0, n_prefix)`` per column segment, slot ``n_prefix`` the full width's)."""
    batch, tokens, depth = x.shape

    def grid(meta):
        return (batch * triton.cdiv(tokens, meta["BM"]) * triton.cdiv(depth, meta["BLOCK_D"]),)

    _dx_kernel[grid](
        x, order, kmax, shift, device_bounds(bounds, x.device), coef, dx,
        tokens, depth, k_bucket(coef.shape[-1]), *x.stride(), *order.stride(), *coef.stride(), *dx.stride(),
        N_SEG=len(bounds) - 1, SEG_P2=triton.next_power_of_2(len(bounds) - 1), N_PREFIX=n_prefix,
        FULL_GRAD=full_grad, ALIGN=alignment(bounds), DOT=grad_dot(x.dtype, precision), INTERPRET=INTERPRETING,
    )


def upstream_scale(grad: torch.Tensor, value: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    """``grad / sqrt(b c)`` at defined entries, 0 at undefined ones (whatever grad holds)."""
    defined = torch.isfinite(value)
    denom = torch.sqrt(torch.where(defined, stats[..., B] * stats[..., C], torch.ones_like(value)))
    return torch.where(defined, grad.to(torch.float32) / denom, torch.zeros_like(value))
