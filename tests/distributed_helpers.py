"""Work run in spawned processes by the distributed tests: a light module, so that each
spawned process imports torch and the code under test only."""

from __future__ import annotations

import socket
from typing import Callable

import torch
import torch.distributed as dist

from mipic.distributed import average_gradients_across_ranks


def spawn(target: Callable, args_of_rank: Callable[[int], tuple], world: int = 2, timeout: float = 300) -> None:
    """Run ``target(*args_of_rank(rank))`` in ``world`` spawned processes and wait for
    every one to succeed."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(rank)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * world


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


# ------------------------------------------------------------------ the trainer on several processes

def step_gradients(cfg_dict: dict, batches: list, ranks, local_terms: bool = False) -> dict:
    """The logged parts and every parameter's full gradient after one optimiser step's
    forward and backward (``batches``: its micro-batches, whole) on the processes of
    ``ranks``; ``local_terms`` computes the terms on this process's rows alone."""
    from mipic.config import config_from_dict
    from mipic.distributed import ONE_PROCESS
    from mipic.train import accumulate_gradients, build_modules

    cfg = config_from_dict(cfg_dict)
    torch.manual_seed(cfg.train.seed)  # the objective's new parameters, as the trainer draws them
    module, wrapped = build_modules(cfg, torch.device("cpu"), ranks, dtype=torch.float64)
    if local_terms:
        module.ranks = ONE_PROCESS
    parts = accumulate_gradients(wrapped, ranks, batches)
    grads = {}
    for name, p in module.named_parameters():
        if p.grad is not None:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name] = grad.detach().clone()
    model = module.encoder.model
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # the name since transformers 5.23
    checkpointing = model.is_gradient_checkpointing if checkpointing is None else checkpointing
    return {"parts": parts, "grads": grads, "checkpointing": checkpointing}


def work_on_ranks(rank: int, world: int, store: str, cases: dict, out: str, runs: list) -> None:
    """On ``world`` gloo processes: :func:`step_gradients` of every case (rank 0 saves
    them to ``out``), then every run of ``runs``, ``(config, output, resume, port)``, as
    ``torchrun`` would start ``mipic train`` (one spawn for all: starting processes that
    import torch and transformers is the slow part)."""
    import os

    from mipic.config import config_from_dict
    from mipic.distributed import Ranks
    from mipic.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ranks = Ranks(dist.group.WORLD)
    results = {name: step_gradients(case["config"], case["batches"], ranks, case.get("local_terms", False))
               for name, case in cases.items()}
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()
    for cfg, output, resume, port in runs:
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                           "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        train(config_from_dict(cfg), output, resume=resume)
