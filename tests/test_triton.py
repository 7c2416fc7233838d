"""The Triton backend against the eager reference: values, NaN positions and input
gradients at small awkward sizes.

Without CUDA the kernels run under Triton's interpreter, which must be switched on
before triton is first imported; this module does that at import and skips itself
if triton was already imported without it. On a CUDA machine the same tests run on
the GPU.

Tolerances (tests/accuracy.py): the kernels and the float32 reference both do float32
arithmetic on the same input values, so the kernel is held to the float64 reference
within ``4 x`` the float32 reference's own error (its worst over the inputs and a few
copies moved by one float32 ulp, which exposes ill-conditioned entries) plus a
floor of a few float32 ulps of the quantity's scale (CKA values are O(1); gradients are
compared relative to their largest entry). Half-precision gradients are rounded to the
input dtype on output: 1e-2 relative (bfloat16 has an 8-bit significand, and Triton's
interpreter truncates fp32 -> bfloat16 where the GPU rounds to nearest, so 2^-8, not
2^-9).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    _imported_before = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    os.environ["TRITON_INTERPRET"] = "1"
    if _imported_before:
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 could be set; run this file alone",
            allow_module_level=True,
        )
pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import mipic_kernels as mk  # noqa: E402
from mipic_kernels import fused, selection  # noqa: E402
from mipic_kernels.fused import backward, cka_op, gram, nested_cka_op  # noqa: E402
from mipic_kernels.fused.tl_utils import triangle_tile  # noqa: E402
from tests.accuracy import assert_within_float32_error, compare_backends, float32_runs, value_and_grads  # noqa: E402
from tests.host_sync import HostSyncRecorder  # noqa: E402
from tests.seeding import SESSION_SEED, generator  # noqa: E402

OPTIONS = [
    dict(kernel="linear", unbiased=False),
    dict(kernel="linear", unbiased=True),
    dict(kernel="rbf", unbiased=False),
    dict(kernel="rbf", unbiased=True),
    dict(kernel="rbf", unbiased=False, sigma=2.5),
    dict(kernel="rbf", unbiased=True, sigma=4.0, rbf_threshold=0.7),
]
K_MODES = [dict(k=None), dict(k=5, k_min=2), dict(k=[0.3, 6, 1.0], k_min=4)]
VALUE_FLOOR = 2e-6
GRAD_FLOOR = 2e-5


def _states(*shape: int, seed: int, offset: float = 4.0) -> torch.Tensor:
    """Hidden-state-like rows: a large common offset plus unit noise."""
    noise = torch.randn(*shape, generator=generator(seed))
    return noise + offset * torch.randn(shape[-1], generator=generator(seed + 1))


def _mask(lead: tuple[int, ...], t: int, seed: int) -> torch.Tensor:
    mask = torch.rand(*lead, t, generator=generator(seed)) < 0.75
    mask[..., :3] = True
    flat = mask.view(-1, t)
    flat[-1, 4:] = False  # one example with 4 real tokens: small-n entries
    return mask


def _compare(fn, inputs, *, seed: int):
    """Triton (float32) vs the float32 and float64 references: values and gradients."""
    return compare_backends(fn, inputs, value_and_grads, device=DEVICE, seed=seed, copies_seed=SESSION_SEED,
                            value_floor=VALUE_FLOOR, grad_floor=GRAD_FLOOR, value_relative=False)


@pytest.mark.parametrize("detach_full", [True, False], ids=["detached", "full-grad"])
@pytest.mark.parametrize("kmode", K_MODES, ids=lambda m: f"k={m['k']}")
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_nested_cka_matches_reference(opts, kmode, detach_full):
    # Widths 5 and 30 straddle the 16-column blocks; with a trailing segment
    # (dims[-1] < D) when the teacher is detached, without one otherwise.
    lead, t, d = (2,), 13, 37
    dims = (5, 16, 30) if detach_full else (5, 16, 37)
    x = _states(*lead, t, d, seed=10)
    mask = _mask(lead, t, seed=11)

    def fn(x, backend):
        return mk.nested_cka(
            x, dims, scores="cls", mask=mask.to(x.device), detach_full=detach_full,
            backend=backend, **kmode, **opts,
        )

    _compare(fn, [x], seed=12)


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_cka_matches_reference(opts):
    lead, n = (2, 2), 11
    x = _states(*lead, n, 9, seed=20)
    y = _states(*lead, n, 6, seed=21)
    mask = _mask(lead, n, seed=22)

    def fn(x, y, backend):
        return mk.cka(x, y, mask=mask.to(x.device), backend=backend, **opts)

    _compare(fn, [x, y], seed=23)


@pytest.mark.parametrize("opts", OPTIONS[:4], ids=str)
def test_several_gram_tiles_and_row_blocks(opts):
    # k_top = 45 > 32: two Gram tiles per side (off-diagonal tiles stored twice) and
    # two row blocks in the statistics kernels; non-contiguous x.
    t, d = 45, 20
    x = _states(1, d, t, seed=30).mT
    assert not x.is_contiguous()

    def fn(x, backend):
        return mk.nested_cka(x, (3, 7, 20), k=[10, 0.8, 1.0], backend=backend, **opts)

    _compare(fn, [x], seed=31)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3]], ids=str)
def test_half_precision_inputs(opts, dtype):
    x = _states(2, 12, 24, seed=40).to(dtype)
    mask = _mask((2,), 12, seed=41)

    def fn(x, backend):
        return mk.nested_cka(x, (4, 9, 24), k=[0.5, 8, 1.0], mask=mask.to(x.device),
                             detach_full=False, backend=backend, **opts)

    value, (grad,) = value_and_grads(lambda a: fn(a, "triton"), [x.to(DEVICE)], 42)
    runs32 = float32_runs(lambda a: value_and_grads(lambda b: fn(b, "torch"), a, 42), [x], seed=SESSION_SEED)
    ref64, (grad64,) = value_and_grads(lambda a: fn(a, "torch"), [x.double()], 42)
    assert value.dtype == torch.float32 and grad.dtype == dtype
    assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=VALUE_FLOOR,
                                what="value", relative=False)
    assert ((grad.double().cpu() - grad64).abs().max() / grad64.abs().max()) < 1e-2


def test_undefined_entries_are_nan_with_zero_gradient():
    x = _states(3, 8, 10, seed=50)
    x[1] = x[1, :1]  # every row equal: no variance at any width
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[2, 3:] = False  # 3 real tokens: biased defined, unbiased not
    for unbiased in (False, True):
        def fn(x, backend):
            return mk.nested_cka(x, (2, 10), mask=mask.to(x.device), kernel="rbf",
                                 unbiased=unbiased, detach_full=False, backend=backend)

        value = _compare(fn, [x], seed=51)
        assert torch.isnan(value[1]).all()
        assert torch.isnan(value[2]).all() == unbiased



@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_upstream_gradient_at_undefined_entries_is_ignored(backend, kernel):
    # NestedCKALoss hands every entry of a width the same upstream gradient, the
    # undefined ones too (one launch instead of a mask and its autograd): exact only
    # because of this.
    x = _states(4, 9, 13, seed=55).to(DEVICE).requires_grad_()
    mask = torch.ones(4, 9, dtype=torch.bool, device=DEVICE)
    mask[1, 3:] = False  # 3 real tokens: undefined when unbiased
    with torch.no_grad():
        x[2] = x[2, :1].clone()  # no variance: undefined at every width
    value = mk.nested_cka(x, (3, 7), k=[0.6, 1.0], k_min=2, mask=mask, kernel=kernel, unbiased=True,
                          detach_full=False, backend=backend)
    defined = value == value
    assert defined.any() and not defined.all()
    upstream = torch.randn(value.shape, generator=generator(56)).to(DEVICE) + 2.0
    everywhere, = torch.autograd.grad(value, x, upstream, retain_graph=True)
    where_defined, = torch.autograd.grad(value, x, torch.where(defined, upstream, 0.0))
    assert torch.isfinite(everywhere).all() and everywhere.abs().max() > 0
    torch.testing.assert_close(everywhere, where_defined, rtol=0, atol=0)

def test_no_gradient_work_without_grad(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("backward kernels ran")

    monkeypatch.setattr(nested_cka_op, "backward", fail)
    x = _states(2, 9, 12, seed=60).to(DEVICE)
    with torch.no_grad():
        out = mk.nested_cka(x.requires_grad_(), (4, 12), backend="triton")
    assert not out.requires_grad
    out = mk.nested_cka(x.detach(), (4, 12), backend="triton")
    assert not out.requires_grad
    with pytest.raises(AssertionError, match="backward kernels ran"):
        mk.nested_cka(x, (4, 12), backend="triton").sum().backward()


class _ConstantFills(TorchDispatchMode):
    """The shapes of the tensors filled with a constant while active."""

    FILLS = {"zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full", "fill_", "zero_"}

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in self.FILLS:
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("op", ["nested_cka", "cka"])
def test_saved_buffers_get_no_zero_gradients(op):
    # The ops return their saved buffers (Grams, shift, statistics) as outputs so that
    # the backward receives them; autograd must not zero-fill a gradient for each, and
    # the backward must accept None for every output, the value's included.
    x, order, _ = _ranked_inputs(2, 9, 12, seed=63, real=[9, 6])
    x, order = x.to(DEVICE).requires_grad_(), order.to(DEVICE)
    if op == "nested_cka":
        k = torch.tensor([[4, 7], [3, 5]], device=DEVICE)
        out = nested_cka_op._nested_cka(x, order, k, [4, 12], 7, "rbf", False, None, 1.0, True, "fast")
    else:
        y = _states(2, 9, 5, seed=64).to(DEVICE)
        n = torch.tensor([7, 5], device=DEVICE)
        out = cka_op._cka(x, y, order, n, "rbf", True, None, 1.0, "fast")
    upstream = torch.rand(out[0].shape, generator=generator(65)).to(out[0])
    with _ConstantFills() as fills:
        (dx,) = torch.autograd.grad(out[0], x, upstream, retain_graph=True)
    saved = {tuple(t.shape) for t in out[1:]}
    assert not saved & set(fills.shapes), f"zero gradients filled for saved buffers: {fills.shapes}"
    assert torch.isfinite(dx).all() and dx.abs().amax() > 0
    # Through a saved buffer only: the backward gets None for the value and gives no gradient.
    assert torch.autograd.grad(out[-1].sum(), x, allow_unused=True, retain_graph=True) == (None,)
    (both,) = torch.autograd.grad(out[0].mul(upstream).sum() + out[2].sum(), x)
    torch.testing.assert_close(both, dx, rtol=0, atol=0)


def test_torch_compile_fullgraph_matches_eager():
    x = _states(2, 10, 16, seed=70).to(DEVICE)
    mask = _mask((2,), 10, seed=71).to(DEVICE)

    def loss(x):
        v = mk.nested_cka(x, (4, 16), k=[0.5, 1.0], scores="cls", mask=mask, kernel="rbf",
                          backend="triton")
        return (1 - v).nan_to_num(0).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    eager_value, (eager_grad,) = value_and_grads(loss, [x], 0)
    value, (grad,) = value_and_grads(compiled, [x], 0)
    torch.testing.assert_close(value, eager_value)
    torch.testing.assert_close(grad, eager_grad)


def _training_calls(x, y, mask, scores, loss_fn):
    """Forward and backward of every fused operation, on every path that reaches one."""
    # One example for the RBF median kernel: the interpreter runs it slowly.
    value = mk.nested_cka(x[:1], (4, 12), k=[0.5, 6], k_min=2, scores="cls", mask=mask[:1],
                          kernel="rbf", detach_full=False, backend="triton")
    value.backward(torch.ones_like(value))
    mk.cka(x, y, mask=mask, unbiased=True, backend="triton").sum().backward()
    loss_fn(x, scores=scores, mask=mask).backward()


def test_fused_operations_never_wait_for_the_device():
    x = _states(2, 11, 12, seed=130).to(DEVICE).requires_grad_()
    y = _states(2, 11, 5, seed=131).to(DEVICE).requires_grad_()
    mask = _mask((2,), 11, seed=132).to(DEVICE)
    scores = torch.randn(2, 11, generator=generator(133)).to(DEVICE)
    loss_fn = mk.NestedCKALoss((3, 12), k=4, backend="triton").to(DEVICE)
    # A warm-up step uploads the segment bounds of new widths once and, on a GPU,
    # compiles and tunes the kernels (a CUDA graph capture needs such a step too).
    _training_calls(x, y, mask, scores, loss_fn)
    with HostSyncRecorder() as recorder:
        _training_calls(x, y, mask, scores, loss_fn)
    assert recorder.events == []


_INJECTED_SYNCS = {
    "item": lambda t: t.max().item(),
    "bool": lambda t: bool((t > 0).all()),
    "int": lambda t: int(t.max()),
    "tolist": lambda t: t.tolist(),
    "host data": lambda t: torch.tensor([1, 2], device=t.device),
    "boolean mask": lambda t: t[t > 1],
}


@pytest.mark.parametrize("where", ["api", "op"])
@pytest.mark.parametrize("sync", _INJECTED_SYNCS)
def test_host_sync_recorder_catches_an_injected_sync(monkeypatch, sync, where):
    # The recorder must see a sync in the argument handling and inside a custom op.
    if where == "api":
        module, name, expected = selection, "resolve_k", "mipic_kernels/api.py"
    else:
        module, name, expected = nested_cka_op, "nested_grams", "mipic_kernels/fused/nested_cka_op.py"
    original = getattr(module, name)

    def with_sync(*args, **kwargs):
        counts = args[2]  # resolve_k's real counts (B,), nested_grams' counts (B, W): int64
        _INJECTED_SYNCS[sync](counts)
        return original(*args, **kwargs)

    x = _states(2, 7, 6, seed=140).to(DEVICE)
    mk.nested_cka(x, (3, 6), backend="triton")  # warm-up: uploads the segment bounds
    monkeypatch.setattr(module, name, with_sync)
    with HostSyncRecorder() as recorder:
        mk.nested_cka(x, (3, 6), backend="triton")
    assert recorder.events, "the injected sync was not seen"
    assert all(where.startswith(expected) for _, where in recorder.events), recorder.events


def _ranking_mask(batch: int, t: int, seed: int) -> torch.Tensor:
    """Padding anywhere (position 0 included), one example with 3 real tokens and one
    with none."""
    mask = torch.rand(batch, t, generator=generator(seed)) < 0.7
    mask[-2] = False
    mask[-2, [4, 9, 30]] = True
    mask[-1] = False
    return mask


def _want_order(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Real tokens by descending score, ties to the lower position, then padding."""
    rows = []
    for s, m in zip(scores.tolist(), mask.tolist()):
        real = sorted((j for j in range(len(s)) if m[j]), key=lambda j: (-s[j], j))
        rows.append(real + [j for j in range(len(s)) if not m[j]])
    return torch.tensor(rows)


