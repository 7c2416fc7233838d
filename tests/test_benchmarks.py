"""The benchmark suite: an honest naive baseline, the providers at the small preset
(pytest-benchmark; a single call under the default ``--benchmark-disable``), the
timing budget, the flags, and the ``mipic-bench`` command line end to end."""

from __future__ import annotations

import datetime
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mipic_kernels
from benchmarks import catalog, flags, records
from benchmarks.catalog import MODES, PRESETS, Preset
from benchmarks.measure import Budget, mode_case, median_ci_half_width, quantiles
from benchmarks.providers import PROVIDERS, naive_nested_cka
from benchmarks.run import main, run_workload
from benchmarks.workload import Workload, make_workload

REPO = Path(__file__).resolve().parents[1]

CPU = torch.device("cpu")
CPU_PROVIDERS = ("naive", "torch", "torch.compile")

# Awkward sizes: nothing a power of two, widths that split no block evenly, one
# count given as an int and sequences down to a handful of tokens.
ODD = Preset(
    "odd", "test shapes", layers=3, batches=(5,), tokens=(41,), depth=37,
    dims=(3, 10, 17, 30), k=(0.2, 0.35, 0.5, 0.9), k_min=4,
)
ODD_INT_K = Preset(
    "odd-int-k", "test shapes", layers=2, batches=(3,), tokens=(23,), depth=19,
    dims=(5, 11), k=7, k_min=2,
)


def _seed(gen: torch.Generator) -> int:
    return int(torch.randint(2**31, (1,), generator=gen))


def _odd_workload(preset: Preset, seed: int) -> Workload:
    return make_workload(preset, preset.shapes()[0], dtype=torch.float64, device=CPU, seed=seed)


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
@pytest.mark.parametrize("preset", [ODD, ODD_INT_K], ids=lambda p: p.name)
def test_naive_matches_reference_values_and_gradients(gen, preset: Preset, kernel: str) -> None:
    w = _odd_workload(preset, _seed(gen))
    naive = naive_nested_cka(w.x, w.mask, preset.dims, preset.k, preset.k_min, kernel=kernel)
    ref = mipic_kernels.nested_cka(
        w.x, preset.dims, scores="cls", mask=w.mask, kernel=kernel, backend="torch",
        **preset.loss_options(),
    )
    assert naive.shape == ref.shape == (*w.x.shape[:2], len(preset.dims))
    # float64 on both sides, a few hundred operations deep: agreement to ~1e-12.
    torch.testing.assert_close(naive, ref, rtol=1e-10, atol=1e-12)

    grads = []
    for name in ("naive", "torch"):
        w.x.grad = None
        PROVIDERS[name].build(w, kernel)(w.x, w.mask).backward()
        grads.append(w.x.grad)
    scale = grads[1].abs().max()
    assert scale > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-10 * float(scale))


def test_naive_loss_is_sum_over_widths_of_mean_gap(gen) -> None:
    w = _odd_workload(ODD, _seed(gen))
    values = naive_nested_cka(w.x, w.mask, ODD.dims, ODD.k, ODD.k_min).detach()
    expected = sum(float((1 - values[..., i]).mean()) for i in range(len(ODD.dims)))
    got = PROVIDERS["naive"].build(w, "linear")(w.x, w.mask)
    assert got.shape == () and abs(float(got.detach()) - expected) < 1e-12


