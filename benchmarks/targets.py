"""The GPU targets, each judged met, missed or not measured from what a GPU suite folder
holds (:mod:`benchmarks.suite`), with the numbers behind the judgement.

Speed targets compare p50s of the ``full`` step (forward + backward) on every
bert-base shape: the fused kernels at least 10x the eager reference, 3x
``torch.compile`` and 100x the naive loops (where they ran), with at most a quarter of
eager's peak memory. On ``large`` the fused no-grad forward must reach half a copy's
bandwidth: ``x bytes / t_forward >= 0.5 * 2 x bytes / t_copy``, i.e.
``t_copy / (2 t_forward) >= 0.5``. Every GPU row must carry its roofline fraction. The
MIPIC training step with the fused loss must take at most 1.10x a plain MRL step. The
test targets read the JUnit reports: a test file passes when it ran tests and none
failed, errored or was skipped.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Iterable, Optional

from . import records

MET, MISSED, NOT_MEASURED = "met", "missed", "not measured"
SCHEMA_VERSION = 1

SPEEDUPS = (("torch", 10.0), ("torch.compile", 3.0), ("naive", 100.0))
MEMORY_SHARE = 0.25
BANDWIDTH_SHARE = 0.5
STEP_OVERHEAD = 1.10


def summarise(out: Path) -> dict:
    """The summary of a suite folder: environment, jobs, targets (JSON-serialisable)."""
    from .suite import STATUS

    env_file = out / "env" / "probe" / "environment.json"
    environment = json.loads(env_file.read_text()) if env_file.is_file() else None
    jobs = []
    for status in sorted(out.glob(f"*/*/{STATUS}")):
        state = json.loads(status.read_text())
        jobs.append({"stage": status.parent.parent.name, "name": status.parent.name, "status": state["status"],
                     "seconds": state.get("seconds"), "reason": state.get("reason", "")})
    rows = _latest(records.read_rows(out / records.CSV_NAME)) if (out / records.CSV_NAME).is_file() else []
    found = [check(out, rows) for check in CHECKS]
    counts = {status: sum(1 for t in found if t["status"] == status) for status in (MET, MISSED, NOT_MEASURED)}
    # The dry run's device is a CPU; a GPU suite's is never one.
    dry_run = bool(environment) and environment.get("device", "").startswith("cpu")
    return {"schema": SCHEMA_VERSION, "updated": records.utc_now(), "dry_run": dry_run,
            "environment": environment, "jobs": jobs, "targets": found, **counts}


def _latest(rows: list[dict]) -> list[dict]:
    from .plot import latest_rows

    return latest_rows(rows)


def _target(name: str, text: str, threshold: str, missing: str) -> dict:
    """A target not measured yet; ``missing`` says what its judgement needs."""
    return {"id": name, "target": text, "threshold": threshold, "status": NOT_MEASURED, "value": None,
            "evidence": [], "note": f"needs {missing}"}


def _rows(rows: list[dict], **where: str) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in where.items())]


def _p50(rows: list[dict], preset: str, shape: str, provider: str, mode: str, kernel: str = "linear"
         ) -> Optional[dict]:
    found = _rows(rows, preset=preset, shape=shape, provider=provider, mode=mode, kernel=kernel)
    return found[-1] if found else None


def _judge(target: dict, values: list[float], ok: Callable[[float], bool], pick: Callable[[Iterable[float]], float]
           ) -> dict:
    if values:
        target["value"] = round(pick(values), 4)
        target["status"] = MET if all(ok(v) for v in values) else MISSED
        target["note"] = ""
    return target


def _compare(target: dict, rows: list[dict], preset: str, mode: str, baseline: str, baseline_mode: str,
             value: Callable[[dict, dict], Optional[float]], describe: Callable[[dict, dict, float], str],
             ok: Callable[[float], bool], pick: Callable[[Iterable[float]], float]) -> dict:
    """Judge ``value(fused row, baseline row)`` at every shape of ``preset`` where both ran."""
    values = []
    for fused in _rows(rows, preset=preset, provider="triton", mode=mode, kernel="linear"):
        base = _p50(rows, preset, fused["shape"], baseline, baseline_mode)
        found = None if base is None else value(fused, base)
        if found is not None:
            values.append(found)
            target["evidence"].append(f"{fused['shape']}: {describe(fused, base, found)}")
    return _judge(target, values, ok, pick)


def _ms(row: dict) -> float:
    return float(row["p50_ms"])


def _speedup(baseline: str, factor: float) -> Callable[[Path, list[dict]], dict]:
    def check(out: Path, rows: list[dict]) -> dict:
        target = _target(f"full-step-vs-{baseline}",
                         f"bert-base full step: fused p50 at least {factor:g}x {baseline}'s at every shape"
                         + (" where it ran" if baseline == "naive" else ""), f">= {factor:g} (smallest ratio)",
                         f"bert-base full-step rows of the fused kernels and of {baseline}")
        return _compare(target, rows, "bert-base", "full", baseline, "full",
                        lambda fused, base: _ms(base) / _ms(fused),
                        lambda fused, base, r: f"{baseline} {_ms(base):.3f} ms / fused {_ms(fused):.3f} ms = {r:.2f}x",
                        lambda r: r >= factor, min)

    return check


def _memory(out: Path, rows: list[dict]) -> dict:
    target = _target("full-step-memory", "bert-base full step: fused peak memory at most a quarter of eager's "
                     "at every shape", f"<= {MEMORY_SHARE:g} (largest share)",
                     "bert-base full-step rows of the fused kernels and of torch")

    def mib(row: dict) -> float:
        return float(row["peak_mib"])

    return _compare(target, rows, "bert-base", "full", "torch", "full",
                    lambda fused, eager: mib(fused) / mib(eager) if mib(eager) > 0 else None,
                    lambda fused, eager, s: f"fused {mib(fused):.1f} MiB / eager {mib(eager):.1f} MiB = {s:.3f}",
                    lambda s: s <= MEMORY_SHARE, max)


def _bandwidth(out: Path, rows: list[dict]) -> dict:
    target = _target("large-bandwidth", "large no-grad forward: fused reads x at half a copy's bandwidth or more "
                     "(t_copy / (2 t_forward))", f">= {BANDWIDTH_SHARE:g}",
                     "the large no-grad row of the fused kernels and its copy row")
    return _compare(target, rows, "large", "no-grad", "copy", "forward",
                    lambda fused, copy: _ms(copy) / (2 * _ms(fused)),
                    lambda fused, copy, s: f"copy {_ms(copy):.3f} ms, fused no-grad {_ms(fused):.3f} ms: {s:.3f} "
                                           "of the copy's bandwidth",
                    lambda s: s >= BANDWIDTH_SHARE, min)


def _roofline(out: Path, rows: list[dict]) -> dict:
    target = _target("roofline-every-row", "every GPU row carries its % of roofline", "all rows", "GPU rows")
    gpu = [r for r in rows if not r["device"].startswith("cpu")]
    if gpu:
        missing = [f"{r['preset']} {r['shape']} {r['provider']} {r['mode']}" for r in gpu if not r["roofline_pct"]]
        target["value"] = len(gpu) - len(missing)
        target["status"] = MISSED if missing else MET
        target["note"] = ""
        target["evidence"] = [f"{len(gpu) - len(missing)} of {len(gpu)} rows"] + [f"none: {m}" for m in missing]
    return target


def _overhead(out: Path, rows: list[dict]) -> dict:
    from .step_overhead import FIELDS

    target = _target("step-overhead", "MIPIC step with the fused loss at most 1.10x a plain MRL step "
                     "(BERT-base size, batch 32, 128 tokens, bf16 autocast)", f"<= {STEP_OVERHEAD:g}",
                     "overhead/step/step_overhead.csv with an mrl and a mipic row")
    path = out / "overhead" / "step" / "step_overhead.csv"
    if not path.is_file():
        return target
    found = {r["method"]: r for r in records.read_rows(path, FIELDS)}
    if "mipic" in found and "mrl" in found:
        ratio = float(found["mipic"]["median_s"]) / float(found["mrl"]["median_s"])
        target["evidence"] = [f"{m}: median {float(found[m]['median_s']) * 1e3:.1f} ms per step "
                              f"({found[m]['model']}, batch {found[m]['batch']}, {found[m]['seq_len']} tokens, "
                              f"autocast {found[m]['autocast']}, CKA backend {found[m]['cka_backend']})"
                              for m in ("mrl", "mipic")]
        _judge(target, [ratio], lambda r: r <= STEP_OVERHEAD, max)
    return target


def junit_cases(path: Path) -> list[tuple[str, str]]:
    """(test id, outcome) of every test case of a JUnit report: outcome is ``passed``,
    ``failed``, ``error`` or ``skipped``."""
    cases = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome = "passed"
        for child, name in (("failure", "failed"), ("error", "error"), ("skipped", "skipped")):
            if case.find(child) is not None:
                outcome = name
                break
        cases.append((f"{case.get('classname', '')}::{case.get('name', '')}", outcome))
    return cases


def _tests(job: str, text: str, selects: Callable[[str], bool] = lambda _: True, what: str = "tests"
           ) -> Callable[[Path, list[dict]], dict]:
    def check(out: Path, rows: list[dict]) -> dict:
        target = _target(f"tests-{job}" + ("" if what == "tests" else f"-{what}"), text, "all pass, none skipped",
                         f"tests/{job}/junit.xml")
        report = out / "tests" / job / "junit.xml"
        if not report.is_file():
            return target
        cases = [(name, outcome) for name, outcome in junit_cases(report) if selects(name)]
        outcomes = [outcome for _, outcome in cases]
        if not cases or all(o == "skipped" for o in outcomes):
            target["note"] = "every test was skipped (no CUDA device)" if cases else "no such test in the report"
            return target
        bad = [f"{outcome}: {name}" for name, outcome in cases if outcome != "passed"]
        target["value"] = f"{outcomes.count('passed')} of {len(cases)} passed"
        target["status"] = MISSED if bad else MET
        target["note"] = ""
        target["evidence"] = bad[:20]
        return target

    return check


CHECKS: tuple[Callable[[Path, list[dict]], dict], ...] = (
    _tests("gpu", "tests/test_gpu.py (and the GPU benchmark test) pass on the device"),
    _tests("gpu", "half-precision accuracy: bf16 and fp16 within the float32 criterion, gradients included",
           lambda name: "error_at_most_twice_eager" in name and ("bfloat16" in name or "float16" in name),
           what="half-precision"),
    _tests("gpu", "a CUDA graph of a training step with the loss replays like eager",
           lambda name: "cuda_graph" in name, what="cuda-graph"),
    _tests("triton", "tests/test_triton.py passes with the kernels compiled for the device"),
    *(_speedup(baseline, factor) for baseline, factor in SPEEDUPS),
    _memory,
    _bandwidth,
    _roofline,
    _overhead,
)


def summary_text(summary: dict) -> str:
    """The summary as a few lines of text: jobs, then targets."""
    env = summary.get("environment") or {}
    lines = [f"GPU suite{' (dry run)' if summary['dry_run'] else ''}: {env.get('device', 'device unknown')}, "
             f"torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, commit {env.get('commit', '?')}"]
    if env.get("copy_tb_s"):
        lines.append(f"measured: copy {env['copy_tb_s']} TB/s, bf16 matrix product {env['bf16_matmul_tflop_s']} "
                     "TFLOP/s")
    lines.append("jobs:")
    lines += [f"  {j['status']:<6} {j['stage']}/{j['name']} ({j['seconds']} s) {j['reason']}"[:300]
              for j in summary["jobs"]]
    lines.append(f"targets: {summary[MET]} met, {summary[MISSED]} missed, {summary[NOT_MEASURED]} not measured")
    for t in summary["targets"]:
        value = "" if t["value"] is None else f" = {t['value']} ({t['threshold']})"
        lines.append(f"  {t['status']:<12} {t['id']}{value}")
        lines += [f"      {e}" for e in t["evidence"][:8]]
        if t["note"] and t["status"] == NOT_MEASURED:
            lines.append(f"      {t['note']}")
    return "\n".join(lines)
