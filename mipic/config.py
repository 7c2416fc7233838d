"""One typed configuration for training, loaded from YAML and overridable with ``key=value``.

Every section is a dataclass; :func:`load_config` checks every key and value and raises a
:class:`ValueError` that names the dotted key and the expected form. Checks that need the
model (layer indices, widths against the hidden size) run when the objective is built.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

POOLINGS = ("auto", "cls", "mean", "last")
FORMATS = ("auto", "text", "csv", "tsv", "jsonl", "stsb", "sick", "snli", "hf")
METHODS = ("mrl", "mipic", "ese", "mta")
AGGREGATIONS = ("sum", "mean")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class ModelConfig:
    """The backbone: a hub name or local folder, pooling, sequence length, widths."""

    name: str = "sentence-transformers/all-MiniLM-L6-v2"
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    max_length: int = 64
    # Matryoshka widths, ascending; the largest must be the hidden size (checked at build).
    dims: list[int] = field(default_factory=lambda: [16, 32, 64, 128, 256, 384])
    # Keep only the first N layers of the loaded model (a smaller student made from the
    # bottom of a larger model); null = all.
    num_layers: Optional[int] = None


@dataclass
class TeacherConfig:
    """The frozen teacher of ``objective.method: mta``: a hub name or local folder, with its
    own tokenizer. It is never trained, never saved with the student."""

    name: str = ""
    pooling: Literal["auto", "cls", "mean", "last"] = "auto"
    # Tokens per text; null = the teacher's own inference length.
    max_length: Optional[int] = None


@dataclass
class DataConfig:
    """Where the training text comes from and how examples are formed."""

    path: Union[str, list[str]] = ""
    format: Literal["auto", "text", "csv", "tsv", "jsonl", "stsb", "sick", "snli", "hf"] = "auto"
    # Column names for csv/tsv/jsonl (and hf): 1 = sentences, 2 = pairs, 3 = triplets.
    columns: Optional[list[str]] = None
    mode: Literal["unsupervised", "supervised"] = "unsupervised"
    max_examples: Optional[int] = None
    hf_split: str = "train"
    hf_config: Optional[str] = None


@dataclass
class SIAConfig:
    """Self-distilled attention and geometry alignment at chosen layers."""

    layers: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6])
    attention_weight: float = 1.0
    cka_weight: float = 1.0
    attention_temperature: float = 0.05
    # One fraction per truncated width; None gives 0.2, 0.3, ... capped at 1.
    k_fractions: Optional[list[float]] = None
    k_min: int = 8
    ranking: Literal["cls", "position"] = "cls"
    kernel: Literal["linear", "rbf"] = "linear"
    detach_teacher: bool = True
    backend: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class PICConfig:
    """The progressive (width, layer) chain with small MLP predictors."""

    weight: float = 1.0
    # [[width, layer], ...], each narrower and shallower than the next; [] = no chain.
    chain: list[list[int]] = field(default_factory=list)


@dataclass
class ESEConfig:
    """ESE / 2DMSE: Matryoshka InfoNCE at every width of some shallower layers too."""

    weight: float = 1.0
    layers: list[int] = field(default_factory=list)


@dataclass
class MICConfig:
    """MIC regularisers (soft collapse + spectral isotropy), added to any method."""

    enabled: bool = False
    gamma: float = 0.1
    tau_corr: float = 0.1
    lambda_var: float = 1.0
    uniformity_t: float = 2.0
    # Empty = the last layer.
    layers: list[int] = field(default_factory=list)


@dataclass
class MTAConfig:
    """Multi-Granular Trajectory Alignment with the ``teacher``: structural alignment (DSA) of
    span relation matrices at mapped layers, hidden alignment (HRA) through projections."""

    # [[student layer, teacher layer], ...]; null = every student layer l, mapped to the
    # teacher layer round(l * teacher layers / student layers).
    layers: Optional[list[list[int]]] = None
    # The first student layer aligned on phrases (lower ones on words); null = the upper
    # half, floor(student layers / 2) + 1.
    phrase_from: Optional[int] = None
    phrase_max_words: int = 4
    dsa_weight: float = 1.0
    distance: Literal["mse", "smooth_l1"] = "mse"
    beta: float = 1.0
    hra_weight: float = 1.0
    # Student layers of the mapping aligned by HRA; null = all of them, [] = none.
    hra_layers: Optional[list[int]] = None
    hra_loss: Literal["mse", "cosine"] = "mse"
    # How a span's tokens are weighted: "query" (softmax of each token's scaled dot
    # product with the pooled sentence state of that layer), "attention" (the attention
    # the pooling token pays it, averaged over heads; eager attention) or "uniform".
    span_weights: Literal["query", "attention", "uniform"] = "query"
    weight_temperature: float = 1.0
    backend: Literal["auto", "torch", "triton"] = "auto"


@dataclass
class ObjectiveConfig:
    """``alpha * L_MRL + (1 - alpha) * (L_SIA + L_PIC)`` and the baselines."""

    method: Literal["mrl", "mipic", "ese", "mta"] = "mipic"
    alpha: float = 0.4
    temperature: float = 0.05
    # One weight per width for L_MRL; None = 1 each.
    mrl_weights: Optional[list[float]] = None
    aggregation: Literal["sum", "mean"] = "mean"
    sia: SIAConfig = field(default_factory=SIAConfig)
    pic: PICConfig = field(default_factory=PICConfig)
    ese: ESEConfig = field(default_factory=ESEConfig)
    mic: MICConfig = field(default_factory=MICConfig)
    mta: MTAConfig = field(default_factory=MTAConfig)


@dataclass
class TrainConfig:
    """The optimisation loop."""

    lr: float = 2e-5
    # Learning rate of the objective's own new parameters (SIA lifts, PIC heads, MTA projections);
    # None = train.lr. Freshly initialised, they may need more than a pretrained backbone.
    head_lr: Optional[float] = None
    weight_decay: float = 0.01
    # The whole batch (in-batch negatives included); under torchrun each of the N processes
    # encodes batch_size / N of it, so results match one process with this batch size.
    batch_size: int = 16
    epochs: int = 1
    # Stop after this many optimiser steps (None = run every epoch).
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 42
    log_every: int = 10
    save_every: Optional[int] = None
    # Checkpoints left after the final model is saved: the latest N (null = all). While
    # training, older ones than the latest max(N, 1) are deleted as new ones are written.
    keep_checkpoints: Optional[int] = 0
    device: str = "auto"
    # CPU threads: "auto" measures how many cores other processes keep busy and takes the
    # rest (at most torch's default, one per core); an int fixes the count.
    threads: Union[Literal["auto"], int] = "auto"
    # The start-up summary and a progress bar (a line per log record when not a terminal).
    progress: bool = True
    # How the processes started by torchrun share the model: "ddp" (a full copy each,
    # gradients averaged) or "fsdp" (FSDP2: parameters, gradients and optimiser state
    # sharded, bf16 parameters under bf16 precision; also runs as one process).
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # The process-group backend: "auto" = nccl on CUDA devices, gloo on the CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Recompute each layer's activations in the backward pass instead of keeping them.
    activation_checkpointing: bool = False


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML file (or start from the defaults) and apply ``key=value`` overrides.

    Values of overrides are parsed as YAML (``train.lr=1e-4``, ``model.dims=[8,16]``).
    A relative ``data.path`` is looked for in the config file's folder, then in the
    working directory, and replaced by the absolute path found; one found in neither is
    an error that lists both.
    """
    from .data import resolve_data_path

    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides or []:
        _apply_override(raw, item)
    cfg = config_from_dict(raw)
    folders = ([Path(path).parent] if path is not None else []) + [Path.cwd()]
    paths = [resolve_data_path(p, cfg.data.format, folders) for p in _as_list(cfg.data.path)]
    cfg.data.path = paths if isinstance(cfg.data.path, list) else paths[0]
    return cfg


