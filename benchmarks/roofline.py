"""How far each benchmark row is from the physical limit of its device.

For one call of the benchmarked loss (``NestedCKALoss(dims, k=..., k_min=...,
detach_full=True)(x, scores="cls", mask=mask)``, see :mod:`benchmarks.catalog`) in one
mode, this module gives:

* :func:`lower_bound`: the least work any implementation must do (:class:`Traffic`:
  device-memory bytes, matrix-unit FLOPs, FMA-unit FLOPs). The forward reads every real
  token of ``x`` once at full width (the ``"cls"`` score needs all of it), reads the
  ``k_max`` selected rows of each example once more for the Grams (the ranking must be
  complete before any row is known to be selected, and one example's real tokens do not
  fit on chip), reads the mask and writes the values; its FLOPs are one symmetric Gram of
  the selected rows at full width (every prefix Gram is a partial sum on the way, so it
  costs nothing more), the score and the per-entry statistics. The backward reads the
  selected rows once and writes the whole gradient of ``x`` once (autograd hands back a
  dense ``(B, T, D)`` tensor: the rows that were not selected are zeros that still have
  to be written); its FLOPs are the products ``coefficient x rows`` over the trained
  prefix columns. The ``k x k`` state between the passes is taken as free (kept on
  chip, or rebuilt at tensor-core speed), so this is a true lower bound. Statistic FLOPs
  per entry of each width's ``k_i x k_i`` block are rough (8 linear, 20 RBF, 12 and 24
  in the backward); they are far from the binding term.
* :func:`limit_ms`: that work at the device's datasheet peaks (:data:`DEVICES`, keyed on
  the name torch reports): ``max(bytes / bandwidth, matrix FLOPs / matrix rate, FMA
  FLOPs / FMA rate)``. Matrix FLOPs run at the dense bf16/fp16 tensor-core rate for
  half-precision inputs, at a third of the tf32 rate for float32 (three tf32 products
  keep float32 accuracy) and at the fp64 tensor-core rate for float64.
* the work of a design of the fused kernels, from a model of it with the signature of
  :func:`benchmarks.design_v1.design_traffic`: the first backend's
  (:mod:`benchmarks.design_v1`, read off its kernels) and, when the kernels provide one,
  the current backend's own model (:func:`current_design_model`).

Every row of ``mipic-bench`` gets ``roofline_ms`` (the limit of its preset, shape, mode,
dtype and kernel on its device; the same for every provider) and ``roofline_pct``
(``100 * roofline_ms / p50``); a ``copy`` row's limit is its own bytes (``x`` read and
written) over the bandwidth. Devices missing from :data:`DEVICES` (and CPUs) get no
roofline. ``mipic-bench roofline`` (or ``python -m benchmarks.roofline``) prints the
bound and the designs' predictions for every preset without running anything.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from . import catalog

if TYPE_CHECKING:
    import torch

    from .catalog import Preset, Shape
    from .workload import Workload

# The module and function where the fused backend may describe its own traffic, with
# the signature of benchmarks.design_v1.design_traffic.
DESIGN_MODULE = "mipic_kernels.fused.traffic"
DESIGN_FUNCTION = "design_traffic"

# Host time to launch one kernel from Python in eager mode (a torch operation or a
# Triton launch), an assumed round figure: designs with many launches have this floor
# per launch unless a CUDA graph replays them.
LAUNCH_US = 5.0

# Rough FMA-unit FLOPs per entry of a width's k x k block (see the module docstring).
_STATS_FLOPS = {"linear": 8, "rbf": 20}
_COEF_FLOPS = {"linear": 12, "rbf": 24}


@dataclass(frozen=True)
class Traffic:
    """The work of one call: device-memory bytes moved, FLOPs on the matrix units
    (tensor cores), FLOPs on the FMA units, and kernel launches."""

    bytes: float = 0.0
    flops_tc: float = 0.0
    flops_fma: float = 0.0
    launches: int = 0

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.bytes + other.bytes, self.flops_tc + other.flops_tc,
                       self.flops_fma + other.flops_fma, self.launches + other.launches)

    @classmethod
    def of(cls, result: object, source: str) -> "Traffic":
        """A :class:`Traffic` from any object with the four attributes (a design model's
        return value), checked: each must be a finite number >= 0."""
        values = {}
        for name in ("bytes", "flops_tc", "flops_fma", "launches"):
            value = getattr(result, name, None)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value < 0:
                raise TypeError(f"{source} must return an object with bytes, flops_tc, flops_fma and "
                                f"launches (finite numbers >= 0); got {name}={value!r}")
            values[name] = value
        return cls(float(values["bytes"]), float(values["flops_tc"]), float(values["flops_fma"]),
                   int(values["launches"]))


@dataclass(frozen=True)
class Problem:
    """One call of the benchmarked loss, leading dims flattened: ``x (B, T, D)`` of
    ``dtype`` with ``lengths[b]`` real tokens in example ``b``."""

    tokens: int
    depth: int
    lengths: tuple[int, ...]
    dims: tuple[int, ...]
    k: object
    k_min: int
    dtype: "torch.dtype"
    kernel: str = "linear"
    counts: tuple[tuple[int, ...], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        import torch

        from mipic_kernels import selection

        lengths = torch.tensor(self.lengths, dtype=torch.int64)
        counts = selection.resolve_k(self.k, self.k_min, lengths, len(self.dims))
        object.__setattr__(self, "counts", tuple(tuple(row) for row in counts.tolist()))

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def itemsize(self) -> int:
        import torch

        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def edge(self) -> int:
        """The Gram edge both backends size their ``k x k`` buffers by."""
        from mipic_kernels import selection

        return selection.gram_edge(self.k, self.k_min, self.tokens)

    def design_arguments(self) -> dict:
        """Keyword arguments of a design model (:func:`benchmarks.design_v1.design_traffic`)."""
        return dict(tokens=self.tokens, depth=self.depth, lengths=self.lengths, dims=self.dims, k=self.k,
                    k_min=self.k_min, dtype=self.dtype, kernel=self.kernel)


def preset_problem(preset: "Preset", shape: "Shape", *, dtype: "torch.dtype", kernel: str,
                   seed: int = 0) -> Problem:
    """The problem ``mipic-bench`` runs for ``preset`` at ``shape`` (the same sequence
    lengths as :func:`benchmarks.workload.make_workload` with ``seed``)."""
    from .workload import sequence_lengths

    lengths = tuple(sequence_lengths(preset, shape, seed)) * shape.layers
    return Problem(shape.tokens, shape.depth, lengths, preset.dims, _k_spec(preset), preset.k_min, dtype, kernel)


def workload_problem(workload: "Workload", kernel: str) -> Problem:
    """The problem of a benchmark workload, read off its mask."""
    x, preset = workload.x, workload.preset
    lengths = tuple(int(n) for n in workload.mask.reshape(-1, x.shape[-2]).sum(-1).tolist())
    return Problem(x.shape[-2], x.shape[-1], lengths, preset.dims, _k_spec(preset), preset.k_min, x.dtype, kernel)


def _k_spec(preset: "Preset") -> object:
    # A tuple rather than the loss's list, so that a Problem is hashable.
    return preset.k if isinstance(preset.k, int) else tuple(preset.k)


def lower_bound(problem: Problem, mode: str) -> Traffic:
    """The least work of one call in ``mode`` (see the module docstring)."""
    if mode not in catalog.MODES:
        raise ValueError(f"mode must be one of {catalog.MODES}; got {mode!r}")
    forward = _forward_bound(problem)
    backward = _backward_bound(problem)
    return {"forward": forward, "no-grad": forward, "backward": backward, "full": forward + backward}[mode]


def _forward_bound(p: Problem) -> Traffic:
    s, D = p.itemsize, p.depth
    widest = [max(row) for row in p.counts]
    read = sum(p.lengths) * D * s + sum(widest) * D * s
    small = p.batch * p.tokens + 4 * p.batch * len(p.dims)  # mask in, values out
    gram = sum(n * (n + 1) * D for n in widest)
    stats = _STATS_FLOPS[p.kernel] * sum(k * k for row in p.counts for k in row)
    score = 2 * sum(p.lengths) * D
    return Traffic(read + small, gram, score + stats, 0)


def _backward_bound(p: Problem) -> Traffic:
    s, D = p.itemsize, p.depth
    widest = [max(row) for row in p.counts]
    # Selected rows in (and their positions), the dense gradient out, the upstream gradient in.
    moved = sum(widest) * (D * s + 4) + p.batch * p.tokens * D * s + 4 * p.batch * len(p.dims)
    products = sum(2 * n * n * p.dims[-1] for n in widest)
    coef = _COEF_FLOPS[p.kernel] * sum(k * k for row in p.counts for k in row)
    return Traffic(moved, products, coef, 0)


def copy_traffic(nbytes: int) -> Traffic:
    """A copy of a tensor of ``nbytes``: read once, written once, one launch."""
    return Traffic(2.0 * nbytes, 0.0, 0.0, 1)


# ----------------------------------------------------------------------------- devices

@dataclass(frozen=True)
class DeviceSpec:
    """Datasheet peaks of one GPU (dense rates, no sparsity), and the device-to-device
    copy bandwidth measured on one such machine where known (bytes read + written)."""

    name: str
    match: tuple[str, ...]  # lower-case words that must all be in torch's device name
    hbm_tb_s: float
    tflops: dict  # "tc16" (bf16/fp16 tensor cores), "tf32", "fp32" (FMA), "fp64" (tensor cores)
    copy_tb_s: Optional[float] = None

    def bandwidth(self, measured: bool = False) -> float:
        """Bytes per second: the datasheet peak, or the measured copy bandwidth when
        ``measured`` and known."""
        return 1e12 * (self.copy_tb_s if measured and self.copy_tb_s else self.hbm_tb_s)

    def matrix_rate(self, dtype: "torch.dtype") -> float:
        """Matrix-unit FLOP/s for inputs of ``dtype`` at that dtype's accuracy."""
        import torch

        if dtype in (torch.bfloat16, torch.float16):
            return 1e12 * self.tflops["tc16"]
        if dtype == torch.float32:
            return 1e12 * self.tflops["tf32"] / 3
        return 1e12 * self.tflops["fp64"]

    def fma_rate(self, dtype: "torch.dtype") -> float:
        import torch

        return 1e12 * (self.tflops["fp64"] / 2 if dtype == torch.float64 else self.tflops["fp32"])


