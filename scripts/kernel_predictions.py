"""Predicted H100 times of the fused backend on every benchmark preset, before any GPU run.

From the byte/FLOP model of the current passes (``mipic_kernels/fused/traffic.py``), a
model of the previous design (below: ieee dots on 32-row tiles over every tile up to the
Gram edge, batch-fastest grids, zero-filled buffers and torch slice additions, 31-sweep
median), the physical minimum, and the number of launches of one training step of the
loss, counted under Triton's interpreter. Prints the tables of docs/kernels.md.

    python scripts/kernel_predictions.py                   # the tables
    python scripts/kernel_predictions.py --launches-of DIR # launches of another checkout

Times are each pass's memory or arithmetic time at the peak rates, whichever is
longer, summed over the passes: no launch latency, no overlap, no occupancy limit.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # only the launch count runs kernels: on the CPU
ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402


def _import_package(root: Path) -> None:
    sys.path.insert(0, str(root))


def previous_design(lengths, tokens, depth, dims, k, k_min, dtype, *, mode, detach_full=True):
    """The passes of the design before tensor cores, padding skip and on-chip reductions."""
    from mipic_kernels.fused.traffic import Pass, Traffic
    from mipic_kernels.rules import segment_bounds
    from mipic_kernels.selection import gram_edge, resolve_k

    size = torch.finfo(dtype).bits // 8
    widths = len(dims)
    n = resolve_k(k, k_min, torch.as_tensor(list(lengths)), widths).double()
    kmax = n.amax(-1)
    batch, k_top = len(lengths), gram_edge(k, k_min, tokens)
    bounds = segment_bounds(dims, depth)
    slots = len(bounds) - 1
    tiles = math.ceil(k_top / 32)
    cols16 = sum(math.ceil((hi - lo) / 16) * 16 for lo, hi in zip(bounds, bounds[1:]))
    blocks = float((n**2).sum())
    f32, fma = 4, "fp32"
    passes = []
    if mode != "backward":
        # Every tile of the upper triangle up to the edge sweeps all columns; the batch
        # index is the fastest grid axis, so each tile reads its two row blocks from HBM.
        rows = torch.clamp(kmax[:, None] - 32 * torch.arange(tiles), 0, 32)  # valid rows per tile
        tile_rows = float(sum((rows[:, i] + rows[:, j]).sum() for j in range(tiles) for i in range(j + 1)))
        passes += [
            Pass("score", batch * tokens * depth * size, batch * tokens * f32, {fma: 2.0 * batch * tokens * depth}),
            Pass("rank", batch * tokens * (f32 + 1), batch * tokens * 8),
            Pass("shift", float(kmax.sum()) * depth * size, batch * depth * f32),
            Pass("gram", tile_rows * depth * size, batch * slots * (k_top**2 + k_top) * f32,
                 {fma: batch * tiles * (tiles + 1) / 2 * 2 * 32**2 * cols16}),
            Pass("stats", 2 * blocks * f32, batch * widths * (2 * k_top + 7) * f32,
                 {fma: blocks * 2 * 2 * 6}),
        ]
    if mode in ("backward", "full"):
        coef_slots = widths if detach_full else 2 * widths + 1
        adds = (widths - 1) * 3 + (0 if detach_full else widths + 1)
        grad_cols = dims[-1] if detach_full else depth
        pairs = sum(
            1 for c in range(0, grad_cols, 64) for lo, hi in zip(bounds, bounds[1:]) if lo < c + 64 and hi > c
        )
        passes += [
            Pass("coef zero-fill", 0.0, batch * coef_slots * k_top**2 * f32),
            Pass("coef", 2 * blocks * f32, (1 if detach_full else 2) * blocks * f32, {fma: blocks * 2 * 12}),
            Pass("coef slice adds", 0.0, batch * adds * k_top**2 * f32),
            Pass("dx zero-fill", 0.0, batch * tokens * depth * size),
            Pass("dx", pairs * float((kmax**2).sum()) * f32 + math.ceil(k_top / 64) * float(kmax.sum()) * depth * size,
                 float(kmax.sum()) * depth * size,
                 {fma: 2 * float((kmax * torch.ceil(kmax / 64) * 64).sum()) * pairs * 64}),
        ]
    return Traffic(tuple(passes))


def preset_rows():
    """(preset, shape, lengths of every flattened example) of every GPU preset, with the
    sequence lengths ``benchmarks.presets.make_workload`` draws."""
    from benchmarks.presets import PRESETS

    for preset in PRESETS.values():
        if not preset.gpu:
            continue
        for shape in preset.shapes():
            gen = torch.Generator().manual_seed(0)
            shortest = min(shape.tokens, max(preset.k_min, math.ceil(shape.tokens / 4)))
            lengths = torch.randint(shortest, shape.tokens + 1, (shape.batch,), generator=gen)
            lengths[0] = shape.tokens
            yield preset, shape, lengths.repeat(shape.layers).tolist()


def count_launches() -> tuple[int, int]:
    """(triton kernel launches, torch kernels) of one forward and backward of the loss on
    a small bert-like input (2 layers x 2 sentences, T = 40, D = 96, six widths)."""
    import triton.runtime.interpreter as interpreter
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    import mipic_kernels as mk

    no_kernel = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
                 "lift_fresh", "_local_scalar_dense", "is_nonzero", "size", "stride", "sym_size", "sym_stride"}

    class Counter(TorchDispatchMode):
        torch_ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "mipic_kernels":
                with self:
                    return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
            if func.overloadpacket.__name__ not in no_kernel and not func.is_view:
                Counter.torch_ops += 1
            return func(*args, **kwargs)

    launches = 0
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        nonlocal launches
        launches += 1
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 2, 40, 96, generator=gen) + 3).requires_grad_()
    mask = torch.arange(40) < torch.tensor([[40], [25]])
    dims, fractions = (4, 8, 16, 32, 64, 80), [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    loss_fn = mk.NestedCKALoss(dims, k=fractions, k_min=4, backend="triton")
    loss_fn(x.detach(), scores="cls", mask=mask.expand(2, 2, 40))  # uploads the bounds once
    interpreter.InterpretedFunction.run = run
    try:
        with Counter():
            loss_fn(x, scores="cls", mask=mask.expand(2, 2, 40)).backward()
    finally:
        interpreter.InterpretedFunction.run = original
    return launches, Counter.torch_ops


def eager_bytes_written(preset, shape, lengths) -> float:
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
    mask = (torch.arange(T) < torch.tensor(lengths[:B])[:, None]).expand(L, B, T)
    loss_fn = mk.NestedCKALoss(preset.dims, backend="torch", **preset.loss_options())
    with Written():
        loss_fn(x, scores="cls", mask=mask).backward()
    return float(Written.total)


def _fmt_bytes(b: float) -> str:
    return f"{b / 1e6:,.0f}" if b >= 1e7 else f"{b / 1e6:.1f}"


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f}" if seconds >= 1e-5 else f"{seconds * 1e6:.1f}"


def tables() -> str:
    from mipic_kernels.fused.traffic import fused_traffic, minimal_traffic

    dtype = torch.bfloat16
    out = [
        "| preset | shape | mode | minimum MB | minimum us | this design MB | GFLOP | us | "
        "previous design MB | us | previous / this |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    memory = [
        "| preset | shape | x MB | held fwd->bwd MB | backward extra MB | recompute: extra MB | extra us |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, shape, lengths in preset_rows():
        args = (lengths, shape.tokens, shape.depth, preset.dims, preset.loss_options()["k"], preset.k_min, dtype)
        for mode in ("no-grad", "full"):
            minimum = minimal_traffic(*args, mode=mode)
            this = fused_traffic(*args, mode=mode)
            before = previous_design(*args, mode=mode)
            out.append(
                f"| {preset.name} | {shape} | {mode} | {_fmt_bytes(minimum.bytes)} | {_fmt_us(minimum.seconds())} | "
                f"{_fmt_bytes(this.bytes)} | {this.flops / 1e9:,.1f} | {_fmt_us(this.seconds())} | "
                f"{_fmt_bytes(before.bytes)} | {_fmt_us(before.seconds())} | "
                f"{before.seconds() / this.seconds():.1f}x |"
            )
        full = fused_traffic(*args, mode="full")
        again = [p for p in full.passes if p.name == "gram"][0]  # recomputing the Grams in the backward
        x_bytes = len(lengths) * shape.tokens * shape.depth * torch.finfo(dtype).bits // 8
        memory.append(
            f"| {preset.name} | {shape} | {_fmt_bytes(x_bytes)} | {_fmt_bytes(full.held)} | "
            f"{_fmt_bytes(full.peak_extra)} | {_fmt_bytes(again.read + again.written)} | {_fmt_us(again.seconds())} |"
        )
    eager = [
        "| preset | shape | eager reference writes MB | at least us | this design (full) us | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for preset, shape, lengths in preset_rows():
        if shape.batch != 16:  # every tensor scales with the batch; the others are 4x and 8x
            continue
        written = eager_bytes_written(preset, shape, lengths)
        this = fused_traffic(lengths, shape.tokens, shape.depth, preset.dims, preset.loss_options()["k"],
                             preset.k_min, dtype, mode="full")
        floor = 2 * written / 3.35e12  # written once, read at least once
        eager.append(f"| {preset.name} | {shape} | {_fmt_bytes(written)} | {_fmt_us(floor)} | "
                     f"{_fmt_us(this.seconds())} | {floor / this.seconds():.1f}x |")
    return "\n".join(out) + "\n\n" + "\n".join(memory) + "\n\n" + "\n".join(eager)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launches-of", type=Path, help="count the launches of the checkout at DIR instead")
    args = parser.parse_args()
    if args.launches_of is not None:
        _import_package(args.launches_of.resolve())
        print("launches (triton, torch):", count_launches())
        return
    _import_package(ROOT)
    print(tables())
    triton_launches, torch_ops = count_launches()
    print(f"\nOne forward and backward of the loss: {triton_launches} triton launches, {torch_ops} torch kernels.")


if __name__ == "__main__":
    main()
