"""Minibatch CKA maps (``MinibatchCKA``) against the float64 NumPy oracle.

What the minibatch estimate equals. For minibatches t = 1..T with n_t rows, it is

    sum_t HSIC_1(K_i^t, L_j^t) / sqrt(sum_t HSIC_1(K_i^t, K_i^t) * sum_t HSIC_1(L_j^t, L_j^t))

with HSIC_1 the unbiased estimator (Song et al. 2012) on the minibatch's own Grams
(Nguyen, Raghu & Kornblith 2021). The full-batch unbiased CKA of the same examples is
the same expression with a single Gram over all of them. HSIC_1 is a U-statistic,
the average of a kernel h over the ordered 4-tuples of distinct rows: the full batch
averages over every 4-tuple, the minibatch form over those within one minibatch
only. So the two are equal, up to float rounding, when there is one minibatch (the
test below), and otherwise two different unbiased estimates of the same population
quantity that differ by sampling noise. The tests for several minibatches therefore
compare against the oracle evaluated term by term: the float64 NumPy HSIC of each
minibatch, summed, then the ratio; that is exact. Bandwidths (RBF) are per
minibatch and layer in both.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests import numpy_reference as npref
from tests.seeding import generator

F64 = dict(rtol=1e-9, atol=1e-10)
KERNELS = [dict(kernel="linear"), dict(kernel="rbf"), dict(kernel="rbf", rbf_threshold=0.6),
           dict(kernel="rbf", sigma=3.0)]


def _layers(layers: int, n: int, width: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Layers that share a signal (so the map has structure) plus an offset."""
    shared = torch.randn(n, 3, generator=generator(seed), dtype=dtype)
    mixing = torch.randn(layers, 3, width, generator=generator(seed + 1), dtype=dtype)
    noise = torch.randn(layers, n, width, generator=generator(seed + 2), dtype=dtype)
    offset = 3.0 * torch.randn(width, generator=generator(seed + 3), dtype=dtype)
    return shared @ mixing + noise + offset


def _oracle_map(batches_x, batches_y, opts) -> np.ndarray:
    """Sum of per-minibatch float64 NumPy unbiased HSICs, then CKA."""
    kernel, sigma, threshold = opts["kernel"], opts.get("sigma"), opts.get("rbf_threshold", 1.0)

    def gram(z):
        z = z.numpy()
        if kernel == "linear":
            return npref.gram(z, "linear", None)[0]
        bw = sigma**2 if sigma is not None else npref.median_bandwidth(z, threshold)
        return npref.gram(z, "rbf", bw)[0]

    la, lb = len(batches_x[0]), len(batches_y[0])
    xy, xx, yy = np.zeros((la, lb)), np.zeros(la), np.zeros(lb)
    for bx, by in zip(batches_x, batches_y):
        kx, ky = [gram(z) for z in bx], [gram(z) for z in by]
        for i in range(la):
            xx[i] += npref.hsic(kx[i], kx[i], True)
            for j in range(lb):
                xy[i, j] += npref.hsic(kx[i], ky[j], True)
        for j in range(lb):
            yy[j] += npref.hsic(ky[j], ky[j], True)
    return xy / np.sqrt(xx[:, None] * yy[None, :])


@pytest.mark.parametrize("opts", KERNELS, ids=str)
def test_one_minibatch_is_the_full_batch_unbiased_cka(opts):
    xs, ys = _layers(3, 40, 6, seed=1), _layers(4, 40, 9, seed=5)
    acc = mk.MinibatchCKA(**opts)
    acc.update(xs, ys)
    got = acc.compute()
    assert got.shape == (3, 4) and got.dtype == torch.float64
    torch.testing.assert_close(got, mk.cka_matrix(xs, ys, unbiased=True, **opts), **F64)
    want = [[npref.cka(x.numpy(), y.numpy(), unbiased=True, **_np(opts))[0] for y in ys] for x in xs]
    np.testing.assert_allclose(got.numpy(), np.array(want), **F64)


def _np(opts: dict) -> dict:
    return dict(kernel=opts["kernel"], sigma=opts.get("sigma"), threshold=opts.get("rbf_threshold", 1.0))


