"""CKA maps: time and peak memory of every layer pair's CKA, accumulated over minibatches.

    python -m benchmarks.cka_map [--workload NAME ...] [--threads N] [--repeats N] [--csv PATH | --no-csv]

Rows are appended to ``cka_map.csv`` in the folder of
:func:`benchmarks.records.default_root`, outside the checkout, or to ``--csv PATH``
(``--csv benchmarks/results/cka_map.csv`` refreshes the committed rows).

Every provider turns the same float32 layer features (``La`` layers of model A and
``Lb`` of model B, each ``(n, width)`` per minibatch) into the ``(La, Lb)`` map of
unbiased linear CKA, summing each minibatch's unbiased HSIC (Nguyen et al. 2021):

* ``mipic``: :class:`mipic_kernels.MinibatchCKA`, ``update`` per minibatch, then
  ``compute``.
* ``pytorch-cka``: the package ``pytorch-cka`` (``import cka``) as its ``CKA`` class
  runs per minibatch: one Gram per layer (``torch.mm``), all pairs' HSIC from
  ``cka.hsic.hsic`` (``hsic_cross`` for one model against itself) added to float32
  sums, the map from ``CKA._compute_cka_matrix``. Its model hooks are left out: both
  providers start from the same features.
* ``pair-loop``: one pair at a time, the textbook way: for every layer pair and
  minibatch both Grams are formed again and the three unbiased HSIC terms (Song et
  al. 2012) added to float32 sums.
* ``expanded`` (one-minibatch workloads): :func:`mipic_kernels.cka` on the pairs
  expanded to ``(La, Lb, n, width)``, the reference on every pair.

Calls of the providers alternate (round robin), so that a busy machine slows them
alike; each call is timed with ``time.perf_counter`` after one untimed call. A
provider whose first call is slow gets fewer timed calls (at least 3), to keep a
workload near ``TIME_BUDGET_S`` per provider. Peak memory: as in
:mod:`benchmarks.measure` (the profiler's allocation record of one more call).
Every row also carries ``max_err``, the largest absolute difference from the exact
map (``mipic`` on float64 features) over entries both define, and ``off_1e-3``, the
number of entries off by more than 1e-3 (pytorch-cka clamps every value into [0, 1]
and replaces zero denominators by 1e-6).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

import mipic_kernels as mk

from . import records
from .measure import cpu_peak_bytes, quantiles

TIME_BUDGET_S = 20.0
MIN_CALLS = 3
CSV_NAME = "cka_map.csv"
SCHEMA = (
    "date", "commit", "device", "torch", "pytorch_cka", "workload", "shape", "dtype", "provider",
    "p20_ms", "p50_ms", "p80_ms", "peak_mib", "x_pytorch_cka", "max_err", "off_1e-3", "timer",
)
_MIB = 2.0**20


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    layers_a: int
    layers_b: Optional[int]  # None: model A against itself
    rows: tuple[int, ...]  # rows of each minibatch
    width: int
    related: bool = True  # the layers share a signal; False: independent layers (CKA near 0)

    @property
    def shape(self) -> str:
        b = "self" if self.layers_b is None else str(self.layers_b)
        low, high = min(self.rows), max(self.rows)
        rows = str(low) if low == high else f"{low}-{high}"
        return f"La{self.layers_a} Lb{b} {len(self.rows)}x n{rows} w{self.width}"


WORKLOADS = {
    w.name: w for w in (
        Workload("map-512", "7 x 7 layers, one minibatch of 512 rows, width 384",
                 7, 7, (512,), 384),
        Workload("minilm-pooled", "MiniLM over the 2910 STS-B dev texts, pooled: 46 minibatches of 63-64",
                 7, 7, (64,) * 12 + (63,) * 34, 384),
        Workload("minilm-tokens", "MiniLM over tokens: 8 of the ~1040-row minibatches of STS-B dev",
                 7, 7, (1003, 987, 1112, 995, 1101, 990, 1008, 1099), 384),
        Workload("self", "one model against itself: 13 layers, 4 minibatches of 256 rows, width 768",
                 13, None, (256,) * 4, 768),
        Workload("independent", "7 x 7 unrelated layers (CKA near 0, often below): 4 minibatches of 64 rows",
                 7, 7, (64,) * 4, 384, related=False),
    )
}


def make_features(workload: Workload, seed: int = 0, dtype: torch.dtype = torch.float32) -> list[tuple]:
    """Per minibatch, ``(xs, ys)``: hidden-state-like layers ``(L, n, width)`` that share
    a signal (so the map has structure; none for an unrelated workload) plus noise and
    a common offset per feature, as real hidden states carry; ``ys`` is None for a
    self map."""
    gen = torch.Generator().manual_seed(seed)
    layers = workload.layers_a + (workload.layers_b or 0)
    mixing = torch.randn(layers, 8, workload.width, generator=gen) / math.sqrt(8) * float(workload.related)
    offset = 2.0 * torch.randn(layers, 1, workload.width, generator=gen)
    out = []
    for n in workload.rows:
        signal = torch.randn(n, 8, generator=gen)
        x = (signal @ mixing + torch.randn(layers, n, workload.width, generator=gen) + offset).to(dtype)
        out.append((x[:workload.layers_a], None if workload.layers_b is None else x[workload.layers_a:]))
    return out


# ---------------------------------------------------------------- providers


def mipic_map(batches: list[tuple]) -> torch.Tensor:
    acc = mk.MinibatchCKA()
    for xs, ys in batches:
        acc.update(xs, ys)
    return acc.compute()


def pytorch_cka_map(batches: list[tuple]) -> torch.Tensor:
    from cka import CKA
    from cka.hsic import hsic, hsic_cross

    xs0, ys0 = batches[0]
    la, lb = xs0.shape[0], (xs0 if ys0 is None else ys0).shape[0]
    xy, xx = torch.zeros(la, lb), torch.zeros(la)
    yy = xx if ys0 is None else torch.zeros(lb)
    for xs, ys in batches:
        grams_x = torch.stack([torch.mm(f, f.T) for f in xs])
        if ys is None:
            cross = hsic_cross(grams_x, grams_x)
            xy += cross
            xx += torch.diagonal(cross)
        else:
            grams_y = torch.stack([torch.mm(f, f.T) for f in ys])
            cross, self_x, self_y = hsic(grams_x, grams_y)
            xy += cross
            xx += self_x
            yy += self_y
    return CKA._compute_cka_matrix(None, xy, xx, yy)


def pair_loop_map(batches: list[tuple]) -> torch.Tensor:
    xs0, ys0 = batches[0]
    xs_layers = xs0.shape[0]
    ys_layers = (xs0 if ys0 is None else ys0).shape[0]
    xy = torch.zeros(xs_layers, ys_layers, dtype=xs0.dtype)
    xx = torch.zeros(xs_layers, ys_layers, dtype=xs0.dtype)
    yy = torch.zeros(xs_layers, ys_layers, dtype=xs0.dtype)
    for xs, ys in batches:
        ys = xs if ys is None else ys
        for i in range(xs_layers):
            for j in range(ys_layers):
                k, l = _centred_gram(xs[i]), _centred_gram(ys[j])
                xy[i, j] += unbiased_hsic(k, l)
                xx[i, j] += unbiased_hsic(k, k)
                yy[i, j] += unbiased_hsic(l, l)
    return xy / torch.sqrt(xx * yy)


def _centred_gram(z: torch.Tensor) -> torch.Tensor:
    # Centring the features first keeps float32 accurate under a common offset.
    z = z - z.mean(0, keepdim=True)
    return z @ z.T


def unbiased_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al. (2012), the formula as published."""
    n = k.shape[0]
    kt = k - torch.diag(torch.diagonal(k))
    lt = l - torch.diag(torch.diagonal(l))
    ones = torch.ones(n, dtype=k.dtype)
    term = (kt * lt).sum() + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ones @ kt @ lt @ ones)
    return term / (n * (n - 3))


