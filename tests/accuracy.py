"""The accuracy criterion shared by the kernel tests (interpreter and GPU).

A fast path computing in float32 is held to the float64 reference within a multiple of
the error that float32 arithmetic itself makes on the same problem, plus a floor of a
few float32 ulps. That float32 error is taken as the worst of the eager reference run
in float32 on the inputs and on a few copies with every entry moved by one float32
ulp in a random direction. One float32 evaluation alone can be lucky: where the
problem is ill-conditioned (unbiased HSIC over four tokens cancels most of its terms)
its error varies tenfold with the rounding pattern, and the kernel's different but
equally valid summation order then looks ten times worse than it is. The perturbed
copies expose that conditioning without knowing where it comes from.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from tests.seeding import generator


def perturbed(inputs: Sequence[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Float32 copies of ``inputs`` with every entry moved by one ulp, up or down at random."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        up = torch.randint(0, 2, x.shape, generator=gen).bool().to(x.device)
        x = x.float()
        out.append(torch.nextafter(x, torch.where(up, torch.inf, -torch.inf)))
    return out


def float32_runs(
    run: Callable[[list[torch.Tensor]], tuple[torch.Tensor, Sequence[torch.Tensor]]],
    inputs: Sequence[torch.Tensor],
    *,
    copies: int = 3,
    seed: int = 0,
) -> list[tuple[torch.Tensor, Sequence[torch.Tensor]]]:
    """``run`` (value, input gradients) on the float32 inputs and on ``copies`` perturbed ones."""
    runs = [run([x.float() for x in inputs])]
    runs += [run(perturbed(inputs, seed + i)) for i in range(copies)]
    return runs


def assert_within_float32_error(
    got: torch.Tensor,
    refs32: Sequence[torch.Tensor],
    ref64: torch.Tensor,
    *,
    factor: float,
    floor: float,
    what: str,
    relative: bool,
    extra: float = 0.0,
) -> None:
    """``got`` has NaN exactly where ``ref64`` has, and elsewhere, entry by entry, an error
    of at most ``factor`` x the worst float32 reference error at that entry + ``floor`` +
    ``extra``. Errors are relative to ``ref64``'s largest entry when ``relative``
    (gradients), absolute otherwise (CKA values are O(1))."""
    got = got.double().cpu()
    ref64 = ref64.double().cpu()
    assert torch.equal(torch.isnan(got), torch.isnan(ref64)), f"{what}: NaN positions differ"
    scale = ref64.nan_to_num(0).abs().max().clamp(min=1e-30) if relative else 1.0
    err = (got - ref64).nan_to_num(0).abs() / scale
    err32 = torch.stack([(r.double().cpu() - ref64).nan_to_num(0).abs() / scale for r in refs32]).amax(0)
    bound = factor * err32 + floor + extra
    worst = torch.argmax(err - bound)
    assert (err <= bound).all(), (
        f"{what}: error {err.flatten()[worst]:.3g} > {bound.flatten()[worst]:.3g} at flat index {int(worst)} "
        f"(float32 reference error there {err32.flatten()[worst]:.3g})"
    )


def value_and_grads(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], upstream_seed: int
) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
    """Value and input gradients of ``fn(*inputs)`` for a random upstream gradient
    other than 1 (a backward that only works for ones must fail)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    value = fn(*leaves)
    upstream = torch.rand(value.shape, generator=generator(upstream_seed)).to(value) * 2 - 0.5
    return value.detach(), torch.autograd.grad(value, leaves, upstream)


Run = Callable[[Callable[..., torch.Tensor], Sequence[torch.Tensor], int], tuple[torch.Tensor, Sequence[torch.Tensor]]]


def compare_backends(
    fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    run: Run,
    *,
    device: str,
    seed: int,
    copies_seed: int,
    value_floor: float,
    grad_floor: float,
    value_relative: bool,
) -> torch.Tensor:
    """``fn(*inputs, backend="triton")`` (float32 on ``device``) against the float32 and
    float64 references (``backend="torch"``): values and input gradients, each within 4x
    the float32 reference's error plus its floor. ``run(fn, inputs, seed)`` returns the
    value and input gradients for an upstream gradient drawn from ``seed``. Returns the
    kernel's value."""
    dev = [(x.float() if x.dtype == torch.float64 else x).to(device) for x in inputs]
    value, grads = run(lambda *a: fn(*a, backend="triton"), dev, seed)
    runs32 = float32_runs(lambda a: run(lambda *b: fn(*b, backend="torch"), a, seed), inputs, seed=copies_seed)
    ref64, grads64 = run(lambda *a: fn(*a, backend="torch"), [x.double() for x in inputs], seed)
    assert value.dtype == torch.float32
    assert_within_float32_error(value, [v for v, _ in runs32], ref64, factor=4, floor=value_floor,
                                what="value", relative=value_relative)
    for i, (g, g64) in enumerate(zip(grads, grads64)):
        assert torch.isfinite(g).all(), "gradient holds NaN or inf"
        assert_within_float32_error(g, [gs[i] for _, gs in runs32], g64, factor=4, floor=grad_floor,
                                    what=f"gradient {i}", relative=True)
    return value
