"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, mixed
precision on GPU, JSON-lines metrics, checkpoints and exact resumption.

The data order is a pure function of the seed and the epoch (one seeded permutation per
epoch), so a checkpoint needs only the optimiser-step count to know its data position;
together with the saved model, objective, optimiser, scheduler, scaler and RNG states a
resumed run repeats the uninterrupted one.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .config import Config
from .data import load_training_examples
from .encoder import Encoder
from .objectives import Objective

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
# Configuration keys a resumed run may change: they do not touch what is computed.
RESUMABLE_CHANGES = frozenset({"train.device", "train.log_every", "train.progress", "train.save_every"})
_BAR_KEYS = ("loss", "mrl", "sia_attention", "sia_cka", "pic", "ese", "mic_scr", "mic_sir")


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


def latest_checkpoint(output: Path) -> Optional[Path]:
    folders = sorted(
        (p for p in (output / CHECKPOINTS).glob("step-*") if (p / STATE_FILE).is_file()),
        key=lambda p: int(p.name.split("-")[1]),
    )
    return folders[-1] if folders else None


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
    model there (loadable by transformers and sentence-transformers). Returns ``output``."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    t = cfg.train
    device = resolve_device(t.device)
    autocast_dtype = resolve_precision(t.precision, device)
    seed_everything(t.seed)

    examples = load_training_examples(cfg)
    if len(examples) < t.batch_size * t.grad_accum:
        raise ValueError(
            f"the data has {len(examples)} examples, fewer than one optimiser step needs "
            f"(train.batch_size {t.batch_size} x train.grad_accum {t.grad_accum})"
        )
    encoder = Encoder.from_pretrained(cfg.model.name, cfg.model.pooling, cfg.model.max_length)
    objective = Objective(cfg.objective, cfg.model.dims, encoder.hidden_size, encoder.num_layers)
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
        if found is None:
            raise ValueError(f"--resume: no checkpoint under {output / CHECKPOINTS}")
        state = torch.load(found / STATE_FILE, map_location=device, weights_only=False)
        _check_same_run(state["config"], cfg.to_dict(), found)
        encoder.model.load_state_dict(state["model"])
        objective.load_state_dict(state["objective"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step = state["step"]
    else:
        (output / METRICS_FILE).unlink(missing_ok=True)
    (output / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    bar = _progress(total, step, t.progress)
    started = time.perf_counter()
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
            if step % t.log_every == 0 or step == total:
                record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                          "grad_norm": float(grad_norm), **sums,
                          "seconds": round(time.perf_counter() - started, 3)}
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{sums[k]:.3g}" for k in _BAR_KEYS if k in sums})
            if t.save_every and step % t.save_every == 0 and step < total:
                _save_checkpoint(output, step, cfg, encoder, objective, optimizer, scheduler, scaler)
    if bar is not None:
        bar.close()
    encoder.save(output, cfg.model.dims)
    return output


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


def _progress(total: int, done: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, desc="train", dynamic_ncols=True)


def _floats(parts: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: round(float(v), 5) for k, v in parts.items()}
