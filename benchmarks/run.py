"""``mipic-bench``: time MIPIC's geometric term for every provider, print a table and
append the rows to one CSV.

With no arguments it runs the presets meant for the machine: on a CUDA GPU the GPU
presets (small, bert-base, qwen3-0.6b, large) in bf16; without one the CPU presets
(small and a CPU-sized bert-base) in fp32, where the Triton rows are skipped.
``mipic-bench plot`` draws the CSV (see :mod:`benchmarks.plot`).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import records
from .measure import MODES, TIME_BUDGET_S, Case, Measurement, measure, mode_case
from .presets import PRESETS, Workload, default_presets, make_workload, parse_dtype
from .providers import COPY, PROVIDERS

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
_ROW = "{preset:<14} {shape:<20} {provider:<14} {mode:<9} {p20:>10} {p50:>10} {p80:>10} {peak:>10} {ratio:>8}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipic-bench",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=_listing() + "\n\n'mipic-bench plot --help' for the figures.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS), metavar="NAME",
                        help=f"presets to run ({', '.join(PRESETS)}); default: those for the device")
    parser.add_argument("--provider", nargs="+", choices=list(PROVIDERS), metavar="NAME",
                        help=f"providers ({', '.join(PROVIDERS)}); default: all")
    parser.add_argument("--mode", nargs="+", choices=MODES, metavar="MODE",
                        help=f"modes ({', '.join(MODES)}); default: all")
    parser.add_argument("--dtype", help="bf16, fp16, fp32 or fp64; default bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--device", help="cuda, cuda:N or cpu; default cuda when available")
    parser.add_argument("--kernel", choices=("linear", "rbf"), default="linear",
                        help="CKA kernel (MIPIC uses linear)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per case (default 10 on a CPU, 100 on CUDA; 3 and 20 "
                             "with --quick); slow cases get fewer, down to 5, to stay near "
                             f"{TIME_BUDGET_S:.0f} s each")
    parser.add_argument("--csv", type=Path, default=None,
                        help=f"CSV to append to (default {records.default_csv()})")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    parser.add_argument("--quick", action="store_true",
                        help="the first shape of each preset, fewer timed calls, 1 warm-up")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token states")
    return parser


def _listing() -> str:
    lines = ["providers:"]
    lines += [f"  {p.name:<15} {p.description}" for p in PROVIDERS.values()]
    lines.append("presets:")
    for p in PRESETS.values():
        def joined(values: tuple) -> str:
            return "/".join(str(v) for v in values)
        shape = f"L{p.layers} B{joined(p.batches)} T{joined(p.tokens)} D{p.depth}"
        k = p.k if isinstance(p.k, int) else joined(p.k)
        lines.append(f"  {p.name:<15} {p.description}\n  {'':<15} {shape}, widths {joined(p.dims)}, k {k}, k_min {p.k_min}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"]:
        from .plot import main as plot_main

        return plot_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"mipic-bench: --device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mipic-bench: --device cuda but torch sees no CUDA device")
    try:
        dtype = parse_dtype(args.dtype, device)
    except ValueError as err:
        raise SystemExit(f"mipic-bench: {err}") from None
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit("mipic-bench: --repeats must be >= 1")
    on_gpu = device.type == "cuda"
    repeats = args.repeats or {(False, False): 10, (False, True): 3, (True, False): 100, (True, True): 20}[
        (on_gpu, args.quick)]
    warmup = 1 if args.quick else 2
    presets = args.preset or default_presets(device)
    # torch first: every other row reports its speed-up over it.
    providers = sorted(args.provider or list(PROVIDERS), key=lambda name: name != "torch")
    modes = args.mode or list(MODES)
    csv_path = None if args.no_csv else (args.csv or records.default_csv())

    _quiet_compile_logs()
    env = {
        "commit": records.commit_id(), "device": records.device_name(device),
        "torch": torch.__version__, "triton": records.triton_version(),
        "dtype": _DTYPE_NAMES[dtype], "kernel": args.kernel,
    }
    print(f"mipic-bench: nested top-k CKA loss (MIPIC's geometric term), {args.kernel} kernel, {env['dtype']}")
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    if not on_gpu:
        why = "no CUDA GPU" if not torch.cuda.is_available() else "--device cpu"
        print(f"On the CPU ({why}): the Triton rows need a CUDA GPU and are skipped, and the naive "
              "loops run at small shapes only (see benchmarks/NOTES.md for the GPU targets).")
    print("times in ms (p20 / p50 / p80), peak memory in MiB above the inputs, "
          "'x torch' = torch p50 / p50\n")
    print(_ROW.format(preset="preset", shape="shape", provider="provider", mode="mode", p20="p20",
                      p50="p50", p80="p80", peak="peak MiB", ratio="x torch"))

    written = 0
    for preset_name in presets:
        preset = PRESETS[preset_name]
        for shape in preset.shapes()[:1] if args.quick else preset.shapes():
            workload = make_workload(preset, shape, dtype=dtype, device=device, seed=args.seed)
            rows = run_workload(workload, providers, modes, kernel=args.kernel,
                                warmup=warmup, repeats=repeats)
            del workload
            if csv_path is not None and rows:
                records.append_rows(csv_path, [{**env, **row} for row in rows])
                written += len(rows)
    if csv_path is not None:
        print(f"\n{written} rows appended to {csv_path}; draw them with 'mipic-bench plot'")
    return 0


def run_workload(
    workload: Workload, providers: Sequence[str], modes: Sequence[str], *,
    kernel: str, warmup: int, repeats: int,
) -> list[dict]:
    """Measure every provider and mode on one workload, printing each row as it comes.

    Returns the CSV rows without the environment columns (commit, device, versions,
    dtype, kernel).
    """
    preset, shape = workload.preset.name, str(workload.shape)
    torch_p50: dict[str, float] = {}
    rows = []

    def report(provider: str, mode: str, result: Measurement) -> None:
        ratio = torch_p50[mode] / result.p50_ms if mode in torch_p50 else None
        print(_ROW.format(
            preset=preset, shape=shape, provider=provider, mode=mode,
            p20=f"{result.p20_ms:.3f}", p50=f"{result.p50_ms:.3f}", p80=f"{result.p80_ms:.3f}",
            peak=f"{result.peak_mib:.1f}", ratio="" if ratio is None else f"{ratio:.2f}",
        ), flush=True)
        rows.append({
            "date": records.utc_now(), "preset": preset, "shape": shape,
            "provider": provider, "mode": mode,
            "p20_ms": f"{result.p20_ms:.4f}", "p50_ms": f"{result.p50_ms:.4f}",
            "p80_ms": f"{result.p80_ms:.4f}", "peak_mib": f"{result.peak_mib:.2f}",
            "timer": result.timer,
        })

    if workload.preset.bandwidth_bound:
        x = workload.x.detach()
        copy = measure(Case(x.clone), workload, warmup=warmup, repeats=repeats)
        report(COPY, "forward", copy)
        # A copy reads and writes x once each.
        print(f"{'':<14} {'':<20} {COPY:<14} {2 * x.nbytes / copy.p50_ms / 1e6:.0f} GB/s "
              f"({x.nbytes / 2**20:.0f} MiB read + written)", flush=True)
    for provider in (PROVIDERS[name] for name in providers):
        reason = provider.skip_reason(workload)
        if reason is None:
            try:
                loss = provider.build(workload, kernel)
                for mode in modes:
                    result = measure(mode_case(loss, workload, mode), workload,
                                     warmup=warmup, repeats=repeats)
                    if provider.name == "torch":
                        torch_p50[mode] = result.p50_ms
                    report(provider.name, mode, result)
            except torch.OutOfMemoryError:
                reason = "out of memory (remaining modes not run)"
            except NotImplementedError as err:
                reason = f"not implemented: {err}"
            except torch._dynamo.exc.BackendCompilerFailed as err:
                reason = f"torch.compile failed: {str(err).splitlines()[0]}"
            workload.x.grad = None
            if workload.x.device.type == "cuda":
                torch.cuda.empty_cache()
        if reason is not None:
            print(f"{preset:<14} {shape:<20} {provider.name:<14} skipped: {reason}", flush=True)
    return rows


def _quiet_compile_logs() -> None:
    # The reference checks its input and reads k.max() on the host, so dynamo splits
    # it into several graphs and logs each break; the timings already include that.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")


if __name__ == "__main__":
    sys.exit(main())
