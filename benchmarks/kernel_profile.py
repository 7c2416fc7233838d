"""Where one benchmark case spends its time, kernel by kernel, under ``torch.profiler``.

For each provider and mode of one preset shape: after warm-up calls, ``--calls`` calls
run under the profiler; every device kernel (on CUDA; every torch operation's own CPU
time on a CPU) is listed with its launches and time per call and its share of the
total, longest first. The device time per call against the wall time per call (both
under the profiler) says whether the case is bound by its kernels or by launching them.

Writes ``kernels.csv`` (one row per kernel) and, per provider and mode, torch's own
table (``<provider>_<mode>.txt``) to ``--out``, and prints the top of each list::

    python -m benchmarks.kernel_profile --preset bert-base --batch 128 --tokens 256 \\
        --provider triton torch --mode full --out profile/bert-base
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from . import catalog

FIELDS = ("preset", "shape", "dtype", "kernel", "provider", "mode", "name", "launches_per_call",
          "us_per_call", "share_pct", "device_us_per_call", "wall_us_per_call", "device", "torch", "triton",
          "commit", "date")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", required=True, choices=list(catalog.PRESETS))
    parser.add_argument("--batch", type=int, help="the preset's batch size to profile (default: its first)")
    parser.add_argument("--tokens", type=int, help="the preset's sequence length (default: its first)")
    parser.add_argument("--provider", nargs="+", default=["triton"], choices=list(catalog.PROVIDERS))
    parser.add_argument("--mode", nargs="+", default=["full"], choices=catalog.MODES)
    parser.add_argument("--dtype", default=None, choices=list(catalog.DTYPES),
                        help="default bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--kernel", default="linear", choices=("linear", "rbf"))
    parser.add_argument("--calls", type=int, default=5, help="profiled calls (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="calls before profiling (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=25, help="kernels printed per case (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from . import records
    from .providers import PROVIDERS
    from .workload import make_workload, torch_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    preset = catalog.PRESETS[args.preset]
    shapes = [s for s in preset.shapes()
              if (args.batch in (None, s.batch)) and (args.tokens in (None, s.tokens))]
    if not shapes:
        raise SystemExit(f"kernel_profile: {args.preset} has no shape with batch {args.batch} and "
                         f"{args.tokens} tokens")
    workload = make_workload(preset, shapes[0], dtype=torch_dtype(dtype_name), device=device, seed=args.seed)
    env = {"preset": preset.name, "shape": str(workload.shape), "dtype": dtype_name, "kernel": args.kernel,
           "device": records.device_name(device), "torch": torch.__version__, "triton": records.triton_version(),
           "commit": records.commit_id(), "date": records.utc_now()}
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for name in args.provider:
        provider = PROVIDERS[name]
        reason = provider.skip_reason(workload)
        if reason is not None:
            print(f"{name}: skipped: {reason}")
            continue
        loss = provider.build(workload, args.kernel)
        for mode in args.mode:
            kernels, table, device_us, wall_us = profile_case(loss, workload, mode, calls=args.calls,
                                                              warmup=args.warmup)
            (args.out / f"{name}_{mode}.txt").write_text(table)
            busy = "device time" if device.type == "cuda" else "CPU time in torch operations"
            print(f"\n{env['preset']} {env['shape']} {dtype_name} {name} {mode}: {device_us:.1f} us of {busy} "
                  f"in {wall_us:.1f} us wall per call (under the profiler), "
                  f"{sum(k['launches_per_call'] for k in kernels):.0f} launches")
            print(f"  {'us/call':>10} {'share':>6} {'launches':>8}  kernel")
            for k in kernels[:args.rows]:
                print(f"  {k['us_per_call']:10.1f} {k['share_pct']:5.1f}% {k['launches_per_call']:8.1f}  "
                      f"{k['name'][:100]}")
            rows += [{**env, "provider": name, "mode": mode, **k, "device_us_per_call": f"{device_us:.2f}",
                      "wall_us_per_call": f"{wall_us:.2f}"} for k in kernels]
        workload.x.grad = None
    for row in rows:
        row["us_per_call"] = f"{row['us_per_call']:.3f}"
        row["share_pct"] = f"{row['share_pct']:.2f}"
        row["launches_per_call"] = f"{row['launches_per_call']:g}"
    records.append_rows(args.out / "kernels.csv", rows, FIELDS)
    print(f"\n{len(rows)} kernel rows written to {args.out / 'kernels.csv'}")
    return 0


def profile_case(loss, workload, mode: str, *, calls: int, warmup: int) -> tuple[list[dict], str, float, float]:
    """Profile ``calls`` calls of ``loss`` in ``mode``. Returns (kernels longest first,
    torch's table, device microseconds per call, wall microseconds per call). On a CPU
    the "kernels" are the torch operations and their own CPU time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from .measure import mode_case

    case = mode_case(loss, workload, mode)
    x = workload.x
    cuda = x.device.type == "cuda"

    def call() -> None:
        x.grad = None
        if case.setup is not None:
            case.setup()
        case.call()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(x.device)

    for _ in range(warmup):
        call()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6 / calls
    averages = prof.key_averages()
    if cuda:
        events = [e for e in averages if e.device_type == DeviceType.CUDA]
        times = [e.device_time_total for e in events]
        sort_by = "self_device_time_total"
    else:
        events = [e for e in averages if e.self_cpu_time_total > 0]
        times = [e.self_cpu_time_total for e in events]
        sort_by = "self_cpu_time_total"
    total = sum(times) or 1.0
    kernels = sorted(
        ({"name": e.key, "launches_per_call": e.count / calls, "us_per_call": t / calls,
          "share_pct": 100.0 * t / total} for e, t in zip(events, times)),
        key=lambda k: -k["us_per_call"],
    )
    return kernels, averages.table(sort_by=sort_by, row_limit=40), total / calls, wall_us


if __name__ == "__main__":
    sys.exit(main())
