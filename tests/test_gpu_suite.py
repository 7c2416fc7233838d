"""The GPU suite's plumbing, on a CPU: its job list against the command lines it calls,
the resumable runner and its archive, the targets judged from a suite folder, the
report and filing of a suite, the stages' own programs at tiny sizes, and (slow) the
whole suite's dry run."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from benchmarks import catalog, device_probe, gpu_report, kernel_profile, records, step_overhead, suite, targets
from benchmarks.run import build_parser as bench_parser
from benchmarks.run import main as bench_main

REPO = Path(__file__).resolve().parents[1]
PARSERS = {
    "benchmarks.run": bench_parser, "benchmarks.kernel_profile": kernel_profile.build_parser,
    "benchmarks.step_overhead": step_overhead.build_parser, "benchmarks.device_probe": device_probe.build_parser,
}


@pytest.mark.parametrize("dry_run", [False, True], ids=["gpu", "dry-run"])
def test_every_job_is_a_valid_command_line(tmp_path, dry_run: bool) -> None:
    jobs = suite.gpu_plan(dry_run)
    assert len({(j.stage, j.name) for j in jobs}) == len(jobs)
    assert {j.stage for j in jobs} == set(suite.STAGES)
    for job in jobs:
        assert job.argv[0] == "-m" and 0 < job.estimate_s <= job.limit_s
        module, rest = job.argv[1], [a.replace("{out}", str(tmp_path)) for a in job.argv[2:]]
        if module == "pytest":
            files = [a for a in rest if a.startswith("tests/")]
            assert files and all((REPO / f).is_file() for f in files)
        else:
            PARSERS[module]().parse_args(rest)  # exits on a bad option


def test_gpu_plan_covers_every_gpu_preset_provider_and_mode() -> None:
    jobs = suite.gpu_plan()
    bench = {j.name: j.argv for j in jobs if j.stage == "bench"}
    for name in catalog.default_presets(on_gpu=True):
        for shape in catalog.PRESETS[name].shapes():
            argv = bench[f"{name}_{shape}_linear"]
            providers = argv[argv.index("--provider") + 1:argv.index("--kernel")]
            assert {"torch", "torch.compile", "triton"} <= set(providers)
            assert "--mode" not in argv and argv[argv.index("--dtype") + 1] == "bf16"
    assert sum("naive" in argv for argv in bench.values()) == len(suite.NAIVE_SHAPES)
    assert sum(name.endswith("_rbf") for name in bench) == len(suite.RBF_SHAPES)
    # The rows every speed and memory target needs come before everything else.
    order = [j.name for j in jobs]
    assert order.index("bert-base_L7xB128xT256xD768_linear") < order.index("gpu") < order.index("triton")


def _job(name: str, code: str, estimate: float = 0.1, limit: float = 30, stage: str = "bench") -> suite.Job:
    return suite.Job(stage, name, ("-c", code), estimate, limit)


def test_runner_resumes_and_keeps_what_each_job_left(tmp_path) -> None:
    out, archive, runs = tmp_path / "suite", tmp_path / "suite.tar.gz", tmp_path / "runs.txt"
    count = f"open({str(runs)!r}, 'a').write('{{0}}\\n')"
    writes = "; import sys; open(sys.argv[-1] + '/data.txt', 'w').write('42')"
    jobs = [
        suite.Job("bench", "ok", ("-c", count.format("ok") + writes, "{out}"), 0.1, 30),
        _job("fails", count.format("fails") + "; raise SystemExit(3)"),
        _job("too-long", count.format("too-long"), estimate=1e6, limit=2e6),
        _job("hangs", count.format("hangs") + "; import time; time.sleep(60)", limit=1.0),
    ]
    (out / suite.CACHE / "inductor").mkdir(parents=True)
    (out / suite.CACHE / "inductor" / "big.bin").write_bytes(b"0" * 1000)
    suite.run_jobs(jobs, out, deadline_s=60, retry=False, archive=archive)
    assert runs.read_text().split() == ["ok", "fails", "hangs"]
    ok, failed, hung = (suite.job_status(out, j) for j in (jobs[0], jobs[1], jobs[3]))
    assert ok["status"] == "done" and (out / "bench" / "ok" / "data.txt").read_text() == "42"
    assert failed["status"] == "failed" and "exit code 3" in failed["reason"]
    assert hung["status"] == "failed" and "limit" in hung["reason"]
    assert suite.job_status(out, jobs[2]) is None  # left for a later call
    with tarfile.open(archive) as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}
    assert {"bench/ok/data.txt", "bench/ok/status.json", "bench/ok/log.txt", suite.SUMMARY} <= names
    assert not any(n.startswith(suite.CACHE) or ".partial" in n for n in names)
    summary = json.loads((out / suite.SUMMARY).read_text())
    assert {(j["name"], j["status"]) for j in summary["jobs"]} == {("ok", "done"), ("fails", "failed"),
                                                                   ("hangs", "failed")}
    # Done jobs never run again; failed ones only with retry.
    suite.run_jobs(jobs[:2], out, deadline_s=60, retry=False, archive=None)
    suite.run_jobs(jobs[:2], out, deadline_s=60, retry=True, archive=None)
    assert runs.read_text().split() == ["ok", "fails", "hangs", "fails"]


def test_a_job_cut_by_the_calls_deadline_runs_again_next_call_once(tmp_path) -> None:
    out, runs = tmp_path / "suite", tmp_path / "runs.txt"
    job = _job("slow", f"open({str(runs)!r}, 'a').write('x'); import time; time.sleep(60)", limit=100)
    suite.run_jobs([job], out, deadline_s=1.0, retry=False, archive=None)
    assert runs.read_text() == "x" and suite.job_status(out, job) is None
    assert not list(out.glob("bench/*/"))
    # Cut again: it does not fit in a call, and fails instead of taking every call.
    suite.run_jobs([job], out, deadline_s=1.0, retry=False, archive=None)
    assert runs.read_text() == "xx" and "deadline 2 times" in suite.job_status(out, job)["reason"]


def _junit(path: Path, cases: dict) -> None:
    body = "".join(
        f'<testcase classname="tests.test_gpu" name="{name}">'
        + {"passed": "", "failed": "<failure/>", "skipped": "<skipped/>", "error": "<error/>"}[outcome]
        + "</testcase>" for name, outcome in cases.items())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{body}</testsuite></testsuites>')


def _suite_folder(out: Path) -> Path:
    """A suite folder as a GPU run would leave it, with chosen numbers."""
    env = {"date": "2026-11-23T10:00:00Z", "commit": "abc", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0",
           "cuda": "13.0", "triton": "3.6.0", "copy_tb_s": 3.0, "bf16_matmul_tflop_s": 790.0}
    (out / "env" / "probe").mkdir(parents=True)
    (out / "env" / "probe" / "environment.json").write_text(json.dumps(env))
    base = {**dict.fromkeys(records.SCHEMA, ""), "date": env["date"], "device": env["device"], "dtype": "bf16",
            "kernel": "linear", "roofline_pct": "12.5", "flags": ""}

    def row(preset, shape, provider, mode, p50, peak=100.0):
        return {**base, "preset": preset, "shape": shape, "provider": provider, "mode": mode,
                "p20_ms": str(p50), "p50_ms": str(p50), "p80_ms": str(p50), "peak_mib": str(peak)}

    a, b = "L7xB16xT128xD768", "L7xB64xT128xD768"
    rows = [
        row("bert-base", a, "triton", "full", 1.0, 20), row("bert-base", a, "torch", "full", 12.0, 100),
        row("bert-base", a, "torch.compile", "full", 2.5), row("bert-base", a, "naive", "full", 150.0),
        row("bert-base", b, "triton", "full", 2.0, 20), row("bert-base", b, "torch", "full", 16.0, 100),
        row("bert-base", b, "torch.compile", "full", 7.0),
        row("large", "L7xB16xT512xD4096", "copy", "forward", 0.3),
        row("large", "L7xB16xT512xD4096", "triton", "no-grad", 0.25),
        {**row("small", "L2xB4xT32xD64", "torch", "full", 1.0), "device": "cpu (a CPU)", "roofline_pct": ""},
    ]
    records.append_rows(out / "bench" / "some" / records.CSV_NAME, rows)
    for name in ("some",):
        (out / "bench" / name / suite.STATUS).write_text(json.dumps({"status": "done", "seconds": 1.0}))
    _junit(out / "tests" / "gpu" / "junit.xml", {
        "test_error_at_most_twice_eager[0-opts0-torch.bfloat16]": "passed",
        "test_error_at_most_twice_eager[0-opts0-torch.float16]": "failed",
        "test_error_at_most_twice_eager[0-opts0-torch.float32]": "passed",
        "test_cuda_graph_of_a_training_step_matches_eager": "passed",
    })
    _junit(out / "tests" / "triton" / "junit.xml", {"test_a": "skipped", "test_b": "skipped"})
    overhead = out / "overhead" / "step" / "step_overhead.csv"
    common = {**dict.fromkeys(step_overhead.FIELDS, ""), "model": "random bert-base", "batch": "32",
              "seq_len": "128", "autocast": "bf16", "cka_backend": "triton"}
    records.append_rows(overhead, [{**common, "method": "mrl", "median_s": "0.100"},
                                   {**common, "method": "mipic", "median_s": "0.105"}], step_overhead.FIELDS)
    suite.finish(out, None)
    return out


def test_targets_are_judged_from_the_folder(tmp_path) -> None:
    summary = json.loads((_suite_folder(tmp_path / "suite") / suite.SUMMARY).read_text())
    by_id = {t["id"]: t for t in summary["targets"]}
    assert summary["schema"] == targets.SCHEMA_VERSION and not summary["dry_run"]
    assert summary["environment"]["device"] == "NVIDIA H100 80GB HBM3"
    expect = {
        "full-step-vs-torch": (targets.MISSED, 8.0),  # 12x at one shape, 8x at the other
        "full-step-vs-torch.compile": (targets.MISSED, 2.5),
        "full-step-vs-naive": (targets.MET, 150.0),  # only where it ran
        "full-step-memory": (targets.MET, 0.2),
        "large-bandwidth": (targets.MET, 0.6),  # 0.3 ms copy, 0.25 ms forward
        "step-overhead": (targets.MET, 1.05),
        "roofline-every-row": (targets.MET, 9),  # the CPU row does not count
        "tests-gpu": (targets.MISSED, "3 of 4 passed"),
        "tests-gpu-half-precision": (targets.MISSED, "1 of 2 passed"),
        "tests-gpu-cuda-graph": (targets.MET, "1 of 1 passed"),
        "tests-triton": (targets.NOT_MEASURED, None),
    }
    assert set(by_id) == set(expect)
    for name, (status, value) in expect.items():
        assert (by_id[name]["status"], by_id[name]["value"]) == (status, pytest.approx(value) if isinstance(
            value, float) else value), name
    assert "skipped" in by_id["tests-triton"]["note"]
    assert any("8.00x" in e for e in by_id["full-step-vs-torch"]["evidence"])
    assert (summary[targets.MET], summary[targets.MISSED], summary[targets.NOT_MEASURED]) == (6, 4, 1)
    text = targets.summary_text(summary)
    assert "6 met, 4 missed, 1 not measured" in text and "copy 3.0 TB/s" in text


def test_report_and_filing_of_a_suite(tmp_path, capsys) -> None:
    out = _suite_folder(tmp_path / "suite")
    archive = tmp_path / "suite.tar.gz"
    suite.pack(out, archive)
    assert bench_main(["gpu-report", str(archive), "--into", str(tmp_path / "results")]) == 0
    filed = tmp_path / "results" / "2026-11-23_nvidia-h100-80gb-hbm3"
    assert (filed / "summary.json").is_file() and (filed / records.CSV_NAME).is_file()
    text = capsys.readouterr().out
    assert f"filed in {filed}" in text
    assert "| L7xB16xT128xD768 | 1 | 12.0x | 2.5x | 150.0x | 20% | 12.5% |" in text
    assert "| L7xB64xT128xD768 | 2 | 8.0x | 3.5x |  | 20% | 12.5% |" in text
    assert "- missed: bert-base full step: fused p50 at least 10x torch's at every shape: 8.0" in text
    assert gpu_report.report(filed).startswith("Measured on NVIDIA H100 80GB HBM3 (torch 2.11.0")
    with pytest.raises(SystemExit, match="not a suite folder"):
        gpu_report.main([str(tmp_path)])


def test_stage_programs_run_at_tiny_sizes_on_the_cpu(tmp_path, capsys) -> None:
    assert device_probe.main(["--out", str(tmp_path / "env"), "--device", "cpu"]) == 0
    env = json.loads((tmp_path / "env" / "environment.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"].startswith("cpu")
    assert kernel_profile.main(["--preset", "small", "--provider", "torch", "triton", "--mode", "full",
                                "--device", "cpu", "--calls", "1", "--warmup", "1", "--out",
                                str(tmp_path / "profile")]) == 0
    kernels = records.read_rows(tmp_path / "profile" / "kernels.csv", kernel_profile.FIELDS)
    assert kernels and {k["provider"] for k in kernels} == {"torch"}
    shares = [float(k["share_pct"]) for k in kernels]
    assert sum(shares) == pytest.approx(100, abs=0.5) and shares == sorted(shares, reverse=True)
    assert (tmp_path / "profile" / "torch_full.txt").read_text().strip()
    assert "triton: skipped: needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_of_the_whole_suite(tmp_path, capsys) -> None:
    out, archive = tmp_path / "suite", tmp_path / "suite.tar.gz"
    assert bench_main(["gpu-suite", "--dry-run", "--out", str(out), "--archive", str(archive)]) == 0
    summary = json.loads((out / suite.SUMMARY).read_text())
    assert summary["dry_run"] and all(j["status"] == "done" for j in summary["jobs"])
    assert {(j["stage"], j["name"]) for j in summary["jobs"]} == {(j.stage, j.name) for j in suite.gpu_plan(True)}
    rows = records.read_rows(out / records.CSV_NAME)
    assert {r["provider"] for r in rows} == {"naive", "torch"}  # no Triton rows on a CPU
    by_id = {t["id"]: t for t in summary["targets"]}
    assert by_id["tests-gpu"]["note"] == "every test was skipped (no CUDA device)"
    assert by_id["step-overhead"]["status"] in (targets.MET, targets.MISSED)
    printed = capsys.readouterr().out
    assert "GPU suite (dry run)" in printed and f"archive: {archive}" in printed
    with tarfile.open(archive) as tar:
        assert any(n.endswith("tests/gpu/junit.xml") for n in tar.getnames())
    # A second call finds everything done and runs nothing.
    before = {p: p.stat().st_mtime for p in out.glob("*/*/status.json")}
    assert bench_main(["gpu-suite", "--dry-run", "--out", str(out)]) == 0
    assert before == {p: p.stat().st_mtime for p in out.glob("*/*/status.json")}


def test_suite_refuses_to_run_without_cuda(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit, match="--dry-run"):
        bench_main(["gpu-suite", "--out", str(tmp_path)])
    assert bench_main(["gpu-suite", "--out", str(tmp_path), "--list"]) == 0

