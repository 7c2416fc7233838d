"""The byte and FLOP model of the fused passes (mipic_kernels/fused/traffic.py): hand
counts on small cases, its relation to the benchmark's lower bound, the totals the
roofline reads, and its checks."""

from __future__ import annotations

import pytest
import torch

from benchmarks import roofline
from benchmarks.roofline import Problem
from mipic_kernels.fused import traffic

DIMS = (16, 32, 64, 128, 256, 512)
FRACTIONS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]


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
    assert [p.name for p in model.passes] == ["shift", "gram", "rowsum", "hsic", "values"]
    # The epilogue: one 16-row block per entry (edge 16), its 9 partials in, the counts
    # (8 bytes) and both bandwidths in, the 9 statistics and the value out.
    values = {p.name: p for p in model.passes}["values"]
    assert values.read == 2 * 2 * (9 * 4 + 8 + 2 * 4) and values.written == 2 * 2 * 10 * 4
    assert model.held == 0.0 and model.peak_extra == 0.0


@pytest.mark.parametrize("mode", traffic.MODES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_fused_design_moves_at_least_the_minimum(mode, dtype):
    lengths = torch.randint(32, 129, (16,), generator=torch.Generator().manual_seed(0)).tolist()
    args = (lengths, 128, 768, DIMS, FRACTIONS, 8, dtype)
    fused = traffic.fused_traffic(*args, mode=mode)
    problem = Problem(128, 768, tuple(lengths), DIMS, tuple(FRACTIONS), 8, dtype)
    minimum = roofline.lower_bound(problem, mode)
    assert fused.bytes > minimum.bytes > 0
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_totals_count_tensor_core_work_at_the_rate_the_roofline_uses(dtype):
    # The roofline runs float32 matrix FLOPs at a third of the tf32 rate (three tf32
    # products per product), so the totals give a third of the tf32 products; bf16
    # products count as they are. Every pass is a launch, plus the torch operations.
    args = dict(tokens=64, depth=96, lengths=[64, 40, 17], dims=(8, 32, 96), k=(0.25, 0.5, 1.0), k_min=4,
                dtype=dtype, kernel="linear")
    for mode in traffic.MODES:
        passes = traffic.fused_traffic(args["lengths"], 64, 96, args["dims"], args["k"], 4, dtype, mode=mode)
        totals = traffic.design_traffic(mode=mode, **args)
        tc = sum(p.flops.get("bf16", 0.0) + p.flops.get("tf32", 0.0) / 3 for p in passes.passes)
        assert totals.flops_tc == pytest.approx(tc) and totals.flops_tc > 0
        assert totals.flops_fma == pytest.approx(sum(p.flops.get("fp32", 0.0) for p in passes.passes))
        assert totals.bytes == passes.bytes
        assert totals.launches > len(passes.passes)
    unit = "bf16" if dtype == torch.bfloat16 else "tf32"
    assert all(unit in p.flops for p in passes.passes if p.name in ("gram", "dx"))


def test_model_rejects_what_it_cannot_model():
    with pytest.raises(ValueError, match="mode must be one of"):
        traffic.fused_traffic([4], 8, 16, (8, 16), None, 1, torch.bfloat16, mode="train")
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        traffic.fused_traffic([4], 8, 16, (8, 16), None, 1, torch.float64, mode="full")
    with pytest.raises(ValueError, match="kernel must be 'linear' or 'rbf'"):
        traffic.design_traffic(tokens=8, depth=16, lengths=[4], dims=(8, 16), k=None, k_min=1,
                               dtype=torch.bfloat16, mode="full", kernel="cosine")
    with pytest.raises(ValueError, match=r"lengths must be real-token counts in \[0, 8\]"):
        traffic.fused_traffic([9], 8, 16, (8, 16), None, 1, torch.bfloat16, mode="full")
