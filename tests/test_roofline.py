"""The roofline of the benchmark rows: the lower bound by hand, the device table, the
first design's model against the bound and against the launches the loss really makes,
the hook for the kernels' own model, and the roofline columns of mipic-bench."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mipic_kernels as mk
from benchmarks import catalog, design_v1, roofline
from benchmarks.catalog import Preset
from benchmarks.measure import Budget
from benchmarks.roofline import Problem, Traffic
from benchmarks.run import run_workload
from benchmarks.workload import make_workload, sequence_lengths
from tests.host_sync import _origin

H100 = roofline.device_spec("NVIDIA H100 80GB HBM3")


def _tiny(kernel: str = "linear", dtype: torch.dtype = torch.bfloat16) -> Problem:
    # Counts: example 0 (10 real tokens) takes 5 and 10, example 1 (4 real) 2 and 4.
    return Problem(tokens=10, depth=6, lengths=(10, 4), dims=(2, 6), k=(0.5, 1.0), k_min=2, dtype=dtype,
                   kernel=kernel)


def test_lower_bound_by_hand() -> None:
    p = _tiny()
    assert p.counts == ((5, 10), (2, 4)) and p.edge == 10 and p.itemsize == 2
    entries = 25 + 100 + 4 + 16
    forward = roofline.lower_bound(p, "forward")
    # Real tokens for the score + the widest selections, at 6 bf16 features; mask in, values out.
    assert forward.bytes == 14 * 12 + 14 * 12 + 2 * 10 + 4 * 4
    assert forward.flops_tc == 10 * 11 * 6 + 4 * 5 * 6  # one symmetric Gram per example
    assert forward.flops_fma == 2 * 14 * 6 + 8 * entries
    backward = roofline.lower_bound(p, "backward")
    # Selected rows (and positions) in, the dense gradient out, the upstream gradient in.
    assert backward.bytes == 14 * (12 + 4) + 2 * 10 * 6 * 2 + 4 * 4
    assert backward.flops_tc == 2 * 100 * 6 + 2 * 16 * 6
    assert backward.flops_fma == 12 * entries
    assert roofline.lower_bound(p, "no-grad") == forward
    assert roofline.lower_bound(p, "full") == forward + backward
    with pytest.raises(ValueError, match="mode"):
        roofline.lower_bound(p, "sideways")


def test_lower_bound_grows_with_the_rbf_kernel_and_the_dtype() -> None:
    linear, rbf = roofline.lower_bound(_tiny(), "full"), roofline.lower_bound(_tiny("rbf"), "full")
    assert rbf.bytes == linear.bytes and rbf.flops_fma > linear.flops_fma
    wide = roofline.lower_bound(_tiny(dtype=torch.float32), "full")
    assert wide.bytes > linear.bytes and wide.flops_tc == linear.flops_tc


@pytest.mark.parametrize("name, entry", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"), ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
    ("cpu (AMD EPYC, 1 thread)", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_device_table_is_keyed_on_torch_device_names(name: str, entry) -> None:
    spec = roofline.device_spec(name)
    assert (spec and spec.name) == entry


def test_limit_is_the_slowest_unit_at_the_peaks() -> None:
    assert roofline.limit_ms(Traffic(bytes=3.35e9), H100, torch.bfloat16) == pytest.approx((1.0, "memory"))
    assert roofline.limit_ms(Traffic(bytes=3.0e9), H100, torch.bfloat16, measured=True)[0] == pytest.approx(1.0)
    ms, bound = roofline.limit_ms(Traffic(bytes=1e6, flops_tc=989.4e9), H100, torch.bfloat16)
    assert (ms, bound) == (pytest.approx(1.0), "matrix")
    # float32 inputs keep their accuracy with three tf32 products.
    assert roofline.limit_ms(Traffic(flops_tc=494.7e9), H100, torch.float32)[0] == pytest.approx(3.0)
    assert roofline.limit_ms(Traffic(flops_fma=66.9e9), H100, torch.bfloat16) == pytest.approx((1.0, "fma"))
    # A design's floor is at least its launches.
    assert roofline.predicted_ms(Traffic(launches=100), H100, torch.bfloat16) == pytest.approx(
        100 * roofline.LAUNCH_US / 1e3)


def test_preset_problem_has_the_lengths_of_the_workload(gen) -> None:
    preset = catalog.PRESETS["small"]
    shape = preset.shapes()[0]
    seed = int(torch.randint(2**31, (1,), generator=gen))
    w = make_workload(preset, shape, dtype=torch.float32, device=torch.device("cpu"), seed=seed)
    from_preset = roofline.preset_problem(preset, shape, dtype=torch.float32, kernel="linear", seed=seed)
    assert from_preset == roofline.workload_problem(w, "linear")
    assert w.mask[0].sum(-1).tolist() == sequence_lengths(preset, shape, seed)


@pytest.mark.parametrize("preset_name", catalog.default_presets(on_gpu=True))
@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_first_design_moves_at_least_the_lower_bound(preset_name: str, kernel: str) -> None:
    preset = catalog.PRESETS[preset_name]
    for shape in preset.shapes():
        problem = roofline.preset_problem(preset, shape, dtype=torch.bfloat16, kernel=kernel)
        for mode in catalog.MODES:
            bound = roofline.lower_bound(problem, mode)
            work = roofline.design_traffic(design_v1.design_traffic, problem, mode)
            assert work.bytes > bound.bytes
            assert work.flops_tc + work.flops_fma >= bound.flops_tc + bound.flops_fma
            assert roofline.predicted_ms(work, H100, torch.bfloat16) > roofline.limit_ms(bound, H100,
                                                                                         torch.bfloat16)[0]


class _Launches(TorchDispatchMode):
    """Count what would be kernel launches on a GPU: torch operations that compute
    (not views, allocations or copies onto themselves) and Triton launches."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "mipic_kernels":  # run the custom op's body under this mode
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        name = func.overloadpacket.__name__
        onto_itself = name == "copy_" and args[0].data_ptr() == args[1].data_ptr() \
            and args[0].stride() == args[1].stride()
        allocation = name in ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")
        if not (func.is_view or allocation or onto_itself or _origin()[0] == "triton"):
            self.count += 1
        return func(*args, **kwargs)


