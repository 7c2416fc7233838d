"""``cka`` on the kernels: the passes put together, and the ``torch.library`` custom
ops ``mipic_kernels::cka`` and ``::cka_backward`` with autograd (see
:mod:`.nested_cka_op` for how the two ops and their fake implementations fit)."""

from __future__ import annotations

from typing import Optional

import torch

from .backward import coefficients, input_grad
from .gram import nested_grams
from .saved import Saved, fake_saved
from .stats import cka_from_grams


def _k_top(x: torch.Tensor) -> int:
    """The Gram edge: every row of ``x (B, n, p)`` (at least one, so buffers are never empty)."""
    return max(x.shape[1], 1)


def forward(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, precision: str,
) -> tuple[torch.Tensor, Saved, Saved]:
    """``x (B, n, p)``, ``y (B, n, q)``, ``order (B, n)`` real rows first, ``n (B)`` counts
    -> CKA ``(B)``, the x-side intermediates and the y side's Grams and shift."""
    k_top = _k_top(x)
    gx, sq_x, shift_x = nested_grams(x, order, n[:, None], (0, x.shape[-1]), k_top, precision=precision)
    gy, sq_y, shift_y = nested_grams(y, order, n[:, None], (0, y.shape[-1]), k_top, precision=precision)
    value, bw, stats, rowsums = cka_from_grams(
        gx, gy, n[:, None], sq_x, sq_y, kernel=kernel, unbiased=unbiased,
        sigma=sigma, rbf_threshold=rbf_threshold,
    )
    return value[:, 0], Saved(gx, shift_x, bw, stats, rowsums), Saved(gy, shift_y, bw, stats, rowsums)


def backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor,
    value: torch.Tensor, sx: Saved, sy: Saved, *, kernel: str, unbiased: bool,
    need_x: bool, need_y: bool, precision: str,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients wrt ``x`` and ``y`` of ``sum(grad * value)``, each only where needed."""
    # The y side's coefficient is the "full-width" slot of the coefficient kernel.
    coef = coefficients(
        sx.grams, sy.grams, n[:, None], sx.bw, sx.stats, sx.rowsums, grad[:, None], value[:, None],
        kernel=kernel, unbiased=unbiased,
        full_grad=need_y,
    )
    dx = dy = None
    if need_x:
        dx = input_grad(x, order, n[:, None], sx.shift, (0, x.shape[-1]), coef, n_prefix=1, full_grad=False,
                        precision=precision)
    if need_y:
        dy = input_grad(y, order, n[:, None], sy.shift, (0, y.shape[-1]), coef[:, 1:], n_prefix=1, full_grad=False,
                        precision=precision)
    return dx, dy


@torch.library.custom_op("mipic_kernels::cka", mutates_args=())
def _cka(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, kernel: str,
    unbiased: bool, sigma: Optional[float], rbf_threshold: float, precision: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    value, sx, sy = forward(
        x, y, order, n, kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold,
        precision=precision,
    )
    return (value, *sx, sy.grams, sy.shift)


@_cka.register_fake
def _(x, y, order, n, kernel, unbiased, sigma, rbf_threshold, precision):
    k_top = _k_top(x)
    value = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    sx, sy = fake_saved(x, 1, 1, k_top), fake_saved(y, 1, 1, k_top)
    return (value, *sx, sy.grams, sy.shift)


@torch.library.custom_op("mipic_kernels::cka_backward", mutates_args=())
def _cka_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor,
    value: torch.Tensor, grams_x: torch.Tensor, shift_x: torch.Tensor, bw: torch.Tensor,
    stats: torch.Tensor, rowsums: torch.Tensor, grams_y: torch.Tensor, shift_y: torch.Tensor,
    kernel: str, unbiased: bool, need_x: bool, need_y: bool, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt ``x`` and ``y``; an input that needs none gets an empty tensor."""
    sx = Saved(grams_x, shift_x, bw, stats, rowsums)
    sy = Saved(grams_y, shift_y, bw, stats, rowsums)
    dx, dy = backward(
        grad, x, y, order, n, value, sx, sy, kernel=kernel, unbiased=unbiased,
        need_x=need_x, need_y=need_y, precision=precision,
    )
    none = x.new_empty(0)
    return (none if dx is None else dx), (none if dy is None else dy)


@_cka_backward.register_fake
def _(grad, x, y, order, n, value, grams_x, shift_x, bw, stats, rowsums, grams_y, shift_y,
      kernel, unbiased, need_x, need_y, precision):
    fmt = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty(0),
        torch.empty_like(y, memory_format=fmt) if need_y else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, y, order, n, kernel, unbiased, _, _, precision = inputs
    ctx.save_for_backward(x, y, order, n, *output)
    ctx.options = (kernel, unbiased, precision)
    # No zero gradients for the saved buffers, which are outputs only to reach the backward.
    ctx.set_materialize_grads(False)


def _autograd_backward(ctx, grad, *_unused):
    kernel, unbiased, precision = ctx.options
    need_x, need_y = ctx.needs_input_grad[:2]
    if grad is None:  # reached only through the saved buffers, which carry no gradient
        return (None,) * 9
    dx, dy = _cka_backward(grad, *ctx.saved_tensors, kernel, unbiased, need_x, need_y, precision)
    return (dx if need_x else None), (dy if need_y else None), None, None, None, None, None, None, None


torch.library.register_autograd("mipic_kernels::cka", _autograd_backward, setup_context=_setup_context)


def cka(
    x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, n: torch.Tensor, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, precision: str,
) -> torch.Tensor:
    """Differentiable CKA ``(B)`` of ``x (B, n, p)`` and ``y (B, n, q)`` over the rows
    ``order[:, :n]`` of each example."""
    return _cka(x, y, order, n, kernel, unbiased, sigma, rbf_threshold, precision)[0]
