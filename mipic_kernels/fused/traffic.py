"""Bytes, FLOPs and launches of the fused passes.

A plain model of what each kernel of the fused backend reads from and writes to device
memory (HBM) and how many multiply-adds it issues, for a given workload; no GPU and no
data are needed, only the real-token count of each example. :func:`fused_traffic` gives
every pass; :func:`design_traffic` the totals of one call of the benchmarked loss, with
its launches, which is what ``benchmarks/roofline.py`` predicts each benchmark row from
(the physical minimum lives there too, as ``lower_bound``). docs/kernels.md tabulates
both for the benchmark presets.

Conventions:

* HBM bytes assume that what one example's programs re-read (its selected rows across
  Gram tiles, its ``k x k`` blocks across passes of one kernel) hits in L2: the grids
  run the example as the slowest axis so that these re-reads are adjacent in time. A
  block re-read by a *later* kernel is counted again.
* FLOPs count a multiply-add as 2. Tensor-core passes count every product of the
  split scheme (4 for bf16 halves, 3 for fp16 or tf32 halves), at the rate of their
  operand type; fp32 FMA passes count at the FMA rate. Element-wise work on ``k x k``
  tiles (kernel matrices, centring) is counted at the FMA rate.
* The epilogue (the statistics' row-block partials summed, the definedness rule and
  ``a / sqrt(bc)``, one small kernel) reads the partials and writes ``(B, W)`` records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from ..rules import segment_bounds
from ..selection import KSpec, gram_edge, resolve_k
from .launch import gram_dot, grad_dot, row_block

MODES = ("forward", "backward", "full", "no-grad")

# Dense peak rates of one H100 SXM (per second): HBM3 bandwidth, bf16/fp16 and tf32
# tensor-core FLOPs, fp32 FMA FLOPs.
H100 = {"bytes": 3.35e12, "bf16": 990e12, "tf32": 495e12, "fp32": 67e12}

_PRODUCTS = {"ieee": 1, "bf16x4": 4, "bf16x3": 3, "fp16x3": 3, "tf32x3": 3}
_UNIT = {"ieee": "fp32", "bf16x4": "bf16", "bf16x3": "bf16", "fp16x3": "bf16", "tf32x3": "tf32"}
# The column step of the sweeps (BLOCK_D of every tuned config) and the Gram tile edge.
_COLUMN_STEP = 64
GRAM_TILE = 64


@dataclass(frozen=True)
class Pass:
    """One kernel (or torch step): HBM bytes read and written, and FLOPs by unit
    (``"bf16"``/``"tf32"`` tensor cores, ``"fp32"`` FMA)."""

    name: str
    read: float
    written: float
    flops: dict[str, float] = field(default_factory=dict)

    def seconds(self, peaks: dict[str, float] = H100) -> float:
        """Its time at the peak rates: the slower of its memory and its arithmetic."""
        compute = sum(f / peaks[unit] for unit, f in self.flops.items())
        return max((self.read + self.written) / peaks["bytes"], compute)


@dataclass(frozen=True)
class Traffic:
    """The passes of one call in order, and what the fused design keeps allocated."""

    passes: tuple[Pass, ...]
    held: float = 0.0        # bytes kept from the forward pass for the backward pass
    peak_extra: float = 0.0  # bytes allocated at once during the call, beyond x and held

    @property
    def bytes(self) -> float:
        return sum(p.read + p.written for p in self.passes)

    @property
    def flops(self) -> float:
        return sum(sum(p.flops.values()) for p in self.passes)

    def seconds(self, peaks: dict[str, float] = H100) -> float:
        """The time of all passes at the peak rates, each bound by its memory or its
        arithmetic (no launch latency, no overlap between passes)."""
        return sum(p.seconds(peaks) for p in self.passes)


def _counts(lengths: Sequence[int], tokens: int, n_widths: int, k: KSpec, k_min: int) -> torch.Tensor:
    real = torch.as_tensor(list(lengths), dtype=torch.int64)
    if ((real < 0) | (real > tokens)).any():
        raise ValueError(f"lengths must be real-token counts in [0, {tokens}]; got {list(lengths)!r}")
    return resolve_k(k, k_min, real, n_widths)


def _padded_columns(bounds: Sequence[int], end: int) -> int:
    """Columns a sweep steps over up to ``end``: each segment in whole column steps."""
    return sum(
        math.ceil((min(hi, end) - lo) / _COLUMN_STEP) * _COLUMN_STEP
        for lo, hi in zip(bounds, bounds[1:]) if lo < end
    )


def _check(dtype: torch.dtype, mode: str) -> int:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype must be float16, bfloat16 or float32; got {dtype}")
    return torch.finfo(dtype).bits // 8


def fused_traffic(
    lengths: Sequence[int], tokens: int, depth: int, dims: Sequence[int], k: KSpec, k_min: int,
    dtype: torch.dtype, *, mode: str, kernel: str = "linear", sigma: Optional[float] = None,
    scores: Optional[str] = "cls", detach_full: bool = True, precision: str = "fast",
) -> Traffic:
    """Bytes and FLOPs of each pass of the fused backend for one ``nested_cka`` call (or
    one ``NestedCKALoss`` call) on examples with ``lengths`` real tokens (leading dims
    flattened); ``tokens``, ``depth``: ``T`` and ``D``; ``mode`` one of :data:`MODES`;
    the other arguments as in :func:`mipic_kernels.nested_cka`.

    ``held`` is what the forward pass keeps for the backward pass (the Gram stack, row
    sums, shift, statistics); ``peak_extra`` what the backward pass allocates on top of
    it (coefficients, row sums of ``dK``, ``dx``), 0 without a backward pass.
    """
    size = _check(dtype, mode)
    if kernel not in ("linear", "rbf"):
        raise ValueError(f"kernel must be 'linear' or 'rbf'; got {kernel!r}")
    widths = len(dims)
    n = _counts(lengths, tokens, widths, k, k_min).double()
    batch = len(lengths)
    k_top = gram_edge(k, k_min, tokens)
    bounds = segment_bounds(dims, depth)
    slots = len(bounds) - 1
    kmax = n.amax(-1) if batch else torch.zeros(0, dtype=torch.float64)
    f32 = 4
    fma = "fp32"

    # Rows each Gram slot is stored over, to whole tiles (at most the buffer's edge).
    used = torch.cat([n[:, : slots - 1], kmax[:, None]], dim=1) if batch else torch.zeros(0, slots)
    stored = torch.clamp(torch.ceil(used / GRAM_TILE) * GRAM_TILE, max=k_top)
    tiles = torch.ceil(kmax / GRAM_TILE)
    blocks = float((n**2).sum())  # the n x n blocks of every entry, each side
    # HBM bytes of one pass over every entry's two blocks: each prefix block, and the
    # full-width block once per example (its widths re-read it from L2).
    block_bytes = (blocks + float((kmax**2).sum())) * f32
    rbf = kernel == "rbf"
    # Element-wise FLOPs per kernel-matrix entry and pass: the kernel (RBF: distance,
    # exp), centring and products, both sides.
    entry_flops = 2 * (12 if rbf else 6)

    passes: list[Pass] = []
    if mode != "backward":
        if scores == "cls":
            passes += [
                Pass("score", batch * tokens * depth * size, batch * tokens * f32, {fma: 2.0 * batch * tokens * depth}),
                Pass("rank", batch * tokens * (f32 + 1), batch * tokens * 8),
            ]
        rows_read = float(kmax.sum()) * (depth * size + 8)
        dot = gram_dot(dtype, precision)
        gram_flops = float((tiles * (tiles + 1) / 2).sum()) * 2 * GRAM_TILE**2 * _padded_columns(bounds, depth)
        passes += [
            Pass("shift", rows_read, batch * depth * f32),
            Pass("gram", rows_read + batch * depth * f32, float((stored**2).sum() + stored.sum()) * f32,
                 {_UNIT[dot]: gram_flops * _PRODUCTS[dot]}),
        ]
        if rbf and sigma is None:
            passes.append(Pass("median", block_bytes, batch * widths * 2 * f32, {fma: 5 * 2 * blocks * 4}))
        partials = batch * widths * math.ceil(k_top / row_block(k_top)[0]) * 9 * f32
        passes += [
            Pass("rowsum", block_bytes, 2 * float(n.sum()) * f32 + partials * 4 / 9, {fma: blocks * entry_flops / 2}),
            Pass("hsic", block_bytes + 2 * float(n.sum()) * f32, partials * 5 / 9, {fma: blocks * entry_flops}),
            Pass("values", partials + batch * widths * (8 + 2 * f32), batch * widths * 10 * f32),
        ]
    if mode in ("backward", "full"):
        coef_slots = widths + (0 if detach_full else 1)
        grad_cols = dims[-1] if detach_full else depth
        dot = grad_dot(dtype, precision)
        passes += [
            Pass("coef rowsum", block_bytes, 2 * float(n.sum()) * f32, {fma: blocks * entry_flops * 1.5}),
            Pass("coef", block_bytes + 2 * float(n.sum()) * f32, coef_slots * float(kmax.sum()) * k_top * f32,
                 {fma: blocks * entry_flops * 2}),
            Pass("dx", coef_slots * float((kmax**2).sum()) * f32 + float(kmax.sum()) * (depth * size + 8),
                 batch * tokens * depth * size,
                 {_UNIT[dot]: 2 * float((kmax**2).sum()) * _padded_columns(bounds, grad_cols) * _PRODUCTS[dot]}),
        ]
    held = batch * (slots * k_top**2 + 2 * widths * k_top + depth + widths * 11) * f32
    peak_extra = 0.0
    if mode in ("backward", "full"):
        peak_extra = batch * ((widths + (0 if detach_full else 1)) * k_top**2 + 2 * widths * k_top) * f32
        peak_extra += batch * tokens * depth * size
    return Traffic(tuple(passes), held=held if mode != "no-grad" else 0.0, peak_extra=peak_extra)


# Torch operations per call of NestedCKALoss(..., backend="triton")(x, scores="cls",
# mask=mask) besides the Triton launches, counted by running the loss under the
# interpreter (tests/test_roofline.py checks them), the same for any widths and for a
# count or fractions as k: the linear kernel's unit bandwidths (a fill) and the loss's
# reduction (8) forward, autograd through that reduction (4, the seed gradient of
# ``backward()`` included) backward.
_TORCH_FORWARD = {"linear": 9, "rbf": 8}
_TORCH_BACKWARD = 4


@dataclass(frozen=True)
class Totals:
    """One call's work as ``benchmarks.roofline`` reads it: HBM bytes, tensor-core FLOPs
    in units of the input dtype's matrix rate there (for float32, where three tf32
    products keep fp32 accuracy, one third of the tf32 products), FMA-unit FLOPs, and
    kernel launches (Triton and torch)."""

    bytes: float
    flops_tc: float
    flops_fma: float
    launches: int


def design_traffic(
    *, tokens: int, depth: int, lengths: Sequence[int], dims: Sequence[int], k: KSpec, k_min: int,
    dtype: torch.dtype, mode: str, kernel: str,
) -> Totals:
    """Totals of one call of the benchmarked loss, ``NestedCKALoss(dims, k=k, k_min=k_min,
    kernel=kernel, detach_full=True, backend="triton")(x, scores="cls", mask=mask)`` with
    the default precision and median bandwidth, in ``mode`` (:data:`MODES`); arguments as
    in :func:`fused_traffic`."""
    work = fused_traffic(lengths, tokens, depth, dims, k, k_min, dtype, mode=mode, kernel=kernel)
    flops = {unit: sum(p.flops.get(unit, 0.0) for p in work.passes) for unit in ("bf16", "tf32", "fp32")}
    launches = len(work.passes)  # every pass is one Triton launch
    if mode != "backward":
        launches += _TORCH_FORWARD[kernel]
    if mode in ("backward", "full"):
        launches += _TORCH_BACKWARD
    return Totals(work.bytes, flops["bf16"] + flops["tf32"] / 3, flops["fp32"], launches)
