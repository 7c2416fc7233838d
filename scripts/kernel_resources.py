"""Compile every fused kernel for sm_90 (H100) on this machine, no GPU needed, and print
the registers, spills and shared memory of each, with the occupancy they imply: the
table in docs/kernels.md.

    python scripts/kernel_resources.py            # markdown table on stdout

The kernels are compiled exactly as a launch would compile them: the operations run on
CPU tensors of the benchmark presets' shapes with a stand-in driver that reports an
sm_90 target, and every launch (every config of a tuned kernel) compiles without
running. Registers and spills come from ptxas's own report (``-v``), shared memory from
triton's metadata. Needs the triton wheel's bundled ptxas; not under the interpreter.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# A fresh cache, so that every kernel goes through ptxas and its report is seen.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel-resources-")
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# H100 SXM (sm_90): per SM.
REGISTERS = 65536
MAX_WARPS = 64
MAX_CTAS = 32
SHARED_BYTES = 228 * 1024
SHARED_PER_CTA_RESERVED = 1024


class _OfflineDriver:
    """Stands in for the CUDA driver: the JIT specialises and compiles for sm_90, nothing
    launches."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclass
class Row:
    kernel: str
    case: str
    meta: str
    warps: int
    stages: int
    registers: int
    spill_bytes: int
    shared: int

    def ctas_per_sm(self) -> int:
        per_warp = -(-self.registers * 32 // 256) * 256
        by_regs = REGISTERS // (per_warp * self.warps)
        by_shared = SHARED_BYTES // (self.shared + SHARED_PER_CTA_RESERVED)
        return min(by_regs, by_shared, MAX_WARPS // self.warps, MAX_CTAS)

    def occupancy(self) -> float:
        return self.ctas_per_sm() * self.warps / MAX_WARPS


_PTXAS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REPORTS: dict[int, tuple[int, int]] = {}  # id(compiled kernel) -> (registers, spilled bytes)


@contextlib.contextmanager
def compile_only(rows: list[Row], case: str):
    """Every launch inside compiles (each config of a tuned kernel) and records a row."""
    run, tuned_run = JITFunction.run, Autotuner.run
    skip = {"grid", "warmup", "num_warps", "num_stages", "num_ctas"}

    def compile_launch(fn, args, kwargs, grid):
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = run(fn, *args, grid=grid, warmup=True, **kwargs)
        report = log.getvalue()
        if report:  # else the kernel was compiled (and reported) for an earlier case
            _REPORTS[id(kernel)] = (
                max(int(r) for r in _PTXAS.findall(report)),
                sum(int(a) + int(b) for a, b in _SPILLS.findall(report)),
            )
        regs, spills = _REPORTS[id(kernel)]
        meta = ", ".join(
            f"{k}={v}" for k, v in kwargs.items()
            if k.isupper() and k not in ("INTERPRET", "ALIGN", "K_BUCKET") and not k.startswith("stride")
        )
        rows.append(Row(fn.fn.__name__, case, meta, kernel.metadata.num_warps, kernel.metadata.num_stages, regs,
                        spills, kernel.metadata.shared))
        return kernel

    def jit_run(self, *args, grid, warmup, **kwargs):
        return compile_launch(self, args, kwargs, grid)

    def autotuner_run(self, *args, **kwargs):
        grid = kwargs.pop("grid")
        kwargs.pop("warmup", None)
        self.nargs = dict(zip(self.arg_names, args))
        for config in self.prune_configs(kwargs):
            compile_launch(self.fn, args, {**kwargs, **config.all_kwargs()}, grid)

    JITFunction.run, Autotuner.run = jit_run, autotuner_run
    try:
        yield
    finally:
        JITFunction.run, Autotuner.run = run, tuned_run


def _cases():
    """(label, x shape, dims, k spec, dtype, precision, kernel, detach_full)."""
    fractions = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    widths = (16, 32, 64, 128, 256, 512)
    bert = ((112, 256, 768), widths, fractions)
    qwen = ((112, 512, 1024), widths, fractions)
    for label, (shape, dims, k) in (("bert-base T=256", bert), ("qwen3-0.6b T=512", qwen)):
        yield label, shape, dims, k, torch.bfloat16, "fast", "linear", True
        yield label, shape, dims, k, torch.bfloat16, "fast", "rbf", False
    for dtype in (torch.float16, torch.float32):
        yield "bert-base T=256", bert[0], widths, fractions, dtype, "fast", "linear", True
    yield "bert-base T=256", bert[0], widths, fractions, torch.bfloat16, "ieee", "linear", True


def collect() -> list[Row]:
    driver.set_active(_OfflineDriver())
    from mipic_kernels import selection
    from mipic_kernels.fused import nested_cka_op, ranking

    rows: list[Row] = []
    for label, shape, dims, k, dtype, precision, kernel, detach_full in _cases():
        case = f"{label}, {str(dtype).replace('torch.', '')}, {precision}, {kernel}"
        x = torch.zeros(shape, dtype=dtype, requires_grad=True)
        mask = torch.ones(shape[:2], dtype=torch.bool)
        with compile_only(rows, case):
            order, counts = ranking.cls_order(x, mask, k, 8, len(dims))
            k_top = selection.gram_edge(k, 8, shape[1])
            value = nested_cka_op.nested_cka(
                x, order, counts, dims, k_top, kernel=kernel, unbiased=False, sigma=None, rbf_threshold=1.0,
                detach_full=detach_full, precision=precision,
            )
            value.sum().backward()
    return rows


def markdown(rows: list[Row]) -> str:
    seen, lines = set(), [
        "| kernel | case | constexprs | warps | stages | registers | spilled bytes | shared KiB | CTAs/SM | occupancy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        key = (r.kernel, r.meta, r.warps, r.stages, r.registers, r.spill_bytes, r.shared)
        if key in seen:  # the same compiled kernel, reached by another case
            continue
        seen.add(key)
        lines.append(
            f"| `{r.kernel}` | {r.case} | {r.meta} | {r.warps} | {r.stages} | {r.registers} | {r.spill_bytes} | "
            f"{r.shared / 1024:.1f} | {r.ctas_per_sm()} | {r.occupancy():.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    print(f"triton {triton.__version__}, target sm_90 (H100: {REGISTERS} registers, "
          f"{SHARED_BYTES // 1024} KiB shared memory, {MAX_WARPS} warps per SM)\n")
    print(markdown(collect()))


if __name__ == "__main__":
    main()