@pytest.mark.skipif(roofline.current_design_model() is not None,
                    reason="the kernels provide their own model: design_v1 describes the first kernels")
@pytest.mark.parametrize("k, kernel", [((0.2, 0.5, 0.9), "linear"), (6, "rbf")], ids=["fractions", "count-rbf"])
def test_first_design_launches_are_what_the_loss_launches(gen, monkeypatch, k, kernel: str) -> None:
    if not mk.fused.can_run(torch.empty(1)):
        pytest.skip("needs Triton's interpreter")
    from triton.runtime import interpreter

    preset = Preset("p", "test", layers=2, batches=(3,), tokens=(21,), depth=24, dims=(5, 11, 17), k=k, k_min=3)
    shape = preset.shapes()[0]
    w = make_workload(preset, shape, dtype=torch.bfloat16, device=torch.device("cpu"),
                      seed=int(torch.randint(2**31, (1,), generator=gen)))
    loss = mk.NestedCKALoss(preset.dims, kernel=kernel, backend="triton", **preset.loss_options())
    loss(w.x, scores="cls", mask=w.mask).backward()  # first call: uploads the column bounds
    w.x.grad = None
    counter = _Launches()
    run = interpreter.GridExecutor.__call__

    def counted(self, *args, **kwargs):
        counter.count += 1
        return run(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.GridExecutor, "__call__", counted)
    with counter:
        value = loss(w.x, scores="cls", mask=w.mask)
    forward, counter.count = counter.count, 0
    with counter:
        value.backward()
    problem = roofline.workload_problem(w, kernel)
    assert forward == roofline.design_traffic(design_v1.design_traffic, problem, "forward").launches
    assert counter.count == roofline.design_traffic(design_v1.design_traffic, problem, "backward").launches


def test_the_kernels_model_is_used_and_checked_when_present(monkeypatch) -> None:
    calls = []

    def design_traffic(*, tokens, depth, lengths, dims, k, k_min, dtype, mode, kernel):
        calls.append((tokens, depth, len(lengths), dims, k, k_min, dtype, mode, kernel))
        return types.SimpleNamespace(bytes=1e9, flops_tc=2e9, flops_fma=3e9, launches=7)

    module = types.ModuleType(roofline.DESIGN_MODULE)
    module.design_traffic = design_traffic
    monkeypatch.setitem(sys.modules, roofline.DESIGN_MODULE, module)
    model = roofline.current_design_model()
    assert model is design_traffic
    p = _tiny()
    assert roofline.design_traffic(model, p, "full") == Traffic(1e9, 2e9, 3e9, 7)
    assert calls == [(10, 6, 2, (2, 6), (0.5, 1.0), 2, torch.bfloat16, "full", "linear")]
    assert "current" in roofline.table(["small"], ["full"], spec=H100, dtype_name="bf16", kernel="linear")

    module.design_traffic = lambda **kw: types.SimpleNamespace(bytes=-1.0, flops_tc=0, flops_fma=0, launches=1)
    with pytest.raises(TypeError, match="bytes, flops_tc, flops_fma and launches"):
        roofline.design_traffic(roofline.current_design_model(), p, "full")
    del module.design_traffic
    with pytest.raises(TypeError, match="design_traffic"):
        roofline.current_design_model()


def test_roofline_command_prints_every_preset_row(capsys) -> None:
    from benchmarks.run import main

    assert main(["roofline", "--preset", "bert-base", "large", "--mode", "full", "no-grad"]) == 0
    out = capsys.readouterr().out
    assert "H100 SXM" in out and "v1 MB" in out
    lines = [line for line in out.splitlines() if line.startswith(("bert-base ", "large "))]
    assert len(lines) == 2 * (len(catalog.PRESETS["bert-base"].shapes()) + 1)
    with pytest.raises(SystemExit, match="no peak rates"):
        main(["roofline", "--device-name", "a toaster"])


def test_rows_carry_the_roofline_of_their_device() -> None:
    preset = Preset("wide", "test", layers=1, batches=(2,), tokens=(16,), depth=64, dims=(16, 32), k=8, k_min=8,
                    bandwidth_bound=True)
    w = make_workload(preset, preset.shapes()[0], dtype=torch.float32, device=torch.device("cpu"))
    rows = run_workload(w, ["torch"], ["full", "no-grad"], kernel="linear", warmup=1,
                        budget=Budget(min_calls=2, seconds=0.05, min_seconds=0), cores=2, threads=1,
                        roofline_device=H100)
    problem = roofline.workload_problem(w, "linear")
    want = {"copy": roofline.copy_traffic(w.x.nbytes)}
    for row in rows:
        work = want.get(row["provider"]) or roofline.lower_bound(problem, row["mode"])
        ms, bound = roofline.limit_ms(work, H100, torch.float32)
        assert float(row["roofline_ms"]) == pytest.approx(ms, rel=1e-3) and row["roofline_bound"] == bound
        # p50_ms is written to 4 decimals: the percentage was taken before that rounding.
        p50 = float(row["p50_ms"])
        assert 100 * ms / (p50 + 5e-5) * 0.999 <= float(row["roofline_pct"]) <= 100 * ms / (p50 - 5e-5) * 1.001
    assert [r["provider"] for r in rows] == ["copy", "torch", "torch"]