_H100_SXM = {"tc16": 989.4, "tf32": 494.7, "fp32": 66.9, "fp64": 66.9}
_H100_NVL = {"tc16": 835.5, "tf32": 417.5, "fp32": 60.0, "fp64": 60.0}
_A100 = {"tc16": 312.0, "tf32": 156.0, "fp32": 19.5, "fp64": 19.5}

# First match wins: the specific names before the general ones. Sources: NVIDIA's H100,
# H200 and A100 datasheets; the copy bandwidths were measured (a large device-to-device
# copy, bytes read + written) on an H100 80GB HBM3 (3.0 TB/s) and an H200 (4.3 TB/s).
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("H100 PCIe", ("h100", "pcie"), 2.0, {"tc16": 756.0, "tf32": 378.0, "fp32": 51.2, "fp64": 51.2}),
    DeviceSpec("H100 NVL", ("h100", "nvl"), 3.9, _H100_NVL),
    DeviceSpec("H100 SXM", ("h100",), 3.35, _H100_SXM, copy_tb_s=3.0),
    DeviceSpec("H200 NVL", ("h200", "nvl"), 4.8, _H100_NVL),
    DeviceSpec("H200 SXM", ("h200",), 4.8, _H100_SXM, copy_tb_s=4.3),
    DeviceSpec("A100 80GB", ("a100", "80gb"), 2.039, _A100),
    DeviceSpec("A100 40GB", ("a100",), 1.555, _A100),
)


