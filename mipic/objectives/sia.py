"""L_SIA: self-distilled attention (KL) and nested top-k CKA alignment at chosen layers.

At layer ``l`` and truncated width ``d``: teacher scores ``s_j = q . h_j / sqrt(D)`` at full
width (``q`` the query token of the pooling rule: [CLS] or the last real token), student
scores ``q . P_{l,d}(h_j[:d]) / sqrt(D)`` through a learnable bias-free lift, and
``KL(a_student || a_teacher)`` of their softmaxes at the attention temperature over real
tokens. The geometric term is ``1 - CKA(prefix, full)`` over the top-k tokens ranked by
``s``, computed by :class:`mipic_kernels.NestedCKALoss` for every layer in one call.

The two halves are one module because they share their inputs: the CKA term ranks the
tokens by the attention term's teacher scores, over the same stacked layers. Either half
can be switched off (``attention=False`` builds no lifts).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mipic_kernels import NestedCKALoss

from ..distributed import ONE_PROCESS, Ranks
from . import citations
from .terms import EncodedBatch, TermOutput, loss_dtype

AGGREGATIONS = ("mean", "sum")
RANKINGS = ("cls", "position")


def default_k_fractions(n_truncated: int) -> list[float]:
    """MIPIC's gamma: 0.2, 0.3, ... for the truncated widths in ascending order, capped at 1."""
    return [min(1.0, round(0.2 + 0.1 * i, 10)) for i in range(n_truncated)]


class SIALoss(nn.Module):
    """Self-distilled intra-relational alignment of every truncated width with the full width.

    Args:
        hidden_size: the full width ``D``; widths of ``dims`` below it are aligned.
        dims: strictly increasing Matryoshka widths.
        layers: layer numbers (1 = the first transformer layer).
        attention: compute the attention term (learnable lifts per layer and width).
        cka: compute the nested top-k CKA term.
        k_fractions: one token fraction per truncated width (default 0.2, 0.3, ...).
        k_min: the least number of tokens per width (capped at the sentence length).
        attention_temperature: softmax temperature of both attention distributions.
        ranking: ``"cls"`` (by the teacher scores) or ``"position"`` (the first tokens).
        kernel: ``"linear"`` or ``"rbf"`` CKA.
        detach_teacher: no gradient reaches the full width (self-distillation).
        backend: ``mipic_kernels`` backend, ``"auto"``, ``"torch"`` or ``"triton"``.
        aggregation: ``"mean"`` or ``"sum"`` over the (layer, width) terms.

    Parts: ``sia_attention`` and ``sia_cka`` (those switched on).
    """

    def __init__(
        self,
        hidden_size: int,
        dims: Sequence[int],
        layers: Sequence[int],
        *,
        attention: bool = True,
        cka: bool = True,
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
        if not layers:
            raise ValueError("layers must list at least one layer")
        if not (attention or cka):
            raise ValueError("switch on attention, cka or both")
        if ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}; got {ranking!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}; got {aggregation!r}")
        if not attention_temperature > 0:
            raise ValueError(f"attention_temperature must be > 0; got {attention_temperature!r}")
        self.hidden_size = hidden_size
        self.dims = tuple(dims)
        self.truncated = tuple(d for d in dims if d < hidden_size)
        self.layers = tuple(layers)
        self.use_attention = attention
        self.k_fractions = (list(k_fractions) if k_fractions is not None
                            else default_k_fractions(len(self.truncated)))
        self.k_min = k_min
        self.attention_temperature = attention_temperature
        self.ranking = ranking
        self.kernel = kernel
        self.detach_teacher = detach_teacher
        self.backend = backend
        self.aggregation = aggregation
        self.lifts = nn.ModuleDict({
            _key(l, d): nn.Linear(d, hidden_size, bias=False) for l in self.layers for d in self.truncated
        }) if attention else None
        self.cka = NestedCKALoss(
            self.truncated, k=self.k_fractions, k_min=k_min, kernel=kernel,
            detach_full=detach_teacher, backend=backend,
        ) if cka and self.truncated else None
        self.use_cka = cka

    def per_term(
        self, hidden: Sequence[torch.Tensor], mask: torch.Tensor, query: torch.Tensor, ranks: Ranks = ONE_PROCESS,
    ) -> dict[str, torch.Tensor]:
        """The switched-on terms from per-layer states ``hidden[l] (B, T, D)`` (indexed by
        layer number), the real-token ``mask (B, T)`` and the query positions ``(B,)``.
        Under data parallelism (``ranks``) the means run over every process's examples."""
        states = torch.stack([hidden[l] for l in self.layers])  # (L, B, T, D)
        if not self.truncated:
            zero = states.sum() * 0.0
            return {name: zero for name, on in (("sia_attention", self.use_attention), ("sia_cka", self.use_cka)) if on}
        rows = torch.arange(states.shape[1], device=states.device)
        full = states.to(loss_dtype(states))
        teacher = full.detach() if self.detach_teacher else full
        q = teacher[:, rows, query]  # (L, B, D): the query is always full width
        scale = 1.0 / math.sqrt(self.hidden_size)
        scores = torch.einsum("lbd,lbtd->lbt", q, teacher) * scale
        out = {}
        if self.lifts is not None:
            log_teacher = _masked_log_softmax(scores / self.attention_temperature, mask)
            kl = []
            for i, l in enumerate(self.layers):
                for d in self.truncated:
                    lift = self.lifts[_key(l, d)]
                    lifted = lift(full[i, :, :, :d].to(lift.weight.dtype)).to(full.dtype)
                    student = torch.einsum("bd,btd->bt", q[i], lifted) * scale
                    log_student = _masked_log_softmax(student / self.attention_temperature, mask)
                    p_student = torch.where(mask, log_student.exp(), torch.zeros_like(log_student))
                    terms = p_student * (log_student - log_teacher[i])
                    kl.append(terms.sum())
            kl_all = ranks.mean(torch.stack(kl), states.shape[1])
            out["sia_attention"] = kl_all.sum() if self.aggregation == "sum" else kl_all.mean()
        if self.cka is not None:
            ranking = scores.detach() if self.ranking == "cls" else None
            layer_mask = mask.expand(len(self.layers), *mask.shape)
            # the mean over layers x every process's examples
            gaps = self.cka.per_width(states, scores=ranking, mask=layer_mask,
                                      sum_over_processes=ranks.sum_over_processes)
            out["sia_cka"] = gaps.sum() * len(self.layers) if self.aggregation == "sum" else gaps.mean()
        return out

    def forward(self, batch: EncodedBatch) -> TermOutput:
        states = {l: batch.anchor_states(l) for l in self.layers}
        parts = self.per_term(states, batch.anchor_mask, batch.query, batch.ranks)
        return TermOutput(sum(parts.values()), parts, {})

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size, "dims": list(self.dims), "layers": list(self.layers),
            "attention": self.use_attention, "cka": self.use_cka, "k_fractions": self.k_fractions, "k_min": self.k_min,
            "attention_temperature": self.attention_temperature, "ranking": self.ranking, "kernel": self.kernel,
            "detach_teacher": self.detach_teacher, "backend": self.backend, "aggregation": self.aggregation,
        }

    @property
    def citation(self) -> str:
        return citations.MIPIC


def _key(layer: int, width: int) -> str:
    return f"layer{layer}_width{width}"


def _masked_log_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Log-softmax over real tokens; 0 (not -inf) at padding, so that no inf - inf
    reaches the backward pass of the KL terms that ignore those positions."""
    log_p = F.log_softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.where(mask, log_p, torch.zeros_like(log_p))