def test_both_backends_rank_cls_with_the_kernel_where_it_runs(monkeypatch):
    calls = []
    original = fused.cls_order

    def spy(x, mask, *spec):
        calls.append(x.dtype)
        return original(x, mask, *spec)

    monkeypatch.setattr(fused, "cls_order", spy)
    x = _states(2, 9, 8, seed=170).to(DEVICE)
    for backend in ("torch", "triton"):
        mk.nested_cka(x, (4, 8), k=5, scores="cls", backend=backend)
    mk.nested_cka(x.double(), (4, 8), k=5, scores="cls", backend="torch")  # float64: torch scores
    assert calls == [torch.float32, torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cls_ranking_kernel_is_exact_where_the_scores_are(dtype):
    # Small integer features: every product and sum is exact in float32 (and in
    # float64), so the kernel must give exactly the float64 ranking, ties included:
    # duplicated tokens, zero tokens (score 0), a copy of the query. T = 45 spans
    # two score blocks; D = 37 is not a multiple of the column block.
    batch, t, d = 5, 45, 37
    x = torch.randint(-3, 4, (batch, t, d), generator=generator(150)).to(torch.float64)
    x[:, 11] = x[:, 2]
    x[:, 20] = x[:, 2]
    x[:, [7, 33]] = 0.0
    x[:, 40] = x[:, 0]
    mask = _ranking_mask(batch, t, seed=151)
    scores = (x[:, :1] * x).sum(-1) / d**0.5
    assert (scores[:, 11] == scores[:, 2]).all() and (scores[:, 7] == 0).all()
    got, _ = fused.cls_order(x.to(dtype).to(DEVICE), mask.to(DEVICE))
    assert torch.equal(got.cpu(), _want_order(scores, mask))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf and NaN
def test_cls_ranking_kernel_orders_non_finite_scores_like_torch_sort():
    # The fused path does not check x, so non-finite scores must still give a
    # permutation: NaN of either sign first (as torch.sort), then +inf, ..., -inf.
    t, d = 13, 6
    x = torch.randint(1, 4, (2, t, d), generator=generator(155)).float()
    x[0, 5, 3] = -math.nan
    x[0, 8, 2] = math.nan
    x[0, 9, 0] = math.inf
    x[1, 6, 2] = -math.inf
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[0, 2] = False
    scores = (x[:, :1].double() * x.double()).sum(-1) / d**0.5
    want = torch.sort(torch.where(mask, scores, -math.inf), dim=-1, descending=True, stable=True).indices
    assert want[0, :3].tolist() == [5, 8, 9] and want[1, -1] == 6
    got = fused.cls_order(x.to(DEVICE), mask.to(DEVICE))[0].cpu()
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_cls_ranking_kernel_within_float32_rounding_of_float64(dtype):
    # Real-valued features with a common offset: the kernel's float32 scores differ
    # from the exact ones by at most err_j = gamma_D sum_d |x_0d x_jd| / sqrt(D) + the
    # rounding of the division (gamma_D = D u / (1 - D u), u = 2^-24: any summation
    # order). So two tokens may come in either order exactly when their exact scores
    # are within err_i + err_j of each other; any other pair must be in descending
    # order. Exact duplicates have equal float32 scores and keep position order.
    batch, t, d = 4, 45, 70
    x = (_states(batch, t, d, seed=160, offset=2.0)).to(dtype)
    x[:, 17] = x[:, 5]
    x[:, 37] = x[:, 5]
    mask = _ranking_mask(batch, t, seed=161)
    got = fused.cls_order(x.to(DEVICE), mask.to(DEVICE))[0].cpu()
    x64 = x.double()
    scores = (x64[:, :1] * x64).sum(-1) / d**0.5
    u = 2.0**-24
    err = d * u / (1 - d * u) * (x64[:, :1] * x64).abs().sum(-1) / d**0.5 + 2 * u * scores.abs()
    for b in range(batch):
        order = got[b]
        real = int(mask[b].sum())
        assert sorted(order.tolist()) == list(range(t)), "not a permutation"
        assert order[real:].tolist() == torch.nonzero(~mask[b]).flatten().tolist(), "padding"
        ranked = order[:real]
        assert mask[b, ranked].all()
        s, e = scores[b, ranked], err[b, ranked]
        # Every pair (i ranked before j): s_i >= s_j - (err_i + err_j).
        slack = s[:, None] - s[None, :] + e[:, None] + e[None, :]
        assert (slack.triu(1) >= 0).all(), "an order beyond rounding"
        for twin in (17, 37):  # in the same block of tokens as 5, and in another
            if mask[b, 5] and mask[b, twin]:
                assert (ranked == 5).nonzero() < (ranked == twin).nonzero(), "exact tie not in position order"


@pytest.mark.parametrize("k, k_min", [
    (None, 3), (7, 2), (1, 5), ([0.3, 1.0, 0.1, 0.5, 0.7], 1), ([0.3, 4, 0.999, 100, 0.05], 3),
], ids=str)
def test_cls_ranking_kernel_writes_the_counts_of_resolve_k(k, k_min):
    # Every real count from 0 to T = 80 (two rank blocks), fractions whose products
    # land on integers in decimal but not in binary (0.3 x 10, 0.7 x 10: the slack),
    # counts above T, a k_min above some real counts, and five widths (not a power of
    # two).
    t, widths = 80, 5
    real = torch.arange(t + 1)
    mask = torch.arange(t)[None, :] < real[:, None]
    mask = mask[torch.randperm(t + 1, generator=generator(157))]
    mask = mask[:, torch.randperm(t, generator=generator(158))]
    x = torch.randn(t + 1, t, 6, generator=generator(159))
    spec = k if k is None or isinstance(k, int) else list(k)
    _, got = fused.cls_order(x.to(DEVICE), mask.to(DEVICE), spec, k_min, widths)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), selection.resolve_k(spec, k_min, mask.sum(-1), widths))


