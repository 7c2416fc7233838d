"""Timing and peak memory of one benchmark case, on CUDA and on a CPU.

Modes, as in Liger-Kernel's benchmarks:

* ``forward``: the loss with autograd recording (the graph a training step keeps);
* ``backward``: ``loss.backward()`` of a forward recorded just before, untimed;
* ``full``: forward then backward;
* ``no-grad``: the loss under ``torch.no_grad()`` (evaluation, logging).

Times are p20/p50/p80 in milliseconds over a fixed number of calls, after warm-up
calls that absorb compilation and first-call costs. A case whose last warm-up call
took long gets fewer calls (never fewer than 5, or the number asked for if that is
smaller), so that one case times about ``TIME_BUDGET_S`` at most: the naive loops
take seconds per call where the fused kernels take milliseconds. The count used is
recorded with every result. On CUDA each call sits between
two CUDA events, with the L2 cache flushed before it (as ``triton.testing.do_bench``
does); on a CPU ``time.perf_counter`` brackets each call. The backward is timed on a
fresh graph each call rather than with ``retain_graph=True``: compiled backwards
refuse to run twice on one graph, and a training step frees the graph as it goes.

Peak memory is the most memory held at once during one call, above what was held
just before it: the inputs, and in ``backward`` mode the recorded graph, are left
out; the gradient of ``x`` is counted. On CUDA: ``torch.cuda.max_memory_allocated``.
On a CPU torch keeps no allocator statistics, so the allocations and frees of one
call are replayed from ``torch.profiler`` (``profile_memory=True``) in time order.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from .presets import Workload
from .providers import LossFn

MODES = ("forward", "backward", "full", "no-grad")
TIME_BUDGET_S = 5.0
_MIN_CALLS = 5
_MIB = 2.0**20
# Bigger than the L2 cache of any current GPU (H100: 50 MiB), as in do_bench.
_FLUSH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Measurement:
    p20_ms: float
    p50_ms: float
    p80_ms: float
    peak_mib: float
    timer: str  # the clock and the number of timed calls, e.g. "perf_counter x10"


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


def measure(case: Case, workload: Workload, *, warmup: int, repeats: int) -> Measurement:
    """Warm up, then time up to ``repeats`` calls and take the peak memory of one more."""
    x = workload.x
    last_s = 0.0
    for _ in range(max(warmup, 1)):
        _prepare(case, x)
        _sync(x)
        start = time.perf_counter()
        case.call()
        _sync(x)
        last_s = time.perf_counter() - start
    repeats = min(repeats, max(_MIN_CALLS, int(TIME_BUDGET_S / max(last_s, 1e-9))))
    if x.device.type == "cuda":
        clock = "cuda events"
        times = _times_cuda(case, x, repeats)
        peak = _peak_cuda(case, x)
    else:
        clock = "perf_counter"
        times = _times_cpu(case, x, repeats)
        _prepare(case, x)
        peak = cpu_peak_bytes(case.call)
    p20, p50, p80 = quantiles(times)
    return Measurement(p20, p50, p80, peak / _MIB, f"{clock} x{repeats}")


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


def _prepare(case: Case, x: torch.Tensor) -> None:
    x.grad = None
    if case.setup is not None:
        case.setup()


def _times_cpu(case: Case, x: torch.Tensor, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        _prepare(case, x)
        start = time.perf_counter()
        case.call()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _times_cuda(case: Case, x: torch.Tensor, repeats: int) -> list[float]:
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=x.device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    torch.cuda.synchronize(x.device)
    for start, end in zip(starts, ends):
        _prepare(case, x)
        flush.zero_()
        start.record()
        case.call()
        end.record()
    torch.cuda.synchronize(x.device)
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


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
