"""MIC's regularisers at every width: the all-widths reference against a per-width loop.

    python -m benchmarks.mic                       # the presets for this machine, every provider
    python -m benchmarks.mic --preset bert-base --mode full --repeats 30

Workloads are one layer's token states ``x (B, T, D)`` with padded sentences of varying
length (as :func:`benchmarks.workload.make_workload` draws them) at a backbone's widths.
``scr`` times :func:`mipic_kernels.soft_collapse` summed over widths; ``sir`` times
:func:`mipic_kernels.spectral_isotropy` of the mask-mean-pooled states (the pooling
included, as MIC runs it). Providers:

* ``loop``: one product per width, the straightforward way: SCR's block ``C[:d, d:]`` as
  its own ``z[:, :d]^T z[:, d:]``, SIR's cosines from each width's normalised prefix;
* ``torch``: the reference, every width from one ``(d_max, D)`` correlation and one
  sweep of nested sample Grams;
* ``torch.compile``: the reference under ``torch.compile(dynamic=False)``, compile time
  excluded.

Modes, timing (``--repeats`` timed calls per case) and peak memory are those of
:mod:`benchmarks.measure`. Rows are appended to ``mic.csv`` in the folder of
:func:`benchmarks.records.default_root`, outside the checkout, or to ``--csv PATH``
(``--csv benchmarks/results/mic.csv`` refreshes the committed rows), in the schema of
:mod:`benchmarks.records` (``kernel`` holds ``scr`` or ``sir``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import mipic_kernels as mk
from mipic import machine
from mipic_kernels.mic import VARIANCE_EPS

from . import flags, measure, records
from .catalog import MODES, dtype_name
from .workload import torch_dtype

REGULARISERS = ("scr", "sir")
PROVIDERS = ("loop", "torch", "torch.compile")
CSV_NAME = "mic.csv"


@dataclass(frozen=True)
class MICPreset:
    name: str
    batch: int
    tokens: int
    depth: int
    dims: tuple[int, ...]
    gpu: bool = False
    cpu: bool = False


PRESETS = {p.name: p for p in (
    MICPreset("minilm", 32, 32, 384, (8, 16, 32, 64, 128, 256), gpu=True, cpu=True),
    MICPreset("bert-base", 16, 128, 768, (16, 32, 64, 128, 256, 512), gpu=True, cpu=True),
    MICPreset("qwen3-0.6b", 16, 512, 1024, (16, 32, 64, 128, 256, 512), gpu=True),
)}


@dataclass
class Workload:
    """What :func:`benchmarks.measure.mode_case` and :func:`~benchmarks.measure.measure` read."""

    x: torch.Tensor
    mask: torch.Tensor


def make_workload(preset: MICPreset, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Workload:
    gen = torch.Generator().manual_seed(seed)
    B, T, D = preset.batch, preset.tokens, preset.depth
    lengths = torch.randint(max(2, T // 4), T + 1, (B,), generator=gen)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    x = torch.randn(B, T, D, generator=gen) * torch.rand(D, generator=gen) * 2 + 0.5 * torch.randn(D, generator=gen)
    return Workload(x.to(device=device, dtype=dtype).requires_grad_(True), mask.to(device))


def mean_pool(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask[..., None].to(x.dtype)
    return (x * weights).sum(-2) / weights.sum(-2).clamp(min=1)


def loop_soft_collapse(x: torch.Tensor, mask: torch.Tensor, dims: Sequence[int], tau_corr: float = 0.1,
                       lambda_var: float = 1.0) -> torch.Tensor:
    """SCR per width with one prefix-residual product per width (same values as the reference)."""
    h = torch.where(mask[..., None], x.float(), 0.0)
    weight = mask[..., None].float()
    count = weight.sum(-2, keepdim=True).clamp(min=1)
    centred = (h - h.sum(-2, keepdim=True) / count) * weight
    z = centred / (centred.square().sum(-2, keepdim=True) / count + VARIANCE_EPS).sqrt() / count.sqrt()
    examples = (weight.sum(-2) >= 2).float().sum().clamp(min=1)
    raw = h[mask]
    std = (raw.var(0, unbiased=False) + VARIANCE_EPS).sqrt()
    out = []
    for d in dims:
        block = torch.einsum("btu,btv->uv", z[..., :d], z[..., d:]) / examples
        hinge = F.relu(1 - std[:d]).mean() + 0.5 * F.relu(1 - std[d:]).mean()
        out.append(F.relu(block.abs() - tau_corr).square().mean() + lambda_var * hinge)
    return torch.stack(out)


def loop_spectral_isotropy(pooled: torch.Tensor, dims: Sequence[int], t: float = 2.0) -> torch.Tensor:
    """SIR per width with each width's own normalised prefix and cosine matrix."""
    z = pooled.float()
    n = z.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    out = []
    for d in dims:
        var = z[:, :d].var(0, unbiased=False)
        cv = var.std(unbiased=False) / (var.mean() + VARIANCE_EPS)
        unit = F.normalize(z[:, :d], dim=-1)
        cos = (unit @ unit.T)[off]
        out.append(0.5 * (cv + torch.logsumexp(-2 * t * (1 - cos), 0) - math.log(n * (n - 1))))
    return torch.stack(out)