def _as_list(value: Union[str, list[str]]) -> list[str]:
    return value if isinstance(value, list) else [value]


def config_from_dict(raw: Any) -> Config:
    """Build and check a :class:`Config` from nested plain data."""
    cfg = _build(Config, raw, "")
    _check_values(cfg)
    return cfg


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of sections; got {type(data).__name__}")
    return data


def _apply_override(raw: dict[str, Any], item: str) -> None:
    import yaml

    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override must look like section.key=value; got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({err})") from err
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a mapping; got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(
            f"unknown key {prefix}{unknown[0]!s}; {where} accepts {sorted(names)}"
        )
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, key + ".")
        else:
            values[name] = _coerce(value, hint, key)
    return cls(**values)


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    return {int: "an int", float: "a number", str: "a string", bool: "true or false"}[hint]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    bad = ValueError(f"{key} must be {_describe(hint)}; got {value!r}")
    if origin is Literal:
        if value not in args:
            raise bad
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if hint is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot) as a string; accept what float() reads.
            try:
                value = float(value)
            except ValueError:
                raise bad from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config type for {key}: {hint}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_increasing(key: str, values: list[int]) -> None:
    _require(
        all(v >= 1 for v in values) and all(b > a for a, b in zip(values, values[1:])),
        f"{key} must be strictly increasing ints >= 1; got {values!r}",
    )


