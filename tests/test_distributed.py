"""Data parallelism on CPU with gloo: two processes equal one process on the whole batch.

* One optimiser step of the real trainer code (:func:`mipic.train.build_modules` and
  :func:`mipic.train.accumulate_gradients`) on two spawned processes, each encoding its
  half of every batch, against one process on the whole batch: the logged parts and
  every parameter's gradient, for MRL, MIPIC with its PIC chain, MIC, ESE with hard
  negatives, gradient accumulation, and FSDP. In float64, so that what is compared is
  the algorithm, not float32 rounding (the same comparison in float32 differs by up to
  1e-2 on the PIC heads, whose gradients are ill-conditioned).
* ``mipic.train.train`` under a torchrun-like environment on two processes against one
  process, and checkpoints written by two processes resumed by one (and by one resumed
  by two under FSDP).
* The kernels' losses with ``sum_over_processes`` (NestedCKALoss under both reductions,
  SCR) on two halves of a batch, two threads standing for the processes, against the
  whole batch.
* The data each process encodes, and the refused combinations.

The tiny model has no dropout, so the runs compute the same function.
"""

from __future__ import annotations

import json
import shutil
import threading

import pytest
import torch

pytest.importorskip("transformers")

from mipic import distributed  # noqa: E402
from mipic.config import config_from_dict  # noqa: E402
from mipic.distributed import ONE_PROCESS  # noqa: E402
from mipic.testing import build_tiny_model  # noqa: E402
from mipic.train import METRICS_FILE, _Batches, check_parallel, train  # noqa: E402
from tests import distributed_helpers  # noqa: E402

WORLD = 2
# float64 rounding (1e-16) amplified by the conditioning of these gradients: the float32
# runs differ by up to 1e-2 at a rounding of 6e-8, an amplification of 1e5, so float64
# runs should agree to about 1e-11 (they do); this leaves a factor of 1000.
RTOL = 1e-8
# Sentence lengths differ within and between the halves: each process pads to its own length.
SENTENCES = [
    "a man is playing a guitar on the street", "the dog runs", "two people sitting on a table with a book",
    "a red car", "the old woman is reading a book in the park", "children are eating food",
    "a black cat jumps on the table", "a young man walks with a dog on the beach", "a group of people talking",
    "the big horse", "a small child is riding a horse in the water", "two old men are reading",
]
TRIPLETS = [
    ("a man is playing a guitar", "a man plays guitar", "a woman is eating food"),
    ("the dog runs in the park", "a dog is running", "two cats are sitting"),
    ("two people sitting on a table", "people are sitting", "a car on the street"),
    ("a red car on the street", "a car is red", "a child reading a book"),
    ("the old woman is reading a book", "a woman reads", "a horse jumps in the water"),
    ("children are eating food", "the children eat", "a man walks with a dog"),
]


def _config(model: str, method: str, *, mic: bool = False, data: str = "unused.txt", train=None, **objective) -> dict:
    return {
        "model": {"name": model, "dims": [4, 8, 16, 32], "max_length": 16},
        "data": {"path": data},
        "objective": {"method": method, "temperature": 0.5,
                      "sia": {"layers": [1, 2, 3], "k_min": 2, "attention_temperature": 1.0},
                      "mic": {"enabled": mic, "layers": [2, 3]}, **objective},
        "train": {"batch_size": 6, "seed": 7, "threads": 1, "progress": False, **(train or {})},
    }