@pytest.mark.parametrize("opts", KERNELS, ids=str)
def test_minibatches_sum_their_unbiased_hsic(opts):
    # Unequal minibatches (the last one small) over 75 examples; layers of two widths.
    xs, ys = _layers(3, 75, 5, seed=10), _layers(2, 75, 11, seed=14)
    cuts = [0, 31, 62, 75]
    acc = mk.MinibatchCKA(**opts)
    batches_x, batches_y = [], []
    for lo, hi in zip(cuts, cuts[1:]):
        bx, by = list(xs[:, lo:hi]), list(ys[:, lo:hi])
        acc.update(bx, by)
        batches_x.append(bx)
        batches_y.append(by)
    assert acc.batches == 3 and acc.rows == 75
    np.testing.assert_allclose(acc.compute().numpy(), _oracle_map(batches_x, batches_y, opts), **F64)
    # Not the full-batch value: the estimators differ (see the module docstring).
    full = mk.cka_matrix(xs, ys, unbiased=True, **opts)
    assert not torch.allclose(acc.compute(), full, rtol=0, atol=1e-6)


def test_order_of_minibatches_does_not_matter():
    xs, ys = _layers(3, 60, 5, seed=20), _layers(3, 60, 4, seed=24)
    forward, backward = mk.MinibatchCKA(), mk.MinibatchCKA()
    for lo in (0, 20, 40):
        forward.update(xs[:, lo:lo + 20], ys[:, lo:lo + 20])
    for lo in (40, 20, 0):
        backward.update(xs[:, lo:lo + 20], ys[:, lo:lo + 20])
    torch.testing.assert_close(forward.compute(), backward.compute(), rtol=1e-12, atol=1e-14)


def test_masked_rows_are_left_out():
    xs, ys = _layers(2, 30, 5, seed=30), _layers(3, 30, 4, seed=34)
    mask = torch.rand(30, generator=generator(38)) < 0.7
    masked, dropped = mk.MinibatchCKA(), mk.MinibatchCKA()
    masked.update(xs, ys, mask=mask)
    dropped.update(xs[:, mask], ys[:, mask])
    torch.testing.assert_close(masked.compute(), dropped.compute(), **F64)
    assert masked.rows == int(mask.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("opts", KERNELS[:2], ids=str)
def test_self_map_is_symmetric_with_a_diagonal_of_exactly_one(opts, dtype):
    xs = _layers(5, 48, 7, seed=40, dtype=dtype)
    acc = mk.MinibatchCKA(**opts)
    for lo in (0, 16, 32):
        acc.update(xs[:, lo:lo + 16])
    got = acc.compute()
    assert got.dtype == torch.float64
    assert torch.equal(got, got.T)
    assert torch.equal(got.diagonal(), torch.ones(5, dtype=torch.float64))
    pairs = mk.MinibatchCKA(**opts)
    for lo in (0, 16, 32):
        pairs.update(xs[:, lo:lo + 16], xs[:, lo:lo + 16])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got, pairs.compute(), rtol=0, atol=tol)


def test_float32_features_are_accumulated_in_float64():
    xs, ys = _layers(3, 120, 16, seed=50), _layers(3, 120, 8, seed=54)
    exact, fast = mk.MinibatchCKA(), mk.MinibatchCKA()
    for lo in range(0, 120, 24):
        exact.update(xs[:, lo:lo + 24], ys[:, lo:lo + 24])
        fast.update(xs[:, lo:lo + 24].float(), ys[:, lo:lo + 24].float())
    assert fast.hsic_xy.dtype == torch.float64
    # float32 Grams of O(1) rows, 24 rows deep: a few float32 ulps per minibatch.
    torch.testing.assert_close(fast.compute(), exact.compute(), rtol=0, atol=1e-5)


def test_negative_estimates_are_kept():
    # Independent layers over few rows: the unbiased estimate is often below zero.
    xs = torch.randn(6, 8, 3, generator=generator(60), dtype=torch.float64)
    ys = torch.randn(6, 8, 3, generator=generator(61), dtype=torch.float64)
    acc = mk.MinibatchCKA()
    acc.update(xs, ys)
    got = acc.compute()
    assert (got < 0).any()
    np.testing.assert_allclose(got.numpy(), _oracle_map([list(xs)], [list(ys)], dict(kernel="linear")), **F64)


