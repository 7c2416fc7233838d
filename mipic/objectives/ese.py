"""ESE / 2DMSE baseline: Matryoshka InfoNCE at every width of shallower layers as well.

Deterministic form of the layer-and-width Matryoshka: every configured layer is trained
at every width each step (2DMSE samples one layer per step), the mean over layers.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from .mrl import MRLLoss


def layer_width_loss(
    mrl: MRLLoss,
    layers: Sequence[int],
    anchor: Mapping[int, torch.Tensor],
    positive: Mapping[int, torch.Tensor],
    negative: Optional[Mapping[int, torch.Tensor]] = None,
) -> torch.Tensor:
    """Mean over ``layers`` of the width-summed InfoNCE of each layer's pooled embeddings."""
    per_layer = [
        mrl(anchor[l], positive[l], None if negative is None else negative[l]).sum() for l in layers
    ]
    return torch.stack(per_layer).mean()