def test_workload_mask_has_varying_real_lengths(gen) -> None:
    preset = PRESETS["bert-base-cpu"]
    shape = preset.shapes()[0]
    w = make_workload(preset, shape, dtype=torch.float32, device=CPU, seed=_seed(gen))
    lengths = w.mask.sum(-1)
    assert w.x.shape == (shape.layers, shape.batch, shape.tokens, shape.depth) and w.x.requires_grad
    assert (lengths == lengths[:1]).all(), "every layer sees the same sequences"
    assert int(lengths[0, 0]) == shape.tokens
    assert int(lengths.min()) >= max(preset.k_min, shape.tokens // 4)
    # Real tokens form a prefix of each row.
    assert torch.equal(w.mask, torch.arange(shape.tokens) < lengths[..., None])


def test_naive_is_skipped_on_cpu_for_gpu_sized_shapes() -> None:
    preset = PRESETS["bert-base"]
    stub = Workload(preset, preset.shapes()[-1], torch.empty(0), torch.empty(0, dtype=torch.bool))
    assert "small shapes" in PROVIDERS["naive"].skip_reason(stub)
    small = PRESETS["small"]
    w = make_workload(small, small.shapes()[0], dtype=torch.float32, device=CPU)
    assert PROVIDERS["naive"].skip_reason(w) is None


def test_quantiles_interpolate_like_numpy() -> None:
    assert quantiles([5.0, 1.0, 3.0, 2.0, 4.0, 6.0]) == pytest.approx((2.0, 3.5, 5.0))
    assert quantiles([7.0]) == (7.0, 7.0, 7.0)


_SMALL_LOSSES: dict[str, tuple] = {}


def _small_loss(provider: str) -> tuple:
    # Built once per provider: torch.compile pays its compilation a single time.
    if provider not in _SMALL_LOSSES:
        preset = PRESETS["small"]
        w = make_workload(preset, preset.shapes()[0], dtype=torch.float32, device=CPU)
        _SMALL_LOSSES[provider] = (w, PROVIDERS[provider].build(w, "linear"))
    return _SMALL_LOSSES[provider]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "provider",
    [pytest.param(p, marks=pytest.mark.slow) if p == "torch.compile" else p for p in CPU_PROVIDERS],
)
def test_benchmark_small_preset(benchmark, provider: str, mode: str) -> None:
    w, loss = _small_loss(provider)
    case = mode_case(loss, w, mode)

    def prepare() -> None:  # untimed, before every round
        w.x.grad = None
        if case.setup is not None:
            case.setup()

    benchmark.pedantic(case.call, setup=prepare, rounds=20, warmup_rounds=2)
    has_grad = mode in ("backward", "full")
    assert (w.x.grad is not None) == has_grad
    if has_grad:
        assert bool(torch.isfinite(w.x.grad).all()) and float(w.x.grad.abs().sum()) > 0


_CLI_ARGS = ["--preset", "small", "--provider", "torch", "naive", "triton", "--mode", "forward", "full",
             "--device", "cpu", "--dtype", "fp32", "--quick", "--min-calls", "2", "--budget", "0.05"]
_PNG = b"\x89PNG\r\n\x1a\n"


