"""``mipic-bench gpu-suite``: everything the GPU targets are judged by, in one command
that can be cut short and resumed.

Stages, each a list of jobs (:func:`gpu_plan`):

* ``env``: versions, the device and its measured copy bandwidth and matrix rate
  (:mod:`benchmarks.device_probe`);
* ``tests``: ``tests/test_gpu.py`` with the GPU benchmark test, and
  ``tests/test_triton.py`` compiled for the device, each with a JUnit XML report;
* ``bench``: every GPU preset shape x provider x mode in bf16 (``torch.compile``
  included; the naive loops on ``small`` and the smallest bert-base shape only: they
  launch a few small kernels per example, width and operation, seconds per call at
  the larger shapes), then RBF (eager and fused) on the smallest and the largest
  bert-base shape;
* ``profile``: per-kernel tables (:mod:`benchmarks.kernel_profile`) of the fused and
  eager full step on bert-base and qwen3-0.6b and the fused no-grad forward on
  ``large``;
* ``overhead``: a MIPIC against a plain MRL training step of a BERT-base size encoder
  (random weights), batch 32, 128 tokens, bf16 autocast, fused loss
  (:mod:`benchmarks.step_overhead`).

``--stage all`` runs the jobs of every stage in the order the targets need them (the
bert-base and ``large`` rows first). Every job runs as its own process with a time
limit, writes under ``DIR/<stage>/<job>/`` with its log and ``status.json``, and is
not run again once done (nor once failed, unless ``--retry``). A job that would not
finish within ``--deadline`` seconds of the call's start is left for the next call.
After every job the summary (``DIR/summary.json``: the environment, each job's state,
each target met, missed or not measured with the numbers behind it, see
:mod:`benchmarks.targets`) is rewritten, all rows are merged into
``DIR/nested_cka.csv``, and DIR is packed into ``--archive`` (compile caches left out),
so a call cut short still leaves what it finished. Compile caches (inductor, triton)
live in ``DIR/cache``: a second call on the same machine starts warm.

``--dry-run`` runs the same stages at tiny shapes on the CPU (no Triton rows: they need
a CUDA GPU), in seconds, to check the suite itself. ``benchmarks/GPU.md`` gives the
command lines for a remote GPU machine and how to file what comes back.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from . import catalog

REPO = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "bench", "profile", "overhead")
SUMMARY = "summary.json"
STATUS = "status.json"
CACHE = "cache"
# The time budget of one benchmark case: the fused and eager calls take milliseconds,
# so their p50 settles well inside it.
BENCH_BUDGET = ("--budget", "1", "--min-calls", "10")
BENCH_LIMIT_S = 520.0
# A job stopped at the call's deadline this many times fails: it does not fit in a call.
MAX_CUTS = 2
# Where the naive loops run, and the bert-base shapes timed with the RBF kernel.
NAIVE_SHAPES = {("small", 4, 32), ("bert-base", 16, 128)}
RBF_SHAPES = ((16, 128), (128, 256))


@dataclass(frozen=True)
class Job:
    """One process of the suite. ``argv`` follows the Python executable; ``{out}`` in it
    is the job's output folder. ``estimate_s`` decides whether it still fits in the
    call; it is killed after ``limit_s``."""

    stage: str
    name: str
    argv: tuple[str, ...]
    estimate_s: float
    limit_s: float

    def command(self, out: Path) -> list[str]:
        return [sys.executable, *(a.replace("{out}", str(out)) for a in self.argv)]


def _bench_job(preset: str, shape: catalog.Shape, kernel: str, providers: Sequence[str], *, device: str,
               dtype: str, budget: Sequence[str], estimate: float) -> Job:
    name = f"{preset}_{shape}_{kernel}"
    argv = ("-m", "benchmarks.run", "--preset", preset, "--batch", str(shape.batch), "--tokens", str(shape.tokens),
            "--provider", *providers, "--kernel", kernel, "--device", device, "--dtype", dtype, *budget,
            "--no-figures", "--out", "{out}")
    # A cold compile may take far longer than guessed: such a job is cut at the call's
    # deadline and runs again next call, with warm caches, rather than fail.
    return Job("bench", name, argv, estimate, BENCH_LIMIT_S)


def _bench_estimate(providers: Sequence[str], modes: int = len(catalog.MODES)) -> float:
    # Guesses for an H100 host, to be replaced by measured job times: 10 s to start
    # (imports, CUDA, inputs); about 2 s per case (warm-up, the budget, the
    # peak-memory call); a cold torch.compile of one shape 25 s with and 25 s without
    # grad; the naive loops 8 s per mode; Triton compiling a new shape's kernels 10 s.
    extra = {"torch.compile": 50, "naive": 8 * modes, "triton": 10}
    return 10 + sum(2 * modes + extra.get(p, 0) for p in providers)


def gpu_plan(dry_run: bool = False) -> list[Job]:
    """The suite's jobs in the order ``--stage all`` runs them."""
    if dry_run:
        return _dry_plan()
    gpu = dict(device="cuda", dtype="bf16", budget=BENCH_BUDGET)
    every = list(catalog.PROVIDERS)

    def linear(preset: str) -> list[Job]:
        jobs = []
        for shape in catalog.PRESETS[preset].shapes():
            providers = [p for p in every if p != "naive" or (preset, shape.batch, shape.tokens) in NAIVE_SHAPES]
            jobs.append(_bench_job(preset, shape, "linear", providers, estimate=_bench_estimate(providers), **gpu))
        return jobs

    def profile(name: str, preset: str, batch: int, tokens: int, providers: Sequence[str], mode: str) -> Job:
        argv = ("-m", "benchmarks.kernel_profile", "--preset", preset, "--batch", str(batch), "--tokens",
                str(tokens), "--provider", *providers, "--mode", mode, "--device", "cuda", "--dtype", "bf16",
                "--out", "{out}")
        return Job("profile", name, argv, 45, 300)

    rbf_providers = ("torch", "triton")
    rbf = [_bench_job("bert-base", shape, "rbf", rbf_providers, estimate=_bench_estimate(rbf_providers), **gpu)
           for shape in catalog.PRESETS["bert-base"].shapes() if (shape.batch, shape.tokens) in RBF_SHAPES]
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "{out}/junit.xml")
    return [
        Job("env", "probe", ("-m", "benchmarks.device_probe", "--out", "{out}"), 30, 180),
        *linear("bert-base"),
        *linear("large"),
        Job("tests", "gpu", (*pytest, "-m", "gpu", "tests/test_gpu.py", "tests/test_benchmarks.py"), 180, 480),
        Job("overhead", "step", ("-m", "benchmarks.step_overhead", "--random-init", "bert-base", "--batch-size", "32",
                                 "--seq-len", "128", "--autocast", "bf16", "--backend", "triton", "--sia-layers",
                                 "2", "4", "6", "8", "9", "10", "12", "--repeats", "20", "--warmup", "3",
                                 "--device", "cuda", "--csv", "{out}/step_overhead.csv"), 90, 360),
        profile("bert-base", "bert-base", 128, 256, ("triton", "torch"), "full"),
        profile("qwen3-0.6b", "qwen3-0.6b", 16, 512, ("triton", "torch"), "full"),
        profile("large", "large", 16, 512, ("triton",), "no-grad"),
        *linear("qwen3-0.6b"),
        *linear("small"),
        Job("tests", "triton", (*pytest, "tests/test_triton.py"), 240, 540),
        *rbf,
    ]


