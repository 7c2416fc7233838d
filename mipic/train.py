"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, mixed
precision on GPU, JSON-lines metrics, checkpoints and exact resumption.

The data order is a pure function of the seed and the epoch (one seeded permutation per
epoch), so a checkpoint needs only the optimiser-step count to know its data position;
together with the saved model, objective, optimiser, scheduler, scaler and RNG states a
resumed run repeats the uninterrupted one.

A run that fails removes what it created unless it wrote a checkpoint to resume from;
then it says what it left. After a successful final save only the latest
``train.keep_checkpoints`` checkpoints remain.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import machine
from .config import Config
from .data import load_training_examples
from .encoder import Encoder
from .objectives import Objective
from .objectives.terms import Formula

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
# Configuration keys a resumed run may change: they do not touch what is computed.
RESUMABLE_CHANGES = frozenset({
    "train.device", "train.log_every", "train.progress", "train.save_every", "train.keep_checkpoints",
    "train.threads",
})
_BAR_KEYS = ("loss", "mrl", "sia_attention", "sia_cka", "pic", "ese", "mic_scr", "mic_sir", "mta_dsa", "mta_hra")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype, or None for float32. Mixed precision runs on GPU only."""
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise ValueError(f"train.precision {name!r} needs a CUDA device; use 'auto' or 'fp32' on CPU")
        return None
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def warmup_cosine(warmup: int, total: int):
    """Linear warm-up from 0 to 1 over ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoints(output: Path) -> list[Path]:
    """The complete checkpoint folders under ``output``, oldest first."""
    return sorted(
        (p for p in (output / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )


def latest_checkpoint(output: Path) -> Optional[Path]:
    found = checkpoints(output)
    return found[-1] if found else None


def prune_checkpoints(output: Path, keep: Optional[int]) -> None:
    """Delete all but the latest ``keep`` checkpoints (None keeps all), and the
    checkpoint folder when nothing is left in it."""
    if keep is None:
        return
    found = checkpoints(output)
    for folder in found[:max(len(found) - keep, 0)]:
        shutil.rmtree(folder)
    parent = output / CHECKPOINTS
    if parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()


class _Batches:
    """Batch ``b`` (counted over the whole run) of a seeded per-epoch shuffle."""

    def __init__(self, examples: Sequence[tuple[str, ...]], batch_size: int, seed: int) -> None:
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(examples) // batch_size  # a partial batch would weaken in-batch negatives
        self._epoch = -1
        self._order: list[int] = []

    def __getitem__(self, b: int) -> list[tuple[str, ...]]:
        epoch, position = divmod(b, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._order = torch.randperm(len(self.examples), generator=generator).tolist()
            self._epoch = epoch
        start = position * self.batch_size
        return [self.examples[i] for i in self._order[start:start + self.batch_size]]


def train(cfg: Config, output: str | Path, *, resume: bool = False) -> Path:
    """Train as ``cfg`` says, write metrics and checkpoints to ``output`` and the final
    model there (loadable by transformers and sentence-transformers). Returns ``output``.
    On a CPU the run uses ``train.threads`` threads (chosen from the machine's load for
    "auto") and gives torch its previous count back at the end."""
    device = resolve_device(cfg.train.device)
    if device.type != "cpu":
        return _train(cfg, Path(output), device, resume, busy_cores=None)
    previous = torch.get_num_threads()
    threads, busy_cores = machine.spare_threads() if cfg.train.threads == "auto" else (cfg.train.threads, None)
    torch.set_num_threads(threads)
    try:
        return _train(cfg, Path(output), device, resume, busy_cores)
    finally:
        torch.set_num_threads(previous)


def _train(cfg: Config, output: Path, device: torch.device, resume: bool, busy_cores: Optional[float]) -> Path:
    t = cfg.train
    autocast_dtype = resolve_precision(t.precision, device)
    seed_everything(t.seed)

    examples = load_training_examples(cfg)
    if len(examples) < t.batch_size * t.grad_accum:
        raise ValueError(
            f"the data has {len(examples)} examples, fewer than one optimiser step needs "
            f"(train.batch_size {t.batch_size} x train.grad_accum {t.grad_accum})"
        )
    if resume and latest_checkpoint(output) is None:
        raise ValueError(f"--resume: no checkpoint under {output / CHECKPOINTS}")
    encoder = Encoder.from_pretrained(cfg.model.name, cfg.model.pooling, cfg.model.max_length, what="model.name",
                                      num_layers=cfg.model.num_layers)
    objective = Objective(cfg.objective, cfg.model.dims, encoder.hidden_size, encoder.num_layers, teacher=cfg.teacher)
    encoder.to(device).train()
    objective.to(device).train()

    batches = _Batches(examples, t.batch_size, t.seed)
    steps_per_epoch = batches.per_epoch // t.grad_accum
    total = t.epochs * steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * steps_per_epoch)
    params = [p for p in list(encoder.parameters()) + list(objective.parameters()) if p.requires_grad]
    backbone = [p for p in encoder.parameters() if p.requires_grad]
    heads = [p for p in objective.parameters() if p.requires_grad]
    head_lr = t.lr if t.head_lr is None else t.head_lr
    groups = [
        {"params": [p for p in backbone if p.dim() >= 2], "weight_decay": t.weight_decay, "lr": t.lr},
        {"params": [p for p in backbone if p.dim() < 2], "weight_decay": 0.0, "lr": t.lr},  # biases, norms
        {"params": [p for p in heads if p.dim() >= 2], "weight_decay": t.weight_decay, "lr": head_lr},
        {"params": [p for p in heads if p.dim() < 2], "weight_decay": 0.0, "lr": head_lr},
    ]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=t.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(math.ceil(t.warmup_ratio * total), total))
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)

    step = 0
    if resume:
        found = latest_checkpoint(output)
        state = torch.load(found / STATE_FILE, map_location=device, weights_only=False)
        _check_same_run(state["config"], cfg.to_dict(), found)
        encoder.model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step = state["step"]
    if t.progress:
        print(startup_summary(cfg, output, encoder, objective, examples=len(examples), total=total,
                              steps_per_epoch=steps_per_epoch, device=device, autocast_dtype=autocast_dtype,
                              start=step, busy_cores=busy_cores), flush=True)

    files = _RunFiles(output, resume)
    try:
        if not resume:
            (output / METRICS_FILE).unlink(missing_ok=True)
        (output / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        progress = _Progress(total, step, t.progress)
        started = last_time = time.perf_counter()
        last_step = step
        with open(output / METRICS_FILE, "a", encoding="utf-8") as metrics:
            while step < total:
                optimizer.zero_grad(set_to_none=True)
                sums: dict[str, float] = {}
                for micro in range(t.grad_accum):
                    batch = batches[step * t.grad_accum + micro]
                    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
                    with context:
                        loss, parts = objective(encoder, batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"the loss is not finite at step {step + 1}: {_floats(parts)}")
                    scaler.scale(loss / t.grad_accum).backward()
                    for key, value in parts.items():
                        sums[key] = sums.get(key, 0.0) + float(value) / t.grad_accum
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
                lr = scheduler.get_last_lr()[0]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                record = None
                if step % t.log_every == 0 or step == total:
                    now = time.perf_counter()
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                              "grad_norm": float(grad_norm), **sums,
                              "seconds": round(now - started, 3),
                              # Mean wall time of the optimiser steps since the previous record.
                              "step_seconds": round((now - last_time) / (step - last_step), 4)}
                    last_time, last_step = now, step
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                progress.update(step, sums, record)
                if t.save_every and step % t.save_every == 0 and step < total:
                    _save_checkpoint(output, step, cfg, encoder, objective, optimizer, scheduler, scaler)
                    files.checkpointed = True
                    prune_checkpoints(output, None if t.keep_checkpoints is None else max(t.keep_checkpoints, 1))
        progress.close()
        encoder.save(output, cfg.model.dims)
    except BaseException:
        files.after_failure()
        raise
    prune_checkpoints(output, t.keep_checkpoints)
    return output