def test_epilogue_kernel_is_the_definedness_rule_and_value_bit_for_bit():
    # Statistics on both sides of every threshold of rules.defined_entries (counts
    # 0 to 5, spreads and self-HSIC within a few ulps of their bounds, bandwidths NaN
    # or inf), summed from 3 row blocks: the kernel must give the stats of a sum in
    # block order, the NaN positions of rules.defined_entries on them, exactly, and
    # the value of rules.cka_value.
    from mipic_kernels import rules
    from mipic_kernels.fused import stats as st

    gen = generator(163)
    batch, widths, blocks = 7, 29, 3
    part = torch.rand(batch, widths, blocks, st.N_STATS, generator=gen) + 0.5
    part[..., st.A] -= 0.5
    n = torch.randint(0, 9, (batch, widths), generator=gen)
    bw = torch.rand(batch, widths, 2, generator=gen) + 0.1
    bw.view(-1)[torch.randperm(bw.numel(), generator=gen)[:20]] = math.nan
    bw.view(-1)[torch.randperm(bw.numel(), generator=gen)[:10]] = math.inf
    nf = n.to(torch.float32)
    tol = nf * torch.finfo(torch.float32).eps
    total = part.sum(2)
    # Move some totals to (just around) their thresholds through the first block.
    ulps = torch.randint(-2, 3, (batch, widths), generator=gen).to(torch.float32)
    for col, size in ((st.SPREAD_X, st.SIZE_X), (st.SPREAD_Y, st.SIZE_Y)):
        near = torch.rand(batch, widths, generator=gen) < 0.3
        edge = (tol * total[..., size]) * (1 + ulps * 2**-23)
        part[..., 0, col] = torch.where(near, edge - part[..., 1:, col].sum(-1), part[..., 0, col])
    for col in (st.B, st.C):
        near = torch.rand(batch, widths, generator=gen) < 0.3
        part[..., 0, col] = torch.where(near, tol.square() * nf.square() * (1 + ulps * 2**-23), part[..., 0, col])
        part[..., 1:, col] = torch.where(near[..., None], 0.0, part[..., 1:, col])
    for kernel in ("linear", "rbf"):
        for unbiased in (False, True):
            stats = torch.empty(batch, widths, st.N_STATS)
            value = torch.empty(batch, widths)
            entries = batch * widths
            st._values_kernel[(triton.cdiv(entries, 64),)](
                part.to(DEVICE), n.to(DEVICE), bw.to(DEVICE), stats := stats.to(DEVICE), value := value.to(DEVICE),
                entries, blocks, RBF=kernel == "rbf", UNBIASED=unbiased, BLOCK_E=64,
            )
            want_stats = part[..., 0, :] + part[..., 1, :] + part[..., 2, :]
            assert torch.equal(stats.cpu(), want_stats)
            s = want_stats
            defined = rules.defined_entries(
                nf, s[..., st.SPREAD_X], s[..., st.SPREAD_Y], s[..., st.SIZE_X], s[..., st.SIZE_Y],
                s[..., st.B], s[..., st.C], torch.isfinite(bw).all(-1), kernel=kernel, unbiased=unbiased,
            )
            assert 0 < int(defined.sum()) < defined.numel()
            assert torch.equal(value.cpu().isnan(), ~defined)
            # a / sqrt(b c) with every step correctly rounded (torch's float32 sqrt on
            # a CPU is not: there the rule's value may differ by one ulp).
            root = torch.sqrt((s[..., st.B] * s[..., st.C]).double()).float()
            assert torch.equal(value.cpu()[defined], (s[..., st.A] / root)[defined])
            want = rules.cka_value(s[..., st.A], s[..., st.B], s[..., st.C], defined)
            torch.testing.assert_close(value.cpu(), want, rtol=2**-22, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("precision", ["fast", "ieee"])
def test_both_precisions_are_as_accurate_as_float32(precision, dtype):
    # D = 100 spans two 64-column blocks; widths 13 and 77 end inside blocks, 64 on a
    # block edge. The floors are a tenth of the other tests': a split dot that lost
    # the low halves (or the lo.lo product of bf16) would show here. What the
    # interpreter runs is the split algebra with every product exact in fp32 and an
    # fp32 accumulation; the tensor cores' own accumulation is tested on a GPU.
    lead, t, d = (3,), 40, 100
    dims = (13, 64, 77, 100)
    x = _states(*lead, t, d, seed=180, offset=6.0).to(dtype)
    mask = _mask(lead, t, seed=181)

    def fn(x, backend):
        return mk.nested_cka(x, dims, k=[0.3, 12, 0.8, 1.0], k_min=4, scores="cls", mask=mask.to(x.device),
                             detach_full=False, backend=backend, precision=precision)

    value, (grad,) = value_and_grads(lambda a: fn(a, "triton"), [x.to(DEVICE)], 182)
    runs32 = float32_runs(lambda a: value_and_grads(lambda b: fn(b, "torch"), a, 182), [x], seed=SESSION_SEED)
    ref64, (grad64,) = value_and_grads(lambda a: fn(a, "torch"), [x.double()], 182)
    assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=VALUE_FLOOR / 10,
                                what="value", relative=False)
    rounding = 0.0 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert_within_float32_error(grad, [g for _, (g,) in runs32], grad64, factor=4, floor=GRAD_FLOOR / 10,
                                what="gradient", relative=True, extra=rounding)


