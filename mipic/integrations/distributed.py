"""Keeping a loss's own parameters identical on every rank under data parallelism.

Trainers wrap the model in ``DistributedDataParallel`` but not the loss: the learnable
parts of a loss (SIA lifts, PIC heads) would get each rank's own gradient and drift
apart. These hooks average such gradients over the ranks as soon as backward has
accumulated them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients_across_ranks(module: nn.Module) -> list:
    """Hook every trainable parameter of ``module`` so that its accumulated gradient is
    the mean over the ranks. Returns the hook handles (``handle.remove()`` undoes them).

    With gradient accumulation the mean is taken after every backward; since the mean is
    linear, the accumulated gradient is still the mean over ranks of the local sums.
    """
    return [p.register_post_accumulate_grad_hook(_average_over_ranks)
            for p in module.parameters() if p.requires_grad]


def _average_over_ranks(param: torch.Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())
