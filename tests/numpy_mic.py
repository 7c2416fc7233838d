"""An independent float64 NumPy implementation of MIC's regularisers (METHOD.md section 4).

Written the textbook way, one example and one width at a time: each width's
prefix-residual correlation block is its own product of standardised features, each
width's cosines come from its own normalised prefix, and the uniformity is the log of a
plain mean of exponentials. It shares no code and no shortcut (one correlation matrix,
cumulative block sums, nested Grams) with ``mipic_kernels.mic``. Gradients are central
finite differences of these functions.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

EPS = 1e-6  # mipic_kernels.mic.VARIANCE_EPS, restated


def soft_collapse(x: np.ndarray, mask: np.ndarray, dims: Sequence[int], tau: float, lam: float) -> np.ndarray:
    """SCR per width for one batch ``x (B, T, D)``, ``mask (B, T)``."""
    batch, _, depth = x.shape
    out = []
    for d in dims:
        block = np.zeros((d, depth - d))
        examples = 0
        for b in range(batch):
            real = x[b][mask[b]]
            if len(real) < 2:
                continue
            z = (real - real.mean(0)) / np.sqrt(real.var(0) + EPS)
            block += z[:, :d].T @ z[:, d:] / len(real)
            examples += 1
        block /= max(examples, 1)
        penalty = np.mean(np.maximum(np.abs(block) - tau, 0.0) ** 2)
        tokens = x[mask]
        var = tokens.var(0) if len(tokens) else np.zeros(depth)
        std = np.sqrt(var + EPS)
        hinge = np.mean(np.maximum(1 - std[:d], 0.0)) + 0.5 * np.mean(np.maximum(1 - std[d:], 0.0))
        out.append(penalty + lam * hinge)
    return np.array(out)


def spectral_isotropy(z: np.ndarray, dims: Sequence[int], t: float) -> np.ndarray:
    """SIR per width for pooled embeddings ``z (B, D)``."""
    n = z.shape[0]
    out = []
    for d in dims:
        prefix = z[:, :d]
        var = prefix.var(0)
        cv = var.std() / (var.mean() + EPS)
        unit = prefix / np.maximum(np.linalg.norm(prefix, axis=1, keepdims=True), 1e-12)
        terms = [math.exp(-2 * t * (1 - float(unit[i] @ unit[j]))) for i in range(n) for j in range(n) if i != j]
        out.append(0.5 * (cv + math.log(sum(terms) / len(terms))))
    return np.array(out)


def finite_difference_gradient(f: Callable[[np.ndarray], float], x: np.ndarray, step: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``f`` at ``x``, one entry at a time."""
    grad = np.zeros_like(x)
    flat, out = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        keep = flat[i]
        h = step * max(1.0, abs(keep))
        flat[i] = keep + h
        up = f(x)
        flat[i] = keep - h
        down = f(x)
        flat[i] = keep
        out[i] = (up - down) / (2 * h)
    return grad
