"""The public functions: argument checks, token selection and backend dispatch.

Every argument is checked here and nowhere else; the backends
(:mod:`mipic_kernels.reference` and :mod:`mipic_kernels.fused`) receive validated,
normalised arguments with the same internal signature:

``cka(x, y, mask, *, kernel, unbiased, sigma, rbf_threshold)`` and
``nested_cka_ranked(x, dims, order, k, k_top, *, kernel, unbiased, sigma,
rbf_threshold, detach_full)``, where ``mask`` is a bool tensor, ``order`` the token
ranking and ``k`` the per-width counts of
:func:`mipic_kernels.selection.resolve_k` (:func:`_order_and_counts`: the fused
score-and-rank kernel, or :func:`mipic_kernels.selection.rank_tokens` and
``resolve_k``) and ``k_top`` their bound from
:func:`mipic_kernels.selection.gram_edge`, an int known without reading the data.

Checks of values (non-finite ``x``, ``y`` or ``scores``) read the data on the host,
so they run only on the reference path in eager mode: the fused path never waits
for the device, and under ``torch.compile`` they would break the graph.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Optional, Sequence

import torch

from . import reference, selection
from .selection import KSpec, ScoresSpec

KERNELS = ("linear", "rbf")
BACKENDS = ("auto", "torch", "triton")
PRECISIONS = ("fast", "ieee")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: Optional[float] = None,
    rbf_threshold: float = 1.0,
    backend: str = "auto",
    precision: str = "fast",
) -> torch.Tensor:
    """Centred kernel alignment between the rows of ``x`` and ``y``, batched.

    Args:
        x: ``(*a, n, p)`` floating tensor, one row per token.
        y: ``(*b, n, q)`` with the ``n`` of ``x``; the leading dims ``a`` and ``b``
            broadcast as in torch (e.g. ``x[:, None]`` against ``y[None]`` compares
            every input of ``x`` with every input of ``y``). Where they differ, each
            input's Gram is formed once and every pair's statistics come from the
            shared Grams (:func:`mipic_kernels.cka_matrix`); ``backend="triton"``
            expands them instead.
        mask: optional bool tensor, True for real rows; other rows are ignored as if
            absent. ``(*, n)`` with ``*`` the (broadcast) leading dims, or any shape
            that broadcasts to it when ``a`` and ``b`` differ.
        kernel: ``"linear"`` or ``"rbf"``.
        unbiased: use the unbiased HSIC estimator (Song et al. 2012; needs 4 rows).
        sigma: RBF bandwidth used for both Grams; None gives each Gram
            ``sigma^2 = rbf_threshold^2 * median`` of its squared distances.
        rbf_threshold: scales the median bandwidth.
        backend: ``"torch"``, ``"triton"`` or ``"auto"`` (triton for CUDA tensors
            when it is installed, else torch).
        precision: how the triton backend multiplies: ``"fast"`` on tensor cores with
            each operand split into two halves (as accurate as fp32 arithmetic, see
            docs/kernels.md) or ``"ieee"`` in fp32 FMA. The torch backend ignores it.

    Returns:
        ``(*)`` tensor (the broadcast leading dims), float64 for float64 ``x`` and
        float32 otherwise. Entries with
        too few rows (2, or 4 for the unbiased estimator) or a side without variance
        are NaN, and only those.

    Raises:
        ValueError: for non-finite ``x`` or ``y`` on the torch backend in eager mode.
        The triton backend and ``torch.compile`` skip that check (it would read the
        data on the host); non-finite inputs then give NaN entries.
    """
    _check_features("x", x, min_dim=2)
    _check_features("y", y, min_dim=2)
    if y.shape[-2] != x.shape[-2]:
        raise ValueError(f"y must have the row count of x, (*, {x.shape[-2]}, q); got shape {tuple(y.shape)}")
    if y.shape[:-2] != x.shape[:-2]:
        from .pairwise import broadcast_cka

        return broadcast_cka(
            x, y, mask=mask, kernel=kernel, unbiased=unbiased, sigma=sigma,
            rbf_threshold=rbf_threshold, backend=backend,
        )
    _check_same_device("y", y, x)
    mask = _check_mask(mask, x)
    kernel, sigma = _check_kernel(kernel, sigma, rbf_threshold)
    precision = _check_precision(precision)
    impl = _backend(backend, x)
    if _checks_values(impl):
        _check_finite("x", x)
        _check_finite("y", y)
    return impl.cka(
        x, y, mask, kernel=kernel, unbiased=bool(unbiased), sigma=sigma,
        rbf_threshold=float(rbf_threshold), precision=precision,
    )


def nested_cka(
    x: torch.Tensor,
    dims: Sequence[int],
    *,
    k: KSpec = None,
    k_min: int = 1,
    scores: ScoresSpec = None,
    mask: Optional[torch.Tensor] = None,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: Optional[float] = None,
    rbf_threshold: float = 1.0,
    detach_full: bool = True,
    backend: str = "auto",
    precision: str = "fast",
) -> torch.Tensor:
    """CKA between each width prefix and the full width over nested top-k tokens.

    For width ``i`` the tokens ``S_i`` are the ``k_i`` best-ranked real tokens of each
    example and the result is ``CKA(x[S_i, :dims[i]], x[S_i, :D])``.

    Args:
        x: ``(*, T, D)`` token states (any leading dims, e.g. layers x batch).
        dims: strictly increasing widths in ``[1, D]``.
        k: None (every real token), an int (every width) or one entry per width,
            each an int count or a float in (0, 1] meaning ``ceil(fraction * m)`` with
            ``m`` the example's real-token count. Then ``k_i = min(max(k_i, k_min), m)``.
        k_min: lower bound on every ``k_i`` (before the cap at ``m``).
        scores: ``(*, T)`` ranking scores, ``"cls"`` (``x_0 . x_j / sqrt(D)`` at full
            width, MIPIC's teacher attention score) or None (position order). Ranking
            is descending, ties to the lower position, real tokens only.
        mask: optional ``(*, T)`` bool tensor, True for real tokens.
        kernel, unbiased, sigma, rbf_threshold: as in :func:`cka`; with ``sigma=None``
            every Gram (each prefix and the full width, over its own tokens) gets its
            own median bandwidth, held constant in the backward pass.
        detach_full: the full width is a detached teacher (no gradient reaches it).
        backend: ``"torch"``, ``"triton"`` or ``"auto"``.
        precision: ``"fast"`` or ``"ieee"``, as in :func:`cka`.

    Returns:
        ``(*, len(dims))``, float64 for float64 input and float32 otherwise; NaN
        exactly where the entry is undefined (see :func:`cka`). The backward ignores
        the upstream gradient of undefined entries: they pass no gradient, whatever it
        holds there.

    Raises:
        ValueError: for non-finite ``x``, or non-finite ``scores`` at a real token, on
        the torch backend in eager mode. The triton backend and ``torch.compile`` skip
        these checks (they would read the data on the host): a non-finite value in a
        selected token then makes its example's entries NaN, and non-finite scores
        rank their tokens in an unspecified (but valid) order.
    """
    _check_features("x", x, min_dim=2)
    if x.shape[-2] == 0:
        raise ValueError(f"x must have at least one token position, shape (*, T >= 1, D); got {tuple(x.shape)}")
    depth = x.shape[-1]
    dims = _check_dims(dims, depth)
    k = _check_k(k, len(dims))
    k_min = _check_positive_int("k_min", k_min)
    mask = _check_mask(mask, x)
    kernel, sigma = _check_kernel(kernel, sigma, rbf_threshold)
    precision = _check_precision(precision)
    impl = _backend(backend, x)
    check_values = _checks_values(impl)
    if check_values:
        _check_finite("x", x)
    if isinstance(scores, str):
        if scores != "cls":
            raise ValueError(f"scores must be a (*, T) tensor, 'cls' or None; got {scores!r}")
    elif scores is not None:
        scores = _check_scores(scores, x, mask, check_values=check_values)
    order, counts = _order_and_counts(x, scores, mask, k, k_min, len(dims))
    k_top = selection.gram_edge(k, k_min, x.shape[-2])
    return impl.nested_cka_ranked(
        x, dims, order, counts, k_top, kernel=kernel, unbiased=bool(unbiased), sigma=sigma,
        rbf_threshold=float(rbf_threshold), detach_full=bool(detach_full), precision=precision,
    )


def _check_backend(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    return str(backend)


def _check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    return str(precision)


def _backend(backend: str, x: torch.Tensor) -> ModuleType:
    if _check_backend(backend) == "torch":
        return reference
    from . import fused

    if backend == "triton":
        fused.check_usable(x)
        return fused
    return fused if fused.preferred_for(x) else reference


def _order_and_counts(
    x: torch.Tensor, scores: ScoresSpec, mask: torch.Tensor, k: KSpec, k_min: int, n_widths: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token order (see :func:`selection.rank_tokens`) and the per-width counts
    (:func:`selection.resolve_k`) every backend gets.

    ``"cls"`` runs the fused score-and-rank kernel whenever triton can run on ``x`` (a
    CUDA tensor, or the interpreter), whatever the backend: it reads ``x`` once in its
    own dtype and writes the counts too. Elsewhere :func:`selection.cls_scores`
    computes the same scores in torch; the two may order tokens whose scores are
    within float32 rounding of each other differently, but every backend on one
    device gets one order. The counts are the same either way.
    """
    if isinstance(scores, str):
        from . import fused

        if fused.can_run(x):
            return fused.cls_order(x, mask, k, k_min, n_widths)
        scores = selection.cls_scores(x)
    return selection.rank_tokens(scores, mask), selection.resolve_k(k, k_min, mask.sum(-1), n_widths)


def _checks_values(impl: ModuleType) -> bool:
    """Whether the checks that read tensor values (a host synchronisation) run: on the
    reference path, outside ``torch.compile``."""
    return impl is reference and not torch.compiler.is_compiling()


def _check_features(name: str, t: object, *, min_dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must have a floating dtype (float16, bfloat16, float32 or float64); "
            f"got {t.dtype}"
        )
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have shape (*, n, features); got shape {tuple(t.shape)}")
    if t.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one feature column; got shape {tuple(t.shape)}")


def _check_same_device(name: str, t: torch.Tensor, x: torch.Tensor) -> None:
    if t.device != x.device:
        raise ValueError(f"{name} must be on the device of x ({x.device}); got {t.device}")


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; it holds NaN or inf")


def _check_mask(mask: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    rows = x.shape[:-1]
    if mask is None:
        return torch.ones(rows, dtype=torch.bool, device=x.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor of shape {tuple(rows)}; got {got}")
    if mask.shape != rows:
        raise ValueError(f"mask must have shape {tuple(rows)} (x.shape[:-1]); got {tuple(mask.shape)}")
    _check_same_device("mask", mask, x)
    return mask


def _check_scores(scores: object, x: torch.Tensor, mask: torch.Tensor, *, check_values: bool) -> torch.Tensor:
    rows = x.shape[:-1]
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a (*, T) tensor, 'cls' or None; got {type(scores).__name__}")
    if scores.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"scores must have a floating dtype; got {scores.dtype}")
    if scores.shape != rows:
        raise ValueError(f"scores must have shape {tuple(rows)} (x.shape[:-1]); got {tuple(scores.shape)}")
    _check_same_device("scores", scores, x)
    if check_values and not bool(torch.isfinite(scores[mask]).all()):
        raise ValueError("scores must be finite at every real token (mask True)")
    return scores.detach()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def _check_dims(dims: object, depth: Optional[int]) -> tuple[int, ...]:
    """Widths as a tuple; ``depth=None`` checks everything but the upper bound."""
    bound = "D" if depth is None else f"D={depth}"
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty sequence of ints in [1, {bound}]; got {dims!r}")
    out = []
    for d in dims:
        if (
            isinstance(d, bool) or not isinstance(d, numbers.Integral)
            or d < 1 or (depth is not None and d > depth)
        ):
            raise ValueError(f"dims must hold ints in [1, {bound}]; got {list(dims)!r}")
        out.append(int(d))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"dims must be strictly increasing; got {out!r}")
    return tuple(out)


def _check_k(k: object, n_widths: int) -> KSpec:
    if k is None:
        return None
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        return _check_positive_int("k", k)
    if isinstance(k, (str, bytes)) or not isinstance(k, Sequence):
        raise ValueError(f"k must be None, an int >= 1 or one entry per width; got {k!r}")
    if len(k) != n_widths:
        raise ValueError(f"k must have one entry per width ({n_widths}); got {len(k)} entries")
    out: list[int | float] = []
    for v in k:
        if isinstance(v, bool):
            raise ValueError(f"k entries must be ints >= 1 or floats in (0, 1]; got {v!r}")
        if isinstance(v, numbers.Integral):
            out.append(_check_positive_int("k entries", v))
        elif isinstance(v, numbers.Real) and 0.0 < float(v) <= 1.0:
            out.append(float(v))
        else:
            raise ValueError(f"k entries must be ints >= 1 or floats in (0, 1]; got {v!r}")
    return out


def _check_kernel(kernel: object, sigma: object, rbf_threshold: object) -> tuple[str, Optional[float]]:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}; got {kernel!r}")
    if sigma is not None:
        if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real):
            raise TypeError(f"sigma must be a positive finite float or None; got {sigma!r}")
        if not math.isfinite(float(sigma)) or float(sigma) <= 0:
            raise ValueError(f"sigma must be a positive finite float or None; got {sigma!r}")
        sigma = float(sigma)
    if isinstance(rbf_threshold, bool) or not isinstance(rbf_threshold, numbers.Real):
        raise TypeError(f"rbf_threshold must be a positive finite float; got {rbf_threshold!r}")
    if not math.isfinite(float(rbf_threshold)) or float(rbf_threshold) <= 0:
        raise ValueError(f"rbf_threshold must be a positive finite float; got {rbf_threshold!r}")
    return str(kernel), sigma
