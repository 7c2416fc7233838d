"""The implementations a benchmark compares, one per name of :data:`benchmarks.catalog.PROVIDERS`.

Every provider turns a workload into ``loss(x, mask) -> scalar``: MIPIC's geometric
term, the sum over widths of the mean ``1 - CKA`` between each width prefix and the
full width (detached) over the nested top-k tokens ranked by the ``"cls"`` score.

* ``naive``: how public reimplementations compute it today; Python loops over
  layers x examples x widths, ``torch.topk`` per width, float64 feature-space linear
  CKA (or Kornblith's numpy-style RBF). It computes the same quantity as
  :func:`mipic_kernels.nested_cka`, so its values can be checked against it.
* ``torch``: the vectorised eager reference, ``backend="torch"``.
* ``torch.compile``: the reference under ``torch.compile(dynamic=False)``.
* ``triton``: the fused kernels, ``backend="triton"`` (CUDA only).

Bandwidth-bound presets also get a ``copy`` row (``x.clone()``, forward only): not a
loss, the memory-bandwidth yardstick a fused kernel is measured against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from mipic_kernels import NestedCKALoss, nested_cka

from .workload import Workload

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# The naive loops run one small float64 product after another: on a CPU a
# bert-base batch takes seconds per call, so larger shapes are skipped there.
NAIVE_CPU_GFLOP_LIMIT = 20.0


@dataclass(frozen=True)
class Provider:
    """``build(workload, kernel)`` returns the loss function; ``skip_reason`` says why
    a workload cannot run (None when it can)."""

    name: str
    build: Callable[[Workload, str], LossFn]
    skip_reason: Callable[[Workload], Optional[str]]


# --------------------------------------------------------------------------- naive

def naive_nested_cka(
    x: torch.Tensor,
    mask: torch.Tensor,
    dims: tuple[int, ...],
    k: Union[int, Sequence[Union[int, float]]],
    k_min: int,
    *,
    kernel: str = "linear",
    rbf_threshold: float = 1.0,
    detach_full: bool = True,
) -> torch.Tensor:
    """``(*, W)`` float64 CKA values, one example and one width at a time.

    The quantity of :func:`mipic_kernels.nested_cka` with ``scores="cls"``, computed
    the way a straightforward reimplementation does: rank the real tokens by
    ``x_0 . x_j / sqrt(D)``, take ``torch.topk`` per width, and compare the prefix with
    the full width in float64.
    """
    lead, (T, D) = x.shape[:-2], x.shape[-2:]
    flat_x, flat_mask = x.reshape(-1, T, D), mask.reshape(-1, T)
    fractions = [k] * len(dims) if isinstance(k, int) else list(k)
    out = []
    for n in range(flat_x.shape[0]):
        real = flat_x[n][flat_mask[n]]
        m = real.shape[0]
        scores = real.detach() @ flat_x[n, 0].detach() / math.sqrt(D)
        row = []
        for d, spec in zip(dims, fractions):
            # A fraction is read as a decimal (0.3 * 10 is 3, not 4), as the API does.
            want = math.ceil(spec * m - 1e-9) if isinstance(spec, float) else spec
            top = torch.topk(scores, min(max(want, k_min), m)).indices
            tokens = real[top].double()
            full = tokens.detach() if detach_full else tokens
            row.append(_naive_cka(tokens[:, :d], full, kernel, rbf_threshold))
        out.append(torch.stack(row))
    return torch.stack(out).reshape(*lead, len(dims))


def _naive_cka(a: torch.Tensor, b: torch.Tensor, kernel: str, threshold: float) -> torch.Tensor:
    if kernel == "linear":
        # Feature-space form: ||B^T A||^2 / (||A^T A|| ||B^T B||) of centred features.
        a = a - a.mean(0)
        b = b - b.mean(0)
        return (b.T @ a).square().sum() / ((a.T @ a).norm() * (b.T @ b).norm())
    ka, kb = _center(_gram_rbf(a, threshold)), _center(_gram_rbf(b, threshold))
    return (ka * kb).sum() / (ka.norm() * kb.norm())


def _gram_rbf(z: torch.Tensor, threshold: float) -> torch.Tensor:
    # Kornblith et al.'s gram_rbf; torch.quantile(0.5) is numpy's median (torch.median
    # takes the lower middle value), and the bandwidth is a constant for the gradient.
    dot = z @ z.T
    sq = torch.diagonal(dot)
    dist = sq[:, None] + sq[None, :] - 2 * dot
    median = torch.quantile(dist.detach().flatten(), 0.5)
    return torch.exp(-dist / (2 * threshold**2 * median))


def _center(g: torch.Tensor) -> torch.Tensor:
    g = g - g.mean(0, keepdim=True)
    return g - g.mean(1, keepdim=True)


def _naive_build(workload: Workload, kernel: str) -> LossFn:
    p = workload.preset

    def loss(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        values = naive_nested_cka(x, mask, p.dims, p.k, p.k_min, kernel=kernel)
        return (1 - values).flatten(0, -2).mean(0).sum()

    return loss


def naive_gflop(workload: Workload) -> float:
    """Multiply-adds of the naive feature-space products (x2), at full sequence length."""
    p, s = workload.preset, workload.shape
    fractions = [p.k] * len(p.dims) if isinstance(p.k, int) else list(p.k)
    total = 0.0
    for d, spec in zip(p.dims, fractions):
        k = spec * s.tokens if isinstance(spec, float) else spec
        k = min(max(k, p.k_min), s.tokens)
        total += 2 * k * (d * s.depth + d * d + s.depth * s.depth)
    return total * s.layers * s.batch / 1e9


def _naive_skip(workload: Workload) -> Optional[str]:
    gflop = naive_gflop(workload)
    if workload.x.device.type == "cpu" and gflop > NAIVE_CPU_GFLOP_LIMIT:
        return (
            f"naive is limited to small shapes on a CPU ({gflop:.0f} GFLOP per forward "
            f"in float64 loops, limit {NAIVE_CPU_GFLOP_LIMIT:.0f})"
        )
    return None


# ------------------------------------------------------------------ torch / compile

def _loss_module(workload: Workload, kernel: str, backend: str) -> NestedCKALoss:
    p = workload.preset
    return NestedCKALoss(p.dims, kernel=kernel, backend=backend, **p.loss_options())


def _backend_build(backend: str) -> Callable[[Workload, str], LossFn]:
    def build(workload: Workload, kernel: str) -> LossFn:
        module = _loss_module(workload, kernel, backend)
        return lambda x, mask: module(x, scores="cls", mask=mask)

    return build


def _compile_build(workload: Workload, kernel: str) -> LossFn:
    module = _loss_module(workload, kernel, "torch")
    # A fresh cache per workload: earlier shapes must not count against the
    # recompilation limit, and dynamic=False specialises to this shape.
    torch._dynamo.reset()
    return torch.compile(lambda x, mask: module(x, scores="cls", mask=mask), dynamic=False)


def _always(workload: Workload) -> Optional[str]:
    return None


def _triton_skip(workload: Workload) -> Optional[str]:
    if workload.x.device.type != "cuda":
        return "needs a CUDA GPU"
    probe = workload.x.detach()[..., :1, :4, :4]
    try:
        nested_cka(probe, [2], backend="triton")
    except (NotImplementedError, RuntimeError, ImportError) as err:
        return f"the Triton backend cannot run here: {err}"
    return None


PROVIDERS: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("naive", _naive_build, _naive_skip),
        Provider("torch", _backend_build("torch"), _always),
        Provider("torch.compile", _compile_build, _always),
        Provider("triton", _backend_build("triton"), _triton_skip),
    )
}
