"""MIC regularisers: soft collapse (SCR) and spectral isotropy (SIR), per truncated width.

SCR at width ``d``: features standardised over each example's real tokens; the token
cross-correlation ``C`` (averaged over tokens, then examples) is computed once as a D x D
matrix and every width reads its block ``C[:d, d:]``; penalty
``mean(relu(|C| - tau_corr)^2) + lambda_var * (mean(relu(1 - std_prefix)) +
0.5 * mean(relu(1 - std_residual)))`` where ``std`` is each raw feature's standard
deviation over all real tokens of the batch (a VICReg-style variance hinge: after the
standardisation every per-example std is 1, so the sources' "std" must be the raw one).

SIR at width ``d`` on the mask-mean-pooled prefix ``Z (B, d)``: the coefficient of
variation of the per-feature variances and the uniformity
``log mean_{i != j} exp(-2 t (1 - cos(z_i, z_j)))``; ``L_SIR`` is their mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_EPS = 1e-6


def soft_collapse(
    hidden: torch.Tensor, mask: torch.Tensor, dims: Sequence[int], tau_corr: float, lambda_var: float
) -> torch.Tensor:
    """SCR per width ``(len(dims),)`` from ``hidden (B, T, D)`` and ``mask (B, T)``."""
    h = hidden.float()
    m = mask.to(h.dtype)[..., None]
    count = m.sum(1, keepdim=True).clamp(min=1)  # (B, 1, 1)
    mean = (h * m).sum(1, keepdim=True) / count
    centred = (h - mean) * m
    std = (centred.pow(2).sum(1, keepdim=True) / count + _EPS).sqrt()
    z = centred / std / count.sqrt()  # sum over tokens of z_u z_v is the per-example mean
    corr = torch.einsum("btu,btv->uv", z, z) / h.shape[0]
    raw = h[mask]  # (N, D) every real token of the batch
    raw_std = (raw.var(0, unbiased=False) + _EPS).sqrt()
    out = []
    for d in dims:
        block = corr[:d, d:]
        penalty = F.relu(block.abs() - tau_corr).pow(2).mean()
        hinge = F.relu(1 - raw_std[:d]).mean() + 0.5 * F.relu(1 - raw_std[d:]).mean()
        out.append(penalty + lambda_var * hinge)
    return torch.stack(out)


def spectral_isotropy(pooled: torch.Tensor, dims: Sequence[int], t: float) -> torch.Tensor:
    """SIR per width ``(len(dims),)`` from mean-pooled embeddings ``pooled (B, D)``."""
    z = pooled.float()
    n = z.shape[0]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=z.device)
    out = []
    for d in dims:
        prefix = z[:, :d]
        var = prefix.var(0, unbiased=False)
        cv = var.std(unbiased=False) / (var.mean() + _EPS)
        unit = F.normalize(prefix, dim=-1)
        cos = (unit @ unit.T)[off_diagonal]
        uniformity = torch.logsumexp(-2 * t * (1 - cos), dim=0) - torch.log(torch.tensor(float(cos.numel())))
        out.append(0.5 * (cv + uniformity))
    return torch.stack(out)
