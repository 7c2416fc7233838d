"""Data readers: every supported format, bad rows reported with file and line, clear errors."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from mipic.data import (
    BadRowWarning, DataError, detect_format, load_training_examples, read_records, training_examples,
)


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def test_text_reports_empty_and_undecodable_lines(tmp_path):
    path = _write(tmp_path / "s.txt", b"first sentence\n\n   \nbad \xff byte\nlast one\n")
    with pytest.warns(BadRowWarning) as caught:
        records = read_records(path)
    assert [r.texts for r in records] == [("first sentence",), ("last one",)]
    message = str(caught[0].message)
    assert f"{path}:2: empty text" in message and f"{path}:3: empty text" in message
    assert f"{path}:4: not valid UTF-8" in message
    assert records[1].source == f"{path}:5"


def test_csv_and_tsv_named_columns(tmp_path):
    csv_path = _write(tmp_path / "p.csv", 'a,b,label\n"x, with comma",y,1\nonly one\nz,,0\n')
    with pytest.warns(BadRowWarning) as caught:
        records = read_records(csv_path, columns=["a", "b"], label_column="label")
    assert records == [records[0]] and records[0].texts == ("x, with comma", "y") and records[0].label == "1"
    message = str(caught[0].message)
    assert f"{csv_path}:3: missing column" in message and f"{csv_path}:4: empty text" in message
    tsv_path = _write(tmp_path / "p.tsv", "text\tlabel\nhello there\tpos\n")
    assert read_records(tsv_path, columns=["text"], label_column="label")[0].label == "pos"
    with pytest.raises(DataError, match=r"column\(s\) \['c'\] not in the header"):
        read_records(csv_path, columns=["a", "c"])


def test_jsonl_bad_lines(tmp_path):
    lines = [json.dumps({"s1": "a b", "s2": "c d"}), "{not json", json.dumps([1]), json.dumps({"s1": "x"})]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    with pytest.warns(BadRowWarning) as caught:
        records = read_records(path, columns=["s1", "s2"])
    assert [r.texts for r in records] == [("a b", "c d")]
    message = str(caught[0].message)
    assert f"{path}:2: not valid JSON" in message and f"{path}:3: not a JSON object" in message
    assert f"{path}:4: missing column" in message
    with pytest.raises(DataError, match="needs the column names"):
        read_records(path)


def test_stsb_sick_snli_formats(tmp_path):
    stsb = _write(tmp_path / "sts-dev.csv",
                  "g\tf\t2012\t1\t4.5\tA man runs.\tA man is running.\n"
                  "g\tf\t2012\t2\t1.0\tA dog.\tA \"cat\".\textra\tcols\n"
                  "g\tf\t2012\t3\t1.0\ttoo short\n")
    assert detect_format(stsb) == "stsb"
    with pytest.warns(BadRowWarning, match=r"sts-dev.csv:3: expected 7 tab-separated columns"):
        rows = read_records(stsb)
    assert rows[0].texts == ("A man runs.", "A man is running.") and rows[0].label == 4.5
    assert rows[1].texts == ("A dog.", 'A "cat".')

    sick = _write(tmp_path / "SICK_trial.txt",
                  "pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n"
                  "1\tKids play.\tChildren play.\t4.5\tENTAILMENT\n")
    assert read_records(sick)[0].label == 4.5
    assert read_records(sick, label_column="entailment_judgment")[0].label == "ENTAILMENT"

    snli = tmp_path / "snli_dev.jsonl"
    rows = [("P one.", "H entailed.", "entailment"), ("P one.", "H contradicted.", "contradiction"),
            ("P two.", "H2 entailed.", "entailment"), ("P one.", "H neutral.", "neutral")]
    _write(snli, "\n".join(json.dumps({"sentence1": p, "sentence2": h, "gold_label": g}) for p, h, g in rows))
    records = read_records(str(snli))
    assert training_examples(records, "supervised") == [("P one.", "H entailed.", "H contradicted.")]


def test_empty_source_stops_with_a_clear_error(tmp_path):
    path = _write(tmp_path / "empty.txt", "\n \n")
    with pytest.raises(DataError, match=r"empty.txt yields no usable example; first problem: .*empty.txt:1: empty text"):
        with pytest.warns(BadRowWarning):
            read_records(path)
    with pytest.raises(DataError, match="does not exist"):
        read_records(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="cannot tell the format"):
        read_records(_write(tmp_path / "x.parquet", "x"))


def test_hub_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match="needs the 'datasets' package"):
        read_records("someone/some-dataset", "hf", ["text"])


def test_hub_dataset_unreachable(monkeypatch):
    def fail(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=fail))
    with pytest.raises(DataError, match="could not load the hub dataset 'someone/x'.*offline.*reachable"):
        read_records("someone/x", "hf", ["text"])


def test_training_examples(tmp_path):
    stsb = _write(tmp_path / "sts-train.csv", "".join(
        f"g\tf\t2012\t{i}\t3.0\tsentence {i % 5}\tother {i}\n" for i in range(10)))
    records = read_records(stsb)
    unsup = training_examples(records, "unsupervised")
    assert len(unsup) == 15 and len(set(unsup)) == 15  # 5 distinct first + 10 distinct second sentences
    assert training_examples(records, "supervised")[0] == ("sentence 0", "other 0")
    sub = training_examples(records, "unsupervised", max_examples=4, seed=3)
    assert len(sub) == 4 and sub == training_examples(records, "unsupervised", max_examples=4, seed=3)
    cfg = SimpleNamespace(
        data=SimpleNamespace(path=[stsb, stsb], format="auto", columns=None, hf_split="train", hf_config=None,
                             mode="unsupervised", max_examples=None),
        train=SimpleNamespace(seed=0))
    assert len(load_training_examples(cfg)) == 15


@pytest.mark.parametrize(
    "name, body, options",
    [
        ("p.csv", b"a,b\n\nx,y\n  \nbad \xff,z\nu,v\n", dict(columns=["a", "b"])),
        ("d.jsonl", b'{"a": "x", "b": "y"}\n\n  \n{"a": "bad \xff"}\n{"a": "u", "b": "v"}\n', dict(columns=["a", "b"])),
        ("sts-dev.csv", b"g\tf\t1\t1\t1.0\tx\ty\n\n \ng\tf\t1\t2\t2.0\tbad \xff\tz\ng\tf\t1\t3\t3.0\tu\tv\n", {}),
    ],
)
def test_delimited_jsonl_and_stsb_skip_blank_lines_and_report_undecodable_ones(tmp_path, name, body, options):
    path = _write(tmp_path / name, body)
    with pytest.warns(BadRowWarning) as caught:
        records = read_records(path, **options)
    assert [r.texts for r in records] == [("x", "y"), ("u", "v")]
    message = str(caught[0].message)
    assert "not valid UTF-8" in message and "empty text" not in message
