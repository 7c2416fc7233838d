"""Readers for local text files and hub datasets, and the training examples built from them.

Every reader yields :class:`Record` rows: one to three texts plus an optional label
(a float score for STS, a string class otherwise), each remembering its file and line.
Rows that cannot be used (empty text, missing column, bad encoding, bad JSON) are
reported together with file and line through :mod:`warnings`; a source that yields no
usable row raises a :class:`DataError`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

Label = Union[None, float, str]


class DataError(ValueError):
    """A data source that cannot be read or yields nothing usable."""


class BadRowWarning(UserWarning):
    """Rows skipped while reading, each with its file and line."""


@dataclass(frozen=True)
class Record:
    texts: tuple[str, ...]
    label: Label = None
    source: str = ""


_EXTENSIONS = {".txt": "text", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl"}


def detect_format(path: str) -> str:
    """The reader for ``path`` from its name: known benchmark files first, then the extension."""
    name = Path(path).name.lower()
    if name.startswith("sts-") and name.endswith(".csv"):
        return "stsb"
    if name.startswith("sick_") and name.endswith(".txt"):
        return "sick"
    if name.startswith("snli") and name.endswith(".jsonl"):
        return "snli"
    suffix = Path(path).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    if not Path(path).exists() and "/" in path and not path.startswith((".", "/")):
        return "hf"
    raise DataError(
        f"cannot tell the format of {path!r} from its name; set the format to one of "
        "text, csv, tsv, jsonl, stsb, sick, snli, hf"
    )


def resolve_data_path(path: str, fmt: str, folders: Sequence[Path], what: str = "data.path") -> str:
    """The absolute path of a local data file given relative to one of ``folders`` (the
    first that holds it wins), or ``path`` itself when it is absolute or names a hub
    dataset. A relative file found in none of them is an error that lists every
    absolute path tried."""
    if fmt == "hf":
        return path
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    tried = list(dict.fromkeys(Path(os.path.abspath(folder / given)) for folder in folders))
    for candidate in tried:
        if candidate.exists():
            return str(candidate)
    if fmt == "auto":
        try:
            if detect_format(path) == "hf":
                return path
        except DataError:
            pass
    raise DataError(f"{what} {path!r} does not exist: looked for {' and '.join(map(str, tried))}")


def read_records(
    path: str,
    fmt: str = "auto",
    columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None,
    *,
    hf_split: str = "train",
    hf_config: Optional[str] = None,
) -> list[Record]:
    """Every usable row of one source.

    ``fmt``: ``text`` (one sentence per line), ``csv``/``tsv``/``jsonl`` (named
    ``columns``, header row for csv/tsv), ``stsb`` (STS Benchmark: tab-separated, no
    header, score in column 5, sentences in 6 and 7), ``sick`` (SICK: header,
    sentence_A, sentence_B, relatedness_score), ``snli`` (Stanford jsonl: sentence1,
    sentence2, gold_label), ``hf`` (a hub dataset name) or ``auto``.
    """
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "hf":
        rows = _hf_rows(path, columns, label_column, hf_split, hf_config)
    else:
        if not Path(path).is_file():
            raise DataError(f"data file {os.path.abspath(path)} does not exist")
        readers = {
            "text": lambda: _text_rows(path),
            "csv": lambda: _delimited_rows(path, ",", columns, label_column),
            "tsv": lambda: _delimited_rows(path, "\t", columns, label_column),
            "jsonl": lambda: _jsonl_rows(path, columns, label_column),
            "stsb": lambda: _stsb_rows(path),
            "sick": lambda: _delimited_rows(
                path, "\t", ("sentence_A", "sentence_B"), label_column or "relatedness_score",
                float_label=label_column is None,
            ),
            "snli": lambda: _jsonl_rows(path, ("sentence1", "sentence2"), label_column or "gold_label"),
        }
        if fmt not in readers:
            raise DataError(f"unknown data format {fmt!r}; use one of {sorted(readers) + ['hf', 'auto']}")
        rows = readers[fmt]()
    return _collect(path, rows)


def _collect(path: str, rows: Iterable[Union[Record, str]]) -> list[Record]:
    good: list[Record] = []
    bad: list[str] = []
    for row in rows:
        (bad if isinstance(row, str) else good).append(row)
    if bad:
        shown = "\n  ".join(bad[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        warnings.warn(f"{len(bad)} unusable row(s) skipped in {path}:\n  {shown}{more}", BadRowWarning, stacklevel=3)
    if not good:
        reason = f"; first problem: {bad[0]}" if bad else " (it is empty)"
        raise DataError(f"{path} yields no usable example{reason}")
    return good


def _lines(path: str) -> Iterator[tuple[int, Optional[str]]]:
    """``(line number, text)``; text None where the bytes are not UTF-8."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                yield number, None
                continue
            yield number, text.rstrip("\r\n")


