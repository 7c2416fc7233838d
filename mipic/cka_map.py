"""CKA maps: every layer of one model against every layer of another (``mipic cka-map``).

The map is the minibatch estimate of Nguyen, Raghu & Kornblith (2021): the texts are
encoded in minibatches, and for every layer pair the unbiased HSIC of each minibatch
is summed (:class:`mipic_kernels.MinibatchCKA`, all pairs from each layer's Gram
formed once), so any number of texts fits in memory. Layers are the model's hidden
states with ``output_hidden_states``: 0 is the embedding output, ``L`` the last layer.

Two kinds of rows:

* ``pooled``: one row per text, each layer pooled with the model's pooling rule
  (``mean``, ``cls`` or ``last``; a sentence-transformers folder's own rule under
  ``auto``). The models may have different tokenizers.
* ``tokens``: every real token of the minibatch's texts is a row ([CLS] and [SEP]
  included), so the Grams are over tokens. Both models must tokenize alike.

Minibatches have near-equal sizes, at most ``batch_size`` texts each, and every one
counts equally in the estimate; the unbiased HSIC needs 4 rows per minibatch.
With ``kernel="rbf"`` every layer of every minibatch gets its own median bandwidth.
"""

from __future__ import annotations

import csv
import datetime
import importlib.util
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import mipic_kernels
from mipic_kernels import MinibatchCKA

from .data import read_records
from .encoder import Encoder

MODES = ("pooled", "tokens")
FILES = ("cka_map.csv", "cka_map.png", "cka_map.json")
_ANNOTATE_UP_TO = 16  # layers per side; larger maps get no numbers in the cells