def _cases(model: str) -> dict:
    one = [[(s,) for s in SENTENCES[:6]]]
    two_micro = [[(s,) for s in SENTENCES[:6]], [(s,) for s in SENTENCES[6:]]]
    mipic = _config(model, "mipic", pic={"chain": [[8, 1], [16, 2], [32, 3]]},
                    train={"activation_checkpointing": True})
    fsdp = _config(model, "mipic", mic=True, pic={"chain": [[8, 1], [32, 3]]},
                   train={"parallel": "fsdp", "activation_checkpointing": True})
    # The model distils itself: the relation and projection terms only need a frozen teacher.
    mta = {**_config(model, "mta", alpha=0.5, mta={"layers": [[1, 1], [3, 3]], "hra_layers": [3]}),
           "teacher": {"name": model, "max_length": 16}}
    return {
        "mrl": {"config": _config(model, "mrl"), "batches": one},
        "mipic, activation checkpointing, 2 micro-batches": {"config": mipic, "batches": two_micro},
        "mic": {"config": _config(model, "mrl", mic=True), "batches": one},
        "ese, hard negatives": {"config": _config(model, "ese", ese={"layers": [1, 2]}), "batches": [TRIPLETS]},
        "mipic + mic, fsdp, activation checkpointing, 2 micro-batches": {"config": fsdp, "batches": two_micro},
        "mta + mrl": {"config": mta, "batches": one},
        # Each half's terms alone: what a missing gather or sum would compute.
        "mrl, local terms": {"config": _config(model, "mrl"), "batches": one, "local_terms": True, "as": "mrl"},
        "mic, local terms": {"config": _config(model, "mrl", mic=True), "batches": one, "local_terms": True,
                             "as": "mic"},
    }


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    folder = build_tiny_model(tmp_path_factory.mktemp("bert"), "bert")
    path = tmp_path_factory.getbasetemp() / folder / "config.json"
    config = json.loads(path.read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    path.write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(SENTENCES) + "\n")
    return str(path)


def _run_config(model: str, data: str, parallel: str = "ddp") -> dict:
    # 12 sentences, batches of 6: 2 steps per epoch; a checkpoint after every step.
    return _config(model, "mipic", data=data, pic={"chain": [[8, 1], [32, 3]]},
                   train={"epochs": 2, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1, "save_every": 1,
                          "keep_checkpoints": None, "parallel": parallel})


def _resume_from(source, step: int, target) -> None:
    """``target`` as an interrupted run left it after ``step``: that checkpoint and its metrics."""
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / f"step-{step}", target / "checkpoints" / f"step-{step}")
    rows = [line for line in (source / METRICS_FILE).read_text().splitlines() if json.loads(line)["step"] <= step]
    (target / METRICS_FILE).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def runs(tiny_bert, sentences, tmp_path_factory) -> dict:
    """Everything two processes do, in one pair of processes: every gradient case; a
    whole run under DDP; and, under FSDP, the resumption of a one-process run's first
    checkpoint. Returns the folders and results by name."""
    folder = tmp_path_factory.mktemp("runs")
    paths = {name: folder / name for name in ("one", "two", "fsdp_resumed")}
    train(config_from_dict(_run_config(tiny_bert, sentences)), paths["one"])
    _resume_from(paths["one"], 1, paths["fsdp_resumed"])
    work = [
        (_run_config(tiny_bert, sentences), str(paths["two"]), False, distributed_helpers.free_port()),
        # train.parallel may change on resume
        (_run_config(tiny_bert, sentences, parallel="fsdp"), str(paths["fsdp_resumed"]), True, distributed_helpers.free_port()),
    ]
    out = folder / "gradients.pt"
    cases = _cases(tiny_bert)
    distributed_helpers.spawn(distributed_helpers.work_on_ranks,
                              lambda rank: (rank, WORLD, str(folder / "store"), cases, str(out), work), WORLD)
    return {"gradients": torch.load(out), **paths}


@pytest.fixture(scope="module")
def one_process(tiny_bert) -> dict:
    """Each case's step on one process, on the whole batch (computed once per case)."""
    cases, done = _cases(tiny_bert), {}

    def result(case: str) -> dict:
        name = cases[case].get("as", case)
        if name not in done:
            spec = cases[name]
            config = {**spec["config"], "train": {**spec["config"]["train"], "parallel": "ddp"}}
            done[name] = distributed_helpers.step_gradients(config, spec["batches"], ONE_PROCESS)
        return done[name]

    return result


def _worst_errors(got: dict, want: dict) -> tuple[float, float]:
    """The largest relative error of the logged parts and of the parameter gradients.
    A gradient's error is relative to its norm, or to a thousandth of the largest
    gradient norm for parameters whose exact gradient is zero (attention key biases:
    the softmax ignores a shift), which hold rounding only."""
    parts = max(abs(got["parts"][k] - v) / max(abs(v), 1e-12) for k, v in want["parts"].items())
    assert got["grads"].keys() == want["grads"].keys()
    scale = max(float(g.norm()) for g in want["grads"].values())
    grads = max(float((got["grads"][k] - g).norm()) / max(float(g.norm()), 1e-3 * scale)
                for k, g in want["grads"].items())
    return parts, grads


