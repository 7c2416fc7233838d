"""CKA of many pairs from shared Grams (``cka`` with broadcast leading dims and
``cka_matrix``) against its twin, the eager reference run on every pair expanded, and
against the float64 NumPy oracle.

Tolerances: float64 against float64 differs by summation order only (1e-9, as in
test_reference.py). float32 results are held to the float64 reference within 4x the
float32 reference's own error on the same pairs (tests/accuracy.py) plus a floor of a
few float32 ulps: both do float32 arithmetic on the same values, in another order
(the shared path forms the Gram in row blocks and keeps half of each symmetric
matrix).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests import numpy_reference as npref
from tests.accuracy import assert_within_float32_error, float32_runs, value_and_grads
from tests.seeding import SESSION_SEED, generator
from tests.test_reference import OPTIONS, _np_options

F64 = dict(rtol=1e-9, atol=1e-10)
VALUE_FLOOR = 2e-6
GRAD_FLOOR = 2e-5


def _states(*shape: int, seed: int, offset: float = 4.0, dtype=torch.float64) -> torch.Tensor:
    """Hidden-state-like rows: a large common offset plus unit noise."""
    noise = torch.randn(*shape, generator=generator(seed), dtype=dtype)
    return noise + offset * torch.randn(shape[-1], generator=generator(seed + 1), dtype=dtype)


def _mask(lead: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    mask = torch.rand(*lead, n, generator=generator(seed)) < 0.7
    mask[..., :4] = True
    return mask


def _expanded_reference(x, y, mask=None, **opts) -> torch.Tensor:
    """The reference on every pair, the broadcast materialised."""
    lead = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2], () if mask is None else mask.shape[:-1])
    n = x.shape[-2]
    return mk.cka(
        x.expand(*lead, n, x.shape[-1]), y.expand(*lead, n, y.shape[-1]),
        mask=None if mask is None else mask.expand(*lead, n), backend="torch", **opts,
    )


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("n,widths,layers_y", [(4, (5, 1, 13), 4), (37, (5, 1, 13), 4), (150, (1, 13), 2)])
@pytest.mark.parametrize("masked", [False, True])
def test_cka_matrix_matches_numpy(opts, n, widths, layers_y, masked):
    # Layers of different widths (a list) against a stack, two examples each; n = 150
    # takes Gram row blocks of 64, 64 and 22.
    xs = [_states(2, n, p, seed=10 + p) for p in widths]
    ys = _states(layers_y, 2, n, 7, seed=20) + xs[0][..., :1]
    mask = _mask((2,), n, seed=30) if masked else None
    got = mk.cka_matrix(xs, ys, mask=mask, **opts)
    assert got.shape == (len(xs), layers_y, 2) and got.dtype == torch.float64
    want = np.empty((len(xs), layers_y, 2))
    rows = np.ones((2, n), bool) if mask is None else mask.numpy()
    for i, x in enumerate(xs):
        for j in range(layers_y):
            for b in range(2):
                r = rows[b]
                want[i, j, b] = npref.cka(x[b].numpy()[r], ys[j, b].numpy()[r], **_np_options(opts))[0]
    np.testing.assert_array_equal(np.isnan(got.numpy()), np.isnan(want))
    np.testing.assert_allclose(got.numpy(), want, equal_nan=True, **F64)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("n", [41, 150])
def test_broadcast_cka_float32_values_and_gradients(opts, n):
    # x (3, 1, 2, n, p) against y (4, 1, n, q): (3, 4, 2) pairs, a mask per example.
    x = _states(3, 1, 2, n, 6, seed=1, dtype=torch.float32)
    y = _states(4, 1, n, 9, seed=3, dtype=torch.float32) + x[0, 0, 0, :, :1]
    mask = _mask((2,), n, seed=5)

    def shared(a, b):
        return mk.cka(a, b, mask=mask, **opts)

    def reference(a, b):
        return _expanded_reference(a, b, mask, **opts)

    value, grads = value_and_grads(shared, [x, y], 7)
    assert value.shape == (3, 4, 2) and value.dtype == torch.float32
    runs32 = float32_runs(lambda a: value_and_grads(reference, a, 7), [x, y], seed=SESSION_SEED)
    ref64, grads64 = value_and_grads(reference, [x.double(), y.double()], 7)
    assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=VALUE_FLOOR,
                                what="value", relative=False)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert torch.isfinite(g).all()
        assert_within_float32_error(g, [gs[i] for _, gs in runs32], g64, factor=4, floor=GRAD_FLOOR,
                                    what=f"gradient {i}", relative=True)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_broadcast_cka_float64_gradients_match_the_reference(opts):
    xs = [_states(2, 11, p, seed=40 + p) for p in (3, 8)]
    y = _states(3, 2, 11, 5, seed=50)
    mask = _mask((2,), 11, seed=51)

    def shared(a, b, c):
        return mk.cka_matrix([a, b], c, mask=mask, **opts)

    def reference(a, b, c):
        return torch.stack([_expanded_reference(t[None], c, mask, **opts) for t in (a, b)])

    value, grads = value_and_grads(shared, [*xs, y], 52)
    want, want_grads = value_and_grads(reference, [*xs, y], 52)
    torch.testing.assert_close(value, want, **F64)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10 * float(w.abs().max()))


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_leading_dims_broadcast_as_in_torch(opts):
    # y without leading dims against a batch of x; a 1-D mask shared by every entry.
    x, y = _states(5, 30, 4, seed=60), _states(30, 6, seed=61)
    mask = _mask((), 30, seed=62)
    got = mk.cka(x, y, mask=mask, **opts)
    assert got.shape == (5,)
    torch.testing.assert_close(got, _expanded_reference(x, y, mask, **opts), **F64)
    # A mask that varies where x is shared: x's Grams follow the mask.
    mask2, y2 = _mask((5,), 30, seed=63), _states(5, 30, 6, seed=64)
    got2 = mk.cka(x[0], y2, mask=mask2, **opts)
    assert got2.shape == (5,)
    torch.testing.assert_close(got2, _expanded_reference(x[0], y2, mask2, **opts), **F64)


def test_cka_matrix_equals_cka_on_broadcast_stacks():
    xs, ys = _states(3, 2, 40, 7, seed=70), _states(4, 2, 40, 5, seed=71)
    for opts in OPTIONS:
        torch.testing.assert_close(mk.cka_matrix(xs, ys, **opts), mk.cka(xs[:, None], ys[None], **opts), **F64)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_self_map_is_symmetric_with_unit_diagonal(opts, dtype):
    xs = [_states(50, p, seed=80 + p, dtype=dtype) for p in (4, 9, 16)]
    got = mk.cka_matrix(xs, **opts)
    assert torch.equal(got, got.T)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.diagonal(), torch.ones(3, dtype=dtype), rtol=0, atol=tol)
    ys = [_states(50, 3, seed=90, dtype=dtype), _states(50, 12, seed=91, dtype=dtype)]
    torch.testing.assert_close(mk.cka_matrix(ys, xs, **opts), mk.cka_matrix(xs, ys, **opts).T, rtol=0, atol=tol)


def _degenerate_layers() -> tuple[torch.Tensor, torch.Tensor]:
    """Five layers over 8 rows: fine, constant, one row away from seven that coincide
    (zero unbiased self-HSIC, zero RBF median), constant but for rounding-size noise,
    fine."""
    xs = _states(5, 8, 3, seed=100)
    xs[1] = 2.0
    xs[2] = 0.0
    xs[2, 0, 0] = 1.0
    xs[3] = 5.0 + 1e-15 * _states(8, 3, seed=101, offset=0.0)
    return xs, _states(2, 8, 4, seed=102)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_nan_exactly_where_the_reference_has_nan(opts):
    xs, ys = _degenerate_layers()
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 3:] = False  # three rows: enough for the biased estimator only
    mask[2, 1:] = False  # one row
    x, y = xs[:, None, None], ys[None, :, None].expand(1, 2, 3, 8, 4)
    got = mk.cka(x, y, mask=mask, **opts)
    want = _expanded_reference(x, y, mask, **opts)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got).any() and not torch.isnan(got).all()
    torch.testing.assert_close(got, want, equal_nan=True, **F64)


def test_undefined_entries_have_finite_gradients():
    xs, ys = _degenerate_layers()
    for opts in OPTIONS:
        leaves = [xs.clone().requires_grad_(), ys.clone().requires_grad_()]
        value = mk.cka_matrix(*leaves, **opts)
        assert torch.isnan(value).any()
        grads = torch.autograd.grad(torch.nan_to_num(value).sum(), leaves)
        assert all(torch.isfinite(g).all() for g in grads)


def test_large_offset_keeps_float32_accurate():
    # Hidden states share a large common vector; the Gram is formed after the shift.
    # An offset of 30 per feature: 30^2 n eps is far below 1, so every entry is
    # defined in float32 (the reference's rule).
    shared = _states(300, 20, seed=110, offset=0.0)
    xs = _states(3, 300, 20, seed=111, offset=30.0) + 2 * shared  # correlated layers
    want = mk.cka_matrix(xs, unbiased=True)
    got = mk.cka_matrix(xs.float(), unbiased=True)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


X = torch.randn(3, 6, 5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mk.cka(X, torch.randn(3, 7, 5)), ValueError, r"y must have the row count of x, \(\*, 6, q\)"),
        (lambda: mk.cka(X[:, None], torch.randn(2, 2, 6, 5)), ValueError, r"leading dims of x \(3, 1\) and y \(2, 2\) must broadcast"),
        (lambda: mk.cka(X[:, None], X[None], mask=torch.ones(3, 6)), TypeError, "mask must be a bool tensor that broadcasts"),
        (lambda: mk.cka(X[:, None], X[None], mask=torch.ones(2, 3, 3, 6, dtype=torch.bool)), ValueError,
         r"mask must broadcast to \(3, 3, 6\)"),
        (lambda: mk.cka(X[:, None], X[None], mask=torch.ones(5, dtype=torch.bool)), ValueError, "mask must broadcast"),
        (lambda: mk.cka(X[:, None], X[None].clone().fill_(math.nan)), ValueError, "y must be finite"),
        (lambda: mk.cka(X[:, None], X[None], kernel="cosine"), ValueError, "kernel must be one of"),
        (lambda: mk.cka(X[:, None], X[None], backend="cuda"), ValueError, "backend must be one of"),
        (lambda: mk.cka_matrix(torch.randn(6, 5)), ValueError, r"xs must have shape \(\*, n, features\)"),
        (lambda: mk.cka_matrix(torch.randn(0, 6, 5)), ValueError, r"xs must hold at least one input"),
        (lambda: mk.cka_matrix([]), TypeError, "xs must be a .* tensor or a non-empty sequence"),
        (lambda: mk.cka_matrix("layers"), TypeError, "xs must be a .* tensor or a non-empty sequence"),
        (lambda: mk.cka_matrix([X[0], torch.randn(7, 5)]), ValueError, r"xs\[1\] must have the leading dims and row count"),
        (lambda: mk.cka_matrix([X[0], X[1].double()]), TypeError, r"xs\[1\] must have the dtype of xs\[0\]"),
        (lambda: mk.cka_matrix([X[0], X[1].long()]), TypeError, r"xs\[1\] must have a floating dtype"),
        (lambda: mk.cka_matrix(X, torch.randn(2, 7, 5)), ValueError, r"ys\[0\] must have the leading dims and row count"),
        (lambda: mk.cka_matrix(X, X.double()), TypeError, r"ys\[0\] must have the dtype of xs\[0\]"),
        (lambda: mk.cka_matrix([X[0], X[1].clone().fill_(math.inf)]), ValueError, r"xs\[1\] must be finite"),
        (lambda: mk.cka_matrix(X, mask=torch.ones(5, dtype=torch.bool)), ValueError, r"mask must have shape \(6,\)"),
        (lambda: mk.cka_matrix(X, kernel="rbf", sigma=-1.0), ValueError, "sigma must be a positive finite float"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()
