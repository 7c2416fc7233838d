"""The fused span relation kernels against the eager reference: values, NaN positions and
input gradients of both sides at awkward sizes (under Triton's interpreter on a CPU, on
the GPU where CUDA is present).

Tolerances (tests/accuracy.py): the kernels and the float32 reference both compute in
float32, so the kernels are held to the float64 reference within 4x the float32
reference's own worst error (over the inputs and copies moved by one ulp) plus a floor.
Values are O(1e-3 .. 1e-2) and gradients of any scale, so both are compared relative
to their largest entry, with floors of 8 float32 ulps (5e-7) for values and 2e-6 for
gradients: a gradient sums up to S products of coefficient and span vector, then goes
through the normalisation and the weights.
"""

from __future__ import annotations

import math

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytest.importorskip("triton")

import os  # noqa: E402

if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the kernels need TRITON_INTERPRET=1 on a CPU (tests/conftest.py sets it)", allow_module_level=True)

import mipic_kernels as mk  # noqa: E402
from mipic_kernels.fused import relation_op  # noqa: E402
from tests.accuracy import assert_within_float32_error, compare_backends, float32_runs  # noqa: E402
from tests.host_sync import HostSyncRecorder  # noqa: E402
from tests.relation_inputs import RelationInputs, relation_inputs  # noqa: E402
from tests.seeding import SESSION_SEED, generator  # noqa: E402

OPTIONS = [dict(distance="mse"), dict(distance="smooth_l1", beta=0.01), dict(distance="smooth_l1", beta=1.0)]
VALUE_FLOOR = 5e-7
GRAD_FLOOR = 2e-6


def _fn(inputs: RelationInputs, **opts):
    def fn(x, y, backend):
        dev = x.device
        return mk.span_relation_distance(
            x, y, inputs.spans_x.to(dev), inputs.spans_y.to(dev), weights_x=inputs.weights_x.to(dev).float(),
            weights_y=inputs.weights_y.to(dev).float(), backend=backend, **opts,
        )
    return fn


def _run(fn, xs, upstream_seed: int):
    """Value and input gradients of ``fn(*xs)`` for an upstream gradient != 1 (NaN at
    undefined entries, which must not reach the gradients)."""
    leaves = [x.detach().clone().requires_grad_() for x in xs]
    value = fn(*leaves)
    upstream = torch.rand(value.shape, generator=generator(upstream_seed)).to(value) * 2 - 0.5
    upstream = torch.where(torch.isnan(value), torch.nan, upstream)
    grads = torch.autograd.grad(value, leaves, upstream)
    return value.detach(), grads


def _compare(fn, inputs: list[torch.Tensor], *, seed: int) -> torch.Tensor:
    return compare_backends(fn, inputs, _run, device=DEVICE, seed=seed, copies_seed=SESSION_SEED,
                            value_floor=VALUE_FLOOR, grad_floor=GRAD_FLOOR, value_relative=True)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_matches_reference(opts):
    # T = 13, U = 11 tokens; widths 37 and 20 straddle the column blocks; entries with
    # 0, 1, 2, 5, 7 and 10 spans, some with shuffled span ids; padding holds 1e3.
    inputs = relation_inputs(seed=0)
    value = _compare(_fn(inputs, **opts), [inputs.x, inputs.y], seed=1)
    assert torch.isnan(value).sum() == 2


def test_many_spans_several_tiles_and_row_blocks():
    # 45 spans: two pool tiles of 32 spans, two Gram tiles, row blocks of 32 in the
    # value and coefficient kernels (KP = 64); 100 tokens: several token steps; the
    # x side non-contiguous, int32 span ids.
    inputs = relation_inputs((2,), tokens=(100, 70), widths=(24, 130), counts=(45, 30), seed=2)
    x = inputs.x.mT.contiguous().mT
    assert not x.is_contiguous()
    inputs = inputs._replace(x=x, spans_x=inputs.spans_x.int())
    _compare(_fn(inputs, distance="smooth_l1", beta=0.02), [inputs.x, inputs.y], seed=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(dtype):
    inputs = relation_inputs((3,), counts=(4, 6, 9), seed=4)
    fn = _fn(inputs)
    x, y = inputs.x.to(dtype), inputs.y.to(dtype)
    value, (gx, gy) = _run(lambda a, b: fn(a, b, "triton"), [x.to(DEVICE), y.to(DEVICE)], 5)
    runs32 = float32_runs(lambda a: _run(lambda *b: fn(*b, backend="torch"), a, 5), [x, y], seed=SESSION_SEED)
    ref64, (gx64, gy64) = _run(lambda a, b: fn(a, b, "torch"), [x.double(), y.double()], 5)
    assert value.dtype == torch.float32 and gx.dtype == gy.dtype == dtype
    assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=VALUE_FLOOR,
                                what="value", relative=True)
    # Gradients are rounded to the input dtype on output: 1e-2 relative (see test_triton.py).
    for g, g64 in ((gx, gx64), (gy, gy64)):
        assert ((g.double().cpu() - g64).abs().max() / g64.abs().max()) < 1e-2


