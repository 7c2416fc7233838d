"""Flags on result rows whose numbers say the machine was not quiet while they were taken.

A flag does not drop a row: it says how far to trust it. Per row:

* ``unstable``: the time budget ran out before the p50 settled (its 95% confidence
  interval stayed wider than the target);
* ``spread``: p80 / p20 above :data:`MAX_SPREAD`, i.e. calls of the same work took
  very different times;
* ``busy``: other processes kept more CPU busy during the timing than the cores this
  run left free (``others_cores`` in the row).

Across the modes of one provider on one workload:

* ``order``: a part took longer than the whole: ``forward`` or ``backward`` above
  ``full`` (forward + backward), or ``no-grad`` above ``forward``, by more than
  :data:`ORDER_SLACK`. The work cannot do that; the machine can.
"""

from __future__ import annotations

from typing import Mapping, Optional

MAX_SPREAD = 1.5
ORDER_SLACK = 1.2
# Contention is read to a few tenths of a core (see mipic.machine).
BUSY_SLACK_CORES = 0.25
# (smaller, larger): the p50 of mode ``smaller`` must not exceed that of ``larger``.
ORDERINGS = (("forward", "full"), ("backward", "full"), ("no-grad", "forward"))

LEGEND = {
    "unstable": "the p50 did not settle within the time budget",
    "spread": f"p80 / p20 above {MAX_SPREAD:g}",
    "busy": "other processes used the cores this run needed",
    "order": "a part timed slower than the whole (e.g. forward above forward + backward)",
}


def row_flags(
    *, p20: float, p80: float, stable: bool, others_cores: Optional[float], cores: int, threads: int,
) -> list[str]:
    """The flags of one row; ``threads`` is how many cores the run itself keeps busy."""
    flags = []
    if not stable:
        flags.append("unstable")
    if p20 > 0 and p80 / p20 > MAX_SPREAD:
        flags.append("spread")
    if others_cores is not None and others_cores > max(cores - threads, 0) + BUSY_SLACK_CORES:
        flags.append("busy")
    return flags


def order_violations(p50_by_mode: Mapping[str, float]) -> list[tuple[str, str]]:
    """The ``(part, whole)`` mode pairs of one provider whose p50s break an ordering;
    both rows of each pair get the ``order`` flag."""
    return [
        (smaller, larger) for smaller, larger in ORDERINGS
        if smaller in p50_by_mode and larger in p50_by_mode
        and p50_by_mode[smaller] > ORDER_SLACK * p50_by_mode[larger]
    ]
