"""MIPIC's relational terms added to the loss of any model a ``transformers.Trainer`` runs.

``MIPICTrainerMixin`` goes before ``Trainer`` (or any subclass of it) in the bases;
``MIPICTrainer`` is the mixin on ``Trainer`` itself. Each step runs the model once with
``output_hidden_states=True``, takes the model's own loss (masked or causal language
modelling, classification, ...) as the base, and adds
:class:`mipic.objectives.relational.RelationalLoss` computed from the hidden states and
the attention mask. The weighted components are logged beside ``loss`` (averaged over
the steps since the last log, and over the ranks).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from transformers import Trainer

from ..objectives.relational import RelationalLoss
from ..objectives.terms import POOLINGS, EncodedBatch
from ..distributed import average_gradients_across_ranks, is_distributed

STATE_FILE = "mipic_relational.pt"


class MIPICTrainerMixin:
    """Adds ``mipic_loss`` (a :class:`RelationalLoss`) to the model's loss.

    Args:
        mipic_loss: the relational terms; its ``hidden_size`` and ``num_layers`` must be
            the model's.
        pooling: ``"cls"``, ``"mean"`` or ``"last"``: which token attends in SIA (the
            last real one for ``last``, else position 0) and how PIC pools.
        *args, **kwargs: those of the ``Trainer``.

    The model must accept ``output_hidden_states`` and return ``hidden_states`` and a
    loss (pass labels). The relational parameters (attention lifts, PIC heads) are
    trained with the model (same optimiser settings), averaged over the ranks when
    training is distributed, and saved beside each checkpoint as ``mipic_relational.pt``
    (restored on ``resume_from_checkpoint``).
    """

    def __init__(self, *args: Any, mipic_loss: RelationalLoss, pooling: str = "cls", **kwargs: Any) -> None:
        if not isinstance(mipic_loss, RelationalLoss):
            raise TypeError(f"mipic_loss must be a mipic.objectives.relational.RelationalLoss; "
                            f"got {type(mipic_loss).__name__}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        super().__init__(*args, **kwargs)
        self.mipic_loss = mipic_loss.to(self.args.device)
        self.mipic_pooling = pooling
        self._mipic_sums: dict[str, torch.Tensor] = {}
        self._mipic_steps = 0
        self._mipic_rank_hooks: Optional[list] = None

    def create_optimizer(self, *args: Any, **kwargs: Any):
        optimizer = super().create_optimizer(*args, **kwargs)
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.mipic_loss.parameters() if p.requires_grad and id(p) not in present]
        # Matrices decay like the model's; biases do not.
        for group, decay in (([p for p in params if p.dim() >= 2], self.args.weight_decay),
                             ([p for p in params if p.dim() < 2], 0.0)):
            if group:
                optimizer.add_param_group({"params": group, "weight_decay": decay})
        return optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs_asked_for_states = bool(inputs.get("output_hidden_states"))
        inputs = {**inputs, "output_hidden_states": True}
        base, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        hidden = outputs.get("hidden_states") if isinstance(outputs, dict) else getattr(outputs, "hidden_states", None)
        if hidden is None:
            raise ValueError(f"{type(model).__name__} returned no hidden_states: MIPICTrainer needs a model that "
                             "accepts output_hidden_states=True (an encoder or a decoder-only model)")
        mask = inputs.get("attention_mask")
        mask = torch.ones(hidden[0].shape[:2], dtype=torch.bool, device=hidden[0].device) if mask is None else mask.bool()
        components = self.mipic_loss(EncodedBatch(hidden, mask, views=1, pooling=self.mipic_pooling))
        if is_distributed() and self._mipic_rank_hooks is None:
            self._mipic_rank_hooks = average_gradients_across_ranks(self.mipic_loss)
        loss = base
        if components:
            extra = torch.stack(list(components.values())).sum()
            if model.training and self._base_is_scaled_for_accumulation(num_items_in_batch):
                # The Trainer will not divide this loss by the accumulation steps; our terms
                # are per-batch means, so divide them here.
                extra = extra / self._accumulation_steps()
            loss = base + extra
            if model.training:
                self._track({"base_loss": base, **components})
        if return_outputs and not inputs_asked_for_states:
            outputs = _without_hidden_states(outputs)  # prediction_step would gather them as logits
        return (loss, outputs) if return_outputs else loss

    def _base_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether the base loss is already normalised over the whole accumulated batch,
        by the Trainer's rule (``loss_is_scaled_for_ga``, transformers >= 5)."""
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return bool(explicit)
        return bool(getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None) or (
            getattr(self, "compute_loss_func", None) is not None)

    def _accumulation_steps(self) -> int:
        return getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps

    def _track(self, components: dict[str, torch.Tensor]) -> None:
        # Kept on the device: no host synchronisation per step.
        for name, value in components.items():
            value = value.detach().float()
            self._mipic_sums[name] = self._mipic_sums[name] + value if name in self._mipic_sums else value
        self._mipic_steps += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._mipic_steps:
            names = sorted(self._mipic_sums)
            means = torch.stack([self._mipic_sums[n] for n in names]) / self._mipic_steps
            if is_distributed():
                torch.distributed.all_reduce(means)
                means /= torch.distributed.get_world_size()
            logs = {**logs, **{name: round(float(v), 6) for name, v in zip(names, means)}}
            self._mipic_sums, self._mipic_steps = {}, 0
        return super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call)
        if self.args.should_save and any(True for _ in self.mipic_loss.parameters()):
            folder = output_dir or self.args.output_dir
            torch.save(self.mipic_loss.state_dict(), os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, *args, **kwargs)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if os.path.isfile(path):
            self.mipic_loss.load_state_dict(torch.load(path, map_location=self.args.device, weights_only=True))


def _without_hidden_states(outputs):
    if isinstance(outputs, dict):  # transformers' ModelOutput is a dict whose None fields are absent
        return type(outputs)(**{k: v for k, v in outputs.items() if k != "hidden_states"})
    return outputs


class MIPICTrainer(MIPICTrainerMixin, Trainer):
    """``transformers.Trainer`` with MIPIC's relational terms added to the model's loss."""
