"""ESE / 2DMSE baseline: Matryoshka InfoNCE at every width of shallower layers as well."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from . import citations
from .mrl import matryoshka_info_nce
from .terms import EncodedBatch, TermOutput


class ESELoss(nn.Module):
    """The layer-and-width Matryoshka term: the mean over ``layers`` of the width-summed
    InfoNCE of each layer's pooled embeddings.

    A deterministic form of 2DMSE: every listed layer is trained at every width each
    step (2DMSE samples one layer per step). Needs 2 or 3 views, like :class:`MRLLoss`.

    Args:
        dims: strictly increasing widths.
        layers: layer numbers (1 = the first transformer layer).
        temperature: the InfoNCE temperature.

    Parts: ``ese``.
    """

    def __init__(self, dims: Sequence[int], layers: Sequence[int], temperature: float = 0.05) -> None:
        super().__init__()
        if not layers:
            raise ValueError("layers must list at least one layer")
        self.dims = tuple(int(d) for d in dims)
        self.layers = tuple(int(l) for l in layers)
        self.temperature = temperature

    def forward(self, batch: EncodedBatch) -> TermOutput:
        if batch.views < 2:
            raise ValueError("ESELoss needs 2 or 3 views (anchor, positive[, negative]); the batch has 1")
        pooled = {l: batch.view_pooled(l) for l in self.layers}
        per_layer = [matryoshka_info_nce(self.dims, self.temperature, *pooled[l], ranks=batch.ranks).sum()
                     for l in self.layers]
        loss = torch.stack(per_layer).mean()
        return TermOutput(loss, {"ese": loss}, {})

    def get_config_dict(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "layers": list(self.layers), "temperature": self.temperature}

    @property
    def citation(self) -> str:
        return citations.ESE
