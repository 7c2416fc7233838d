"""The eager reference against an independent float64 NumPy implementation.

Tolerances: float64 against float64 differs only by summation order and by the
reference's shifted statistics, so values agree to ~1e-12 relative; we allow 1e-9.
float32 arithmetic on O(1) inputs with n <= 100 rows loses at most a few hundred ulps
(~1e-5) in the Gram sums, so float32 results are held to 1e-4 absolute.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests import numpy_reference as npref

F64 = dict(rtol=1e-9, atol=1e-10)
OPTIONS = [
    dict(kernel="linear", unbiased=False),
    dict(kernel="linear", unbiased=True),
    dict(kernel="rbf", unbiased=False),
    dict(kernel="rbf", unbiased=True),
    dict(kernel="rbf", unbiased=False, sigma=2.5),
    dict(kernel="rbf", unbiased=True, rbf_threshold=0.5),
]


def _np_options(opts: dict) -> dict:
    return dict(
        kernel=opts["kernel"], unbiased=opts["unbiased"], sigma=opts.get("sigma"),
        threshold=opts.get("rbf_threshold", 1.0),
    )


def _random_mask(gen: torch.Generator, lead: tuple, t: int, min_real: int = 0) -> torch.Tensor:
    """Right-, left- and mid-padded rows with varying real counts."""
    lengths = torch.randint(min_real, t + 1, lead, generator=gen)
    pos = torch.rand(*lead, t, generator=gen).argsort(-1).argsort(-1)
    return pos < lengths[..., None]


def _assert_same(got: torch.Tensor, want: np.ndarray, **tol) -> None:
    got = got.detach().double().numpy()
    assert got.shape == want.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, equal_nan=True, **tol)


def test_golden_values():
    rng = np.random.RandomState(1337)
    x = torch.tensor(rng.randn(100, 10))
    y = torch.tensor(rng.randn(100, 10)) + x
    assert mk.cka(x, y).item() == pytest.approx(0.55761, abs=5e-6)
    assert mk.cka(x, y, kernel="rbf", rbf_threshold=0.5).item() == pytest.approx(0.65483, abs=5e-6)
    assert mk.cka(x, y, unbiased=True).item() == pytest.approx(0.51346, abs=5e-6)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("lead,n,p,q", [((), 37, 7, 100), ((2, 3), 9, 1, 7), ((5,), 4, 100, 1)])
@pytest.mark.parametrize("masked", [False, True])
def test_cka_matches_numpy(opts, lead, n, p, q, masked, gen):
    x = torch.randn(*lead, n, p, generator=gen, dtype=torch.float64) * 3 + 1
    y = torch.randn(*lead, n, q, generator=gen, dtype=torch.float64) + x[..., :1]
    mask = _random_mask(gen, lead, n) if masked else None
    got = mk.cka(x, y, mask=mask, **opts)
    xs, ys = x.reshape(-1, n, p).numpy(), y.reshape(-1, n, q).numpy()
    ms = np.ones((xs.shape[0], n), bool) if mask is None else mask.reshape(-1, n).numpy()
    want = [npref.cka(a[m], b[m], **_np_options(opts))[0] for a, b, m in zip(xs, ys, ms)]
    _assert_same(got, np.array(want).reshape(lead), **F64)


K_MODES = [
    dict(k=None),
    dict(k=5),
    dict(k=[0.2, 3, 0.5, 1.0], k_min=2),
    dict(k=[0.3, 0.3, 0.7, 0.7], k_min=8),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("kmode", K_MODES, ids=str)
@pytest.mark.parametrize("scores", [None, "cls", "tensor"])
def test_nested_matches_numpy(opts, kmode, scores, gen):
    lead, t, d, dims = (2, 3), 37, 100, [3, 17, 50, 100]
    x = torch.randn(*lead, t, d, generator=gen, dtype=torch.float64) + 2.0
    mask = _random_mask(gen, lead, t, min_real=1)
    sc = torch.randn(*lead, t, generator=gen, dtype=torch.float64) if scores == "tensor" else scores
    got = mk.nested_cka(x, dims, scores=sc, mask=mask, **kmode, **opts)
    want, _ = npref.nested_cka(
        x.numpy(), dims, scores=sc.numpy() if scores == "tensor" else sc, mask=mask.numpy(),
        **kmode, **_np_options(opts),
    )
    _assert_same(got, want, **F64)


@pytest.mark.parametrize("t,d,dims", [(1, 1, [1]), (3, 7, [2, 5]), (37, 7, [1, 6]), (3, 100, [99])])
@pytest.mark.parametrize("opts", OPTIONS[:4], ids=str)
def test_nested_awkward_sizes(t, d, dims, opts, gen):
    x = torch.randn(4, t, d, generator=gen, dtype=torch.float64)
    mask = _random_mask(gen, (4,), t)
    got = mk.nested_cka(x, dims, k=[0.5] * len(dims), k_min=3, mask=mask, scores="cls", **opts)
    want, _ = npref.nested_cka(
        x.numpy(), dims, k=[0.5] * len(dims), k_min=3, mask=mask.numpy(), scores="cls",
        **_np_options(opts),
    )
    _assert_same(got, want, **F64)


def test_fraction_is_read_as_a_decimal():
    x = torch.randn(1, 50, 6, dtype=torch.float64)
    # 0.14 * 50 is 7.000000000000001 in binary: k must be 7, not 8.
    got = mk.nested_cka(x, [2], k=[0.14])
    want = mk.cka(x[:, :7, :2], x[:, :7, :])
    torch.testing.assert_close(got[..., 0], want)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_float32_close_to_float64(opts, gen):
    x = torch.randn(3, 40, 50, generator=gen, dtype=torch.float64) * 2 + 5.0
    mask = _random_mask(gen, (3,), 40, min_real=8)
    # Float64 scores: a float32 "cls" ranking may order near-ties differently.
    scores = torch.randn(3, 40, generator=gen, dtype=torch.float64)
    kw = dict(k=[0.4, 0.8, 1.0], k_min=4, scores=scores, mask=mask, **opts)
    want = mk.nested_cka(x, [4, 13, 31], **kw)
    got = mk.nested_cka(x.float(), [4, 13, 31], **kw)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_bfloat16_input_is_computed_in_float32():
    x = torch.randn(2, 30, 24, dtype=torch.float64).to(torch.bfloat16)
    got = mk.nested_cka(x, [8, 16], k=20)
    assert got.dtype == torch.float32
    want = mk.nested_cka(x.double(), [8, 16], k=20)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
