"""``nested_cka`` on the kernels: the passes put together, and the ``torch.library``
custom ops ``mipic_kernels::nested_cka`` and ``::nested_cka_backward`` with autograd.

The forward op returns the CKA values with the intermediates its backward needs
(:class:`.saved.Saved`); :func:`torch.library.register_autograd` connects the two ops
and ``register_fake`` gives both shape-only implementations, so ``torch.compile``
traces through them without a graph break. The Gram edge ``k_top`` comes from the host
(:func:`mipic_kernels.selection.gram_edge`), so every output has a static shape and
nothing waits for the device.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..rules import segment_bounds
from .backward import coefficients, input_grad
from .gram import nested_grams
from .saved import Saved, fake_saved
from .stats import cka_from_grams


def forward(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: tuple[int, ...], k_top: int, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, precision: str,
) -> tuple[torch.Tensor, Saved]:
    """``x (B, T, D)``, ``order (B, T)``, ``k (B, W)`` at most ``k_top`` -> CKA ``(B, W)``
    and intermediates."""
    batch, _, depth = x.shape
    widths = len(dims)
    grams, sq, shift = nested_grams(x, order, k, segment_bounds(dims, depth), k_top, precision=precision)
    gy = grams[:, -1:].expand(batch, widths, k_top, k_top)
    value, bw, stats, rowsums = cka_from_grams(
        grams[:, :widths], gy, k, sq[:, :widths], sq[:, -1:].expand(batch, widths, k_top),
        kernel=kernel, unbiased=unbiased,
        sigma=sigma, rbf_threshold=rbf_threshold,
    )
    return value, Saved(grams, shift, bw, stats, rowsums)


def backward(
    grad: torch.Tensor, x: torch.Tensor, order: torch.Tensor, k: torch.Tensor,
    dims: tuple[int, ...], value: torch.Tensor, saved: Saved, *,
    kernel: str, unbiased: bool, detach_full: bool, precision: str,
) -> torch.Tensor:
    """Gradient wrt ``x (B, T, D)`` of ``sum(grad * value)``."""
    batch, _, depth = x.shape
    widths = len(dims)
    k_top = saved.grams.shape[-1]
    gy = saved.grams[:, -1:].expand(batch, widths, k_top, k_top)
    coef = coefficients(
        saved.grams[:, :widths], gy, k, saved.bw, saved.stats, saved.rowsums, grad, value,
        kernel=kernel, unbiased=unbiased,
        full_grad=not detach_full,
    )
    return input_grad(
        x, order, k, saved.shift, segment_bounds(dims, depth), coef,
        n_prefix=widths, full_grad=not detach_full, precision=precision,
    )


@torch.library.custom_op("mipic_kernels::nested_cka", mutates_args=())
def _nested_cka(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: list[int], k_top: int,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, detach_full: bool,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    value, saved = forward(
        x, order, k, tuple(dims), k_top, kernel=kernel, unbiased=unbiased, sigma=sigma,
        rbf_threshold=rbf_threshold, precision=precision,
    )
    return (value, *saved)


@_nested_cka.register_fake
def _(x, order, k, dims, k_top, kernel, unbiased, sigma, rbf_threshold, detach_full, precision):
    slots = len(segment_bounds(dims, x.shape[-1])) - 1
    value = torch.empty(x.shape[0], len(dims), device=x.device, dtype=torch.float32)
    return (value, *fake_saved(x, slots, len(dims), k_top))


@torch.library.custom_op("mipic_kernels::nested_cka_backward", mutates_args=())
def _nested_cka_backward(
    grad: torch.Tensor, x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, value: torch.Tensor,
    grams: torch.Tensor, shift: torch.Tensor, bw: torch.Tensor, stats: torch.Tensor,
    rowsums: torch.Tensor, dims: list[int], kernel: str, unbiased: bool, detach_full: bool,
    precision: str,
) -> torch.Tensor:
    return backward(
        grad, x, order, k, tuple(dims), value, Saved(grams, shift, bw, stats, rowsums),
        kernel=kernel, unbiased=unbiased, detach_full=detach_full, precision=precision,
    )


@_nested_cka_backward.register_fake
def _(grad, x, order, k, value, grams, shift, bw, stats, rowsums, dims, kernel, unbiased, detach_full,
      precision):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, order, k, dims, _, kernel, unbiased, _, _, detach_full, precision = inputs
    ctx.save_for_backward(x, order, k, *output)
    ctx.options = (dims, kernel, unbiased, detach_full, precision)
    # The saved buffers are outputs only to reach the backward: autograd would hand it a
    # zero gradient for each (the Gram stack alone is 0.8 GB at bert-base batch 128).
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad, *_unused):
    if grad is None:  # reached only through the saved buffers, which carry no gradient
        return (None,) * 11
    dx = _nested_cka_backward(grad, *ctx.saved_tensors, *ctx.options)
    return dx, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "mipic_kernels::nested_cka", _autograd_backward, setup_context=_setup_context
)


def nested_cka(
    x: torch.Tensor, order: torch.Tensor, k: torch.Tensor, dims: tuple[int, ...], k_top: int, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, detach_full: bool,
    precision: str,
) -> torch.Tensor:
    """Differentiable nested CKA ``(B, W)`` of ``x (B, T, D)`` over the rows
    ``order[b, :k[b, w]]`` of each example and width; every count is at most ``k_top``."""
    return _nested_cka(
        x, order, k, list(dims), k_top, kernel, unbiased, sigma, rbf_threshold, detach_full, precision
    )[0]
