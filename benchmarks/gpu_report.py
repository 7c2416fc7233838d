"""``mipic-bench gpu-report``: a GPU suite's results as the README's tables, and filing
them in the checkout, so that every number the README quotes comes from a committed
file.

    mipic-bench gpu-report gpu-suite.tar.gz --into benchmarks/results/gpu
    mipic-bench gpu-report benchmarks/results/gpu/2026-11-23_nvidia-h100-80gb-hbm3

With ``--into`` an archive of :mod:`benchmarks.suite` (or a suite folder) is unpacked
into ``<into>/<date>_<device>/`` (date and device from its ``environment.json``);
either way the tables are printed in Markdown: the environment, the bert-base full
step against every baseline, every preset's fused and baseline p50s with their
roofline fractions, the bandwidth and step-overhead targets, and each target's state.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from . import records
from .catalog import COPY, MODES, PROVIDERS

BASELINES = ("torch", "torch.compile", "naive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mipic-bench gpu-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a suite archive (.tar.gz) or a suite folder")
    parser.add_argument("--into", type=Path, metavar="DIR",
                        help="unpack or copy the suite into DIR/<date>_<device>/ first (e.g. benchmarks/results/gpu)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.source.exists():
        raise SystemExit(f"mipic-bench gpu-report: {args.source} does not exist")
    folder = args.source
    if args.into is not None:
        folder = file_suite(args.source, args.into)
        print(f"filed in {folder}\n")
    elif args.source.is_file():
        with tempfile.TemporaryDirectory() as scratch:
            _unpack(args.source, Path(scratch))
            print(report(Path(scratch), shown_as=args.source))
        return 0
    print(report(folder))
    return 0


def _unpack(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:  # Python before 3.11.4: the archive's own names are checked instead
            for member in tar.getmembers():
                if member.name.startswith("/") or ".." in Path(member.name).parts:
                    raise ValueError(f"{archive}: unsafe member {member.name!r}")
            tar.extractall(dest)


def _environment(folder: Path) -> dict:
    path = folder / "env" / "probe" / "environment.json"
    if not path.is_file():
        raise SystemExit(f"mipic-bench gpu-report: {folder} has no env/probe/environment.json: not a suite folder")
    return json.loads(path.read_text())


def file_suite(source: Path, into: Path) -> Path:
    """Unpack (or copy) a suite into ``into/<date>_<device>/``; returns that folder."""
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / "suite"
        if source.is_file():
            _unpack(source, staged)
        else:
            shutil.copytree(source, staged, ignore=shutil.ignore_patterns("cache", "*.partial", "*.tar.gz"))
        env = _environment(staged)
        slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
        dest = into / f"{env['date'][:10]}_{slug}"
        if dest.exists():
            shutil.rmtree(dest)
        into.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staged), dest)
    return dest


def _ms(row: Optional[dict]) -> str:
    return "" if row is None else f"{float(row['p50_ms']):.3g}"


def _ratio(base: Optional[dict], row: Optional[dict]) -> str:
    if base is None or row is None:
        return ""
    return f"{float(base['p50_ms']) / float(row['p50_ms']):.1f}x"


def _pct(row: Optional[dict]) -> str:
    return "" if row is None or not row["roofline_pct"] else f"{float(row['roofline_pct']):.1f}%"


def report(folder: Path, shown_as: Optional[Path] = None) -> str:
    """The Markdown tables of a suite folder."""
    from .plot import latest_rows

    env = _environment(folder)
    summary = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else None
    csv_path = folder / records.CSV_NAME
    rows = latest_rows(records.read_rows(csv_path)) if csv_path.is_file() else []
    index = {(r["preset"], r["shape"], r["kernel"], r["provider"], r["mode"]): r for r in rows}
    where = shown_as or folder
    dtypes = ", ".join(sorted({r["dtype"] for r in rows})) or "no rows"
    lines = [
        f"Measured on {env['device']} (torch {env['torch']}, CUDA {env.get('cuda')}, triton {env['triton']}), "
        f"commit {env['commit']}, {env['date']}"
        + (f"; measured copy {env['copy_tb_s']} TB/s, bf16 matrix product {env['bf16_matmul_tflop_s']} TFLOP/s"
           if env.get("copy_tb_s") else "")
        + f". Rows: {records.CSV_NAME} of `{where}`; p50 per call, {dtypes}; '% roofline' = the case's least "
          "work at the device's datasheet peaks / p50 (benchmarks/roofline.py).",
        "",
    ]
    shapes = list(dict.fromkeys(r["shape"] for r in rows if r["preset"] == "bert-base" and r["kernel"] == "linear"))
    if shapes:
        lines += ["bert-base, full step (forward + backward):", "",
                  "| shape | fused ms | x eager | x torch.compile | x naive | fused / eager peak memory "
                  "| fused % roofline |", "|---|---:|---:|---:|---:|---:|---:|"]
        for shape in shapes:
            fused = index.get(("bert-base", shape, "linear", "triton", "full"))
            base = {b: index.get(("bert-base", shape, "linear", b, "full")) for b in BASELINES}
            memory = (f"{float(fused['peak_mib']) / float(base['torch']['peak_mib']):.0%}"
                      if fused and base["torch"] and float(base["torch"]["peak_mib"]) > 0 else "")
            lines.append(f"| {shape} | {_ms(fused)} | {_ratio(base['torch'], fused)} | "
                         f"{_ratio(base['torch.compile'], fused)} | {_ratio(base['naive'], fused)} | {memory} | "
                         f"{_pct(fused)} |")
        lines.append("")
    cases = list(dict.fromkeys((r["preset"], r["shape"], r["kernel"]) for r in rows))
    if cases:
        providers = [p for p in (*PROVIDERS, COPY) if any(r["provider"] == p for r in rows)]
        lines += ["Every case, p50 ms (% of roofline):", "",
                  "| preset | shape | kernel | mode | " + " | ".join(providers) + " |",
                  "|---|---|---|---|" + "---:|" * len(providers)]
        for preset, shape, kernel in cases:
            for mode in MODES:
                cells = [index.get((preset, shape, kernel, p, mode)) for p in providers]
                if any(cells):
                    lines.append(f"| {preset} | {shape} | {kernel} | {mode} | " + " | ".join(
                        f"{_ms(c)} ({_pct(c)})" if c and c["roofline_pct"] else _ms(c) for c in cells) + " |")
        lines.append("")
    if summary is not None:
        lines += ["Targets:", ""]
        for t in summary["targets"]:
            value = "" if t["value"] is None else f": {t['value']} ({t['threshold']})"
            lines.append(f"- {t['status']}: {t['target']}{value}")
            lines += [f"  - {e}" for e in t["evidence"][:6]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
