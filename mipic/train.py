"""The training loop: AdamW, warm-up + cosine schedule, clipping, accumulation, mixed
precision on GPU, JSON-lines metrics, checkpoints and exact resumption.

The data order is a pure function of the seed and the epoch (one seeded permutation per
epoch), so a checkpoint needs only the optimiser-step count to know its data position;
together with the saved model, objective, optimiser, scheduler, scaler and RNG states a
resumed run repeats the uninterrupted one.

A run that fails removes what it created unless it wrote a checkpoint to resume from;
then it says what it left. After a successful final save only the latest
``train.keep_checkpoints`` checkpoints remain.

Under ``torchrun`` every process runs :func:`train`: each encodes its equal share of every
batch (``train.batch_size`` is the whole batch), the objective is computed over the whole
batch (:mod:`mipic.distributed`), so the loss and the averaged gradients are those of one
process on the whole batch; the model is replicated (DDP) or sharded (FSDP2) as
``train.parallel`` says (:mod:`mipic.parallel`). Only rank 0 writes files and logs;
checkpoints hold full state dicts, so a run resumes under any number of processes.
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

from . import distributed, machine, parallel
from .config import Config
from .data import load_training_examples
from .distributed import ONE_PROCESS, Ranks
from .encoder import Encoder
from .objectives import Objective
from .objectives.terms import Formula

METRICS_FILE = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
# Configuration keys a resumed run may change: they do not touch what is computed.
RESUMABLE_CHANGES = frozenset({
    "train.device", "train.log_every", "train.progress", "train.save_every", "train.keep_checkpoints",
    "train.threads", "train.parallel", "train.backend", "train.activation_checkpointing",
})
_BAR_KEYS = ("loss", "mrl", "sia_attention", "sia_cka", "pic", "ese", "mic_scr", "mic_sir", "mta_dsa", "mta_hra")


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


def _rng_state(device: torch.device) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _resume_rng(saved: list[dict], ranks: Ranks, seed: int, device: torch.device) -> None:
    """Each process continues its own random streams (dropout masks). Under another
    number of processes, a process without a saved stream starts a seeded one."""
    if ranks.rank < len(saved):
        _set_rng_state(saved[ranks.rank], device)
    else:
        torch.manual_seed(seed + ranks.rank)


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
    "auto", shared equally by the processes of one node) and gives torch its previous
    count back at the end. Under ``torchrun`` every process calls it (see the module's
    documentation); the process group it creates is destroyed at the end."""
    t = cfg.train
    device = distributed.process_device(t.device)
    ranks, joined = distributed.join(t.backend, device, needs_group=t.parallel == "fsdp")
    try:
        if device.type != "cpu":
            return _train(cfg, Path(output), device, ranks, resume, busy_cores=None)
        previous = torch.get_num_threads()
        if t.threads == "auto":
            spare, busy_cores = machine.spare_threads()
            threads = max(1, spare // distributed.local_world_size())
        else:
            threads, busy_cores = t.threads, None
        torch.set_num_threads(threads)
        try:
            return _train(cfg, Path(output), device, ranks, resume, busy_cores)
        finally:
            torch.set_num_threads(previous)
    finally:
        if joined:
            distributed.leave(ranks)


def check_parallel(cfg: Config, device: torch.device, world_size: int, autocast_dtype: Optional[torch.dtype]) -> None:
    """Refuse combinations of the configuration, the device and the number of processes
    that cannot run, before the model loads."""
    t = cfg.train
    if t.batch_size % world_size:
        raise ValueError(
            f"the world size {world_size} must divide train.batch_size {t.batch_size}: it is the whole batch, "
            f"split evenly over the processes (e.g. train.batch_size={_next_multiple(t.batch_size, world_size)})"
        )
    if t.parallel == "fsdp" and autocast_dtype == torch.float16:
        raise ValueError("train.parallel fsdp runs in bf16 or fp32, and this run's precision is fp16 (train.precision "
                         f"{t.precision!r}); set train.precision to fp32, or bf16 on a GPU that supports it")
    if cfg.objective.method == "mipic" and cfg.objective.sia.backend == "triton":
        from mipic_kernels import fused

        try:
            fused.check_usable(torch.empty(0, device=device))
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"objective.sia.backend triton cannot run on {device}: {err}") from None


