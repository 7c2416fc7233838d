"""``span_relation_distance`` on the kernels: the passes put together, and the
``torch.library`` custom ops ``mipic_kernels::span_relation`` and
``::span_relation_backward`` with autograd (the same arrangement as
:mod:`.nested_cka_op`: static output shapes, fake implementations, no host sync).

Forward, per side:

1. pool (:func:`.relation_kernels._pool_kernel`): ``p (B, S, D)`` fp32, the weighted
   sum of each span's tokens;
2. unit vectors ``u = p / max(|p|, 1e-12)`` (torch);
3. the Gram of ``u`` shifted by its mean over the entry's spans
   (:func:`.gram.nested_grams`, one column segment): ``R_ij = |u_i - u_j|^2 / 2`` is
   translation invariant, and the shift keeps it accurate for spans whose directions
   nearly coincide (``1 - u_i . u_j`` would cancel);

then :func:`.relation_kernels._value_kernel` reduces both sides' Grams to the value.

Backward: :func:`.relation_kernels._coef_kernel` forms the Gram coefficient
``2 (diag(C 1) - C)`` (``C`` the gradient of the value in ``Rx``; ``Ry`` gets ``-C``),
:func:`.backward.input_grad` turns it into ``du = coef z`` (its rows sum to zero, so the
shift does not matter), torch takes it through the normalisation
(``dp = (du - u (u . du)) / |p|``) and :func:`.relation_kernels._unpool_kernel` sends
``w_t dp_s`` to each token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from .backward import input_grad
from .gram import nested_grams
from .relation_kernels import _coef_kernel, _pool_kernel, _unpool_kernel, _value_kernel
from .stats import NUM_WARPS, row_block

# F.normalize's floor on a norm (mipic_kernels.relation_reference.NORM_EPS).
NORM_EPS = 1e-12
# Pool: 32 spans x 64 columns per program, 32 tokens per step (the one-hot tile is
# 32 x 32, the smallest tl.dot shapes are 16). Unpool: 32 tokens x 128 columns.
_POOL_SPANS, _POOL_TOKENS, _POOL_COLS = 32, 32, 64
_UNPOOL_TOKENS, _UNPOOL_COLS = 32, 128


class Side(NamedTuple):
    """One side's intermediates that the backward pass reuses."""

    unit: torch.Tensor   # (B, S, D) fp32 unit span vectors (zero past each entry's spans)
    norm: torch.Tensor   # (B, S) fp32 norms of the pooled sums
    gram: torch.Tensor   # (B, 1, S, S) fp32 Gram of the shifted unit vectors
    shift: torch.Tensor  # (B, D) fp32 the shift (mean unit vector of the entry's spans)


