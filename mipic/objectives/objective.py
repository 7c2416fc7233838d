"""The trainer's objective: the configured term modules and one weighted formula.

``method="mipic"``: ``alpha * L_MRL + (1 - alpha) * (w_att L_att + w_cka L_cka + w_pic L_PIC)``;
``"mrl"``: ``L_MRL``; ``"ese"``: ``L_MRL + w_ese L_ESE``; ``"mta"``:
``alpha * L_MRL + (1 - alpha) * (w_dsa L_DSA + w_hra L_HRA)`` against a frozen teacher. With MIC enabled,
``gamma * (SCR + SIR)`` (each a mean over its layers and the truncated widths) is added to
any of them. The method only decides which terms are built and the formula; ``forward``
runs every built term on the same :class:`~mipic.objectives.terms.EncodedBatch` and
evaluates the formula over their parts; what the terms list in their ``needs`` (token
offsets, attention weights) is asked of the encoder.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..config import ObjectiveConfig, TeacherConfig
from ..distributed import ONE_PROCESS, Ranks
from ..encoder import Encoder
from .ese import ESELoss
from .mic import MICLoss
from .mrl import MRLLoss
from .mta import MTALoss
from .pic import PICLoss
from .sia import SIALoss
from .terms import EncodedBatch, Formula, check_layers, weighted_sum


class Objective(nn.Module):
    """Holds the loss terms (and their learnable parts: SIA lifts, PIC heads) and the formula."""

    def __init__(
        self, cfg: ObjectiveConfig, dims: Sequence[int], hidden_size: int, num_layers: int,
        teacher: Optional[TeacherConfig] = None,
    ) -> None:
        """``teacher`` is loaded for ``method="mta"`` (and required then)."""
        super().__init__()
        dims = list(dims)
        if dims[-1] != hidden_size:
            raise ValueError(f"model.dims must end at the hidden size {hidden_size}; got {dims}")
        # Only the terms in use are checked against the model: a config may keep the
        # settings of the others (e.g. a MIPIC config run with method=mrl).
        if cfg.method == "mipic":
            check_layers("objective.sia.layers", cfg.sia.layers, num_layers)
            check_layers("objective.pic.chain layers", [l for _, l in cfg.pic.chain], num_layers)
            bad_width = [w for w, _ in cfg.pic.chain if w > hidden_size]
            if bad_width:
                raise ValueError(f"objective.pic.chain widths must be <= the hidden size {hidden_size}; got {bad_width}")
        if cfg.method == "ese":
            check_layers("objective.ese.layers", cfg.ese.layers, num_layers)
        if cfg.mic.enabled:
            check_layers("objective.mic.layers", cfg.mic.layers, num_layers)
        if cfg.method == "ese" and not cfg.ese.layers:
            raise ValueError("objective.ese.layers must list at least one layer for method 'ese'")
        self.cfg = cfg
        self.dims = dims
        self.num_layers = num_layers
        truncated = [d for d in dims if d < hidden_size]

        # Built in this order on purpose: it fixes how the new parameters draw from the RNG.
        terms: dict[str, nn.Module] = {"mrl": MRLLoss(dims, cfg.temperature, cfg.mrl_weights)}
        formula: list = [(1.0, "mrl")]
        if cfg.method == "mipic":
            s = cfg.sia
            terms["sia"] = SIALoss(
                hidden_size, dims, s.layers, k_fractions=s.k_fractions, k_min=s.k_min,
                attention_temperature=s.attention_temperature, ranking=s.ranking, kernel=s.kernel,
                detach_teacher=s.detach_teacher, backend=s.backend, aggregation=cfg.aggregation,
            )
            relational: list = [(s.attention_weight, "sia_attention"), (s.cka_weight, "sia_cka")]
            if cfg.pic.chain:
                terms["pic"] = PICLoss(cfg.pic.chain, cfg.temperature, cfg.aggregation)
                relational.append((cfg.pic.weight, "pic"))
            formula = [(cfg.alpha, "mrl"), (1 - cfg.alpha, relational)]
        elif cfg.method == "ese":
            terms["ese"] = ESELoss(dims, cfg.ese.layers, cfg.temperature)
            formula.append((cfg.ese.weight, "ese"))
        elif cfg.method == "mta":
            terms["mta"] = _mta_term(cfg, teacher, hidden_size, num_layers)
            formula = [(cfg.alpha, "mrl"), (1 - cfg.alpha, [(cfg.mta.dsa_weight, "mta_dsa"),
                                                            (cfg.mta.hra_weight, "mta_hra")])]
        if cfg.mic.enabled and truncated:
            c = cfg.mic
            terms["mic"] = MICLoss(hidden_size, dims, c.layers or [num_layers], tau_corr=c.tau_corr,
                                   lambda_var=c.lambda_var, uniformity_t=c.uniformity_t)
            formula.append((c.gamma, [(1.0, "mic_scr"), (1.0, "mic_sir")]))
        self.terms = nn.ModuleDict(terms)
        self.formula: Formula = formula
        self.needs = frozenset().union(*(getattr(term, "needs", ()) for term in terms.values()))

    def forward(
        self, encoder: Encoder, batch: Sequence[tuple[str, ...]], ranks: Ranks = ONE_PROCESS,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of examples (1, 2 or 3 texts each) and its parts (detached).
        Under data parallelism ``batch`` is this process's part and ``ranks`` the processes
        holding the others: the loss and parts are then the whole batch's, on every process."""
        views = len(batch[0])
        columns = [[ex[i] for ex in batch] for i in range(views)]
        if views == 1:  # SimCSE: the same sentences twice; dropout makes the two views differ
            columns = columns * 2
        texts = [t for col in columns for t in col]
        enc = encoder(texts, tokens="tokens" in self.needs, attentions="attentions" in self.needs)
        return self.combine(EncodedBatch(
            enc.hidden, enc.mask, views=len(columns), pooling=encoder.pooling,
            texts=texts if "tokens" in self.needs else None, words=enc.words, offsets=enc.offsets,
            attentions=enc.attentions, ranks=ranks,
        ))

    def combine(self, batch: EncodedBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every term on ``batch``, the formula over their parts, and everything to log (detached)."""
        parts: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        for term in self.terms.values():
            out = term(batch)
            parts.update(out.parts)
            logs.update(out.details)
            logs.update(out.parts)
        loss = weighted_sum(self.formula, parts)
        logs["loss"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}


def _mta_term(cfg: ObjectiveConfig, teacher: Optional[TeacherConfig], hidden_size: int, num_layers: int) -> MTALoss:
    """Load the teacher and build the MTA term."""
    if teacher is None or not teacher.name:
        raise ValueError("teacher.name must name the teacher (a hub name or local folder) for objective.method mta")
    a = cfg.mta
    encoder = Encoder.from_pretrained(
        teacher.name, teacher.pooling, teacher.max_length, what="teacher.name",
        attn_implementation="eager" if a.span_weights == "attention" else None,
    )
    return MTALoss(
        encoder, hidden_size, num_layers, layers=a.layers, phrase_from=a.phrase_from,
        phrase_max_words=a.phrase_max_words, distance=a.distance, beta=a.beta, hra_layers=a.hra_layers,
        hra_loss=a.hra_loss, span_weights=a.span_weights, weight_temperature=a.weight_temperature, backend=a.backend,
    )