def _dry_plan() -> list[Job]:
    """Every stage at tiny shapes on the CPU."""
    cpu = dict(device="cpu", dtype="fp32", budget=("--budget", "0.05", "--min-calls", "2", "--quick"))
    shape = catalog.PRESETS["small"].shapes()[0]
    pytest = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml", "{out}/junit.xml")
    return [
        Job("env", "probe", ("-m", "benchmarks.device_probe", "--out", "{out}", "--device", "cpu"), 10, 120),
        _bench_job("small", shape, "linear", ("naive", "torch", "triton"), estimate=10, **cpu),
        Job("tests", "gpu", (*pytest, "-m", "gpu", "tests/test_gpu.py"), 10, 120),
        Job("overhead", "step", ("-m", "benchmarks.step_overhead", "--random-init", "tiny", "--batch-size", "4",
                                 "--seq-len", "8", "--repeats", "2", "--warmup", "1", "--threads", "1",
                                 "--device", "cpu", "--csv", "{out}/step_overhead.csv"), 10, 120),
        Job("profile", "small", ("-m", "benchmarks.kernel_profile", "--preset", "small", "--provider", "torch",
                                 "triton", "--mode", "full", "--device", "cpu", "--calls", "1", "--warmup", "1",
                                 "--out", "{out}"), 10, 120),
    ]


