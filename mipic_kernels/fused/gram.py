"""Forward sweep over the feature columns: the shift pre-pass and the nested Gram kernel.

Both kernels read the selected tokens straight from ``x`` through the ranking
``order`` (see :mod:`.tl_utils`). Rows at and past the example's widest count
``kmax[b]`` read as zero.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .tl_utils import load_shifted

# The Gram tile is BLOCK x BLOCK rows (16 is the smallest tile tl.dot accepts) over
# BLOCK_D columns per step. The fp32 "ieee" dot runs on FMA units; 32 x 32 x 16 with
# 4 warps is the largest tile that compiles without register spills on sm_90.
_MAX_GRAM_BLOCK = 32
_GRAM_BLOCK_D = 16
_SHIFT_BLOCK_R = 32


@triton.jit
def _shift_kernel(
    x_ptr, order_ptr, kmax_ptr, shift_ptr,
    D, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Column mean of each example's ``kmax`` selected rows (the shift of every Gram)."""
    b = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    kmax = tl.load(kmax_ptr + b)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, kmax, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < kmax
        pos = tl.load(order_ptr + b * stride_ob + rows * stride_ot, mask=row_ok, other=0)
        ptrs = x_ptr + b * stride_xb + pos[:, None] * stride_xt + cols[None, :] * stride_xd
        v = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=0)
    shift = acc / tl.maximum(kmax, 1).to(tl.float32)
    tl.store(shift_ptr + b * D + cols, shift, mask=col_ok)


@triton.jit
def _gram_kernel(
    x_ptr, order_ptr, kmax_ptr, shift_ptr, bounds_ptr, g_ptr, sq_ptr,
    D, K, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot,
    stride_gb, stride_gs, stride_gi, stride_gj, stride_sqb, stride_sqs,
    N_SEG: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tile (ti, tj) of the Gram of every nested width in one sweep over the columns.

    Segment ``s`` covers columns ``[bounds[s], bounds[s+1])``; after it the running
    tile is the Gram of the prefix ``:bounds[s+1]`` and is stored to slot ``s``. The
    Grams are symmetric: only tiles with ``ti <= tj`` run and store both halves.
    Diagonal tiles also store the running squared norms of the unshifted rows.
    """
    b = tl.program_id(0).to(tl.int64)
    ti = tl.program_id(1)
    tj = tl.program_id(2)
    if ti > tj:
        return
    kmax = tl.load(kmax_ptr + b)
    ri = ti * BLOCK + tl.arange(0, BLOCK)
    rj = tj * BLOCK + tl.arange(0, BLOCK)
    ok_i = ri < kmax
    ok_j = rj < kmax
    pos_i = tl.load(order_ptr + b * stride_ob + ri * stride_ot, mask=ok_i, other=0)
    pos_j = tl.load(order_ptr + b * stride_ob + rj * stride_ot, mask=ok_j, other=0)
    acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    sq = tl.zeros([BLOCK], dtype=tl.float32)
    store_ok = (ri[:, None] < K) & (rj[None, :] < K)
    for s in tl.static_range(N_SEG):
        lo = tl.load(bounds_ptr + s)
        hi = tl.load(bounds_ptr + s + 1)
        for d0 in range(lo, hi, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < hi
            raw_i, z_i = load_shifted(
                x_ptr, b, stride_xb, stride_xt, stride_xd, pos_i, ok_i, shift_ptr, D, cols, col_ok
            )
            sq += tl.sum(raw_i * raw_i, axis=1)
            if ti == tj:
                z_j = z_i
            else:
                _, z_j = load_shifted(
                    x_ptr, b, stride_xb, stride_xt, stride_xd, pos_j, ok_j, shift_ptr, D, cols, col_ok
                )
            acc += tl.dot(z_i, tl.trans(z_j), input_precision="ieee")
        base = g_ptr + b * stride_gb + s * stride_gs
        tl.store(base + ri[:, None] * stride_gi + rj[None, :] * stride_gj, acc, mask=store_ok)
        if ti != tj:
            tl.store(base + ri[:, None] * stride_gj + rj[None, :] * stride_gi, acc, mask=store_ok)
        else:
            tl.store(sq_ptr + b * stride_sqb + s * stride_sqs + ri, sq, mask=ri < K)


@functools.lru_cache(maxsize=None)
def device_bounds(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The column segment bounds as an int64 tensor on ``device``, made once per
    (bounds, device): a per-call ``torch.tensor(bounds, device=...)`` would be a
    host-to-device copy on every call, which a CUDA graph cannot capture."""
    return torch.tensor(bounds, device=device, dtype=torch.int64)


def _gram_block(k_top: int) -> int:
    """Gram tile edge: 16 for ``k_top <= 16``, else 32."""
    return min(max(16, triton.next_power_of_2(k_top)), _MAX_GRAM_BLOCK)


def nested_grams(
    x: torch.Tensor, order: torch.Tensor, kmax: torch.Tensor, bounds: tuple[int, ...], k_top: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted Grams of every column prefix ``:bounds[s+1]`` over the top ``kmax`` rows.

    ``x (B, T, D)`` any strides, ``order (B, T)`` int64, ``kmax (B)`` int64 (at most
    ``k_top``). Returns ``grams (B, S, k_top, k_top)`` fp32 with ``S = len(bounds) - 1``,
    ``sq (B, S, k_top)`` fp32 the running squared norms of the unshifted rows, and
    ``shift (B, D)`` fp32 the column mean every Gram was shifted by.
    """
    batch, _, depth = x.shape
    n_seg = len(bounds) - 1
    dev = x.device
    shift = torch.empty(batch, depth, device=dev, dtype=torch.float32)
    grams = torch.empty(batch, n_seg, k_top, k_top, device=dev, dtype=torch.float32)
    sq = torch.empty(batch, n_seg, k_top, device=dev, dtype=torch.float32)
    if batch == 0:
        return grams, sq, shift
    block_d = min(128, max(16, triton.next_power_of_2(depth)))
    _shift_kernel[(batch, triton.cdiv(depth, block_d))](
        x, order, kmax, shift, depth, *x.stride(), *order.stride(),
        BLOCK_R=_SHIFT_BLOCK_R, BLOCK_D=block_d, num_warps=4,
    )
    block = _gram_block(k_top)
    tiles = triton.cdiv(k_top, block)
    _gram_kernel[(batch, tiles, tiles)](
        x, order, kmax, shift, device_bounds(bounds, dev), grams, sq,
        depth, k_top, *x.stride(), *order.stride(), *grams.stride(), sq.stride(0), sq.stride(1),
        N_SEG=n_seg, BLOCK=block, BLOCK_D=_GRAM_BLOCK_D, num_warps=4,
    )
    return grams, sq, shift
