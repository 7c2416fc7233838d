"""MIC's regularisers (mipic_kernels.mic) against the independent float64 NumPy oracle:
values and input gradients, awkward sizes, padding, every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mipic_kernels as mk
from tests import numpy_mic
from tests.seeding import generator

# Token states (layers, examples, tokens, width) with a width no block size divides,
# and masks that pad: one example with a single real token (no standardisation: left
# out of the correlation) and, in the second layer, one with none.
SHAPE = (2, 4, 6, 7)
SCR_DIMS = (1, 3, 6)
SIR_DIMS = (1, 4, 7)


def _inputs(offset: int = 0):
    gen = generator(offset)
    L, B, T, D = SHAPE
    # Features at different scales, so the variance hinge is active for some and not others.
    scales = torch.tensor([0.3, 0.6, 2.0, 0.4, 1.7, 0.8, 2.5], dtype=torch.float64)
    x = (torch.randn(SHAPE, generator=gen, dtype=torch.float64) + 0.5) * scales
    lengths = torch.tensor([[6, 4, 1, 5], [3, 6, 0, 2]])
    mask = torch.arange(T) < lengths[..., None]
    x = torch.where(mask[..., None], x, torch.full_like(x, 1e3))  # padding must be ignored
    return x, mask


def _scr_oracle(x: np.ndarray, mask: np.ndarray, tau: float, lam: float) -> np.ndarray:
    return np.stack([numpy_mic.soft_collapse(x[l], mask[l], SCR_DIMS, tau, lam) for l in range(len(x))])


def _sir_oracle(z: np.ndarray, t: float) -> np.ndarray:
    return np.stack([numpy_mic.spectral_isotropy(z[l], SIR_DIMS, t) for l in range(len(z))])


def _mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = mask[..., None].to(x.dtype)
    return (torch.where(mask[..., None], x, 0.0) * w).sum(-2) / w.sum(-2).clamp(min=1)


@pytest.mark.parametrize("tau, lam", [(0.1, 1.0), (0.0, 0.3), (0.35, 0.0)])
def test_soft_collapse_matches_numpy(tau, lam):
    x, mask = _inputs()
    got = mk.soft_collapse(x, SCR_DIMS, mask=mask, tau_corr=tau, lambda_var=lam)
    want = _scr_oracle(x.numpy(), mask.numpy(), tau, lam)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)


def test_soft_collapse_gradient_matches_finite_differences():
    x, mask = _inputs(1)
    weights = torch.randn(2, 3, generator=generator(2), dtype=torch.float64)
    x.requires_grad_()
    (mk.soft_collapse(x, SCR_DIMS, mask=mask, tau_corr=0.05, lambda_var=0.7) * weights).sum().backward()
    xs, ms, ws = x.detach().numpy().copy(), mask.numpy(), weights.numpy()
    fd = numpy_mic.finite_difference_gradient(lambda v: float((_scr_oracle(v, ms, 0.05, 0.7) * ws).sum()), xs)
    grad = x.grad.numpy()
    assert np.all(grad[~ms] == 0), "padding receives no gradient"
    # Central differences in float64 with a 1e-6 step are good to ~1e-9 of the gradient's scale.
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-7 * np.abs(fd).max())


def test_spectral_isotropy_matches_numpy_values_and_gradient():
    x, mask = _inputs(3)
    pooled = _mean_pool(x, mask)  # (2, 4, 7); the example without tokens pools to zero
    got = mk.spectral_isotropy(pooled, SIR_DIMS, t=2.0)
    np.testing.assert_allclose(got.numpy(), _sir_oracle(pooled.numpy(), 2.0), rtol=1e-10, atol=1e-13)

    z = torch.randn(3, 5, 7, generator=generator(4), dtype=torch.float64).requires_grad_()
    weights = torch.randn(3, 3, generator=generator(5), dtype=torch.float64)
    (mk.spectral_isotropy(z, SIR_DIMS, t=1.3) * weights).sum().backward()
    zs, ws = z.detach().numpy().copy(), weights.numpy()
    fd = numpy_mic.finite_difference_gradient(lambda v: float((_sir_oracle(v, 1.3) * ws).sum()), zs)
    np.testing.assert_allclose(z.grad.numpy(), fd, rtol=0, atol=1e-7 * np.abs(fd).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_float32(dtype):
    # Against the float64 oracle on the same (rounded) inputs. The float32 arithmetic sums
    # at most T * B = 24 products per correlation entry and B * T = 24 per variance, so
    # values (O(1)) stay within a few dozen float32 ulps; over 20 seeds the worst errors were
    # 1e-7 (SCR) and 4e-7 (SIR) for values and 1.4e-6 of the largest gradient entry. A
    # low-precision input gets its gradient rounded to its own dtype: one bf16 ulp is 2^-8
    # relative, one fp16 ulp 2^-11 (worst seen 3.1e-3 and 3.7e-4).
    x, mask = _inputs(6)
    x = x.to(dtype).requires_grad_()
    scr = mk.soft_collapse(x, SCR_DIMS, mask=mask, tau_corr=0.05, lambda_var=0.7)
    assert scr.dtype == torch.float32
    x64 = x.detach().double()
    np.testing.assert_allclose(scr.detach().numpy(), _scr_oracle(x64.numpy(), mask.numpy(), 0.05, 0.7), atol=2e-6)
    scr.sum().backward()
    ref = x64.clone().requires_grad_()
    mk.soft_collapse(ref, SCR_DIMS, mask=mask, tau_corr=0.05, lambda_var=0.7).sum().backward()
    assert x.grad.dtype == dtype
    scale = ref.grad.abs().max()
    tolerance = {torch.float32: 2e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert ((x.grad.double() - ref.grad).abs() <= tolerance * scale).all()

    pooled = _mean_pool(x.detach().double(), mask).to(dtype)
    sir = mk.spectral_isotropy(pooled, SIR_DIMS)
    assert sir.dtype == torch.float32
    np.testing.assert_allclose(sir.numpy(), _sir_oracle(pooled.double().numpy(), 2.0), atol=4e-6)


def test_one_correlation_serves_every_width():
    # A width's value does not depend on which other widths are asked for.
    x, mask = _inputs(7)
    together = mk.soft_collapse(x, SCR_DIMS, mask=mask)
    alone = torch.cat([mk.soft_collapse(x, [d], mask=mask) for d in SCR_DIMS], -1)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)
    pooled = _mean_pool(x, mask)
    together = mk.spectral_isotropy(pooled, SIR_DIMS)
    alone = torch.cat([mk.spectral_isotropy(pooled, [d]) for d in SIR_DIMS], -1)
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-14)


def test_properties():
    gen = generator(8)
    x = torch.randn(5, 9, 6, generator=gen, dtype=torch.float64)
    # Uncorrelated prefix and residual with unit deviations: SCR is zero once tau_corr covers the sample noise.
    assert float(mk.soft_collapse(x, [3], tau_corr=1.0, lambda_var=1.0)[0]) < 0.2
    x_big = x * 10  # every raw deviation above 1: no hinge; correlations are scale free
    assert float(mk.soft_collapse(x_big, [3], tau_corr=1.0)[0]) == 0.0
    # Duplicated features (prefix copied into the residual) are perfectly correlated.
    dup = torch.cat([x[..., :3], x[..., :3]], -1) * 10
    assert float(mk.soft_collapse(dup, [3], tau_corr=0.0, lambda_var=0.0)[0]) > 0.1
    # Collapsed embeddings (all rows equal) have the worst uniformity, log(1) = 0.
    same = torch.ones(4, 6, dtype=torch.float64)
    assert float(mk.spectral_isotropy(same, [6])[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(mk.spectral_isotropy(torch.randn(64, 6, generator=gen), [6])[0]) < -0.5


def test_modules_reduce_the_functional_values():
    x, mask = _inputs(9)
    per_width = mk.soft_collapse(x, SCR_DIMS, mask=mask, tau_corr=0.2, lambda_var=0.5)
    scr = mk.SoftCollapseLoss(SCR_DIMS, tau_corr=0.2, lambda_var=0.5)
    torch.testing.assert_close(scr.per_width(x, mask), per_width.mean(0))
    torch.testing.assert_close(scr(x, mask), per_width.mean())
    scr_sum = mk.SoftCollapseLoss(SCR_DIMS, tau_corr=0.2, lambda_var=0.5, reduction="sum")
    torch.testing.assert_close(scr_sum(x, mask), per_width.sum())
    pooled = _mean_pool(x, mask)
    sir = mk.SpectralIsotropyLoss(SIR_DIMS, t=1.5)
    torch.testing.assert_close(sir(pooled), mk.spectral_isotropy(pooled, SIR_DIMS, t=1.5).mean())
    assert "tau_corr=0.2" in repr(scr) and "t=1.5" in repr(sir)


def test_forward_traces_without_graph_breaks():
    x, mask = _inputs(10)
    x = x.float().requires_grad_()

    def both(x, mask):
        return mk.soft_collapse(x, SCR_DIMS, mask=mask).sum() + mk.spectral_isotropy(_mean_pool(x, mask), SIR_DIMS).sum()

    compiled = torch.compile(both, fullgraph=True, backend="aot_eager")
    value = compiled(x, mask)
    value.backward()
    torch.testing.assert_close(value, both(x.detach(), mask))
    assert torch.isfinite(x.grad).all()


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 6, generator=generator(11))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: mk.soft_collapse(_x().long(), [2]), TypeError, "x must have a floating dtype"),
        (lambda: mk.soft_collapse(torch.randn(5, 6), [2]), ValueError, "x must have shape (*, n, features)"),
        (lambda: mk.soft_collapse(torch.randn(2, 5, 1), [1]), ValueError, "at least 2 features"),
        (lambda: mk.soft_collapse(_x(), [6]), ValueError, "dims must be below the width D=6"),
        (lambda: mk.soft_collapse(_x(), [3, 2]), ValueError, "dims must be strictly increasing"),
        (lambda: mk.soft_collapse(_x(), [0, 2]), ValueError, "dims must hold ints in [1, D=6]"),
        (lambda: mk.soft_collapse(_x(), []), ValueError, "dims must be a non-empty sequence"),
        (lambda: mk.soft_collapse(_x(), [2], mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
         "mask must have shape (2, 5)"),
        (lambda: mk.soft_collapse(_x(), [2], mask=torch.ones(2, 5)), TypeError, "mask must be a bool tensor"),
        (lambda: mk.soft_collapse(_x(), [2], tau_corr=-0.1), ValueError, "tau_corr must be a finite float >= 0"),
        (lambda: mk.soft_collapse(_x(), [2], lambda_var=float("nan")), ValueError, "lambda_var must be a finite"),
        (lambda: mk.soft_collapse(_x(), [2], tau_corr="0.1"), TypeError, "tau_corr must be a finite float"),
        (lambda: mk.soft_collapse(_x().index_fill(1, torch.tensor([2]), float("nan")), [2]), ValueError,
         "x must be finite"),
        (lambda: mk.spectral_isotropy(torch.randn(1, 6), [2]), ValueError, "at least 2 examples"),
        (lambda: mk.spectral_isotropy(torch.randn(6), [2]), ValueError, "pooled must have shape"),
        (lambda: mk.spectral_isotropy(torch.randn(4, 6), [7]), ValueError, "dims must hold ints in [1, D=6]"),
        (lambda: mk.spectral_isotropy(torch.randn(4, 6), [2], t=0.0), ValueError, "t must be a finite float > 0"),
        (lambda: mk.spectral_isotropy(torch.full((4, 6), float("inf")), [2]), ValueError, "pooled must be finite"),
        (lambda: mk.spectral_isotropy(torch.randn(4, 6).int(), [2]), TypeError, "pooled must have a floating dtype"),
        (lambda: mk.SoftCollapseLoss([2, 2]), ValueError, "dims must be strictly increasing"),
        (lambda: mk.SoftCollapseLoss([2], reduction="max"), ValueError, "reduction must be one of"),
        (lambda: mk.SpectralIsotropyLoss([2], t=-1), ValueError, "t must be a finite float > 0"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert message in str(info.value)


def test_benchmark_compares_equal_quantities_and_runs():
    from benchmarks import mic

    preset = mic.PRESETS["minilm"]
    workload = mic.make_workload(preset, dtype=torch.float32, device=torch.device("cpu"))
    x, mask = workload.x.detach(), workload.mask
    torch.testing.assert_close(mic.loop_soft_collapse(x, mask, preset.dims),
                               mk.soft_collapse(x, preset.dims, mask=mask), rtol=1e-5, atol=1e-6)
    pooled = mic.mean_pool(x, mask)
    torch.testing.assert_close(mic.loop_spectral_isotropy(pooled, preset.dims),
                               mk.spectral_isotropy(pooled, preset.dims), rtol=1e-5, atol=1e-6)
    rows = mic.main(["--preset", "minilm", "--provider", "loop", "torch", "--mode", "full", "--warmup", "1",
                     "--repeats", "1", "--no-csv"])
    assert {(r["kernel"], r["provider"]) for r in rows} == {(k, p) for k in ("scr", "sir") for p in ("loop", "torch")}
    assert all(r["p50_ms"] > 0 and r["device"] for r in rows)
