"""The ``mipic cka-map`` subcommand: its arguments (no torch needed to parse them) and
its run, which computes the map with :mod:`mipic.cka_map`."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction) -> None:
    """The ``cka-map`` subcommand of ``mipic``."""
    cm = commands.add_parser(
        "cka-map", help="CKA between every layer of one model and every layer of another",
        description="Minibatch CKA (unbiased HSIC summed over minibatches) between every layer of "
                    "--model-a and every layer of --model-b; writes cka_map.csv, cka_map.png and "
                    "cka_map.json to --out.",
    )
    cm.add_argument("--model-a", required=True, help="model folder or hub name")
    cm.add_argument("--model-b", help="the other model (default: model A, the self-similarity map)")
    cm.add_argument("--data", required=True, help="text file, CSV/TSV/JSONL, STS-B, SICK or SNLI file")
    cm.add_argument("--format", default="auto",
                    choices=["auto", "text", "csv", "tsv", "jsonl", "stsb", "sick", "snli", "hf"])
    cm.add_argument("--columns", help="comma-separated text column names (csv/tsv/jsonl)")
    rows = cm.add_mutually_exclusive_group()
    rows.add_argument("--pooled", dest="mode", action="store_const", const="pooled",
                      help="one row per text, each layer pooled (the default)")
    rows.add_argument("--tokens", dest="mode", action="store_const", const="tokens",
                      help="one row per real token (models must share a tokenizer)")
    cm.add_argument("--kernel", choices=("linear", "rbf"), default="linear")
    cm.add_argument("--batch-size", type=int, default=64, help="most texts per minibatch (default 64)")
    cm.add_argument("--max-examples", type=int, help="use the first N distinct texts")
    cm.add_argument("--max-length", type=int,
                    help="tokenizer truncation for both models (default: the shorter of their inference lengths)")
    cm.add_argument("--pooling", default="auto", choices=("auto", "cls", "mean", "last"))
    cm.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    cm.add_argument("--label-a", help="name of model A on the heat map (default: last part of its path)")
    cm.add_argument("--label-b", help="name of model B on the heat map")
    cm.add_argument("--no-progress", action="store_true", help="no progress bar")
    cm.add_argument("--out", required=True, help="folder for cka_map.csv, cka_map.png and cka_map.json")
    cm.set_defaults(mode="pooled")


def run(args: argparse.Namespace) -> int:
    """``mipic cka-map``: compute, save and summarise a map."""
    from .cka_map import compute_cka_map, read_texts, require_matplotlib

    require_matplotlib()  # before the models run, not after
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be an int >= 1; got {args.max_examples}")
    texts, total = read_texts(args.data, args.format, args.columns.split(",") if args.columns else None)
    texts = texts[:args.max_examples] if args.max_examples else texts
    result = compute_cka_map(
        args.model_a, args.model_b, texts, mode=args.mode, kernel=args.kernel, batch_size=args.batch_size,
        max_length=args.max_length, pooling=args.pooling, device=args.device, label_a=args.label_a,
        label_b=args.label_b, progress=not args.no_progress,
    )
    result.settings["data"] = {"path": args.data, "format": args.format, "texts_in_file": total,
                               "distinct_texts_used": len(texts)}
    paths = result.save(args.out)
    print(f"{result.label_a} ({result.values.shape[0]} layers) vs {result.label_b} ({result.values.shape[1]} "
          f"layers), {len(texts)} texts, {result.settings['minibatches']} minibatches: "
          + ", ".join(str(p) for p in paths))
    return 0