def device_spec(name: str) -> Optional[DeviceSpec]:
    """The entry of :data:`DEVICES` for torch's device name (e.g. ``NVIDIA H100 80GB
    HBM3``), or None for devices not in the table (and CPUs)."""
    words = name.lower()
    return next((spec for spec in DEVICES if all(w in words for w in spec.match)), None)


def limit_ms(traffic: Traffic, spec: DeviceSpec, dtype: "torch.dtype", *, measured: bool = False
             ) -> tuple[float, str]:
    """(milliseconds, what binds) of ``traffic`` at ``spec``'s peaks; launches ignored.
    What binds is ``memory``, ``matrix`` or ``fma``."""
    times = {
        "memory": traffic.bytes / spec.bandwidth(measured),
        "matrix": traffic.flops_tc / spec.matrix_rate(dtype),
        "fma": traffic.flops_fma / spec.fma_rate(dtype),
    }
    bound = max(times, key=times.__getitem__)
    return 1e3 * times[bound], bound


def predicted_ms(traffic: Traffic, spec: DeviceSpec, dtype: "torch.dtype", *, measured: bool = False) -> float:
    """A design's floor: its work at the peaks, or its launches at :data:`LAUNCH_US`
    each, whichever is longer."""
    return max(limit_ms(traffic, spec, dtype, measured=measured)[0], 1e-3 * LAUNCH_US * traffic.launches)


# ----------------------------------------------------------------------------- designs

DesignModel = Callable[..., object]


def current_design_model() -> Optional[DesignModel]:
    """The fused backend's own traffic model (:data:`DESIGN_MODULE`), or None when the
    backend provides none."""
    try:
        module = importlib.import_module(DESIGN_MODULE)
    except ModuleNotFoundError as err:
        if err.name != DESIGN_MODULE:
            raise
        return None
    model = getattr(module, DESIGN_FUNCTION, None)
    if not callable(model):
        raise TypeError(f"{DESIGN_MODULE} must define a function {DESIGN_FUNCTION}(*, tokens, depth, lengths, "
                        "dims, k, k_min, dtype, mode, kernel)")
    return model


