"""Evaluation per Matryoshka width (and optionally per layer).

Embeddings are truncated to each width, then L2-normalised. Tasks:
``sts`` Spearman x100 of cosine similarity against gold scores; ``classification``
logistic-regression probe accuracy x100 (train and test files); ``pair`` best-threshold
accuracy x100 of cosine similarity for binary labels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataError, Record, read_records
from .encoder import POOLING_FILE, Encoder, load_model_config

TASKS = ("sts", "classification", "pair")
Scores = dict[str, dict[str, float]]


def default_dims(model_dir: str, hidden_size: int) -> list[int]:
    """The widths recorded at training time, else powers of two from 8 and the full width."""
    meta = Path(model_dir) / POOLING_FILE
    if meta.is_file():
        dims = json.loads(meta.read_text()).get("matryoshka_dims")
        if dims:
            return [d for d in dims if d <= hidden_size]
    dims, d = [], 8
    while d < hidden_size:
        dims.append(d)
        d *= 2
    return dims + [hidden_size]


def _prefix_unit(emb: torch.Tensor, d: int) -> torch.Tensor:
    return F.normalize(emb[..., :d].double(), dim=-1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation with average ranks for ties (scipy's definition)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant side gives NaN, as in scipy
        return float(np.corrcoef(rx, ry)[0, 1])


def sts_scores(a: torch.Tensor, b: torch.Tensor, gold: Sequence[float], dims: Sequence[int]) -> dict[str, float]:
    """Spearman x100 of the cosine of each width's prefixes of ``a`` and ``b`` ``(N, D)``."""
    gold = np.asarray(gold, dtype=np.float64)
    out = {}
    for d in dims:
        cos = (_prefix_unit(a, d) * _prefix_unit(b, d)).sum(-1).numpy()
        out[str(d)] = 100.0 * spearman(cos, gold)
    return out


def best_threshold_accuracy(similarity: np.ndarray, labels: np.ndarray) -> float:
    """The best accuracy of ``similarity >= threshold`` predicting ``labels`` (0/1) over all
    thresholds (every midpoint between sorted similarities and both extremes)."""
    order = np.argsort(-similarity, kind="stable")
    s, y = similarity[order], labels[order].astype(np.int64)
    positives = np.concatenate([[0], np.cumsum(y)])  # positives among the top i
    i = np.arange(len(s) + 1)
    correct = positives + (len(y) - y.sum()) - (i - positives)
    # A threshold can only split between distinct similarity values.
    valid = np.concatenate([[True], s[:-1] != s[1:], [True]])
    return float(correct[valid].max() / len(y))


def pair_scores(a: torch.Tensor, b: torch.Tensor, labels: Sequence[int], dims: Sequence[int]) -> dict[str, float]:
    labels = np.asarray(labels)
    return {
        str(d): 100.0 * best_threshold_accuracy((_prefix_unit(a, d) * _prefix_unit(b, d)).sum(-1).numpy(), labels)
        for d in dims
    }


def probe_scores(
    train_x: torch.Tensor, train_y: Sequence, test_x: torch.Tensor, test_y: Sequence, dims: Sequence[int],
    seed: int = 0,
) -> dict[str, float]:
    from sklearn.linear_model import LogisticRegression

    out = {}
    for d in dims:
        probe = LogisticRegression(max_iter=1000, random_state=seed)
        probe.fit(_prefix_unit(train_x, d).numpy(), list(train_y))
        out[str(d)] = 100.0 * float(probe.score(_prefix_unit(test_x, d).numpy(), list(test_y)))
    return out


def _binary(label: object, where: str) -> int:
    text = str(label).strip().lower()
    if text in ("1", "1.0", "true", "yes", "entailment", "paraphrase"):
        return 1
    if text in ("0", "0.0", "false", "no", "contradiction", "neutral", "not_entailment", "-"):
        return 0
    raise DataError(f"{where}: pair labels must be binary (0/1, true/false, entailment/...); got {label!r}")


def _read(path: str, fmt: str, columns: Optional[Sequence[str]], label_column: Optional[str], n_texts: int) -> list[Record]:
    records = read_records(path, fmt, columns, label_column)
    short = [r for r in records if len(r.texts) < n_texts or r.label is None]
    if short:
        raise DataError(f"{short[0].source}: this task needs {n_texts} text column(s) and a label")
    return records