@dataclass
class CKAMap:
    """A CKA map and how it was made.

    ``values`` ``(La, Lb)`` float64: CKA of layer ``i`` of model A with layer ``j`` of
    model B, NaN where a layer never had variance. ``hsic_ab``, ``hsic_aa`` and
    ``hsic_bb`` are the summed unbiased HSIC terms it was formed from (maps over
    disjoint texts combine by adding them). ``settings`` records models, data,
    estimator, device, versions and date.
    """

    values: np.ndarray
    hsic_ab: np.ndarray
    hsic_aa: np.ndarray
    hsic_bb: np.ndarray
    label_a: str
    label_b: str
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, folder: str | Path) -> list[Path]:
        """Write ``cka_map.csv``, ``cka_map.png`` and ``cka_map.json`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / name for name in FILES]
        self.to_csv(paths[0])
        self.plot(paths[1])
        payload = dict(self.settings, values=[[None if math.isnan(v) else v for v in row] for row in self.values])
        paths[2].write_text(json.dumps(payload, indent=2) + "\n")
        return paths

    def to_csv(self, path: str | Path) -> None:
        """One row per layer pair: layers, CKA and its three HSIC sums."""
        with Path(path).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["model_a", "layer_a", "model_b", "layer_b", "cka", "hsic_ab", "hsic_aa", "hsic_bb"])
            for i in range(self.values.shape[0]):
                for j in range(self.values.shape[1]):
                    writer.writerow([
                        self.label_a, i, self.label_b, j, _number(self.values[i, j]),
                        _number(self.hsic_ab[i, j]), _number(self.hsic_aa[i]), _number(self.hsic_bb[j]),
                    ])

    def plot(self, path: str | Path) -> None:
        """A heat map: layers of B across, layers of A up, a colour bar, values in the
        cells of small maps, NaN cells grey."""
        require_matplotlib()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        la, lb = self.values.shape
        size = max(4.0, 0.55 * max(la, lb) + 2.5)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
        cmap = plt.get_cmap("magma").with_extremes(bad="#bbbbbb")
        low = min(0.0, float(np.nanmin(self.values))) if not np.isnan(self.values).all() else 0.0
        image = ax.imshow(np.ma.masked_invalid(self.values), origin="lower", cmap=cmap, vmin=low, vmax=1.0,
                          aspect="auto")
        ax.set_xticks(range(lb))
        ax.set_yticks(range(la))
        ax.set_xlabel(f"{self.label_b}: layer (0 = embeddings)")
        ax.set_ylabel(f"{self.label_a}: layer (0 = embeddings)")
        s = self.settings
        ax.set_title(f"{s.get('estimator', 'CKA')}, {s.get('mode', '')} rows, {s.get('texts', '?')} texts",
                     fontsize=10)
        if max(la, lb) <= _ANNOTATE_UP_TO:
            for i in range(la):
                for j in range(lb):
                    v = self.values[i, j]
                    text = "nan" if math.isnan(v) else f"{v:.2f}"
                    shade = "white" if math.isnan(v) or v < low + 0.6 * (1.0 - low) else "black"
                    ax.text(j, i, text, ha="center", va="center", fontsize=8, color=shade)
        fig.colorbar(image, ax=ax, label="CKA")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ValueError("the heat map needs matplotlib: pip install matplotlib (or mipic-kernels[train])")


def read_texts(path: str, fmt: str = "auto", columns: Optional[Sequence[str]] = None) -> tuple[list[str], int]:
    """The distinct texts of a data file, in file order (every text of every row: both
    sentences of an STS pair), and how many texts it held in all."""
    records = read_records(path, fmt, columns)
    every = [text for record in records for text in record.texts]
    return list(dict.fromkeys(every)), len(every)


def minibatches(count: int, batch_size: int) -> list[slice]:
    """``count`` items in ``ceil(count / batch_size)`` consecutive slices whose sizes
    differ by at most one (no small remainder batch)."""
    if count <= 0:
        return []
    batches = math.ceil(count / batch_size)
    base, extra = divmod(count, batches)
    bounds = np.cumsum([0] + [base + (1 if b < extra else 0) for b in range(batches)])
    return [slice(int(lo), int(hi)) for lo, hi in zip(bounds, bounds[1:])]


def compute_cka_map(
    model_a: str,
    model_b: Optional[str],
    texts: Sequence[str],
    *,
    mode: str = "pooled",
    kernel: str = "linear",
    batch_size: int = 64,
    max_length: Optional[int] = None,
    pooling: str = "auto",
    device: str = "auto",
    label_a: Optional[str] = None,
    label_b: Optional[str] = None,
    progress: bool = True,
) -> CKAMap:
    """The CKA map of every layer of ``model_a`` against every layer of ``model_b``.

    Args:
        model_a, model_b: hub names or local folders; ``model_b`` None (or equal to
            ``model_a``) gives the self-similarity map, each minibatch encoded once.
        texts: the examples, in order.
        mode: ``"pooled"`` (one row per text) or ``"tokens"`` (one row per real token).
        kernel: ``"linear"`` or ``"rbf"`` (median bandwidth per layer and minibatch).
        batch_size: the most texts per minibatch (at least 4 in pooled mode).
        max_length: tokenizer truncation for both models; None: the shorter of their
            inference lengths (a sentence-transformers ``max_seq_length``, else the
            limit of the tokenizer and position embeddings).
        pooling: ``auto``, ``cls``, ``mean`` or ``last`` (pooled mode).
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        label_a, label_b: names on the axes (default: the last part of the path).
        progress: show a progress bar.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    batches = minibatches(len(texts), batch_size)
    if mode == "pooled" and (not batches or min(b.stop - b.start for b in batches) < 4):
        raise ValueError(
            f"pooled rows need at least 4 texts per minibatch for the unbiased HSIC; {len(texts)} texts "
            f"in minibatches of at most {batch_size} give {[b.stop - b.start for b in batches]}"
        )
    accumulator = MinibatchCKA(kernel=kernel)
    dev = _resolve_device(device)
    self_map = model_b is None or model_b == model_a
    encoders = [Encoder.from_pretrained(model_a, pooling=pooling, max_length=max_length, what="model_a")]
    if not self_map:
        encoders.append(Encoder.from_pretrained(model_b, pooling=pooling, max_length=max_length, what="model_b"))
    # One truncation for both models, so that both see the same text (and, over
    # tokens, the same rows): the given one, else the shorter inference length.
    common_length = max_length or min(encoder.max_length for encoder in encoders)
    for encoder in encoders:
        encoder.max_length = common_length
        encoder.to(dev).eval()

    started = time.perf_counter()
    bar = _progress(len(batches), progress)
    rows_seen = []
    with torch.no_grad():
        for batch in batches:
            chunk = list(texts[batch])
            layers = _layers(encoders, chunk, mode)
            rows_seen.append(int(layers[0].shape[1]))
            accumulator.update(*layers)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rows=sum(rows_seen))
    if bar is not None:
        bar.close()

    values = accumulator.compute().cpu().numpy()
    names = [model_a, model_a if self_map else model_b]
    labels = [label_a or _label(names[0]), label_b or (label_a if self_map and label_a else _label(names[1]))]
    settings = {
        "model_a": {"name": names[0], "label": labels[0], "layers": int(values.shape[0]),
                    "hidden_size": encoders[0].hidden_size, "pooling": encoders[0].pooling},
        "model_b": {"name": names[1], "label": labels[1], "layers": int(values.shape[1]),
                    "hidden_size": encoders[-1].hidden_size, "pooling": encoders[-1].pooling},
        "max_length": common_length,
        "self_map": self_map,
        "mode": mode,
        "kernel": kernel,
        "estimator": f"minibatch unbiased {kernel} CKA",
        "texts": len(texts),
        "batch_size": batch_size,
        "minibatches": len(batches),
        "rows_per_minibatch": {"min": min(rows_seen), "mean": float(np.mean(rows_seen)), "max": max(rows_seen)},
        "rows": int(sum(rows_seen)),
        "seconds": round(time.perf_counter() - started, 2),
        "device": _device_name(dev),
        "versions": _versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    hsic_bb = accumulator.hsic_yy.cpu().numpy()
    return CKAMap(values, accumulator.hsic_xy.cpu().numpy(), accumulator.hsic_xx.cpu().numpy(), hsic_bb,
                  labels[0], labels[1], settings)


def _layers(encoders: list[Encoder], texts: list[str], mode: str) -> list[torch.Tensor]:
    """Each model's ``(L + 1, rows, D)`` stack of rows for one minibatch."""
    batches = [encoder.tokenize(texts) for encoder in encoders]
    if mode == "tokens" and len(batches) == 2 and not _same_tokens(*batches):
        raise ValueError(
            "tokens mode needs both models to tokenize every text alike (the rows are tokens); "
            "these tokenizers differ: use pooled mode"
        )
    out = []
    for encoder, batch in zip(encoders, batches):
        hidden = encoder.model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        stacked = torch.stack(hidden).float()
        mask = batch["attention_mask"].bool()
        out.append(stacked[:, mask] if mode == "tokens" else encoder.pool(stacked, mask))
    return out


def _same_tokens(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a["input_ids"].shape == b["input_ids"].shape and bool(
        torch.equal(a["input_ids"].cpu(), b["input_ids"].cpu())
        and torch.equal(a["attention_mask"].cpu(), b["attention_mask"].cpu())
    )


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="cka-map", unit="batch", dynamic_ncols=True)


def _label(name: str) -> str:
    return Path(name.rstrip("/")).name or name


def _number(value: float) -> str:
    return "nan" if math.isnan(value) else repr(float(value))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import transformers

    return {"mipic_kernels": mipic_kernels.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}
