"""An independent float64 NumPy implementation of the span relation distance.

Written the textbook way, one entry and one span at a time: a span's vector is the
weighted mean of its tokens, found by scanning the token list; its relation matrix is
``1 - cos`` computed from the vectors themselves (no unit vectors shifted by their mean,
no Gram, no masks); the penalty is summed pair by pair in Python. It shares no code and
no shortcut with ``mipic_kernels.relation_reference``.
"""

from __future__ import annotations

import math

import numpy as np


def span_vectors(x: np.ndarray, spans: np.ndarray, weights: np.ndarray, n: int) -> list[np.ndarray]:
    """The weighted mean of the tokens of each span ``0 .. n-1`` of one entry ``x (T, D)``."""
    out = []
    for s in range(n):
        total, weight = np.zeros(x.shape[-1]), 0.0
        for t in range(len(spans)):
            if spans[t] == s:
                total += weights[t] * x[t]
                weight += weights[t]
        out.append(total / weight)
    return out


def cosine_distances(vectors: list[np.ndarray]) -> np.ndarray:
    n = len(vectors)
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            a, b = vectors[i], vectors[j]
            out[i, j] = 1.0 - float(a @ b) / (math.sqrt(float(a @ a)) * math.sqrt(float(b @ b)))
    return out


def penalty(d: float, distance: str, beta: float) -> float:
    if distance == "mse":
        return d * d
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


def span_relation_distance(
    x: np.ndarray, y: np.ndarray, spans_x: np.ndarray, spans_y: np.ndarray,
    weights_x: np.ndarray, weights_y: np.ndarray, *, distance: str = "mse", beta: float = 1.0,
) -> np.ndarray:
    """``(*)`` values for ``x (*, T, Dx)``, ``y (*, U, Dy)``; NaN for entries with fewer than 2 spans."""
    lead = x.shape[:-2]
    out = np.full(lead, math.nan)
    for index in np.ndindex(*lead):
        n = int(min(spans_x[index].max(), spans_y[index].max())) + 1
        if n < 2:
            continue
        rx = cosine_distances(span_vectors(x[index], spans_x[index], weights_x[index], n))
        ry = cosine_distances(span_vectors(y[index], spans_y[index], weights_y[index], n))
        terms = [penalty(rx[i, j] - ry[i, j], distance, beta) for i in range(n) for j in range(n) if i != j]
        out[index] = sum(terms) / len(terms)
    return out
