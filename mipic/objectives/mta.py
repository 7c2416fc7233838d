"""L_MTA: Multi-Granular Trajectory Alignment with a frozen teacher (docs/method.md, MTA).

The term owns the teacher: an :class:`~mipic.encoder.Encoder` with its own tokenizer,
frozen (eval mode, no gradient), held outside the module tree so that it is neither
optimised nor saved with the objective's state; moving the term (``.to(device)``) moves
it too. It encodes the batch's anchor texts itself, so the trainer needs nothing but
the texts and the student's token offsets (the term's ``needs``).

At each mapped layer pair (student ``l_s``, teacher ``l_t``), on the units of the text
(words at student layers below ``phrase_from``, phrases from it on; see
:mod:`mipic.spans`), each side's tokens are pooled with span weights derived from the
model at that layer:

* DSA (Dynamic Structural Alignment): the distance between the two sides' span
  cosine-distance matrices, :func:`mipic_kernels.span_relation_distance`, for every
  (layer pair, example) entry in one call; the mean over the defined entries of each
  pair (examples with 2 spans or more), then over pairs.
* HRA (Hidden Representation Alignment): a learned linear projection per chosen pair
  (student width -> teacher width) of the student's pooled spans against the teacher's,
  ``mse`` (mean squared error per feature) or ``cosine`` (``1 - cos``), averaged over the
  real spans, then over pairs.

Span weights (constants: no gradient flows through them): ``"query"`` the softmax, within
each span, of every token's scaled dot product ``q . h_t / sqrt(D) / temperature`` with
the sentence's pooled state ``q`` at that layer; ``"attention"`` the attention the pooling
token pays each token at that layer (the mean over real query tokens for mean pooling),
averaged over heads, raised to ``1 / temperature`` (both models run eager attention);
``"uniform"`` the plain mean.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mipic_kernels import pool_spans, span_relation_distance
from mipic_kernels.relation import span_counts

from ..encoder import Encoder, pool, query_positions
from ..spans import batch_spans
from . import citations
from .terms import EncodedBatch, TermOutput, check_layers

SPAN_WEIGHTS = ("query", "attention", "uniform")
HRA_LOSSES = ("mse", "cosine")


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Every student layer ``l`` with the teacher layer ``round(l * Lt / Ls)`` (halves up)."""
    return [(l, max(1, (2 * l * teacher_layers + student_layers) // (2 * student_layers)))
            for l in range(1, student_layers + 1)]


class MTALoss(nn.Module):
    """DSA and HRA of a student against a frozen teacher along their layers.

    Args:
        teacher: the teacher encoder (frozen here; its tokenizer may differ from the student's).
        hidden_size: the student's width.
        num_layers: the student's layer count.
        layers: ``(student layer, teacher layer)`` pairs, student layers increasing, teacher
            layers not decreasing; None = :func:`uniform_layer_map`.
        phrase_from: the first student layer aligned on phrases; None = ``num_layers // 2 + 1``.
        phrase_max_words: the longest phrase, in words.
        distance, beta: DSA's distance between relation matrices (``"mse"`` or
            ``"smooth_l1"`` with threshold ``beta``).
        hra_layers: student layers of ``layers`` with HRA; None = all, ``[]`` = none.
        hra_loss: ``"mse"`` or ``"cosine"``.
        span_weights: ``"query"``, ``"attention"`` or ``"uniform"``.
        weight_temperature: the temperature of the span weights.
        backend: the ``mipic_kernels`` backend of DSA.

    Parts: ``mta_dsa`` and ``mta_hra``; details: ``mta_dsa@<student layer>`` and
    ``mta_hra@<student layer>``.
    """

    def __init__(
        self,
        teacher: Encoder,
        hidden_size: int,
        num_layers: int,
        *,
        layers: Optional[Sequence[Sequence[int]]] = None,
        phrase_from: Optional[int] = None,
        phrase_max_words: int = 4,
        distance: str = "mse",
        beta: float = 1.0,
        hra_layers: Optional[Sequence[int]] = None,
        hra_loss: str = "mse",
        span_weights: str = "query",
        weight_temperature: float = 1.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        pairs = uniform_layer_map(num_layers, teacher.num_layers) if layers is None else [
            (int(s), int(t)) for s, t in layers]
        if not pairs:
            raise ValueError("layers must list at least one (student layer, teacher layer) pair")
        check_layers("objective.mta.layers student layers", [s for s, _ in pairs], num_layers)
        check_layers("objective.mta.layers teacher layers", [t for _, t in pairs], teacher.num_layers)
        hra = [s for s, _ in pairs] if hra_layers is None else [int(l) for l in hra_layers]
        unmapped = [l for l in hra if l not in dict(pairs)]
        if unmapped:
            raise ValueError(f"objective.mta.hra_layers must be student layers of the mapping "
                             f"{[s for s, _ in pairs]}; got {unmapped}")
        if span_weights not in SPAN_WEIGHTS:
            raise ValueError(f"span_weights must be one of {SPAN_WEIGHTS}; got {span_weights!r}")
        if hra_loss not in HRA_LOSSES:
            raise ValueError(f"hra_loss must be one of {HRA_LOSSES}; got {hra_loss!r}")
        if not weight_temperature > 0:
            raise ValueError(f"weight_temperature must be > 0; got {weight_temperature!r}")
        # Not a submodule: frozen, out of the optimiser and of the saved state (see _apply).
        object.__setattr__(self, "teacher", teacher)
        teacher.eval().requires_grad_(False)
        self.pairs = pairs
        self.phrase_from = num_layers // 2 + 1 if phrase_from is None else int(phrase_from)
        self.phrase_max_words = int(phrase_max_words)
        self.distance, self.beta, self.backend = distance, float(beta), backend
        self.hra_loss = hra_loss
        self.span_weights = span_weights
        self.weight_temperature = float(weight_temperature)
        self.projections = nn.ModuleDict(
            {f"layer{l}": nn.Linear(hidden_size, teacher.hidden_size) for l in hra})
        self.needs = frozenset({"tokens", "attentions"} if span_weights == "attention" else {"tokens"})

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half() of the objective reach the teacher too.
        self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def granularity(self, student_layer: int) -> str:
        return "phrase" if student_layer >= self.phrase_from else "word"

    def forward(self, batch: EncodedBatch) -> TermOutput:
        if batch.texts is None or batch.words is None or batch.offsets is None:
            raise ValueError("MTALoss needs the batch's texts, word ids and token offsets (EncodedBatch.texts, "
                             ".words, .offsets), which the mipic trainer provides for a term that needs 'tokens'")
        if self.span_weights == "attention" and batch.attentions is None:
            raise ValueError("MTALoss with span_weights='attention' needs the student's attention weights "
                             "(EncodedBatch.attentions)")
        size = batch.batch_size
        texts = list(batch.texts[:size])
        with torch.no_grad():
            teacher = self.teacher(texts, tokens=True, attentions=self.span_weights == "attention")
        spans = {
            g: batch_spans(texts, batch.words[:size].cpu(), batch.offsets[:size].cpu(), teacher.offsets.cpu(),
                           granularity=g, max_words=self.phrase_max_words)
            for g in {self.granularity(s) for s, _ in self.pairs}
        }
        device = batch.mask.device
        sides = {"x": [], "y": [], "spans_x": [], "spans_y": [], "weights_x": [], "weights_y": []}
        for s, t in self.pairs:
            span_x, span_y = (ids.to(device) for ids in spans[self.granularity(s)])
            student = batch.anchor_states(s)
            sides["x"].append(student)
            sides["y"].append(teacher.hidden[t])
            sides["spans_x"].append(span_x)
            sides["spans_y"].append(span_y)
            sides["weights_x"].append(self._weights(student, batch.anchor_mask, span_x, batch.pooling,
                                                    None if batch.attentions is None else batch.attentions[s - 1][:size]))
            sides["weights_y"].append(self._weights(teacher.hidden[t], teacher.mask, span_y, self.teacher.pooling,
                                                    None if teacher.attentions is None else teacher.attentions[t - 1]))
        stacked = {k: torch.stack(v) for k, v in sides.items()}
        max_spans = min(stacked["x"].shape[-2], stacked["y"].shape[-2])
        values = span_relation_distance(
            stacked["x"], stacked["y"], stacked["spans_x"], stacked["spans_y"], weights_x=stacked["weights_x"],
            weights_y=stacked["weights_y"], max_spans=max_spans, distance=self.distance, beta=self.beta,
            backend=self.backend,
        )  # (pairs, B)
        defined = ~torch.isnan(values)
        # Sums over every process's examples (batch.ranks) before dividing: the whole batch's means.
        ranks = batch.ranks
        per_pair = ranks.sum(torch.where(defined, values, 0.0).sum(-1)) / ranks.sum(defined.sum(-1)).clamp(min=1)
        details = {f"mta_dsa@{s}": v for (s, _), v in zip(self.pairs, per_pair)}
        dsa = per_pair.mean()

        hra_terms = []
        for i, (s, _) in enumerate(self.pairs):
            projection = self.projections[f"layer{s}"] if f"layer{s}" in self.projections else None
            if projection is None:
                continue
            counts = span_counts(stacked["spans_x"][i], stacked["spans_y"][i], max_spans)
            student = pool_spans(stacked["x"][i], stacked["spans_x"][i], stacked["weights_x"][i], max_spans=max_spans)
            target = pool_spans(stacked["y"][i], stacked["spans_y"][i], stacked["weights_y"][i], max_spans=max_spans)
            predicted = projection(student.to(projection.weight.dtype))
            if self.hra_loss == "mse":
                gap = (predicted - target.to(predicted.dtype)).square().mean(-1)
            else:
                gap = 1 - F.cosine_similarity(predicted, target.to(predicted.dtype), dim=-1)
            real = (torch.arange(max_spans, device=device) < counts[:, None]).to(gap.dtype)
            term = ranks.sum((gap * real).sum()) / ranks.sum(real.sum()).clamp(min=1)
            details[f"mta_hra@{s}"] = term
            hra_terms.append(term)
        hra = torch.stack(hra_terms).mean() if hra_terms else dsa.new_zeros(())
        return TermOutput(dsa + hra, {"mta_dsa": dsa, "mta_hra": hra}, details)

    @torch.no_grad()
    def _weights(
        self, states: torch.Tensor, mask: torch.Tensor, spans: torch.Tensor, pooling: str,
        attention: Optional[torch.Tensor],
    ) -> torch.Tensor:
        """Token weights ``(B, T)``, each span's largest 1 (only ratios within a span matter)."""
        if self.span_weights == "uniform":
            return torch.ones(spans.shape, device=spans.device, dtype=torch.float32)
        if self.span_weights == "query":
            query = pool(states, mask, pooling).float()
            logits = (states.float() @ query[..., None]).squeeze(-1) / math.sqrt(states.shape[-1])
        else:
            heads = attention.float().mean(1)  # (B, T, T): query token x key token
            if pooling == "mean":
                paid = (heads * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            else:
                paid = heads[torch.arange(heads.shape[0], device=heads.device), query_positions(mask, pooling)]
            logits = paid.clamp(min=torch.finfo(torch.float32).tiny).log()
        logits = logits / self.weight_temperature
        # A softmax within each span: subtract the span's largest logit (T + 1 segments,
        # the last for tokens in no span, so no span count is read from the device).
        segment = torch.where(spans >= 0, spans, spans.shape[-1])
        top = torch.full((spans.shape[0], spans.shape[-1] + 1), -math.inf, device=spans.device)
        top = top.scatter_reduce(1, segment, logits, "amax")
        weights = torch.exp(logits - top.gather(1, segment))
        return torch.where(spans >= 0, weights, 0.0)

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "teacher": getattr(self.teacher.model.config, "_name_or_path", ""),
            "layers": [list(p) for p in self.pairs], "phrase_from": self.phrase_from,
            "phrase_max_words": self.phrase_max_words, "distance": self.distance, "beta": self.beta,
            "hra_layers": [int(k[len("layer"):]) for k in self.projections], "hra_loss": self.hra_loss,
            "span_weights": self.span_weights, "weight_temperature": self.weight_temperature,
            "backend": self.backend,
        }

    @property
    def citation(self) -> str:
        return citations.MTA
