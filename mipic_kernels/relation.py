"""Span relations across two models: argument checks and backend dispatch.

For knowledge distillation between a teacher and a student of different widths and
tokenizers (MTA's Dynamic Structural Alignment): the tokens of each side are pooled
into the same semantic units (spans: words, phrases), and the pairwise cosine-distance
matrices of the units are compared. :func:`span_relation_distance` does this for any
number of (layer, example) entries in one call; the eager reference is
:mod:`mipic_kernels.relation_reference`, the fused kernels
:mod:`mipic_kernels.fused.relation_op`.

As for :func:`mipic_kernels.nested_cka`, the checks that read tensor values (finite
states, well-formed span ids, positive span weights) run only on the reference path in
eager mode: the fused path never waits for the device.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Optional

import torch
from torch import nn

from . import relation_reference
from .api import _check_backend, _check_features, _check_finite, _check_positive_int, _check_same_device
from .selection import accumulation_dtype

DISTANCES = ("mse", "smooth_l1")
_INT_DTYPES = (torch.int32, torch.int64)


def span_relation_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    spans_x: torch.Tensor,
    spans_y: torch.Tensor,
    *,
    weights_x: Optional[torch.Tensor] = None,
    weights_y: Optional[torch.Tensor] = None,
    max_spans: Optional[int] = None,
    distance: str = "mse",
    beta: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Distance between the span relation matrices of two models, batched.

    For each entry (e.g. a layer pair and an example) the tokens of each side are pooled
    into spans, ``p_s = sum_t w_t x_t / sum_t w_t`` over the tokens ``t`` of span ``s``;
    the relation matrix of a side is ``R_ij = 1 - cos(p_i, p_j)``; the result is the mean
    over ordered span pairs ``i != j`` of ``f(Rx_ij - Ry_ij)``.

    Args:
        x: ``(*, T, Dx)`` token states of one side (the student).
        y: ``(*, U, Dy)`` token states of the other side (the teacher), with the leading
            dims of ``x``; token counts and widths may differ.
        spans_x: ``(*, T)`` int32 or int64: the span of each token of ``x``, ``-1`` for
            tokens in none (padding, special tokens). Span ids of an entry are
            ``0 .. n-1``, each used by at least one token.
        spans_y: ``(*, U)``: the same spans on ``y``'s tokens (same ids, same ``n``).
        weights_x, weights_y: optional ``(*, T)`` / ``(*, U)`` non-negative pooling
            weights (default: 1, a plain mean); only their ratios within a span matter.
            Treated as constants: no gradient reaches them.
        max_spans: the most spans any entry has (the edge of the internal ``S x S``
            buffers; default ``min(T, U)``). It is known on the host, so nothing waits
            for the device; spans past it are ignored.
        distance: ``"mse"`` (``f(d) = d^2``) or ``"smooth_l1"`` (``0.5 d^2 / beta`` for
            ``|d| < beta``, else ``|d| - beta / 2``).
        beta: the smooth L1 threshold (``> 0``).
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (triton for CUDA tensors when it
            is installed, else torch).

    Returns:
        ``(*)``, float64 when ``x`` and ``y`` are float64 and float32 otherwise; NaN
        exactly where an entry has fewer than 2 spans. ``R_ij`` is computed as
        ``|u_i - u_j|^2 / 2`` of the unit vectors (equal to ``1 - cos`` for non-zero
        spans, and accurate for spans with nearly equal directions); a span whose pooled
        vector is zero counts as the zero vector there.

    Raises:
        ValueError, TypeError: bad shapes, dtypes, devices or options, naming the argument.
        On the torch backend in eager mode also: non-finite states at span tokens, span
        ids out of ``[-1, max_spans)``, ids of an entry that are not ``0 .. n-1`` or
        differ in number between the sides, negative or non-finite weights, a span
        without positive weight. The triton backend and ``torch.compile`` skip these
        (they read the data on the host).
    """
    _check_features("x", x, min_dim=2)
    _check_features("y", y, min_dim=2)
    if y.shape[:-2] != x.shape[:-2]:
        raise ValueError(
            f"y must have the leading dims of x, {tuple(x.shape[:-2])} + (U, Dy); got shape {tuple(y.shape)}"
        )
    if x.shape[-2] == 0 or y.shape[-2] == 0:
        raise ValueError(
            f"x and y must have at least one token each; got shapes {tuple(x.shape)} and {tuple(y.shape)}"
        )
    _check_same_device("y", y, x)
    spans_x = _check_spans("spans_x", spans_x, x)
    spans_y = _check_spans("spans_y", spans_y, y, same_device_as=x)
    weights_x = _check_weights("weights_x", weights_x, x, same_device_as=x)
    weights_y = _check_weights("weights_y", weights_y, y, same_device_as=x)
    edge = min(x.shape[-2], y.shape[-2]) if max_spans is None else _check_positive_int("max_spans", max_spans)
    distance, beta = _check_distance(distance, beta)
    impl = _backend_for_pair(backend, x, y)
    counts = span_counts(spans_x, spans_y, edge)
    if impl is relation_reference and not torch.compiler.is_compiling():
        _check_values(x, y, spans_x, spans_y, weights_x, weights_y, edge)
    return impl.span_relation_distance(
        x, y, spans_x, spans_y, weights_x, weights_y, counts, edge, distance=distance, beta=beta
    )