def _check_values(cfg: Config) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.objective, cfg.train
    _require(bool(m.name), "model.name must name a hub model or a local folder")
    _require(m.max_length >= 2, f"model.max_length must be an int >= 2; got {m.max_length}")
    _require(len(m.dims) >= 1, "model.dims must list at least one width")
    _check_increasing("model.dims", m.dims)
    _require(m.num_layers is None or m.num_layers >= 1,
             f"model.num_layers must be an int >= 1 or null; got {m.num_layers}")

    paths = _as_list(d.path)
    _require(all(paths) and len(paths) >= 1, "data.path must be a file path, a list of them, or a dataset name")
    _require(d.max_examples is None or d.max_examples >= 1,
             f"data.max_examples must be an int >= 1 or null; got {d.max_examples}")
    if d.columns is not None:
        _require(1 <= len(d.columns) <= 3, f"data.columns must name 1 to 3 columns; got {d.columns!r}")

    _require(0.0 <= o.alpha <= 1.0, f"objective.alpha must be in [0, 1]; got {o.alpha}")
    _require(o.temperature > 0, f"objective.temperature must be > 0; got {o.temperature}")
    if o.mrl_weights is not None:
        _require(len(o.mrl_weights) == len(m.dims) and all(w >= 0 for w in o.mrl_weights),
                 f"objective.mrl_weights must be {len(m.dims)} non-negative numbers (one per width in "
                 f"model.dims); got {o.mrl_weights!r}")
    s = o.sia
    _check_increasing("objective.sia.layers", s.layers)
    _require(s.attention_weight >= 0, f"objective.sia.attention_weight must be >= 0; got {s.attention_weight}")
    _require(s.cka_weight >= 0, f"objective.sia.cka_weight must be >= 0; got {s.cka_weight}")
    _require(s.attention_temperature > 0,
             f"objective.sia.attention_temperature must be > 0; got {s.attention_temperature}")
    _require(s.k_min >= 1, f"objective.sia.k_min must be an int >= 1; got {s.k_min}")
    if s.k_fractions is not None:
        truncated = len(m.dims) - 1
        _require(len(s.k_fractions) == truncated and all(0 < f <= 1 for f in s.k_fractions),
                 f"objective.sia.k_fractions must be {truncated} numbers in (0, 1], one per truncated "
                 f"width of model.dims; got {s.k_fractions!r}")
    p = o.pic
    _require(p.weight >= 0, f"objective.pic.weight must be >= 0; got {p.weight}")
    for i, link in enumerate(p.chain):
        _require(len(link) == 2 and all(v >= 1 for v in link),
                 f"objective.pic.chain[{i}] must be [width, layer] with ints >= 1; got {link!r}")
    for i, (a, b) in enumerate(zip(p.chain, p.chain[1:])):
        _require(b[0] > a[0] and b[1] >= a[1],
                 f"objective.pic.chain must grow: width strictly and layer not backwards; "
                 f"entry {i + 1} {b!r} follows {a!r}")
    _require(o.method != "mipic" or len(p.chain) != 1,
             "objective.pic.chain needs at least 2 links (or none)")
    _require(o.ese.weight >= 0, f"objective.ese.weight must be >= 0; got {o.ese.weight}")
    _check_increasing("objective.ese.layers", o.ese.layers)
    c = o.mic
    _require(c.gamma >= 0, f"objective.mic.gamma must be >= 0; got {c.gamma}")
    _require(c.tau_corr >= 0, f"objective.mic.tau_corr must be >= 0; got {c.tau_corr}")
    _require(c.lambda_var >= 0, f"objective.mic.lambda_var must be >= 0; got {c.lambda_var}")
    _require(c.uniformity_t > 0, f"objective.mic.uniformity_t must be > 0; got {c.uniformity_t}")
    _check_increasing("objective.mic.layers", c.layers)
    _check_mta(o.mta, cfg.teacher, o.method)

    _require(t.lr > 0, f"train.lr must be > 0; got {t.lr}")
    _require(t.head_lr is None or t.head_lr > 0, f"train.head_lr must be > 0 or null; got {t.head_lr}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0; got {t.weight_decay}")
    _require(t.batch_size >= 2, f"train.batch_size must be an int >= 2 (in-batch negatives); got {t.batch_size}")
    _require(t.epochs >= 1, f"train.epochs must be an int >= 1; got {t.epochs}")
    _require(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be an int >= 1 or null; got {t.max_steps}")
    _require(0 <= t.warmup_ratio < 1, f"train.warmup_ratio must be in [0, 1); got {t.warmup_ratio}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off); got {t.grad_clip}")
    _require(t.grad_accum >= 1, f"train.grad_accum must be an int >= 1; got {t.grad_accum}")
    _require(t.log_every >= 1, f"train.log_every must be an int >= 1; got {t.log_every}")
    _require(t.save_every is None or t.save_every >= 1,
             f"train.save_every must be an int >= 1 or null; got {t.save_every}")
    _require(t.keep_checkpoints is None or t.keep_checkpoints >= 0,
             f"train.keep_checkpoints must be an int >= 0 or null (keep all); got {t.keep_checkpoints}")
    _require(t.threads == "auto" or t.threads >= 1, f"train.threads must be 'auto' or an int >= 1; got {t.threads}")
    _require(t.device == "auto" or t.device == "cpu" or t.device.startswith("cuda"),
             f"train.device must be 'auto', 'cpu' or 'cuda[:N]'; got {t.device!r}")


def _check_mta(a: MTAConfig, teacher: TeacherConfig, method: str) -> None:
    if method == "mta":
        _require(bool(teacher.name), "teacher.name must name the teacher (a hub name or local folder) "
                                     "for objective.method mta")
    _require(teacher.max_length is None or teacher.max_length >= 2,
             f"teacher.max_length must be an int >= 2 or null; got {teacher.max_length}")
    if a.layers is not None:
        _require(len(a.layers) >= 1, "objective.mta.layers must list at least one [student, teacher] pair (or be null)")
        for i, pair in enumerate(a.layers):
            _require(len(pair) == 2 and all(v >= 1 for v in pair),
                     f"objective.mta.layers[{i}] must be [student layer, teacher layer] with ints >= 1; got {pair!r}")
        _check_increasing("objective.mta.layers student layers", [s for s, _ in a.layers])
        teacher_layers = [t for _, t in a.layers]
        _require(all(b >= c for c, b in zip(teacher_layers, teacher_layers[1:])),
                 f"objective.mta.layers must map deeper student layers to teacher layers that are not "
                 f"shallower (a trajectory); got {a.layers!r}")
    _require(a.phrase_from is None or a.phrase_from >= 1,
             f"objective.mta.phrase_from must be an int >= 1 or null; got {a.phrase_from}")
    _require(a.phrase_max_words >= 1, f"objective.mta.phrase_max_words must be an int >= 1; got {a.phrase_max_words}")
    _require(a.dsa_weight >= 0, f"objective.mta.dsa_weight must be >= 0; got {a.dsa_weight}")
    _require(a.hra_weight >= 0, f"objective.mta.hra_weight must be >= 0; got {a.hra_weight}")
    _require(a.beta > 0, f"objective.mta.beta must be > 0; got {a.beta}")
    _require(a.weight_temperature > 0, f"objective.mta.weight_temperature must be > 0; got {a.weight_temperature}")
    if a.hra_layers is not None:
        _check_increasing("objective.mta.hra_layers", a.hra_layers)