def _next_multiple(value: int, factor: int) -> int:
    return -(-value // factor) * factor


def build_modules(
    cfg: Config, device: torch.device, ranks: Ranks = ONE_PROCESS, *, dtype: Optional[torch.dtype] = None,
) -> tuple[parallel.TrainedModules, torch.nn.Module]:
    """The encoder and objective of ``cfg`` on ``device`` in training mode, and the module
    the loop calls: wrapped for the processes as ``train.parallel`` says. ``dtype``: the
    parameters' dtype (default: as loaded; float64 compares runs beyond float32 noise)."""
    t = cfg.train
    with ranks.main_first():  # a hub model is downloaded once
        encoder = Encoder.from_pretrained(cfg.model.name, cfg.model.pooling, cfg.model.max_length, what="model.name",
                                          num_layers=cfg.model.num_layers)
        objective = Objective(cfg.objective, cfg.model.dims, encoder.hidden_size, encoder.num_layers,
                              teacher=cfg.teacher)
    encoder.to(device, dtype).train()
    objective.to(device, dtype).train()
    if t.activation_checkpointing:
        parallel.checkpoint_activations(encoder)
    module = parallel.TrainedModules(encoder, objective, ranks)
    low = torch.bfloat16 if resolve_precision(t.precision, device) == torch.bfloat16 else None
    return module, parallel.wrap(module, t.parallel, device, low)


def accumulate_gradients(
    wrapped: torch.nn.Module, ranks: Ranks, batches: Sequence[Sequence[tuple[str, ...]]], *,
    autocast_dtype: Optional[torch.dtype] = None, scaler: Optional[torch.amp.GradScaler] = None, step: int = 0,
) -> dict[str, float]:
    """Forward and backward of one optimiser step's micro-batches (each a whole batch, of
    which this process encodes its share), the gradients accumulated as their mean.
    Returns the mean of every logged part over the micro-batches (the whole batch's)."""
    sums: dict[str, float] = {}
    device_type = next(wrapped.parameters()).device.type
    for micro, batch in enumerate(batches):
        with parallel.accumulating(wrapped, last=micro == len(batches) - 1):
            context = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
            with context:
                loss, parts = wrapped(ranks.shard(batch))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the loss is not finite at step {step + 1}: {_floats(parts)}")
            loss = loss / len(batches)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + float(value) / len(batches)
    return sums


def _train(cfg: Config, output: Path, device: torch.device, ranks: Ranks, resume: bool,
           busy_cores: Optional[float]) -> Path:
    t = cfg.train
    autocast_dtype = resolve_precision(t.precision, device)
    check_parallel(cfg, device, ranks.world_size, autocast_dtype)
    seed_everything(t.seed)

    with ranks.main_first():  # a hub dataset is downloaded once
        examples = load_training_examples(cfg)
    if len(examples) < t.batch_size * t.grad_accum:
        raise ValueError(
            f"the data has {len(examples)} examples, fewer than one optimiser step needs "
            f"(train.batch_size {t.batch_size} x train.grad_accum {t.grad_accum})"
        )
    found = ranks.from_main(latest_checkpoint(output)) if resume else None
    if resume and found is None:
        raise ValueError(f"--resume: no checkpoint under {output / CHECKPOINTS}")
    module, wrapped = build_modules(cfg, device, ranks)
    encoder, objective = module.encoder, module.objective
    if ranks.rank:  # each process draws its own dropout masks
        torch.manual_seed(t.seed + ranks.rank)

    batches = _Batches(examples, t.batch_size, t.seed)
    steps_per_epoch = batches.per_epoch // t.grad_accum
    total = t.epochs * steps_per_epoch if t.max_steps is None else min(t.max_steps, t.epochs * steps_per_epoch)
    params = [p for p in module.parameters() if p.requires_grad]
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
    resumed_from = None
    if resume:
        try:
            state = torch.load(found / STATE_FILE, map_location="cpu", weights_only=False, mmap=True)
        except FileNotFoundError:
            raise ValueError(f"--resume: process {ranks.rank} cannot read {found / STATE_FILE}: on several nodes "
                             "the output folder must be on a filesystem every node sees") from None
        if not isinstance(state.get("rng"), list):
            raise ValueError(f"--resume: {found} was written by an earlier version of mipic train, whose "
                             "checkpoints this version cannot resume; start the run again")
        _check_same_run(state["config"], cfg.to_dict(), found)
        parallel.load_full_state(module, optimizer, state["model"], state["objective"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _resume_rng(state["rng"], ranks, t.seed, device)
        step = state["step"]
        resumed_from = len(state["rng"])
    main = ranks.is_main
    if t.progress and main:
        print(startup_summary(cfg, output, encoder, objective, examples=len(examples), total=total,
                              steps_per_epoch=steps_per_epoch, device=device, autocast_dtype=autocast_dtype,
                              start=step, busy_cores=busy_cores, ranks=ranks, resumed_from=resumed_from), flush=True)

    files = _RunFiles(output, resume) if main else None
    try:
        if main:
            if not resume:
                (output / METRICS_FILE).unlink(missing_ok=True)
            (output / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        progress = _Progress(total, step, t.progress and main)
        started = last_time = time.perf_counter()
        last_step = step
        with open(output / METRICS_FILE, "a", encoding="utf-8") if main else nullcontext() as metrics:
            while step < total:
                optimizer.zero_grad(set_to_none=True)
                micro_batches = [batches[step * t.grad_accum + micro] for micro in range(t.grad_accum)]
                sums = accumulate_gradients(wrapped, ranks, micro_batches, autocast_dtype=autocast_dtype,
                                            scaler=scaler, step=step)
                scaler.unscale_(optimizer)
                grad_norm = parallel.clip_gradients(params, t.grad_clip if t.grad_clip > 0 else float("inf"))
                lr = scheduler.get_last_lr()[0]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                record = None
                if main and (step % t.log_every == 0 or step == total):
                    now = time.perf_counter()
                    record = {"step": step, "epoch": round(step / steps_per_epoch, 4), "lr": lr,
                              "grad_norm": grad_norm, **sums,
                              "seconds": round(now - started, 3),
                              # Mean wall time of the optimiser steps since the previous record.
                              "step_seconds": round((now - last_time) / (step - last_step), 4)}
                    if device.type == "cuda":  # the peak of tensors on rank 0's GPU since the start
                        record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                    last_time, last_step = now, step
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                progress.update(step, sums, record)
                if t.save_every and step % t.save_every == 0 and step < total:
                    _save_checkpoint(output, step, cfg, module, optimizer, scheduler, scaler, ranks, device)
                    if main:
                        files.checkpointed = True
                        prune_checkpoints(output, None if t.keep_checkpoints is None else max(t.keep_checkpoints, 1))
        progress.close()
        full_model = parallel.full_model_state(module)
        if main:
            encoder.save(output, cfg.model.dims, state_dict=full_model)
        ranks.barrier()  # the model is written before any process returns
    except BaseException:
        if files is not None:
            files.after_failure()
        raise
    if main:
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
    busy_cores: Optional[float] = None, ranks: Ranks = ONE_PROCESS, resumed_from: Optional[int] = None,
) -> str:
    """What the run is about to do, one line per part: model, widths, objective, data,
    steps, device and load, processes, saving. ``busy_cores``: what other processes used
    when the threads were chosen; ``resumed_from``: the number of processes that wrote
    the checkpoint resumed."""
    m, t = cfg.model, cfg.train
    config = encoder.model.config
    n_params = sum(p.numel() for p in encoder.model.parameters())
    lines = [f"mipic train -> {output.resolve()}" + (f" (resuming at step {start})" if start else "")]
    if resumed_from is not None and resumed_from != ranks.world_size:
        lines[0] += (f"; the checkpoint was written by {resumed_from} process{'es' if resumed_from > 1 else ''} and "
                     f"this run has {ranks.world_size}: the data order and optimiser state continue, dropout masks "
                     "are drawn anew")
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
    if ranks.group is not None:
        lines.append(f"  processes  {_describe_processes(cfg, ranks, autocast_dtype)}")
    elif t.activation_checkpointing:
        lines.append("  memory     activation checkpointing")
    if t.save_every:
        keep = {None: "all kept", 0: "deleted once the final model is saved"}.get(
            t.keep_checkpoints, f"the latest {t.keep_checkpoints} kept after the final model")
        lines.append(f"  saves      a checkpoint every {t.save_every} steps to {output / CHECKPOINTS}; {keep}")
    lines.append(f"  metrics    every {t.log_every} steps to {output / METRICS_FILE}")
    return "\n".join(lines)


def _describe_processes(cfg: Config, ranks: Ranks, autocast_dtype: Optional[torch.dtype]) -> str:
    t = cfg.train
    world, local = ranks.world_size, distributed.local_world_size()
    nodes = max(world // local, 1)
    backend = torch.distributed.get_backend(ranks.group)
    text = (f"{world} on {nodes} node{'s' if nodes > 1 else ''}, {backend}; each encodes "
            f"{t.batch_size // world} of the {t.batch_size} examples of a batch; ")
    if t.parallel == "fsdp":
        low = "bf16 parameters, float32 gradient reduction" if autocast_dtype == torch.bfloat16 else "float32"
        text += f"FSDP2 (parameters, gradients and optimiser state sharded; {low})"
    else:
        text += "DDP (a full copy each, gradients averaged)"
    if t.activation_checkpointing:
        text += "; activation checkpointing"
    return text


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


def _save_checkpoint(output, step, cfg, module, optimizer, scheduler, scaler, ranks: Ranks, device) -> None:
    """Every process takes part (the state is gathered to rank 0, which writes it)."""
    model, objective, optimizer_state = parallel.full_state(module, optimizer)
    rng = ranks.collect(_rng_state(device))
    if ranks.is_main:
        folder = output / CHECKPOINTS / f"step-{step}"
        folder.mkdir(parents=True, exist_ok=True)
        state = {
            "step": step,
            "config": cfg.to_dict(),
            "model": model,
            "objective": objective,
            "optimizer": optimizer_state,  # keyed by parameter name: loads under any number of processes
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng,  # one entry per process
        }
        partial = folder / (STATE_FILE + ".partial")
        torch.save(state, partial)
        partial.replace(folder / STATE_FILE)  # a crash mid-write never leaves a truncated checkpoint
    ranks.barrier()


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
