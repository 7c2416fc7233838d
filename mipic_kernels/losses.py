"""``nn.Module`` losses built on the functional API."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .api import (
    _check_backend, _check_dims, _check_k, _check_kernel, _check_positive_int, _check_precision, nested_cka,
)
from .selection import KSpec, ScoresSpec

REDUCTIONS = ("mean", "sum")


class NestedCKALoss(nn.Module):
    """``sum_i w_i * reduce(1 - CKA_i)`` over the nested widths ``dims``.

    ``reduce`` is the mean (or sum) over every defined entry of the leading dims (e.g.
    layers x batch); undefined entries (see :func:`mipic_kernels.nested_cka`) are left
    out, a width with none defined contributes 0, and the loss and its gradients are
    always finite.

    Every argument is checked here, with the messages of
    :func:`mipic_kernels.nested_cka`; only the bound ``dims[-1] <= D`` waits for the
    input. ``NestedCKALoss(**loss.get_config_dict())`` rebuilds the loss.

    Args:
        dims: strictly increasing widths.
        weights: one non-negative weight per width (default 1 each).
        reduction: ``"mean"`` or ``"sum"`` over the defined entries of each width.
        k, k_min, kernel, unbiased, sigma, rbf_threshold, detach_full, backend, precision:
            as in :func:`mipic_kernels.nested_cka` (token counts, RBF options, a detached
            full-width teacher by default, ``"auto"`` | ``"torch"`` | ``"triton"``, the
            triton backend's ``"fast"`` | ``"ieee"`` dots).
    """

    def __init__(
        self,
        dims: Sequence[int],
        weights: Optional[Sequence[float]] = None,
        reduction: str = "mean",
        *,
        k: KSpec = None,
        k_min: int = 1,
        kernel: str = "linear",
        unbiased: bool = False,
        sigma: Optional[float] = None,
        rbf_threshold: float = 1.0,
        detach_full: bool = True,
        backend: str = "auto",
        precision: str = "fast",
    ) -> None:
        super().__init__()
        self.dims = _check_dims(dims, depth=None)
        self.width_weights = _check_weights(weights, len(self.dims))
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.reduction = reduction
        kernel, sigma = _check_kernel(kernel, sigma, rbf_threshold)
        self.options: dict[str, Any] = dict(
            k=_check_k(k, len(self.dims)),
            k_min=_check_positive_int("k_min", k_min),
            kernel=kernel,
            unbiased=bool(unbiased),
            sigma=sigma,
            rbf_threshold=float(rbf_threshold),
            detach_full=bool(detach_full),
            backend=_check_backend(backend),
            precision=_check_precision(precision),
        )
        self.register_buffer(
            "weights", torch.tensor(self.width_weights, dtype=torch.float64), persistent=False
        )

    def per_width(
        self, x: torch.Tensor, scores: ScoresSpec = None, mask: Optional[torch.Tensor] = None, *,
        sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """``reduce(1 - CKA_i)`` for each width, ``(len(dims),)``, unweighted.

        ``sum_over_processes``: under data parallelism, a function that sums a tensor
        over the processes holding the other entries (a differentiable all-reduce);
        the reduction then runs over every process's entries, the defined ones counted
        on all of them."""
        values = nested_cka(x, self.dims, scores=scores, mask=mask, **self.options).reshape(-1, len(self.dims))
        total = _DefinedGapSums.apply(values)
        if self.reduction == "sum":
            return total if sum_over_processes is None else sum_over_processes(total)
        count = (values == values).sum(0)  # defined: not NaN, in one operation
        if sum_over_processes is not None:
            total, count = sum_over_processes(torch.stack([total, count.to(total.dtype)])).unbind()
        return total / count.clamp(min=1)

    def forward(
        self, x: torch.Tensor, scores: ScoresSpec = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """The weighted loss (a scalar) for token states ``x (*, T, D)``; ``scores`` and
        ``mask`` as in :func:`mipic_kernels.nested_cka`."""
        gaps = self.per_width(x, scores=scores, mask=mask)
        return torch.dot(gaps, self.weights.to(gaps))

    def get_config_dict(self) -> dict[str, Any]:
        """The constructor's arguments (plain Python values, JSON-serialisable)."""
        config = dict(
            dims=list(self.dims), weights=list(self.width_weights), reduction=self.reduction, **self.options
        )
        if isinstance(config["k"], list):
            config["k"] = list(config["k"])  # a copy: changing it must not change the loss
        return config

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={value!r}" for name, value in self.get_config_dict().items())


class _DefinedGapSums(torch.autograd.Function):
    """``sum(1 - v)`` over the defined (not NaN) entries of each width of CKA values
    ``v (N, W)``, with the gradient that :func:`nested_cka` needs.

    Every op here is a kernel launch on a GPU, and at small shapes the launches, not the
    kernels, set a training step's time. Autograd through a mask and a sum takes four
    launches in the backward; this takes one: each width's upstream gradient is handed to
    every entry of the width as a broadcast view (no copy), the undefined entries too,
    which is exact because :func:`nested_cka` ignores the upstream gradient wherever an
    entry is undefined (on both backends). Only CKA values from :func:`nested_cka` may
    come in."""

    @staticmethod
    def forward(ctx: Any, values: torch.Tensor) -> torch.Tensor:
        ctx.entries = values.shape[0]
        return torch.nansum(1 - values, 0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.neg().expand(ctx.entries, -1)


def _check_weights(weights: Optional[Sequence[float]], n_widths: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0,) * n_widths
    ok = (
        not isinstance(weights, (str, bytes)) and isinstance(weights, Sequence)
        and len(weights) == n_widths
        and all(
            isinstance(w, numbers.Real) and not isinstance(w, bool)
            and math.isfinite(float(w)) and float(w) >= 0
            for w in weights
        )
    )
    if not ok:
        raise ValueError(
            f"weights must be {n_widths} finite non-negative floats, one per width; got {weights!r}"
        )
    return tuple(float(w) for w in weights)