def test_cli_writes_rows_in_the_one_schema_and_figures(tmp_path, capsys) -> None:
    out = tmp_path / "results"
    assert main([*_CLI_ARGS, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = records.read_rows(out / records.CSV_NAME)  # raises unless the header is SCHEMA
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("naive", "forward"), ("naive", "full"), ("torch", "forward"), ("torch", "full")]
    # Empty where unknown or clean; a CPU has no roofline.
    optional = {"load_before", "load_after", "others_cores", "flags", "roofline_ms", "roofline_pct",
                "roofline_bound"}
    for row in rows:
        assert set(row) == set(records.SCHEMA) and all(row[k] for k in set(records.SCHEMA) - optional)
        p20, p50, p80 = (float(row[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))
        assert 0 < p20 <= p50 <= p80
        assert float(row["peak_mib"]) > 0 and float(row["p50_ci_pct"]) >= 0
        assert row["device"].startswith("cpu (") and row["dtype"] == "fp32"
        assert row["preset"] == "small" and row["shape"] == "L2xB4xT32xD64"
        assert row["torch"] == torch.__version__ and row["timer"].startswith("perf_counter x")
        assert int(row["timer"].split("x")[-1]) >= 2
        assert set(filter(None, row["flags"].split(";"))) <= set(flags.LEGEND)
        datetime.datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ")
    # The triton row is reported as skipped, never written.
    assert "triton" in printed and "needs a CUDA GPU" in printed
    assert f"results: {out}" in printed
    pngs = sorted(out.glob("*.png"))
    assert [p.name.split("_")[0] for p in pngs] == ["small"] and pngs[0].read_bytes()[:8] == _PNG
    # A second run into the same folder appends.
    assert main([*_CLI_ARGS, "--out", str(out)]) == 0
    assert len(records.read_rows(out / records.CSV_NAME)) == 2 * len(rows)


def test_default_output_is_a_new_folder_outside_the_checkout(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    before = _git_status()
    for _ in range(2):
        assert main([*_CLI_ARGS, "--provider", "torch", "--mode", "no-grad"]) == 0
    runs = sorted((tmp_path / "cache" / "mipic-bench").iterdir())
    assert len(runs) == 2 and all(len(records.read_rows(r / records.CSV_NAME)) == 1 for r in runs)
    assert f"results: {runs[-1]}" in capsys.readouterr().out
    assert records.latest_run() == runs[-1]
    assert _git_status() == before  # the quickstart leaves the checkout as it was


def _git_status() -> str:
    try:
        done = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                              capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return done.stdout


def test_bandwidth_bound_preset_adds_a_copy_row(capsys) -> None:
    preset = Preset("wide", "test", layers=1, batches=(2,), tokens=(16,), depth=64,
                    dims=(16, 32), k=8, k_min=8, bandwidth_bound=True)
    w = make_workload(preset, preset.shapes()[0], dtype=torch.float32, device=CPU)
    rows = run_workload(w, ["torch"], ["no-grad"], kernel="linear", warmup=1,
                        budget=Budget(min_calls=2, seconds=0.05, min_seconds=0), cores=2, threads=1)
    assert [(r["provider"], r["mode"]) for r in rows] == [("copy", "forward"), ("torch", "no-grad")]
    assert "GB/s" in capsys.readouterr().out


def test_cli_refuses_a_csv_with_another_header(tmp_path) -> None:
    (tmp_path / records.CSV_NAME).write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        main([*_CLI_ARGS, "--mode", "no-grad", "--out", str(tmp_path)])


def test_a_csv_from_before_the_last_columns_is_read_and_upgraded(tmp_path) -> None:
    older = records.SCHEMA[:-3]
    path = tmp_path / records.CSV_NAME
    path.write_text(",".join(older) + "\n" + ",".join(f"v{i}" for i in range(len(older))) + "\n")
    (row,) = records.read_rows(path)
    assert row["roofline_pct"] == "" and row["flags"] == f"v{len(older) - 1}"
    records.append_rows(path, [dict.fromkeys(records.SCHEMA, "x")])
    assert path.read_text().splitlines()[0] == ",".join(records.SCHEMA)
    assert [r["roofline_pct"] for r in records.read_rows(path)] == ["", "x"]


@pytest.mark.parametrize(
    "args, named",
    [(["--device", "tpu9"], "--device"), (["--dtype", "int8"], "--dtype"), (["--budget", "0"], "--budget"),
     (["--min-calls", "-1"], "--min-calls"), (["--preset", "nope"], "--preset")],
)
def test_cli_rejects_bad_options_naming_them(args: list, named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--no-save"])
    assert exit_info.value.code == 2 and f"argument {named}" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["--dtype", "int8"], ["plot", "--help"]],
                         ids=["help", "bad-argument", "plot-help"])
def test_help_and_argument_errors_answer_before_torch_loads(args: list) -> None:
    # torch takes seconds to import: the command line must not need it to answer these.
    code = ("import sys\nfrom benchmarks.run import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit as done:\n    print('exit', done.code)\n"
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported')")
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert done.stdout.splitlines()[-1] == "torch not imported", done.stderr
    assert ("exit 0" if "--help" in args else "exit 2") in done.stdout
    assert "usage: mipic-bench" in done.stdout + done.stderr


def test_plot_redraws_a_results_folder(tmp_path, capsys) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plot import main as plot_main

    assert main([*_CLI_ARGS, "--provider", "torch", "--out", str(tmp_path)]) == 0
    for png in tmp_path.glob("*.png"):
        png.unlink()
    assert plot_main(["--out", str(tmp_path)]) == 0
    pngs = list(tmp_path.glob("*.png"))
    assert len(pngs) == 1 and pngs[0].name.startswith("small_cpu") and pngs[0].read_bytes()[:8] == _PNG
    with pytest.raises(SystemExit, match="no results at"):
        plot_main(["--out", str(tmp_path / "empty")])


def test_every_catalog_provider_has_an_implementation() -> None:
    assert list(PROVIDERS) == list(catalog.PROVIDERS)


def test_budget_stops_when_stable_or_out_of_time() -> None:
    budget = Budget(min_calls=10, max_calls=50, seconds=3.0, min_seconds=0.5, target=0.03)
    steady = [10.0 + 0.01 * (i % 3) for i in range(10)]
    assert budget.stable(steady) and budget.done(steady, elapsed_s=0.6)
    assert not budget.done(steady[:9], elapsed_s=0.6), "fewer calls than min_calls"
    assert not budget.done(steady, elapsed_s=0.1), "shorter than min_seconds"
    noisy = [10.0, 30.0] * 10
    assert not budget.stable(noisy) and not budget.done(noisy, elapsed_s=1.0)
    assert budget.done(noisy[:5], elapsed_s=3.1), "out of time after the floor of 5 calls"
    assert not budget.done(noisy[:4], elapsed_s=3.1)
    assert budget.done([10.0, 30.0] * 25, elapsed_s=0.1), "max_calls"
    with pytest.raises(ValueError):
        Budget(min_calls=0)


@pytest.mark.parametrize("n", [6, 7, 10, 20, 37, 100, 1000])
def test_median_interval_is_the_narrowest_with_95_percent_coverage(n: int) -> None:
    from scipy.stats import binom

    from benchmarks.measure import _median_ci_rank

    r = _median_ci_rank(n)
    # [x_(r), x_(n+1-r)] misses the median when at most r - 1 times fall below it, or above.
    assert 1 - 2 * binom.cdf(r - 1, n, 0.5) >= 0.95
    assert 1 - 2 * binom.cdf(r, n, 0.5) < 0.95


def test_median_interval_half_width() -> None:
    times = [float(t) for t in range(1, 11)]  # n = 10: r = 2, so [2, 9] around the median 5.5
    assert median_ci_half_width(times) == pytest.approx((9 - 2) / 2 / 5.5)
    assert median_ci_half_width([3.0, 1.0, 2.0]) == pytest.approx((3 - 1) / 2 / 2)  # whole sample
    assert median_ci_half_width([5.0]) == math.inf


def test_row_flags() -> None:
    quiet = dict(p20=1.0, p80=1.2, stable=True, others_cores=0.1, cores=2, threads=2)
    assert flags.row_flags(**quiet) == []
    assert flags.row_flags(**{**quiet, "stable": False}) == ["unstable"]
    assert flags.row_flags(**{**quiet, "p80": 1.6}) == ["spread"]
    assert flags.row_flags(**{**quiet, "others_cores": 0.6}) == ["busy"]
    # One thread on two cores leaves a core free for others.
    assert flags.row_flags(**{**quiet, "others_cores": 0.6, "threads": 1}) == []
    assert flags.row_flags(**{**quiet, "others_cores": None}) == []


def test_order_violations_flag_a_part_slower_than_the_whole() -> None:
    assert flags.order_violations({"forward": 10.0, "backward": 5.0, "full": 15.0, "no-grad": 8.0}) == []
    # The case: eager forward p50 778 ms, forward + backward 331 ms.
    assert flags.order_violations({"forward": 778.0, "full": 331.0}) == [("forward", "full")]
    assert flags.order_violations({"no-grad": 30.0, "forward": 20.0}) == [("no-grad", "forward")]



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_on_cuda_times_torch_and_reports_triton(tmp_path) -> None:
    args = ["--preset", "small", "--provider", "torch", "triton", "--device", "cuda", "--quick",
            "--out", str(tmp_path)]
    assert main(args) == 0
    rows = records.read_rows(tmp_path / records.CSV_NAME)
    assert {r["provider"] for r in rows} >= {"torch"} and all(r["timer"].startswith("cuda") for r in rows)
    assert all(r["dtype"] == "bf16" for r in rows)
