"""MIC's regularisers at every Matryoshka width: soft collapse (SCR) and spectral isotropy (SIR).

Both are computed once for all widths, the way nested CKA computes every prefix Gram in
one sweep (METHOD.md section 4):

* SCR reads each width's prefix-residual block ``C[:d, d:]`` of ONE token
  cross-correlation matrix (its first ``d_max`` rows, ``d_max x D``, hold every block),
  and sums the penalty over every block with two cumulative sums of that penalty
  matrix, so no per-width product or loop is needed.
* SIR's cosine matrices of the prefixes ``Z[:, :d]`` come from the nested sample Grams
  ``G_d = Z[:, :d] Z[:, :d]^T``: one product per column segment between consecutive
  widths and a cumulative sum, at the cost of the widest prefix's Gram.

This eager PyTorch implementation is the only backend: the work is dense matrix
products that cuBLAS (or the CPU BLAS) already runs well, plus ``O(D^2)`` and
``O(W B^2)`` elementwise epilogues (see ``docs/mic.md`` for the measurements and the
reasoning). Arithmetic is float64 for float64 input and float32 otherwise, like
:func:`mipic_kernels.nested_cka`. Every forward is free of host synchronisation and
data-dependent shapes, except the finiteness check of the inputs, which is skipped
while ``torch.compile`` traces.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .api import _check_dims, _check_features, _check_finite, _check_mask
from .selection import accumulation_dtype

# Added to every variance before its square root and to the mean variance in SIR's
# coefficient of variation: a constant feature then costs a finite amount with a
# finite gradient.
VARIANCE_EPS = 1e-6
# F.normalize's floor on a norm: an all-zero pooled row has cosine 0 with every row.
_NORM_EPS = 1e-12


def soft_collapse(
    x: torch.Tensor,
    dims: Sequence[int],
    *,
    mask: Optional[torch.Tensor] = None,
    tau_corr: float = 0.1,
    lambda_var: float = 1.0,
    sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> torch.Tensor:
    """Soft collapse regularisation (SCR) of every width prefix against its residual.

    For each example, every feature is standardised over the example's real tokens
    (mean 0, standard deviation 1, with :data:`VARIANCE_EPS` added to the variance);
    the token cross-correlation ``C = mean over examples of (1/m) sum_t z_t z_t^T`` is
    one ``D x D`` matrix, and width ``d`` is penalised by

        ``mean over C[:d, d:] of relu(|C_uv| - tau_corr)^2
        + lambda_var * (mean(relu(1 - s[:d])) + 0.5 * mean(relu(1 - s[d:])))``

    where ``s`` is each raw feature's standard deviation over all real tokens of the
    batch (a variance hinge against collapse: after the standardisation every
    per-example deviation is 1, so the hinge has to read the raw one).

    Args:
        x: ``(*, B, T, D)`` token states of ``B`` examples (any leading dims, e.g.
            layers), ``D >= 2``.
        dims: strictly increasing widths in ``[1, D - 1]`` (each needs a residual).
        mask: optional ``(*, B, T)`` bool tensor, True for real tokens. Examples with
            fewer than 2 real tokens have no standardised features: they are left out
            of the correlation's mean over examples (a batch without any gives a zero
            correlation penalty) and still count in the raw deviations.
        tau_corr: correlations up to this magnitude cost nothing (``>= 0``).
        lambda_var: weight of the variance hinge (``>= 0``).
        sum_over_processes: under data parallelism, a function that sums a tensor over
            the processes holding the batch's other examples (a differentiable
            all-reduce). The correlation's mean over examples and the raw deviations
            then run over every process's examples: each process gets the value of the
            whole batch.

    Returns:
        ``(*, len(dims))``, float64 for float64 input and float32 otherwise.
    """
    _check_features("x", x, min_dim=3)
    depth = x.shape[-1]
    if depth < 2:
        raise ValueError(f"x must have at least 2 features (a prefix and a residual), shape (*, B, T, D >= 2); "
                         f"got {tuple(x.shape)}")
    dims = _check_dims(dims, depth)
    if dims[-1] >= depth:
        raise ValueError(f"dims must be below the width D={depth}: each prefix needs a non-empty residual; "
                         f"got {list(dims)!r}")
    mask = _check_mask(mask, x)
    tau_corr = _check_number("tau_corr", tau_corr, minimum=0.0)
    lambda_var = _check_number("lambda_var", lambda_var, minimum=0.0)
    if not torch.compiler.is_compiling():
        _check_finite("x", x)

    dtype = accumulation_dtype(x.dtype)
    real = mask[..., None]
    h = torch.where(real, x.to(dtype), 0.0)  # padding never reaches a sum, whatever it holds
    weight = real.to(dtype)
    count = weight.sum(-2, keepdim=True)  # (*, B, 1, 1)
    centred = (h - h.sum(-2, keepdim=True) / count.clamp(min=1)) * weight
    std = (centred.square().sum(-2, keepdim=True) / count.clamp(min=1) + VARIANCE_EPS).sqrt()
    # sum over tokens of z_u z_v is then the example's mean over its tokens
    z = centred / std / count.clamp(min=1).sqrt()
    examples = (count >= 2).to(dtype).sum((-3, -2), keepdim=True)[..., 0]  # (*, 1, 1)
    # Every block C[:d, d:] lies in the first d_max rows: one (d_max, D) product serves all.
    top = z[..., : dims[-1]]
    products = torch.einsum("...btu,...btv->...uv", top, z)
    weight_tokens = weight.sum((-3, -2), keepdim=True)  # (*, 1, 1, 1)
    token_sums = h.sum((-3, -2), keepdim=True)  # (*, 1, 1, D)
    if sum_over_processes is not None:
        products, examples, weight_tokens, token_sums = _summed(
            sum_over_processes, products, examples, weight_tokens, token_sums)
    corr = products / examples.clamp(min=1)
    penalty = F.relu(corr.abs() - tau_corr).square()
    rows = torch.tensor([d - 1 for d in dims], device=x.device)
    cols = torch.tensor(dims, device=x.device)
    # block_sums[..., d - 1, d] = sum of penalty[..., :d, d:]
    block_sums = _suffix_cumsum(penalty.cumsum(-2))[..., rows, cols]
    widths = torch.tensor(dims, dtype=dtype, device=x.device)
    penalty_mean = block_sums / (widths * (depth - widths))

    tokens = weight_tokens.clamp(min=1)
    raw_mean = token_sums / tokens
    squares = ((h - raw_mean) * weight).square().sum((-3, -2), keepdim=True)
    if sum_over_processes is not None:
        squares = sum_over_processes(squares)
    raw_var = (squares / tokens)[..., 0, 0, :]
    hinge = F.relu(1 - (raw_var + VARIANCE_EPS).sqrt())  # (*, D)
    prefix_hinge = hinge.cumsum(-1)[..., rows] / widths
    residual_hinge = _suffix_cumsum(hinge)[..., cols] / (depth - widths)
    return penalty_mean + lambda_var * (prefix_hinge + 0.5 * residual_hinge)


def spectral_isotropy(
    pooled: torch.Tensor,
    dims: Sequence[int],
    *,
    t: float = 2.0,
) -> torch.Tensor:
    """Spectral isotropy regularisation (SIR) of every width prefix of pooled embeddings.

    For the prefix ``Z = pooled[..., :d]`` of ``B`` examples: ``cv``, the coefficient of
    variation (population standard deviation over mean, :data:`VARIANCE_EPS` added to
    the mean) of the ``d`` per-feature variances over the batch, and the uniformity
    ``log(mean over i != j of exp(-2 t (1 - cos(z_i, z_j))))``; SIR is ``(cv +
    uniformity) / 2``. The cosines come from the nested sample Grams of the prefixes.

    Args:
        pooled: ``(*, B, D)`` pooled embeddings (MIC mean-pools the real tokens), ``B >= 2``.
        dims: strictly increasing widths in ``[1, D]``.
        t: the uniformity temperature (``> 0``).

    Returns:
        ``(*, len(dims))``, float64 for float64 input and float32 otherwise.
    """
    _check_features("pooled", pooled, min_dim=2)
    if pooled.shape[-2] < 2:
        raise ValueError(f"pooled must hold at least 2 examples for the pairwise uniformity, shape (*, B >= 2, D); "
                         f"got {tuple(pooled.shape)}")
    dims = _check_dims(dims, pooled.shape[-1])
    t = _check_number("t", t, minimum=0.0, strict=True)
    if not torch.compiler.is_compiling():
        _check_finite("pooled", pooled)

    dtype = accumulation_dtype(pooled.dtype)
    z = pooled.to(dtype)
    n = z.shape[-2]
    variances = z.var(-2, unbiased=False)  # (*, D): a prefix's variances are its first d
    cv = torch.stack([
        variances[..., :d].std(-1, unbiased=False) / (variances[..., :d].mean(-1) + VARIANCE_EPS) for d in dims
    ], -1)

    starts = (0,) + dims[:-1]
    blocks = [z[..., a:b] @ z[..., a:b].transpose(-1, -2) for a, b in zip(starts, dims)]
    grams = torch.stack(blocks, -3).cumsum(-3)  # (*, W, B, B): the Gram of each prefix
    norms = grams.diagonal(dim1=-2, dim2=-1).clamp(min=_NORM_EPS**2).sqrt()  # (*, W, B)
    cos = grams / (norms[..., :, None] * norms[..., None, :])
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    logits = torch.where(off_diagonal, -2 * t * (1 - cos), -math.inf)
    uniformity = torch.logsumexp(logits.flatten(-2), -1) - math.log(n * (n - 1))
    return 0.5 * (cv + uniformity)


def _summed(sum_over_processes: Callable[[torch.Tensor], torch.Tensor], *parts: torch.Tensor) -> list[torch.Tensor]:
    """Every part summed over the processes, in one collective."""
    flat = sum_over_processes(torch.cat([p.reshape(-1) for p in parts]))
    return [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in parts]), parts)]


def _suffix_cumsum(t: torch.Tensor) -> torch.Tensor:
    """``out[..., j] = sum of t[..., j:]`` (no subtraction, so no cancellation)."""
    return t.flip(-1).cumsum(-1).flip(-1)


def _check_number(name: str, value: object, *, minimum: float, strict: bool = False) -> float:
    relation = ">" if strict else ">="
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite float {relation} {minimum:g}; got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite float {relation} {minimum:g}; got {value!r}")
    return value
