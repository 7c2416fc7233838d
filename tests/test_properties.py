"""Mathematical properties of CKA and of the token selection, on the reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mipic_kernels as mk
from mipic_kernels import selection
from tests.seeding import generator

OPTIONS = [
    dict(kernel="linear", unbiased=False),
    dict(kernel="linear", unbiased=True),
    dict(kernel="rbf", unbiased=False),
    dict(kernel="rbf", unbiased=True, rbf_threshold=0.7),
]
TOL = dict(rtol=1e-9, atol=1e-10)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_full_width_is_one(opts):
    x = _x(3, 2, 19, 11)
    got = mk.nested_cka(x, [5, 11], k=[0.5, 0.8], k_min=4, scores="cls", **opts)
    torch.testing.assert_close(got[..., -1], torch.ones(3, 2, dtype=torch.float64), **TOL)
    assert (got[..., 0] < 1 - 1e-6).all()


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_cka_with_itself_is_one(opts):
    x = _x(4, 23, 9)
    torch.testing.assert_close(mk.cka(x, x, **opts), torch.ones(4, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_token_permutation_invariance(opts):
    x, scores = _x(2, 29, 13, seed=1), _x(2, 29, seed=2)
    mask = torch.rand(2, 29, generator=generator(3)) < 0.8
    perm = torch.randperm(29, generator=generator(4))
    kw = dict(k=[0.3, 0.6, 9], k_min=4, **opts)
    a = mk.nested_cka(x, [3, 7, 12], scores=scores, mask=mask, **kw)
    b = mk.nested_cka(x[:, perm], [3, 7, 12], scores=scores[:, perm], mask=mask[:, perm], **kw)
    torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(
        mk.cka(x, x[..., :5], mask=mask, **opts), mk.cka(x[:, perm], x[:, perm, :5], mask=mask[:, perm], **opts), **TOL
    )


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_padding_does_not_change_results(opts):
    x = _x(3, 17, 10, seed=5)
    garbage = _x(3, 6, 10, seed=6) * 1e3
    padded = torch.cat([garbage[:, :2], x, garbage[:, 2:]], dim=1)
    mask = torch.zeros(3, 23, dtype=torch.bool)
    mask[:, 2:19] = True
    scores = _x(3, 23, seed=7)
    kw = dict(k=[0.5, 12], k_min=4, **opts)
    a = mk.nested_cka(x, [4, 9], scores=scores[:, 2:19], **kw)
    b = mk.nested_cka(padded, [4, 9], scores=scores, mask=mask, **kw)
    torch.testing.assert_close(a, b, **TOL)
    # Scores of padding positions are never read, even when they are not finite.
    scores[:, :2] = math.inf
    torch.testing.assert_close(b, mk.nested_cka(padded, [4, 9], scores=scores, mask=mask, **kw), **TOL)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_selection_equals_selecting_by_hand(opts):
    x, scores = _x(15, 12, seed=8), _x(15, seed=9)
    scores[3] = scores[9]  # a tie: the lower position ranks first
    mask = torch.ones(15, dtype=torch.bool)
    mask[[0, 5]] = False
    got = mk.nested_cka(x, [3, 8], k=[4, 0.7], scores=scores, mask=mask, **opts)
    ranked = sorted((j for j in range(15) if mask[j]), key=lambda j: (-scores[j].item(), j))
    for i, (width, count) in enumerate([(3, 4), (8, math.ceil(0.7 * 13))]):
        rows = torch.tensor(ranked[:count])
        want = mk.cka(x[rows, :width], x[rows], **opts)
        torch.testing.assert_close(got[i], want, **TOL)


@pytest.mark.parametrize(
    "k, k_min",
    [(None, 1), (5, 2), (60, 3), ([0.14, 0.3, 1.0], 4), ([0.5, 7], 30), ([1e-12, 2], 1), ([0.01, 0.02], 1)],
    ids=str,
)
def test_gram_edge_is_the_largest_count_any_example_can_get(k, k_min):
    # Every real-token count m in [0, T]: the edge bounds every k_i and m = T reaches it.
    tokens = 50
    widths = len(k) if isinstance(k, list) else 3
    counts = selection.resolve_k(k, k_min, torch.arange(tokens + 1), widths)
    assert int(counts.max()) == selection.gram_edge(k, k_min, tokens)


class _LargestFloat32Output(TorchDispatchMode):
    """The most elements of any float32 tensor an operator returns while active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                self.largest = max(self.largest, t.numel())
        return out