def design_traffic(model: DesignModel, problem: Problem, mode: str) -> Traffic:
    """``model``'s traffic for one call of ``problem`` in ``mode``, checked."""
    name = f"{getattr(model, '__module__', '?')}.{getattr(model, '__name__', '?')}"
    return Traffic.of(model(mode=mode, **problem.design_arguments()), name)


# --------------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mipic-bench roofline",
        description="The least work of every preset row, its time at a GPU's peaks, and what the fused "
                    "kernels' designs move (nothing is run).",
    )
    parser.add_argument("--device-name", default="NVIDIA H100 80GB HBM3",
                        help="a GPU name as torch reports it (default: %(default)s); known: "
                             + ", ".join(spec.name for spec in DEVICES))
    parser.add_argument("--preset", nargs="+", choices=list(catalog.PRESETS), metavar="NAME",
                        help="presets (default: the GPU presets)")
    parser.add_argument("--mode", nargs="+", choices=catalog.MODES, metavar="MODE", help="modes (default: all)")
    parser.add_argument("--dtype", default="bf16", choices=list(catalog.DTYPES))
    parser.add_argument("--kernel", default="linear", choices=("linear", "rbf"))
    parser.add_argument("--measured", action="store_true",
                        help="use the measured copy bandwidth of the device instead of its datasheet peak")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sequence lengths (as mipic-bench)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    spec = device_spec(args.device_name)
    if spec is None:
        raise SystemExit(f"mipic-bench roofline: no peak rates for {args.device_name!r}; known: "
                         + ", ".join(spec.name for spec in DEVICES))
    print(table(args.preset or catalog.default_presets(on_gpu=True), args.mode or list(catalog.MODES),
                spec=spec, dtype_name=args.dtype, kernel=args.kernel, measured=args.measured, seed=args.seed))
    return 0


def table(presets: Sequence[str], modes: Sequence[str], *, spec: DeviceSpec, dtype_name: str, kernel: str,
          measured: bool = False, seed: int = 0) -> str:
    """The bound and the designs' predictions, one line per preset, shape and mode."""
    from . import design_v1
    from .workload import torch_dtype

    dtype = torch_dtype(dtype_name)
    designs: list[tuple[str, DesignModel]] = [("v1", design_v1.design_traffic)]
    current = current_design_model()
    if current is not None:
        designs.append(("current", current))
    bandwidth = spec.bandwidth(measured) / 1e12
    lines = [
        f"{spec.name}: {bandwidth:.2f} TB/s ({'measured copy' if measured and spec.copy_tb_s else 'datasheet'}), "
        f"{spec.matrix_rate(dtype) / 1e12:.0f} TFLOP/s matrix ({dtype_name}), "
        f"{spec.fma_rate(dtype) / 1e12:.1f} TFLOP/s FMA; {kernel} kernel, {dtype_name}; "
        f"design floors count {LAUNCH_US:g} us per launch",
        "MB: device memory moved; GF: GFLOP (matrix + FMA); us: time at the peaks (bound: memory, matrix, "
        "fma or launches); x: design floor / lower bound",
        "",
    ]
    head = f"{'preset':<11} {'shape':<19} {'mode':<8} | {'bound MB':>8} {'GF':>7} {'us':>7} {'by':<6}"
    for name, _ in designs:
        head += f" | {name + ' MB':>9} {'GF':>7} {'launch':>6} {'us':>7} {'by':<6} {'x':>5}"
    lines.append(head)
    for preset_name in presets:
        preset = catalog.PRESETS[preset_name]
        for shape in preset.shapes():
            problem = preset_problem(preset, shape, dtype=dtype, kernel=kernel, seed=seed)
            for mode in modes:
                bound = lower_bound(problem, mode)
                bound_ms, binds = limit_ms(bound, spec, dtype, measured=measured)
                line = (f"{preset_name:<11} {str(shape):<19} {mode:<8} | {bound.bytes / 1e6:8.1f} "
                        f"{(bound.flops_tc + bound.flops_fma) / 1e9:7.2f} {1e3 * bound_ms:7.1f} {binds:<6}")
                for _, model in designs:
                    work = design_traffic(model, problem, mode)
                    floor = predicted_ms(work, spec, dtype, measured=measured)
                    work_ms, by = limit_ms(work, spec, dtype, measured=measured)
                    by = by if work_ms >= floor else "launch"
                    line += (f" | {work.bytes / 1e6:9.1f} {(work.flops_tc + work.flops_fma) / 1e9:7.2f} "
                             f"{work.launches:6d} {1e3 * floor:7.1f} {by:<6} {floor / bound_ms:5.1f}")
                lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
