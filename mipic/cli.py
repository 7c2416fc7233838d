"""``mipic train`` and ``mipic eval``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 8,16,32; got {text!r}")
    if not values:
        raise argparse.ArgumentTypeError("expected at least one int")
    return values


_EXAMPLES = """examples:
  mipic train --config configs/minilm-small.yaml --output runs/minilm --set train.max_steps=20
  mipic train --config configs/minilm-small.yaml --output runs/minilm --resume
  mipic eval --model runs/minilm --task sts --data sts-dev.csv --dims 8,16,384 --json scores.json

'mipic train --help' and 'mipic eval --help' list every option; docs/trainer.md has the rest."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipic", description="Train and evaluate Matryoshka sentence encoders.", epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    tr = commands.add_parser("train", help="train a model from a YAML config",
                             description="Train a model from a YAML config. A relative data.path is looked "
                                         "for in the config file's folder, then in the working directory.")
    tr.add_argument("--config", required=True, help="YAML config file")
    tr.add_argument("--output", required=True, help="folder for metrics, checkpoints and the final model")
    tr.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value, e.g. --set train.lr=1e-4 (repeatable)")
    tr.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")

    ev = commands.add_parser("eval", help="evaluate a model per Matryoshka width",
                             description="Score a model at every Matryoshka width (truncate, then "
                                         "L2-normalise). Inputs are checked before the model loads.")
    ev.add_argument("--model", required=True, help="model folder or hub name")
    ev.add_argument("--task", required=True, choices=["sts", "classification", "pair"])
    ev.add_argument("--data", required=True, help="STS / pair file, or the classification training file")
    ev.add_argument("--test-data", help="classification test file")
    ev.add_argument("--format", default="auto",
                    choices=["auto", "text", "csv", "tsv", "jsonl", "stsb", "sick", "snli", "hf"])
    ev.add_argument("--columns", help="comma-separated text column names (csv/tsv/jsonl)")
    ev.add_argument("--label-column", help="label / score column name")
    ev.add_argument("--dims", type=_int_list, help="widths, e.g. 8,16,32 (default: the trained widths)")
    ev.add_argument("--layers", help="comma-separated layers to score as well, or 'all'")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--json", help="write {task: {width: score}} to this file")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar while encoding")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "train":
            from .config import load_config

            cfg = load_config(args.config, args.overrides)
            _quiet_transformers()
            from .train import train

            out = train(cfg, args.output, resume=args.resume)
            print(f"model saved to {out}")
            return 0

        layers = args.layers if args.layers in (None, "all") else _int_list(args.layers)
        _quiet_transformers()
        from .evaluate import evaluate, format_table

        scores = evaluate(
            args.model, args.task, args.data, test_data=args.test_data, dims=args.dims, layers=layers,
            fmt=args.format, columns=args.columns.split(",") if args.columns else None,
            label_column=args.label_column, batch_size=args.batch_size, progress=not args.no_progress,
        )
        print(format_table(scores))
        if args.json:
            Path(args.json).write_text(json.dumps(scores, indent=2))
        return 0
    except (ValueError, FloatingPointError, argparse.ArgumentTypeError) as err:  # config, data, arguments
        print(f"mipic {args.command}: error: {err}", file=sys.stderr)
        return 2


def _quiet_transformers() -> None:
    # Loading and saving weights draw transformers' own bars, between ours.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


if __name__ == "__main__":
    sys.exit(main())
