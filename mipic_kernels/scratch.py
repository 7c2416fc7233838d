"""Buffers kept from one call to the next, for intermediate results without autograd.

On the CPU, an allocation of more than a few hundred KiB is mapped fresh from the
operating system and faults in page by page when first written; at 64 rows per
minibatch that took as long as the arithmetic (a 688 KiB difference of features:
53 us against 21 us once its pages were reused). An accumulator that sees many
minibatches of similar shapes keeps its largest intermediates in a :class:`Scratch`,
up to ``KEEP_BYTES`` each: larger ones are allocated afresh, where the arithmetic on
them outweighs the page faults and keeping them would raise the memory held between
calls.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

KEEP_BYTES = 8 * 2**20


class Scratch:
    """Named buffers, each grown to the largest size asked for (up to ``KEEP_BYTES``)
    and then reused.

    A tensor from :meth:`take` is overwritten by the next :meth:`take` of the same
    name: it holds intermediates of one call only, filled by ``out=`` or in-place
    operations, which autograd does not follow.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` on ``device`` with unspecified
        contents, backed by the buffer kept under ``name``."""
        size = math.prod(shape)
        if size * dtype.itemsize > KEEP_BYTES:
            return torch.empty(shape, dtype=dtype, device=device)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(size, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer[:size].view(*shape)
