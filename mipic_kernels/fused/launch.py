"""Host-side launch choices shared by the kernels: the dot scheme of each precision and
dtype, alignment hints, the autotuning key and the config sets.

Under Triton's interpreter every autotuned kernel gets a single config (autotuning
would run each config many times in numpy), chosen small so that the tests' small
shapes still span several tiles; on a GPU the configs are benchmarked once per key
(the first call with a new key synchronises; later calls, and CUDA-graph captures
after that warm-up, do not). Importing this module does not import triton (the byte
model in :mod:`.traffic` uses the dot schemes without it).
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Callable, Sequence

import torch

if TYPE_CHECKING:
    import triton

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

PRECISIONS = ("fast", "ieee")

# Dot schemes (constexpr strings of the kernels, see tl_utils.split / dot_split).
IEEE = "ieee"        # fp32 FMA, no tensor cores
BF16X4 = "bf16x4"    # hi/lo bf16 halves, all four products: every product exact
BF16X3 = "bf16x3"    # hi/lo bf16 halves, lo.lo dropped (relative 2^-16)
FP16X3 = "fp16x3"    # hi/lo fp16 halves of z/2, lo.lo dropped (relative 2^-22)
TF32X3 = "tf32x3"    # hi/lo tf32 halves, lo.lo dropped (relative 2^-22)


def gram_dot(dtype: torch.dtype, precision: str) -> str:
    """Dot scheme of the Gram sweep: rows shifted by a mean rounded to ``dtype`` are
    exact in fp32 and split into two halves of a tensor-core type (see docs/kernels.md,
    Numerics)."""
    if precision == "ieee":
        return IEEE
    return {torch.bfloat16: BF16X4, torch.float16: FP16X3, torch.float32: TF32X3}[dtype]


def grad_dot(dtype: torch.dtype, precision: str) -> str:
    """Dot scheme of the input-gradient sweep (fp32 coefficients times shifted rows):
    bf16 halves for half-precision inputs, whose gradient is rounded to 2^-9 or 2^-12
    on output anyway (fp16 halves could underflow the coefficients), tf32 halves for
    fp32."""
    if precision == "ieee":
        return IEEE
    return TF32X3 if dtype == torch.float32 else BF16X3


def alignment(bounds: Sequence[int]) -> int:
    """The largest power of two up to 16 dividing every column bound: a hint that lets
    the compiler vectorise loads of column blocks starting at a bound."""
    align = 16
    while align > 1 and any(b % align for b in bounds):
        align //= 2
    return align


# Elements of one (BM x KP) register tile of the statistics, median and coefficient
# kernels. With 8 warps they compile to at most ~200 registers per thread without
# spills on sm_90 (docs/kernels.md, scripts/kernel_resources.py, KP 16 ... 512).
_TILE_ELEMENTS = 2048


def row_block(k_top: int) -> tuple[int, int]:
    """(BM, KP): rows per block and the padded column count for ``k_top`` columns."""
    kp = k_bucket(k_top)
    return max(1, min(kp, _TILE_ELEMENTS // kp)), kp


def k_bucket(k_top: int) -> int:
    """The autotuning bucket of a Gram edge: the next power of two (at least 16)."""
    return max(16, 1 << (k_top - 1).bit_length())


class _SingleConfig:
    """What ``triton.autotune`` does with a single config, without its benchmarker
    (triton 3.2 looks up a GPU driver when the decorator runs, even for one config)."""

    def __init__(self, fn: Callable, config: triton.Config) -> None:
        self.fn = fn
        self.config = config

    def __getitem__(self, grid: Callable | tuple) -> Callable:
        def launch(*args, **kwargs):
            meta = {**kwargs, **self.config.kwargs, "num_warps": self.config.num_warps}
            return self.fn[grid(meta) if callable(grid) else grid](*args, **meta)

        return launch


def autotune(
    configs: Sequence[triton.Config], candidates: Callable[[dict], Sequence[triton.Config]],
    interpreter_config: triton.Config, key: Sequence[str],
) -> Callable:
    """``triton.autotune`` over ``configs`` keyed on ``key`` (plus the dtypes of the tensor
    arguments, which triton adds), trying at each launch only ``candidates(kwargs)``
    (a subset of ``configs`` picked from the launch's constexprs, e.g. the dot scheme:
    fp32 FMA dots need smaller steps to stay within the register file), or the single
    ``interpreter_config`` when interpreting. Kernels under it must only write their
    outputs (no accumulation into them), since tuning runs them several times."""
    if INTERPRETING:
        return lambda fn: _SingleConfig(fn, interpreter_config)
    import triton

    def prune(all_configs, named_args, **kwargs):
        wanted = candidates(kwargs)
        return [c for c in all_configs if any(c is w for w in wanted)]

    return triton.autotune(configs=list(configs), key=list(key), prune_configs_by={"early_config_prune": prune})


@functools.lru_cache(maxsize=None)
def device_bounds(bounds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The column segment bounds as an int64 tensor on ``device``, made once per
    (bounds, device): a per-call ``torch.tensor(bounds, device=...)`` would be a
    host-to-device copy on every call, which a CUDA graph cannot capture. (Triton 3.2
    cannot index a constexpr tuple in compiled code, so the bounds are not constexpr;
    :func:`alignment` restores what the compiler needs for vector loads.)"""
    return torch.tensor(bounds, device=device, dtype=torch.int64)
