"""``mipic cka-map`` and its Python API on tiny models built from a config: the rows
fed to the estimator, the files written, self maps, transposed maps, errors."""

from __future__ import annotations

import csv
import functools
import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import mipic_kernels as mk
from mipic.cka_map import FILES, compute_cka_map, minibatches, read_texts
from mipic.cli import main
from mipic.encoder import Encoder
from mipic.testing import WORDS, build_tiny_model
from tests.seeding import SESSION_SEED


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("qwen"), "qwen")


def _texts(count: int) -> list[str]:
    rng = np.random.default_rng(SESSION_SEED)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(count)]


# The embedding-layer state of [CLS] (the encoder's pooling) and of the final [SEP]
# (the decoder's) is the same for every text: those entries are NaN, rightly. Mean
# pooling varies at every layer.
POOLING = "mean"


@functools.lru_cache(maxsize=None)
def _encoder(model: str) -> Encoder:
    return Encoder.from_pretrained(model, pooling=POOLING).eval()


def _rows(model: str, texts: list[str], mode: str) -> torch.Tensor:
    """Every layer's rows computed by hand: ``(L + 1, rows, D)``."""
    encoder = _encoder(model)
    with torch.no_grad():
        out = encoder(texts)
        hidden = torch.stack(out.hidden)
    return hidden[:, out.mask] if mode == "tokens" else encoder.pool(hidden, out.mask)


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_one_minibatch_is_the_full_batch_unbiased_cka_of_the_rows(tiny_bert, tiny_qwen, mode):
    texts = _texts(23)
    got = compute_cka_map(tiny_bert, tiny_qwen, texts, mode=mode, batch_size=32, pooling=POOLING, progress=False)
    assert got.values.shape == (4, 3)  # embeddings + 3 layers against embeddings + 2
    assert not np.isnan(got.values).any()
    want = mk.cka_matrix(_rows(tiny_bert, texts, mode).double(), _rows(tiny_qwen, texts, mode).double(),
                         unbiased=True)
    # float32 hidden states and float32 statistics against float64: O(1) values, a
    # few hundred rows deep.
    np.testing.assert_allclose(got.values, want.numpy(), rtol=0, atol=1e-5)
    assert got.settings["minibatches"] == 1 and got.settings["rows"] == _rows(tiny_bert, texts, mode).shape[1]


def test_minibatches_sum_their_hsic(tiny_bert, tiny_qwen):
    texts = _texts(30)
    got = compute_cka_map(tiny_bert, tiny_qwen, texts, batch_size=8, pooling=POOLING, progress=False)
    acc = mk.MinibatchCKA()
    for part in minibatches(30, 8):
        acc.update(_rows(tiny_bert, texts[part], "pooled"), _rows(tiny_qwen, texts[part], "pooled"))
    assert got.settings["minibatches"] == 4
    np.testing.assert_allclose(got.values, acc.compute().numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.hsic_ab, acc.hsic_xy.numpy(), rtol=1e-6)


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_self_map_and_transposed_maps(tiny_bert, tiny_qwen, mode):
    texts = _texts(20)
    self_map = compute_cka_map(tiny_bert, None, texts, mode=mode, batch_size=10, pooling=POOLING, progress=False)
    assert self_map.settings["self_map"]
    assert np.array_equal(self_map.values, self_map.values.T)
    assert np.array_equal(np.diagonal(self_map.values), np.ones(4))
    ab = compute_cka_map(tiny_bert, tiny_qwen, texts, mode=mode, batch_size=10, pooling=POOLING, progress=False)
    ba = compute_cka_map(tiny_qwen, tiny_bert, texts, mode=mode, batch_size=10, pooling=POOLING, progress=False)
    np.testing.assert_allclose(ab.values, ba.values.T, rtol=0, atol=1e-6)
    # Model B given as model A again: the self map, each minibatch encoded once.
    np.testing.assert_array_equal(
        compute_cka_map(tiny_bert, tiny_bert, texts, mode=mode, batch_size=10, pooling=POOLING, progress=False).values,
        self_map.values,
    )


