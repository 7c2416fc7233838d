"""The byte and FLOP model of the fused passes (mipic_kernels/fused/traffic.py): hand
counts on small cases, its relation to the physical minimum, and its checks."""

from __future__ import annotations

import pytest
import torch

from mipic_kernels.fused import traffic

DIMS = (16, 32, 64, 128, 256, 512)
FRACTIONS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


def test_minimum_by_hand():
    # One example of 10 real tokens out of 12, every token selected (k=None): the
    # score reads all of x (2 bytes each), the forward FLOPs are one symmetric Gram
    # (k (k + 1) D), the backward reads the 10 rows and writes all of dx.
    full = traffic.minimal_traffic([10], 12, 64, (32, 64), None, 1, torch.bfloat16, mode="full")
    forward, backward = full.passes
    assert (forward.read, forward.written, forward.flops) == (12 * 64 * 2, 0.0, {"bf16": 10 * 11 * 64})
    assert (backward.read, backward.written) == (10 * 64 * 2, 12 * 64 * 2)
    assert backward.flops == {"bf16": 2 * 10 * 10 * 64}
    assert full.bytes == 12 * 64 * 2 + 10 * 64 * 2 + 12 * 64 * 2
    assert full.seconds() == pytest.approx(sum(p.seconds() for p in full.passes))
    no_grad = traffic.minimal_traffic([10], 12, 64, (32, 64), None, 1, torch.bfloat16, mode="no-grad")
    assert no_grad.passes == (forward,)


def test_gram_pass_by_hand():
    # Two examples of 10 and 20 real tokens out of T = 20, widths 5 and 70 of D = 100
    # (so a trailing segment), k = [0.3, 16]: counts (3, 10) and (6, 16), Gram edge 16.
    # Slots are stored over their rows to whole 64-row tiles, clipped to the edge:
    # every slot is 16 x 16 (and 16 squared norms). The rows are read once (2 bytes
    # and an 8-byte position each); the sweep steps over 64 + 128 + 64 columns (each
    # segment in whole 64-column steps) with 4 bf16 products, one tile per example.
    model = traffic.fused_traffic([10, 20], 20, 100, (5, 70), [0.3, 16], 1, torch.bfloat16, mode="no-grad",
                                  scores=None)
    gram = {p.name: p for p in model.passes}["gram"]
    assert gram.written == 2 * 3 * (16 * 16 + 16) * 4
    assert gram.read == (10 + 16) * (100 * 2 + 8) + 2 * 100 * 4
    assert gram.flops == {"bf16": 2 * (2 * 64**2 * 256) * 4}
    assert [p.name for p in model.passes] == ["shift", "gram", "rowsum", "hsic"]
    assert model.held == 0.0 and model.peak_extra == 0.0


@pytest.mark.parametrize("mode", traffic.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_design_moves_at_least_the_minimum(mode, dtype):
    lengths = torch.randint(32, 129, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    args = (lengths, 128, 768, DIMS, FRACTIONS, 8, dtype)
    fused = traffic.fused_traffic(*args, mode=mode)
    minimum = traffic.minimal_traffic(*args, mode=mode)
    assert fused.bytes > minimum.bytes > 0
    assert fused.seconds() > minimum.seconds() > 0
    names = [p.name for p in fused.passes]
    assert ("dx" in names) == (mode in ("backward", "full"))
    assert ("gram" in names) == (mode != "backward")
    if mode in ("backward", "full"):
        assert fused.peak_extra >= 16 * 128 * 768 * torch.finfo(dtype).bits // 8  # dx itself
    rbf = traffic.fused_traffic(*args, mode=mode, kernel="rbf")
    assert ("median" in [p.name for p in rbf.passes]) == (mode != "backward")
    ieee = traffic.fused_traffic(*args, mode=mode, precision="ieee")
    assert not any(unit in p.flops for p in ieee.passes for unit in ("bf16", "tf32"))
    assert ieee.seconds() >= fused.seconds()  # fp32 FMA is never faster than split tensor-core dots


def test_model_rejects_what_it_cannot_model():
    with pytest.raises(ValueError, match="mode must be one of"):
        traffic.fused_traffic([4], 8, 16, (8, 16), None, 1, torch.bfloat16, mode="train")
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        traffic.minimal_traffic([4], 8, 16, (8, 16), None, 1, torch.float64, mode="full")
    with pytest.raises(ValueError, match=r"lengths must be real-token counts in \[0, 8\]"):
        traffic.fused_traffic([9], 8, 16, (8, 16), None, 1, torch.bfloat16, mode="full")