def test_layers_without_variance():
    xs, ys = _layers(3, 40, 5, seed=70), _layers(2, 40, 4, seed=74)
    xs[1] = 7.0  # never any variance: its row of the map is NaN
    xs[2, :20] = -1.0  # none in the first minibatch only: that minibatch adds 0
    acc = mk.MinibatchCKA()
    acc.update(xs[:, :20], ys[:, :20])
    acc.update(xs[:, 20:], ys[:, 20:])
    got = acc.compute()
    assert torch.isnan(got[1]).all()
    assert not torch.isnan(got[[0, 2]]).any()
    second_only = mk.MinibatchCKA()
    second_only.update(xs[2:, 20:], ys[:, 20:])
    # Layer 2 contributes its second minibatch's terms only; ys contribute both.
    want_xy = second_only.hsic_xy[0]
    torch.testing.assert_close(acc.hsic_xy[2], want_xy, rtol=1e-12, atol=0)
    torch.testing.assert_close(acc.hsic_xx[2], second_only.hsic_xx[0], rtol=1e-12, atol=0)
    assert float(acc.hsic_xx[1]) == 0.0 and (acc.hsic_xy[1] == 0).all()


Z = torch.randn(2, 6, 3)


def _updated(*args, **kwargs) -> mk.MinibatchCKA:
    acc = mk.MinibatchCKA()
    acc.update(*args, **kwargs)
    return acc


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mk.MinibatchCKA(kernel="poly"), ValueError, "kernel must be one of"),
        (lambda: mk.MinibatchCKA(kernel="rbf", sigma=0.0), ValueError, "sigma must be a positive finite float"),
        (lambda: mk.MinibatchCKA().compute(), RuntimeError, r"needs at least one update\(\)"),
        (lambda: _updated(Z[:, :3]), ValueError, "a minibatch needs at least 4 rows for the unbiased HSIC; got 3"),
        (lambda: _updated(Z, mask=torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)), ValueError, "at least 4 rows"),
        (lambda: _updated(Z, mask=torch.ones(5, dtype=torch.bool)), ValueError, r"mask must have shape \(6,\)"),
        (lambda: _updated(Z[None]), ValueError, r"xs must hold \(n, p\) layers"),
        (lambda: _updated(Z, torch.randn(2, 7, 3)), ValueError, r"ys must have the row count of xs \(6\)"),
        (lambda: _updated(Z, Z.double()), TypeError, "ys must have the dtype of xs"),
        (lambda: _updated(Z.clone().fill_(math.nan)), ValueError, "xs must be finite"),
        (lambda: _updated(Z, Z.clone().fill_(math.inf)), ValueError, "ys must be finite"),
        (lambda: _updated([Z[0], Z[1].clone().fill_(math.nan)]), ValueError, r"xs\[1\] must be finite"),
        (lambda: _updated(Z.clone().fill_(math.nan), mask=torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.bool)),
         ValueError, "xs must be finite"),
        (lambda: _updated([Z[0], Z[1].int()]), TypeError, r"xs\[1\] must have a floating dtype"),
        (lambda: _updated(Z, Z).update(Z), ValueError, "every update must be with ys, like the first one"),
        (lambda: _updated(Z).update(Z, Z), ValueError, r"every update must be without ys \(a self map\)"),
        (lambda: _updated(Z, Z).update(Z, Z[:1]), ValueError, r"layer counts of the first, \(2, 2\); got \(2, 1\)"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_rejected_minibatch_adds_nothing():
    xs, ys = _layers(3, 40, 5, seed=80), _layers(2, 40, 4, seed=84)
    once, rejected = mk.MinibatchCKA(), mk.MinibatchCKA()
    once.update(xs[:, :20], ys[:, :20])
    rejected.update(xs[:, :20], ys[:, :20])
    bad = ys[:, 20:].clone()
    bad[1, 3, 2] = math.nan
    with pytest.raises(ValueError, match="ys must be finite"):
        rejected.update(xs[:, 20:], bad)
    with pytest.raises(ValueError, match="layer counts"):
        rejected.update(xs[:2, 20:], ys[:, 20:])
    assert rejected.batches == 1 and rejected.rows == 20
    assert torch.equal(rejected.compute(), once.compute())