def pool_spans(
    x: torch.Tensor,
    spans: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    *,
    max_spans: Optional[int] = None,
) -> torch.Tensor:
    """The weighted mean of the tokens of each span, batched (eager torch, differentiable
    in ``x``; the weights are constants).

    Args:
        x: ``(*, T, D)`` token states.
        spans: ``(*, T)`` int32 or int64 span id of each token, ``-1`` for none; those
            tokens are never read.
        weights: optional ``(*, T)`` non-negative weights (default 1: the plain mean).
        max_spans: the number of span rows returned (default ``T``); ids past it are ignored.

    Returns:
        ``(*, max_spans, D)``, float64 for float64 ``x`` and float32 otherwise; zero rows
        for spans without tokens or weight.
    """
    _check_features("x", x, min_dim=2)
    spans = _check_spans("spans", spans, x)
    weights = _check_weights("weights", weights, x, same_device_as=x)
    edge = x.shape[-2] if max_spans is None else _check_positive_int("max_spans", max_spans)
    return relation_reference.pool_spans(x, spans, weights, edge, accumulation_dtype(x.dtype))


def span_counts(spans_x: torch.Tensor, spans_y: torch.Tensor, max_spans: int) -> torch.Tensor:
    """Spans per entry ``(*)`` int64: one more than the largest id both sides use, at
    most ``max_spans`` (a device-side computation: nothing waits for the device)."""
    top = torch.minimum(spans_x.amax(-1), spans_y.amax(-1)).to(torch.int64)
    return (top + 1).clamp(min=0, max=max_spans)


def _backend_for_pair(backend: str, x: torch.Tensor, y: torch.Tensor) -> ModuleType:
    """The reference, or the fused backend (which needs both sides in a kernel dtype)."""
    if _check_backend(backend) == "torch":
        return relation_reference
    from . import fused

    if backend == "triton":
        fused.check_usable(x)
        fused.check_usable(y)
        return fused
    return fused if fused.preferred_for(x) and fused.preferred_for(y) else relation_reference


def _check_distance(distance: object, beta: object) -> tuple[str, float]:
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}; got {distance!r}")
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a positive finite float; got {beta!r}")
    return str(distance), float(beta)


def _check_spans(
    name: str, spans: object, states: torch.Tensor, same_device_as: Optional[torch.Tensor] = None
) -> torch.Tensor:
    rows = tuple(states.shape[:-1])
    if not isinstance(spans, torch.Tensor) or spans.dtype not in _INT_DTYPES:
        got = spans.dtype if isinstance(spans, torch.Tensor) else type(spans).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor of shape {rows} (span id per token, -1 = none); "
                        f"got {got}")
    if tuple(spans.shape) != rows:
        raise ValueError(f"{name} must have shape {rows} (one span id per token); got {tuple(spans.shape)}")
    _check_same_device(name, spans, same_device_as if same_device_as is not None else states)
    return spans


