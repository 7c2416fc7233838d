"""The benchmark suite: an honest naive baseline, the providers at the small preset
(pytest-benchmark; a single call under the default ``--benchmark-disable``) and the
``mipic-bench`` command line end to end."""

from __future__ import annotations

import datetime

import pytest
import torch

import mipic_kernels
from benchmarks import records
from benchmarks.measure import MODES, mode_case, quantiles
from benchmarks.presets import PRESETS, Preset, Workload, make_workload
from benchmarks.providers import PROVIDERS, naive_nested_cka
from benchmarks.run import main, run_workload

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
             "--device", "cpu", "--dtype", "fp32", "--quick", "--repeats", "2"]


def test_cli_appends_rows_in_the_one_schema(tmp_path, capsys) -> None:
    csv_path = tmp_path / "results.csv"
    assert main([*_CLI_ARGS, "--csv", str(csv_path)]) == 0
    out = capsys.readouterr().out
    rows = records.read_rows(csv_path)  # raises unless the header is SCHEMA
    assert sorted((r["provider"], r["mode"]) for r in rows) == [
        ("naive", "forward"), ("naive", "full"), ("torch", "forward"), ("torch", "full")]
    for row in rows:
        assert set(row) == set(records.SCHEMA) and all(row[k] for k in records.SCHEMA)
        p20, p50, p80 = (float(row[k]) for k in ("p20_ms", "p50_ms", "p80_ms"))
        assert 0 < p20 <= p50 <= p80
        assert float(row["peak_mib"]) > 0
        assert row["device"].startswith("cpu (") and row["dtype"] == "fp32"
        assert row["preset"] == "small" and row["shape"] == "L2xB4xT32xD64"
        assert row["torch"] == torch.__version__ and row["timer"] == "perf_counter x2"
        datetime.datetime.strptime(row["date"], "%Y-%m-%dT%H:%M:%SZ")
    # The triton row is reported as skipped, never written.
    assert "triton" in out and "needs a CUDA GPU" in out
    assert main([*_CLI_ARGS, "--csv", str(csv_path)]) == 0
    assert len(records.read_rows(csv_path)) == 2 * len(rows)


def test_bandwidth_bound_preset_adds_a_copy_row(capsys) -> None:
    preset = Preset("wide", "test", layers=1, batches=(2,), tokens=(16,), depth=64,
                    dims=(16, 32), k=8, k_min=8, bandwidth_bound=True)
    w = make_workload(preset, preset.shapes()[0], dtype=torch.float32, device=CPU)
    rows = run_workload(w, ["torch"], ["no-grad"], kernel="linear", warmup=1, repeats=2)
    assert [(r["provider"], r["mode"]) for r in rows] == [("copy", "forward"), ("torch", "no-grad")]
    assert "GB/s" in capsys.readouterr().out


def test_cli_refuses_a_csv_with_another_header(tmp_path) -> None:
    csv_path = tmp_path / "other.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        main([*_CLI_ARGS, "--mode", "no-grad", "--csv", str(csv_path)])


@pytest.mark.parametrize(
    "args, named",
    [(["--device", "tpu9"], "--device"), (["--dtype", "int8"], "--dtype"), (["--repeats", "0"], "--repeats")],
)
def test_cli_rejects_bad_options_naming_them(args: list, named: str) -> None:
    with pytest.raises(SystemExit, match=named):
        main([*args, "--no-csv"])


def test_plot_writes_one_png_per_preset(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from benchmarks.plot import plot_csv

    csv_path = tmp_path / "results.csv"
    assert main([*_CLI_ARGS, "--provider", "torch", "--csv", str(csv_path)]) == 0
    paths = plot_csv(csv_path, tmp_path / "plots")
    assert len(paths) == 1 and paths[0].name.startswith("small_cpu")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_on_cuda_times_torch_and_reports_triton(tmp_path) -> None:
    csv_path = tmp_path / "results.csv"
    args = ["--preset", "small", "--provider", "torch", "triton", "--device", "cuda", "--quick",
            "--csv", str(csv_path)]
    assert main(args) == 0
    rows = records.read_rows(csv_path)
    assert {r["provider"] for r in rows} >= {"torch"} and all(r["timer"].startswith("cuda") for r in rows)
    assert all(r["dtype"] == "bf16" for r in rows)
