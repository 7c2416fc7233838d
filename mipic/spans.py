"""Semantic units (words, phrases) of a text and the tokens of two tokenizers in each.

MTA aligns a teacher and a student on units of the text, not on tokens: the two models
may split a text differently (other vocabularies, other tokenizers). A unit is a range
of characters of the text; each side's tokens are assigned to units by their character
offsets, so the span ids of the two sides name the same units.

* Words come from the student tokenizer's word ids (subwords of one word form one word)
  and their character offsets. Words without a letter or digit (punctuation) are left out.
* Phrases, by an offline rule (no parser, no download): words are read left to right and
  a new phrase starts

  1. before a function word (a determiner, preposition, conjunction, auxiliary or
     pronoun of :data:`PHRASE_BREAK_WORDS`), unless the phrase so far holds only function
     words ("in the park" stays one phrase);
  2. after punctuation (a comma, colon, bracket, ... between two words);
  3. when the phrase already holds ``max_words`` words.

  "A man is playing a guitar." gives [A man] [is playing] [a guitar]. The word list is
  English; for other languages rules 2 and 3 still apply.
* Alignment: a token of either side whose characters overlap several units merges them
  into one (a teacher token "don't" over the student words "don" and "t"); a unit left
  without a token on either side (cut off by one side's maximum length) is dropped. The
  remaining units are numbered ``0 .. n-1`` in text order on both sides.
"""

from __future__ import annotations

import bisect
from typing import Optional, Sequence

import torch

GRANULARITIES = ("word", "phrase")

PHRASE_BREAK_WORDS = frozenset("""
a an the this that these those my your his her its our their some any no every each all both either neither
of in on at by for with about against between into through during before after above below to from up down
over under again across along around behind beside beyond near off onto toward towards upon within without
and or but nor so yet because although though while whereas if unless until since than as whether
is are was were be been being am do does did have has had having will would shall should can could may might
must i you he she it we they me him us them who whom whose which what where when why how there here
isn aren wasn weren don doesn didn hasn haven hadn won wouldn couldn shouldn can't won't
""".split())

_PUNCTUATION_BREAKS = frozenset(",;:.!?()[]{}\"")

Range = tuple[int, int]


def word_ranges(word_ids: Sequence[Optional[int]], offsets: Sequence[Range], text: str) -> list[Range]:
    """Character ranges of the words of one tokenized text, in text order: each word id's
    tokens from the first start to the last end; words without a letter or digit are
    left out."""
    spans: dict[int, list[int]] = {}
    for word, (start, end) in zip(word_ids, offsets):
        if word is None or end <= start:
            continue
        if word in spans:
            spans[word][0] = min(spans[word][0], start)
            spans[word][1] = max(spans[word][1], end)
        else:
            spans[word] = [start, end]
    ranges = sorted((s, e) for s, e in spans.values())
    return [(s, e) for s, e in ranges if any(c.isalnum() for c in text[s:e])]


def phrase_ranges(words: Sequence[Range], text: str, max_words: int = 4) -> list[Range]:
    """Character ranges of the phrases of ``words`` (see the module's rule)."""
    if max_words < 1:
        raise ValueError(f"max_words must be an int >= 1; got {max_words!r}")
    phrases: list[list[Range]] = []
    content = False  # the current phrase holds a word that is not a function word
    for i, (start, end) in enumerate(words):
        function = text[start:end].lower() in PHRASE_BREAK_WORDS
        punctuated = i > 0 and any(c in _PUNCTUATION_BREAKS for c in text[words[i - 1][1]:start])
        if not phrases or punctuated or len(phrases[-1]) >= max_words or (function and content):
            phrases.append([])
            content = False
        phrases[-1].append((start, end))
        content = content or not function
    return [(p[0][0], p[-1][1]) for p in phrases]


def align_units(units: Sequence[Range], *sides: Sequence[Range]) -> list[list[int]]:
    """Span ids of every token of each side (``-1``: in no unit) for the sorted, disjoint
    character ``units``; ``sides`` are each side's token offsets (empty ranges, e.g. of
    special and padding tokens, belong to no unit). Units straddled by one token are
    merged; units without a token on every side are dropped; ids are ``0 .. n-1``."""
    ends = [e for _, e in units]
    merge_next = [False] * max(len(units) - 1, 0)
    hits: list[list[Optional[int]]] = []
    for offsets in sides:
        side_hits: list[Optional[int]] = []
        for start, end in offsets:
            first = bisect.bisect_right(ends, start) if end > start else len(units)
            last = first
            while last + 1 < len(units) and units[last + 1][0] < end:
                last += 1
            if first < len(units) and units[first][0] < end:
                for u in range(first, last):
                    merge_next[u] = True
                side_hits.append(first)
            else:
                side_hits.append(None)
        hits.append(side_hits)
    group = [0] * len(units)
    for u in range(1, len(units)):
        group[u] = group[u - 1] + (not merge_next[u - 1])
    n_groups = group[-1] + 1 if units else 0
    covered = [set() for _ in sides]
    for side, side_hits in enumerate(hits):
        covered[side].update(group[u] for u in side_hits if u is not None)
    kept = sorted(set.intersection(*covered)) if sides else list(range(n_groups))
    number = {g: i for i, g in enumerate(kept)}
    return [[-1 if u is None else number.get(group[u], -1) for u in side_hits] for side_hits in hits]


def batch_spans(
    texts: Sequence[str],
    words: torch.Tensor,
    offsets: torch.Tensor,
    teacher_offsets: torch.Tensor,
    *,
    granularity: str,
    max_words: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span ids of the student's tokens ``(B, T)`` and of the teacher's ``(B, U)``.

    ``words (B, T)``: the student tokenizer's word id of each token (``-1`` for special
    and padding tokens); ``offsets (B, T, 2)`` and ``teacher_offsets (B, U, 2)``: each
    token's character range in its text of ``texts`` (``(0, 0)`` for special and padding
    tokens). Units are the student's words (``granularity="word"``) or their phrases
    (``"phrase"``, at most ``max_words`` words each). Returned on the devices of
    ``words`` and ``teacher_offsets``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}; got {granularity!r}")
    student = torch.full(words.shape, -1, dtype=torch.int64)
    teacher = torch.full(teacher_offsets.shape[:2], -1, dtype=torch.int64)
    word_rows, offset_rows, teacher_rows = words.tolist(), offsets.tolist(), teacher_offsets.tolist()
    for b, text in enumerate(texts):
        ids = [None if w < 0 else w for w in word_rows[b]]
        units = word_ranges(ids, offset_rows[b], text)
        if granularity == "phrase":
            units = phrase_ranges(units, text, max_words)
        mine, theirs = align_units(units, [tuple(o) for o in offset_rows[b]], [tuple(o) for o in teacher_rows[b]])
        student[b] = torch.tensor(mine, dtype=torch.int64)
        teacher[b] = torch.tensor(theirs, dtype=torch.int64)
    return student.to(words.device), teacher.to(teacher_offsets.device)
