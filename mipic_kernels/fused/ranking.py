"""Score-and-rank for ``scores="cls"``: MIPIC's teacher attention score and the token
order it gives, as the custom op ``mipic_kernels::cls_order``.

Two launches per call. The score kernel reads ``x`` once, in its own dtype, and
writes ``s_j = x_0 . x_j / sqrt(D)`` (fp32 accumulation) to a ``(B, T)`` fp32
buffer: no fp32 copy of ``x`` and no product temporary exist. The rank kernel then
gives every token its rank by counting, over the example's tokens, those that come
before it (real tokens by descending score, ties to the lower position, then padding
in position order) and scatters the positions: deterministic, no sort, ``O(T^2)``
comparisons per example, cheap for ``T`` up to a few thousand. Its first program of
each example also writes the per-width token counts of
:func:`mipic_kernels.selection.resolve_k` from the real-token count it has just
summed, the same float64 arithmetic on a cached device copy of the ``k`` spec, so the
counts cost no launch of their own.

Scores are compared as integers that order the fp32 values totally, NaN (of either
sign) above ``+inf`` as in ``torch.sort``, so non-finite features (which the fused
path does not check) still give a permutation. A score is never ``-0.0``: the
accumulator starts at ``+0.0``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..selection import CEIL_SLACK, KSpec

_SCORE_BLOCK_T = 32
_RANK_BLOCK = 64
# The count standing for "every real token" (k=None): the real count always caps it.
_EVERY_TOKEN = 2**31 - 1
# resolve_k's slack, as a constexpr global the compiled kernel may read.
_SLACK = tl.constexpr(CEIL_SLACK)


@triton.jit
def _score_kernel(
    x_ptr, s_ptr, T, D, stride_xb, stride_xt, stride_xd, stride_sb, stride_st, sqrt_d,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``s[b, t] = x[b, 0] . x[b, t] / sqrt(D)`` for one block of tokens."""
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < T
    x_b = x_ptr + b * stride_xb
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        query = tl.load(x_b + cols * stride_xd, mask=col_ok, other=0.0).to(tl.float32)
        tile = tl.load(
            x_b + rows[:, None] * stride_xt + cols[None, :] * stride_xd,
            mask=row_ok[:, None] & col_ok[None, :], other=0.0,
        ).to(tl.float32)
        acc += tl.sum(tile * query[None, :], axis=1)
    tl.store(s_ptr + b * stride_sb + rows * stride_st, acc / sqrt_d, mask=row_ok)


@triton.jit
def _order_key(s):
    """int32 keys in the order of the fp32 values ``s``, NaN highest."""
    bits = s.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(s != s, 0x7FFFFFFF, key)


@triton.jit
def _rank_kernel(
    s_ptr, mask_ptr, order_ptr, frac_ptr, fixed_ptr, counts_ptr, T, W, k_min,
    stride_sb, stride_st, stride_mb, stride_mt, stride_ob, stride_ot, stride_cb,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, WP: tl.constexpr,
):
    """Rank of each token of one block among all tokens of its example, and
    ``order[b, rank] = position``; the first block also writes the example's ``W``
    counts ``min(max(want, k_min), real)``, ``want = ceil(real * frac - slack)`` in
    float64 for a fraction and ``fixed`` for a count (every real token: a count of
    ``2^31 - 1``, which the real count caps, as ``resolve_k`` does without ``k_min``)."""
    b = tl.program_id(0).to(tl.int64)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < T
    key_j = _order_key(tl.load(s_ptr + b * stride_sb + js * stride_st, mask=j_ok, other=0.0))
    real_j = tl.load(mask_ptr + b * stride_mb + js * stride_mt, mask=j_ok, other=0) != 0
    ahead = tl.zeros([BLOCK_J], dtype=tl.int32)   # real tokens ranked before a real j
    real = tl.zeros([BLOCK_J], dtype=tl.int32)    # real tokens of the example
    padding = tl.zeros([BLOCK_J], dtype=tl.int32)  # padding positions before j
    for i0 in range(0, T, BLOCK_I):
        i_s = i0 + tl.arange(0, BLOCK_I)
        i_ok = i_s < T
        key_i = _order_key(tl.load(s_ptr + b * stride_sb + i_s * stride_st, mask=i_ok, other=0.0))
        m_i = tl.load(mask_ptr + b * stride_mb + i_s * stride_mt, mask=i_ok, other=0)
        real_i = i_ok & (m_i != 0)
        pad_i = i_ok & (m_i == 0)
        before = i_s[None, :] < js[:, None]
        wins = (key_i[None, :] > key_j[:, None]) | ((key_i[None, :] == key_j[:, None]) & before)
        ahead += tl.sum((real_i[None, :] & wins).to(tl.int32), axis=1)
        real += tl.sum(real_i.to(tl.int32), axis=0)
        padding += tl.sum((pad_i[None, :] & before).to(tl.int32), axis=1)
    rank = tl.where(real_j, ahead, real + padding)
    tl.store(order_ptr + b * stride_ob + rank * stride_ot, js.to(tl.int64), mask=j_ok)
    if tl.program_id(1) == 0:
        widths = tl.arange(0, WP)
        w_ok = widths < W
        frac = tl.load(frac_ptr + widths, mask=w_ok, other=0.0)
        fixed = tl.load(fixed_ptr + widths, mask=w_ok, other=0)
        count = tl.max(real, axis=0).to(tl.int64)
        slack = tl.full([WP], _SLACK, tl.float64)
        want = tl.where(frac > 0.0, tl.ceil(count.to(tl.float64) * frac - slack).to(tl.int64), fixed)
        counts = tl.minimum(tl.maximum(want, k_min), count)
        tl.store(counts_ptr + b * stride_cb + widths, counts, mask=w_ok)