@triton.jit
def _triangle_tiles(out_ptr, N, BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ti, tj = triangle_tile(t)
    tl.store(out_ptr + 2 * t, ti, mask=t < N)
    tl.store(out_ptr + 2 * t + 1, tj, mask=t < N)


def test_triangle_tile_enumerates_the_upper_triangle_column_by_column():
    tiles = _triangle_tiles
    edge = 700  # tiles per side: far beyond any Gram edge (k <= 8192 in 16-row tiles)
    want = torch.tensor([(i, j) for j in range(edge) for i in range(j + 1)], dtype=torch.int32)
    got = torch.empty_like(want)
    tiles[(triton.cdiv(len(want), 4096),)](got, len(want), BLOCK=4096)
    assert torch.equal(got, want)


def _ranked_inputs(batch, t, d, seed, real):
    """States, a position order (real tokens first, shuffled) and the real counts."""
    x = _states(batch, t, d, seed=seed)
    order = torch.stack([torch.randperm(t, generator=generator(seed + 1 + b)) for b in range(batch)])
    return x, order, torch.tensor(real)


def test_gram_tiles_are_written_only_where_their_rows_are_used():
    # k_top = 40 is three 16-row tiles under the interpreter; example 1 selects 5 rows
    # (one tile), example 2 none. A slot's tiles are written only up to the rows it is
    # read over (n for a prefix, kmax = max_w n for the full width): everything else
    # keeps the NaN it was filled with, and what is written is the shifted Gram. The
    # prefix counts are not monotone; a fourth count (no slot of its own) is the widest.
    x, order, kmax = _ranked_inputs(3, 50, 70, seed=190, real=[40, 5, 0])
    n = torch.stack([torch.clamp(kmax, max=v) for v in (7, 33, 17, 50)], dim=-1)
    bounds = (0, 5, 33, 64, 70)
    grams = torch.full((3, 4, 40, 40), math.nan)
    sq = torch.full((3, 4, 40), math.nan)
    shift = torch.empty(3, 70)
    gram.launch_shift(x, order, n, shift)
    gram.launch_gram(x, order, n, shift, bounds, grams, sq, precision="fast")
    tile = torch.arange(40) // 16
    for b in range(3):
        rows = x[b, order[b, :40]].double()
        assert torch.allclose(shift[b].double(), rows[: kmax[b]].mean(0).float().double(), atol=1e-6) or kmax[b] == 0
        z = (rows - shift[b].double()) * (torch.arange(40) < kmax[b])[:, None]
        for s in range(4):
            used = int(kmax[b]) if s == 3 else int(n[b, s])
            written = (torch.maximum(tile[:, None], tile[None, :]) * 16 < used)
            assert torch.equal(~torch.isnan(grams[b, s]), written), (b, s)
            want = z[:, : bounds[s + 1]] @ z[:, : bounds[s + 1]].T
            scale = want.abs().max().clamp(min=1)
            assert ((grams[b, s].double() - want).abs()[written] <= 1e-5 * scale).all()
            sq_want = (rows[:, : bounds[s + 1]] * (torch.arange(40) < kmax[b])[:, None]).square().sum(-1)
            sq_written = tile * 16 < used
            assert torch.equal(~torch.isnan(sq[b, s]), sq_written)
            assert torch.allclose(sq[b, s][sq_written].double(), sq_want[sq_written], rtol=1e-5)


@pytest.mark.parametrize("full_grad", [False, True], ids=["detached", "full-grad"])
def test_input_gradient_writes_every_entry_once(full_grad):
    # dx starts as NaN: every entry must be written, zeros at the unselected positions
    # and (detached full width) at the columns past the widest width, which the
    # trailing column blocks only store.
    t, d = 45, 150
    x, order, kmax = _ranked_inputs(3, t, d, seed=195, real=[30, 4, 0])
    bounds = (0, 9, 64, 100, 150)
    shift = x.mean(1)
    slots = 4 if full_grad else 3
    coef = torch.randn(3, slots, 30, 30, generator=generator(196))
    coef = coef + coef.mT
    dx = torch.full_like(x, math.nan)
    backward.launch_dx(x, order, kmax[:, None], shift, bounds, coef, dx, n_prefix=3, full_grad=full_grad,
                       precision="ieee")
    assert not dx.isnan().any()
    for b in range(3):
        k = int(kmax[b])
        z = (x[b, order[b, :k]] - shift[b]).double()
        want = torch.zeros(t, d, dtype=torch.float64)
        for s, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
            c = torch.zeros(k, k, dtype=torch.float64)
            if s < 3:
                c += coef[b, s, :k, :k].double()
            if full_grad:
                c += coef[b, 3, :k, :k].double()
            want[order[b, :k], lo:hi] = c @ z[:, lo:hi]
        assert torch.allclose(dx[b].double(), want, atol=1e-4 * want.abs().max().clamp(min=1))
        assert (dx[b, order[b, k:]] == 0).all()
        if not full_grad:
            assert (dx[b, :, 100:] == 0).all()


def test_interpreter_runs_one_config_and_every_gpu_config_is_correct(monkeypatch):
    # Under the interpreter the tuned kernels run a single small config. The GPU
    # configs (larger tiles, steps and column blocks) run here too, once each, on a
    # case that spans several of their tiles, and must match the reference.
    # Every GPU config, with a dot scheme it serves.
    tuned = [(gram._gram_kernel, c, "fast") for c in gram._GRAM_CONFIGS]
    tuned += [(backward._dx_kernel, c, "fast") for c in backward._DX_FAST_CONFIGS]
    tuned += [(backward._dx_kernel, c, "ieee") for c in backward._DX_IEEE_CONFIGS]
    if DEVICE == "cuda":
        pytest.skip("the interpreter's single-config path")
    lead, t, d = (1,), 80, 140
    dims = (16, 70, 128)
    x = _states(*lead, t, d, seed=200)
    mask = (torch.arange(t) < 77).expand(*lead, t)  # k_top = 72: two or three GPU-config tiles

    def fn(x, backend, precision="fast"):
        return mk.nested_cka(x, dims, k=[0.2, 0.5, 0.9], mask=mask.to(x.device), detach_full=False,
                             backend=backend, precision=precision)

    runs32 = float32_runs(lambda a: value_and_grads(lambda b: fn(b, "torch"), a, 202), [x], seed=SESSION_SEED)
    ref64, (grad64,) = value_and_grads(lambda a: fn(a, "torch"), [x.double()], 202)
    for kernel, config, precision in tuned:
        assert kernel.config.kwargs["BLOCK_D"] == 64 == config.kwargs["BLOCK_D"]
        with monkeypatch.context() as patch:
            patch.setattr(kernel, "config", config)
            value, (grad,) = value_and_grads(lambda a: fn(a, "triton", precision), [x], 202)
        assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=VALUE_FLOOR,
                                    what=f"value {config}", relative=False)
        assert_within_float32_error(grad, [g for _, (g,) in runs32], grad64, factor=4, floor=GRAD_FLOOR,
                                    what=f"gradient {config}", relative=True)


