"""``nn.Module`` forms of MIC's regularisers (:mod:`mipic_kernels.mic`)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .api import _check_dims
from .mic import _check_number, soft_collapse, spectral_isotropy

REDUCTIONS = ("mean", "sum")


class _WidthReduced(nn.Module):
    """Holds the widths and reduces a ``(*, W)`` result: the mean (or sum) over the
    leading dims per width, then over widths."""

    def __init__(self, dims: Sequence[int], reduction: str) -> None:
        super().__init__()
        self.dims = _check_dims(dims, depth=None)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
        self.reduction = reduction

    def _reduce_leading(self, values: torch.Tensor) -> torch.Tensor:
        flat = values.reshape(-1, len(self.dims))
        return flat.sum(0) if self.reduction == "sum" else flat.mean(0)

    def _reduce_widths(self, per_width: torch.Tensor) -> torch.Tensor:
        return per_width.sum() if self.reduction == "sum" else per_width.mean()


class SoftCollapseLoss(_WidthReduced):
    """MIC's soft collapse regulariser (SCR), reduced over widths and leading dims.

    Args:
        dims: strictly increasing widths, each below the hidden size.
        tau_corr: correlations up to this magnitude cost nothing.
        lambda_var: weight of the variance hinge.
        reduction: ``"mean"`` (MIC's) or ``"sum"`` over widths and leading dims.

    See :func:`mipic_kernels.soft_collapse` for the definition.
    """

    def __init__(
        self, dims: Sequence[int], *, tau_corr: float = 0.1, lambda_var: float = 1.0, reduction: str = "mean"
    ) -> None:
        super().__init__(dims, reduction)
        self.tau_corr = _check_number("tau_corr", tau_corr, minimum=0.0)
        self.lambda_var = _check_number("lambda_var", lambda_var, minimum=0.0)

    def per_width(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
        sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """SCR per width ``(len(dims),)``, reduced over the leading dims of ``x (*, B, T, D)``;
        ``sum_over_processes`` as in :func:`mipic_kernels.soft_collapse`."""
        values = soft_collapse(x, self.dims, mask=mask, tau_corr=self.tau_corr, lambda_var=self.lambda_var,
                               sum_over_processes=sum_over_processes)
        return self._reduce_leading(values)

    def forward(
        self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
        sum_over_processes: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ) -> torch.Tensor:
        """The scalar loss for token states ``x (*, B, T, D)`` and real-token ``mask (*, B, T)``."""
        return self._reduce_widths(self.per_width(x, mask, sum_over_processes=sum_over_processes))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, tau_corr={self.tau_corr}, lambda_var={self.lambda_var}, reduction={self.reduction!r}"


class SpectralIsotropyLoss(_WidthReduced):
    """MIC's spectral isotropy regulariser (SIR), reduced over widths and leading dims.

    Args:
        dims: strictly increasing widths, at most the hidden size.
        t: the uniformity temperature.
        reduction: ``"mean"`` (MIC's) or ``"sum"`` over widths and leading dims.

    See :func:`mipic_kernels.spectral_isotropy` for the definition.
    """

    def __init__(self, dims: Sequence[int], *, t: float = 2.0, reduction: str = "mean") -> None:
        super().__init__(dims, reduction)
        self.t = _check_number("t", t, minimum=0.0, strict=True)

    def per_width(self, pooled: torch.Tensor) -> torch.Tensor:
        """SIR per width ``(len(dims),)``, reduced over the leading dims of ``pooled (*, B, D)``."""
        return self._reduce_leading(spectral_isotropy(pooled, self.dims, t=self.t))

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """The scalar loss for pooled embeddings ``pooled (*, B, D)``."""
        return self._reduce_widths(self.per_width(pooled))

    def extra_repr(self) -> str:
        return f"dims={self.dims}, t={self.t}, reduction={self.reduction!r}"