def expanded_map(batches: list[tuple]) -> torch.Tensor:
    (xs, ys), = batches
    ys = xs if ys is None else ys
    shape = (xs.shape[0], ys.shape[0], *xs.shape[1:])
    return mk.cka(xs[:, None].expand(shape), ys[None].expand(*shape[:3], ys.shape[-1]), unbiased=True,
                  backend="torch")


PROVIDERS: dict[str, Callable[[list[tuple]], torch.Tensor]] = {
    "mipic": mipic_map,
    "pytorch-cka": pytorch_cka_map,
    "pair-loop": pair_loop_map,
    "expanded": expanded_map,
}


def applies(provider: str, workload: Workload) -> bool:
    return provider != "expanded" or len(workload.rows) == 1


# ---------------------------------------------------------------- measuring


def run_workload(workload: Workload, providers: Sequence[str], repeats: int, seed: int) -> list[dict]:
    """Time every provider on ``workload`` (alternating calls) and check its values."""
    batches = make_features(workload, seed)
    exact = mipic_map([(x.double(), None if y is None else y.double()) for x, y in batches])
    calls = {p: (lambda p=p: PROVIDERS[p](batches)) for p in providers if applies(p, workload)}
    first_s, maps = {}, {}
    with torch.no_grad():
        for name, call in calls.items():
            start = time.perf_counter()
            maps[name] = call()
            first_s[name] = time.perf_counter() - start
        wanted = {p: max(min(repeats, MIN_CALLS), min(repeats, int(TIME_BUDGET_S / max(s, 1e-9))))
                  for p, s in first_s.items()}
        times: dict[str, list[float]] = {p: [] for p in calls}
        while any(len(times[p]) < wanted[p] for p in calls):
            for name, call in calls.items():
                if len(times[name]) < wanted[name]:
                    start = time.perf_counter()
                    call()
                    times[name].append((time.perf_counter() - start) * 1e3)
        peaks = {name: cpu_peak_bytes(call) / _MIB for name, call in calls.items()}
    base = quantiles(times["pytorch-cka"])[1] if "pytorch-cka" in times else math.nan
    rows = []
    for name in calls:
        p20, p50, p80 = quantiles(times[name])
        err, off = _agreement(maps[name].double(), exact)
        rows.append({
            "workload": workload.name, "shape": workload.shape, "dtype": "fp32", "provider": name,
            "p20_ms": f"{p20:.2f}", "p50_ms": f"{p50:.2f}", "p80_ms": f"{p80:.2f}", "peak_mib": f"{peaks[name]:.1f}",
            "x_pytorch_cka": f"{base / p50:.2f}", "max_err": f"{err:.2e}", "off_1e-3": str(off),
            "timer": f"perf_counter x{len(times[name])}",
        })
    return rows


