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
from mipic.data import DataError
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
        # The first sentence of each file holds "dog", so both classes are always present.
        rows = [(s, "dog" if "dog" in s else "other") for s in ["a dog"] + _sentences(rng, n - 1)]
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


@pytest.fixture
def no_weights(monkeypatch):
    """Fail any attempt to load a model's weights: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(Encoder, "from_pretrained", refuse)


def test_eval_checks_its_inputs_before_the_model_loads(tiny_bert, tmp_path, capsys, no_weights, monkeypatch):
    data = tmp_path / "sts-dev.csv"
    data.write_text("g\tf\t2012\t1\t4.0\ta man\ta dog\n")
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--dims", "8,64"]) == 2
    assert "dims must be in [1, 32]" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--layers", "1,7"]) == 2
    assert "layers must be in [0, 3]; got [7]" in capsys.readouterr().err
    assert main(["eval", "--model", tiny_bert, "--task", "classification", "--data", str(data)]) == 2
    assert "needs a test file" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", "missing/sts-dev.csv"]) == 2
    assert f"data file {tmp_path / 'missing' / 'sts-dev.csv'} does not exist" in capsys.readouterr().err
    bad_score = tmp_path / "scores.csv"
    bad_score.write_text("sentence1,sentence2,score\na man,a dog,high\n")
    assert main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(bad_score)]) == 2
    assert "STS scores must be numbers; got 'high'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--model", tiny_bert, "--task", "sts", "--data", str(data), "--dims", "8,x"])


def test_eval_names_a_model_that_does_not_load_in_its_own_words(tmp_path, capsys, monkeypatch):
    data = tmp_path / "sts-dev.csv"
    data.write_text("g\tf\t2012\t1\t4.0\ta man\ta dog\n")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--model", "runs/nonexistent", "--task", "sts", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mipic eval: error: model 'runs/nonexistent' cannot be loaded: there is no folder "
                          f"{tmp_path / 'runs' / 'nonexistent'} and HF_HUB_OFFLINE is set")
    assert "model.name" not in err and len(err.strip().splitlines()) == 1


def test_mipic_alone_prints_the_full_help(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: mipic") and "train" in out and "eval" in out and "examples:" in out


def test_encode_keeps_the_order_of_the_texts_and_shows_progress(tiny_bert, rng, capsys):
    encoder = Encoder.from_pretrained(tiny_bert)
    texts = _sentences(rng, 11)  # batches of 4 formed by length, not by position
    batched = encoder.encode(texts, batch_size=4, progress=True)[0]
    one_by_one = torch.cat([encoder.encode([t])[0] for t in texts])
    assert torch.allclose(batched, one_by_one, atol=1e-5)
    err = capsys.readouterr().err
    assert "encode" in err and "11/11" in err


def test_default_dims_and_table(tiny_bert):
    assert default_dims(tiny_bert, 32) == [8, 16, 32]
    table = format_table({"sts": {"8": 50.0, "32": 61.234}})
    assert table.splitlines()[0].split() == ["task", "8", "32"] and "61.23" in table


def test_classification_with_one_class_is_refused_before_the_model_loads(tmp_path):
    train = tmp_path / "train.csv"
    test = tmp_path / "test.csv"
    for path in (train, test):
        path.write_text("text,label\na dog runs,other\na cat sits,other\n")
    with pytest.raises(DataError, match="at least 2 label classes"):
        evaluate(str(tmp_path / "no-model-here"), "classification", str(train), test_data=str(test))
