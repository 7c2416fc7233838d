"""What every objective term reads (:class:`EncodedBatch`) and returns (:class:`TermOutput`),
and how a weighted combination of their parts is evaluated (:func:`weighted_sum`).

Every term is an ``nn.Module`` whose ``forward(batch: EncodedBatch) -> TermOutput``: the
trainer's :class:`~mipic.objectives.Objective`, the sentence-transformers loss and the
transformers ``Trainer`` integration all build an :class:`EncodedBatch` from their own
model outputs and run the same term modules on it. A term that reads more than hidden
states (texts, token offsets, attention weights) names it in its ``needs`` attribute
(:data:`NEEDS`); the trainer's objective then asks its encoder for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

from ..distributed import ONE_PROCESS, Ranks
from ..encoder import pool, query_positions

POOLINGS = ("cls", "mean", "last")
# What a term may list in its ``needs``: ``"tokens"`` (the texts, word ids and character
# offsets) and ``"attentions"``.
NEEDS = ("tokens", "attentions")


@dataclass(frozen=True)
class EncodedBatch:
    """Hidden states of ``views`` encodings of the same ``B`` examples.

    Attributes:
        hidden: one ``(views * B, T, D)`` tensor per layer, index 0 the embedding
            output (a transformers model's ``hidden_states``). The views are stacked
            along the batch: anchors first, then positives (or a second dropout view),
            then hard negatives.
        mask: ``(views * B, T)`` bool, True for real tokens.
        views: 1 (sentences alone), 2 (pairs or two dropout views) or 3 (triplets).
        pooling: ``"cls"``, ``"mean"`` or ``"last"``: how a sentence embedding is read
            from token states, and which token attends (``last``: the last real one,
            otherwise position 0).
        ranks: the processes that hold the other parts of the batch under data
            parallelism (each the same number of examples, in rank order); the terms
            then compute the whole batch's loss on every process. None: one process.
        texts, words, offsets, attentions: what only some terms read (see
            :class:`mipic.encoder.Encoded`), present when a term asks for it through its
            ``needs`` (e.g. MTA encodes the texts with its teacher and aligns the two
            tokenizations by character offsets): the ``views * B`` texts as the
            tokenizer saw them, word ids ``(views * B, T)``, character offsets
            ``(views * B, T, 2)`` and one ``(views * B, heads, T, T)`` attention tensor
            per layer (``attentions[l - 1]`` is layer ``l``).
    """

    hidden: Sequence[torch.Tensor]
    mask: torch.Tensor
    views: int = 1
    pooling: str = "cls"
    ranks: Optional[Ranks] = None
    texts: Optional[Sequence[str]] = None
    words: Optional[torch.Tensor] = None
    offsets: Optional[torch.Tensor] = None
    attentions: Optional[Sequence[torch.Tensor]] = None

    def __post_init__(self) -> None:
        if self.ranks is None:
            object.__setattr__(self, "ranks", ONE_PROCESS)
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {self.pooling!r}")
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool or self.mask.dim() != 2:
            raise ValueError("mask must be a (views * B, T) bool tensor")
        if len(self.hidden) < 2:
            raise ValueError(f"hidden must hold the embedding output and at least one layer; got {len(self.hidden)}")
        expected = tuple(self.mask.shape)
        bad = [i for i, h in enumerate(self.hidden) if h.dim() != 3 or tuple(h.shape[:2]) != expected]
        if bad:
            raise ValueError(f"hidden[{bad[0]}] must have shape {expected} + (D,) like the mask; "
                             f"got {tuple(self.hidden[bad[0]].shape)}")
        if not 1 <= self.views <= 3 or self.mask.shape[0] % self.views:
            raise ValueError(f"views must be 1, 2 or 3 and divide the {self.mask.shape[0]} rows; got {self.views}")

    @property
    def batch_size(self) -> int:
        """The examples of this process's part of the batch."""
        return self.mask.shape[0] // self.views

    @property
    def num_layers(self) -> int:
        return len(self.hidden) - 1

    @property
    def hidden_size(self) -> int:
        return self.hidden[-1].shape[-1]

    @property
    def anchor_mask(self) -> torch.Tensor:
        return self.mask[: self.batch_size]

    @property
    def query(self) -> torch.Tensor:
        """The attending token of each anchor, ``(B,)`` positions."""
        return query_positions(self.anchor_mask, self.pooling)

    def anchor_states(self, layer: int) -> torch.Tensor:
        """``(B, T, D)`` token states of the anchors at ``layer``."""
        return self.hidden[layer][: self.batch_size]

    def anchor_pooled(self, layer: int, pooling: str | None = None) -> torch.Tensor:
        """``(B, D)`` pooled anchors at ``layer`` (by this batch's pooling unless given)."""
        return pool(self.anchor_states(layer), self.anchor_mask, pooling or self.pooling)

    def view_pooled(self, layer: int) -> list[torch.Tensor]:
        """``views`` tensors ``(B, D)``: every view pooled at ``layer``."""
        return list(pool(self.hidden[layer], self.mask, self.pooling).split(self.batch_size))


class TermOutput(NamedTuple):
    """A term's value and its named parts.

    ``loss`` is the sum of ``parts``: the unweighted, differentiable components a
    combination weights by name (e.g. ``sia_attention`` and ``sia_cka``). ``details``
    are diagnostics for logging only (e.g. the InfoNCE of each width).
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    details: dict[str, torch.Tensor]


Formula = Sequence[tuple[float, Union[str, "Formula"]]]


def weighted_sum(formula: Formula, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum of weight * value`` over ``formula``, left to right, where a value is the
    part of that name or, for a nested formula, its own weighted sum (so that
    ``alpha * a + (1 - alpha) * (b + w c)`` is computed as written)."""
    total = None
    for weight, item in formula:
        value = parts[item] if isinstance(item, str) else weighted_sum(item, parts)
        term = value if weight == 1.0 else weight * value
        total = term if total is None else total + term
    if total is None:
        raise ValueError("a formula needs at least one term")
    return total


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of the losses' arithmetic: float64 when an input is float64, else
    float32 (half precision is lifted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_layers(key: str, layers: Sequence[int], num_layers: int) -> None:
    """Layer numbers must lie in ``[1, num_layers]`` (0 is the embedding output)."""
    bad = [l for l in layers if not 1 <= l <= num_layers]
    if bad:
        raise ValueError(f"{key} must be layer numbers in [1, {num_layers}] (the model has {num_layers}); got {bad}")