# ------------------------------------------------------------------------------ running

def job_dir(out: Path, job: Job) -> Path:
    return out / job.stage / job.name


def job_status(out: Path, job: Job) -> Optional[dict]:
    """The recorded state of a job (``status`` is ``done`` or ``failed``), or None."""
    path = job_dir(out, job) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None


def run_jobs(jobs: Sequence[Job], out: Path, *, deadline_s: float, retry: bool,
             archive: Optional[Path], environ: Optional[dict] = None) -> None:
    """Run what is not done yet, as long as it fits in ``deadline_s``; after each job
    rewrite the summary and the archive."""
    started = time.monotonic()
    env = {**os.environ, **suite_environment(out), **(environ or {})}
    for job in jobs:
        state = job_status(out, job)
        if state is not None and (state["status"] == "done" or not retry):
            continue
        left = deadline_s - (time.monotonic() - started)
        if job.estimate_s > left:
            print(f"suite: {job.stage}/{job.name} left for the next call (needs about {job.estimate_s:.0f} s, "
                  f"{max(left, 0):.0f} s left)", flush=True)
            continue
        _run_job(job, out, min(job.limit_s, left), cut_by_deadline=left < job.limit_s, env=env)
        finish(out, archive)


def suite_environment(out: Path) -> dict:
    """Variables of every job: the checkout on the path, caches inside DIR, no downloads."""
    cache = (out / CACHE).resolve()
    return {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton"),
    }