def test_k_top_far_above_every_example_count():
    # k=None makes the Gram edge T = 64 (four interpreter tiles per side) while every
    # example selects at most 9 rows: all but the first tile exit at once.
    x = _states(3, 64, 20, seed=210)
    mask = torch.zeros(3, 64, dtype=torch.bool)
    mask[0, [1, 5, 30, 31, 40, 50, 60, 62, 63]] = True
    mask[1, :6] = True
    mask[2, 20:24] = True

    def fn(x, backend):
        return mk.nested_cka(x, (3, 11, 20), mask=mask.to(x.device), kernel="rbf", unbiased=True,
                             detach_full=False, backend=backend)

    _compare(fn, [x], seed=211)


def test_two_runs_are_bitwise_equal():
    # No atomics anywhere: values and gradients are reproducible bit for bit.
    x = _states(2, 30, 40, seed=220).to(DEVICE)
    mask = _mask((2,), 30, seed=221).to(DEVICE)

    def run():
        leaf = x.clone().requires_grad_()
        value = mk.nested_cka(leaf, (8, 20, 33), k=[0.3, 0.6, 0.9], scores="cls", mask=mask, kernel="rbf",
                              detach_full=False, backend="triton")
        value.backward(torch.ones_like(value))
        return value.detach(), leaf.grad

    first, second = run(), run()
    assert torch.equal(first[0].nan_to_num(7.0), second[0].nan_to_num(7.0))
    assert torch.equal(first[1], second[1])


