"""Fresh random inputs on every test session, replayable: one session seed, drawn from
the OS unless ``MIPIC_TEST_SEED`` pins it, printed in pytest's header and with every
failing test's output."""

from __future__ import annotations

import os

import torch

SESSION_SEED = int(os.environ.get("MIPIC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def generator(offset: int = 0, device: str = "cpu") -> torch.Generator:
    """A generator seeded with the session seed plus ``offset`` (one stream per input)."""
    return torch.Generator(device=device).manual_seed(SESSION_SEED + offset)