class _RunFiles:
    """What a run creates in its output folder, to remove it if the run fails before
    writing a checkpoint, or to say what is left if it fails after."""

    def __init__(self, output: Path, resume: bool) -> None:
        self.output = output
        self.resume = resume
        self.created_output = not output.exists()
        self.created = [output / METRICS_FILE, output / "train_config.json"]
        self.checkpointed = False
        output.mkdir(parents=True, exist_ok=True)

    def after_failure(self) -> None:
        if self.resume or self.checkpointed:
            kept = [p.relative_to(self.output).as_posix() for p in checkpoints(self.output)]
            sys.stderr.write(f"mipic train: the failed run left {self.output} ({', '.join(kept)}); "
                             "continue it with --resume\n")
            return
        if self.created_output:
            shutil.rmtree(self.output, ignore_errors=True)
            sys.stderr.write(f"mipic train: removed {self.output}, which the failed run had created\n")
            return
        for path in self.created:
            path.unlink(missing_ok=True)
        left = sorted(p.name for p in self.output.iterdir()) if self.output.is_dir() else []
        sys.stderr.write(f"mipic train: removed this run's metrics and config from {self.output}"
                         + (f"; it still holds {', '.join(left)} from before\n" if left else "\n"))


def startup_summary(
    cfg: Config, output: Path, encoder: Encoder, objective: Objective, *, examples: int, total: int,
    steps_per_epoch: int, device: torch.device, autocast_dtype: Optional[torch.dtype], start: int = 0,
    busy_cores: Optional[float] = None,
) -> str:
    """What the run is about to do, one line per part: model, widths, objective, data,
    steps, device and load, saving. ``busy_cores``: what other processes used when the
    threads were chosen."""
    m, t = cfg.model, cfg.train
    config = encoder.model.config
    n_params = sum(p.numel() for p in encoder.model.parameters())
    lines = [f"mipic train -> {output.resolve()}" + (f" (resuming at step {start})" if start else "")]
    layers = f"its first {m.num_layers} layers" if m.num_layers else f"{encoder.num_layers} layers"
    lines.append(f"  model      {m.name} ({config.model_type}, {layers}, width "
                 f"{encoder.hidden_size}, {n_params:,} parameters); pooling {encoder.pooling}, "
                 f"texts cut at {encoder.max_length} tokens")
    lines.append(f"  widths     {', '.join(map(str, m.dims))}")
    lines.append(f"  objective  {_describe_objective(cfg, objective, encoder, device)}")
    paths = cfg.data.path if isinstance(cfg.data.path, list) else [cfg.data.path]
    views = "two dropout views of each sentence (SimCSE)" if cfg.data.mode == "unsupervised" else "pairs or triplets"
    lines.append(f"  data       {examples:,} examples from {', '.join(paths)}; {views}")
    lines.append(f"  steps      {total:,} optimiser steps of {t.batch_size} x {t.grad_accum} examples "
                 f"({total / steps_per_epoch:.2f} epochs of {steps_per_epoch:,} steps); "
                 f"warm-up {math.ceil(t.warmup_ratio * total)}, lr {t.lr:g}")
    precision = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}[autocast_dtype]
    if device.type == "cpu":
        threads = torch.get_num_threads()
        where = f"cpu, {threads} thread{'s' if threads > 1 else ''}"
        if t.threads == "auto" and busy_cores is not None:
            where += (f" (train.threads auto: other processes kept {busy_cores:.1f} of "
                      f"{machine.cpu_count()} cores busy)")
        where += f", {precision}"
        load = machine.load_average()
        if load is not None:
            where += f"; load average {load:.2f}"
    else:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        where = f"{device} ({name}), {precision}"
    lines.append(f"  device     {where}")
    if t.save_every:
        keep = {None: "all kept", 0: "deleted once the final model is saved"}.get(
            t.keep_checkpoints, f"the latest {t.keep_checkpoints} kept after the final model")
        lines.append(f"  saves      a checkpoint every {t.save_every} steps to {output / CHECKPOINTS}; {keep}")
    lines.append(f"  metrics    every {t.log_every} steps to {output / METRICS_FILE}")
    return "\n".join(lines)