@functools.lru_cache(maxsize=None)
def _device_spec(fractions: tuple[float, ...], fixed: tuple[int, ...], device: torch.device):
    """The ``k`` spec on ``device``, copied once per (spec, device): a per-call copy would
    be a host-to-device transfer, which a CUDA graph cannot capture."""
    return (torch.tensor(fractions, device=device, dtype=torch.float64),
            torch.tensor(fixed, device=device, dtype=torch.int64))


@torch.library.custom_op("mipic_kernels::cls_order", mutates_args=())
def _cls_order(
    x: torch.Tensor, mask: torch.Tensor, fractions: list[float], fixed: list[int], k_min: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, tokens, depth = x.shape
    order = torch.empty(batch, tokens, device=x.device, dtype=torch.int64)
    counts = torch.empty(batch, len(fixed), device=x.device, dtype=torch.int64)
    if batch == 0:
        return order, counts
    scores = torch.empty(batch, tokens, device=x.device, dtype=torch.float32)
    block_d = min(128, max(16, triton.next_power_of_2(depth)))
    _score_kernel[(batch, triton.cdiv(tokens, _SCORE_BLOCK_T))](
        x, scores, tokens, depth, *x.stride(), *scores.stride(), float(depth) ** 0.5,
        BLOCK_T=_SCORE_BLOCK_T, BLOCK_D=block_d, num_warps=4,
    )
    real = mask.view(torch.uint8)
    frac, fix = _device_spec(tuple(fractions), tuple(fixed), x.device)
    _rank_kernel[(batch, triton.cdiv(tokens, _RANK_BLOCK))](
        scores, real, order, frac, fix, counts, tokens, len(fixed), k_min,
        *scores.stride(), *real.stride(), *order.stride(), counts.stride(0),
        BLOCK_J=_RANK_BLOCK, BLOCK_I=_RANK_BLOCK, WP=triton.next_power_of_2(len(fixed)), num_warps=4,
        enable_fp_fusion=False,  # real * frac - slack rounded twice, as resolve_k does: no FMA
    )
    return order, counts


@_cls_order.register_fake
def _(x, mask, fractions, fixed, k_min):
    return (torch.empty(x.shape[:2], device=x.device, dtype=torch.int64),
            torch.empty(x.shape[0], len(fixed), device=x.device, dtype=torch.int64))


def cls_order(
    x: torch.Tensor, mask: torch.Tensor, k: KSpec = None, k_min: int = 1, n_widths: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order ``(*, T)`` int64 of ``x (*, T, D)`` by the ``"cls"`` score, real
    tokens (``mask (*, T)`` bool) first (see :func:`mipic_kernels.selection.rank_tokens`),
    and the per-width counts ``(*, n_widths)`` int64 of
    :func:`mipic_kernels.selection.resolve_k` for the validated spec ``k, k_min``."""
    lead, (tokens, depth) = x.shape[:-2], x.shape[-2:]
    specs = [k] * n_widths if k is None or isinstance(k, int) else list(k)
    fractions = [s if isinstance(s, float) else 0.0 for s in specs]
    fixed = [_EVERY_TOKEN if s is None else 0 if isinstance(s, float) else s for s in specs]
    order, counts = _cls_order(
        x.detach().reshape(-1, tokens, depth), mask.reshape(-1, tokens), fractions, fixed, k_min,
    )
    return order.reshape(*lead, tokens), counts.reshape(*lead, n_widths)
