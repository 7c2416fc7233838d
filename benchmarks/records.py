"""The one CSV schema of benchmark results, where a run writes them, and the
environment each row records.

A run writes to an output folder: ``nested_cka.csv`` (appended to when the folder
already holds one) and the figures beside it. By default the folder is new for each
run and lies outside any source checkout (:func:`default_out_dir`); the committed
results in ``benchmarks/results`` change only when a run is pointed there.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Sequence

if TYPE_CHECKING:
    import torch

SCHEMA = (
    "date", "commit", "device", "torch", "triton",
    "preset", "shape", "dtype", "kernel", "provider", "mode",
    "p20_ms", "p50_ms", "p80_ms", "peak_mib", "timer",
    # How far to trust the row: the p50's 95% confidence half-width, the 1-minute load
    # average before and after, the cores other processes used meanwhile, and the flags
    # of benchmarks.flags (';'-separated). Empty in rows written before they existed.
    "p50_ci_pct", "load_before", "load_after", "others_cores", "flags",
    # The row's physical limit on its device (benchmarks.roofline): the least work of its
    # case at the device's peaks, 100 * that / p50, and what binds (memory, matrix or
    # fma). Empty on devices without peak rates (CPUs) and in rows written before.
    "roofline_ms", "roofline_pct", "roofline_bound",
)

PACKAGE_DIR = Path(__file__).resolve().parent
CSV_NAME = "nested_cka.csv"
COMMIT_VARIABLE = "MIPIC_BENCH_COMMIT"


def default_root() -> Path:
    """The folder that holds one subfolder per run: ``mipic-bench`` in the user's cache
    folder (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "mipic-bench"


def default_out_dir() -> Path:
    """A new folder for this run under :func:`default_root`, named by its UTC start time."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = default_root() / stamp
    n = 1
    while folder.exists():  # two runs started within a second
        n += 1
        folder = default_root() / f"{stamp}-{n}"
    return folder


def latest_run() -> Optional[Path]:
    """The most recent run folder under :func:`default_root` that holds results."""
    root = default_root()
    runs = sorted(p.parent for p in root.glob(f"*/{CSV_NAME}")) if root.is_dir() else []
    return runs[-1] if runs else None


def append_rows(path: Path, rows: Iterable[dict], schema: Sequence[str] = SCHEMA) -> None:
    """Append rows (dicts with exactly the ``schema`` keys), writing the header to a new file.

    A file written before the last columns existed (its header a prefix of ``schema``)
    is rewritten first with those columns empty.
    """
    schema = tuple(schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with path.open(newline="") as f:
            header = tuple(next(csv.reader(f), None) or ())
        if header != schema:
            old = read_rows(path, schema)  # raises unless the header is an older schema
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=schema)
                writer.writeheader()
                writer.writerows(old)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=schema)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path, schema: Sequence[str] = SCHEMA) -> list[dict]:
    """The rows of a results CSV, each with every ``schema`` key (empty where the file
    predates the column)."""
    schema = tuple(schema)
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        header = tuple(reader.fieldnames or ())
        if not header or schema[:len(header)] != header:
            raise ValueError(f"{path} does not have the header {','.join(schema)}; pass another file or folder")
        missing = schema[len(header):]
        return [{**row, **dict.fromkeys(missing, "")} for row in reader]


def device_name(device: "torch.device") -> str:
    """The GPU's name, or ``cpu (<model>, <n> threads)``."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"cpu ({_cpu_model()}, {threads} thread{'s' if threads > 1 else ''})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown model"


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "none"
    return triton.__version__


def commit_id() -> str:
    """Short commit of the source checkout, ``-dirty`` when the kernels or the
    benchmarks (results aside) have uncommitted changes; ``unknown`` outside git.

    ``$MIPIC_BENCH_COMMIT``, when set, is taken as is: a copy of the tree without its git
    metadata (a remote machine's working copy) names its commit that way.
    """
    if os.environ.get(COMMIT_VARIABLE):
        return os.environ[COMMIT_VARIABLE]

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(
                ["git", "-C", str(PACKAGE_DIR), *args],
                capture_output=True, text=True, timeout=10, check=True,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    changes = git(
        "status", "--porcelain", "--untracked-files=no", "--",
        ":(top)mipic_kernels", ":(top)benchmarks", ":(top,exclude)benchmarks/results",
    )
    return head + ("-dirty" if changes else "")


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
