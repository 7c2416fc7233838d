"""Predicted H100 times of the fused backend on every GPU benchmark preset, before any GPU run.

From the byte/FLOP model of the current passes (``mipic_kernels/fused/traffic.py``), the
first design's model (``benchmarks/design_v1.py``: ieee dots on 32-row tiles over every
tile up to the Gram edge, batch-fastest grids, zero-filled buffers, torch slice
additions, a 31-sweep median) and the lower bound of ``benchmarks/roofline.py``, at the
H100 SXM's datasheet peaks as ``mipic-bench roofline`` computes them. Prints the tables
of docs/kernels.md:

    python scripts/kernel_predictions.py

A design's time is its bytes, matrix FLOPs or FMA FLOPs at the peaks, whichever is
longest, or its launches at 5 us each when longer (``roofline.predicted_ms``); for the
current design also the sum over its passes, each bound by its own memory or
arithmetic (no overlap between passes). No launch latency otherwise, no occupancy limit.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import catalog, design_v1, roofline  # noqa: E402
from mipic_kernels.fused import traffic  # noqa: E402

H100 = roofline.device_spec("NVIDIA H100 80GB HBM3")
DTYPE = torch.bfloat16


def preset_problems():
    """(preset, shape, problem) of every GPU preset, with the sequence lengths
    ``mipic-bench`` draws (seed 0)."""
    for name in catalog.default_presets(on_gpu=True):
        preset = catalog.PRESETS[name]
        for shape in preset.shapes():
            yield preset, shape, roofline.preset_problem(preset, shape, dtype=DTYPE, kernel="linear")


def eager_bytes_written(preset, shape, problem) -> float:
    """Bytes of every tensor the eager reference writes in one forward and backward of
    the loss (bf16 input, run on the CPU): a lower bound on its HBM traffic, as every
    one of them is also read at least once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import mipic_kernels as mk

    class Written(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        Written.total += t.numel() * t.element_size()
            return out

    L, B, T, D = shape.layers, shape.batch, shape.tokens, shape.depth
    x = torch.randn(L, B, T, D, dtype=torch.bfloat16, requires_grad=True)
    mask = (torch.arange(T) < torch.tensor(problem.lengths[:B])[:, None]).expand(L, B, T)
    loss_fn = mk.NestedCKALoss(preset.dims, backend="torch", **preset.loss_options())
    with Written():
        loss_fn(x, scores="cls", mask=mask).backward()
    return float(Written.total)


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:,.0f}" if b >= 1e7 else f"{b / 1e6:.1f}"


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-5 else f"{seconds * 1e6:.1f}"


def _ms(work: roofline.Traffic) -> float:
    return roofline.predicted_ms(work, H100, DTYPE) / 1e3


def tables() -> str:
    out = [
        "| preset | shape | mode | bound MB | bound us | this design MB | GFLOP | launches | us | "
        "passes in sequence us | first design MB | launches | us | first / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    memory = [
        "| preset | shape | x MB | held fwd->bwd MB | backward extra MB | recompute: extra MB | extra us |",
        "|---|---|---|---|---|---|---|",
    ]
    eager = [
        "| preset | shape | eager reference writes MB | at least us | this design's passes us | ratio | "
        "this design with launches us | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for preset, shape, problem in preset_problems():
        args = (problem.lengths, shape.tokens, shape.depth, preset.dims, problem.k, preset.k_min, DTYPE)
        for mode in ("no-grad", "full"):
            bound = roofline.lower_bound(problem, mode)
            passes = traffic.fused_traffic(*args, mode=mode)
            this = roofline.design_traffic(traffic.design_traffic, problem, mode)
            first = roofline.design_traffic(design_v1.design_traffic, problem, mode)
            out.append(
                f"| {preset.name} | {shape} | {mode} | {_fmt_bytes(bound.bytes)} | "
                f"{_fmt_us(roofline.limit_ms(bound, H100, DTYPE)[0] / 1e3)} | {_fmt_bytes(this.bytes)} | "
                f"{(this.flops_tc + this.flops_fma) / 1e9:,.1f} | {this.launches} | {_fmt_us(_ms(this))} | "
                f"{_fmt_us(passes.seconds())} | {_fmt_bytes(first.bytes)} | {first.launches} | "
                f"{_fmt_us(_ms(first))} | {_ms(first) / _ms(this):.1f}x |"
            )
        full = traffic.fused_traffic(*args, mode="full")
        again = [p for p in full.passes if p.name == "gram"][0]  # recomputing the Grams in the backward
        x_bytes = problem.batch * shape.tokens * shape.depth * DTYPE.itemsize
        memory.append(
            f"| {preset.name} | {shape} | {_fmt_bytes(x_bytes)} | {_fmt_bytes(full.held)} | "
            f"{_fmt_bytes(full.peak_extra)} | {_fmt_bytes(again.read + again.written)} | {_fmt_us(again.seconds())} |"
        )
        if shape.batch == 16:  # every tensor scales with the batch; the others are 4x and 8x
            written = eager_bytes_written(preset, shape, problem)
            floor = 2 * written / H100.bandwidth()  # written once, read at least once
            kernels = full.seconds()
            launched = _ms(roofline.design_traffic(traffic.design_traffic, problem, "full"))
            eager.append(f"| {preset.name} | {shape} | {_fmt_bytes(written)} | {_fmt_us(floor)} | "
                         f"{_fmt_us(kernels)} | {floor / kernels:.1f}x | {_fmt_us(launched)} | {floor / launched:.1f}x |")
    return "\n".join(out) + "\n\n" + "\n".join(memory) + "\n\n" + "\n".join(eager)


if __name__ == "__main__":
    print(tables())