@pytest.mark.parametrize("case", ["mrl", "mipic, activation checkpointing, 2 micro-batches", "mic",
                                  "ese, hard negatives", "mipic + mic, fsdp, activation checkpointing, 2 micro-batches",
                                  "mta + mrl"])
def test_two_processes_give_the_loss_and_gradients_of_one_on_the_whole_batch(case, runs, one_process):
    want = one_process(case)
    assert want["parts"]["loss"] > 0 and len(want["grads"]) > 50
    parts, grads = _worst_errors(runs["gradients"][case], want)
    assert parts < RTOL and grads < RTOL


@pytest.mark.parametrize("case", ["mrl, local terms", "mic, local terms"])
def test_without_the_collectives_the_comparison_fails(case, runs, one_process):
    parts, grads = _worst_errors(runs["gradients"][case], one_process(case))
    assert parts > 1e-2 and grads > 1e-2


def _in_two_threads(loss_of_part, parts) -> list:
    """``loss_of_part(part, sum_over_processes)`` for both parts at once, each in a thread
    standing for a process: the sum returns the thread's tensor plus the other thread's
    (detached), which is what an all-reduce returns."""
    barrier = threading.Barrier(2, timeout=60)
    sent: list[list[torch.Tensor]] = [[], []]
    results, errors = [None, None], []

    def run(i: int) -> None:
        def summed(t: torch.Tensor) -> torch.Tensor:
            sent[i].append(t.detach())
            barrier.wait()
            return t + sent[1 - i][len(sent[i]) - 1]

        try:
            results[i] = loss_of_part(parts[i], summed)
        except BaseException as err:  # noqa: BLE001 (re-raised below, in the test)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nested_cka_loss_summed_over_processes_is_the_whole_batchs(reduction, gen):
    from mipic_kernels import NestedCKALoss, nested_cka

    # 3 layers x 7 sentences split 4 + 3, 19 tokens, width 13, padding; sentence 5 has one
    # real token (undefined entries, which the second part alone counts).
    x = torch.randn(3, 7, 19, 13, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 7, 19, generator=gen) < 0.8
    mask[:, :, 0] = True
    mask[:, 5, 1:] = False
    loss = NestedCKALoss([3, 7, 10], weights=[0.5, 1.0, 2.0], reduction=reduction, k=[0.3, 0.6, 0.9], k_min=4)
    whole = x.clone().requires_grad_()
    want = loss(whole, scores="cls", mask=mask)
    want.backward()
    assert torch.isnan(nested_cka(x, [3, 7, 10], mask=mask, k=[0.3, 0.6, 0.9], k_min=4)[:, 4:]).any()
    halves = (slice(0, 4), slice(4, 7))
    parts = [(x[:, rows].clone().requires_grad_(), mask[:, rows]) for rows in halves]

    def part_loss(part, summed):
        gaps = loss.per_width(part[0], scores="cls", mask=part[1], sum_over_processes=summed)
        return (gaps * loss.weights.to(gaps)).sum()

    got = _in_two_threads(part_loss, parts)
    for value, (rows_x, _), rows in zip(got, parts, halves):
        torch.testing.assert_close(value, want, rtol=1e-12, atol=0)
        value.backward()  # the other part entered detached: the gradient of this part's rows
        torch.testing.assert_close(rows_x.grad, whole.grad[:, rows], rtol=1e-10, atol=1e-14)
    alone = loss(x[:, :4], scores="cls", mask=mask[:, :4])  # what a missing sum would give
    assert abs(float(alone) - float(want.detach())) > 1e-3


def test_soft_collapse_summed_over_processes_is_the_whole_batchs(gen):
    from mipic_kernels import SoftCollapseLoss

    x = torch.randn(2, 7, 11, 10, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 7, 11, generator=gen) < 0.7
    mask[:, :, :2] = True
    loss = SoftCollapseLoss([3, 5, 8], tau_corr=0.05)
    want = loss.per_width(x, mask)
    parts = [(x[:, :4], mask[:, :4]), (x[:, 4:], mask[:, 4:])]
    got = _in_two_threads(lambda part, summed: loss.per_width(*part, sum_over_processes=summed), parts)
    for value in got:
        torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-15)
    assert not torch.allclose(loss.per_width(*parts[0]), want, rtol=1e-3)


# ------------------------------------------------------------------ whole runs

