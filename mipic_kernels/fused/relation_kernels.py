"""Kernels of the span relation distance (see :mod:`.relation_op` for how they fit).

* :func:`_pool_kernel`: the weighted sum of each span's tokens, read straight from the
  token states (a one-hot weight tile times a token tile per step, so spans need not
  be contiguous), over the token range that holds the spans of its tile.
* :func:`_value_kernel` and :func:`_coef_kernel`: the relation matrices of both sides
  from the Grams of their (unit, shifted) span vectors, formed on the fly from Gram
  tiles with the shared tile helpers, reduced to the entry's value, or turned into the
  Gram coefficient of the backward pass.
* :func:`_unpool_kernel`: the span gradients back to the tokens, scaled by their weights.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .tl_utils import distance_tile, load_gram_tile


@triton.jit
def _pool_kernel(
    x_ptr, spans_ptr, w_ptr, lo_ptr, hi_ptr, p_ptr,
    S, D, N_TILES, stride_xb, stride_xt, stride_xd, stride_sb, stride_st, stride_wb, stride_wt,
    stride_pb, stride_ps, stride_pd,
    BS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr,
):
    """``p[b, s, cols] = sum of w_t x[b, t, cols]`` over the tokens ``t`` of span ``s``, for
    the ``BS`` spans of one tile; tokens ``[lo, hi)`` hold every token of the tile's spans."""
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    ids = tile * BS + tl.arange(0, BS)
    cols = tl.program_id(2) * BD + tl.arange(0, BD)
    col_ok = cols < D
    t_lo = tl.load(lo_ptr + b * N_TILES + tile)
    t_hi = tl.load(hi_ptr + b * N_TILES + tile)
    acc = tl.zeros([BS, BD], dtype=tl.float32)
    for t0 in range(t_lo, t_hi, BT):
        ts = t0 + tl.arange(0, BT)
        t_ok = ts < t_hi
        sid = tl.load(spans_ptr + b * stride_sb + ts * stride_st, mask=t_ok, other=-1)
        # Only this tile's tokens are read: others (padding included) may hold anything.
        mine = t_ok & (sid >= tile * BS) & (sid < tile * BS + BS)
        w = tl.load(w_ptr + b * stride_wb + ts * stride_wt, mask=mine, other=0.0).to(tl.float32)
        onehot = tl.where(sid[None, :] == ids[:, None], w[None, :], 0.0)
        xs = tl.load(
            x_ptr + b * stride_xb + ts[:, None] * stride_xt + cols[None, :] * stride_xd,
            mask=mine[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.dot(onehot, xs, input_precision="ieee")
    out = p_ptr + b * stride_pb + ids[:, None] * stride_ps + cols[None, :] * stride_pd
    tl.store(out, acc, mask=(ids[:, None] < S) & col_ok[None, :])


@triton.jit
def _penalty(d, beta, SMOOTH: tl.constexpr):
    """``f(d)``: ``d^2``, or the smooth L1 with threshold ``beta``."""
    if SMOOTH:
        a = tl.abs(d)
        return tl.where(a < beta, 0.5 * d * d / beta, a - 0.5 * beta)
    return d * d


@triton.jit
def _penalty_grad(d, beta, SMOOTH: tl.constexpr):
    """``f'(d)``."""
    if SMOOTH:
        return tl.where(tl.abs(d) < beta, d / beta, tl.where(d > 0, 1.0, -1.0))
    return 2.0 * d


@triton.jit
def _relation_diff(
    gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, sqx_c, sqy_c,
):
    """``(Rx - Ry, valid)`` of a row block: ``R_ij = |z_i - z_j|^2 / 2`` from each side's
    Gram tile; ``valid`` marks the off-diagonal pairs of real spans (``diff`` is 0 elsewhere)."""
    tile_x, sqx_r = load_gram_tile(gx, stride_gxi, stride_gxj, rows, cols, row_ok, col_ok)
    tile_y, sqy_r = load_gram_tile(gy, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok)
    valid = row_ok[:, None] & col_ok[None, :] & (rows[:, None] != cols[None, :])
    diff = 0.5 * (distance_tile(tile_x, sqx_r, sqx_c, rows, cols) - distance_tile(tile_y, sqy_r, sqy_c, rows, cols))
    return tl.where(valid, diff, 0.0), valid


@triton.jit
def _value_kernel(
    gx_ptr, gy_ptr, n_ptr, out_ptr, stride_gxb, stride_gxi, stride_gxj, stride_gyb, stride_gyi, stride_gyj,
    beta, SMOOTH: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """The sum over ordered pairs ``i != j < n`` of ``f(Rx_ij - Ry_ij)`` of entry ``b``."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + b).to(tl.int32)
    gx = gx_ptr + b * stride_gxb
    gy = gy_ptr + b * stride_gyb
    cols = tl.arange(0, KP)
    col_ok = cols < n
    sqx_c = tl.load(gx + cols * (stride_gxi + stride_gxj), mask=col_ok, other=0.0)
    sqy_c = tl.load(gy + cols * (stride_gyi + stride_gyj), mask=col_ok, other=0.0)
    total = 0.0
    for r0 in range(0, n, BM):
        rows = r0 + tl.arange(0, BM)
        diff, valid = _relation_diff(
            gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rows, cols, rows < n, col_ok, sqx_c, sqy_c,
        )
        total += tl.sum(tl.sum(tl.where(valid, _penalty(diff, beta, SMOOTH), 0.0), axis=1), axis=0)
    tl.store(out_ptr + b, total)


@triton.jit
def _coef_kernel(
    gx_ptr, gy_ptr, n_ptr, scale_ptr, coef_ptr,
    stride_gxb, stride_gxi, stride_gxj, stride_gyb, stride_gyi, stride_gyj, stride_cb, stride_ci, stride_cj,
    beta, SMOOTH: tl.constexpr, KP: tl.constexpr, BM: tl.constexpr,
):
    """Rows of the x side's Gram coefficient ``2 (diag(C 1) - C)`` of entry ``b``, with
    ``C_ij = scale f'(Rx_ij - Ry_ij)`` the gradient of the value in ``Rx`` (``-C`` in
    ``Ry``). ``scale`` is ``upstream / (n (n - 1))`` and 0 for undefined entries, whose
    rows are skipped (the buffer is zero-filled)."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    n = tl.load(n_ptr + b).to(tl.int32)
    scale = tl.load(scale_ptr + b)
    if (scale != 0.0) & (tl.program_id(1) * BM < n):
        gx = gx_ptr + b * stride_gxb
        gy = gy_ptr + b * stride_gyb
        cols = tl.arange(0, KP)
        col_ok = cols < n
        row_ok = rows < n
        sqx_c = tl.load(gx + cols * (stride_gxi + stride_gxj), mask=col_ok, other=0.0)
        sqy_c = tl.load(gy + cols * (stride_gyi + stride_gyj), mask=col_ok, other=0.0)
        diff, valid = _relation_diff(
            gx, gy, stride_gxi, stride_gxj, stride_gyi, stride_gyj, rows, cols, row_ok, col_ok, sqx_c, sqy_c,
        )
        c = tl.where(valid, scale * _penalty_grad(diff, beta, SMOOTH), 0.0)
        row_sum = tl.sum(c, axis=1)
        coef = 2.0 * (tl.where(rows[:, None] == cols[None, :], row_sum[:, None], 0.0) - c)
        out = coef_ptr + b * stride_cb + rows[:, None] * stride_ci + cols[None, :] * stride_cj
        tl.store(out, coef, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _unpool_kernel(
    dp_ptr, spans_ptr, w_ptr, dx_ptr, T, S, D,
    stride_pb, stride_ps, stride_pd, stride_sb, stride_st, stride_wb, stride_wt, stride_dxb, stride_dxt, stride_dxd,
    BT: tl.constexpr, BD: tl.constexpr,
):
    """``dx[b, t, cols] = w_t dp[b, span_t, cols]`` for tokens in a span (0 elsewhere),
    stored in the dtype of ``dx``."""
    b = tl.program_id(0).to(tl.int64)
    ts = tl.program_id(1) * BT + tl.arange(0, BT)
    cols = tl.program_id(2) * BD + tl.arange(0, BD)
    t_ok = ts < T
    col_ok = cols < D
    sid = tl.load(spans_ptr + b * stride_sb + ts * stride_st, mask=t_ok, other=-1)
    mine = t_ok & (sid >= 0) & (sid < S)
    w = tl.load(w_ptr + b * stride_wb + ts * stride_wt, mask=mine, other=0.0).to(tl.float32)
    row = tl.where(mine, sid, 0)
    g = tl.load(dp_ptr + b * stride_pb + row[:, None] * stride_ps + cols[None, :] * stride_pd,
                mask=mine[:, None] & col_ok[None, :], other=0.0)
    out = dx_ptr + b * stride_dxb + ts[:, None] * stride_dxt + cols[None, :] * stride_dxd
    tl.store(out, (w[:, None] * g).to(dx_ptr.dtype.element_ty), mask=t_ok[:, None] & col_ok[None, :])