def _tile_bounds(spans: torch.Tensor, max_spans: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi) (B, tiles)`` int64: the token range holding the spans of each tile of
    ``_POOL_SPANS`` span ids (empty, ``lo = T > hi = 0``, for a tile without tokens)."""
    batch, tokens = spans.shape
    tiles = triton.cdiv(max_spans, _POOL_SPANS)
    pos = torch.arange(tokens, device=spans.device).expand(batch, tokens)
    inside = (spans >= 0) & (spans < max_spans)
    tile = torch.where(inside, spans.to(torch.int64) // _POOL_SPANS, tiles)  # column `tiles` collects the rest
    lo = torch.full((batch, tiles + 1), tokens, device=spans.device, dtype=torch.int64)
    hi = torch.zeros((batch, tiles + 1), device=spans.device, dtype=torch.int64)
    lo = lo.scatter_reduce(1, tile, pos, "amin")
    hi = hi.scatter_reduce(1, tile, pos + 1, "amax")
    return lo[:, :tiles].contiguous(), hi[:, :tiles].contiguous()


def _pool(x: torch.Tensor, spans: torch.Tensor, weights: torch.Tensor, max_spans: int) -> torch.Tensor:
    batch, _, depth = x.shape
    pooled = torch.empty(batch, max_spans, depth, device=x.device, dtype=torch.float32)
    lo, hi = _tile_bounds(spans, max_spans)
    grid = (batch, lo.shape[1], triton.cdiv(depth, _POOL_COLS))
    _pool_kernel[grid](
        x, spans, weights, lo, hi, pooled, max_spans, depth, lo.shape[1], *x.stride(), *spans.stride(),
        *weights.stride(), *pooled.stride(), BS=_POOL_SPANS, BT=_POOL_TOKENS, BD=_POOL_COLS, num_warps=4,
    )
    return pooled


def _side(x: torch.Tensor, spans: torch.Tensor, weights: torch.Tensor, n: torch.Tensor, max_spans: int) -> Side:
    pooled = _pool(x, spans, weights, max_spans)
    norm = pooled.norm(dim=-1)
    unit = pooled / norm.clamp(min=NORM_EPS)[..., None]
    order = torch.arange(max_spans, device=x.device).expand(x.shape[0], max_spans)
    # One column segment read over the entry's n spans; exact fp32 dots ("ieee"): unit
    # vectors of nearly coinciding spans need every bit of the shifted products.
    gram, _, shift = nested_grams(unit, order, n[:, None], (0, x.shape[-1]), max_spans, precision="ieee")
    return Side(unit, norm, gram, shift)


def _empty_side(x: torch.Tensor, max_spans: int) -> Side:
    """Shapes of a :class:`Side` (for empty batches and the fake implementation)."""
    batch, depth = x.shape[0], x.shape[-1]
    f32 = dict(device=x.device, dtype=torch.float32)
    return Side(
        torch.zeros(batch, max_spans, depth, **f32), torch.zeros(batch, max_spans, **f32),
        torch.zeros(batch, 1, max_spans, max_spans, **f32), torch.zeros(batch, depth, **f32),
    )


def _defined(n: torch.Tensor) -> torch.Tensor:
    return n >= 2


def forward(
    x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor, weights_x: torch.Tensor,
    weights_y: torch.Tensor, n: torch.Tensor, max_spans: int, *, distance: str, beta: float,
) -> tuple[torch.Tensor, Side, Side]:
    """``x (B, T, Dx)``, ``y (B, U, Dy)``, ``n (B)`` spans per entry (at most ``max_spans``)
    -> the value ``(B)`` fp32 (NaN where ``n < 2``) and both sides' intermediates."""
    batch = x.shape[0]
    if batch == 0:
        return x.new_zeros(0, dtype=torch.float32), _empty_side(x, max_spans), _empty_side(y, max_spans)
    sx = _side(x, spans_x, weights_x, n, max_spans)
    sy = _side(y, spans_y, weights_y, n, max_spans)
    total = torch.empty(batch, device=x.device, dtype=torch.float32)
    bm, kp = row_block(max_spans)
    _value_kernel[(batch,)](
        sx.gram, sy.gram, n, total, sx.gram.stride(0), *sx.gram.stride()[2:], sy.gram.stride(0),
        *sy.gram.stride()[2:], beta, SMOOTH=distance == "smooth_l1", KP=kp, BM=bm, num_warps=NUM_WARPS,
    )
    pairs = (n * (n - 1)).to(torch.float32)
    defined = _defined(n)
    value = torch.where(defined, total / torch.where(defined, pairs, torch.ones_like(pairs)), torch.nan)
    # A non-finite state at a span token reaches its span's norm (and its tile's); the
    # kernels' distances clamp with tl.maximum, which does not pass NaN on, so the
    # entry is marked here.
    finite = torch.isfinite(sx.norm).all(-1) & torch.isfinite(sy.norm).all(-1)
    return torch.where(finite, value, torch.nan), sx, sy


def _to_tokens(
    side: Side, coef: torch.Tensor, x: torch.Tensor, spans: torch.Tensor, weights: torch.Tensor, n: torch.Tensor,
) -> torch.Tensor:
    """The gradient ``(B, T, D)`` in ``x.dtype`` from the Gram coefficient of one side."""
    batch, tokens, depth = x.shape
    max_spans = side.unit.shape[1]
    order = torch.arange(max_spans, device=x.device).expand(batch, max_spans)
    d_unit = input_grad(side.unit, order, n[:, None], side.shift, (0, depth), coef, n_prefix=1, full_grad=False,
                        precision="ieee")
    radial = (side.unit * d_unit).sum(-1, keepdim=True)
    norm = side.norm[..., None]
    d_pooled = torch.where(norm > NORM_EPS, (d_unit - side.unit * radial) / norm.clamp(min=NORM_EPS),
                           d_unit / NORM_EPS)
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    grid = (batch, triton.cdiv(tokens, _UNPOOL_TOKENS), triton.cdiv(depth, _UNPOOL_COLS))
    _unpool_kernel[grid](
        d_pooled, spans, weights, dx, tokens, max_spans, depth, *d_pooled.stride(), *spans.stride(),
        *weights.stride(), *dx.stride(), BT=_UNPOOL_TOKENS, BD=_UNPOOL_COLS, num_warps=4,
    )
    return dx


def backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor,
    weights_x: torch.Tensor, weights_y: torch.Tensor, n: torch.Tensor, sx: Side, sy: Side, *,
    distance: str, beta: float, need_x: bool, need_y: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients wrt ``x`` and ``y`` of ``sum(grad * value)``, each only where needed."""
    batch = x.shape[0]
    if batch == 0:
        return torch.zeros_like(x) if need_x else None, torch.zeros_like(y) if need_y else None
    max_spans = sx.unit.shape[1]
    pairs = (n * (n - 1)).to(torch.float32)
    defined = _defined(n)
    # Undefined entries get no gradient, whatever the upstream gradient holds there.
    scale = torch.where(defined, grad.to(torch.float32) / torch.where(defined, pairs, torch.ones_like(pairs)), 0.0)
    coef = torch.zeros(batch, 1, max_spans, max_spans, device=x.device, dtype=torch.float32)
    bm, kp = row_block(max_spans)
    _coef_kernel[(batch, triton.cdiv(max_spans, bm))](
        sx.gram, sy.gram, n, scale.contiguous(), coef, sx.gram.stride(0), *sx.gram.stride()[2:],
        sy.gram.stride(0), *sy.gram.stride()[2:], coef.stride(0), *coef.stride()[2:], beta,
        SMOOTH=distance == "smooth_l1", KP=kp, BM=bm, num_warps=NUM_WARPS,
    )
    dx = _to_tokens(sx, coef, x, spans_x, weights_x, n) if need_x else None
    dy = _to_tokens(sy, -coef, y, spans_y, weights_y, n) if need_y else None
    return dx, dy


@torch.library.custom_op("mipic_kernels::span_relation", mutates_args=())
def _span_relation(
    x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor, weights_x: torch.Tensor,
    weights_y: torch.Tensor, n: torch.Tensor, max_spans: int, distance: str, beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    value, sx, sy = forward(x, y, spans_x, spans_y, weights_x, weights_y, n, max_spans, distance=distance, beta=beta)
    return (value, *sx, *sy)


@_span_relation.register_fake
def _(x, y, spans_x, spans_y, weights_x, weights_y, n, max_spans, distance, beta):
    value = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    return (value, *_empty_side(x, max_spans), *_empty_side(y, max_spans))


@torch.library.custom_op("mipic_kernels::span_relation_backward", mutates_args=())
def _span_relation_backward(
    grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor,
    weights_x: torch.Tensor, weights_y: torch.Tensor, n: torch.Tensor, value: torch.Tensor,
    unit_x: torch.Tensor, norm_x: torch.Tensor, gram_x: torch.Tensor, shift_x: torch.Tensor,
    unit_y: torch.Tensor, norm_y: torch.Tensor, gram_y: torch.Tensor, shift_y: torch.Tensor,
    distance: str, beta: float, need_x: bool, need_y: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients wrt ``x`` and ``y``; an input that needs none gets an empty tensor."""
    dx, dy = backward(
        grad, x, y, spans_x, spans_y, weights_x, weights_y, n, Side(unit_x, norm_x, gram_x, shift_x),
        Side(unit_y, norm_y, gram_y, shift_y), distance=distance, beta=beta, need_x=need_x, need_y=need_y,
    )
    none = x.new_empty(0)
    return (none if dx is None else dx), (none if dy is None else dy)


@_span_relation_backward.register_fake
def _(grad, x, y, spans_x, spans_y, weights_x, weights_y, n, value, unit_x, norm_x, gram_x, shift_x,
      unit_y, norm_y, gram_y, shift_y, distance, beta, need_x, need_y):
    fmt = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=fmt) if need_x else x.new_empty(0),
        torch.empty_like(y, memory_format=fmt) if need_y else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, y, spans_x, spans_y, weights_x, weights_y, n, _, distance, beta = inputs
    ctx.save_for_backward(x, y, spans_x, spans_y, weights_x, weights_y, n, *output)
    ctx.options = (distance, beta)


def _autograd_backward(ctx, grad, *_unused):
    distance, beta = ctx.options
    need_x, need_y = ctx.needs_input_grad[:2]
    dx, dy = _span_relation_backward(grad, *ctx.saved_tensors, distance, beta, need_x, need_y)
    return (dx if need_x else None), (dy if need_y else None), None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "mipic_kernels::span_relation", _autograd_backward, setup_context=_setup_context
)


def span_relation_distance(
    x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor, weights_x: torch.Tensor,
    weights_y: torch.Tensor, n: torch.Tensor, max_spans: int, *, distance: str, beta: float,
) -> torch.Tensor:
    """Differentiable span relation distance ``(B)`` of ``x (B, T, Dx)`` and ``y (B, U, Dy)``."""
    return _span_relation(x, y, spans_x, spans_y, weights_x, weights_y, n, max_spans, distance, beta)[0]