def _describe_objective(cfg: Config, objective: Objective, encoder: Encoder, device: torch.device) -> str:
    """The formula over the logged parts, then what each term works on."""
    o = cfg.objective
    details = [f"{o.method} = {_formula(objective.formula)}"]
    if "sia" in objective.terms:
        s = o.sia
        widths = sum(d < encoder.hidden_size for d in cfg.model.dims)
        backend = s.backend + (" (the eager reference on CPU)" if s.backend == "auto" and device.type == "cpu" else "")
        details.append(f"SIA at layers {', '.join(map(str, s.layers))} x {widths} widths, CKA backend {backend}")
    if "pic" in objective.terms:
        details.append(f"PIC chain of {len(o.pic.chain)} links")
    if "ese" in objective.terms:
        details.append(f"ESE at layers {', '.join(map(str, o.ese.layers))}")
    if "mic" in objective.terms:
        details.append(f"MIC at layers {', '.join(map(str, o.mic.layers or [encoder.num_layers]))}")
    if "mta" in objective.terms:
        mta = objective.terms["mta"]
        teacher = mta.teacher
        pairs = ", ".join(f"{s}->{t} ({mta.granularity(s)}s)" for s, t in mta.pairs)
        details.append(f"teacher {cfg.teacher.name} ({teacher.num_layers} layers, width {teacher.hidden_size}, "
                       f"frozen), student->teacher layers {pairs}, {mta.span_weights} span weights, "
                       f"HRA at {', '.join(k[len('layer'):] for k in mta.projections) or 'no layers'}")
    details.append(f"InfoNCE at temperature {o.temperature:g}")
    return "; ".join(details)


