"""How the trained modules are spread over the processes, and their state saved.

* DDP (``train.parallel: ddp``): a full copy of the model on every process, gradients
  averaged over the processes (once per optimiser step with gradient accumulation).
* FSDP2 (``train.parallel: fsdp``): parameters, gradients and optimiser state sharded
  over the processes, one unit per transformer layer plus the rest of the model, and
  one for the objective's own parameters; with bf16 precision the model's parameters
  are gathered and used in bf16 while the gradients are reduced, and the shards kept,
  in float32. The objective's parameters (SIA lifts, PIC heads) stay float32.
* Activation checkpointing: each layer's activations are recomputed in the backward
  pass instead of kept (the transformers model's own checkpointing, non-reentrant, so
  that recomputed dropout masks equal the first ones).

Checkpoints hold full (unsharded) state dicts keyed by parameter name, whichever mode
wrote them, so that a run resumes under any number of processes and either mode.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, Optional, Sequence

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from .distributed import Ranks
from .encoder import Encoder
from .objectives import Objective

PARALLEL_MODES = ("ddp", "fsdp")
MODEL_PREFIX = "encoder.model."
OBJECTIVE_PREFIX = "objective."


class TrainedModules(nn.Module):
    """The encoder and the objective as one module: what DDP or FSDP wraps, what the
    optimiser updates and what a checkpoint holds. ``forward(batch)`` is the loss of this
    process's part of a batch, as the whole batch's loss (see :mod:`mipic.distributed`)."""

    def __init__(self, encoder: Encoder, objective: Objective, ranks: Ranks) -> None:
        super().__init__()
        self.encoder = encoder
        self.objective = objective
        self.ranks = ranks

    def forward(self, batch: Sequence[tuple[str, ...]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective(self.encoder, batch, self.ranks)


def checkpoint_activations(encoder: Encoder) -> None:
    """Recompute every layer's activations in backward (``train.activation_checkpointing``)."""
    model = encoder.model
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"train.activation_checkpointing: {type(model).__name__} does not support "
                         "activation checkpointing; set it to false")
    options = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.23 names it so
    if enable is not None:
        enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def wrap(module: TrainedModules, parallel: str, device: torch.device,
         param_dtype: Optional[torch.dtype]) -> nn.Module:
    """``module`` as the processes train it: itself for one process without a group,
    DDP, or sharded in place by FSDP2 (then returned as it is). ``param_dtype``: bf16
    parameters under FSDP (None keeps float32)."""
    ranks = module.ranks
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"train.parallel must be one of {PARALLEL_MODES}; got {parallel!r}")
    if parallel == "fsdp":
        if ranks.group is None:
            raise ValueError("train.parallel fsdp needs a process group (mipic.train.train makes one)")
        _shard(module, device, param_dtype)
        return module
    if ranks.group is None:
        return module
    # find_unused_parameters: the objective reads hidden states, so a model's pooler
    # (BERT's) gets no gradient, which DDP would otherwise wait for.
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device] if device.type == "cuda" else None, process_group=ranks.group,
        find_unused_parameters=True,
    )


def _shard(module: TrainedModules, device: torch.device, param_dtype: Optional[torch.dtype]) -> None:
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError as err:
        raise ValueError(f"train.parallel fsdp needs FSDP2 (torch >= 2.6); this is torch {torch.__version__}") from err
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (module.ranks.world_size,))
    low = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) \
        if param_dtype is not None else MixedPrecisionPolicy()
    for layer in transformer_layers(module.encoder):
        fully_shard(layer, mesh=mesh, mp_policy=low)
    fully_shard(module.objective, mesh=mesh)
    fully_shard(module, mesh=mesh, mp_policy=low)


def transformer_layers(encoder: Encoder) -> list[nn.Module]:
    """The model's list of transformer layers (the one ``ModuleList`` of
    ``num_hidden_layers`` entries): FSDP's units."""
    found = [m for m in encoder.model.modules() if isinstance(m, nn.ModuleList) and len(m) == encoder.num_layers]
    if len(found) != 1:
        raise ValueError(f"train.parallel fsdp: cannot tell which module list of {type(encoder.model).__name__} "
                         f"holds its {encoder.num_layers} layers ({len(found)} candidates)")
    return list(found[0])


def accumulating(wrapped: nn.Module, last: bool) -> ContextManager:
    """The context of one micro-batch's forward and backward: DDP averages gradients
    only after the last micro-batch of an optimiser step. (FSDP reduces after each: it
    keeps only the shards of the gradients between micro-batches.)"""
    if isinstance(wrapped, nn.parallel.DistributedDataParallel) and not last:
        return wrapped.no_sync()
    return nullcontext()


def clip_gradients(parameters: Sequence[torch.Tensor], max_norm: float) -> float:
    """Clip the total gradient norm (over every process's shards under FSDP); returns
    the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _options(ranks: Ranks) -> StateDictOptions:
    # Gathered to rank 0's CPU memory under a process group (the others get nothing).
    return StateDictOptions(full_state_dict=True, cpu_offload=ranks.group is not None)


def full_state(module: TrainedModules, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
    """The full model, objective and optimiser state dicts, on rank 0 (empty on the others).
    Every process must call it."""
    model_state, optimizer_state = get_state_dict(module, optimizer, options=_options(module.ranks))
    return (_strip(model_state, MODEL_PREFIX), _strip(model_state, OBJECTIVE_PREFIX), optimizer_state)


def full_model_state(module: TrainedModules) -> Optional[dict]:
    """The full state of the transformers model on rank 0 when FSDP shards it (the saved
    model is then written from it); None otherwise (the model itself can be saved)."""
    if not _is_sharded(module):
        return None
    return _strip(get_model_state_dict(module, options=_options(module.ranks)), MODEL_PREFIX)


def load_full_state(module: TrainedModules, optimizer: torch.optim.Optimizer,
                    model: dict, objective: dict, optimizer_state: dict) -> None:
    """Load full state dicts (as :func:`full_state` returns them) into every process's
    modules and optimiser, sharding them where FSDP does."""
    merged = {**{MODEL_PREFIX + k: v for k, v in model.items()},
              **{OBJECTIVE_PREFIX + k: v for k, v in objective.items()}}
    set_model_state_dict(module, merged, options=StateDictOptions(full_state_dict=True))
    # Not strict: a parameter that never had a gradient (BERT's pooler) has no state.
    set_optimizer_state_dict(module, optimizer, optimizer_state,
                             options=StateDictOptions(full_state_dict=True, strict=False))


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _is_sharded(module: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in module.parameters())