@pytest.mark.parametrize("threshold", [1.0, 0.5])
def test_radix_median_is_numpys_median_exactly(threshold):
    # "Grams" with a zero diagonal make every squared distance max(-2 g, 0) exactly
    # (no rounding, fused or not), so the kernel's selection must return numpy's
    # median of those fp32 values bit for bit: full 24-bit significands spread over
    # several binades (all four radix digits vary), ties (repeated values and the
    # zeros of non-negative g), odd and even counts, one row (median 0: NaN), none.
    from mipic_kernels.fused import stats

    batch, widths, k = 2, 4, 40
    g = -torch.rand(batch, widths + 1, k, k, generator=generator(230)) * 2.0 ** torch.randint(
        -6, 7, (batch, widths + 1, k, k), generator=generator(231))
    g[..., :6, :6] = -1.5  # a block of equal values
    g[..., 30:, :] = g[..., 30:, :].abs()  # non-negative g: distance 0
    g = (g + g.mT) / 2
    g.diagonal(dim1=-2, dim2=-1).zero_()
    n = torch.tensor([[40, 33, 1, 17], [0, 2, 39, 40]])
    gx, gy = g[:, :widths], g[:, widths:].expand(batch, widths, k, k)
    got = stats.bandwidths(gx.to(DEVICE), gy.to(DEVICE), n.to(DEVICE), kernel="rbf", sigma=None,
                           rbf_threshold=threshold).cpu()
    for b in range(batch):
        for w in range(widths):
            m = int(n[b, w])
            for side, gram in enumerate((gx[b, w], gy[b, w])):
                dist = torch.clamp(-2 * gram[:m, :m], min=0).numpy().astype("float32")
                if m == 0 or np.median(dist) == 0:
                    assert math.isnan(got[b, w, side]), (b, w, side)
                    continue
                ordered = np.sort(dist, axis=None)
                lo, hi = ordered[(m * m - 1) // 2], ordered[(m * m) // 2]
                want = np.float32(threshold**2) * (np.float32(0.5) * lo + np.float32(0.5) * hi)
                assert got[b, w, side].item() == float(want), (b, w, side)


def test_leading_dims_and_empty_batch():
    x = _states(2, 3, 7, 8, seed=80).to(DEVICE)
    out = mk.nested_cka(x, (3, 8), backend="triton")
    assert out.shape == (2, 3, 2)
    flat = mk.nested_cka(x.reshape(6, 7, 8), (3, 8), backend="triton")
    torch.testing.assert_close(out.reshape(6, 2), flat)
    empty = mk.nested_cka(x[:0], (3, 8), backend="triton")
    assert empty.shape == (0, 3, 2)


def test_rejections(monkeypatch):
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        mk.nested_cka(x, (2, 5), backend="triton")
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="CUDA"):
            mk.cka(x.float(), x.float(), backend="triton")