def _formula(formula: Formula) -> str:
    """``0.4 mrl + 0.6 (sia_attention + sia_cka + 0.1 pic)``: the weighted sum as computed."""
    terms = []
    for weight, item in formula:
        text = item if isinstance(item, str) else f"({_formula(item)})"
        terms.append(text if weight == 1 else f"{weight:g} {text}")
    return " + ".join(terms)


def _save_checkpoint(output, step, cfg, encoder, objective, optimizer, scheduler, scaler) -> None:
    folder = output / CHECKPOINTS / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "config": cfg.to_dict(),
        "model": encoder.model.state_dict(),
        "objective": objective.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(),
    }
    partial = folder / (STATE_FILE + ".partial")
    torch.save(state, partial)
    partial.replace(folder / STATE_FILE)  # a crash mid-write never leaves a truncated checkpoint


def _check_same_run(saved: dict, now: dict, checkpoint: Path) -> None:
    """A resumed run repeats the interrupted one only under the same configuration; keys
    that do not touch the trajectory (RESUMABLE_CHANGES) may differ."""
    before, after = _flatten(saved), _flatten(now)
    changed = [
        f"{key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if key not in RESUMABLE_CHANGES and before.get(key) != after.get(key)
    ]
    if changed:
        raise ValueError(
            f"--resume: {checkpoint} was written under another configuration ({'; '.join(changed)}); "
            f"resume with the same one (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)"
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class _Progress:
    """A progress bar on a terminal; elsewhere (a log file) one line per metrics record."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total = total
        self.bar = None
        self.lines = enabled and not sys.stderr.isatty()
        if enabled and not self.lines:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc="train", dynamic_ncols=True)

    def update(self, step: int, sums: dict[str, float], record: Optional[dict]) -> None:
        shown = {k: f"{sums[k]:.3g}" for k in _BAR_KEYS if k in sums}
        if self.bar is not None:
            # Without refresh here the bar is drawn once per step, by update().
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(1)
        elif self.lines and record is not None:
            parts = " ".join(f"{k} {v}" for k, v in shown.items())
            sys.stderr.write(f"train step {step}/{self.total}: {parts}; {record['step_seconds']:.2f} s/step\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _floats(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in parts.items()}
