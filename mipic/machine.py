"""What else the machine is doing: the benchmarks record it with every timing, and the
trainer sizes its CPU threads by it.

Two readings per window:

* the 1-minute load average before and after (``os.getloadavg``), which is what a
  reader of the results can compare across machines, but lags by a minute;
* ``others_cores``: the CPU time that other processes (and the hypervisor, as steal
  time) used during the window, in cores: the busy time of every CPU in
  ``/proc/stat`` minus this process's own CPU time, divided by the wall time. This is
  the direct measure of contention; it is None where ``/proc/stat`` does not exist.

Torch runs one intra-op thread per core by default, and every parallel operation waits
for its slowest thread: when other processes keep some cores busy, a thread that shares
a core stalls every operation. On a 2-core machine with other work on about 1.4 cores,
a training step of all-MiniLM-L6-v2 took 7-9 s with 2 threads and 2-3 s with 1
(docs/trainer.md); :func:`spare_threads` picks the thread count from the measured load.

The kernel counts CPU time in ticks of 10 ms per CPU, so a window of a fraction of a
second reads ``others_cores`` only to a few tenths of a core.
"""

from __future__ import annotations

import functools
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

_PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class Load:
    """Load averages before and after a window, and the cores other processes kept busy."""

    before: Optional[float]
    after: Optional[float]
    others_cores: Optional[float]


class LoadWindow:
    """Filled in when the ``with probe() as window`` block ends."""

    load: Load = Load(None, None, None)


def load_average() -> Optional[float]:
    """The 1-minute load average, or None where the system has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def cpu_count() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextmanager
def probe() -> Iterator[LoadWindow]:
    """Measure the load around the block: ``with probe() as window: ...; window.load``."""
    window = LoadWindow()
    before = load_average()
    busy_start, own_start, wall_start = _snapshot()
    yield window
    busy_end, own_end, wall_end = _snapshot()
    others = None
    if busy_start is not None and busy_end is not None and wall_end > wall_start:
        others = max(0.0, ((busy_end - busy_start) - (own_end - own_start)) / (wall_end - wall_start))
    window.load = Load(before, load_average(), others)


@functools.lru_cache(maxsize=None)
def default_threads() -> int:
    """Torch's intra-op threads as this process found them (before any choice made here)."""
    import torch

    return torch.get_num_threads()


def spare_threads(window_s: float = 0.5) -> tuple[int, Optional[float]]:
    """Threads for the cores that other processes leave free, measured over ``window_s``
    seconds: ``round(cores - others_cores)``, at least 1 and at most torch's default.
    Returns the count and the cores others used (None where that cannot be read: then
    torch's default)."""
    default = default_threads()
    with probe() as window:
        time.sleep(window_s)
    others = window.load.others_cores
    if others is None:
        return default, None
    return max(1, min(default, round(cpu_count() - others))), others


def _snapshot() -> tuple[Optional[float], float, float]:
    """Busy CPU seconds of the whole machine, CPU seconds of this process (every
    thread: ``process_time``), and the wall clock."""
    return _busy_seconds(), time.process_time(), time.perf_counter()


def _busy_seconds() -> Optional[float]:
    """CPU seconds every CPU spent not idle since boot (user, nice, system, irq, softirq,
    steal; guest time is already inside user)."""
    try:
        fields = _PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
