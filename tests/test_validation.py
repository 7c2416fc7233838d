"""Every bad input gives a clear exception naming the argument and the expected form."""

from __future__ import annotations

import math

import pytest
import torch

import mipic_kernels as mk

X = torch.randn(2, 6, 5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: mk.cka([[1.0]], X), TypeError, "x must be a torch.Tensor"),
        (lambda: mk.cka(X.long(), X), TypeError, "x must have a floating dtype"),
        (lambda: mk.cka(X, X.to(torch.complex64)), TypeError, "y must have a floating dtype"),
        (lambda: mk.cka(torch.randn(5), X), ValueError, r"x must have shape \(\*, n, features\)"),
        (lambda: mk.cka(X, torch.randn(2, 7, 5)), ValueError, "y must have the row count of x"),
        (lambda: mk.cka(X, torch.randn(3, 6, 5)), ValueError, r"leading dims of x \(2,\) and y \(3,\) must broadcast"),
        (lambda: mk.cka(X, X, mask=torch.ones(2, 6)), TypeError, "mask must be a bool tensor"),
        (lambda: mk.cka(X, X, mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 6\)"),
        (lambda: mk.cka(X, X, kernel="cosine"), ValueError, "kernel must be one of"),
        (lambda: mk.cka(X, X, kernel="rbf", sigma=0.0), ValueError, "sigma must be a positive finite float"),
        (lambda: mk.cka(X, X, kernel="rbf", sigma=math.inf), ValueError, "sigma must be a positive finite float"),
        (lambda: mk.cka(X, X, kernel="rbf", sigma="1"), TypeError, "sigma must be a positive finite float"),
        (lambda: mk.cka(X, X, rbf_threshold=math.nan), ValueError, "rbf_threshold must be a positive finite"),
        (lambda: mk.cka(X, X, rbf_threshold=-1.0), ValueError, "rbf_threshold must be a positive finite"),
        (lambda: mk.cka(X, X, backend="cuda"), ValueError, "backend must be one of"),
        (lambda: mk.cka(X, X, precision="tf32"), ValueError, r"precision must be one of \('fast', 'ieee'\)"),
        (lambda: mk.nested_cka(X, [2, 5], precision=None), ValueError, "precision must be one of"),
        (lambda: mk.cka(X.clone().fill_(math.nan), X), ValueError, "x must be finite"),
        (lambda: mk.cka(X, X.clone().fill_(math.inf)), ValueError, "y must be finite"),
        (lambda: mk.nested_cka(torch.randn(2, 0, 5), [2]), ValueError, r"at least one token position"),
        (lambda: mk.nested_cka(X, []), ValueError, "dims must be a non-empty sequence"),
        (lambda: mk.nested_cka(X, 4), ValueError, "dims must be a non-empty sequence"),
        (lambda: mk.nested_cka(X, [3, 2]), ValueError, "dims must be strictly increasing"),
        (lambda: mk.nested_cka(X, [2, 2]), ValueError, "dims must be strictly increasing"),
        (lambda: mk.nested_cka(X, [0, 2]), ValueError, r"dims must hold ints in \[1, D=5\]"),
        (lambda: mk.nested_cka(X, [2, 6]), ValueError, r"dims must hold ints in \[1, D=5\]"),
        (lambda: mk.nested_cka(X, [2.0]), ValueError, "dims must hold ints"),
        (lambda: mk.nested_cka(X, [True]), ValueError, "dims must hold ints"),
        (lambda: mk.nested_cka(X, [2], k=0), ValueError, "k must be an int >= 1"),
        (lambda: mk.nested_cka(X, [2], k=[1, 2]), ValueError, r"k must have one entry per width \(1\)"),
        (lambda: mk.nested_cka(X, [2, 3], k=[0.5, 1.5]), ValueError, r"k entries must be ints >= 1 or floats in \(0, 1\]"),
        (lambda: mk.nested_cka(X, [2, 3], k=[0.5, 0.0]), ValueError, r"floats in \(0, 1\]"),
        (lambda: mk.nested_cka(X, [2, 3], k=[0.5, -2]), ValueError, "k entries must be an int >= 1"),
        (lambda: mk.nested_cka(X, [2], k="all"), ValueError, "k must be None, an int >= 1"),
        (lambda: mk.nested_cka(X, [2], k_min=0), ValueError, "k_min must be an int >= 1"),
        (lambda: mk.nested_cka(X, [2], scores="attention"), ValueError, "scores must be a"),
        (lambda: mk.nested_cka(X, [2], scores=torch.ones(2, 5)), ValueError, r"scores must have shape \(2, 6\)"),
        (lambda: mk.nested_cka(X, [2], scores=torch.ones(2, 6, dtype=torch.long)), TypeError, "scores must have a floating dtype"),
        (lambda: mk.nested_cka(X, [2], scores=torch.full((2, 6), math.nan)), ValueError, "scores must be finite"),
        (lambda: mk.nested_cka(X, [2], mask=torch.ones(2, 6, 1, dtype=torch.bool)), ValueError, "mask must have shape"),
        (lambda: mk.nested_cka(X.double().fill_(math.nan), [2]), ValueError, "x must be finite"),
    ],
)
def test_bad_input_is_named(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_empty_batches_and_rows_are_not_errors():
    assert mk.nested_cka(torch.randn(0, 5, 4), [2]).shape == (0, 1)
    assert mk.NestedCKALoss([2])(torch.randn(0, 5, 4)).item() == 0.0
    assert torch.isnan(mk.cka(torch.randn(3, 0, 4), torch.randn(3, 0, 2))).all()


def test_auto_backend_on_cpu_is_the_reference():
    x = torch.randn(3, 9, 4, dtype=torch.float64)
    torch.testing.assert_close(
        mk.nested_cka(x, [2, 4], backend="auto"), mk.nested_cka(x, [2, 4], backend="torch"), rtol=0, atol=0
    )
