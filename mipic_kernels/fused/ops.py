"""The Triton backend's operations as ``torch.library`` custom ops with autograd.

Each operation is a forward op that returns the CKA values together with the
intermediates its backward needs (Grams, shift, bandwidths, statistics, row sums)
and a backward op; :func:`torch.library.register_autograd` connects them and
``register_fake`` gives both shape-only implementations, so ``torch.compile`` traces
through them without a graph break. The Gram edge ``k`` (the largest token count)
depends on the data: the fake implementations declare it as a dynamic size.

Only :mod:`mipic_kernels.fused` imports this module (it needs triton).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import launch
from .stats import N_STATS

_NS = "mipic_kernels"


def _fake_saved(x: torch.Tensor, batch: int, slots: int, widths: int, k_top):
    f32 = dict(device=x.device, dtype=torch.float32)
    return (
        torch.empty(batch, slots, k_top, k_top, **f32),
        torch.empty(batch, x.shape[-1], **f32),
        torch.empty(batch, widths, 2, **f32),
        torch.empty(batch, widths, N_STATS, **f32),
        torch.empty(batch, widths, 2, k_top, **f32),
    )


# ---------------------------------------------------------------- nested_cka


@torch.library.custom_op(f"{_NS}::nested_cka", mutates_args=())
def _nested_cka(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: list[int], kernel: str,
    unbiased: bool, sigma: Optional[float], rbf_threshold: float, detach_full: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    value, saved = launch.nested_forward(
        x, order, k, tuple(dims), kernel=kernel, unbiased=unbiased, sigma=sigma,
        rbf_threshold=rbf_threshold,
    )
    return (value, *saved)


@_nested_cka.register_fake
def _(x, order, k, dims, kernel, unbiased, sigma, rbf_threshold, detach_full):
    batch, depth = x.shape[0], x.shape[-1]
    slots = len(dims) + int(dims[-1] < depth)
    k_top = torch.library.get_ctx().new_dynamic_size()
    value = torch.empty(batch, len(dims), device=x.device, dtype=torch.float32)
    return (value, *_fake_saved(x, batch, slots, len(dims), k_top))


@torch.library.custom_op(f"{_NS}::nested_cka_backward", mutates_args=())
def _nested_cka_backward(
    grad: torch.Tensor, x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, value: torch.Tensor,
    grams: torch.Tensor, shift: torch.Tensor, bw: torch.Tensor, stats: torch.Tensor,
    rowsums: torch.Tensor, dims: list[int], kernel: str, unbiased: bool, detach_full: bool,
) -> torch.Tensor:
    return launch.nested_backward(
        grad, x, order, k, tuple(dims), value, launch.Saved(grams, shift, bw, stats, rowsums),
        kernel=kernel, unbiased=unbiased, detach_full=detach_full,
    )


@_nested_cka_backward.register_fake
def _(grad, x, order, k, value, grams, shift, bw, stats, rowsums, dims, kernel, unbiased, detach_full):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _nested_setup(ctx, inputs, output):
    x, order, k, dims, kernel, unbiased, _, _, detach_full = inputs
    ctx.save_for_backward(x, order, k, *output)
    ctx.options = (dims, kernel, unbiased, detach_full)


def _nested_backward(ctx, grad, *_unused):
    dims, kernel, unbiased, detach_full = ctx.options
    dx = _nested_cka_backward(grad, *ctx.saved_tensors, dims, kernel, unbiased, detach_full)
    return dx, None, None, None, None, None, None, None, None


torch.library.register_autograd(f"{_NS}::nested_cka", _nested_backward, setup_context=_nested_setup)


def nested_cka(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: tuple[int, ...], *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, detach_full: bool,
) -> torch.Tensor:
    """Differentiable nested CKA ``(B, W)`` of ``x (B, T, D)``; see :mod:`.launch`."""
    return _nested_cka(
        x, order, k, list(dims), kernel, unbiased, sigma, rbf_threshold, detach_full
    )[0]


# ---------------------------------------------------------------- cka


@torch.library.custom_op(f"{_NS}::cka", mutates_args=())
def _cka(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, kernel: str,
    unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    value, sx, sy = launch.cka_forward(
        x, y, order, n, kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold
    )
    return (value, *sx, sy.grams, sy.shift)


@_cka.register_fake
def _(x, y, order, n, kernel, unbiased, sigma, rbf_threshold):
    batch = x.shape[0]
    k_top = torch.library.get_ctx().new_dynamic_size()
    value = torch.empty(batch, device=x.device, dtype=torch.float32)
    saved = _fake_saved(x, batch, 1, 1, k_top)
    return (value, *saved, torch.empty_like(saved[0]), torch.empty(batch, y.shape[-1], **dict(
        device=y.device, dtype=torch.float32)))


@torch.library.custom_op(f"{_NS}::cka_backward", mutates_args=())
def _cka_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor,
    value: torch.Tensor, grams_x: torch.Tensor, shift_x: torch.Tensor, bw: torch.Tensor,
    stats: torch.Tensor, rowsums: torch.Tensor, grams_y: torch.Tensor, shift_y: torch.Tensor,
    kernel: str, unbiased: bool, need_x: bool, need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt ``x`` and ``y``; an input that needs none gets an empty tensor."""
    sx = launch.Saved(grams_x, shift_x, bw, stats, rowsums)
    sy = launch.Saved(grams_y, shift_y, bw, stats, rowsums)
    dx, dy = launch.cka_backward(
        grad, x, y, order, n, value, sx, sy, kernel=kernel, unbiased=unbiased,
        need_x=need_x, need_y=need_y,
    )
    none = x.new_empty(0)
    return (none if dx is None else dx), (none if dy is None else dy)


@_cka_backward.register_fake
def _(grad, x, y, order, n, value, grams_x, shift_x, bw, stats, rowsums, grams_y, shift_y,
      kernel, unbiased, need_x, need_y):
    fmt = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty(0),
        torch.empty_like(y, memory_format=fmt) if need_y else x.new_empty(0),
    )


def _cka_setup(ctx, inputs, output):
    x, y, order, n, kernel, unbiased, _, _ = inputs
    ctx.save_for_backward(x, y, order, n, *output)
    ctx.options = (kernel, unbiased)


def _cka_backward_autograd(ctx, grad, *_unused):
    kernel, unbiased = ctx.options
    need_x, need_y = ctx.needs_input_grad[:2]
    dx, dy = _cka_backward(grad, *ctx.saved_tensors, kernel, unbiased, need_x, need_y)
    return (dx if need_x else None), (dy if need_y else None), None, None, None, None, None, None


torch.library.register_autograd(f"{_NS}::cka", _cka_backward_autograd, setup_context=_cka_setup)


def cka(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float,
) -> torch.Tensor:
    """Differentiable CKA ``(B)`` of ``x (B, n, p)`` and ``y (B, n, q)`` over the rows
    ``order[:, :n]`` of each example."""
    return _cka(x, y, order, n, kernel, unbiased, sigma, rbf_threshold)[0]
