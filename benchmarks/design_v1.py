"""The work of the first fused backend ("v1"), read off its kernels: the prediction
its benchmark rows are held against.

v1 is the design described in ``docs/kernels.md`` before the kernels were rebuilt for
speed: a score-and-rank pass, a shift pre-pass, one nested Gram sweep storing every
prefix Gram ``(B, S, k, k)`` in fp32, the statistics (and, for RBF, the median
bisection) with one program per (example, width), and in the backward a zero-filled
coefficient buffer ``(B, W, k, k)`` reduced by torch slice additions, then one
input-gradient sweep. :func:`design_traffic` counts, for one call of the benchmarked
loss (``NestedCKALoss(..., detach_full=True, backend="triton")(x, scores="cls",
mask=mask)``):

* bytes: what each launch loads and stores, masked lanes excluded, with no reuse
  between programs (the example index is the fastest grid axis, so one example's
  programs run far apart and their common rows rarely meet in L2), and within a
  program only what it loads again from memory (each pass of the statistics kernels
  loads its block again);
* FLOPs: every fp32 ``"ieee"`` dot runs on the FMA units at its full tile size,
  padding included (tiles past an example's own count still sweep the whole width);
  elementwise work per entry is a rough count;
* launches: 5 Triton kernels forward (7 for RBF with the median bandwidth), 2
  backward, and the torch operations between them, counted by running the loss
  (55 forward + 7 per width given as a fraction or 3 per width given as a count; 54
  for RBF; 22 + W backward, among them autograd's zero gradients of the op's five
  unused outputs).

The signature is the one a design model must have for :mod:`benchmarks.roofline`
(the fused backend's own model, ``mipic_kernels.fused.traffic.design_traffic``, takes
the same keyword arguments and returns an object with ``bytes``, ``flops_tc``,
``flops_fma`` and ``launches``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from mipic_kernels import selection
from mipic_kernels.rules import segment_bounds

from .roofline import Traffic

# Block sizes of the v1 kernels.
_RANK_BLOCK = 64
_SCORE_BLOCK_T = 32
_GRAM_BLOCK_D = 16
_DX_BLOCK_K = 16
_STATS_TILE = 2048
_MEDIAN_SWEEPS = 31

# Torch operations per call, counted by running the loss (see the module docstring).
_TORCH_FORWARD = {"linear": 55, "rbf": 54}
_TORCH_PER_WIDTH = {float: 7, int: 3}
_TORCH_BACKWARD = 22

# Rough FMA-unit FLOPs per element of a (rows x padded columns) tile, all passes of a
# kernel together: statistics (pass 1 sums, pass 2 centring and products, both sides),
# coefficients (two passes of kernel, centring and gradient tiles), median (distance,
# two comparisons and counts per sweep).
_STATS_PER_ELEMENT = {"linear": 28, "rbf": 56}
_COEF_PER_ELEMENT = {"linear": 58, "rbf": 92}
_MEDIAN_PER_ELEMENT = 12


def _np2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def design_traffic(
    *, tokens: int, depth: int, lengths: Sequence[int], dims: Sequence[int], k: object, k_min: int,
    dtype: torch.dtype, mode: str, kernel: str,
) -> Traffic:
    """Traffic of one call of the benchmarked loss on v1's kernels.

    ``x`` is ``(B, tokens, depth)`` of ``dtype`` after flattening, example ``b`` has
    ``lengths[b]`` real tokens, ``dims``, ``k`` and ``k_min`` are the loss's arguments,
    ``mode`` one of ``forward``, ``backward``, ``full``, ``no-grad`` and ``kernel``
    ``linear`` or ``rbf`` (median bandwidth).
    """
    counts = selection.resolve_k(k, k_min, torch.tensor(list(lengths), dtype=torch.int64), len(dims)).tolist()
    shape = _Shape(tokens, depth, tuple(dims), counts, selection.gram_edge(k, k_min, tokens),
                   torch.empty((), dtype=dtype).element_size(), kernel)
    specs = [] if k is None else [k] * len(dims) if isinstance(k, int) else list(k)
    launches = _TORCH_FORWARD[kernel] + sum(_TORCH_PER_WIDTH[type(s)] for s in specs) + 5 + 2 * (kernel == "rbf")
    forward = _forward(shape) + Traffic(launches=launches)
    backward = _backward(shape) + Traffic(launches=_TORCH_BACKWARD + len(dims) + 2)
    if mode in ("forward", "no-grad"):
        return forward
    if mode == "backward":
        return backward
    if mode == "full":
        return forward + backward
    raise ValueError(f"mode must be forward, backward, full or no-grad; got {mode!r}")


class _Shape:
    """What the kernels' sizes depend on."""

    def __init__(self, tokens: int, depth: int, dims: tuple[int, ...], counts: list[list[int]], edge: int,
                 itemsize: int, kernel: str) -> None:
        self.T, self.D, self.dims, self.counts, self.K, self.s = tokens, depth, dims, counts, edge, itemsize
        self.kernel = kernel
        self.B, self.W = len(counts), len(dims)
        self.bounds = segment_bounds(dims, depth)
        self.S = len(self.bounds) - 1
        self.widest = [max(row) for row in counts]
        self.kp = max(16, _np2(edge))
        self.bm = max(1, min(self.kp, _STATS_TILE // self.kp))  # rows per block of the k x k kernels


def _forward(p: _Shape) -> Traffic:
    return _ranking(p) + _shift(p) + _grams(p) + _medians(p) + _statistics(p)


def _backward(p: _Shape) -> Traffic:
    return _zero_gradients(p) + _coefficients(p) + _input_gradient(p)


def _ranking(p: _Shape) -> Traffic:
    # Score: every position (padding too) at full width, the query row again per block.
    score_blocks = math.ceil(p.T / _SCORE_BLOCK_T)
    score = Traffic(p.B * ((p.T + score_blocks) * p.D * p.s + 4 * p.T), 0, 2.0 * p.B * p.T * p.D)
    # Rank: each block of 64 tokens reads all T keys and mask bytes, writes the order.
    rank_blocks = math.ceil(p.T / _RANK_BLOCK)
    rank = Traffic(p.B * (5 * p.T * (rank_blocks + 1) + 8 * p.T), 0, 8.0 * p.B * rank_blocks * _RANK_BLOCK * p.T)
    counts = Traffic(p.B * p.T)  # mask.sum for the per-width counts
    return score + rank + counts


def _shift(p: _Shape) -> Traffic:
    block_d = min(128, max(16, _np2(p.D)))
    col_blocks = math.ceil(p.D / block_d)
    rows = sum(p.widest)
    return Traffic(rows * (p.D * p.s + 8 * col_blocks) + 4 * p.B * p.D, 0, rows * p.D)


def _grams(p: _Shape) -> Traffic:
    block = min(max(16, _np2(p.K)), 32)
    tiles = math.ceil(p.K / block)
    pairs = tiles * (tiles + 1) // 2  # programs with ti <= tj; the others exit at once
    steps = sum(math.ceil((hi - lo) / _GRAM_BLOCK_D) for lo, hi in zip(p.bounds, p.bounds[1:]))
    # Every tile's valid rows are read by `tiles` programs; the shift row once per side.
    loads = sum(n * (tiles * p.D * p.s + 8 * (tiles + 1)) for n in p.widest) + p.B * tiles * tiles * p.D * 4
    stores = p.B * p.S * (p.K * p.K + p.K) * 4
    flops = p.B * pairs * steps * (2 * block * block * _GRAM_BLOCK_D + 2 * block * _GRAM_BLOCK_D)
    return Traffic(loads + stores, 0, flops)


def _block_rows(n: int, bm: int) -> int:
    """Rows a loop over ``n`` rows in blocks of ``bm`` computes (the last block padded)."""
    return math.ceil(n / bm) * bm


def _medians(p: _Shape) -> Traffic:
    if p.kernel != "rbf":
        return Traffic()
    per_side = Traffic(
        sum(_MEDIAN_SWEEPS * (n * n + n) * 4 + 4 * n + 4 for row in p.counts for n in row), 0,
        sum(_MEDIAN_SWEEPS * _block_rows(n, p.bm) * p.kp * _MEDIAN_PER_ELEMENT for row in p.counts for n in row),
    )
    return per_side + per_side


def _statistics(p: _Shape) -> Traffic:
    entries = [n for row in p.counts for n in row]
    # Two passes over both k x k blocks (with their diagonals), the diagonals once more,
    # row sums and the 7-number record out; rowsums is zero-filled first.
    kernel = Traffic(
        sum(2 * 2 * (n * n + n) * 4 + 2 * n * 4 + 2 * n * 4 + 28 for n in entries) + p.B * p.W * 2 * p.K * 4, 0,
        sum(_block_rows(n, p.bm) * p.kp * _STATS_PER_ELEMENT[p.kernel] for n in entries),
    )
    # torch: the masked squared norms of the definedness rule, (B, W, k) sized.
    values = Traffic(p.B * p.W * p.K * 34 + 4 * p.B * p.K)
    return kernel + values


def _zero_gradients(p: _Shape) -> Traffic:
    # Autograd fills a zero gradient for each output of the op that the loss does not use.
    return Traffic(4 * p.B * (p.S * p.K * p.K + p.D + p.W * (2 + 7 + 2 * p.K)))


def _coefficients(p: _Shape) -> Traffic:
    entries = [n for row in p.counts for n in row]
    buffer = p.B * p.W * p.K * p.K * 4
    # Per entry, two passes: both k x k blocks with diagonals, the row sums at rows and
    # columns of every row block; then the coefficient block out.
    kernel = Traffic(
        sum(2 * n * 4 + 2 * (2 * (n * n + n) + 2 * (n + math.ceil(n / p.bm) * n)) * 4 + n * n * 4 for n in entries),
        0, sum(_block_rows(n, p.bm) * p.kp * _COEF_PER_ELEMENT[p.kernel] for n in entries),
    )
    # The buffer is zero-filled, then slot w += slot w + 1 for w = W-2 .. 0 (read 2, write 1).
    torch_ops = Traffic(buffer + (p.W - 1) * 3 * p.B * p.K * p.K * 4)
    return kernel + torch_ops


def _input_gradient(p: _Shape) -> Traffic:
    bm = min(64, max(16, _np2(p.K)))
    block_d = min(64, max(16, _np2(p.D)))
    row_programs = math.ceil(p.K / bm)
    col_blocks = math.ceil(p.D / block_d)
    # (column block, prefix segment) pairs that overlap: each reruns the token loop.
    visits = sum(
        1 for c in range(col_blocks) for lo, hi in zip(p.bounds[:p.W], p.bounds[1:p.W + 1])
        if lo < (c + 1) * block_d and hi > c * block_d
    )
    prefix = p.dims[-1]
    zeros = p.B * p.T * p.D * p.s  # dx is zero-filled first
    loads = sum(
        visits * n * n * 4  # coefficient rows of the block x the example's tokens, per visit
        + row_programs * (visits * n * 8 + n * prefix * p.s + math.ceil(n / _DX_BLOCK_K) * prefix * 4)
        + col_blocks * n * 8
        for n in p.widest
    )
    stores = sum(n * p.D * p.s for n in p.widest)
    flops = sum(row_programs * visits * math.ceil(n / _DX_BLOCK_K) * 2 * bm * _DX_BLOCK_K * block_d
                for n in p.widest)
    return Traffic(zeros + loads + stores, 0, flops)