def test_cls_scores_of_half_precision_never_copy_all_of_x_to_float32(monkeypatch):
    # The torch path converts a few examples at a time (here 3 of 12).
    x = torch.randn(12, 30, 20, generator=generator(13)).to(torch.bfloat16)
    monkeypatch.setattr(selection, "_SCORE_CHUNK_ELEMENTS", 3 * 30 * 20)
    with _LargestFloat32Output() as seen:
        scores = selection.cls_scores(x)
    assert 0 < seen.largest <= 3 * 30 * 20
    x64 = x.double()
    torch.testing.assert_close(scores, ((x64[:, :1] * x64).sum(-1) / 20**0.5).float())


def test_cls_scores_rank_by_attention_to_the_first_token():
    x = _x(2, 11, 16, seed=10)
    want = (x[..., :1, :] * x).sum(-1) / 4.0
    torch.testing.assert_close(
        mk.nested_cka(x, [5], k=6, scores="cls"), mk.nested_cka(x, [5], k=6, scores=want), **TOL
    )


@pytest.mark.parametrize("unbiased", [False, True])
def test_linear_cka_invariant_to_rotation_and_scale(unbiased):
    x, y = _x(3, 31, 8, seed=11), _x(3, 31, 5, seed=12)
    q, _ = torch.linalg.qr(_x(8, 8, seed=13))
    base = mk.cka(x, y, unbiased=unbiased)
    torch.testing.assert_close(mk.cka(x @ q, y, unbiased=unbiased), base, **TOL)
    torch.testing.assert_close(mk.cka(x, 7.5 * y, unbiased=unbiased), base, **TOL)
    torch.testing.assert_close(mk.cka(x + 100.0, y, unbiased=unbiased), base, **TOL)


def test_rbf_median_bandwidth_invariant_to_rotation_and_scale():
    x, y = _x(2, 25, 6, seed=14), _x(2, 25, 4, seed=15)
    q, _ = torch.linalg.qr(_x(6, 6, seed=16))
    base = mk.cka(x, y, kernel="rbf")
    torch.testing.assert_close(mk.cka(3.0 * x @ q, y, kernel="rbf"), base, **TOL)


def test_shift_keeps_float32_accurate_under_a_large_offset():
    # Hidden states share a large common vector; centring in the statistics alone
    # would cancel catastrophically in float32.
    x = _x(2, 64, 48, seed=17) + 300.0 * _x(1, 1, 48, seed=18)
    want = mk.nested_cka(x, [8, 24], k=[0.5, 0.9])
    got = mk.nested_cka(x.float(), [8, 24], k=[0.5, 0.9])
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("unbiased", [False, True])
def test_undefined_entries_are_nan_exactly_there(unbiased):
    x = _x(5, 9, 6, seed=19)
    mask = torch.ones(5, 9, dtype=torch.bool)
    mask[0, 1:] = False  # one real token
    mask[1, 3:] = False  # three real tokens: enough for biased only
    x[2] = 4.0  # constant tokens: no variance on either side
    x[3, :, :2] = 1.5  # constant prefix of width 2: no variance on the prefix side
    got = mk.nested_cka(x, [2, 4], mask=mask, unbiased=unbiased)
    expect_nan = torch.zeros(5, 2, dtype=torch.bool)
    expect_nan[0] = True
    expect_nan[1] = unbiased
    expect_nan[2] = True
    expect_nan[3, 0] = True
    assert torch.equal(torch.isnan(got), expect_nan)
    assert torch.isfinite(got[~expect_nan]).all()


def test_zero_median_bandwidth_is_undefined():
    x = torch.zeros(1, 6, 3, dtype=torch.float64)
    x[0, 0, 0] = 1.0  # five of six tokens coincide: more than half the distances are zero
    assert torch.isnan(mk.cka(x, x, kernel="rbf")).all()
    assert torch.isfinite(mk.cka(x, x, kernel="rbf", sigma=1.0)).all()


def test_undefined_entries_have_finite_zero_gradients():
    x = _x(3, 7, 5, seed=20).requires_grad_()
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 1:] = False
    for kernel in ("linear", "rbf"):
        out = mk.nested_cka(x, [2, 5], mask=mask, kernel=kernel, detach_full=False)
        (grad,) = torch.autograd.grad(torch.nan_to_num(out).sum(), x)
        assert torch.isfinite(grad).all()
        assert (grad[0] == 0).all()


def test_unbiased_self_hsic_can_vanish_for_spread_out_tokens():
    x = torch.zeros(6, 3, dtype=torch.float64)
    x[0, 0] = 1.0  # one token away from five that coincide
    y = _x(6, 3, seed=21)
    assert torch.isnan(mk.cka(x, y, unbiased=True))
    assert torch.isfinite(mk.cka(x, y, unbiased=False))
