"""Shared test fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# Triton chooses between compiling and interpreting a kernel when the kernel is defined.
# Without CUDA every kernel test runs under the interpreter, so the switch must be set
# before any test module imports triton (sentence-transformers does, through its
# dependencies), or kernels defined before and after it would be of two kinds.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

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
