"""L_SIA: self-distilled attention (KL) and nested top-k CKA alignment at chosen layers.

At layer ``l`` and truncated width ``d``: teacher scores ``s_j = q . h_j / sqrt(D)`` at full
width (``q`` the query token of the pooling rule: [CLS] or the last real token), student
scores ``q . P_{l,d}(h_j[:d]) / sqrt(D)`` through a learnable bias-free lift, and
``KL(a_student || a_teacher)`` of their softmaxes at the attention temperature over real
tokens. The geometric term is ``1 - CKA(prefix, full)`` over the top-k tokens ranked by
``s``, computed by :class:`mipic_kernels.NestedCKALoss` for every layer in one call.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mipic_kernels import NestedCKALoss


def default_k_fractions(n_truncated: int) -> list[float]:
    """MIPIC's gamma: 0.2, 0.3, ... for the truncated widths in ascending order, capped at 1."""
    return [min(1.0, round(0.2 + 0.1 * i, 10)) for i in range(n_truncated)]


class SIALoss(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        dims: Sequence[int],
        layers: Sequence[int],
        *,
        k_fractions: Optional[Sequence[float]] = None,
        k_min: int = 8,
        attention_temperature: float = 0.05,
        ranking: str = "cls",
        kernel: str = "linear",
        detach_teacher: bool = True,
        backend: str = "auto",
        aggregation: str = "mean",
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.truncated = tuple(d for d in dims if d < hidden_size)
        self.layers = tuple(layers)
        self.attention_temperature = attention_temperature
        self.ranking = ranking
        self.detach_teacher = detach_teacher
        self.aggregation = aggregation
        self.lifts = nn.ModuleDict({
            _key(l, d): nn.Linear(d, hidden_size, bias=False) for l in self.layers for d in self.truncated
        })
        fractions = list(k_fractions) if k_fractions is not None else default_k_fractions(len(self.truncated))
        self.cka = NestedCKALoss(
            self.truncated, k=fractions, k_min=k_min, kernel=kernel,
            detach_full=detach_teacher, backend=backend,
        ) if self.truncated else None

    def forward(
        self, hidden: Sequence[torch.Tensor], mask: torch.Tensor, query: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(attention, cka)`` losses from per-layer states ``hidden[l] (B, T, D)``, the
        real-token ``mask (B, T)`` and the query positions ``(B,)``."""
        states = torch.stack([hidden[l] for l in self.layers])  # (L, B, T, D)
        if not self.truncated:
            zero = states.sum() * 0.0
            return zero, zero
        rows = torch.arange(states.shape[1], device=states.device)
        full = states.float()
        teacher = full.detach() if self.detach_teacher else full
        q = teacher[:, rows, query]  # (L, B, D): the query is always full width
        scale = 1.0 / math.sqrt(self.hidden_size)
        scores = torch.einsum("lbd,lbtd->lbt", q, teacher) * scale
        log_teacher = _masked_log_softmax(scores / self.attention_temperature, mask)

        kl = []
        for i, l in enumerate(self.layers):
            for d in self.truncated:
                lifted = self.lifts[_key(l, d)](full[i, :, :, :d])
                student = torch.einsum("bd,btd->bt", q[i], lifted) * scale
                log_student = _masked_log_softmax(student / self.attention_temperature, mask)
                p_student = torch.where(mask, log_student.exp(), torch.zeros_like(log_student))
                terms = p_student * (log_student - log_teacher[i])
                kl.append(terms.sum(-1).mean())
        kl_all = torch.stack(kl)

        ranking = scores.detach() if self.ranking == "cls" else None
        layer_mask = mask.expand(len(self.layers), *mask.shape)
        gaps = self.cka.per_width(states, scores=ranking, mask=layer_mask)  # mean over layers x batch
        if self.aggregation == "sum":
            return kl_all.sum(), gaps.sum() * len(self.layers)
        return kl_all.mean(), gaps.mean()


def _key(layer: int, width: int) -> str:
    return f"layer{layer}_width{width}"


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over real tokens; 0 (not -inf) at padding, so that no inf - inf
    reaches the backward pass of the KL terms that ignore those positions."""
    log_p = F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(mask, log_p, torch.zeros_like(log_p))