def _agreement(got: torch.Tensor, exact: torch.Tensor) -> tuple[float, int]:
    """The largest absolute error over entries both define, and how many entries are
    off by more than 1e-3 (NaN against a number, or the reverse, counts as off)."""
    both = ~torch.isnan(got) & ~torch.isnan(exact)
    diff = (got - exact).abs()
    off = int((diff[both] > 1e-3).sum()) + int((torch.isnan(got) != torch.isnan(exact)).sum())
    return (float(diff[both].max()) if both.any() else math.nan), off


def _environment() -> dict[str, str]:
    try:
        import cka

        version = cka.__version__
    except ImportError:
        version = "none"
    return {
        "date": records.utc_now(), "commit": records.commit_id(), "device": records.device_name(torch.device("cpu")),
        "torch": torch.__version__, "pytorch_cka": version,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.cka_map", description=__doc__.split("\n\n")[0],
        epilog="workloads:\n" + "\n".join(f"  {w.name:<14} {w.description}" for w in WORKLOADS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument("--provider", nargs="+", choices=list(PROVIDERS), default=list(PROVIDERS))
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per provider (default 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", type=Path, default=records.default_root() / CSV_NAME,
                        help=f"CSV to append to (default {records.default_root() / CSV_NAME}; "
                             f"--csv benchmarks/results/{CSV_NAME} refreshes the committed rows)")
    parser.add_argument("--no-csv", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if "pytorch-cka" in args.provider:
        try:
            import cka  # noqa: F401
        except ImportError:
            print("pytorch-cka is not installed (pip install pytorch-cka); its rows are skipped", file=sys.stderr)
            args.provider = [p for p in args.provider if p != "pytorch-cka"]
    env = _environment()
    print(f"{env['device']}, torch {env['torch']}, pytorch-cka {env['pytorch_cka']}, float32, no grad")
    line = "{workload:<14} {shape:<28} {provider:<12} {p20_ms:>9} {p50_ms:>9} {p80_ms:>9} {peak_mib:>9} {x:>7} {max_err:>9} {off:>8}"
    print(line.format(workload="workload", shape="shape", provider="provider", p20_ms="p20 ms", p50_ms="p50 ms",
                      p80_ms="p80 ms", peak_mib="peak MiB", x="x p-cka", max_err="max err", off="off 1e-3"))
    for name in args.workload:
        rows = run_workload(WORKLOADS[name], args.provider, args.repeats, args.seed)
        for row in rows:
            print(line.format(x=row["x_pytorch_cka"], off=row["off_1e-3"], **row))
        if not args.no_csv:
            records.append_rows(args.csv, [dict(env, **row) for row in rows], SCHEMA)
    return 0


if __name__ == "__main__":
    sys.exit(main())
