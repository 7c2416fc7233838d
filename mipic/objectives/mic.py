"""MIC: soft collapse (SCR) and spectral isotropy (SIR) at every truncated width.

The regularisers themselves live in :mod:`mipic_kernels.mic` (every width from one
correlation matrix, and from nested sample Grams); this term picks the layers, stacks
them into one call each and mean-pools the anchors for SIR, as MIC does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from mipic_kernels import SoftCollapseLoss, SpectralIsotropyLoss

from . import citations
from .terms import EncodedBatch, TermOutput


class MICLoss(nn.Module):
    """``SCR + SIR``, each the mean over ``layers`` and the widths below ``hidden_size``.

    Args:
        hidden_size: the full width ``D``; widths of ``dims`` below it are regularised.
        dims: strictly increasing Matryoshka widths (at least one below ``hidden_size``).
        layers: layer numbers (1 = the first transformer layer).
        tau_corr: prefix-residual correlations up to this magnitude cost nothing.
        lambda_var: weight of SCR's variance hinge.
        uniformity_t: SIR's uniformity temperature.

    Parts: ``mic_scr`` and ``mic_sir``.
    """

    def __init__(
        self,
        hidden_size: int,
        dims: Sequence[int],
        layers: Sequence[int],
        *,
        tau_corr: float = 0.1,
        lambda_var: float = 1.0,
        uniformity_t: float = 2.0,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("layers must list at least one layer")
        self.hidden_size = hidden_size
        self.dims = tuple(dims)
        self.layers = tuple(layers)
        truncated = [d for d in dims if d < hidden_size]
        if not truncated:
            raise ValueError(f"dims must hold a width below the hidden size {hidden_size}; got {list(dims)!r}")
        self.scr = SoftCollapseLoss(truncated, tau_corr=tau_corr, lambda_var=lambda_var)
        self.sir = SpectralIsotropyLoss(truncated, t=uniformity_t)

    def forward(self, batch: EncodedBatch) -> TermOutput:
        states = torch.stack([batch.anchor_states(l) for l in self.layers])  # (L, B, T, D)
        mask = batch.anchor_mask.expand(len(self.layers), *batch.anchor_mask.shape)
        pooled = torch.stack([batch.anchor_pooled(l, "mean") for l in self.layers])  # (L, B, D)
        # Batch statistics: under data parallelism SCR sums its statistics over the
        # processes and SIR reads every process's pooled rows, so both are the whole batch's.
        ranks = batch.ranks
        parts = {"mic_scr": self.scr(states, mask, sum_over_processes=ranks.sum_over_processes),
                 "mic_sir": self.sir(ranks.gather(pooled, dim=-2))}
        return TermOutput(parts["mic_scr"] + parts["mic_sir"], parts, {})

    def get_config_dict(self) -> dict[str, Any]:
        return {"hidden_size": self.hidden_size, "dims": list(self.dims), "layers": list(self.layers),
                "tau_corr": self.scr.tau_corr, "lambda_var": self.scr.lambda_var, "uniformity_t": self.sir.t}

    @property
    def citation(self) -> str:
        return citations.MIC
