"""Fused Triton backend: same internal signatures as :mod:`mipic_kernels.reference`.

One module per operation holds its passes and its ``torch.library`` custom ops
(:mod:`.nested_cka_op`, :mod:`.cka_op`, :mod:`.ranking`, :mod:`.relation_op`); the
kernels they launch live in :mod:`.gram` and :mod:`.stats` (forward) and
:mod:`.backward`, with the tile helpers they share in :mod:`.tl_utils`; the span
relation's own kernels in :mod:`.relation_kernels`. This module imports none of them (nor triton)
until an operation runs.

Runs on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests). Inputs are
float16, bfloat16 or float32; every result is float32. float64 is rejected (the
torch backend serves it). Nothing here waits for the device: buffer sizes come from
the shapes and the ``k`` spec on the host, so a training step with these operations
can be captured in a CUDA graph. Non-finite inputs are therefore not checked: they
give NaN values and NaN gradients. The kernels and their memory use are described
in ``docs/kernels.md``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from .. import selection

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _on_kernel_device(x: torch.Tensor) -> bool:
    """A CUDA tensor, or a CPU tensor under Triton's interpreter."""
    return x.is_cuda or (x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1")


def preferred_for(x: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` picks this backend for ``x``: a CUDA tensor of a
    supported dtype, with triton installed."""
    return x.is_cuda and x.dtype in SUPPORTED_DTYPES and _triton_installed()


def can_run(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``: a supported dtype, triton installed, and
    ``x`` on a CUDA device (or on the CPU under Triton's interpreter)."""
    return x.dtype in SUPPORTED_DTYPES and _triton_installed() and _on_kernel_device(x)


def check_usable(x: torch.Tensor) -> None:
    """Raise if ``backend="triton"`` cannot run on ``x``."""
    if not _triton_installed():
        raise RuntimeError(
            "backend='triton' needs the triton package (Linux x86-64); "
            "install it or use backend='torch'"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"backend='triton' takes float16, bfloat16 or float32 inputs; got {x.dtype} "
            "(use backend='torch' for float64)"
        )
    if not _on_kernel_device(x):
        raise ValueError(
            f"backend='triton' needs x on a CUDA device (or TRITON_INTERPRET=1 for CPU "
            f"tensors); got x on {x.device}"
        )


def cls_order(
    x: torch.Tensor, mask: torch.Tensor, k: selection.KSpec = None, k_min: int = 1, n_widths: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token order ``(*, T)`` of ``x (*, T, D)`` by MIPIC's ``"cls"`` score, real tokens
    (``mask``) first, and the per-width counts ``(*, n_widths)`` of
    :func:`mipic_kernels.selection.resolve_k` for ``k, k_min``: the score-and-rank
    kernels of :mod:`.ranking`."""
    from . import ranking

    return ranking.cls_order(x, mask, k, k_min, n_widths)


def cka(
    x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, *, kernel: str, unbiased: bool,
    sigma: Optional[float], rbf_threshold: float, precision: str,
) -> torch.Tensor:
    """CKA of the masked rows of ``x (*, n, p)`` and ``y (*, n, q)``; returns ``(*)``.
    ``precision``: ``"fast"`` (tensor-core split dots) or ``"ieee"`` (fp32 FMA dots)."""
    from . import cka_op

    check_usable(y)
    lead, rows = x.shape[:-2], x.shape[-2]
    mask = mask.reshape(-1, rows)
    value = cka_op.cka(
        x.reshape(-1, rows, x.shape[-1]), y.reshape(-1, rows, y.shape[-1]),
        selection.rank_tokens(None, mask), mask.sum(-1),
        kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold, precision=precision,
    )
    return value.reshape(lead)


def nested_cka_ranked(
    x: torch.Tensor, dims: tuple[int, ...], order: torch.Tensor, k: torch.Tensor, k_top: int, *,
    kernel: str, unbiased: bool, sigma: Optional[float], rbf_threshold: float, detach_full: bool,
    precision: str,
) -> torch.Tensor:
    """CKA of each width prefix against the full width over its top-``k`` tokens.

    ``x (*, T, D)``; ``order (*, T)`` positions best first; ``k (*, W)`` token counts,
    each at most ``k_top``, the edge of the Grams; ``precision`` as in :func:`cka`.
    Returns ``(*, W)``.
    """
    from . import nested_cka_op

    lead, (tokens, depth) = x.shape[:-2], x.shape[-2:]
    value = nested_cka_op.nested_cka(
        x.reshape(-1, tokens, depth), order.reshape(-1, tokens), k.reshape(-1, len(dims)), dims,
        k_top, kernel=kernel, unbiased=unbiased, sigma=sigma, rbf_threshold=rbf_threshold,
        detach_full=detach_full, precision=precision,
    )
    return value.reshape(*lead, len(dims))


def span_relation_distance(
    x: torch.Tensor, y: torch.Tensor, spans_x: torch.Tensor, spans_y: torch.Tensor, weights_x: torch.Tensor,
    weights_y: torch.Tensor, n: torch.Tensor, max_spans: int, *, distance: str, beta: float,
) -> torch.Tensor:
    """Span relation distance of ``x (*, T, Dx)`` and ``y (*, U, Dy)``; returns ``(*)``
    (see :func:`mipic_kernels.span_relation_distance`)."""
    from . import relation_op

    lead = x.shape[:-2]
    value = relation_op.span_relation_distance(
        x.reshape(-1, *x.shape[-2:]), y.reshape(-1, *y.shape[-2:]), spans_x.reshape(-1, spans_x.shape[-1]),
        spans_y.reshape(-1, spans_y.shape[-1]), weights_x.reshape(-1, weights_x.shape[-1]),
        weights_y.reshape(-1, weights_y.shape[-1]), n.reshape(-1), max_spans, distance=distance, beta=beta,
    )
    return value.reshape(lead)