def test_cli_writes_csv_png_and_json(tiny_bert, tiny_qwen, tmp_path, capsys):
    data = tmp_path / "sentences.txt"
    texts = _texts(26)
    data.write_text("\n".join(texts + texts[:3]) + "\n")  # duplicates are used once
    out = tmp_path / "map"
    code = main(["cka-map", "--model-a", tiny_bert, "--model-b", tiny_qwen, "--data", str(data), "--tokens",
                 "--kernel", "rbf", "--batch-size", "9", "--pooling", POOLING, "--max-examples", "25", "--label-a", "bert",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    assert "bert (4 layers)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert (out / "cka_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    settings = json.loads((out / "cka_map.json").read_text())
    assert settings["mode"] == "tokens" and settings["kernel"] == "rbf" and settings["texts"] == 25
    assert settings["data"] == {"path": str(data), "format": "auto", "texts_in_file": 29, "distinct_texts_used": 25}
    assert settings["minibatches"] == 3 and settings["model_a"]["label"] == "bert"
    assert settings["max_length"] == 64  # both tiny models: 64 positions
    for key in ("device", "versions", "date", "rows_per_minibatch", "seconds"):
        assert key in settings
    with (out / "cka_map.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3
    values = np.array(settings["values"], dtype=float)
    assert values.shape == (4, 3)
    for row in rows:
        v, hsic = float(row["cka"]), [float(row[k]) for k in ("hsic_ab", "hsic_aa", "hsic_bb")]
        np.testing.assert_equal(v, values[int(row["layer_a"]), int(row["layer_b"])])
        if math.isnan(v):  # a layer that never had variance: its self-HSIC sum is exactly 0
            assert hsic[0] == 0.0 and min(hsic[1:]) == 0.0
        else:
            assert v == pytest.approx(hsic[0] / math.sqrt(hsic[1] * hsic[2]), rel=1e-12)


def test_tokens_mode_needs_one_tokenizer(tiny_bert, tmp_path):
    from transformers import AutoTokenizer

    other = build_tiny_model(tmp_path / "other", "bert")
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.add_tokens(["zebra"])  # unknown to the other tokenizer
    tokenizer.save_pretrained(other)
    texts = ["a zebra and a cat"] * 3 + ["the man is running", "two people"]
    with pytest.raises(ValueError, match="tokens mode needs both models to tokenize every text alike"):
        compute_cka_map(tiny_bert, other, texts, mode="tokens", pooling=POOLING, progress=False)
    compute_cka_map(tiny_bert, other, texts, mode="pooled", pooling=POOLING, progress=False)  # pooled rows need no common tokens


def test_errors_are_named(tiny_bert, tmp_path, capsys):
    texts = _texts(10)
    with pytest.raises(ValueError, match="at least 4 texts per minibatch"):
        compute_cka_map(tiny_bert, None, texts, batch_size=3, pooling=POOLING, progress=False)
    with pytest.raises(ValueError, match="at least 4 texts per minibatch"):
        compute_cka_map(tiny_bert, None, texts[:3], pooling=POOLING, progress=False)
    with pytest.raises(ValueError, match="mode must be one of"):
        compute_cka_map(tiny_bert, None, texts, mode="words", pooling=POOLING, progress=False)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        compute_cka_map(tiny_bert, None, texts, batch_size=0, pooling=POOLING, progress=False)
    code = main(["cka-map", "--model-a", tiny_bert, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path)])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["cka-map", "--model-a", tiny_bert, "--data", "x.txt", "--tokens", "--pooled", "--out", "o"])


def test_minibatches_are_near_equal_and_cover_everything():
    for count in range(0, 40):
        for size in (1, 4, 7, 64):
            parts = minibatches(count, size)
            lengths = [p.stop - p.start for p in parts]
            assert sum(lengths) == count and all(p.stop == q.start for p, q in zip(parts, parts[1:]))
            assert not lengths or (max(lengths) <= size and max(lengths) - min(lengths) <= 1)
            assert len(parts) == -(-count // size)


def test_read_texts_keeps_every_sentence_of_a_pair_once(tmp_path):
    path = tmp_path / "sts-dev.csv"
    rows = ["main-captions\tMSRvid\t2012test\t0001\t5.000\tA man plays.\tA man is playing.",
            "main-captions\tMSRvid\t2012test\t0002\t1.000\tA dog runs.\tA man plays."]
    path.write_text("\n".join(rows) + "\n")
    assert read_texts(str(path)) == (["A man plays.", "A man is playing.", "A dog runs."], 4)
