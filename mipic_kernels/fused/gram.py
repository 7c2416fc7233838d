"""Forward sweep over the feature columns: the shift pre-pass and the nested Gram kernel.

Both kernels read the selected tokens straight from ``x`` through the ranking
``order`` (see :mod:`.tl_utils`). Rows at and past the example's widest count
``kmax[b] = max_w n[b, w]`` (taken in the kernels from the counts ``n``) read as zero,
and tiles made only of such rows are not computed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import INTERPRETING, alignment, autotune, device_bounds, gram_dot, k_bucket
from .tl_utils import dot_split, load_shifted, split, triangle_tile, widest_count

_SHIFT_BLOCK_R = 32
_SHIFT_BLOCK_D = 128

# Gram tiles of BLOCK x BLOCK rows over BLOCK_D columns per step. BLOCK_D = 64 keeps the
# waste of narrow leading widths (16, 32 columns) small. Each scheme's candidates
# compile for sm_90 without register spills (docs/kernels.md, made by
# scripts/kernel_resources.py). The interpreter's tile of 16 rows makes the tests'
# small Gram edges span several tiles.
_GRAM_64 = [
    triton.Config({"BLOCK": 64, "BLOCK_D": 64}, num_warps=8, num_stages=stages) for stages in (3, 2)
]
_GRAM_32 = [triton.Config({"BLOCK": 32, "BLOCK_D": 64}, num_warps=4, num_stages=3)]
_GRAM_CONFIGS = [*_GRAM_64, *_GRAM_32]
_GRAM_INTERPRETER_CONFIG = triton.Config({"BLOCK": 16, "BLOCK_D": 64}, num_warps=4)


def _gram_candidates(kwargs: dict) -> list[triton.Config]:
    # tf32x3 spills on 32-row tiles; fp32 FMA dots ("ieee") on 64-row tiles at 3 stages.
    return {"tf32x3": _GRAM_64, "ieee": [_GRAM_64[0], *_GRAM_32]}.get(kwargs["DOT"], _GRAM_CONFIGS)


@triton.jit
def _shift_kernel(
    x_ptr, order_ptr, n_ptr, shift_ptr,
    D, W, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot, stride_nb, stride_nw,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Column mean of each example's ``kmax`` selected rows, rounded to the input dtype
    (so that ``x - shift`` is exact in fp32): the shift of every Gram."""
    col_blocks = tl.cdiv(D, BLOCK_D)
    pid = tl.program_id(0)
    b = (pid // col_blocks).to(tl.int64)
    cols = (pid % col_blocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    kmax = widest_count(n_ptr, b, stride_nb, stride_nw, W)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(0, kmax, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < kmax
        pos = tl.load(order_ptr + b * stride_ob + rows * stride_ot, mask=row_ok, other=0)
        ptrs = x_ptr + b * stride_xb + pos[:, None] * stride_xt + cols[None, :] * stride_xd
        v = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(v, axis=0)
    mean = acc / tl.maximum(kmax, 1).to(tl.float32)
    shift = mean.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(shift_ptr + b * D + cols, shift, mask=col_ok)


@autotune(_GRAM_CONFIGS, _gram_candidates, _GRAM_INTERPRETER_CONFIG, key=["K_BUCKET", "D", "DOT"])
@triton.jit
def _gram_kernel(
    x_ptr, order_ptr, n_ptr, shift_ptr, bounds_ptr, g_ptr, sq_ptr,
    D, K, K_BUCKET, W, stride_xb, stride_xt, stride_xd, stride_ob, stride_ot, stride_nb, stride_nw,
    stride_gb, stride_gs, stride_gi, stride_gj, stride_sqb, stride_sqs,
    N_SEG: tl.constexpr, ALIGN: tl.constexpr, DOT: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Tile ``(ti, tj)`` of the Gram of every nested width in one sweep over the columns.

    The grid is ``B x`` the upper triangle of tiles, flattened with the example
    slowest. Segment ``s`` covers columns ``[bounds[s], bounds[s+1])``; after it the
    running tile is the Gram of the prefix ``:bounds[s+1]`` and is stored to slot
    ``s``, both halves (the Gram is symmetric), when its rows are used: slot ``s`` is
    read over the leading ``n[b, s]`` rows, the last (full-width) slot over ``kmax[b]``.
    Diagonal tiles also store the running squared norms of the unshifted rows. Tiles
    past ``kmax`` (padding) exit at once.
    """
    n_tiles = tl.cdiv(K, BLOCK)
    per_example = n_tiles * (n_tiles + 1) // 2
    pid = tl.program_id(0)
    b = (pid // per_example).to(tl.int64)
    ti, tj = triangle_tile(pid % per_example)
    kmax = widest_count(n_ptr, b, stride_nb, stride_nw, W)
    if tj * BLOCK >= kmax:
        return
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
        if ALIGN > 1:
            lo = tl.multiple_of(lo, ALIGN)
            hi = tl.multiple_of(hi, ALIGN)
        for d0 in range(lo, hi, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < hi
            raw_i, z_i = load_shifted(
                x_ptr, b, stride_xb, stride_xt, stride_xd, pos_i, ok_i, shift_ptr, D, cols, col_ok
            )
            sq += tl.sum(raw_i * raw_i, axis=1)
            if DOT == "fp16x3":
                z_i = z_i * 0.5  # |x - shift| / 2 stays within fp16's range
            hi_i, lo_i = split(z_i, DOT, INTERPRET)
            # Diagonal tiles load their rows twice (from L1): cheaper than two code paths.
            _, z_j = load_shifted(
                x_ptr, b, stride_xb, stride_xt, stride_xd, pos_j, ok_j, shift_ptr, D, cols, col_ok
            )
            if DOT == "fp16x3":
                z_j = z_j * 0.5
            hi_j, lo_j = split(z_j, DOT, INTERPRET)
            acc = dot_split(hi_i, lo_i, tl.trans(hi_j), tl.trans(lo_j), acc, DOT, INTERPRET)
        if s == N_SEG - 1:
            used = kmax
        else:
            used = tl.load(n_ptr + b * stride_nb + s * stride_nw)
        if tj * BLOCK < used:
            gram = acc * 4.0 if DOT == "fp16x3" else acc
            base = g_ptr + b * stride_gb + s * stride_gs
            tl.store(base + ri[:, None] * stride_gi + rj[None, :] * stride_gj, gram, mask=store_ok)
            if ti != tj:
                tl.store(base + rj[:, None] * stride_gi + ri[None, :] * stride_gj, tl.trans(gram),
                         mask=(rj[:, None] < K) & (ri[None, :] < K))
            else:
                tl.store(sq_ptr + b * stride_sqb + s * stride_sqs + ri, sq, mask=ri < K)


def nested_grams(
    x: torch.Tensor, order: torch.Tensor, n: torch.Tensor,
    bounds: tuple[int, ...], k_top: int, *, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shifted Grams of every column prefix ``:bounds[s+1]`` over the top ``kmax`` rows.

    ``x (B, T, D)`` any strides, ``order (B, T)`` int64, ``n (B, W)`` int64 the rows each
    prefix slot is read over (slot ``s < S - 1`` over ``n[:, s]``), at most ``k_top``,
    whose largest per example is ``kmax``; ``precision`` ``"fast"`` or ``"ieee"``. Returns
    ``grams (B, S, k_top, k_top)`` fp32 with ``S = len(bounds) - 1``, defined over the
    leading ``n[b, s]`` (last slot: ``kmax[b]``) rows and columns, to tile granularity,
    and not written elsewhere; ``sq (B, S, k_top)`` fp32, the running squared norms of
    the unshifted rows, over the same rows; ``shift (B, D)`` fp32, the column mean
    (rounded to ``x.dtype``) every Gram was shifted by.
    """
    batch, _, depth = x.shape
    n_seg = len(bounds) - 1
    f32 = dict(device=x.device, dtype=torch.float32)
    shift = torch.empty(batch, depth, **f32)
    grams = torch.empty(batch, n_seg, k_top, k_top, **f32)
    sq = torch.empty(batch, n_seg, k_top, **f32)
    if batch > 0:
        launch_shift(x, order, n, shift)
        launch_gram(x, order, n, shift, bounds, grams, sq, precision=precision)
    return grams, sq, shift


def launch_shift(x: torch.Tensor, order: torch.Tensor, n: torch.Tensor, shift: torch.Tensor) -> None:
    """Write ``shift (B, D)``: the column mean of each example's ``max_w n[b, w]``
    selected rows, rounded to ``x.dtype``."""
    batch, _, depth = x.shape
    _shift_kernel[(batch * triton.cdiv(depth, _SHIFT_BLOCK_D),)](
        x, order, n, shift, depth, n.shape[1], *x.stride(), *order.stride(), *n.stride(),
        BLOCK_R=_SHIFT_BLOCK_R, BLOCK_D=_SHIFT_BLOCK_D, num_warps=4,
    )


def launch_gram(
    x: torch.Tensor, order: torch.Tensor, n: torch.Tensor, shift: torch.Tensor,
    bounds: tuple[int, ...], grams: torch.Tensor, sq: torch.Tensor, *, precision: str,
) -> None:
    """Write the tiles of ``grams (B, S, k, k)`` and ``sq (B, S, k)`` that
    :func:`nested_grams` defines (and nothing else), for rows shifted by ``shift``."""
    batch, _, depth = x.shape
    k_top = grams.shape[-1]

    def grid(meta):
        tiles = triton.cdiv(k_top, meta["BLOCK"])
        return (batch * tiles * (tiles + 1) // 2,)

    _gram_kernel[grid](
        x, order, n, shift, device_bounds(bounds, x.device), grams, sq,
        depth, k_top, k_bucket(k_top), n.shape[1], *x.stride(), *order.stride(), *n.stride(),
        *grams.stride(), sq.stride(0), sq.stride(1),
        N_SEG=len(bounds) - 1, ALIGN=alignment(bounds), DOT=gram_dot(x.dtype, precision),
        INTERPRET=INTERPRETING,
    )
