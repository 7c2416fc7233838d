"""The training loop: the loss goes down, resumption is exact, the saved model loads."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

pytest.importorskip("transformers")

import mipic.train as train_module
from mipic.cli import main
from mipic.config import config_from_dict
from mipic.encoder import Encoder
from mipic.train import METRICS_FILE, checkpoints, latest_checkpoint, train, warmup_cosine
from mipic.testing import build_tiny_model

SENTENCES = [
    "a man is playing a guitar", "the dog runs in the park", "two people sitting on a table",
    "a red car on the street", "the old woman is reading a book", "children are eating food",
    "a black cat jumps on the table", "a young man walks with a dog",
]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


def _config(model, data, **train):
    return config_from_dict({
        "model": {"name": model, "dims": [4, 8, 16, 32], "max_length": 16},
        "data": {"path": data},
        "objective": {"method": "mipic", "sia": {"layers": [1, 2, 3], "k_min": 2},
                      "pic": {"chain": [[8, 1], [16, 2], [32, 3]]}},
        "train": {"batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0, "progress": False, "log_every": 1,
                  "threads": 1, **train},
    })


def _metrics(folder):
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def test_warmup_cosine_schedule():
    f = warmup_cosine(2, 10)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5) and f(10) == pytest.approx(0.0)


def test_loss_goes_down_on_a_repeated_batch(tiny_bert, sentences, tmp_path):
    # Every step sees the same 8 sentences (one batch per epoch); no schedule decay.
    cfg = _config(tiny_bert, sentences, batch_size=8, epochs=25, lr=2e-3)
    cfg.objective.mic.enabled = True
    # As in the shipped configs: at the paper's 0.05 the attention term swamps the others
    # (METHOD.md, known hazard) and MRL rises over these 25 steps.
    cfg.objective.sia.attention_temperature = 1.0
    train(cfg, tmp_path)
    rows = _metrics(tmp_path)
    assert len(rows) == 25
    first, last = rows[0], rows[-1]
    for key in ("loss", "mrl", "sia_attention", "pic", "mic_sir"):
        assert last[key] < first[key], key
    assert {"lr", "grad_norm", "sia_cka", "mic_scr", "mrl@4", "seconds", "epoch"} <= set(first)


def test_resume_repeats_the_uninterrupted_run(tiny_bert, sentences, tmp_path):
    # 2 steps per epoch, 6 steps; every checkpoint kept.
    cfg = _config(tiny_bert, sentences, epochs=3, save_every=2, grad_accum=1, keep_checkpoints=None)
    full = tmp_path / "full"
    train(cfg, full)
    assert latest_checkpoint(full).name == "step-4"
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-2", resumed / "checkpoints" / "step-2")
    kept = [line for line in (full / METRICS_FILE).read_text().splitlines() if json.loads(line)["step"] <= 2]
    (resumed / METRICS_FILE).write_text("\n".join(kept) + "\n")
    train(cfg, resumed, resume=True)

    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [r["loss"] for r in _metrics(full)]
    resumed_rows = _metrics(resumed)
    assert [r["step"] for r in resumed_rows] == list(range(1, 7))
    assert [r["loss"] for r in resumed_rows] == losses  # same data, dropout and updates


def test_resume_under_another_configuration_is_an_error(tiny_bert, sentences, tmp_path):
    cfg = _config(tiny_bert, sentences, max_steps=2, save_every=1, keep_checkpoints=1)
    train(cfg, tmp_path)
    changed = _config(tiny_bert, sentences, max_steps=2, save_every=1, keep_checkpoints=1, lr=5e-4, log_every=2)
    changed.objective.sia.k_min = 3
    with pytest.raises(ValueError, match=r"another configuration \(objective.sia.k_min: 2 -> 3; "
                                         r"train.lr: 0.001 -> 0.0005\); resume with the same one"):
        train(changed, tmp_path, resume=True)
    allowed = _config(tiny_bert, sentences, max_steps=2, save_every=5, log_every=2, keep_checkpoints=3, threads=2)
    train(allowed, tmp_path, resume=True)


def test_resume_without_checkpoint_is_an_error(tiny_bert, sentences, tmp_path):
    with pytest.raises(ValueError, match="--resume: no checkpoint"):
        train(_config(tiny_bert, sentences, max_steps=1), tmp_path, resume=True)


def test_too_little_data_is_an_error(tiny_bert, sentences, tmp_path):
    with pytest.raises(ValueError, match="the data has 8 examples, fewer than one optimiser step needs"):
        train(_config(tiny_bert, sentences, batch_size=4, grad_accum=3), tmp_path)


def test_final_model_loads_in_transformers_and_sentence_transformers(tiny_bert, sentences, tmp_path):
    train(_config(tiny_bert, sentences, max_steps=2, grad_accum=2), tmp_path)
    from transformers import AutoModel

    assert AutoModel.from_pretrained(tmp_path).config.hidden_size == 32
    meta = json.loads((tmp_path / "mipic.json").read_text())
    assert meta["matryoshka_dims"] == [4, 8, 16, 32] and meta["pooling"] == "cls"
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(tmp_path), device="cpu")
    from mipic.encoder import Encoder

    ours = Encoder.from_pretrained(str(tmp_path)).encode(SENTENCES[:3])[0]
    theirs = torch.as_tensor(model.encode(SENTENCES[:3]))
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_cli_train_and_its_errors(tiny_bert, sentences, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{name: {tiny_bert}, dims: [8, 32], max_length: 16}}\n"
                      f"data: {{path: {sentences}}}\nobjective: {{method: mrl}}\n"
                      "train: {batch_size: 4, progress: false}\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "o"), "--set", "train.max_steps=1"]) == 0
    assert (tmp_path / "o" / "model.safetensors").is_file()
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "o"), "--set", "train.lr=-1"]) == 2
    assert "train.lr must be > 0" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "p"),
                 "--set", "model.name=/nonexistent/model"]) == 2
    assert "model.name '/nonexistent/model' cannot be loaded: there is no folder /nonexistent/model" in (
        capsys.readouterr().err)
    assert not (tmp_path / "p").exists()  # nothing created before the model loaded


def test_head_lr_applies_to_the_objective_parameters_only(tiny_bert, sentences, tmp_path):
    train(_config(tiny_bert, sentences, max_steps=2, save_every=1, keep_checkpoints=1, lr=1e-4, head_lr=3e-3),
          tmp_path)
    state = torch.load(latest_checkpoint(tmp_path) / "state.pt", weights_only=False)
    groups = state["optimizer"]["param_groups"]
    sizes = [len(g["params"]) for g in groups]
    n_heads = len(state["objective"])  # lifts and PIC layers: every objective tensor is a parameter
    assert sum(sizes[2:]) == n_heads and sum(sizes) == n_heads + len(state["model"])
    assert [g["initial_lr"] for g in groups] == [1e-4, 1e-4, 3e-3, 3e-3]
    assert groups[2]["lr"] / groups[0]["lr"] == pytest.approx(30.0)  # the schedule scales both alike


def _steps(folder):
    return [p.name for p in checkpoints(folder)]


def test_checkpoints_are_pruned_after_the_final_save(tiny_bert, sentences, tmp_path):
    # Checkpoints at steps 1, 2, 3 (none at the final step 4, the final model is saved).
    train(_config(tiny_bert, sentences, epochs=2, save_every=1), tmp_path / "default")
    assert not (tmp_path / "default" / "checkpoints").exists()  # keep_checkpoints 0
    assert (tmp_path / "default" / "model.safetensors").is_file()
    train(_config(tiny_bert, sentences, epochs=2, save_every=1, keep_checkpoints=2), tmp_path / "two")
    assert _steps(tmp_path / "two") == ["step-2", "step-3"]
    train(_config(tiny_bert, sentences, epochs=2, save_every=1, keep_checkpoints=None), tmp_path / "all")
    assert _steps(tmp_path / "all") == ["step-1", "step-2", "step-3"]


def test_checkpoints_roll_during_the_run(tiny_bert, sentences, tmp_path, monkeypatch):
    seen = []
    original = train_module.prune_checkpoints

    def watch(output, keep):
        original(output, keep)
        seen.append(_steps(output))

    monkeypatch.setattr(train_module, "prune_checkpoints", watch)
    train(_config(tiny_bert, sentences, epochs=2, save_every=1, keep_checkpoints=0), tmp_path)
    # While training the latest checkpoint stays for --resume; after the final save none.
    assert seen == [["step-1"], ["step-2"], ["step-3"], []]


def test_a_run_that_fails_before_a_checkpoint_removes_what_it_created(tiny_bert, sentences, tmp_path,
                                                                      monkeypatch, capsys):
    def broken_save(self, folder, dims):
        raise OSError("disk full")

    monkeypatch.setattr(Encoder, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        train(_config(tiny_bert, sentences, max_steps=2), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert f"removed {tmp_path / 'new'}" in capsys.readouterr().err

    # A folder that was there before keeps what it held.
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    with pytest.raises(OSError):
        train(_config(tiny_bert, sentences, max_steps=2), tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["notes.txt"]
    assert "still holds notes.txt" in capsys.readouterr().err


def test_a_run_that_fails_after_a_checkpoint_says_what_it_left(tiny_bert, sentences, tmp_path, monkeypatch, capsys):
    def interrupted_save(self, folder, dims):
        raise KeyboardInterrupt

    monkeypatch.setattr(Encoder, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_bert, sentences, epochs=2, save_every=1, keep_checkpoints=0), tmp_path)
    assert _steps(tmp_path) == ["step-3"]  # the latest, kept for --resume
    err = capsys.readouterr().err
    assert f"the failed run left {tmp_path} (checkpoints/step-3); continue it with --resume" in err


def test_start_up_summary_and_log_lines(tiny_bert, sentences, tmp_path, capsys):
    cfg = _config(tiny_bert, sentences, epochs=2, save_every=2, progress=True, log_every=2, threads="auto")
    cfg.objective.mic.enabled = True
    threads_before = torch.get_num_threads()
    train(cfg, tmp_path)
    assert torch.get_num_threads() == threads_before  # given back
    out, err = capsys.readouterr()
    summary = dict(line.strip().split(None, 1) for line in out.splitlines()[1:])
    assert out.splitlines()[0] == f"mipic train -> {tmp_path.resolve()}"
    assert summary["model"].startswith(f"{tiny_bert} (bert, 3 layers, width 32,")
    assert summary["widths"] == "4, 8, 16, 32"
    assert summary["objective"].startswith(
        "mipic = 0.4 mrl + 0.6 (sia_attention + sia_cka + pic) + 0.1 (mic_scr + mic_sir); SIA at layers 1, 2, 3 x 3 "
        "widths, CKA backend auto (the eager reference on CPU); PIC chain of 3 links; MIC at layers 3")
    assert summary["data"].startswith(f"{len(SENTENCES)} examples from {sentences}")
    assert summary["steps"].startswith("4 optimiser steps of 4 x 1 examples (2.00 epochs of 2 steps)")
    assert re.fullmatch(r"cpu, \d+ threads? \(train.threads auto: other processes kept \d+\.\d of \d+ cores busy\), "
                        r"fp32; load average \d+\.\d\d", summary["device"]), summary["device"]
    assert summary["saves"].endswith("deleted once the final model is saved")
    # Not a terminal: one line per metrics record instead of a bar, each with its step time.
    lines = [line for line in err.splitlines() if line.startswith("train step")]
    assert [line.split(":")[0] for line in lines] == ["train step 2/4", "train step 4/4"]
    assert all(line.endswith("s/step") for line in lines)
    rows = _metrics(tmp_path)
    assert all(r["step_seconds"] > 0 for r in rows)


def _sentence_transformers_folder(tiny_bert, folder, max_seq_length):
    """The tiny model as a sentence-transformers pipeline: Transformer, mean Pooling, Normalize."""
    shutil.copytree(tiny_bert, folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (folder / "2_Normalize").mkdir()
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: "}, "default_prompt_name": None, "similarity_fn_name": "cosine"}))
    return str(folder)


def test_saved_pipeline_keeps_the_base_modules_and_inference_length(tiny_bert, sentences, tmp_path):
    base = _sentence_transformers_folder(tiny_bert, tmp_path / "base", max_seq_length=48)
    cfg = _config(base, sentences, max_steps=2)  # trained on texts cut at 16 tokens
    cfg.model.pooling = "auto"
    out = train(cfg, tmp_path / "out")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 48
    meta = json.loads((out / "mipic.json").read_text())
    assert meta["train_max_length"] == 16 and meta["pooling"] == "mean"
    st_config = json.loads((out / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": "query: "} and st_config["matryoshka_dims"] == [4, 8, 16, 32]

    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == 48
    long = " ".join(["a man is playing a guitar"] * 8)  # 48 words: past 16 tokens
    assert model.tokenize([long])["input_ids"].shape[1] == 48
    theirs = torch.as_tensor(model.encode(SENTENCES[:3] + [long]))
    assert torch.allclose(theirs.norm(dim=-1), torch.ones(4), atol=1e-5)  # Normalize kept
    encoder = Encoder.from_pretrained(str(out))
    assert encoder.max_length == 48
    ours = torch.nn.functional.normalize(encoder.encode(SENTENCES[:3] + [long])[0], dim=-1)
    assert torch.allclose(ours, theirs, atol=1e-5)