def test_cka_gradient_for_one_input_only():
    x = _states(2, 9, 5, seed=90).to(DEVICE)
    y = _states(2, 9, 4, seed=91).to(DEVICE).requires_grad_()
    mk.cka(x, y, kernel="rbf", backend="triton").sum().backward()
    expected = y.grad.clone()
    y.grad = None
    mk.cka(x.clone().requires_grad_(), y, kernel="rbf", backend="triton").sum().backward()
    torch.testing.assert_close(y.grad, expected)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy on inf - inf
def test_non_finite_input_poisons_only_its_example():
    x = _states(2, 9, 12, seed=100)
    x[0, 2, 7] = float("inf")
    x[1, 8, 3] = float("nan")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 8] = False
    x = x.to(DEVICE).requires_grad_()
    value = mk.nested_cka(x, (4, 8), mask=mask.to(DEVICE), detach_full=False, backend="triton")
    value.backward(torch.ones_like(value))
    assert torch.isnan(value[0]).all() and torch.isfinite(value[1]).all()
    grad = x.grad.cpu()
    assert grad[0].isnan().any(0).nonzero().flatten().tolist() == [7]
    assert (grad[0].nan_to_num(0) == 0).all()
    assert torch.isfinite(grad[1]).all() and (grad[1] != 0).any()


