"""An independent float64 NumPy implementation of METHOD.md sections 1-2.

Written the textbook way (explicit centring matrix, explicit Song et al. formula, loops
over examples and widths, Python sorting for the ranking, exact fractions for ``k``)
so that it shares no code and no shortcut with ``mipic_kernels.reference``.

HSIC is summed in extended precision (``np.longdouble``: a 64-bit significand on x86-64):
with few rows the Song et al. formula cancels most of its terms, and in float64 it was
4.9e-10 off a CKA value at n = 4 (test_cka_matches_numpy, MIPIC_TEST_SEED=1545511837), far
outside the 1e-9 relative tolerance, where the reference's U-centring was right. The test
oracle must not be the less accurate side.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np


def gram(z: np.ndarray, kernel: str, bandwidth: Optional[float]) -> tuple[np.ndarray, float]:
    """Kernel matrix of the rows of ``z`` and the squared bandwidth used (RBF)."""
    if kernel == "linear":
        return z @ z.T, math.nan
    sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    if bandwidth is None:
        raise ValueError("rbf needs a squared bandwidth")
    return np.exp(-sq / (2 * bandwidth)), bandwidth


def median_bandwidth(z: np.ndarray, threshold: float) -> float:
    sq = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    return threshold**2 * float(np.median(sq))


def hsic(k: np.ndarray, l: np.ndarray, unbiased: bool) -> float:
    n = k.shape[0]
    k, l = k.astype(np.longdouble), l.astype(np.longdouble)
    if not unbiased:
        h = np.eye(n, dtype=np.longdouble) - np.ones((n, n), dtype=np.longdouble) / n
        return float(np.sum((h @ k @ h) * (h @ l @ h)))
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    one = np.ones(n, dtype=np.longdouble)
    value = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    return float(value / (n * (n - 3)))


def cka(
    x: np.ndarray,
    y: np.ndarray,
    *,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    bandwidths: Optional[tuple[float, float]] = None,
) -> tuple[float, tuple[float, float]]:
    """CKA of two row sets; returns (value, squared bandwidths used). NaN when undefined."""
    n = x.shape[0]
    nan = (math.nan, (math.nan, math.nan))
    if n < (4 if unbiased else 2):
        return nan
    if np.all(x == x[0]) or np.all(y == y[0]):
        return nan
    if kernel == "rbf":
        if bandwidths is None:
            if sigma is not None:
                bandwidths = (sigma**2, sigma**2)
            else:
                bandwidths = (median_bandwidth(x, threshold), median_bandwidth(y, threshold))
        if min(bandwidths) <= 0:
            return nan
    else:
        bandwidths = (math.nan, math.nan)
    k, _ = gram(x, kernel, bandwidths[0])
    l, _ = gram(y, kernel, bandwidths[1])
    a, b, c = hsic(k, l, unbiased), hsic(k, k, unbiased), hsic(l, l, unbiased)
    if b <= 0 or c <= 0:
        return nan
    return a / math.sqrt(b * c), bandwidths


def ranking(scores: Optional[np.ndarray], mask: np.ndarray) -> list[int]:
    real = [j for j in range(mask.shape[0]) if mask[j]]
    if scores is None:
        return real
    return sorted(real, key=lambda j: (-scores[j], j))


def resolve_k(k, k_min: int, m: int, n_widths: int) -> list[int]:
    if k is None:
        specs = [m] * n_widths
    elif isinstance(k, int):
        specs = [k] * n_widths
    else:
        specs = list(k)
    out = []
    for s in specs:
        want = math.ceil(Fraction(str(s)) * m) if isinstance(s, float) else s
        out.append(min(max(want, k_min), m))
    return out


def nested_cka(
    x: np.ndarray,
    dims: Sequence[int],
    *,
    k=None,
    k_min: int = 1,
    scores=None,
    mask: Optional[np.ndarray] = None,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: Optional[float] = None,
    threshold: float = 1.0,
    full_source: Optional[np.ndarray] = None,
    bandwidths: Optional[dict] = None,
) -> tuple[np.ndarray, dict]:
    """``(*, W)`` values and the squared bandwidths used, keyed by (example, width).

    ``full_source`` (same shape as ``x``) supplies the full-width side, to express a
    detached teacher in finite differences; ``bandwidths`` freezes the RBF bandwidths.
    """
    lead, (t, d) = x.shape[:-2], x.shape[-2:]
    xs = x.reshape(-1, t, d)
    fs = xs if full_source is None else full_source.reshape(-1, t, d)
    ms = np.ones(xs.shape[:2], bool) if mask is None else mask.reshape(-1, t)
    if isinstance(scores, str):
        sc = np.einsum("etd,ed->et", fs, fs[:, 0]) / math.sqrt(d)
    elif scores is not None:
        sc = scores.reshape(-1, t)
    else:
        sc = None
    out = np.empty((xs.shape[0], len(dims)))
    used = {}
    for e in range(xs.shape[0]):
        order = ranking(None if sc is None else sc[e], ms[e])
        counts = resolve_k(k, k_min, len(order), len(dims))
        for i, (width, ki) in enumerate(zip(dims, counts)):
            rows = order[:ki]
            frozen = None if bandwidths is None else bandwidths[(e, i)]
            out[e, i], used[(e, i)] = cka(
                xs[e][rows, :width], fs[e][rows, :], kernel=kernel, unbiased=unbiased,
                sigma=sigma, threshold=threshold, bandwidths=frozen,
            )
    return out.reshape(*lead, len(dims)), used