def _content_lines(
    path: str, lines: Iterator[tuple[int, Optional[str]]]
) -> Iterator[tuple[str, Optional[str]]]:
    """``(file:line, text)`` of the lines that are not blank; text None where not UTF-8."""
    for number, line in lines:
        if line is None or line.strip():
            yield f"{path}:{number}", line


def _text_rows(path: str) -> Iterator[Union[Record, str]]:
    for number, line in _lines(path):
        where = f"{path}:{number}"
        if line is None:
            yield f"{where}: not valid UTF-8"
        elif not line.strip():
            yield f"{where}: empty text"
        else:
            yield Record((line.strip(),), None, where)


def _make(where: str, texts: Sequence[object], label: object, float_label: bool) -> Union[Record, str]:
    clean = []
    for text in texts:
        if text is None:
            return f"{where}: missing column"
        if not isinstance(text, str) or not text.strip():
            return f"{where}: empty text"
        clean.append(text.strip())
    if float_label and label is not None:
        try:
            label = float(label)
        except (TypeError, ValueError):
            return f"{where}: label {label!r} is not a number"
    elif isinstance(label, str):
        label = label.strip()
        if not label:
            return f"{where}: empty label"
    return Record(tuple(clean), label, where)


def _delimited_rows(
    path: str, delimiter: str, columns: Optional[Sequence[str]], label_column: Optional[str],
    float_label: bool = False,
) -> Iterator[Union[Record, str]]:
    lines = _lines(path)
    header_line = next(lines, None)
    if header_line is None or header_line[1] is None:
        raise DataError(f"{path}:1: the header row is missing or not valid UTF-8")
    header = next(csv.reader([header_line[1]], delimiter=delimiter))
    wanted = list(columns) if columns else header[:1]
    missing = [c for c in wanted + ([label_column] if label_column else []) if c not in header]
    if missing:
        raise DataError(f"{path}:1: column(s) {missing} not in the header {header}")
    index = [header.index(c) for c in wanted]
    label_index = header.index(label_column) if label_column else None
    for where, line in _content_lines(path, lines):
        if line is None:
            yield f"{where}: not valid UTF-8"
            continue
        # Quoted fields never span lines in these formats; one line is one row.
        cells = next(csv.reader(io.StringIO(line), delimiter=delimiter, quoting=csv.QUOTE_MINIMAL
                                if delimiter == "," else csv.QUOTE_NONE))
        texts = [cells[i] if i < len(cells) else None for i in index]
        label = None
        if label_index is not None:
            label = cells[label_index] if label_index < len(cells) else None
            if label is None:
                yield f"{where}: missing column {label_column!r}"
                continue
        yield _make(where, texts, label, float_label)


def _jsonl_rows(path: str, columns: Optional[Sequence[str]], label_column: Optional[str]) -> Iterator[Union[Record, str]]:
    if not columns:
        raise DataError(f"{path}: jsonl data needs the column names (data.columns)")
    for where, line in _content_lines(path, _lines(path)):
        if line is None:
            yield f"{where}: not valid UTF-8"
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            yield f"{where}: not valid JSON ({err.msg})"
            continue
        if not isinstance(obj, dict):
            yield f"{where}: not a JSON object"
            continue
        label = None
        if label_column is not None:
            if label_column not in obj:
                yield f"{where}: missing column {label_column!r}"
                continue
            label = obj[label_column]
        yield _make(where, [obj.get(c) for c in columns], label, False)


