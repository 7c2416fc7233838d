"""The training objective: MIPIC, plain MRL or ESE, optionally with the MIC regularisers.

``method="mipic"``: ``alpha * L_MRL + (1 - alpha) * (w_att L_att + w_cka L_cka + w_pic L_PIC)``;
``"mrl"``: ``L_MRL``; ``"ese"``: ``L_MRL + w_ese L_ESE``. With MIC enabled,
``gamma * mean over layers and truncated widths of (SCR + SIR)`` is added to any of them.
``L_MRL`` is summed over widths (with optional weights); ``aggregation`` sets sum or mean
over the (layer, width) terms of SIA and the links of PIC.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..config import ObjectiveConfig
from ..encoder import Encoder, pool, query_positions
from . import mic
from .ese import layer_width_loss
from .mrl import MRLLoss
from .pic import PICLoss
from .sia import SIALoss

__all__ = ["Objective", "MRLLoss", "SIALoss", "PICLoss"]


class Objective(nn.Module):
    """Holds the loss terms and their learnable parts (lifts, PIC heads)."""

    def __init__(self, cfg: ObjectiveConfig, dims: Sequence[int], hidden_size: int, num_layers: int) -> None:
        super().__init__()
        dims = list(dims)
        if dims[-1] != hidden_size:
            raise ValueError(f"model.dims must end at the hidden size {hidden_size}; got {dims}")
        # Only the terms in use are checked against the model: a config may keep the
        # settings of the others (e.g. a MIPIC config run with method=mrl).
        if cfg.method == "mipic":
            _check_layers("objective.sia.layers", cfg.sia.layers, num_layers)
            _check_layers("objective.pic.chain layers", [l for _, l in cfg.pic.chain], num_layers)
            bad_width = [w for w, _ in cfg.pic.chain if w > hidden_size]
            if bad_width:
                raise ValueError(f"objective.pic.chain widths must be <= the hidden size {hidden_size}; got {bad_width}")
        if cfg.method == "ese":
            _check_layers("objective.ese.layers", cfg.ese.layers, num_layers)
        if cfg.mic.enabled:
            _check_layers("objective.mic.layers", cfg.mic.layers, num_layers)
        if cfg.method == "ese" and not cfg.ese.layers:
            raise ValueError("objective.ese.layers must list at least one layer for method 'ese'")
        self.cfg = cfg
        self.dims = dims
        self.num_layers = num_layers
        self.register_buffer(
            "mrl_weights", torch.tensor(cfg.mrl_weights or [1.0] * len(dims)), persistent=False)
        self.mrl = MRLLoss(dims, cfg.temperature)
        self.truncated = [d for d in dims if d < hidden_size]
        self.sia = self.pic = None
        if cfg.method == "mipic":
            s = cfg.sia
            self.sia = SIALoss(
                hidden_size, dims, s.layers, k_fractions=s.k_fractions, k_min=s.k_min,
                attention_temperature=s.attention_temperature, ranking=s.ranking, kernel=s.kernel,
                detach_teacher=s.detach_teacher, backend=s.backend, aggregation=cfg.aggregation,
            )
            if cfg.pic.chain:
                self.pic = PICLoss(cfg.pic.chain, cfg.temperature)
        self.mic_layers = list(cfg.mic.layers) or [num_layers]

    def forward(self, encoder: Encoder, batch: Sequence[tuple[str, ...]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one batch of examples (1, 2 or 3 texts each) and its parts (detached)."""
        n, views = len(batch), len(batch[0])
        columns = [[ex[i] for ex in batch] for i in range(views)]
        if views == 1:  # SimCSE: the same sentences twice; dropout makes the two views differ
            columns = columns * 2
        enc = encoder([t for col in columns for t in col])
        hidden, mask = enc.hidden, enc.mask
        parts: dict[str, torch.Tensor] = {}

        def pooled_views(layer: int) -> list[torch.Tensor]:
            return list(encoder.pool(hidden[layer], mask).split(n))

        last = pooled_views(self.num_layers)
        per_width = self.mrl(last[0], last[1], last[2] if len(last) > 2 else None)
        for d, value in zip(self.dims, per_width):
            parts[f"mrl@{d}"] = value
        mrl = (per_width * self.mrl_weights).sum()
        parts["mrl"] = mrl
        anchor_hidden = [h[:n] for h in hidden]
        anchor_mask = mask[:n]

        if self.cfg.method == "mipic":
            s = self.cfg.sia
            query = query_positions(anchor_mask, encoder.pooling)
            att, cka = self.sia(anchor_hidden, anchor_mask, query)
            parts["sia_attention"], parts["sia_cka"] = att, cka
            aux = s.attention_weight * att + s.cka_weight * cka
            if self.pic is not None:
                pooled = {l: encoder.pool(anchor_hidden[l], anchor_mask) for l in self.pic.layers}
                links = self.pic(pooled)
                pic = links.sum() if self.cfg.aggregation == "sum" else links.mean()
                parts["pic"] = pic
                aux = aux + self.cfg.pic.weight * pic
            loss = self.cfg.alpha * mrl + (1 - self.cfg.alpha) * aux
        elif self.cfg.method == "ese":
            views_by_layer = {l: pooled_views(l) for l in self.cfg.ese.layers}
            ese = layer_width_loss(
                self.mrl, self.cfg.ese.layers,
                {l: v[0] for l, v in views_by_layer.items()}, {l: v[1] for l, v in views_by_layer.items()},
                {l: v[2] for l, v in views_by_layer.items()} if views > 2 else None,
            )
            parts["ese"] = ese
            loss = mrl + self.cfg.ese.weight * ese
        else:
            loss = mrl

        if self.cfg.mic.enabled and self.truncated:
            c = self.cfg.mic
            scr = torch.stack([
                mic.soft_collapse(anchor_hidden[l], anchor_mask, self.truncated, c.tau_corr, c.lambda_var)
                for l in self.mic_layers]).mean()
            sir = torch.stack([
                mic.spectral_isotropy(pool(anchor_hidden[l], anchor_mask, "mean"), self.truncated, c.uniformity_t)
                for l in self.mic_layers]).mean()
            parts["mic_scr"], parts["mic_sir"] = scr, sir
            loss = loss + c.gamma * (scr + sir)
        parts["loss"] = loss
        return loss, {k: v.detach() for k, v in parts.items()}


def _check_layers(key: str, layers: Sequence[int], num_layers: int) -> None:
    bad = [l for l in layers if not 1 <= l <= num_layers]
    if bad:
        raise ValueError(f"{key} must be layer numbers in [1, {num_layers}] (the model has {num_layers}); got {bad}")