def test_unbiased_self_hsic_vanishing_for_spread_out_tokens_is_nan():
    x = torch.zeros(2, 6, 3)
    # One token away from five that coincide: the U-centred linear Gram is 0, and
    # the RBF median distance is 0.
    x[:, 0, 0] = 1.0
    x[1] += torch.randn(6, 3, generator=generator(110))
    y = torch.randn(2, 6, 4, generator=generator(111))
    for kernel in ("linear", "rbf"):
        def fn(x, y, backend):
            return mk.cka(x, y, kernel=kernel, unbiased=True, backend=backend)

        value = _compare(fn, [x, y], seed=112)
        assert torch.isnan(value[0]) and torch.isfinite(value[1])


@pytest.mark.parametrize("opts", [OPTIONS[0], OPTIONS[3]], ids=str)
def test_nested_cka_loss_module(opts):
    x = _states(3, 2, 12, 20, seed=120)
    mask = _mask((3, 2), 12, seed=121)

    def fn(x, backend):
        loss = mk.NestedCKALoss((4, 11, 20), weights=[0.5, 1.0, 2.0], k=[0.5, 0.7, 1.0],
                                k_min=4, backend=backend, **opts)
        return loss(x, scores="cls", mask=mask.to(x.device))

    _compare(fn, [x], seed=122)


@pytest.mark.parametrize("opts", [OPTIONS[1], OPTIONS[3]], ids=str)
def test_cka_with_broadcast_leading_dims(opts):
    # backend="triton" expands the broadcast pairs; the torch backend shares the Grams.
    x = _states(3, 11, 9, seed=130)
    y = _states(2, 11, 6, seed=131)
    mask = _mask((3, 2), 11, seed=132)

    def fn(x, y, backend):
        return mk.cka(x[:, None], y[None], mask=mask.to(x.device), backend=backend, **opts)

    assert _compare(fn, [x, y], seed=133).shape == (3, 2)