def _stsb_rows(path: str) -> Iterator[Union[Record, str]]:
    # Split on tabs only: some rows carry extra trailing columns and stray quotes.
    for where, line in _content_lines(path, _lines(path)):
        if line is None:
            yield f"{where}: not valid UTF-8"
            continue
        cells = line.split("\t")
        if len(cells) < 7:
            yield f"{where}: expected 7 tab-separated columns, found {len(cells)}"
            continue
        yield _make(where, cells[5:7], cells[4], True)


def _hf_rows(
    name: str, columns: Optional[Sequence[str]], label_column: Optional[str], split: str, config: Optional[str]
) -> Iterator[Union[Record, str]]:
    try:
        import datasets  # imported here: an optional dependency
    except ImportError as err:
        raise DataError(
            f"reading the hub dataset {name!r} needs the 'datasets' package (pip install datasets)"
        ) from err
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; the cause is kept below
        raise DataError(
            f"could not load the hub dataset {name!r} (split {split!r}): {err}. Is the hub reachable "
            "(HF_HUB_OFFLINE, network)? Local files work without it."
        ) from err
    if not columns:
        raise DataError(f"hub dataset {name!r} needs the column names (data.columns); it has {data.column_names}")
    missing = [c for c in list(columns) + ([label_column] if label_column else []) if c not in data.column_names]
    if missing:
        raise DataError(f"hub dataset {name!r} has no column(s) {missing}; it has {data.column_names}")
    for i, row in enumerate(data):
        yield _make(f"{name}[{split}]:{i}", [row[c] for c in columns], row[label_column] if label_column else None, False)


def training_examples(
    records: Sequence[Record], mode: str, *, max_examples: Optional[int] = None, seed: int = 0
) -> list[tuple[str, ...]]:
    """Texts per example: 1 (unsupervised), 2 (pair) or 3 (triplet with a hard negative).

    Unsupervised mode uses every distinct sentence once (SimCSE: the two views come
    from dropout). Supervised mode uses pairs or triplets as they are, except NLI rows
    (labels entailment / contradiction, any case), which become (premise, entailed,
    contradicted) triplets where the premise has both, else entailment pairs.
    ``max_examples`` keeps a seeded random subset.
    """
    if mode == "unsupervised":
        seen: dict[str, None] = {}
        for record in records:
            for text in record.texts:
                seen.setdefault(text, None)
        examples = [(text,) for text in seen]
    elif mode == "supervised":
        nli = [r for r in records if isinstance(r.label, str) and len(r.texts) == 2]
        if nli:
            examples = _nli_examples(nli)
        else:
            examples = [r.texts for r in records if len(r.texts) >= 2]
        if not examples:
            raise DataError("supervised mode needs pairs or triplets (2 or 3 columns, or NLI data)")
        if len({len(e) for e in examples}) > 1:
            # Mixed pairs and triplets cannot share a batch layout; keep the majority form.
            size = max({len(e) for e in examples}, key=lambda n: sum(len(e) == n for e in examples))
            examples = [e for e in examples if len(e) == size]
    else:
        raise ValueError(f"mode must be 'unsupervised' or 'supervised'; got {mode!r}")
    if max_examples is not None and len(examples) > max_examples:
        rng = random.Random(seed)
        examples = rng.sample(examples, max_examples)
    return examples


def _nli_examples(records: Sequence[Record]) -> list[tuple[str, ...]]:
    entailed: dict[str, str] = {}
    contradicted: dict[str, str] = {}
    for r in records:
        label = str(r.label).lower()
        if label == "entailment":
            entailed.setdefault(r.texts[0], r.texts[1])
        elif label == "contradiction":
            contradicted.setdefault(r.texts[0], r.texts[1])
    triplets = [(p, h, contradicted[p]) for p, h in entailed.items() if p in contradicted]
    if triplets:
        return triplets
    return [(p, h) for p, h in entailed.items()]


def load_training_examples(cfg) -> list[tuple[str, ...]]:
    """The examples a :class:`mipic.config.Config` describes (seeded subset)."""
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    records: list[Record] = []
    for path in paths:
        records.extend(read_records(
            path, cfg.data.format, cfg.data.columns, hf_split=cfg.data.hf_split, hf_config=cfg.data.hf_config
        ))
    return training_examples(records, cfg.data.mode, max_examples=cfg.data.max_examples, seed=cfg.train.seed)
