"""Token ranking and per-width token counts, shared by every backend.

Both backends receive the same ``order`` and ``k`` tensors, computed once by
:mod:`mipic_kernels.api` (which runs the fused score-and-rank kernel for
``scores="cls"`` where it can, :func:`cls_scores` and :func:`rank_tokens` otherwise),
so a token ranked differently by two backends (summation order, CPU vs CUDA
``topk`` ties) can never be the reason their results differ.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

KSpec = Union[None, int, Sequence[Union[int, float]]]
ScoresSpec = Union[None, str, torch.Tensor]

# Elements of x converted to the accumulation dtype at once by cls_scores (64 MiB
# of float32).
_SCORE_CHUNK_ELEMENTS = 1 << 24

# A fraction times a count is rounded up, but ``0.3 * 10`` is 3.0000000000000004
# in binary floating point: the slack makes the decimal reading (3) win.
CEIL_SLACK = 1e-9


def cls_scores(x: torch.Tensor) -> torch.Tensor:
    """MIPIC's teacher attention score ``s_j = x_0 . x_j / sqrt(D)`` at full width.

    ``x`` is ``(*, T, D)``; the first position is the query. Returns ``(*, T)`` in the
    accumulation dtype (float64 for float64 input, else float32), without gradient:
    the ranking it feeds is not differentiable. Half-precision inputs are converted
    a few examples at a time, so no float32 copy of all of ``x`` is made.
    """
    lead, (tokens, depth) = x.shape[:-2], x.shape[-2:]
    dtype = accumulation_dtype(x.dtype)
    flat = x.detach().reshape(-1, tokens, depth)
    step = max(1, _SCORE_CHUNK_ELEMENTS // max(tokens * depth, 1))
    chunks = []
    for start in range(0, flat.shape[0], step):
        z = flat[start:start + step].to(dtype)
        chunks.append((z @ z[:, 0, :, None]).squeeze(-1) / math.sqrt(depth))
    scores = torch.cat(chunks) if chunks else flat.new_zeros(0, tokens, dtype=dtype)
    return scores.reshape(*lead, tokens)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rank_tokens(scores: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """Positions ordered best first: real tokens by descending score, ties to the lower
    position, then the padding positions.

    ``scores`` is ``(*, T)`` (finite at real tokens) or None for position order;
    ``mask`` is ``(*, T)`` bool. Returns ``(*, T)`` int64.
    """
    if scores is None:
        key = mask.to(torch.float32)
    else:
        key = scores.to(accumulation_dtype(scores.dtype))
        key = torch.where(mask, key, torch.full_like(key, -math.inf))
    # A stable descending sort keeps equal keys in position order, which is the
    # tie rule; padding carries -inf (or 0 against 1) and so lands last.
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def resolve_k(k: KSpec, k_min: int, counts: torch.Tensor, n_widths: int) -> torch.Tensor:
    """Per-example, per-width token counts ``(*, n_widths)`` int64.

    ``counts`` is the number of real tokens of each example, ``(*)``. ``k`` is None
    (every real token), an int (every width) or one entry per width: an int count or
    a float in (0, 1] meaning ``ceil(fraction * count)``. Then
    ``k_i = min(max(k_i, k_min), count)``. Arguments are assumed validated.
    """
    c = counts.to(torch.int64)
    if k is None:
        return torch.stack([c] * n_widths, dim=-1)
    specs = [k] * n_widths if isinstance(k, int) else list(k)
    # All widths at once (a handful of kernels, not a handful per width): an int spec
    # is its own ceiling, slack or not.
    c64 = c.to(torch.float64)
    wanted = torch.stack([c64 * s if isinstance(s, float) else torch.full_like(c64, s) for s in specs], dim=-1)
    want = torch.ceil(wanted - CEIL_SLACK).to(torch.int64)
    return torch.minimum(want.clamp(min=k_min), c[..., None])


def gram_edge(k: KSpec, k_min: int, tokens: int) -> int:
    """The Gram edge: the largest count :func:`resolve_k` can give an example of
    ``tokens`` positions, from the spec alone (``max`` over the widths of
    ``min(max(ceil(f T), k_min), T)`` for a fraction ``f``, ``min(max(k, k_min), T)``
    for an int, ``T`` for None).

    Both backends size their ``k x k`` buffers by it, so it is known on the host
    without reading the data (no device synchronisation) and changes only with
    ``T``, not with the batch's real lengths; rows past each example's own count
    are masked. ``resolve_k`` is monotone in the count, so every count is within it.
    """
    if k is None:
        return tokens
    specs = [k] if isinstance(k, int) else k
    # The float64 product and ceiling of resolve_k, on the host.
    want = max(math.ceil(tokens * s - CEIL_SLACK) if isinstance(s, float) else s for s in specs)
    return min(max(want, k_min), tokens)
