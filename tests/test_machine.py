"""The machine's load: other processes' CPU time, and the threads the trainer takes."""

from __future__ import annotations

import pytest

from mipic import machine


def _fake_window(monkeypatch, busy: float, own: float, wall: float, cores: int) -> None:
    # Machine busy seconds and this process's CPU seconds at the start and end of a window.
    snapshots = iter([(100.0, 10.0, 50.0), (100.0 + busy, 10.0 + own, 50.0 + wall)])
    monkeypatch.setattr(machine, "_snapshot", lambda: next(snapshots))
    monkeypatch.setattr(machine, "cpu_count", lambda: cores)


def test_probe_counts_other_processes_cpu_time(monkeypatch) -> None:
    with machine.probe() as window:  # the real machine
        sum(range(10**5))
    assert window.load.others_cores is None or window.load.others_cores >= 0
    # 6 busy seconds over 2 s of wall time, 2 of them this process's: others kept 2 cores busy.
    _fake_window(monkeypatch, busy=6.0, own=2.0, wall=2.0, cores=4)
    with machine.probe() as window:
        pass
    assert window.load.others_cores == pytest.approx(2.0)


@pytest.mark.parametrize("others, cores, default, expected", [
    (1.4, 2, 2, 1),   # the shared 2-core machine: one core left
    (0.2, 2, 2, 2),   # nearly idle: torch's default
    (1.9, 2, 2, 1),   # never fewer than one
    (0.0, 8, 4, 4),   # never more than torch's default
    (3.4, 8, 8, 5),
])
def test_spare_threads_take_the_cores_others_leave(monkeypatch, others, cores, default, expected) -> None:
    _fake_window(monkeypatch, busy=others, own=0.0, wall=1.0, cores=cores)
    monkeypatch.setattr(machine, "default_threads", lambda: default)
    monkeypatch.setattr(machine.time, "sleep", lambda seconds: None)
    assert machine.spare_threads() == (expected, pytest.approx(others))


def test_spare_threads_without_proc_stat_keep_the_default(monkeypatch) -> None:
    monkeypatch.setattr(machine, "_busy_seconds", lambda: None)
    monkeypatch.setattr(machine, "default_threads", lambda: 3)
    monkeypatch.setattr(machine.time, "sleep", lambda seconds: None)
    assert machine.spare_threads() == (3, None)