def build(provider: str, regulariser: str, dims: Sequence[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(x, mask) -> scalar`` of one provider and regulariser."""
    dims = tuple(dims)
    if regulariser == "scr":
        fn = (lambda x, m: loop_soft_collapse(x, m, dims).sum()) if provider == "loop" else (
            lambda x, m: mk.soft_collapse(x, dims, mask=m).sum())
    else:
        fn = (lambda x, m: loop_spectral_isotropy(mean_pool(x, m), dims).sum()) if provider == "loop" else (
            lambda x, m: mk.spectral_isotropy(mean_pool(x, m), dims).sum())
    return torch.compile(fn, dynamic=False) if provider == "torch.compile" else fn


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", nargs="+", choices=sorted(PRESETS))
    parser.add_argument("--regulariser", nargs="+", choices=REGULARISERS, default=list(REGULARISERS))
    parser.add_argument("--provider", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--mode", nargs="+", choices=MODES, default=["full", "no-grad"])
    parser.add_argument("--dtype")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", help=f"results file (default {records.default_root() / CSV_NAME})")
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch_dtype(dtype_name(args.dtype or ("bf16" if device.type == "cuda" else "fp32")))
    # A fixed number of timed calls: min_calls = max_calls, no time limit.
    budget = measure.Budget(min_calls=args.repeats, max_calls=args.repeats, seconds=math.inf)
    threads = 1 if device.type == "cuda" else torch.get_num_threads()
    names = args.preset or [p.name for p in PRESETS.values() if (p.gpu if device.type == "cuda" else p.cpu)]
    env = {"date": records.utc_now(), "commit": records.commit_id(), "device": records.device_name(device),
           "torch": torch.__version__, "triton": records.triton_version()}
    rows = []
    print(f"{'preset':11s} {'reg':4s} {'provider':14s} {'mode':8s} {'p20 ms':>9s} {'p50 ms':>9s} {'p80 ms':>9s} "
          f"{'peak MiB':>9s}")
    for name in names:
        preset = PRESETS[name]
        workload = make_workload(preset, dtype=dtype, device=device)
        for regulariser in args.regulariser:
            for provider in args.provider:
                loss = build(provider, regulariser, preset.dims)
                for mode in args.mode:
                    m = measure.measure(measure.mode_case(loss, workload, mode), workload,
                                        warmup=args.warmup, budget=budget)
                    print(f"{name:11s} {regulariser:4s} {provider:14s} {mode:8s} {m.p20_ms:9.3f} {m.p50_ms:9.3f} "
                          f"{m.p80_ms:9.3f} {m.peak_mib:9.2f}", flush=True)
                    rows.append({**env, "preset": name, "shape": f"B{preset.batch}xT{preset.tokens}xD{preset.depth}",
                                 "dtype": str(dtype).replace("torch.", ""), "kernel": regulariser,
                                 "provider": provider, "mode": mode, "p20_ms": round(m.p20_ms, 4),
                                 "p50_ms": round(m.p50_ms, 4), "p80_ms": round(m.p80_ms, 4),
                                 "peak_mib": round(m.peak_mib, 3), "timer": m.timer,
                                 "p50_ci_pct": round(100 * m.ci, 2), "load_before": m.load.before,
                                 "load_after": m.load.after, "others_cores": m.load.others_cores,
                                 "flags": ";".join(flags.row_flags(
                                     p20=m.p20_ms, p80=m.p80_ms, stable=m.stable, others_cores=m.load.others_cores,
                                     cores=machine.cpu_count(), threads=threads))})
    if not args.no_csv:
        path = Path(args.csv) if args.csv else records.default_root() / CSV_NAME
        records.append_rows(path, rows)
        print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
