"""Input gradients of the reference: torch.autograd.gradcheck where the function is
smooth in x, and central differences of the independent NumPy implementation where
the backward deliberately differs from the derivative of the value (median bandwidth
held constant, detached teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests.seeding import generator
from tests import numpy_reference as npref

SMOOTH_OPTIONS = [
    dict(kernel="linear", unbiased=False),
    dict(kernel="linear", unbiased=True),
    dict(kernel="rbf", unbiased=False, sigma=1.7),
    dict(kernel="rbf", unbiased=True, sigma=3.0),
]
K_MODES = [dict(k=None), dict(k=4), dict(k=[0.5, 6, 1.0], k_min=4)]


def _x(*shape, seed):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


def _mask(lead, t, seed):
    mask = torch.rand(*lead, t, generator=generator(seed)) < 0.8
    mask[..., :5] = True
    return mask


@pytest.mark.parametrize("opts", SMOOTH_OPTIONS, ids=str)
def test_cka_gradcheck(opts):
    x = _x(2, 9, 4, seed=1).requires_grad_()
    y = _x(2, 9, 3, seed=2).requires_grad_()
    mask = _mask((2,), 9, seed=3)
    assert torch.autograd.gradcheck(lambda a, b: mk.cka(a, b, mask=mask, **opts), (x, y))


@pytest.mark.parametrize("opts", SMOOTH_OPTIONS, ids=str)
@pytest.mark.parametrize("kmode", K_MODES, ids=str)
def test_nested_gradcheck_with_teacher_gradient(opts, kmode):
    x = _x(2, 10, 7, seed=4).requires_grad_()
    mask, scores = _mask((2,), 10, seed=5), _x(2, 10, seed=6)

    def f(a):
        return mk.nested_cka(a, [2, 5, 7], scores=scores, mask=mask, detach_full=False, **kmode, **opts)

    assert torch.autograd.gradcheck(f, (x,))


def _numpy_gradient(x: np.ndarray, weights: np.ndarray, detach_full: bool, frozen: dict, **kw) -> np.ndarray:
    """Central differences of sum(weights * nested_cka) with bandwidths frozen."""
    grad = np.zeros_like(x)
    step = 1e-6
    for idx in np.ndindex(x.shape):
        values = []
        for sign in (1, -1):
            moved = x.copy()
            moved[idx] += sign * step
            out, _ = npref.nested_cka(
                moved, full_source=x if detach_full else moved, bandwidths=frozen, **kw
            )
            values.append(np.nansum(weights * out))
        grad[idx] = (values[0] - values[1]) / (2 * step)
    return grad


@pytest.mark.parametrize(
    "opts",
    [
        dict(kernel="rbf", unbiased=False),
        dict(kernel="rbf", unbiased=True, rbf_threshold=0.6),
        dict(kernel="linear", unbiased=False),
        dict(kernel="linear", unbiased=True),
    ],
    ids=str,
)
@pytest.mark.parametrize("detach_full", [True, False])
def test_gradient_against_numpy_differences(opts, detach_full):
    x = _x(2, 9, 6, seed=7)
    mask = _mask((2,), 9, seed=8)
    weights = _x(2, 3, seed=9).numpy()  # an upstream gradient other than 1
    dims, kw = [2, 4, 6], dict(k=[0.6, 7, 1.0], k_min=4, scores="cls")
    xt = x.clone().requires_grad_()
    out = mk.nested_cka(xt, dims, mask=mask, detach_full=detach_full, **kw, **opts)
    (got,) = torch.autograd.grad((out.nan_to_num() * torch.from_numpy(weights)).sum(), xt)

    np_opts = dict(
        kernel=opts["kernel"], unbiased=opts["unbiased"], threshold=opts.get("rbf_threshold", 1.0)
    )
    _, frozen = npref.nested_cka(x.numpy(), dims, mask=mask.numpy(), **kw, **np_opts)
    want = _numpy_gradient(
        x.numpy(), weights, detach_full, frozen, dims=dims, mask=mask.numpy(), **kw, **np_opts
    )
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)


def test_detach_full_changes_the_gradient_only_through_the_teacher():
    x = _x(3, 12, 8, seed=10).requires_grad_()
    detached = mk.nested_cka(x, [3, 8], detach_full=True)
    (g_detached,) = torch.autograd.grad(detached[..., 0].sum(), x)
    attached = mk.nested_cka(x, [3, 8], detach_full=False)
    (g_attached,) = torch.autograd.grad(attached[..., 0].sum(), x)
    # The prefix columns' gradient differs, the teacher-only columns get none when detached.
    assert (g_detached[..., 3:] == 0).all()
    assert g_attached[..., 3:].abs().max() > 1e-3


def test_no_gradient_reaches_a_detached_teacher_through_the_loss():
    x = _x(2, 12, 8, seed=11).requires_grad_()
    mk.NestedCKALoss([2, 5])(x).backward()
    assert (x.grad[..., 5:] == 0).all()
    assert x.grad[..., :5].abs().max() > 0
