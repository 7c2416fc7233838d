"""The span relation distance (mipic_kernels.relation) on the reference backend against the
independent float64 NumPy oracle: values and input gradients, both distances, awkward
sizes, padding, invariances, the loss module and every bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests import numpy_relation
from tests.numpy_mic import finite_difference_gradient
from tests.relation_inputs import relation_inputs
from tests.seeding import generator

OPTIONS = [dict(distance="mse"), dict(distance="smooth_l1", beta=0.05), dict(distance="smooth_l1", beta=2.0)]


def _oracle(inputs, **opts) -> np.ndarray:
    return numpy_relation.span_relation_distance(*(t.detach().double().numpy() for t in inputs), **opts)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_values_match_numpy(opts):
    inputs = relation_inputs(seed=0)
    got = mk.span_relation_distance(
        inputs.x, inputs.y, inputs.spans_x, inputs.spans_y, weights_x=inputs.weights_x,
        weights_y=inputs.weights_y, backend="torch", **opts,
    )
    want = _oracle(inputs, **opts)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    assert np.array_equal(np.isnan(got.numpy()), np.isnan(want))
    assert np.isnan(want).sum() == 2 and (want[~np.isnan(want)] > 0).all()  # entries with 0 and 1 span
    # Unit vectors of states with a common offset: the oracle's 1 - cos and the
    # reference's shifted Gram agree to ~1e-15 of the O(1e-2) distances.
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("opts", OPTIONS[:2], ids=str)
def test_gradients_match_finite_differences(opts):
    inputs = relation_inputs((2, 2), tokens=(9, 8), widths=(6, 5), counts=(4, 1, 6, 3), seed=1)
    upstream = torch.rand(2, 2, generator=generator(2), dtype=torch.float64) * 2 - 0.5
    x, y = inputs.x.clone().requires_grad_(), inputs.y.clone().requires_grad_()
    value = mk.span_relation_distance(x, y, inputs.spans_x, inputs.spans_y, weights_x=inputs.weights_x,
                                      weights_y=inputs.weights_y, backend="torch", **opts)
    (value.nan_to_num(0) * upstream).sum().backward()
    w = upstream.numpy()
    rest = [t.numpy() for t in inputs[2:]]

    def total(xs: np.ndarray, ys: np.ndarray) -> float:
        values = numpy_relation.span_relation_distance(xs, ys, *rest, **opts)
        return float(np.nansum(values * w))

    xs, ys = inputs.x.numpy().copy(), inputs.y.numpy().copy()
    fd_x = finite_difference_gradient(lambda v: total(v, ys), xs)
    fd_y = finite_difference_gradient(lambda v: total(xs, v), ys)
    for grad, fd, spans in ((x.grad, fd_x, inputs.spans_x), (y.grad, fd_y, inputs.spans_y)):
        assert (grad[spans < 0] == 0).all(), "tokens outside spans receive no gradient"
        np.testing.assert_allclose(grad.numpy(), fd, rtol=0, atol=1e-7 * np.abs(fd).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_inputs_compute_in_float32(dtype):
    # Against the oracle on the same (rounded) inputs (the weights rounded to float32
    # too). Float32 unit vectors are good to ~1e-7 and the distances come from their
    # shifted Gram, so the values are good to a few float32 ulps of the largest one:
    # the worst seen over 20 seeds was 6.5e-7 of it.
    inputs = relation_inputs(seed=3)
    x, y = inputs.x.to(dtype), inputs.y.to(dtype)
    got = mk.span_relation_distance(x, y, inputs.spans_x, inputs.spans_y, weights_x=inputs.weights_x.float(),
                                    weights_y=inputs.weights_y.float(), backend="torch")
    assert got.dtype == torch.float32
    want = _oracle(inputs._replace(x=x.double(), y=y.double()))
    scale = np.nanmax(np.abs(want))
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=5e-6 * scale)


def test_weights_default_to_the_mean_and_get_no_gradient():
    inputs = relation_inputs(seed=4)
    ones_x, ones_y = torch.ones_like(inputs.weights_x), torch.ones_like(inputs.weights_y)
    got = mk.span_relation_distance(inputs.x, inputs.y, inputs.spans_x, inputs.spans_y, backend="torch")
    want = _oracle(inputs._replace(weights_x=ones_x, weights_y=ones_y))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-14)
    weights = inputs.weights_x.clone().requires_grad_()
    x = inputs.x.clone().requires_grad_()
    mk.span_relation_distance(x, inputs.y, inputs.spans_x, inputs.spans_y, weights_x=weights,
                              backend="torch").nansum().backward()
    assert weights.grad is None and x.grad is not None


def test_invariances():
    inputs = relation_inputs(seed=5)
    base = mk.span_relation_distance(inputs.x, inputs.y, inputs.spans_x, inputs.spans_y,
                                     weights_x=inputs.weights_x, weights_y=inputs.weights_y, backend="torch")
    # A rotation of either side and a positive scale of each token's weights within a
    # span (here: of all weights) change nothing.
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=generator(6), dtype=torch.float64))
    moved = mk.span_relation_distance(inputs.x * 3.0, inputs.y @ q, inputs.spans_x, inputs.spans_y,
                                      weights_x=inputs.weights_x * 7.0, weights_y=inputs.weights_y,
                                      backend="torch")
    torch.testing.assert_close(moved, base, rtol=1e-9, atol=1e-13, equal_nan=True)
    # A side against itself (through a rotation and another width) is at distance 0.
    padded = torch.cat([inputs.x @ torch.linalg.qr(torch.randn(37, 37, generator=generator(7),
                                                                dtype=torch.float64))[0],
                        torch.zeros(*inputs.x.shape[:-1], 3, dtype=torch.float64)], -1)
    same = mk.span_relation_distance(inputs.x, padded, inputs.spans_x, inputs.spans_x,
                                     weights_x=inputs.weights_x, weights_y=inputs.weights_x, backend="torch")
    defined = ~torch.isnan(same)
    assert defined.sum() == 4 and (same[defined].abs() < 1e-20).all()
    # Padding never matters, non-finite included.
    dirty = inputs.x.clone()
    dirty[inputs.spans_x < 0] = math.nan
    again = mk.span_relation_distance(dirty, inputs.y, inputs.spans_x, inputs.spans_y,
                                      weights_x=inputs.weights_x, weights_y=inputs.weights_y, backend="torch")
    torch.testing.assert_close(again, base, rtol=0, atol=0, equal_nan=True)


def test_max_spans_and_leading_dims():
    inputs = relation_inputs((4,), counts=(3, 6, 2, 5), seed=8)
    full = mk.span_relation_distance(inputs.x, inputs.y, inputs.spans_x, inputs.spans_y, backend="torch")
    tight = mk.span_relation_distance(inputs.x, inputs.y, inputs.spans_x, inputs.spans_y, max_spans=6,
                                      backend="torch")
    torch.testing.assert_close(tight, full, rtol=1e-12, atol=1e-15)
    flat = mk.span_relation_distance(inputs.x[None, :, None], inputs.y[None, :, None], inputs.spans_x[None, :, None],
                                     inputs.spans_y[None, :, None], backend="torch")
    assert flat.shape == (1, 4, 1)
    torch.testing.assert_close(flat.flatten(), full)
    single = mk.span_relation_distance(inputs.x[1], inputs.y[1], inputs.spans_x[1], inputs.spans_y[1],
                                       backend="torch")
    assert single.shape == () and torch.allclose(single, full[1])


def test_loss_module_means_the_defined_entries():
    inputs = relation_inputs(seed=9)
    loss = mk.SpanRelationLoss("smooth_l1", beta=0.1, backend="torch")
    values = mk.span_relation_distance(*inputs[:4], weights_x=inputs.weights_x, weights_y=inputs.weights_y,
                                       distance="smooth_l1", beta=0.1, backend="torch")
    x = inputs.x.clone().requires_grad_()
    out = loss(x, inputs.y, inputs.spans_x, inputs.spans_y, inputs.weights_x, inputs.weights_y)
    torch.testing.assert_close(out, values[~values.isnan()].mean())
    out.backward()
    assert torch.isfinite(x.grad).all()
    none_defined = loss(x[0, :2], inputs.y[0, :2], inputs.spans_x[0, :2], inputs.spans_y[0, :2])
    assert float(none_defined.detach()) == 0.0  # these entries have 0 and 1 span
    assert mk.SpanRelationLoss(**loss.get_config_dict()).get_config_dict() == loss.get_config_dict()
    assert "beta=0.1" in repr(loss)


def test_traces_without_graph_breaks():
    inputs = relation_inputs(seed=10)
    x = inputs.x.float().requires_grad_()

    def loss(x):
        return mk.span_relation_distance(x, inputs.y.float(), inputs.spans_x, inputs.spans_y,
                                         max_spans=10, backend="torch").nan_to_num(0).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    value = compiled(x)
    value.backward()
    torch.testing.assert_close(value, loss(x.detach()))


def _spans() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    x, y = torch.randn(2, 5, 4), torch.randn(2, 6, 3)
    sx = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, -1, -1]])
    sy = torch.tensor([[-1, 0, 1, 1, 2, -1], [-1, 0, 0, 1, -1, -1]])
    return x, y, sx, sy


def _call(**changes):
    x, y, sx, sy = _spans()
    args = dict(x=x, y=y, spans_x=sx, spans_y=sy, backend="torch") | changes
    return mk.span_relation_distance(args.pop("x"), args.pop("y"), args.pop("spans_x"), args.pop("spans_y"), **args)


def _with(tensor: torch.Tensor, index, value) -> torch.Tensor:
    out = tensor.clone()
    out[index] = value
    return out


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(x=torch.randn(2, 5, 4).long()), TypeError, "x must have a floating dtype"),
        (dict(y=torch.randn(3, 6, 3)), ValueError, "y must have the leading dims of x, (2,)"),
        (dict(x=torch.randn(2, 0, 4), spans_x=torch.zeros(2, 0, dtype=torch.long)), ValueError,
         "at least one token each"),
        (dict(spans_x=torch.zeros(2, 5)), TypeError, "spans_x must be an int32 or int64 tensor"),
        (dict(spans_y=torch.zeros(2, 5, dtype=torch.long)), ValueError, "spans_y must have shape (2, 6)"),
        (dict(weights_x=torch.ones(2, 5, dtype=torch.long)), TypeError, "weights_x must be None or a floating"),
        (dict(weights_y=torch.ones(2, 5)), ValueError, "weights_y must have shape (2, 6)"),
        (dict(max_spans=0), ValueError, "max_spans must be an int >= 1"),
        (dict(distance="l2"), ValueError, "distance must be one of"),
        (dict(beta=0.0), ValueError, "beta must be a positive finite float"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(spans_x=_with(_spans()[2], (0, 0), -2)), ValueError, "spans_x must hold span ids in [-1, max_spans=5)"),
        (dict(max_spans=2), ValueError, "spans_x must hold span ids in [-1, max_spans=2)"),
        (dict(spans_x=_with(_spans()[2], (0, 3), 2)), ValueError, "entry (0,) skips id 1"),
        (dict(spans_y=_with(_spans()[3], (1, 3), 0)), ValueError, "entry (1,) has 2 spans in spans_x and 1 in spans_y"),
        (dict(x=_with(_spans()[0], (0, 2, 1), math.inf)), ValueError, "x (at tokens in a span) must be finite"),
        (dict(weights_y=_with(torch.ones(2, 6), (0, 1), -1.0)), ValueError, "weights_y must be finite and >= 0"),
        (dict(weights_x=_with(torch.ones(2, 5), (1, 2), 0.0)), ValueError,
         "weights_x must give every span a positive total weight; span 1 of entry (1,)"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, message):
    with pytest.raises(error) as info:
        _call(**changes)
    assert message in str(info.value)


def test_no_value_checks_under_compile_or_on_padding():
    # Padding tokens (span -1) may hold anything; checks read only span tokens.
    x, y, sx, sy = _spans()
    x[0, 0] = math.nan
    assert torch.isfinite(mk.span_relation_distance(x, y, sx, sy, backend="torch")).all()


def test_pool_spans_is_the_weighted_mean():
    inputs = relation_inputs((2,), counts=(3, 5), seed=12)
    x = inputs.x.clone().requires_grad_()
    pooled = mk.pool_spans(x, inputs.spans_x, inputs.weights_x, max_spans=6)
    assert pooled.shape == (2, 6, 37) and pooled.dtype == torch.float64
    for b, n in enumerate((3, 5)):
        for s in range(6):
            member = inputs.spans_x[b] == s
            if s >= n:
                assert not member.any() and (pooled[b, s] == 0).all()
                continue
            w = inputs.weights_x[b, member]
            want = (w[:, None] * inputs.x[b, member]).sum(0) / w.sum()
            torch.testing.assert_close(pooled[b, s], want)
    pooled.sum().backward()
    assert (x.grad[inputs.spans_x < 0] == 0).all()
    assert mk.pool_spans(inputs.x.float(), inputs.spans_x).dtype == torch.float32
    with pytest.raises(ValueError, match="spans must have shape"):
        mk.pool_spans(inputs.x, inputs.spans_y)
