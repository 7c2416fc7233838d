"""Random inputs for the span relation tests: two sides with different token counts and
widths, spans of 1 to 3 tokens at random places, padding, and entries with 0, 1 or
many spans."""

from __future__ import annotations

from typing import NamedTuple

import torch

from tests.seeding import generator


class RelationInputs(NamedTuple):
    x: torch.Tensor          # (*, T, Dx)
    y: torch.Tensor          # (*, U, Dy)
    spans_x: torch.Tensor    # (*, T) int64, -1 outside spans
    spans_y: torch.Tensor    # (*, U)
    weights_x: torch.Tensor  # (*, T) > 0 in spans (a few exact zeros inside spans with other tokens)
    weights_y: torch.Tensor  # (*, U)


def _assign(n: int, tokens: int, gen: torch.Generator, shuffled: bool) -> torch.Tensor:
    """Span ids for ``tokens`` positions: position 0 (a [CLS]) in none, then ``n`` runs
    of 1 to 3 tokens (gaps of none between some), ids in position order or shuffled."""
    ids = torch.full((tokens,), -1, dtype=torch.int64)
    lengths = torch.randint(1, 4, (n,), generator=gen)
    while int(lengths.sum()) + 1 > tokens:
        lengths[int(torch.argmax(lengths))] -= 1
    labels = torch.randperm(n, generator=gen) if shuffled else torch.arange(n)
    position = 1
    spare = tokens - 1 - int(lengths.sum())
    for label, length in zip(labels.tolist(), lengths.tolist()):
        if spare > 0 and bool(torch.rand((), generator=gen) < 0.3):
            position += 1
            spare -= 1
        ids[position:position + length] = label
        position += length
    return ids


def relation_inputs(
    lead: tuple[int, ...] = (2, 3), tokens: tuple[int, int] = (13, 11), widths: tuple[int, int] = (37, 20),
    *, counts: tuple[int, ...] = (0, 1, 2, 5, 7, 10), seed: int = 0, offset: float = 3.0,
) -> RelationInputs:
    """Entries take their span counts from ``counts`` in turn (capped by the shorter side);
    every third entry has its span ids shuffled. States are a common offset of
    ``offset`` standard deviations plus unit noise, like hidden states; padding holds 1e3."""
    gen = generator(seed)
    entries = int(torch.tensor(lead).prod()) if lead else 1
    t, u = tokens
    spans_x, spans_y = [], []
    for e in range(entries):
        n = min(counts[e % len(counts)], t - 1, u - 1)
        spans_x.append(_assign(n, t, gen, shuffled=e % 3 == 2))
        spans_y.append(_assign(n, u, gen, shuffled=e % 3 == 2))
    spans_x = torch.stack(spans_x).reshape(*lead, t)
    spans_y = torch.stack(spans_y).reshape(*lead, u)
    sides = []
    for spans, width, k in ((spans_x, widths[0], 1), (spans_y, widths[1], 2)):
        states = torch.randn(*spans.shape, width, generator=generator(seed + 10 * k), dtype=torch.float64)
        states = states + offset * torch.randn(width, generator=generator(seed + 10 * k + 1), dtype=torch.float64)
        states = torch.where(spans[..., None] >= 0, states, torch.full_like(states, 1e3))
        weights = 0.1 + 2 * torch.rand(spans.shape, generator=generator(seed + 10 * k + 2), dtype=torch.float64)
        # A zero weight on a token that shares its span with another token.
        shares = torch.zeros_like(spans, dtype=torch.bool)
        shares[..., 1:] = (spans[..., 1:] == spans[..., :-1]) & (spans[..., 1:] >= 0)
        weights = torch.where(shares & (torch.rand(spans.shape, generator=gen, dtype=torch.float64) < 0.2), 0.0,
                              weights)
        sides.append((states, weights))
    (x, wx), (y, wy) = sides
    return RelationInputs(x, y, spans_x, spans_y, wx, wy)