def _check_weights(
    name: str, weights: object, states: torch.Tensor, *, same_device_as: torch.Tensor
) -> torch.Tensor:
    rows = tuple(states.shape[:-1])
    if weights is None:
        return torch.ones(rows, device=states.device, dtype=torch.float32)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"{name} must be None or a floating tensor of shape {rows}; got {got}")
    if tuple(weights.shape) != rows:
        raise ValueError(f"{name} must have shape {rows} (one weight per token); got {tuple(weights.shape)}")
    _check_same_device(name, weights, same_device_as)
    return weights.detach()


def _check_values(
    x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor,
    weights_x: torch.Tensor, weights_y: torch.Tensor, max_spans: int,
) -> None:
    """The checks that read the data (reference path, eager mode)."""
    side_counts = []
    for side, states, spans, weights in (("x", x, spans_x, weights_x), ("y", y, spans_y, weights_y)):
        if bool(((spans < -1) | (spans >= max_spans)).any()):
            raise ValueError(f"spans_{side} must hold span ids in [-1, max_spans={max_spans}); "
                             f"got values from {int(spans.min())} to {int(spans.max())}")
        member = spans >= 0
        _check_finite(f"{side} (at tokens in a span)", states[member])
        if not bool(torch.isfinite(weights[member]).all()) or bool((weights[member] < 0).any()):
            raise ValueError(f"weights_{side} must be finite and >= 0 at every token in a span")
        ids = torch.arange(max_spans, device=spans.device)
        onehot = (spans[..., None, :] == ids[:, None]).to(weights.dtype)  # (*, S, T)
        used = onehot.sum(-1) > 0
        count = used.sum(-1)
        gap = used.logical_not() & (ids < count[..., None])
        if bool(gap.any()):
            where = tuple(int(i) for i in gap.nonzero()[0][:-1])
            raise ValueError(f"spans_{side}: the span ids of each entry must be 0 .. n-1, each used by a token; "
                             f"entry {where} skips id {int(gap.nonzero()[0][-1])}")
        weight = (onehot * torch.where(member, weights, 0.0)[..., None, :]).sum(-1)
        empty = used & (weight <= 0)
        if bool(empty.any()):
            where = tuple(int(i) for i in empty.nonzero()[0])
            raise ValueError(f"weights_{side} must give every span a positive total weight; "
                             f"span {where[-1]} of entry {where[:-1]} has none")
        side_counts.append(count)
    differ = side_counts[0] != side_counts[1]
    if bool(differ.any()):
        where = tuple(int(i) for i in differ.nonzero()[0])
        raise ValueError(f"spans_x and spans_y must hold the same spans: entry {where} has "
                         f"{int(side_counts[0][where])} spans in spans_x and {int(side_counts[1][where])} in spans_y")


class SpanRelationLoss(nn.Module):
    """The mean of :func:`span_relation_distance` over the defined entries.

    Entries with fewer than 2 spans are left out; with none defined the loss is 0. The
    value and its gradients are always finite. Every option is checked here, with the
    messages of :func:`span_relation_distance`.

    Args:
        distance: ``"mse"`` or ``"smooth_l1"``.
        beta: the smooth L1 threshold.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.
    """

    def __init__(self, distance: str = "mse", beta: float = 1.0, backend: str = "auto") -> None:
        super().__init__()
        self.distance, self.beta = _check_distance(distance, beta)
        self.backend = _check_backend(backend)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        spans_x: torch.Tensor,
        spans_y: torch.Tensor,
        weights_x: Optional[torch.Tensor] = None,
        weights_y: Optional[torch.Tensor] = None,
        max_spans: Optional[int] = None,
    ) -> torch.Tensor:
        """A scalar: the arguments are those of :func:`span_relation_distance`."""
        values = span_relation_distance(
            x, y, spans_x, spans_y, weights_x=weights_x, weights_y=weights_y, max_spans=max_spans,
            distance=self.distance, beta=self.beta, backend=self.backend,
        )
        defined = ~torch.isnan(values)
        total = torch.where(defined, values, torch.zeros_like(values)).sum()
        return total / defined.sum().clamp(min=1)

    def get_config_dict(self) -> dict[str, object]:
        """The constructor's arguments: ``SpanRelationLoss(**config)``."""
        return {"distance": self.distance, "beta": self.beta, "backend": self.backend}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.get_config_dict().items())
