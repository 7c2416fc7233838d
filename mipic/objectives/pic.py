"""L_PIC: the progressive (width, layer) chain.

Link i maps checkpoint i's pooled prefix ``z_i`` (width ``d_i`` at layer ``l_i``) through a
small MLP ``d_i -> max(d_i, d_{i+1}) // 2 -> ReLU -> d_{i+1}`` and must identify the
detached ``z_{i+1}`` of the same sentence among the batch (InfoNCE).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .mrl import info_nce


class PICLoss(nn.Module):
    def __init__(self, chain: Sequence[Sequence[int]], temperature: float) -> None:
        super().__init__()
        self.chain = tuple((int(w), int(l)) for w, l in chain)
        self.temperature = temperature
        self.heads = nn.ModuleList()
        for (d_in, _), (d_out, _) in zip(self.chain, self.chain[1:]):
            width = max(max(d_in, d_out) // 2, 1)
            self.heads.append(nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out)))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for _, l in self.chain}))

    def forward(self, pooled: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Per-link losses ``(len(chain) - 1,)`` from pooled states ``{layer: (B, D)}``."""
        losses = []
        for head, (d_in, l_in), (d_out, l_out) in zip(self.heads, self.chain, self.chain[1:]):
            source = pooled[l_in][:, :d_in].float()
            target = pooled[l_out][:, :d_out].float().detach()
            losses.append(info_nce(head(source), target, self.temperature))
        return torch.stack(losses)
