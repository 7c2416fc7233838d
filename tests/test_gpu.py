"""The Triton backend on a CUDA device at realistic sizes (skipped without CUDA).

Accuracy criterion (as flash-attention's tests, see tests/accuracy.py): the kernel's
error against a float64 reference on the same input values may be at most twice the
error of the eager reference computing in float32 on those values (its worst over the
inputs and a few copies moved by one float32 ulp), plus a floor of a few float32
ulps; this is robust across shapes where a fixed tolerance is not. Gradients are
compared relative to their largest entry and, for half-precision inputs, also carry
the rounding of the gradient to the input dtype.

These tests are where the tensor cores' own accumulation is checked: under the
interpreter the split dots' products are exact and summed by numpy in fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

import mipic_kernels as mk
from mipic_kernels import fused
from mipic_kernels.fused import traffic
from tests.accuracy import assert_within_float32_error, float32_runs
from tests.seeding import generator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = [
    # (lead dims, T, D, dims, k): BERT-base-like layers x batch, and a long wide one.
    ((3, 8), 128, 768, (16, 32, 64, 128, 256, 512, 768), [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 1.0]),
    ((2,), 2048, 1024, (16, 100, 1000), [64, 300, 512]),
]
# Floors of a few float32 ulps of O(1) quantities: the ratio of two independent
# rounding errors is itself noisy when both are that small.
VALUE_FLOOR = 2e-6
GRAD_FLOOR = 2e-5
OPTIONS = [
    dict(kernel="linear", unbiased=False),
    dict(kernel="linear", unbiased=True),
    dict(kernel="rbf", unbiased=False),
    dict(kernel="rbf", unbiased=True, sigma=30.0),
]


def _states(lead, t, d, dtype, seed):
    g = generator(seed, device="cuda")
    offset = 8 * torch.randn(d, generator=g, device="cuda")
    return (torch.randn(*lead, t, d, generator=g, device="cuda") + offset).to(dtype)


def _run(x, backend, upstream, **kw):
    x = x.detach().clone().requires_grad_()
    value = mk.nested_cka(x, backend=backend, **kw)
    (grad,) = torch.autograd.grad(value, x, upstream)
    return value.detach().double(), grad.double()


def _case(case, dtype):
    lead, t, d, dims, k = CASES[case]
    x = _states(lead, t, d, dtype, seed=case)
    mask = torch.rand(*lead, t, generator=generator(100 + case, "cuda"), device="cuda") < 0.9
    mask[..., :8] = True
    upstream = torch.rand(*lead, len(dims), generator=generator(200 + case, "cuda"), device="cuda") + 0.5
    return x, dict(dims=dims, k=k, k_min=8, scores="cls", mask=mask, detach_full=False), upstream


@pytest.mark.parametrize("precision", ["fast", "ieee"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_error_at_most_twice_eager(case, opts, dtype, precision):
    x, kw, upstream = _case(case, dtype)
    kw.update(opts)
    value, grad = _run(x, "triton", upstream, precision=precision, **kw)
    eager = float32_runs(lambda a: _run(a[0], "torch", upstream, **kw), [x], seed=case)
    ref, ref_grad = _run(x.double(), "torch", upstream, **kw)
    assert torch.isfinite(grad).all()
    assert_within_float32_error(value, [v for v, _ in eager], ref, factor=2, floor=VALUE_FLOOR,
                                what="value", relative=False)
    rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_within_float32_error(grad, [g for _, g in eager], ref_grad, factor=2, floor=GRAD_FLOOR,
                                what="gradient", relative=True, extra=rounding)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fast_dots_as_accurate_as_ieee_on_tensor_cores(case, dtype):
    # The default ("fast") is as accurate as fp32 FMA dots exactly when its worst value
    # error is within twice the "ieee" path's plus a float32 ulp or two of an O(1)
    # value: what decides the default on hardware.
    x, kw, upstream = _case(case, dtype)
    ref, _ = _run(x.double(), "torch", upstream, **kw)
    errors = {}
    for precision in ("fast", "ieee"):
        value, _ = _run(x, "triton", upstream, precision=precision, **kw)
        errors[precision] = float((value - ref).nan_to_num(0).abs().max())
    assert errors["fast"] <= 2 * errors["ieee"] + 2.5e-7, errors


def test_cka_matches_reference():
    x = _states((4, 8), 200, 384, torch.bfloat16, seed=7)
    y = _states((4, 8), 200, 96, torch.bfloat16, seed=8)
    mask = torch.rand(4, 8, 200, generator=generator(300, "cuda"), device="cuda") < 0.8
    for kernel in ("linear", "rbf"):
        got = mk.cka(x, y, mask=mask, kernel=kernel, backend="triton")
        ref = mk.cka(x.double(), y.double(), mask=mask, kernel=kernel, backend="torch")
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_inductor():
    x = _states((2, 4), 64, 256, torch.bfloat16, seed=9)

    def loss(x):
        return (1 - mk.nested_cka(x, (32, 128, 256), k=[0.5, 0.7, 1.0], scores="cls",
                                  backend="triton")).nan_to_num(0).mean()

    def value_and_grad(fn):
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf)
        out.backward()
        return out.detach(), leaf.grad

    eager = value_and_grad(loss)
    compiled = value_and_grad(torch.compile(loss, fullgraph=True))
    torch.testing.assert_close(compiled, eager)


def test_auto_picks_triton_for_cuda_tensors():
    x = _states((2,), 16, 32, torch.float32, seed=10)
    assert fused.preferred_for(x)
    assert not fused.preferred_for(x.double())
    assert not fused.preferred_for(x.cpu())


def test_cls_ranking_needs_no_float32_copy_of_x():
    # bert-base sized layers x batch in bfloat16: the score-and-rank kernel allocates
    # its (B, T) float32 scores and the int64 order, nothing of the size of x.
    lead, t = (7, 16), 256
    x = _states(lead, t, 768, torch.bfloat16, seed=11)
    mask = torch.rand(*lead, t, generator=generator(12, "cuda"), device="cuda") < 0.8
    fused.cls_order(x, mask)  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    order, _ = fused.cls_order(x, mask)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 12 * mask.numel() + 2**20, f"{extra} bytes for x of {x.nbytes}"
    assert torch.equal(order.sort(-1).values, torch.arange(t, device="cuda").expand_as(order))
    real = mask.sum(-1, keepdim=True)
    assert (mask.gather(-1, order) == (torch.arange(t, device="cuda") < real)).all()


def test_cuda_graph_of_a_training_step_matches_eager():
    # The fused loss makes no host sync, so a whole step (encoder, loss with "cls"
    # ranking, backward, optimiser) is captured once and replayed on new data.
    lead, t, d = (3, 4), 40, 96
    dims, k = (16, 48, 96), [0.3, 0.6, 1.0]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU(), torch.nn.Linear(d, d)).cuda()
    loss_fn = mk.NestedCKALoss(dims, k=k, k_min=4, kernel="rbf", detach_full=False, backend="triton").cuda()

    def batch(seed):
        x = _states(lead, t, d, torch.float32, seed=seed)
        mask = torch.rand(*lead, t, generator=generator(seed + 1, "cuda"), device="cuda") < 0.8
        mask[..., :6] = True
        return x, mask

    def step(net, opt, x, mask):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(x), scores="cls", mask=mask)
        loss.backward()
        opt.step()
        return loss

    static_x, static_mask = batch(400)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, uploads the bounds
        for _ in range(2):
            step(model, opt, static_x, static_mask)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step(model, opt, static_x, static_mask)

    for seed in (500, 600):
        x, mask = batch(seed)
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
        want = step(twin, twin_opt, x, mask)
        static_x.copy_(x)
        static_mask.copy_(mask)
        graph.replay()
        torch.testing.assert_close(static_loss, want)
        for got_p, want_p in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(got_p, want_p)


def test_two_runs_are_bitwise_equal():
    # Every reduction has a fixed order (no atomics), so a step is reproducible bit for
    # bit, at a size where the statistics and coefficient rows span many programs.
    x, kw, upstream = _case(0, torch.bfloat16)
    kw.update(kernel="rbf")
    first, second = (_run(x, "triton", upstream, **kw) for _ in range(2))
    assert torch.equal(first[0].nan_to_num(7.0), second[0].nan_to_num(7.0))
    assert torch.equal(first[1], second[1])


def _compiled_kernels() -> int:
    """Compiled variants of every kernel of the fused backend (either triton's JIT
    cache layout), plus the tuned configs chosen so far."""
    import triton

    from mipic_kernels.fused import backward, gram, ranking, stats

    total = 0
    for module in (gram, stats, backward, ranking):
        for obj in vars(module).values():
            if isinstance(obj, triton.runtime.Autotuner):
                total += len(obj.cache)
                obj = obj.fn
            if isinstance(obj, triton.runtime.JITFunction):
                caches = getattr(obj, "device_caches", None)
                total += sum(len(c[0]) for c in caches.values()) if caches else sum(map(len, obj.cache.values()))
    return total


def test_new_real_lengths_compile_nothing():
    # Only the shapes and the k spec reach a kernel's specialisation or tuning key;
    # the batch's real lengths (hence every count) are device data.
    x, kw, upstream = _case(0, torch.bfloat16)
    _run(x, "triton", upstream, **kw)
    before = _compiled_kernels()
    for seed in (1, 2):
        kw["mask"] = torch.rand(kw["mask"].shape, generator=generator(seed, "cuda"), device="cuda") < 0.3 * seed
        kw["mask"][..., :8] = True
        _run(x, "triton", upstream, **kw)
    assert _compiled_kernels() == before


def test_peak_memory_below_eager_and_within_the_model():
    # bert-base sized: 7 layers x 16 sentences, T = 256, bf16. The loss's forward and
    # backward allocate what the byte model says (the Grams held for the backward,
    # the coefficients, dx) and far less than the eager reference.
    lead, t, d = (7, 16), 256, 768
    x = _states(lead, t, d, torch.bfloat16, seed=13)
    lengths = torch.randint(64, t + 1, (16,), generator=generator(14, "cuda"), device="cuda")
    mask = (torch.arange(t, device="cuda") < lengths[:, None]).expand(*lead, t)
    fractions, dims = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7], (16, 32, 64, 128, 256, 512)

    def peak(backend):
        loss_fn = mk.NestedCKALoss(dims, k=fractions, k_min=8, backend=backend)
        leaf = x.detach().clone().requires_grad_()
        loss_fn(leaf, scores="cls", mask=mask).backward()  # warm-up: compiles, tunes
        leaf.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss_fn(leaf, scores="cls", mask=mask).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    fused_peak, eager_peak = peak("triton"), peak("torch")
    model = traffic.fused_traffic(mask.sum(-1).flatten().tolist(), t, d, dims, fractions, 8, torch.bfloat16,
                                  mode="full")
    print(f"peak memory: fused {fused_peak / 2**20:.0f} MiB, eager {eager_peak / 2**20:.0f} MiB, "
          f"model {(model.held + model.peak_extra) / 2**20:.0f} MiB")
    assert fused_peak <= 1.1 * (model.held + model.peak_extra) + 2**24
    assert fused_peak < 0.5 * eager_peak