def _run_job(job: Job, out: Path, limit_s: float, *, cut_by_deadline: bool, env: dict) -> None:
    final = job_dir(out, job)
    work = final.with_name(final.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    command = job.command(work)
    print(f"suite: {job.stage}/{job.name}: {' '.join(command[1:])} (limit {limit_s:.0f} s)", flush=True)
    began = time.monotonic()
    with open(work / "log.txt", "w") as log:
        try:
            code: Optional[int] = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                 timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.monotonic() - began
    cuts = final.with_name(final.name + ".cuts")
    if code is None and cut_by_deadline:
        # The call ran out of time, not the job: it runs again next call (with warm
        # caches), unless it was cut before too and so takes longer than a call.
        count = int(cuts.read_text()) + 1 if cuts.is_file() else 1
        if count < MAX_CUTS:
            cuts.write_text(str(count))
            print(f"suite: {job.stage}/{job.name} stopped at the call's deadline after {seconds:.0f} s; "
                  "it runs again next call", flush=True)
            shutil.rmtree(work)
            return
    cuts.unlink(missing_ok=True)
    status = {"status": "done" if code == 0 else "failed", "seconds": round(seconds, 1),
              "returncode": code, "command": command[1:]}
    if code is None and cut_by_deadline:
        status["reason"] = f"stopped at the call's deadline {MAX_CUTS} times (last after {seconds:.0f} s)"
    elif code is None:
        status["reason"] = f"killed after its limit of {limit_s:.0f} s"
    elif code != 0:
        status["reason"] = f"exit code {code}; last lines of log.txt: " + " | ".join(_tail(work / "log.txt", 5))
    (work / STATUS).write_text(json.dumps(status, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    print(f"suite: {job.stage}/{job.name} {status['status']} in {seconds:.0f} s"
          + (f": {status['reason']}" if "reason" in status else ""), flush=True)


def _tail(path: Path, lines: int) -> list[str]:
    text = path.read_text(errors="replace").splitlines()
    return [line.strip()[:200] for line in text[-lines:]]


def finish(out: Path, archive: Optional[Path]) -> dict:
    """Merge the rows, rewrite the summary and the archive; returns the summary."""
    from . import records, targets

    merged = out / records.CSV_NAME
    merged.unlink(missing_ok=True)
    for part in sorted(out.glob(f"bench/*/{records.CSV_NAME}")):
        records.append_rows(merged, records.read_rows(part))
    summary = targets.summarise(out)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if archive is not None:
        pack(out, archive)
    return summary


def pack(out: Path, archive: Path) -> None:
    """``out`` as a gzipped tar (folder entries relative to it), without the compile
    caches, unfinished jobs or the archive itself; written atomically."""
    archive = archive.resolve()
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_name(archive.name + ".partial")

    def keep(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
        parts = Path(info.name).parts  # "./cache/..." reads as ("cache", ...)
        if parts[:1] == (CACHE,) or any(p.endswith(".partial") for p in parts):
            return None
        if (out / info.name).resolve() == archive:
            return None
        return info

    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=".", filter=keep)
    partial.replace(archive)


def draw_figures(out: Path) -> None:
    from . import records

    merged = out / records.CSV_NAME
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    if merged.is_file():
        from .plot import plot_csv

        try:
            plot_csv(merged, out / "figures")
        except Exception as err:  # a figure must not cost the call its summary
            print(f"suite: no figures: {type(err).__name__}: {err}", flush=True)


# --------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipic-bench gpu-suite", description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Stages: " + ", ".join(STAGES) + ". See benchmarks/GPU.md for the command lines on a remote GPU machine.",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the suite's folder: what is there already is not run again")
    parser.add_argument("--stage", default="all", choices=("all", *STAGES),
                        help="run the jobs of one stage only (default: all, in the targets' order)")
    parser.add_argument("--deadline", type=float, default=530.0, metavar="SECONDS",
                        help="start no job that would not end within this many seconds (default: %(default)s)")
    parser.add_argument("--archive", type=Path, metavar="FILE",
                        help="pack DIR (caches left out) into this .tar.gz after every job")
    parser.add_argument("--retry", action="store_true", help="run failed jobs again")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage at tiny shapes on the CPU, to check the suite itself")
    parser.add_argument("--list", action="store_true", help="list the jobs and their state, run nothing")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    jobs = [job for job in gpu_plan(args.dry_run) if args.stage == "all" or job.stage == args.stage]
    args.out.mkdir(parents=True, exist_ok=True)
    if args.list:
        for job in jobs:
            state = job_status(args.out, job)
            print(f"{job.stage:<9} {job.name:<40} {state['status'] if state else 'to run':<7} "
                  f"~{job.estimate_s:.0f} s  python {' '.join(job.argv)}")
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("mipic-bench gpu-suite: torch sees no CUDA device; --dry-run checks the suite "
                             "on a CPU")
    run_jobs(jobs, args.out, deadline_s=args.deadline, retry=args.retry, archive=args.archive)
    draw_figures(args.out)
    summary = finish(args.out, args.archive)
    from .targets import summary_text

    print("\n" + summary_text(summary))
    if args.archive is not None:
        print(f"\narchive: {args.archive} ({args.archive.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
