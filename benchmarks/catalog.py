"""What ``mipic-bench`` can run, importable without torch: modes, providers, dtypes and
the named workload presets.

The command line parses and answers ``--help`` from this module alone, so that help and
argument errors come back before torch (seconds to import) is loaded. The
implementations live in :mod:`benchmarks.providers`, :mod:`benchmarks.workload` and
:mod:`benchmarks.measure`.

A preset fixes everything but the batch size and sequence length, which it sweeps.
Token states are ``x (L, B, T, D)`` (layers x batch x tokens x width) with a padding
mask of varying sequence lengths, ranked by the ``"cls"`` teacher score; the loss is
``NestedCKALoss``: the sum over widths of the mean ``1 - CKA`` (full width detached).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Union

MODES = ("forward", "backward", "full", "no-grad")

# Name -> what it is; the order is the order of the table and of the figures.
PROVIDERS: dict[str, str] = {
    "naive": "Python loops, float64 feature-space CKA, topk per width",
    "torch": "vectorised eager reference (backend='torch')",
    "torch.compile": "torch.compile(reference, dynamic=False), compile time excluded",
    "triton": "fused Triton kernels (backend='triton')",
}
# Not a loss: a plain copy of x, the memory-bandwidth yardstick of bandwidth-bound presets.
COPY = "copy"

# Short dtype names and the torch dtype each stands for.
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}
_DTYPE_ALIASES = {"half": "fp16", "float": "fp32", "double": "fp64", **{v: k for k, v in DTYPES.items()}}

# MIPIC's token fractions for its six truncated widths, ascending (docs/method.md section 2).
MIPIC_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
MIPIC_WIDTHS = (16, 32, 64, 128, 256, 512)


def dtype_name(text: str) -> str:
    """The short name (``bf16``, ``fp16``, ``fp32``, ``fp64``) of ``text``, which may also be
    a torch name (``bfloat16``) or ``half``/``float``/``double``."""
    name = _DTYPE_ALIASES.get(text, text)
    if name not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}; got {text!r}")
    return name


@dataclass(frozen=True)
class Shape:
    """One workload size: ``x`` is ``(layers, batch, tokens, depth)``."""

    layers: int
    batch: int
    tokens: int
    depth: int

    def __str__(self) -> str:
        return f"L{self.layers}xB{self.batch}xT{self.tokens}xD{self.depth}"


@dataclass(frozen=True)
class Preset:
    """A named workload family.

    ``k`` is one token fraction (or count) per width, or one int for every width;
    ``gpu`` marks the presets run by default on a CUDA device, ``cpu`` those run by
    default without one; ``bandwidth_bound`` adds a row timing a plain copy of ``x``,
    the yardstick of the bandwidth target.
    """

    name: str
    description: str
    layers: int
    batches: tuple[int, ...]
    tokens: tuple[int, ...]
    depth: int
    dims: tuple[int, ...]
    k: Union[int, tuple[float, ...]]
    k_min: int
    gpu: bool = False
    cpu: bool = False
    bandwidth_bound: bool = False

    def shapes(self) -> list[Shape]:
        return [
            Shape(self.layers, b, t, self.depth)
            for t, b in itertools.product(self.tokens, self.batches)
        ]

    def loss_options(self) -> dict:
        """Keyword arguments of ``NestedCKALoss`` (besides ``dims`` and ``backend``)."""
        k = self.k if isinstance(self.k, int) else list(self.k)
        return {"k": k, "k_min": self.k_min, "detach_full": True}


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "small", "overhead-bound: launch and Python costs dominate",
            layers=2, batches=(4,), tokens=(32,), depth=64,
            dims=(8, 16, 32), k=(0.3, 0.5, 0.7), k_min=8, gpu=True, cpu=True,
        ),
        Preset(
            "bert-base-cpu", "bert-base widths and token fractions at a CPU-sized batch",
            layers=7, batches=(4,), tokens=(128,), depth=768,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, cpu=True,
        ),
        Preset(
            "bert-base", "BERT-base: 7 SIA layers, widths 16..512 against the full 768",
            layers=7, batches=(16, 64, 128), tokens=(128, 256), depth=768,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, gpu=True,
        ),
        Preset(
            "qwen3-0.6b", "Qwen3-0.6B: 7 SIA layers, widths 16..512 against the full 1024",
            layers=7, batches=(16,), tokens=(512,), depth=1024,
            dims=MIPIC_WIDTHS, k=MIPIC_FRACTIONS, k_min=8, gpu=True,
        ),
        Preset(
            "large", "bandwidth-bound: wide states, 128 tokens per width",
            layers=7, batches=(16,), tokens=(512,), depth=4096,
            dims=(256, 1024, 2048), k=128, k_min=8, gpu=True, bandwidth_bound=True,
        ),
    )
}


def default_presets(on_gpu: bool) -> list[str]:
    """The presets ``mipic-bench`` runs when none is named."""
    return [p.name for p in PRESETS.values() if (p.gpu if on_gpu else p.cpu)]


def listing() -> str:
    """Providers and presets, as ``mipic-bench --help`` lists them."""
    def joined(values: tuple) -> str:
        return "/".join(str(v) for v in values)

    lines = ["providers:"]
    lines += [f"  {name:<15} {description}" for name, description in PROVIDERS.items()]
    lines.append("presets:")
    for p in PRESETS.values():
        shape = f"L{p.layers} B{joined(p.batches)} T{joined(p.tokens)} D{p.depth}"
        k = p.k if isinstance(p.k, int) else joined(p.k)
        lines.append(f"  {p.name:<15} {p.description}\n  {'':<15} {shape}, widths {joined(p.dims)}, "
                     f"k {k}, k_min {p.k_min}")
    return "\n".join(lines)
