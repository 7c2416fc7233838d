"""Timing and peak memory of one benchmark case, on CUDA and on a CPU.

Modes, as in Liger-Kernel's benchmarks (:data:`benchmarks.catalog.MODES`):

* ``forward``: the loss with autograd recording (the graph a training step keeps);
* ``backward``: ``loss.backward()`` of a forward recorded just before, untimed;
* ``full``: forward then backward;
* ``no-grad``: the loss under ``torch.no_grad()`` (evaluation, logging).

After warm-up calls that absorb compilation and first-call costs, calls are timed
until the p50 is stable or the case's time budget runs out (:class:`Budget`): the
95% confidence interval of the median (distribution-free, from order statistics)
must lie within ``target`` of it, after at least ``min_calls`` calls and
``min_seconds`` of timing. Without that, timing stops once ``seconds`` are spent
(after at least 5 calls, or ``min_calls`` if fewer), and the result says it is not
stable. The naive loops take seconds per call where the fused kernels take
milliseconds; both get a comparable share of the run. The number of calls is recorded
with every result, and so is the machine's load during the timing
(:mod:`mipic.machine`).

On CUDA each call sits between two CUDA events, with the L2 cache flushed before it (as
``triton.testing.do_bench`` does), read back in chunks; on a CPU ``time.perf_counter``
brackets each call. The backward is timed on a fresh graph each call rather than with
``retain_graph=True``: compiled backwards refuse to run twice on one graph, and a
training step frees the graph as it goes.

Peak memory is the most memory held at once during one call, above what was held
just before it: the inputs, and in ``backward`` mode the recorded graph, are left
out; the gradient of ``x`` is counted. On CUDA: ``torch.cuda.max_memory_allocated``.
On a CPU torch keeps no allocator statistics, so the allocations and frees of one
call are replayed from ``torch.profiler`` (``profile_memory=True``) in time order.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from mipic import machine
from .catalog import MODES
from .providers import LossFn
from .workload import Workload

_MIB = 2.0**20
# Bigger than the L2 cache of any current GPU (H100: 50 MiB), as in do_bench.
_FLUSH_BYTES = 256 * 2**20
# Calls per read-back of the CUDA events: a sync every call would time the sync.
_CUDA_CHUNK = 10
# Fewest timed calls when the budget runs out (unless min_calls is smaller).
_FLOOR_CALLS = 5


@dataclass(frozen=True)
class Budget:
    """When to stop timing one case: once the p50 is stable, or when time runs out."""

    min_calls: int = 10
    max_calls: int = 1000
    seconds: float = 3.0
    # Long enough for the load reading (mipic.machine) to mean something.
    min_seconds: float = 0.5
    # Relative half-width of the median's 95% confidence interval that counts as stable.
    target: float = 0.03

    def __post_init__(self) -> None:
        if self.min_calls < 1 or self.max_calls < self.min_calls:
            raise ValueError(f"need 1 <= min_calls <= max_calls; got {self.min_calls}, {self.max_calls}")
        if self.seconds <= 0 or self.target <= 0:
            raise ValueError(f"seconds and target must be > 0; got {self.seconds}, {self.target}")

    def done(self, times_ms: list[float], elapsed_s: float) -> bool:
        n = len(times_ms)
        if n >= self.max_calls:
            return True
        if elapsed_s >= self.seconds and n >= min(self.min_calls, _FLOOR_CALLS):
            return True
        return n >= self.min_calls and elapsed_s >= self.min_seconds and self.stable(times_ms)

    def stable(self, times_ms: list[float]) -> bool:
        return median_ci_half_width(times_ms) <= self.target


@dataclass(frozen=True)
class Measurement:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    peak_mib: float
    timer: str  # the clock and the number of timed calls, e.g. "perf_counter x10"
    ci: float  # relative half-width of the p50's 95% confidence interval
    stable: bool
    load: machine.Load


@dataclass(frozen=True)
class Case:
    """``call`` is timed; ``setup``, when given, runs untimed before every call."""

    call: Callable[[], object]
    setup: Optional[Callable[[], object]] = None


def mode_case(loss: LossFn, workload: Workload, mode: str) -> Case:
    """What ``mode`` times for ``loss`` on ``workload``."""
    x, mask = workload.x, workload.mask
    if mode == "forward":
        return Case(lambda: loss(x, mask))
    if mode == "no-grad":
        def no_grad() -> torch.Tensor:
            with torch.no_grad():
                return loss(x, mask)
        return Case(no_grad)
    if mode == "full":
        return Case(lambda: loss(x, mask).backward())
    if mode == "backward":
        recorded: list[torch.Tensor] = []
        return Case(lambda: recorded.pop().backward(), lambda: recorded.append(loss(x, mask)))
    raise ValueError(f"mode must be one of {MODES}; got {mode!r}")


def measure(case: Case, workload: Workload, *, warmup: int, budget: Budget) -> Measurement:
    """Warm up, time calls as ``budget`` says, then take the peak memory of one more."""
    x = workload.x
    for _ in range(max(warmup, 1)):
        _prepare(case, x)
        case.call()
    _sync(x)
    cuda = x.device.type == "cuda"
    with machine.probe() as window:
        times = _times_cuda(case, x, budget) if cuda else _times_cpu(case, x, budget)
    if cuda:
        peak = _peak_cuda(case, x)
    else:
        _prepare(case, x)
        peak = cpu_peak_bytes(case.call)
    p20, p50, p80 = quantiles(times)
    clock = "cuda events" if cuda else "perf_counter"
    return Measurement(p20, p50, p80, peak / _MIB, f"{clock} x{len(times)}",
                       median_ci_half_width(times), budget.stable(times), window.load)


def median_ci_half_width(times: list[float]) -> float:
    """Half the width of the p50's 95% confidence interval, relative to the p50.

    Distribution-free: ``[x_(r), x_(n+1-r)]`` of the sorted times covers the median
    with probability ``1 - 2 P(Binomial(n, 1/2) <= r - 1)``, so ``r`` is the largest
    rank that keeps this at least 95% (for fewer than 6 times none does, and the
    interval is the whole sample). Infinite for fewer than 2 times.
    """
    n = len(times)
    if n < 2:
        return math.inf
    ordered = sorted(times)
    r = _median_ci_rank(n)
    median = statistics.median(ordered)
    return (ordered[n - r] - ordered[r - 1]) / 2 / median if median > 0 else math.inf


@functools.lru_cache(maxsize=None)
def _median_ci_rank(n: int) -> int:
    rank, below, term = 1, 0, 1  # term = C(n, k); below = sum of C(n, j) for j <= k
    for k in range(n // 2):
        below += term
        if 40 * below > 2**n:  # P(B <= k) > 2.5%, in exact integers
            break
        rank = k + 1
        term = term * (n - k) // (k + 1)
    return rank


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _prepare(case: Case, x: torch.Tensor) -> None:
    x.grad = None
    if case.setup is not None:
        case.setup()


def _times_cpu(case: Case, x: torch.Tensor, budget: Budget) -> list[float]:
    times: list[float] = []
    began = time.perf_counter()
    while not budget.done(times, time.perf_counter() - began):
        _prepare(case, x)
        start = time.perf_counter()
        case.call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _times_cuda(case: Case, x: torch.Tensor, budget: Budget) -> list[float]:
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=x.device)
    times: list[float] = []
    began = time.perf_counter()
    while not budget.done(times, time.perf_counter() - began):
        chunk = min(_CUDA_CHUNK, budget.max_calls - len(times))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(chunk)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(chunk)]
        for start, end in zip(starts, ends):
            _prepare(case, x)
            flush.zero_()
            start.record()
            case.call()
            end.record()
        torch.cuda.synchronize(x.device)
        times += [start.elapsed_time(end) for start, end in zip(starts, ends)]
    return times


def _peak_cuda(case: Case, x: torch.Tensor) -> float:
    _prepare(case, x)
    torch.cuda.synchronize(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    before = torch.cuda.memory_allocated(x.device)
    case.call()
    torch.cuda.synchronize(x.device)
    return float(torch.cuda.max_memory_allocated(x.device) - before)


def quantiles(times: list[float]) -> tuple[float, float, float]:
    """p20, p50, p80 with linear interpolation between order statistics (numpy's rule)."""
    if len(times) == 1:
        return times[0], times[0], times[0]
    cuts = statistics.quantiles(times, n=10, method="inclusive")
    return cuts[1], statistics.median(times), cuts[7]


def cpu_peak_bytes(call: Callable[[], object]) -> float:
    """Peak of the running sum of CPU allocations minus frees during ``call()``."""
    from torch.profiler import ProfilerActivity, profile

    with _native_stderr_silenced(), profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        call()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return float(peak)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    # kineto logs two lines to the native stderr per profile, which would land in
    # the middle of the results table; this call already ran during the timing.
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
