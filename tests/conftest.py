"""Shared test fixtures."""

from __future__ import annotations

import pytest
import torch

from tests.seeding import SESSION_SEED, generator


def pytest_report_header(config) -> str:
    return f"MIPIC_TEST_SEED={SESSION_SEED} (set it to replay this session's random inputs)"


@pytest.fixture(autouse=True)
def _print_seed(request):
    # Captured output is shown only for failing tests: the seed that replays them.
    print(f"{request.node.nodeid}: MIPIC_TEST_SEED={SESSION_SEED}")


@pytest.fixture
def gen() -> torch.Generator:
    """A generator seeded from the session seed."""
    return generator()
