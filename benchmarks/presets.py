"""Named benchmark workloads: MIPIC's geometric term at the shapes of real backbones.

A preset fixes everything but the batch size and sequence length, which it sweeps.
Token states are ``x (L, B, T, D)`` (layers x batch x tokens x width) with a padding
mask of varying sequence lengths, ranked by the ``"cls"`` teacher score; the loss is
``NestedCKALoss``: the sum over widths of the mean ``1 - CKA`` (full width detached).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

# MIPIC's token fractions for its six truncated widths, ascending (METHOD.md section 2).
MIPIC_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MIPIC_WIDTHS = (16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class Shape:
    """One workload size: ``x`` is ``(layers, batch, tokens, depth)``."""

    layers: int
    batch: int
    tokens: int
    depth: int

    def __str__(self) -> str:
        return f"L{self.layers}xB{self.batch}xT{self.tokens}xD{self.depth}"


@dataclass(frozen=True)
class Preset:
    """A named workload family.

    ``k`` is one token fraction (or count) per width, or one int for every width;
    ``gpu`` marks the presets run by default on a CUDA device, ``cpu`` those run by
    default without one; ``bandwidth_bound`` adds a row timing a plain copy of ``x``,
    the yardstick of the bandwidth target.
    """

    name: str
    description: str
    layers: int
    batches: tuple[int, ...]
    tokens: tuple[int, ...]
    depth: int
    dims: tuple[int, ...]
    k: Union[int, tuple[float, ...]]
    k_min: int
    gpu: bool = False
    cpu: bool = False
    bandwidth_bound: bool = False

    def shapes(self) -> list[Shape]:
        return [
            Shape(self.layers, b, t, self.depth)
            for t, b in itertools.product(self.tokens, self.batches)
        ]

    def loss_options(self) -> dict:
        """Keyword arguments of ``NestedCKALoss`` (besides ``dims`` and ``backend``)."""
        k = self.k if isinstance(self.k, int) else list(self.k)
        return {"k": k, "k_min": self.k_min, "detach_full": True}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "small", "overhead-bound: launch and Python costs dominate",
            layers=2, batches=(4,), tokens=(32,), depth=64,
            dims=(8, 16, 32), k=(0.3, 0.5, 0.7), k_min=8, gpu=True, cpu=True,
        ),
        Preset(
            "bert-base-cpu", "bert-base widths and token fractions at a CPU-sized batch",
            layers=7, batches=(4,), tokens=(128,), depth=768,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, cpu=True,
        ),
        Preset(
            "bert-base", "BERT-base: 7 SIA layers, widths 16..512 against the full 768",
            layers=7, batches=(16, 64, 128), tokens=(128, 256), depth=768,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, gpu=True,
        ),
        Preset(
            "qwen3-0.6b", "Qwen3-0.6B: 7 SIA layers, widths 16..512 against the full 1024",
            layers=7, batches=(16,), tokens=(512,), depth=1024,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, gpu=True,
        ),
        Preset(
            "large", "bandwidth-bound: wide states, 128 tokens per width",
            layers=7, batches=(16,), tokens=(512,), depth=4096,
            dims=(256, 1024, 2048), k=128, k_min=8, gpu=True, bandwidth_bound=True,
        ),
    )
}


def default_presets(device: torch.device) -> list[str]:
    """The presets ``mipic-bench`` runs when none is named."""
    on_gpu = device.type == "cuda"
    return [p.name for p in PRESETS.values() if (p.gpu if on_gpu else p.cpu)]


@dataclass
class Workload:
    """Inputs of one benchmark case: ``x`` requires grad, ``mask`` marks real tokens."""

    preset: Preset
    shape: Shape
    x: torch.Tensor
    mask: torch.Tensor


def make_workload(
    preset: Preset, shape: Shape, *, dtype: torch.dtype, device: torch.device,
    seed: int = 0,
) -> Workload:
    """Random token states with a shared offset and sequence lengths that vary.

    Lengths are drawn uniformly from ``[max(k_min, T/4), T]`` with one sequence at
    full length (a padded batch always has one), the same for every layer.
    Hidden states carry a common offset per feature, as real ones do; it stresses the
    centring without changing CKA.
    """
    gen = torch.Generator().manual_seed(seed)
    L, B, T, D = shape.layers, shape.batch, shape.tokens, shape.depth
    shortest = min(T, max(preset.k_min, math.ceil(T / 4)))
    lengths = torch.randint(shortest, T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).expand(L, B, T).contiguous()
    offset = 2.0 * torch.randn(L, 1, 1, D, generator=gen)
    x = torch.randn(L, B, T, D, generator=gen) + offset
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    return Workload(preset, shape, x, mask.to(device))


def parse_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``bf16``/``fp16``/``fp32``/``fp64`` (torch names work too); None picks bf16 on
    CUDA and fp32 elsewhere."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16",
               "fp32": "float32", "float": "float32", "fp64": "float64", "double": "float64"}
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--dtype must be one of bf16, fp16, fp32, fp64; got {name!r}")
    return dtype
