"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator with a fresh seed per test (MIPIC_TEST_SEED pins it); the seed is
    printed so that a failure can be replayed."""
    seed = int(os.environ.get("MIPIC_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"{request.node.nodeid}: MIPIC_TEST_SEED={seed}")
    return torch.Generator().manual_seed(seed)
