"""The inputs of one benchmark case: random token states and a padding mask at a
preset's shape."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .catalog import DTYPES, Preset, Shape


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
    lengths = _draw_lengths(preset, shape, gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).expand(L, B, T).contiguous()
    offset = 2.0 * torch.randn(L, 1, 1, D, generator=gen)
    x = torch.randn(L, B, T, D, generator=gen) + offset
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    return Workload(preset, shape, x, mask.to(device))


def sequence_lengths(preset: Preset, shape: Shape, seed: int = 0) -> list[int]:
    """The real-token count of each sentence (``shape.batch`` of them) that
    :func:`make_workload` draws for ``seed``, without making the token states."""
    return _draw_lengths(preset, shape, torch.Generator().manual_seed(seed)).tolist()


def _draw_lengths(preset: Preset, shape: Shape, gen: torch.Generator) -> torch.Tensor:
    # Drawn first from the workload's generator: the states that follow depend on it.
    T = shape.tokens
    shortest = min(T, max(preset.k_min, math.ceil(T / 4)))
    lengths = torch.randint(shortest, T + 1, (shape.batch,), generator=gen)
    lengths[0] = T
    return lengths


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a short name from :data:`benchmarks.catalog.DTYPES`."""
    return getattr(torch, DTYPES[name])
