"""``mipic-bench``: time MIPIC's geometric term for every provider, print a table, and
write the rows (CSV) and figures (PNG) to an output folder.

With no arguments it runs the presets meant for the machine: on a CUDA GPU the GPU
presets (small, bert-base, qwen3-0.6b, large) in bf16; without one the CPU presets
(small and a CPU-sized bert-base) in fp32, where the Triton rows are skipped. Each case
is timed until its p50 is stable or its time budget runs out; rows whose numbers say
the machine was busy are flagged. ``mipic-bench plot`` redraws the figures of a folder
(see :mod:`benchmarks.plot`).

Arguments are parsed before torch is imported, so help and argument errors are
immediate.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from . import catalog

if TYPE_CHECKING:
    from .measure import Budget, Measurement
    from .roofline import DeviceSpec
    from .workload import Workload

# Subcommands: name -> (module, what it does); each module has main(argv).
SUBCOMMANDS = {
    "plot": ("benchmarks.plot", "redraw the figures of a results folder"),
    "roofline": ("benchmarks.roofline", "the least work of every preset row and the designs' traffic"),
    "gpu-suite": ("benchmarks.suite", "everything a GPU is measured by, in resumable stages (benchmarks/GPU.md)"),
    "gpu-report": ("benchmarks.gpu_report", "a GPU suite's results as README tables; file them in the checkout"),
}

_ROW = ("{preset:<14} {shape:<20} {provider:<14} {mode:<9} {p20:>10} {p50:>10} {p80:>10} {ci:>6} "
        "{peak:>9} {ratio:>8} {roof:>6}  {flags}")


def _device(text: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N; got {text!r}")
    return text


def _dtype(text: str) -> str:
    try:
        return catalog.dtype_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(catalog.DTYPES)}; got {text!r}") from None


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0:
            raise argparse.ArgumentTypeError(f"must be a {'number' if kind is float else 'whole number'} > 0; "
                                             f"got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipic-bench",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=catalog.listing() + "\n\nsubcommands ('mipic-bench NAME --help'):\n" + "\n".join(
            f"  {name:<15} {what}" for name, (_, what) in SUBCOMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", nargs="+", choices=list(catalog.PRESETS), metavar="NAME",
                        help=f"presets to run ({', '.join(catalog.PRESETS)}); default: those for the device")
    parser.add_argument("--provider", nargs="+", choices=list(catalog.PROVIDERS), metavar="NAME",
                        help=f"providers ({', '.join(catalog.PROVIDERS)}); default: all")
    parser.add_argument("--mode", nargs="+", choices=catalog.MODES, metavar="MODE",
                        help=f"modes ({', '.join(catalog.MODES)}); default: all")
    parser.add_argument("--dtype", type=_dtype,
                        help=f"{', '.join(catalog.DTYPES)}; default bf16 on CUDA, fp32 on a CPU")
    parser.add_argument("--device", type=_device, help="cuda, cuda:N or cpu; default cuda when available")
    parser.add_argument("--kernel", choices=("linear", "rbf"), default="linear",
                        help="CKA kernel (MIPIC uses linear)")
    parser.add_argument("--budget", type=_positive(float), metavar="SECONDS",
                        help="timing budget per case: calls are timed until the p50 is stable or this "
                             "runs out (default 3 on a CPU, 2 on CUDA, 0.5 with --quick)")
    parser.add_argument("--min-calls", type=_positive(int), metavar="N",
                        help="timed calls per case before the p50 may count as stable "
                             "(default 10 on a CPU, 20 on CUDA, 3 with --quick)")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="folder for nested_cka.csv (appended to) and the figures; default: a new "
                             "folder per run under ~/.cache/mipic-bench. '--out benchmarks/results' "
                             "refreshes the committed results")
    parser.add_argument("--no-save", action="store_true", help="print the table only")
    parser.add_argument("--batch", nargs="+", type=_positive(int), metavar="N",
                        help="only the shapes of these batch sizes (of the presets that sweep them)")
    parser.add_argument("--tokens", nargs="+", type=_positive(int), metavar="T",
                        help="only the shapes of these sequence lengths")
    parser.add_argument("--no-figures", action="store_true", help="write the CSV rows but no figures")
    parser.add_argument("--quick", action="store_true",
                        help="the first shape of each preset, a short budget, 1 warm-up call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token states")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(SUBCOMMANDS[argv[0]][0]).main(argv[1:])
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Measure what the parsed arguments ask for; the table goes to stdout."""
    import torch

    from mipic import machine

    from . import records, roofline
    from .measure import Budget
    from .workload import make_workload, torch_dtype

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("mipic-bench: --device cuda but torch sees no CUDA device")
    on_gpu = device.type == "cuda"
    dtype_name = args.dtype or ("bf16" if on_gpu else "fp32")
    budget = Budget(
        min_calls=args.min_calls or (3 if args.quick else 20 if on_gpu else 10),
        seconds=args.budget or (0.5 if args.quick else 2.0 if on_gpu else 3.0),
        min_seconds=0.0 if args.quick else Budget.min_seconds,
    )
    warmup = 1 if args.quick else 2
    presets = args.preset or catalog.default_presets(on_gpu)
    # torch first: every other row reports its speed-up over it.
    providers = sorted(args.provider or list(catalog.PROVIDERS), key=lambda name: name != "torch")
    modes = args.mode or list(catalog.MODES)
    out_dir = None if args.no_save else (args.out or records.default_out_dir())

    _quiet_compile_logs()
    env = {
        "commit": records.commit_id(), "device": records.device_name(device),
        "torch": torch.__version__, "triton": records.triton_version(),
        "dtype": dtype_name, "kernel": args.kernel,
    }
    spec = roofline.device_spec(env["device"]) if on_gpu else None
    cores = machine.cpu_count()
    # On CUDA one host thread launches the work; on a CPU every intra-op thread is busy.
    threads = 1 if on_gpu else torch.get_num_threads()
    start_load = machine.load_average()
    print(f"mipic-bench: nested top-k CKA loss (MIPIC's geometric term), {args.kernel} kernel, {dtype_name}")
    print(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    print(f"load average {_fmt(start_load)} on {cores} cores; each case is timed until its p50 is stable "
          f"(95% interval within {100 * budget.target:g}%) or {budget.seconds:g} s have passed")
    if not on_gpu:
        why = "no CUDA GPU" if not torch.cuda.is_available() else "--device cpu"
        print(f"On the CPU ({why}): the Triton rows need a CUDA GPU and are skipped, and the naive "
              "loops run at small shapes only (see benchmarks/NOTES.md for the GPU targets).")
    print("times in ms (p20 / p50 / p80), '+-%' = the p50's 95% interval, peak memory in MiB above "
          "the inputs, 'x torch' = torch p50 / p50, '%roof' = the case's least work at the device's "
          "peaks / p50 (benchmarks/roofline.py)")
    if spec is None:
        print(f"No roofline: no peak rates for {env['device']} (benchmarks.roofline.DEVICES)")
    else:
        print(f"Roofline: {spec.name} peaks, {spec.hbm_tb_s:g} TB/s, "
              f"{spec.matrix_rate(torch_dtype(dtype_name)) / 1e12:.0f} TFLOP/s matrix ({dtype_name})")
    print()
    print(_ROW.format(preset="preset", shape="shape", provider="provider", mode="mode", p20="p20",
                      p50="p50", p80="p80", ci="+-%", peak="peak MiB", ratio="x torch", roof="%roof",
                      flags="flags"))

    rows: list[dict] = []
    for preset_name in presets:
        preset = catalog.PRESETS[preset_name]
        shapes = [s for s in preset.shapes()
                  if (not args.batch or s.batch in args.batch) and (not args.tokens or s.tokens in args.tokens)]
        if not shapes:
            print(f"{preset_name:<14} no shape with batch {args.batch or 'any'} and tokens {args.tokens or 'any'}; "
                  f"its shapes: {', '.join(map(str, preset.shapes()))}")
        for shape in shapes[:1] if args.quick else shapes:
            workload = make_workload(preset, shape, dtype=torch_dtype(dtype_name), device=device, seed=args.seed)
            new = run_workload(workload, providers, modes, kernel=args.kernel, warmup=warmup, budget=budget,
                               cores=cores, threads=threads, roofline_device=spec)
            del workload
            rows += new
            if out_dir is not None and new:
                records.append_rows(out_dir / records.CSV_NAME, [{**env, **row} for row in new])
    _summary(rows, start_load, machine.load_average(), cores)
    if out_dir is not None:
        _save_figures(out_dir, len(rows), figures=not args.no_figures)
    return 0


def run_workload(
    workload: "Workload", providers: Sequence[str], modes: Sequence[str], *,
    kernel: str, warmup: int, budget: "Budget", cores: int, threads: int,
    roofline_device: Optional["DeviceSpec"] = None,
) -> list[dict]:
    """Measure every provider and mode on one workload, printing each row as it comes.

    Returns the CSV rows without the environment columns (commit, device, versions,
    dtype, kernel). ``cores`` and ``threads`` (the cores the run keeps busy) decide the
    ``busy`` flag; ``roofline_device`` (the peaks of the device) fills the roofline
    columns.
    """
    import torch

    from . import flags, records, roofline
    from .measure import Case, measure, mode_case
    from .providers import PROVIDERS

    preset, shape = workload.preset.name, str(workload.shape)
    torch_p50: dict[str, float] = {}
    rows = []
    problem = roofline.workload_problem(workload, kernel) if roofline_device is not None else None

    def limit(provider: str, mode: str) -> Optional[tuple[float, str]]:
        if roofline_device is None:
            return None
        work = (roofline.copy_traffic(workload.x.nbytes) if provider == catalog.COPY
                else roofline.lower_bound(problem, mode))
        return roofline.limit_ms(work, roofline_device, workload.x.dtype)

    def report(provider: str, mode: str, result: "Measurement") -> dict:
        ratio = torch_p50[mode] / result.p50_ms if mode in torch_p50 else None
        bound = limit(provider, mode)
        pct = None if bound is None else 100 * bound[0] / result.p50_ms
        row_flags = flags.row_flags(p20=result.p20_ms, p80=result.p80_ms, stable=result.stable,
                                    others_cores=result.load.others_cores, cores=cores, threads=threads)
        print(_ROW.format(
            preset=preset, shape=shape, provider=provider, mode=mode,
            p20=f"{result.p20_ms:.3f}", p50=f"{result.p50_ms:.3f}", p80=f"{result.p80_ms:.3f}",
            ci=f"{100 * result.ci:.1f}" if result.ci < 10 else ">999", peak=f"{result.peak_mib:.1f}",
            ratio="" if ratio is None else f"{ratio:.2f}", roof="" if pct is None else f"{pct:.1f}",
            flags=" ".join(row_flags),
        ), flush=True)
        row = {
            "date": records.utc_now(), "preset": preset, "shape": shape,
            "provider": provider, "mode": mode,
            "p20_ms": f"{result.p20_ms:.4f}", "p50_ms": f"{result.p50_ms:.4f}",
            "p80_ms": f"{result.p80_ms:.4f}", "peak_mib": f"{result.peak_mib:.2f}",
            "timer": result.timer, "p50_ci_pct": f"{100 * result.ci:.2f}",
            "load_before": _fmt(result.load.before), "load_after": _fmt(result.load.after),
            "others_cores": _fmt(result.load.others_cores), "flags": ";".join(row_flags),
            "roofline_ms": "" if bound is None else f"{bound[0]:.6g}",
            "roofline_pct": "" if pct is None else f"{pct:.4g}",
            "roofline_bound": "" if bound is None else bound[1],
        }
        rows.append(row)
        return row

    if workload.preset.bandwidth_bound:
        x = workload.x.detach()
        copy = measure(Case(x.clone), workload, warmup=warmup, budget=budget)
        report(catalog.COPY, "forward", copy)
        # A copy reads and writes x once each.
        print(f"{'':<14} {'':<20} {catalog.COPY:<14} {2 * x.nbytes / copy.p50_ms / 1e6:.0f} GB/s "
              f"({x.nbytes / 2**20:.0f} MiB read + written)", flush=True)
    for provider in (PROVIDERS[name] for name in providers):
        reason = provider.skip_reason(workload)
        by_mode: dict[str, dict] = {}
        if reason is None:
            try:
                loss = provider.build(workload, kernel)
                for mode in modes:
                    result = measure(mode_case(loss, workload, mode), workload, warmup=warmup, budget=budget)
                    if provider.name == "torch":
                        torch_p50[mode] = result.p50_ms
                    by_mode[mode] = report(provider.name, mode, result)
            except torch.OutOfMemoryError:
                reason = "out of memory (remaining modes not run)"
            except NotImplementedError as err:
                reason = f"not implemented: {err}"
            except torch._dynamo.exc.BackendCompilerFailed as err:
                reason = f"torch.compile failed: {str(err).splitlines()[0]}"
            workload.x.grad = None
            if workload.x.device.type == "cuda":
                torch.cuda.empty_cache()
        violations = flags.order_violations({m: float(r["p50_ms"]) for m, r in by_mode.items()})
        for mode in dict.fromkeys(m for pair in violations for m in pair):
            by_mode[mode]["flags"] = ";".join(filter(None, (by_mode[mode]["flags"], "order")))
        for part, whole in violations:
            print(f"{preset:<14} {shape:<20} {provider.name:<14} order: {part} p50 above {whole} p50; "
                  "both rows flagged", flush=True)
        if reason is not None:
            print(f"{preset:<14} {shape:<20} {provider.name:<14} skipped: {reason}", flush=True)
    return rows


def _summary(rows: list[dict], start_load: Optional[float], end_load: Optional[float], cores: int) -> None:
    from . import flags

    counts = Counter(flag for row in rows for flag in row["flags"].split(";") if flag)
    flagged = sum(1 for row in rows if row["flags"])
    print(f"\n{len(rows)} rows; load average {_fmt(start_load)} at the start, {_fmt(end_load)} at the end, "
          f"on {cores} cores.")
    if not flagged:
        print("No row is flagged: no sign that the machine was busy.")
        return
    print(f"{flagged} rows flagged; their numbers say the machine was not quiet:")
    for flag, count in counts.most_common():
        print(f"  {flag:<9} {count:>3} rows: {flags.LEGEND[flag]}")
    print("The p20 of a flagged row is its least disturbed figure; re-run on an idle machine "
          "(or with fewer threads, OMP_NUM_THREADS=1) before trusting its p50 or ratios.")


def _save_figures(out_dir: Path, n_rows: int, *, figures: bool = True) -> None:
    from . import records

    csv_path = out_dir / records.CSV_NAME
    if not n_rows:
        print(f"\nnothing measured; no results written to {out_dir}")
        return
    print(f"\nresults: {out_dir}")
    print(f"  {records.CSV_NAME}: {n_rows} rows appended")
    if not figures:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  no figures: they need matplotlib (pip install 'mipic-kernels[bench]'), then "
              f"'mipic-bench plot --out {out_dir}'")
        return
    from .plot import plot_csv

    for path in plot_csv(csv_path, out_dir):
        print(f"  {path.name}")


def _fmt(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def _quiet_compile_logs() -> None:
    import logging
    import warnings

    # The reference checks its input and reads k.max() on the host, so dynamo splits
    # it into several graphs and logs each break; the timings already include that.
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\._inductor")


if __name__ == "__main__":
    sys.exit(main())
