"""L_MRL: InfoNCE on the L2-normalised pooled prefix at every Matryoshka width."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import ONE_PROCESS, Ranks
from . import citations
from .terms import EncodedBatch, TermOutput, loss_dtype


def info_nce(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    temperature: float,
    negative: Optional[torch.Tensor] = None,
    ranks: Ranks = ONE_PROCESS,
) -> torch.Tensor:
    """Mean cross-entropy of picking row i of ``positive`` for row i of ``anchor`` among every
    positive of the batch (and every hard ``negative``), by cosine similarity / temperature.

    Under data parallelism (``ranks`` of several processes, each passing its own rows) the
    candidates are every process's positives, then every process's negatives, as in one
    process on the concatenated batch, and the mean runs over every process's anchors."""
    return matryoshka_info_nce([anchor.shape[-1]], temperature, anchor, positive, negative, ranks)[0]


def matryoshka_info_nce(
    dims: Sequence[int],
    temperature: float,
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: Optional[torch.Tensor] = None,
    ranks: Ranks = ONE_PROCESS,
) -> torch.Tensor:
    """:func:`info_nce` of the prefixes ``[..., :d]`` for every width, ``(len(dims),)``."""
    candidates = ranks.gather(positive if negative is None else torch.cat([positive, negative], -1))
    if negative is not None:  # every positive before every negative, as in one process
        candidates = torch.cat(candidates.split(positive.shape[-1], -1))
    sums = torch.stack([
        info_nce_sum(anchor[:, :d], candidates[:, :d], temperature, first=ranks.rank * anchor.shape[0])
        for d in dims
    ])
    return ranks.mean(sums, anchor.shape[0])


def info_nce_sum(anchor: torch.Tensor, candidates: torch.Tensor, temperature: float, first: int = 0) -> torch.Tensor:
    """The sum over the rows of ``anchor`` of the cross-entropy of picking row ``first + i``
    of ``candidates`` for row ``i``, by cosine similarity / temperature."""
    dtype = loss_dtype(anchor, candidates)
    a = F.normalize(anchor.to(dtype), dim=-1)
    logits = a @ F.normalize(candidates.to(dtype), dim=-1).T / temperature
    labels = torch.arange(first, first + a.shape[0], device=a.device)
    return F.cross_entropy(logits, labels, reduction="sum")


class MRLLoss(nn.Module):
    """Matryoshka InfoNCE of the last layer's pooled embeddings: ``sum_d w_d InfoNCE_d``.

    Needs 2 or 3 views (anchor, positive or second dropout view, optional hard
    negative); the in-batch positives (and negatives) are the candidates.

    Args:
        dims: strictly increasing widths.
        temperature: the InfoNCE temperature.
        weights: one weight per width (default 1 each).

    Parts: ``mrl``; details: ``mrl@<width>`` (unweighted InfoNCE per width).
    """

    def __init__(self, dims: Sequence[int], temperature: float = 0.05, weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.dims = tuple(int(d) for d in dims)
        if not self.dims or any(b <= a for a, b in zip(self.dims, self.dims[1:])) or self.dims[0] < 1:
            raise ValueError(f"dims must be strictly increasing ints >= 1; got {list(dims)!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        weights = [1.0] * len(self.dims) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.dims) or any(not w >= 0 for w in weights):
            raise ValueError(f"weights must be {len(self.dims)} non-negative numbers, one per width; got {weights!r}")
        self.temperature = temperature
        self.register_buffer("weights", torch.tensor(weights), persistent=False)

    def per_width(
        self, anchor: torch.Tensor, positive: torch.Tensor, negative: Optional[torch.Tensor] = None,
        ranks: Ranks = ONE_PROCESS,
    ) -> torch.Tensor:
        """Unweighted InfoNCE per width ``(len(dims),)`` of pooled ``(B, D)`` embeddings
        (of the whole batch under data parallelism, see :func:`info_nce`)."""
        return matryoshka_info_nce(self.dims, self.temperature, anchor, positive, negative, ranks)

    def forward(self, batch: EncodedBatch) -> TermOutput:
        if batch.views < 2:
            raise ValueError("MRLLoss needs 2 or 3 views (anchor, positive[, negative]); the batch has 1")
        views = batch.view_pooled(batch.num_layers)
        per_width = self.per_width(*views, ranks=batch.ranks)
        loss = (per_width * self.weights).sum()
        return TermOutput(loss, {"mrl": loss}, {f"mrl@{d}": v for d, v in zip(self.dims, per_width)})

    def get_config_dict(self) -> dict[str, Any]:
        return {"dims": list(self.dims), "temperature": self.temperature, "weights": self.weights.tolist()}

    @property
    def citation(self) -> str:
        return citations.MRL
