"""L_PIC: the progressive (width, layer) chain.

Link i maps checkpoint i's pooled prefix ``z_i`` (width ``d_i`` at layer ``l_i``) through a
small MLP ``d_i -> max(d_i, d_{i+1}) // 2 -> ReLU -> d_{i+1}`` and must identify the
detached ``z_{i+1}`` of the same sentence among the batch (InfoNCE).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..distributed import ONE_PROCESS, Ranks
from . import citations
from .mrl import info_nce_sum
from .terms import EncodedBatch, TermOutput

AGGREGATIONS = ("mean", "sum")


class PICLoss(nn.Module):
    """Progressive information chaining over the anchors' pooled prefixes.

    Args:
        chain: ``[(width, layer), ...]``, at least 2 links, widths strictly growing and
            layers not going back.
        temperature: the InfoNCE temperature.
        aggregation: ``"mean"`` or ``"sum"`` over the links.

    Parts: ``pic``.
    """

    def __init__(self, chain: Sequence[Sequence[int]], temperature: float = 0.05, aggregation: str = "mean") -> None:
        super().__init__()
        self.chain = tuple((int(w), int(l)) for w, l in chain)
        if len(self.chain) < 2 or any(w < 1 or l < 1 for w, l in self.chain) or any(
                b[0] <= a[0] or b[1] < a[1] for a, b in zip(self.chain, self.chain[1:])):
            raise ValueError(f"chain must be at least 2 [width, layer] links (ints >= 1), widths strictly growing "
                             f"and layers not going back; got {[list(c) for c in self.chain]}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
        self.temperature = temperature
        self.aggregation = aggregation
        self.heads = nn.ModuleList()
        for (d_in, _), (d_out, _) in zip(self.chain, self.chain[1:]):
            width = max(max(d_in, d_out) // 2, 1)
            self.heads.append(nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, d_out)))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted({l for _, l in self.chain}))

    def links(self, pooled: Mapping[int, torch.Tensor], ranks: Ranks = ONE_PROCESS) -> torch.Tensor:
        """Per-link losses ``(len(chain) - 1,)`` from pooled states ``{layer: (B, D)}``
        (of the whole batch under data parallelism: the targets are every process's)."""
        targets = {l: ranks.gather(pooled[l].detach()) for _, l in self.chain[1:]}
        sums = []
        for head, (d_in, l_in), (d_out, l_out) in zip(self.heads, self.chain, self.chain[1:]):
            source = pooled[l_in][:, :d_in].to(head[0].weight.dtype)
            sums.append(info_nce_sum(head(source), targets[l_out][:, :d_out], self.temperature,
                                     first=ranks.rank * source.shape[0]))
        return ranks.mean(torch.stack(sums), source.shape[0])

    def forward(self, batch: EncodedBatch) -> TermOutput:
        links = self.links({l: batch.anchor_pooled(l) for l in self.layers}, batch.ranks)
        loss = links.sum() if self.aggregation == "sum" else links.mean()
        return TermOutput(loss, {"pic": loss}, {})

    def get_config_dict(self) -> dict[str, Any]:
        return {"chain": [list(c) for c in self.chain], "temperature": self.temperature,
                "aggregation": self.aggregation}

    @property
    def citation(self) -> str:
        return citations.MIPIC
