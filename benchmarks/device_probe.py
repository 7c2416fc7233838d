"""The machine a GPU suite ran on: library versions, the device and its two measured
ceilings (copy bandwidth and bf16 matrix rate), written to ``environment.json``.

The ceilings are what the datasheet peaks of :mod:`benchmarks.roofline` are checked
against: a device-to-device copy of ``--copy-mib`` MiB (bytes read + written over the
median of 10 timed copies after 3 warm-ups) and a square bf16 matrix product of edge
``--matmul`` on random data (median of 10 after 3). On a CPU both are skipped.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_probe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="writes DIR/environment.json")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--copy-mib", type=int, default=2048, help="size of the timed copy (default: %(default)s)")
    parser.add_argument("--matmul", type=int, default=8192, help="edge of the timed product (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import records, roofline

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env: dict = {
        "date": records.utc_now(), "commit": records.commit_id(), "python": platform.python_version(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": records.triton_version(),
        "transformers": _version("transformers"), "sentence_transformers": _version("sentence_transformers"),
        "numpy": _version("numpy"), "device": records.device_name(device), "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        spec = roofline.device_spec(env["device"])
        env.update({
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1) or None,
            "roofline_entry": spec and spec.name, "nvidia_smi": _nvidia_smi(),
            "copy_tb_s": round(_copy_rate(device, args.copy_mib) / 1e12, 3),
            "bf16_matmul_tflop_s": round(_matmul_rate(device, args.matmul) / 1e12, 1),
        })
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    for key, value in env.items():
        print(f"{key:>22}: {value}")
    return 0


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def _nvidia_smi() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit"
    try:
        done = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{query}: {done.stdout.strip()}"


def _median_ms(fn: Callable[[], object], device) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_rate(device, mib: int) -> float:
    """Bytes read + written per second by a device-to-device copy."""
    import torch

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms / 1e3)


def _matmul_rate(device, edge: int) -> float:
    """FLOP/s of a square bf16 product on random data."""
    import torch

    a = torch.randn(edge, edge, device=device, dtype=torch.bfloat16)
    b = torch.randn(edge, edge, device=device, dtype=torch.bfloat16)
    ms = _median_ms(lambda: a @ b, device)
    return 2 * edge**3 / (ms / 1e3)


if __name__ == "__main__":
    sys.exit(main())
