"""Throughput and memory of ``mipic train`` on one process against several processes
started by ``torchrun`` (DDP or FSDP2), on the same configuration and whole batch.

Each run is ``--runs`` entry: ``plain`` (``mipic train`` without a process group), or
``MODE:N`` with MODE ``ddp`` or ``fsdp`` and N processes on this node (``ddp:1`` is the
DDP code path with one process). Every run trains ``--steps`` optimiser steps with a
metrics record per step; the first ``--warmup`` steps are left out and the others give
the step time's 20th, 50th and 80th percentiles (wall time of rank 0, which waits for
every process at each gradient reduction) and examples per second at the median. Memory:
the peak resident set of the largest process (from the operating system, every process
of the run) and, on GPUs, ``peak_memory_mib`` of rank 0's metrics (tensors only). One row
per run is appended to the CSV with the device, versions, load and date.

On a CPU every process gets ``--threads`` threads, so N processes use N times the cores
of one: the rows compare the same work split over more cores, on a machine whose other
load is recorded beside them.

    HF_HUB_OFFLINE=1 python -m benchmarks.data_parallel --config configs/minilm-small.yaml \\
        --set model.name=PATH --runs plain ddp:2 --steps 12 --threads 1 --csv benchmarks/results/data_parallel.csv
    python -m benchmarks.data_parallel --config configs/bert-base.yaml --set data.path=sentences.txt \\
        --runs plain ddp:1 fsdp:1                                                      # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from benchmarks import records
from benchmarks.measure import quantiles
from mipic import machine

FIELDS = ["date", "commit", "device", "torch", "transformers", "config", "overrides", "run", "processes",
          "threads", "batch", "steps_timed", "p20_s", "p50_s", "p80_s", "examples_per_s", "peak_rss_mib",
          "peak_gpu_mib", "load_before", "load_after"]
MODES = ("ddp", "fsdp")


def parse_run(text: str) -> tuple[str, int]:
    """``plain`` -> ("plain", 1); ``ddp:2`` -> ("ddp", 2)."""
    if text == "plain":
        return "plain", 1
    mode, _, count = text.partition(":")
    if mode not in MODES or not count.isdigit() or int(count) < 1:
        raise ValueError(f"a run is 'plain' or MODE:N with MODE in {MODES} and N >= 1; got {text!r}")
    return mode, int(count)


def _run_name(text: str) -> str:
    try:
        parse_run(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def free_port() -> int:
    """A TCP port nothing listens on now, for the rendezvous of one run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run: str, config: str, output: Path, overrides: Sequence[str], steps: int, threads: int,
            port: int) -> list[str]:
    """The command line of one run."""
    mode, processes = parse_run(run)
    sets = [*overrides, f"train.max_steps={steps}", "train.log_every=1", "train.save_every=null",
            "train.progress=false", f"train.threads={threads}"]
    if mode != "plain":
        sets.append(f"train.parallel={mode}")
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={port}"] if mode != "plain" else [sys.executable]
    return [*launcher, "-m", "mipic", "train", "--config", config, "--output", str(output),
            *(arg for s in sets for arg in ("--set", s))]


def measure(run: str, args: argparse.Namespace) -> dict:
    """Run ``run`` and return its CSV row."""
    import torch
    import transformers

    from mipic.config import load_config

    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as folder, machine.probe() as window:
        output = Path(folder) / "run"
        proc = subprocess.Popen(command(run, args.config, output, args.set, args.steps, args.threads,
                                        free_port()))
        _, status, usage = os.wait4(proc.pid, 0)  # the peak of every process the run waited for
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"data_parallel: the {run} run failed")
        rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    timed = [r["step_seconds"] for r in rows[args.warmup:]]
    p20, p50, p80 = quantiles(timed)
    device = torch.device("cuda") if torch.cuda.is_available() and cfg.train.device != "cpu" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    return {
        "date": records.utc_now(), "commit": records.commit_id(), "device": records.device_name(device),
        "torch": torch.__version__, "transformers": transformers.__version__, "config": args.config,
        "overrides": " ".join(args.set), "run": run, "processes": parse_run(run)[1], "threads": args.threads,
        "batch": cfg.train.batch_size * cfg.train.grad_accum, "steps_timed": len(timed),
        "p20_s": round(p20, 4), "p50_s": round(p50, 4), "p80_s": round(p80, 4),
        "examples_per_s": round(cfg.train.batch_size * cfg.train.grad_accum / p50, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # kilobytes on Linux
        "peak_gpu_mib": rows[-1].get("peak_memory_mib", ""),
        "load_before": _rounded(window.load.before), "load_after": _rounded(window.load.after),
    }


def _rounded(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a mipic train configuration file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a configuration override, as mipic train --set (repeatable)")
    parser.add_argument("--runs", nargs="+", default=["plain", "ddp:2"], type=_run_name,
                        help="plain, or MODE:N (ddp or fsdp on N processes); default: plain ddp:2")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run (default 12)")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the times (default 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each process on a CPU (default 1)")
    parser.add_argument("--csv", type=Path, default=records.default_out_dir() / "data_parallel.csv",
                        help="the CSV the rows are appended to")
    args = parser.parse_args(argv)
    if args.steps - args.warmup < 3:
        parser.error("--steps must exceed --warmup by at least 3 (the percentiles need timed steps)")
    rows = []
    for run in args.runs:
        rows.append(measure(run, args))
        row = rows[-1]
        print(f"{run:>8}: p50 {row['p50_s']} s/step (p20 {row['p20_s']}, p80 {row['p80_s']}), "
              f"{row['examples_per_s']} examples/s, peak RSS {row['peak_rss_mib']} MiB"
              + (f", GPU {row['peak_gpu_mib']} MiB" if row["peak_gpu_mib"] != "" else ""), flush=True)
    records.append_rows(args.csv, rows, FIELDS)
    print(f"rows appended to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
