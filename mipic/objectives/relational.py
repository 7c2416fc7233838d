"""MIPIC's relational terms (and optionally MIC's) for any model's hidden states.

:class:`RelationalLoss` is what the sentence-transformers loss and the transformers
``Trainer`` integration add to their base loss: the nested top-k CKA and attention
halves of SIA, the PIC chain and MIC's regularisers, built from the same term modules
as the ``mipic`` trainer, returned as weighted components by name.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
from torch import nn

from . import citations
from .mic import MICLoss
from .pic import PICLoss
from .sia import SIALoss
from .terms import EncodedBatch, check_layers


class RelationalLoss(nn.Module):
    """Weighted MIPIC (and MIC) relational terms of one batch of token states.

    ``forward(batch)`` returns ``{name: weight * value}`` for every term with a positive
    weight: ``sia_cka``, ``sia_attention``, ``pic``, ``mic_scr``, ``mic_sir``. Their sum
    is the loss to add to a base loss; each entry is differentiable, so a trainer that
    sums a dict of components (``SentenceTransformerTrainer``) logs each.

    Args:
        hidden_size: the model's width ``D`` (the full width, the teacher).
        num_layers: the model's number of transformer layers.
        matryoshka_dims: the Matryoshka widths, in any order; those below ``hidden_size``
            are aligned with the full width (at least one must be).
        layers: layer numbers for SIA (1 = the first transformer layer; default: every
            layer). MIPIC uses every layer of 6-layer models and 7 spread layers of
            deeper ones (e.g. 2, 4, 6, 8, 9, 10, 12 for BERT-base).
        cka_weight: weight of the nested top-k CKA term (0 = off).
        attention_weight: weight of the self-distilled attention term (0 = off; on, it
            adds a learnable lift per layer and truncated width).
        pic_chain: ``[(width, layer), ...]`` for progressive information chaining
            (None = off); each link adds a small MLP.
        pic_weight: weight of the PIC term.
        mic_weight: weight of MIC's ``SCR + SIR`` (0 = off).
        mic_layers: layers for MIC (default: the last).
        k_fractions: SIA's token fraction per truncated width, ascending widths
            (default 0.2, 0.3, ..., capped at 1).
        k_min: the least number of tokens per width.
        kernel: ``"linear"`` or ``"rbf"`` CKA.
        ranking: ``"cls"`` (tokens ranked by the teacher attention) or ``"position"``.
        attention_temperature: SIA's softmax temperature (the paper's 0.05 lets the
            attention term swamp the others; 1.0 is the measured default of the
            ``mipic`` recipes).
        temperature: PIC's InfoNCE temperature.
        aggregation: ``"mean"`` or ``"sum"`` over SIA's (layer, width) terms and PIC's links.
        detach_teacher: no gradient reaches the full width through SIA.
        backend: ``mipic_kernels`` backend for the CKA: ``"auto"``, ``"torch"`` or ``"triton"``.
        tau_corr, lambda_var, uniformity_t: MIC's settings.
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        matryoshka_dims: Sequence[int],
        *,
        layers: Optional[Sequence[int]] = None,
        cka_weight: float = 1.0,
        attention_weight: float = 0.0,
        pic_chain: Optional[Sequence[Sequence[int]]] = None,
        pic_weight: float = 1.0,
        mic_weight: float = 0.0,
        mic_layers: Optional[Sequence[int]] = None,
        k_fractions: Optional[Sequence[float]] = None,
        k_min: int = 8,
        kernel: str = "linear",
        ranking: str = "cls",
        attention_temperature: float = 1.0,
        temperature: float = 0.05,
        aggregation: str = "mean",
        detach_teacher: bool = True,
        backend: str = "auto",
        tau_corr: float = 0.1,
        lambda_var: float = 1.0,
        uniformity_t: float = 2.0,
    ) -> None:
        super().__init__()
        dims = sorted({int(d) for d in matryoshka_dims})
        if not dims or dims[0] < 1 or dims[-1] > hidden_size or dims[0] >= hidden_size:
            raise ValueError(f"matryoshka_dims must be widths in [1, {hidden_size}] (the hidden size), at least one "
                             f"below it; got {list(matryoshka_dims)!r}")
        for name, weight in (("cka_weight", cka_weight), ("attention_weight", attention_weight),
                             ("pic_weight", pic_weight), ("mic_weight", mic_weight)):
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {weight!r}")
        layers = list(range(1, num_layers + 1)) if layers is None else list(layers)
        check_layers("layers", layers, num_layers)
        self.hidden_size, self.num_layers, self.dims = hidden_size, num_layers, dims
        self.config = {
            "matryoshka_dims": dims, "layers": layers, "cka_weight": cka_weight,
            "attention_weight": attention_weight, "pic_chain": None if pic_chain is None else [list(c) for c in pic_chain],
            "pic_weight": pic_weight, "mic_weight": mic_weight, "mic_layers": mic_layers, "k_fractions": k_fractions,
            "k_min": k_min, "kernel": kernel, "ranking": ranking, "attention_temperature": attention_temperature,
            "temperature": temperature, "aggregation": aggregation, "detach_teacher": detach_teacher,
            "backend": backend, "tau_corr": tau_corr, "lambda_var": lambda_var, "uniformity_t": uniformity_t,
        }
        self.weights: dict[str, float] = {}
        terms: dict[str, nn.Module] = {}
        if cka_weight > 0 or attention_weight > 0:
            truncated = [d for d in dims if d < hidden_size]
            if k_fractions is not None and len(k_fractions) != len(truncated):
                raise ValueError(f"k_fractions must have one entry per width below the hidden size "
                                 f"({len(truncated)}: {truncated}); got {list(k_fractions)!r}")
            terms["sia"] = SIALoss(
                hidden_size, dims, layers, attention=attention_weight > 0, cka=cka_weight > 0,
                k_fractions=k_fractions, k_min=k_min, attention_temperature=attention_temperature, ranking=ranking,
                kernel=kernel, detach_teacher=detach_teacher, backend=backend, aggregation=aggregation,
            )
            self.weights.update({"sia_cka": cka_weight, "sia_attention": attention_weight})
        if pic_chain is not None and pic_weight > 0:
            check_layers("pic_chain layers", [l for _, l in pic_chain], num_layers)
            if any(w > hidden_size for w, _ in pic_chain):
                raise ValueError(f"pic_chain widths must be <= the hidden size {hidden_size}; got {list(pic_chain)!r}")
            terms["pic"] = PICLoss(pic_chain, temperature, aggregation)
            self.weights["pic"] = pic_weight
        if mic_weight > 0:
            mic_layers = [num_layers] if mic_layers is None else list(mic_layers)
            check_layers("mic_layers", mic_layers, num_layers)
            terms["mic"] = MICLoss(hidden_size, dims, mic_layers, tau_corr=tau_corr, lambda_var=lambda_var,
                                   uniformity_t=uniformity_t)
            self.weights.update({"mic_scr": mic_weight, "mic_sir": mic_weight})
        self.terms = nn.ModuleDict(terms)

    def forward(self, batch: EncodedBatch) -> dict[str, torch.Tensor]:
        """``{name: weight * value}`` of every term on ``batch`` (empty when every weight is 0)."""
        components: dict[str, torch.Tensor] = {}
        for term in self.terms.values():
            for name, value in term(batch).parts.items():
                components[name] = self.weights[name] * value
        return components

    def get_config_dict(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def citation(self) -> str:
        return citations.MIPIC + (citations.MIC if "mic" in self.terms else "")
