"""Figures from the benchmark CSV: speed and peak memory per preset and device.

``mipic-bench`` draws them at the end of a run; ``mipic-bench plot --out DIR`` redraws
those of a results folder. One PNG per preset, device and dtype, next to the CSV: the
top row gives the p50 time of each provider (bars, log scale) with its p20-p80 range,
the bottom row the peak memory, one column per mode; hatched bars are flagged rows
(:mod:`benchmarks.flags`). When the CSV holds the same case more than once, the latest
row counts. Needs matplotlib (``pip install mipic-kernels[bench]``).
"""

from __future__ import annotations

import argparse
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from . import records
from .catalog import COPY, MODES, PROVIDERS


def latest_rows(rows: list[dict]) -> list[dict]:
    """One row per case (the most recent), in CSV order of first appearance."""
    keys = ("device", "dtype", "kernel", "preset", "shape", "provider", "mode")
    latest: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[k] for k in keys)
        if key not in latest or row["date"] >= latest[key]["date"]:
            latest[key] = row
    return list(latest.values())


def plot_csv(csv_path: Path, out_dir: Optional[Path] = None, device: Optional[str] = None) -> list[Path]:
    """Write the figures for ``csv_path``; ``device`` keeps rows whose device contains it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    # Within a decade, label 2x and 5x only: every minor tick would overlap.
    sparse = FuncFormatter(
        lambda value, _: f"{value:g}" if round(value / 10 ** math.floor(math.log10(value))) in (2, 5) else ""
    )

    rows = latest_rows(records.read_rows(csv_path))
    if device is not None:
        rows = [r for r in rows if device.lower() in r["device"].lower()]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["preset"], row["device"], row["dtype"], row["kernel"])].append(row)

    out_dir = Path(out_dir) if out_dir is not None else Path(csv_path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (preset, dev, dtype, kernel), group in groups.items():
        modes = [m for m in MODES if any(r["mode"] == m for r in group)]
        shapes = list(dict.fromkeys(r["shape"] for r in group))
        order = [*PROVIDERS, COPY]
        providers = [p for p in order if any(r["provider"] == p for r in group)]
        fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 7.5), squeeze=False)
        width = 0.8 / len(providers)
        for col, mode in enumerate(modes):
            by_key = {(r["shape"], r["provider"]): r for r in group if r["mode"] == mode}
            speed, memory = axes[0][col], axes[1][col]
            for i, provider in enumerate(providers):
                color = f"C{order.index(provider)}"
                xs, p50, lo, hi, mib, hatch = [], [], [], [], [], []
                for j, shape in enumerate(shapes):
                    row = by_key.get((shape, provider))
                    if row is None:
                        continue
                    xs.append(j + (i - (len(providers) - 1) / 2) * width)
                    p50.append(float(row["p50_ms"]))
                    lo.append(float(row["p50_ms"]) - float(row["p20_ms"]))
                    hi.append(float(row["p80_ms"]) - float(row["p50_ms"]))
                    mib.append(float(row["peak_mib"]))
                    hatch.append("//" if row["flags"] else "")
                bars = speed.bar(xs, p50, width, yerr=[lo, hi], capsize=2, label=provider, color=color)
                for bar, pattern in zip(bars, hatch):
                    bar.set_hatch(pattern)
                memory.bar(xs, mib, width, label=provider, color=color)
            speed.set_yscale("log")
            speed.yaxis.set_major_formatter(plain)
            speed.yaxis.set_minor_formatter(sparse)
            speed.set_title(mode)
            speed.set_ylabel("time per call, ms (p50; p20-p80)")
            memory.set_ylabel("peak memory, MiB")
            for ax in (speed, memory):
                ax.set_xticks(range(len(shapes)))
                ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=8)
                ax.grid(axis="y", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        flagged = " (hatched: flagged, the machine was busy)" if any(r["flags"] for r in group) else ""
        fig.suptitle(f"nested top-k CKA loss, preset {preset} ({kernel}, {dtype}) on {dev}{flagged}")
        fig.tight_layout()
        path = out_dir / f"{_slug(preset)}_{_slug(dev)}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="mipic-bench plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help=f"results folder: reads DIR/{records.CSV_NAME} and writes the PNGs there "
                             f"(default: the latest run under {records.default_root()})")
    parser.add_argument("--device", default=None, help="only rows whose device name contains this")
    args = parser.parse_args(argv)
    out_dir = args.out or records.latest_run()
    if out_dir is None:
        raise SystemExit(f"mipic-bench plot: no run under {records.default_root()}; run mipic-bench first "
                         "or pass --out DIR")
    csv_path = out_dir / records.CSV_NAME
    if not csv_path.is_file():
        raise SystemExit(f"mipic-bench plot: no results at {csv_path.resolve()}; run mipic-bench first")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("mipic-bench plot needs matplotlib: pip install 'mipic-kernels[bench]'") from None
    for path in plot_csv(csv_path, out_dir, args.device):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
