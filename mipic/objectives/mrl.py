"""L_MRL: InfoNCE on the L2-normalised pooled prefix at every Matryoshka width."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def info_nce(
    anchor: torch.Tensor, positive: torch.Tensor, temperature: float, negative: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Mean cross-entropy of picking row i of ``positive`` for row i of ``anchor`` among every
    positive of the batch (and every hard ``negative``), by cosine similarity / temperature."""
    a = F.normalize(anchor.float(), dim=-1)
    candidates = positive if negative is None else torch.cat([positive, negative])
    logits = a @ F.normalize(candidates.float(), dim=-1).T / temperature
    labels = torch.arange(a.shape[0], device=a.device)
    return F.cross_entropy(logits, labels)


class MRLLoss(nn.Module):
    """InfoNCE per width on prefixes ``[..., :d]``; :meth:`forward` returns ``(W,)``."""

    def __init__(self, dims: Sequence[int], temperature: float) -> None:
        super().__init__()
        self.dims = tuple(dims)
        self.temperature = temperature

    def forward(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return torch.stack([
            info_nce(anchor[:, :d], positive[:, :d], self.temperature,
                     None if negative is None else negative[:, :d])
            for d in self.dims
        ])
