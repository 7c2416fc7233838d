"""Work run in spawned processes by the distributed tests: a light module, so that each
spawned process imports torch and the code under test only."""

from __future__ import annotations

import torch
import torch.distributed as dist

from mipic.distributed import average_gradients_across_ranks


def accumulated_gradients(rank: int, hooked: bool) -> list[torch.Tensor]:
    """A seeded linear layer's gradients after two backward passes on this rank's inputs."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    if hooked:
        average_gradients_across_ranks(layer)
    for step in range(2):  # gradient accumulation
        layer(torch.full((4, 3), float(rank + 1 + step))).square().sum().backward()
    return [p.grad.clone() for p in layer.parameters()]


def average_on_two_ranks(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.save(accumulated_gradients(rank, hooked=True), out)
    dist.destroy_process_group()
