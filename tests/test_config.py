"""The training configuration: loading, overrides, and a clear error for every bad key or value."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("yaml")

from mipic.config import Config, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def _minimal(**sections):
    raw = {"data": {"path": "train.txt"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: a.txt}\nobjective: {alpha: 0.5, sia: {layers: [1, 3]}}\n")
    (tmp_path / "a.txt").write_text("a sentence\n")
    cfg = load_config(path, ["train.lr=1e-4", "model.dims=[8, 16, 384]", "objective.mic.enabled=true",
                             "objective.pic.chain=[[8, 1], [16, 2]]"])
    assert isinstance(cfg, Config)
    assert cfg.objective.alpha == 0.5 and cfg.objective.sia.layers == [1, 3]
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.dims == [8, 16, 384]
    assert cfg.objective.mic.enabled is True
    assert cfg.objective.pic.chain == [[8, 1], [16, 2]]
    assert cfg.train.batch_size == 16  # untouched default


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_load(path, tmp_path):
    data = tmp_path / "sentences.txt"  # the shipped data paths point at files a clone does not have
    data.write_text("a sentence\n")
    cfg = load_config(path, [f"data.path={data}"])
    assert cfg.model.dims[-1] >= cfg.model.dims[0]


def test_relative_data_paths_are_found_next_to_the_config_then_in_the_working_directory(tmp_path, monkeypatch):
    configs, work = tmp_path / "configs", tmp_path / "work"
    for folder in (configs, work):
        (folder / "data").mkdir(parents=True)
    (configs / "c.yaml").write_text("data: {path: data/a.txt}\n")
    (work / "data" / "a.txt").write_text("from the working directory\n")
    monkeypatch.chdir(work)
    assert load_config(configs / "c.yaml").data.path == str(work / "data" / "a.txt")
    (configs / "data" / "a.txt").write_text("next to the config\n")
    assert load_config(configs / "c.yaml").data.path == str(configs / "data" / "a.txt")
    # A list is resolved entry by entry; an override follows the same rule.
    cfg = load_config(configs / "c.yaml", ["data.path=[data/a.txt, ../work/data/a.txt]"])
    assert cfg.data.path == [str(configs / "data" / "a.txt"), str(work / "data" / "a.txt")]
    # Without a config file: the working directory only.
    assert load_config(None, ["data.path=data/a.txt"]).data.path == str(work / "data" / "a.txt")


def test_a_missing_data_file_names_every_absolute_path_tried(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "c.yaml").write_text("data: {path: ../data/missing.csv}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        load_config("configs/c.yaml")
    message = str(err.value)
    assert message.startswith("data.path '../data/missing.csv' does not exist: looked for ")
    assert str(tmp_path / "data" / "missing.csv") in message  # next to the config: configs/../data
    assert str(tmp_path.parent / "data" / "missing.csv") in message  # the working directory's ../data


def test_hub_dataset_names_and_absolute_paths_are_left_as_they_are(tmp_path):
    assert load_config(None, ["data.path=org/sentences"]).data.path == "org/sentences"
    assert load_config(None, ["data.path=org/x", "data.format=hf"]).data.path == "org/x"
    absolute = tmp_path / "a.txt"  # need not exist yet: reading it reports a missing file
    assert load_config(None, [f"data.path={absolute}"]).data.path == str(absolute)


def test_shipped_configs_present():
    assert {p.stem for p in CONFIGS} >= {"tinybert-6l", "bert-base", "bge-m3", "qwen3-0.6b", "minilm-small"}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"modle": {}}, "unknown key modle"),
        (_minimal(train={"learning_rate": 1e-3}), "unknown key train.learning_rate"),
        (_minimal(objective={"sia": {"layer": [1]}}), "unknown key objective.sia.layer"),
        (_minimal(train={"batch_size": "16"}), "train.batch_size must be an int"),
        (_minimal(train={"batch_size": 16.0}), "train.batch_size must be an int"),
        (_minimal(train={"epochs": True}), "train.epochs must be an int"),
        (_minimal(train={"lr": "fast"}), "train.lr must be a number"),
        (_minimal(train={"lr": -1.0}), "train.lr must be > 0"),
        (_minimal(train={"head_lr": 0.0}), "train.head_lr must be > 0 or null"),
        (_minimal(train={"lr": float("nan")}), "train.lr must be a number"),
        (_minimal(train={"batch_size": 1}), "train.batch_size must be an int >= 2"),
        (_minimal(train={"warmup_ratio": 1.0}), "train.warmup_ratio must be in [0, 1)"),
        (_minimal(train={"grad_accum": 0}), "train.grad_accum must be an int >= 1"),
        (_minimal(train={"precision": "fp8"}), "train.precision must be one of"),
        (_minimal(train={"device": "tpu"}), "train.device must be"),
        (_minimal(train={"max_steps": 0}), "train.max_steps must be"),
        (_minimal(train={"save_every": 0}), "train.save_every must be"),
        (_minimal(model={"pooling": "max"}), "model.pooling must be one of"),
        (_minimal(model={"dims": [16, 8]}), "model.dims must be strictly increasing"),
        (_minimal(model={"dims": []}), "model.dims must list at least one width"),
        (_minimal(model={"dims": 16}), "model.dims must be a list of an int"),
        (_minimal(model={"dims": [8, "16"]}), "model.dims[1] must be an int"),
        (_minimal(model={"max_length": 1}), "model.max_length must be"),
        (_minimal(model={"name": ""}), "model.name must name"),
        ({"data": {}}, "data.path must be"),
        (_minimal(data={"format": "xml"}), "data.format must be one of"),
        (_minimal(data={"mode": "weak"}), "data.mode must be one of"),
        (_minimal(data={"columns": []}), "data.columns must name 1 to 3"),
        (_minimal(data={"max_examples": 0}), "data.max_examples must be"),
        (_minimal(objective={"method": "simcse"}), "objective.method must be one of"),
        (_minimal(objective={"alpha": 1.5}), "objective.alpha must be in [0, 1]"),
        (_minimal(objective={"temperature": 0.0}), "objective.temperature must be > 0"),
        (_minimal(objective={"aggregation": "max"}), "objective.aggregation must be one of"),
        (_minimal(objective={"mrl_weights": [1.0]}), "objective.mrl_weights must be 6"),
        (_minimal(objective={"sia": {"layers": [3, 1]}}), "objective.sia.layers must be strictly increasing"),
        (_minimal(objective={"sia": {"attention_temperature": -1}}), "objective.sia.attention_temperature"),
        (_minimal(objective={"sia": {"k_fractions": [0.5]}}), "objective.sia.k_fractions must be 5"),
        (_minimal(objective={"sia": {"k_fractions": [0.2, 0.3, 0.4, 0.5, 1.5]}}), "objective.sia.k_fractions"),
        (_minimal(objective={"sia": {"k_min": 0}}), "objective.sia.k_min must be"),
        (_minimal(objective={"sia": {"ranking": "random"}}), "objective.sia.ranking must be one of"),
        (_minimal(objective={"sia": {"kernel": "poly"}}), "objective.sia.kernel must be one of"),
        (_minimal(objective={"sia": {"backend": "cuda"}}), "objective.sia.backend must be one of"),
        (_minimal(objective={"pic": {"chain": [[8]]}}), "objective.pic.chain[0] must be [width, layer]"),
        (_minimal(objective={"pic": {"chain": [[16, 1], [8, 2]]}}), "objective.pic.chain must grow"),
        (_minimal(objective={"pic": {"chain": [[8, 3], [16, 2]]}}), "objective.pic.chain must grow"),
        (_minimal(objective={"pic": {"chain": [[8, 3]]}}), "at least 2 links"),
        (_minimal(objective={"mic": {"gamma": -0.1}}), "objective.mic.gamma must be >= 0"),
        (_minimal(objective={"mic": {"enabled": "yes"}}), "objective.mic.enabled must be true or false"),
        (_minimal(objective={"ese": {"layers": [2, 2]}}), "objective.ese.layers must be strictly increasing"),
        ({"data": {"path": "a"}, "objective": [1, 2]}, "objective must be a mapping"),
    ],
)
def test_bad_keys_and_values(raw, message):
    with pytest.raises(ValueError) as info:
        config_from_dict(raw)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr", "must look like section.key=value"),
        ("=3", "must look like section.key=value"),
        ("train..lr=3", "must look like section.key=value"),
        ("train.lr=[1", "not valid YAML"),
        ("train.lr.x=1", "'lr' is not a section"),
        ("train.nope=1", "unknown key train.nope"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    path = tmp_path / "c.yaml"
    path.write_text("data: {path: a.txt}\ntrain: {lr: 0.1}\n")
    with pytest.raises(ValueError) as info:
        load_config(path, [override])
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(scalar)