def _metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]


def _same_rows(got: list[dict], want: list[dict], rtol: float) -> None:
    # float32 runs: rounding differs with the padding and the order of the sums.
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "mrl", "sia_cka", "sia_attention", "pic", "grad_norm", "lr"):
            assert a[key] == pytest.approx(b[key], rel=rtol), (a["step"], key)


def _same_weights(a_folder, b_folder) -> None:
    from safetensors.torch import load_file

    a, b = load_file(a_folder / "model.safetensors"), load_file(b_folder / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


def test_a_run_on_two_processes_equals_one_and_resumes_on_one(runs, tiny_bert, sentences, tmp_path, capsys):
    one, two = runs["one"], runs["two"]
    _same_rows(_metrics(two), _metrics(one), rtol=1e-5)
    _same_weights(two, one)
    assert len(_metrics(two)) == 4  # rank 0 alone wrote the metrics
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-1", "step-2", "step-3"]

    resumed = tmp_path / "resumed"
    _resume_from(two, 2, resumed)
    cfg = _run_config(tiny_bert, sentences)
    cfg["train"]["progress"] = True
    train(config_from_dict(cfg), resumed, resume=True)
    assert "the checkpoint was written by 2 processes and this run has 1" in capsys.readouterr().out
    _same_rows(_metrics(resumed), _metrics(two), rtol=1e-5)
    _same_weights(resumed, two)


def test_fsdp_on_two_processes_resumes_a_run_of_one(runs):
    one, resumed = runs["one"], runs["fsdp_resumed"]
    _same_rows(_metrics(resumed), _metrics(one), rtol=1e-5)
    _same_weights(resumed, one)  # the full weights, gathered from the shards
    assert json.loads((resumed / "mipic.json").read_text())["matryoshka_dims"] == [4, 8, 16, 32]


@pytest.mark.slow
def test_torchrun_runs_mipic_train_on_two_processes(tiny_bert, sentences, tmp_path):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "run.yaml"
    cfg = _run_config(tiny_bert, sentences)
    cfg["train"].update(progress=True, save_every=None, epochs=1)
    config.write_text(yaml.safe_dump(cfg))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={distributed_helpers.free_port()}",
         "-m", "mipic", "train", "--config", str(config), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("model saved to") == 1  # from rank 0 only
    assert "processes  2 on 1 node, gloo; each encodes 3 of the 6 examples of a batch; DDP" in done.stdout
    assert len(_metrics(tmp_path / "out")) == 2


# ------------------------------------------------------------------ memory switches

def test_activation_checkpointing_recomputes_the_same_step(tiny_bert, tmp_path):
    folder = build_tiny_model(tmp_path / "with_dropout", "bert")  # dropout on: recomputation redraws no mask
    results = []
    for checkpointing in (False, True):
        config = _config(folder, "mrl", train={"activation_checkpointing": checkpointing})
        results.append(distributed_helpers.step_gradients(config, [[(s,) for s in SENTENCES[:6]]], ONE_PROCESS))
    plain, recomputed = results
    assert recomputed["checkpointing"] and not plain["checkpointing"]
    assert plain["parts"] == recomputed["parts"]
    assert all(torch.equal(plain["grads"][k], recomputed["grads"][k]) for k in plain["grads"])


def test_fsdp_with_bf16_parameters_computes_in_bf16_and_keeps_float32_shards_and_heads(tiny_bert):
    # On GPUs train.precision bf16 chooses this policy; here on one CPU process.
    from mipic.encoder import Encoder
    from mipic.objectives import Objective
    from mipic.parallel import TrainedModules, wrap

    cfg = config_from_dict(_config(tiny_bert, "mipic", mic=True, pic={"chain": [[8, 1], [32, 3]]}))
    batch = [(s,) for s in SENTENCES[:6]]
    torch.manual_seed(0)
    want, _ = Objective(cfg.objective, cfg.model.dims, 32, 3)(Encoder.from_pretrained(tiny_bert, max_length=16), batch)
    ranks, joined = distributed.join("gloo", torch.device("cpu"), needs_group=True)  # a group of one
    try:
        torch.manual_seed(0)
        module = TrainedModules(Encoder.from_pretrained(tiny_bert, max_length=16),
                                Objective(cfg.objective, cfg.model.dims, 32, 3), ranks)
        wrap(module, "fsdp", torch.device("cpu"), torch.bfloat16)
        seen = []
        query = module.encoder.model.encoder.layer[0].attention.self.query
        query.register_forward_hook(lambda layer, args, out: seen.append(layer.weight.dtype))
        loss, _ = module(batch)
        loss.backward()
    finally:
        if joined:
            distributed.leave(ranks)
    assert seen == [torch.bfloat16]
    # bf16 has 8 significant bits (relative rounding 4e-3), through 3 layers and the terms
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=5e-2)
    params = dict(module.named_parameters())
    assert all(p.to_local().dtype == torch.float32 for p in params.values())
    assert all(p.grad.to_local().dtype == torch.float32 for p in params.values() if p.grad is not None)
    assert params["objective.terms.pic.heads.0.0.weight"].grad is not None