def test_leading_dims_empty_batch_and_max_spans():
    inputs = relation_inputs((2, 2), counts=(3, 6, 2, 5), seed=6)
    args = [inputs.x.float().to(DEVICE), inputs.y.float().to(DEVICE), *(t.to(DEVICE) for t in inputs[2:4])]
    out = mk.span_relation_distance(*args, backend="triton")
    assert out.shape == (2, 2)
    flat = mk.span_relation_distance(*(a.flatten(0, 1) for a in args), backend="triton")
    torch.testing.assert_close(out.flatten(), flat)
    tight = mk.span_relation_distance(*args, max_spans=6, backend="triton")
    torch.testing.assert_close(tight, out, rtol=2e-6, atol=0)
    empty = mk.span_relation_distance(*(a[:0] for a in args), backend="triton")
    assert empty.shape == (0, 2)


def test_gradient_for_one_side_only_and_no_backward_work_without_grad(monkeypatch):
    inputs = relation_inputs((3,), counts=(4, 6, 9), seed=7)
    x, y = inputs.x.float().to(DEVICE), inputs.y.float().to(DEVICE).requires_grad_()
    sx, sy = inputs.spans_x.to(DEVICE), inputs.spans_y.to(DEVICE)
    mk.span_relation_distance(x, y, sx, sy, backend="triton").sum().backward()
    expected = y.grad.clone()
    y.grad = None
    mk.span_relation_distance(x.clone().requires_grad_(), y, sx, sy, backend="triton").sum().backward()
    torch.testing.assert_close(y.grad, expected)

    def fail(*args, **kwargs):
        raise AssertionError("backward kernels ran")

    monkeypatch.setattr(relation_op, "backward", fail)
    with torch.no_grad():
        assert not mk.span_relation_distance(x, y, sx, sy, backend="triton").requires_grad
    with pytest.raises(AssertionError, match="backward kernels ran"):
        mk.span_relation_distance(x, y, sx, sy, backend="triton").sum().backward()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf and NaN
def test_non_finite_states_poison_only_their_entry_and_padding_is_never_read():
    inputs = relation_inputs((3,), counts=(4, 6, 9), seed=8)
    x = inputs.x.float().clone()
    x[inputs.spans_x < 0] = math.nan  # padding: never read
    x[1, int((inputs.spans_x[1] == 2).nonzero()[0]), 5] = math.inf
    x = x.to(DEVICE).requires_grad_()
    value = mk.span_relation_distance(x, inputs.y.float().to(DEVICE), inputs.spans_x.to(DEVICE),
                                      inputs.spans_y.to(DEVICE), backend="triton")
    value.sum().backward()
    assert torch.isnan(value[1]) and torch.isfinite(value[[0, 2]]).all()
    grad = x.grad.cpu()
    assert torch.isfinite(grad[[0, 2]]).all() and (grad[[0, 2]] != 0).any()
    assert (grad[[0, 2]][inputs.spans_x[[0, 2]] < 0] == 0).all()


def test_torch_compile_fullgraph_matches_eager():
    inputs = relation_inputs((2,), counts=(5, 8), seed=9)
    args = [t.to(DEVICE) for t in inputs[1:4]]
    y, sx, sy = args[0].float(), args[1], args[2]
    x = inputs.x.float().to(DEVICE)

    def loss(x):
        return mk.span_relation_distance(x, y, sx, sy, max_spans=8, distance="smooth_l1", beta=0.1,
                                         backend="triton").sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    eager_value, (eager_grad,) = _run(loss, [x], 0)
    value, (grad,) = _run(compiled, [x], 0)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


def test_never_waits_for_the_device():
    inputs = relation_inputs((2, 2), counts=(3, 6, 2, 5), seed=10)
    x = inputs.x.float().to(DEVICE).requires_grad_()
    y = inputs.y.float().to(DEVICE).requires_grad_()
    rest = [t.to(DEVICE) for t in inputs[2:4]]
    weights = [inputs.weights_x.float().to(DEVICE), inputs.weights_y.float().to(DEVICE)]
    loss_fn = mk.SpanRelationLoss(backend="triton")
    with HostSyncRecorder() as recorder:
        mk.span_relation_distance(x, y, *rest, weights_x=weights[0], weights_y=weights[1], max_spans=6,
                                  backend="triton").sum().backward()
        loss_fn(x, y, *rest, *weights).backward()
    assert recorder.events == []


def test_rejections(monkeypatch):
    inputs = relation_inputs((2,), counts=(3, 4), seed=11)
    with pytest.raises(TypeError, match="float64"):
        mk.span_relation_distance(*inputs[:4], backend="triton")
    with pytest.raises(TypeError, match="float64"):
        mk.span_relation_distance(inputs.x.float(), *inputs[1:4], backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            mk.span_relation_distance(inputs.x.float(), inputs.y.float(), *inputs[2:4], backend="triton")
