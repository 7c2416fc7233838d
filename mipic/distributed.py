"""Processes that train one model together: joining the process group ``torchrun``
describes, what the objective terms need across processes (gathering rows, summing),
the data each process encodes, and ordering of file work between processes.

The rule that makes N processes equal one process on the concatenated batch: every
process computes the loss of the *whole* batch (the same value on each), with the rows
of other processes reaching it through collectives whose backward sums the gradients of
all processes' losses. Each process's own rows then receive N times the one-process
gradient, and the data-parallel wrapper, which averages gradients over the N processes,
turns that back into the one-process gradient. :class:`Ranks` holds those collectives;
with one process they do nothing.

The hooks of :func:`average_gradients_across_ranks` serve the integrations, whose
trainers wrap the model but not the loss.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")
# What torchrun sets for every process it starts.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Ranks:
    """The processes that split each batch between them, as the objective terms see them.

    ``Ranks()`` is a single process: :meth:`gather` and :meth:`sum` return their input.
    ``Ranks(group)`` spans a process group in which every process holds the same number
    of rows; with a group of one process the collectives are skipped as well.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group) if group is not None else 0
        self.world_size = dist.get_world_size(group) if group is not None else 1

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    def gather(self, rows: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every process's ``rows`` concatenated along ``dim`` in rank order (the rows of
        the whole batch); the gradient of each process's part is the sum over every
        process's loss."""
        if self.world_size == 1:
            return rows
        return _GatherRows.apply(rows, dim, self.group)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes, on every process; the gradient flows
        back to each process's ``values`` (summed over every process's loss)."""
        if self.world_size == 1:
            return values
        return _SumOverRanks.apply(values, self.group)

    @property
    def sum_over_processes(self) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """:meth:`sum` for the ``sum_over_processes`` arguments of :mod:`mipic_kernels`'s
        losses; None for one process."""
        return self.sum if self.world_size > 1 else None

    def mean(self, sums: torch.Tensor, count: int) -> torch.Tensor:
        """The mean over every process's examples, from this process's ``sums`` over its
        own ``count`` examples (the same count on every process)."""
        return self.sum(sums) / (count * self.world_size)

    def shard(self, batch: Sequence[T]) -> list[T]:
        """This process's part of a batch (see :func:`shard`)."""
        return shard(batch, self.rank, self.world_size)

    def barrier(self) -> None:
        """Wait until every process gets here (after a file is written, before it is read)."""
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process (a picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        return box[0]

    def collect(self, value: Any) -> list[Any]:
        """Every process's ``value`` (a picklable object), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value, group=self.group)
        return out

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first, then the others: downloads and caches are filled
        once instead of by every process at the same time."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()


ONE_PROCESS = Ranks()


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, dim: int, group) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        rows = rows.contiguous()
        parts = [torch.empty_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, rows, group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Every process's loss reads every process's rows: sum their gradients, keep ours.
        # An all-reduce rather than a reduce-scatter, which gloo lacks; the rows are
        # pooled embeddings, small next to the model's gradients.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return grad.chunk(world, ctx.dim)[rank], None, None


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        total = values.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def shard(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process ``rank``'s part of a batch: the ``rank``-th of ``world_size`` equal,
    consecutive slices, so that gathering in rank order restores the batch's order."""
    if len(batch) % world_size:
        raise ValueError(f"a batch of {len(batch)} examples cannot be split evenly over {world_size} processes")
    size = len(batch) // world_size
    return list(batch[rank * size:(rank + 1) * size])


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher that sets
    its environment variables)."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun)."""
    return int(os.environ["RANK"]) if launched_by_torchrun() else 0


def local_world_size() -> int:
    """The number of processes on this node (1 outside torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if launched_by_torchrun() else 1


def process_device(device: str) -> torch.device:
    """The device of this process for ``train.device``: under torchrun, ``auto`` and
    ``cuda`` mean the GPU of this node numbered ``LOCAL_RANK``."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if launched_by_torchrun() else 0
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"train.device is {device!r} but no CUDA device is available")
    if device in ("auto", "cuda"):
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"this is process {local_rank} of its node (LOCAL_RANK) but only "
                             f"{torch.cuda.device_count()} CUDA devices are visible: start at most as many "
                             "processes per node as there are GPUs (torchrun --nproc_per_node)")
        return torch.device("cuda", local_rank)
    if local_world_size() > 1:
        raise ValueError(f"train.device {device!r} names one GPU for the {local_world_size()} processes of "
                         "this node; use 'cuda' or 'auto' (each process takes the GPU numbered LOCAL_RANK)")
    return torch.device(device)


def join(backend: str, device: torch.device, *, needs_group: bool = False) -> tuple[Ranks, bool]:
    """The processes this one trains with, and whether this call created their group.

    Under torchrun: the group its environment describes (an existing default group is
    used as it is). Outside it: a single process, or a group of one when
    ``needs_group`` (FSDP works on a process group even for one process).
    ``backend``: ``"auto"`` (nccl on CUDA, gloo on CPU), ``"nccl"`` or ``"gloo"``.
    """
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.group.WORLD), False
    if not (launched_by_torchrun() or needs_group):
        return Ranks(), False
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed: it cannot run several processes")
    chosen = resolve_backend(backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if launched_by_torchrun():
        dist.init_process_group(chosen, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1)
    return Ranks(dist.group.WORLD), True


def resolve_backend(backend: str, device: torch.device) -> str:
    """``train.backend`` for ``device``, or a ValueError for a combination that cannot run."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if device.type != "cuda":
            raise ValueError("train.backend nccl needs CUDA devices but this process trains on the CPU; "
                             "use train.backend gloo (or auto)")
        if not dist.is_nccl_available():
            raise ValueError("train.backend nccl: this torch build has no NCCL; use gloo")
    elif not dist.is_gloo_available():
        raise ValueError("train.backend gloo: this torch build has no gloo; use nccl on CUDA devices")
    return backend


def leave(ranks: Ranks) -> None:
    """Destroy the process group :func:`join` created."""
    if ranks.group is not None:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def average_gradients_across_ranks(module: nn.Module) -> list:
    """Hook every trainable parameter of ``module`` so that its accumulated gradient is
    the mean over the ranks. Returns the hook handles (``handle.remove()`` undoes them).

    For losses whose trainer wraps only the model in ``DistributedDataParallel``: the
    learnable parts of the loss (SIA lifts, PIC heads) would otherwise get each rank's
    own gradient and drift apart. With gradient accumulation the mean is taken after
    every backward; since the mean is linear, the accumulated gradient is still the mean
    over ranks of the local sums.
    """
    return [p.register_post_accumulate_grad_hook(_average_over_ranks)
            for p in module.parameters() if p.requires_grad]


def _average_over_ranks(param: torch.Tensor) -> None:
    dist.all_reduce(param.grad)
    param.grad.div_(dist.get_world_size())