# ------------------------------------------------------------------ the data of each process

@pytest.mark.parametrize("examples, batch_size, world", [(23, 6, 3), (23, 6, 2), (12, 4, 4), (9, 2, 1)])
def test_each_epoch_gives_every_process_a_disjoint_share_of_one_seeded_order(examples, batch_size, world):
    data = [(f"sentence {i}",) for i in range(examples)]
    batches = _Batches(data, batch_size, seed=3)
    per_epoch = examples // batch_size  # the remainder would be a smaller batch: left out, as in one process
    for epoch in range(2):
        steps = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        shares = [[ex for b in steps for ex in distributed.shard(batches[b], rank, world)] for rank in range(world)]
        seen = [ex for share in shares for ex in share]
        assert len(seen) == len(set(seen)) == per_epoch * batch_size  # each example at most once
        assert sorted(seen) == sorted(ex for b in steps for ex in batches[b])  # the one-process epoch
        for b in steps:  # rank order restores the batch
            assert [ex for rank in range(world) for ex in distributed.shard(batches[b], rank, world)] == batches[b]
    again, other = _Batches(data, batch_size, seed=3), _Batches(data, batch_size, seed=4)
    assert [again[b] for b in range(2 * per_epoch)] == [batches[b] for b in range(2 * per_epoch)]
    assert [other[b] for b in range(per_epoch)] != [batches[b] for b in range(per_epoch)]
    assert [batches[b] for b in range(per_epoch)] != [batches[b] for b in range(per_epoch, 2 * per_epoch)]


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(ValueError, match="a batch of 5 examples cannot be split evenly over 2 processes"):
        distributed.shard(list(range(5)), 0, 2)


# ------------------------------------------------------------------ refused combinations

def _cfg(**train) -> object:
    return config_from_dict({"data": {"path": "x.txt"}, "train": train})


def test_a_world_size_that_does_not_divide_the_batch_is_refused():
    with pytest.raises(ValueError, match=r"the world size 4 must divide train.batch_size 6: it is the whole batch, "
                                         r"split evenly over the processes \(e.g. train.batch_size=8\)"):
        check_parallel(_cfg(batch_size=6), torch.device("cpu"), 4, None)
    check_parallel(_cfg(batch_size=8), torch.device("cpu"), 4, None)


def test_fsdp_in_fp16_is_refused():
    with pytest.raises(ValueError, match="train.parallel fsdp runs in bf16 or fp32"):
        check_parallel(_cfg(parallel="fsdp"), torch.device("cpu"), 2, torch.float16)


def test_the_triton_backend_without_a_gpu_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = config_from_dict({"data": {"path": "x.txt"}, "objective": {"sia": {"backend": "triton"}}})
    with pytest.raises(ValueError, match="objective.sia.backend triton cannot run on cpu"):
        check_parallel(cfg, torch.device("cpu"), 1, None)


def test_nccl_without_cuda_is_refused():
    with pytest.raises(ValueError, match="train.backend nccl needs CUDA devices"):
        distributed.resolve_backend("nccl", torch.device("cpu"))
    assert distributed.resolve_backend("auto", torch.device("cpu")) == "gloo"


def test_one_gpu_named_for_several_processes_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "x",
           "MASTER_PORT": "1"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert distributed.process_device("auto") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="train.device 'cuda:0' names one GPU for the 2 processes of this node"):
        distributed.process_device("cuda:0")
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="this is process 2 of its node .* only 2 CUDA devices are visible"):
        distributed.process_device("cuda")
