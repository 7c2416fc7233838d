"""Evaluation per width: Spearman as scipy computes it, threshold accuracy, probe, CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
scipy_stats = pytest.importorskip("scipy.stats")

from mipic.cli import main
from mipic.encoder import Encoder
from mipic.evaluate import best_threshold_accuracy, default_dims, evaluate, format_table, spearman, sts_scores
from mipic.testing import WORDS, build_tiny_model
from tests.seeding import SESSION_SEED


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(SESSION_SEED)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


def _sentences(rng, n):
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def test_spearman_matches_scipy_with_ties(rng):
    x = rng.integers(0, 6, size=50).astype(float)  # many ties
    y = x + rng.normal(size=50)
    assert spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


def test_sts_scores_truncate_then_normalise(rng):
    a, b = (torch.tensor(rng.normal(size=(40, 12))) for _ in range(2))
    gold = rng.uniform(0, 5, size=40)
    got = sts_scores(a, b, gold, [3, 12])
    for d in (3, 12):
        cos = F.cosine_similarity(a[:, :d], b[:, :d]).numpy()
        assert got[str(d)] == pytest.approx(100 * scipy_stats.spearmanr(cos, gold).statistic, abs=1e-9)


def test_best_threshold_accuracy_against_brute_force(rng):
    for _ in range(5):
        sim = np.round(rng.normal(size=30), 1)  # ties between similarities
        labels = (sim + rng.normal(size=30) > 0).astype(int)
        candidates = np.concatenate([sim, [np.inf, -np.inf]])
        brute = max(np.mean((sim >= c) == labels) for c in candidates)
        assert best_threshold_accuracy(sim, labels) == pytest.approx(brute)


def test_cli_sts_matches_scipy_on_the_model(tiny_bert, tmp_path, rng, capsys):
    left, right = _sentences(rng, 30), _sentences(rng, 30)
    gold = rng.uniform(0, 5, size=30).round(2)
    data = tmp_path / "sts-dev.csv"  # the STS Benchmark layout
    data.write_text("".join(f"g\tf\t2012\t{i}\t{s}\t{a}\t{b}\n" for i, (s, a, b) in enumerate(zip(gold, left, right))))
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--dims", "8,32",
                 "--layers", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert set(scores) == {"sts", "sts@layer1"} and set(scores["sts"]) == {"8", "32"}
    encoder = Encoder.from_pretrained(tiny_bert)
    ea, eb = encoder.encode(left)[0], encoder.encode(right)[0]
    for d in (8, 32):
        cos = F.cosine_similarity(ea[:, :d].double(), eb[:, :d].double()).numpy()
        assert scores["sts"][str(d)] == pytest.approx(100 * scipy_stats.spearmanr(cos, gold).statistic, abs=1e-6)
    assert f"{scores['sts']['8']:.2f}" in printed and "sts@layer1" in printed


def test_classification_and_pair_tasks(tiny_bert, tmp_path, rng):
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    for path, n in ((train, 40), (test, 20)):
        rows = [(s, "dog" if "dog" in s else "other") for s in _sentences(rng, n)]
        path.write_text("text,label\n" + "".join(f"{s},{label}\n" for s, label in rows))
    scores = evaluate(tiny_bert, "classification", str(train), test_data=str(test), dims=[8, 32])
    assert set(scores["classification"]) == {"8", "32"}
    assert all(0 <= v <= 100 for v in scores["classification"].values())

    pairs = tmp_path / "pairs.jsonl"
    a, b = _sentences(rng, 20), _sentences(rng, 20)
    labels = rng.integers(0, 2, size=20)
    pairs.write_text("\n".join(json.dumps({"sentence1": s, "sentence2": t, "label": int(y)})
                               for s, t, y in zip(a, b, labels)))
    scores = evaluate(tiny_bert, "pair", str(pairs), dims=[8, 32])
    encoder = Encoder.from_pretrained(tiny_bert)
    ea, eb = encoder.encode(a)[0], encoder.encode(b)[0]
    for d in (8, 32):
        sim = F.cosine_similarity(ea[:, :d].double(), eb[:, :d].double()).numpy()
        brute = max(np.mean((sim >= c) == labels) for c in np.concatenate([sim, [np.inf]]))
        assert scores["pair"][str(d)] == pytest.approx(100 * brute)


def test_eval_errors(tiny_bert, tmp_path, capsys):
    data = tmp_path / "sts-dev.csv"
    data.write_text("g\tf\t2012\t1\t4.0\ta man\ta dog\n")
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--dims", "8,64"]) == 2
    assert "dims must be in [1, 32]" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_bert, "--task", "classification", "--data", str(data)]) == 2
    assert "needs a test file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--dims", "8,x"])


def test_default_dims_and_table(tiny_bert):
    assert default_dims(tiny_bert, 32) == [8, 16, 32]
    table = format_table({"sts": {"8": 50.0, "32": 61.234}})
    assert table.splitlines()[0].split() == ["task", "8", "32"] and "61.23" in table
