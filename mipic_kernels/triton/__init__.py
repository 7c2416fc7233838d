"""Fused Triton backend (not implemented yet): same internal signatures as
:mod:`mipic_kernels.reference`."""

from __future__ import annotations

import torch


def preferred_for(x: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` picks this backend for ``x``."""
    return False


def check_usable(x: torch.Tensor) -> None:
    """Raise if ``backend="triton"`` cannot run on ``x``."""
    raise NotImplementedError("backend='triton' is not implemented yet; use backend='torch'")
