"""Eager PyTorch span relations: the ground truth of the fused relation kernels and the
CPU fallback. Arguments arrive validated from :mod:`mipic_kernels.relation`.

How an entry is computed (one example at one layer, ``n`` spans on each side):

* Span pooling: ``p_s = sum of w_t x_t`` over the tokens ``t`` of span ``s``, divided
  by the span's total weight (a weighted mean; the relation matrices below do not
  depend on that scale).
* Unit vectors ``u_s = p_s / max(|p_s|, 1e-12)`` (``F.normalize``'s rule: a zero span
  stays zero).
* The relation matrix ``R_ij = |u_i - u_j|^2 / 2``, which is the cosine distance
  ``1 - cos(p_i, p_j)`` for non-zero spans. It is computed from the Gram of the unit
  vectors shifted by their mean (``R`` is translation invariant): for the clustered
  spans of anisotropic hidden states, ``1 - u_i . u_j`` would cancel most of its digits.
* The entry's value: the mean over ordered pairs ``i != j`` of ``f(Rx_ij - Ry_ij)``,
  ``f(d) = d^2`` (``"mse"``) or the smooth L1 ``0.5 d^2 / beta`` for ``|d| < beta``,
  else ``|d| - beta / 2`` (``"smooth_l1"``); NaN when ``n < 2``.

Arithmetic is float64 when both sides are float64, float32 otherwise.
"""

from __future__ import annotations

import math

import torch

# F.normalize's floor on a norm.
NORM_EPS = 1e-12


def relation_dtype(x: torch.Tensor, y: torch.Tensor) -> torch.dtype:
    """float64 when both sides are float64, else float32."""
    return torch.float64 if x.dtype == y.dtype == torch.float64 else torch.float32


def pool_spans(
    x: torch.Tensor, spans: torch.Tensor, weights: torch.Tensor, max_spans: int, dtype: torch.dtype
) -> torch.Tensor:
    """Weighted mean ``(*, max_spans, D)`` of the tokens of each span, in ``dtype``; zero
    for a span without tokens (or without weight). Tokens of span ``-1`` (or of an id
    ``>= max_spans``) are never read, so padding may hold anything."""
    ids = torch.arange(max_spans, device=x.device)
    member = spans[..., None, :] == ids[:, None]  # (*, S, T)
    w = torch.where(member, weights[..., None, :].to(dtype), 0.0)
    read = (spans >= 0) & (spans < max_spans)
    states = torch.where(read[..., None], x.to(dtype), 0.0)
    total = w.sum(-1, keepdim=True)
    return (w @ states) / torch.where(total > 0, total, torch.ones_like(total))


def relation_matrix(pooled: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``R_ij = |u_i - u_j|^2 / 2`` of the unit vectors of the first ``n`` rows of
    ``pooled (*, S, D)``, ``(*, S, S)``, zero outside the ``n x n`` block."""
    rows = (torch.arange(pooled.shape[-2], device=pooled.device) < n[..., None]).to(pooled.dtype)
    unit = pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=NORM_EPS)
    mean = (unit * rows[..., None]).sum(-2, keepdim=True) / rows.sum(-1)[..., None, None].clamp(min=1)
    z = (unit - mean) * rows[..., None]
    gram = z @ z.mT
    sq = gram.diagonal(dim1=-2, dim2=-1)
    return 0.5 * (sq[..., :, None] + sq[..., None, :] - 2 * gram).clamp(min=0)


def penalty(diff: torch.Tensor, distance: str, beta: float) -> torch.Tensor:
    """``f(d)`` of each entry: ``d^2`` or the smooth L1 with threshold ``beta``."""
    if distance == "mse":
        return diff.square()
    small = diff.abs() < beta
    return torch.where(small, 0.5 * diff.square() / beta, diff.abs() - 0.5 * beta)


def span_relation_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    spans_x: torch.Tensor,
    spans_y: torch.Tensor,
    weights_x: torch.Tensor,
    weights_y: torch.Tensor,
    n: torch.Tensor,
    max_spans: int,
    *,
    distance: str,
    beta: float,
) -> torch.Tensor:
    """Distance between the span relation matrices of ``x (*, T, Dx)`` and ``y (*, U, Dy)``.

    ``spans_*`` and ``weights_*`` give each token's span id (``-1``: none) and weight;
    ``n (*)`` the number of spans of each entry (at most ``max_spans``). The weights are
    constants: no gradient reaches them. Returns ``(*)`` with NaN where ``n < 2``.
    """
    dtype = relation_dtype(x, y)
    rx = relation_matrix(pool_spans(x, spans_x, weights_x.detach(), max_spans, dtype), n)
    ry = relation_matrix(pool_spans(y, spans_y, weights_y.detach(), max_spans, dtype), n)
    ids = torch.arange(max_spans, device=x.device)
    rows = ids < n[..., None]
    pairs = rows[..., :, None] & rows[..., None, :] & (ids[:, None] != ids[None, :])
    total = torch.where(pairs, penalty(rx - ry, distance, beta), 0.0).sum((-2, -1))
    count = (n * (n - 1)).to(dtype)
    defined = n >= 2
    value = total / torch.where(defined, count, torch.ones_like(count))
    return torch.where(defined, value, torch.full_like(value, math.nan))