def evaluate(
    model: Union[str, Encoder],
    task: str,
    data: str,
    *,
    test_data: Optional[str] = None,
    dims: Optional[Sequence[int]] = None,
    layers: Union[None, Sequence[int], Literal["all"]] = None,
    fmt: str = "auto",
    columns: Optional[Sequence[str]] = None,
    label_column: Optional[str] = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Scores:
    """Scores ``{task: {width: score}}``; with ``layers`` also ``{task@layerN: {width: score}}``.

    ``data`` is the STS or pair file, or the classification training file (then
    ``test_data`` is required). ``columns``/``label_column`` name the columns of
    csv/tsv/jsonl files; the defaults are sentence1, sentence2 / score (sts),
    text / label (classification) and sentence1, sentence2 / label (pair). ``layers``
    ``"all"`` scores every layer. Every input is checked before the model's weights
    load; ``progress`` shows a bar while texts are encoded.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}; got {task!r}")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1; got {batch_size}")
    texts, score = _task_inputs(task, data, test_data, fmt, columns, label_column)

    if isinstance(model, str):
        config = load_model_config(model)  # the config alone: no weights yet
        hidden_size, num_layers = int(config.hidden_size), int(config.num_hidden_layers)
    else:
        hidden_size, num_layers = model.hidden_size, model.num_layers
    if dims is None:
        dims = default_dims(model, hidden_size) if isinstance(model, str) else [hidden_size]
    bad = [d for d in dims if not 1 <= d <= hidden_size]
    if bad:
        raise ValueError(f"dims must be in [1, {hidden_size}]; got {bad}")
    extra = list(range(num_layers + 1)) if layers == "all" else list(layers or [])
    all_layers = [num_layers] + [l for l in extra if l != num_layers]
    bad = [l for l in all_layers if not 0 <= l <= num_layers]
    if bad:
        raise ValueError(f"layers must be in [0, {num_layers}]; got {bad}")

    encoder = Encoder.from_pretrained(model) if isinstance(model, str) else model
    # One pass over every text of the task (sorted by length inside encode).
    embeddings = encoder.encode(texts, batch_size=batch_size, layers=all_layers, progress=progress)
    results = [score(embeddings[i], dims) for i in range(len(all_layers))]
    scores: Scores = {task: results[0]}
    for layer, result in zip(all_layers[1:], results[1:]):
        scores[f"{task}@layer{layer}"] = result
    return scores


def _task_inputs(
    task: str, data: str, test_data: Optional[str], fmt: str, columns: Optional[Sequence[str]],
    label_column: Optional[str],
):
    """Every text the task encodes, and how to score their embeddings ``(N, D)`` at given
    widths. Reads and checks the files (labels included) without touching the model."""
    if task == "classification":
        if test_data is None:
            raise ValueError("task 'classification' needs a test file (--test-data)")
        cols = columns or (("text",) if fmt not in ("sick", "snli", "stsb") else None)
        train = _read(data, fmt, cols, label_column or "label", 1)
        test = _read(test_data, fmt, cols, label_column or "label", 1)
        classes = {r.label for r in train}
        if len(classes) < 2:
            raise DataError(
                f"{data}: a classification probe needs at least 2 label classes in the training "
                f"file; got only {sorted(map(str, classes))}"
            )
        n = len(train)

        def probe(emb: torch.Tensor, dims: Sequence[int]) -> dict[str, float]:
            return probe_scores(emb[:n], [r.label for r in train], emb[n:], [r.label for r in test], dims)

        return [r.texts[0] for r in train + test], probe

    default_label = "score" if task == "sts" else "label"
    if _needs_columns(data, fmt):
        records = _read(data, fmt, columns or ("sentence1", "sentence2"), label_column or default_label, 2)
    else:
        records = _read(data, fmt, None, label_column, 2)
    n = len(records)
    if task == "sts":
        gold = [_score(r) for r in records]

        def sts(emb: torch.Tensor, dims: Sequence[int]) -> dict[str, float]:
            return sts_scores(emb[:n], emb[n:], gold, dims)

        return [r.texts[0] for r in records] + [r.texts[1] for r in records], sts
    labels = [_binary(r.label, r.source) for r in records]

    def pair(emb: torch.Tensor, dims: Sequence[int]) -> dict[str, float]:
        return pair_scores(emb[:n], emb[n:], labels, dims)

    return [r.texts[0] for r in records] + [r.texts[1] for r in records], pair


def _needs_columns(path: str, fmt: str) -> bool:
    from .data import detect_format

    return (detect_format(path) if fmt == "auto" else fmt) in ("csv", "tsv", "jsonl", "hf")


def _score(record: Record) -> float:
    try:
        return float(record.label)
    except (TypeError, ValueError) as err:
        raise DataError(f"{record.source}: STS scores must be numbers; got {record.label!r}") from err


def format_table(scores: Scores) -> str:
    """A plain-text table: one row per task (and layer), one column per width."""
    widths = sorted({int(d) for row in scores.values() for d in row})
    name_width = max(len("task"), *(len(k) for k in scores))
    header = "task".ljust(name_width) + "".join(f"{d:>8}" for d in widths)
    lines = [header, "-" * len(header)]
    for name, row in scores.items():
        cells = "".join(f"{row[str(d)]:8.2f}" if str(d) in row else " " * 8 for d in widths)
        lines.append(name.ljust(name_width) + cells)
    return "\n".join(lines)
