"""CKA of many pairs of row sets with every set's Gram formed once.

Comparing every layer of one network with every layer of another takes ``La x Lb``
CKA values over the same rows. Pair by pair, each layer's Gram would be formed
``Lb`` (or ``La``) times. Here each input's kernel matrix ``K`` is formed once and
reduced to its strictly upper part, its diagonal and its row sums; a pair then costs
one inner product of two strictly upper ``n x n`` matrices (every pair in one matrix
product), and the HSIC follows from the pair's row sums by Song et al.'s formula
(unbiased) or its biased counterpart, in float64:

    unbiased: tr(K~ L~) + (1' K~ 1)(1' L~ 1) / ((n - 1)(n - 2)) - 2 / (n - 2) 1' K~ L~ 1
    biased:   <K, L> - 2 / n 1' K L 1 + (1' K 1)(1' L 1) / n^2

(``K~`` is ``K`` with a zero diagonal; the unbiased value is the reference's
``<U(K), U(L)>``, Song et al.'s estimate times ``n (n - 3)``.) Those expanded sums
cancel catastrophically on raw Grams of hidden states; here they do not, because
every Gram is of features shifted by the mean of their real rows, and the RBF
kernel matrix is shifted by its mean off the diagonal (which changes neither
estimator), so that the correction terms are small against the inner product.

This module serves :func:`mipic_kernels.cka` when the leading dims of ``x`` and ``y``
differ (they broadcast as in torch), :func:`cka_matrix` and
:class:`mipic_kernels.MinibatchCKA`. It follows :mod:`mipic_kernels.reference`, its
twin in the tests, in every choice: the Gram of features shifted by the mean of the
real rows (:func:`reference._centred_gram`), the same estimators and bandwidth rule,
and NaN exactly where the reference gives NaN.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import api, rules
from .scratch import Scratch
from .selection import accumulation_dtype

Features = Union[torch.Tensor, Sequence[torch.Tensor]]


@dataclass(frozen=True)
class Side:
    """The per-input statistics every pair is computed from, zero outside real rows.

    ``upper`` ``(*, n, n)``: the strictly upper part of the kernel matrix (zero on and
    below the diagonal); ``diagonal`` ``(*, n)`` and ``rows`` ``(*, n)``: its diagonal
    and its row sums without the diagonal, float64; ``count``: real rows, ``(*)``, or a
    float when every row is real (so that the estimators' arithmetic on it stays on
    the host); ``hsic`` ``(*)``: self-HSIC; ``spread``, ``size`` ``(*)`` and ``ok``
    ``(*)`` bool: what the reference's rule judges variance and the bandwidth by
    (see :func:`defined_inputs`); ``pairs``: the HSIC of every pair in the stack
    ``(S, S, *)`` when asked for, else None.
    """

    upper: torch.Tensor
    diagonal: torch.Tensor
    rows: torch.Tensor
    count: Union[float, torch.Tensor]
    hsic: torch.Tensor
    spread: torch.Tensor
    size: torch.Tensor
    ok: torch.Tensor
    kernel: str
    unbiased: bool
    pairs: Optional[torch.Tensor] = None

    @property
    def defined(self) -> torch.Tensor:
        """Whether each input has enough rows and variance (bool ``(*)``)."""
        return defined_inputs(self.count, self.spread, self.size, self.hsic, self.ok,
                              kernel=self.kernel, unbiased=self.unbiased)


def defined_inputs(
    count: Union[float, torch.Tensor],
    spread: torch.Tensor,
    size: torch.Tensor,
    hsic: torch.Tensor,
    ok: torch.Tensor,
    *,
    kernel: str,
    unbiased: bool,
) -> torch.Tensor:
    """The reference's rule (:func:`rules.defined_entries`) for each input against
    itself; a pair is defined when both of its inputs are. Arguments broadcast."""
    n = torch.as_tensor(count, dtype=spread.dtype, device=spread.device)
    return rules.defined_entries(n, spread, spread, size, size, hsic, hsic, ok, kernel=kernel, unbiased=unbiased)


def side_statistics(
    parts: Sequence[torch.Tensor],
    mask: Optional[torch.Tensor],
    *,
    kernel: str,
    unbiased: bool,
    sigma: Optional[float],
    rbf_threshold: float,
    dtype: torch.dtype,
    all_pairs: bool = False,
    scratch: Optional[Scratch] = None,
) -> Side:
    """:class:`Side` of inputs stacked along a first dim: ``parts`` are ``(L_i, *, n,
    p_i)`` tensors (widths may differ between parts), giving leading dims
    ``(S, *)`` with ``S = sum L_i``; every step after the Grams runs once on the whole
    stack. ``mask`` ``(*, n)`` bool broadcasts against ``*``; None means every row is
    real. ``all_pairs`` also takes the HSIC of every pair in the stack (one matrix
    product per row block, self terms included). ``scratch``: buffers for the largest
    intermediates, reused from call to call (no autograd then; the result's ``upper``
    lives in them until the next call). Arguments are assumed validated."""
    rows = None if mask is None else mask.to(dtype)
    upper, diagonal, mean_square = _shifted_grams(parts, rows, dtype, scratch)
    if rows is None:
        count, pair = float(upper.shape[-1]), None
    else:
        count = rows.sum(-1).expand(upper.shape[:-2])
        pair = rows[..., :, None] * rows[..., None, :]
    row_sums = _hollow_row_sums(upper)
    with torch.no_grad():
        # sum_i |z_i - mean|^2; the Gram's total is ~0 after the shift, and subtracting
        # it corrects for the shift's rounding as the reference does.
        trace = diagonal.sum(-1)
        spread = trace - (row_sums.sum(-1) + trace) / _at_least(count, 1)
        # sum_i |x_i|^2 of the unshifted real rows, the scale "no variance" is judged
        # against: the spread plus n |mean|^2.
        size = trace + count * mean_square
    if kernel == "linear":
        ok = torch.ones(upper.shape[:-2], dtype=torch.bool, device=upper.device)
    else:
        upper, diagonal, ok = _rbf_kernel(upper, diagonal, rows, pair, count, sigma, rbf_threshold)
        row_sums = _hollow_row_sums(upper)
    f64 = torch.float64
    diagonal, row_sums = diagonal.to(f64), row_sums.to(f64)
    count = count if rows is None else count.to(f64)
    if all_pairs:
        pairs = _estimate(_inner(upper, all_pairs=True, scratch=scratch), diagonal, row_sums, diagonal, row_sums,
                          count if rows is None else count[:, None], unbiased, all_pairs=True)
        hsic = torch.diagonal(pairs, dim1=0, dim2=1).movedim(-1, 0)
    else:
        pairs = None
        hsic = _estimate(_inner(upper), diagonal, row_sums, diagonal, row_sums, count, unbiased)
    return Side(upper, diagonal, row_sums, count, hsic, spread, size, ok, kernel, unbiased, pairs)


def pair_hsic(inner: torch.Tensor, a: Side, b: Side, unbiased: bool) -> torch.Tensor:
    """HSIC of every pair (the reference's scale) from ``inner = 2 <upper_a, upper_b>``
    and the row statistics of ``a`` and ``b``, all broadcasting."""
    return _estimate(inner, a.diagonal, a.rows, b.diagonal, b.rows, a.count, unbiased)


def cross_hsic(a: Side, b: Side, unbiased: bool) -> torch.Tensor:
    """HSIC of every pair, the leading dims of ``a`` and ``b`` broadcast (batched
    products: the broadcast is never materialised)."""
    return pair_hsic(_inner(a.upper, b.upper), a, b, unbiased)


def _estimate(
    inner: torch.Tensor,
    diagonal_a: torch.Tensor,
    rows_a: torch.Tensor,
    diagonal_b: torch.Tensor,
    rows_b: torch.Tensor,
    count: Union[float, torch.Tensor],
    unbiased: bool,
    *,
    all_pairs: bool = False,
) -> torch.Tensor:
    """Song et al.'s formula times ``n (n - 3)`` (unbiased) or ``<H K H, H L H>``
    expanded (biased), from ``inner = 2 <upper_K, upper_L>``, the diagonals and the
    row sums without the diagonal; float64, arguments broadcast. ``all_pairs``: the
    ``a`` and ``b`` statistics are ``(S, *, n)`` and every pair along their first dim
    is wanted, ``(S, S, *)`` (matrix products instead of broadcast ones)."""
    if all_pairs:
        def dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return (u.movedim(0, -2) @ v.movedim(0, -2).mT).movedim((-2, -1), (0, 1))

        def times(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return u[:, None] * v[None]
    else:
        dot, times = functools.partial(torch.einsum, "...i,...i->..."), operator.mul
    if unbiased:
        n = _at_least(count, 4)
        return inner + times(rows_a.sum(-1), rows_b.sum(-1)) / ((n - 1) * (n - 2)) - 2 * dot(rows_a, rows_b) / (n - 2)
    n = _at_least(count, 1)
    full_a, full_b = rows_a + diagonal_a, rows_b + diagonal_b
    return inner + dot(diagonal_a, diagonal_b) - 2 * dot(full_a, full_b) / n + times(full_a.sum(-1), full_b.sum(-1)) / (n * n)


def _at_least(count: Union[float, torch.Tensor], low: int) -> Union[float, torch.Tensor]:
    # Only keeps the arithmetic finite: the rule leaves entries with fewer rows undefined.
    return count.clamp(min=low) if isinstance(count, torch.Tensor) else max(count, low)


def layer_stacks(*sides: Features) -> list[torch.Tensor]:
    """The inputs of one or two sides as :func:`side_statistics` takes them: a stacked
    ``(L, *, n, p)`` tensor as one part, a sequence as one stacked part when its inputs
    share a width, else one part per input. A part's Grams come from one batched
    product per row block: few large operations, which is what counts on busy cores,
    where every parallel operation can wait for a time slice."""
    parts = []
    for side in sides:
        if isinstance(side, torch.Tensor):
            parts.append(side)
        elif all(t.shape[-1] == side[0].shape[-1] for t in side):
            parts.append(torch.stack(list(side)))
        else:
            parts.extend(t[None] for t in side)
    return parts


def take(s: Side, index: object) -> Side:
    """``s`` indexed along its leading dims (``pairs`` dropped)."""
    count = s.count[index] if isinstance(s.count, torch.Tensor) else s.count
    return Side(s.upper[index], s.diagonal[index], s.rows[index], count, s.hsic[index], s.spread[index],
                s.size[index], s.ok[index], s.kernel, s.unbiased)


def every_pair(both: Side, first: int, self_map: bool) -> tuple[torch.Tensor, Side, Side]:
    """HSIC ``(La, Lb, *)`` of every (first-side, second-side) pair from a stack made
    with ``all_pairs``: the first ``first`` inputs are one side, the rest the other
    (``self_map``: the stack is one side against itself). Also returns both sides."""
    a = take(both, slice(0, first))
    b = a if self_map else take(both, slice(first, None))
    return (both.pairs[:first, :first] if self_map else both.pairs[:first, first:]), a, b


def broadcast_cka(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mask: Optional[torch.Tensor],
    kernel: str,
    unbiased: bool,
    sigma: Optional[float],
    rbf_threshold: float,
    backend: str,
) -> torch.Tensor:
    """:func:`mipic_kernels.cka` for ``x (*a, n, p)`` and ``y (*b, n, q)`` whose leading
    dims differ but broadcast; the row counts were checked by the caller."""
    try:
        lead = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the leading dims of x {tuple(x.shape[:-2])} and y {tuple(y.shape[:-2])} must "
            "broadcast (equal, or 1 on one side, aligned from the right)"
        ) from None
    api._check_same_device("y", y, x)
    mask = _check_broadcast_mask(mask, x, lead)
    kernel, sigma = api._check_kernel(kernel, sigma, rbf_threshold)
    if backend == "triton":
        # The fused kernels take one pair per row set: expand, and let them run.
        shape_x, shape_y = (*lead, *x.shape[-2:]), (*lead, *y.shape[-2:])
        full_mask = None if mask is None else mask.expand(*lead, x.shape[-2])
        return api.cka(
            x.expand(shape_x), y.expand(shape_y), mask=full_mask, kernel=kernel, unbiased=unbiased,
            sigma=sigma, rbf_threshold=rbf_threshold, backend=backend,
        )
    api._check_backend(backend)
    if not torch.compiler.is_compiling():  # value checks read the data on the host
        _check_finite("x", x)
        _check_finite("y", y)
    options = dict(
        kernel=kernel, unbiased=bool(unbiased), sigma=sigma, rbf_threshold=float(rbf_threshold),
        dtype=accumulation_dtype(x.dtype),
    )
    a = take(side_statistics([x[None]], mask, **options), 0)
    b = take(side_statistics([y[None]], mask, **options), 0)
    cross = cross_hsic(a, b, options["unbiased"])
    return rules.cka_value(cross, a.hsic, b.hsic, a.defined & b.defined).to(options["dtype"])


def cka_matrix(
    xs: Features,
    ys: Optional[Features] = None,
    *,
    mask: Optional[torch.Tensor] = None,
    kernel: str = "linear",
    unbiased: bool = False,
    sigma: Optional[float] = None,
    rbf_threshold: float = 1.0,
) -> torch.Tensor:
    """CKA between every input of ``xs`` and every input of ``ys`` over the same rows.

    Each input's kernel matrix is formed and centred once; every pair's statistics come
    from the shared matrices. Equal to ``cka(xs[:, None], ys[None])`` for stacked
    tensors, and to :func:`mipic_kernels.cka` on each pair.

    Args:
        xs: ``(La, *, n, p)`` tensor, or a sequence of ``La`` tensors ``(*, n, p_i)``
            (e.g. the layers of one network; widths may differ).
        ys: the same for the other side, ``Lb`` inputs over the same ``n`` rows and
            leading dims ``*``; None compares ``xs`` with itself (a symmetric map, each
            Gram formed once).
        mask: optional ``(*, n)`` bool tensor, True for real rows, shared by all inputs.
        kernel, unbiased, sigma, rbf_threshold: as in :func:`mipic_kernels.cka`
            (without ``sigma`` every input gets its own median bandwidth).

    Returns:
        ``(La, Lb, *)``, float64 for float64 inputs and float32 otherwise; NaN exactly
        where :func:`mipic_kernels.cka` of that pair is NaN. Differentiable.
    """
    first = stack_features("xs", xs)
    second = first if ys is None else stack_features("ys", ys)
    _check_alike("ys", second, first[0], "xs[0]")
    mask = api._check_mask(mask, first[0]) if mask is not None else None
    kernel, sigma = api._check_kernel(kernel, sigma, rbf_threshold)
    options = dict(
        kernel=kernel, unbiased=bool(unbiased), sigma=sigma, rbf_threshold=float(rbf_threshold),
        dtype=accumulation_dtype(first[0].dtype),
    )
    parts = layer_stacks(first) if ys is None else layer_stacks(first, second)
    both = side_statistics(parts, mask, all_pairs=True, **options)  # both sides in one stack
    cross, a, b = every_pair(both, len(first), self_map=ys is None)
    if ys is None:
        # One side against itself: exactly symmetric, as the map it represents.
        cross = (cross + cross.transpose(0, 1)) / 2
    defined = a.defined[:, None] & b.defined[None, :]
    return rules.cka_value(cross, a.hsic[:, None], b.hsic[None, :], defined).to(options["dtype"])


def stack_features(name: str, xs: object, *, check_values: bool = True) -> Features:
    """The inputs of one side, checked alike (same dtype, device, leading dims and row
    count) and finite: a stacked tensor as it is, a sequence as a list.
    ``check_values=False`` leaves finiteness to the caller (:func:`check_finite`), which
    can test its results instead: NaN or inf in the features reaches every statistic."""
    if isinstance(xs, torch.Tensor):
        api._check_features(name, xs, min_dim=3)
        if xs.shape[0] == 0:
            raise ValueError(f"{name} must hold at least one input, shape (L >= 1, *, n, p); got {tuple(xs.shape)}")
        if check_values:
            _check_finite(name, xs)
        return xs  # indexes and measures like the list of its layers
    if isinstance(xs, (str, bytes)) or not isinstance(xs, Sequence) or len(xs) == 0:
        raise TypeError(
            f"{name} must be a (L, *, n, p) tensor or a non-empty sequence of (*, n, p) tensors; "
            f"got {type(xs).__name__}"
        )
    out = []
    for i, t in enumerate(xs):
        api._check_features(f"{name}[{i}]", t, min_dim=2)
        if check_values:
            _check_finite(f"{name}[{i}]", t)
        out.append(t)
    _check_alike(name, out, out[0], f"{name}[0]")
    return out


def check_finite(name: str, xs: Features) -> None:
    """Raise a ValueError naming the first input of one side that holds NaN or inf."""
    for i, t in enumerate([xs] if isinstance(xs, torch.Tensor) else xs):
        _check_finite(name if isinstance(xs, torch.Tensor) else f"{name}[{i}]", t)


def _check_finite(name: str, t: torch.Tensor) -> None:
    # One reduction instead of an elementwise test: the sum is finite unless an entry
    # is NaN or inf, or the sum overflows, which the elementwise test then clears.
    if not bool(torch.isfinite(t.sum())):
        api._check_finite(name, t)


def _check_alike(name: str, got: Features, like: torch.Tensor, like_name: str) -> None:
    # The layers of a stacked tensor are alike by construction: its first one speaks for all.
    for i, t in enumerate(got[:1] if isinstance(got, torch.Tensor) else got):
        where = f"{name}[{i}]"
        if t.shape[:-1] != like.shape[:-1]:
            raise ValueError(
                f"{where} must have the leading dims and row count of {like_name}, "
                f"{tuple(like.shape[:-1])} + (p,); got shape {tuple(t.shape)}"
            )
        if t.dtype != like.dtype:
            raise TypeError(f"{where} must have the dtype of {like_name} ({like.dtype}); got {t.dtype}")
        api._check_same_device(where, t, like)


def _check_broadcast_mask(
    mask: Optional[torch.Tensor], x: torch.Tensor, lead: torch.Size
) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    want = (*lead, x.shape[-2])
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"mask must be a bool tensor that broadcasts to {want}; got {got}")
    try:
        fits = torch.broadcast_shapes(mask.shape, want) == torch.Size(want)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask must broadcast to {want} (the broadcast leading dims + n); got {tuple(mask.shape)}")
    api._check_same_device("mask", mask, x)
    return mask


# Rows of the Gram product are padded to a multiple of this: the CPU matrix products
# run up to 1.5x longer on odd sizes (63 rows against 64).
_ROW_ALIGN = 8


def _gram_block(n: int) -> int:
    """Rows per block of the Gram product: about an eighth of the rows, a power of two
    of at least 32, which measured fastest from 64 to 1040 rows (CPU, float32). Small
    enough that skipping the blocks below the diagonal pays, big enough for an
    efficient matrix product."""
    return max(32, 1 << max((n // 8).bit_length() - 1, 0))


def _shifted_grams(
    parts: Sequence[torch.Tensor], rows: Optional[torch.Tensor], dtype: torch.dtype, scratch: Optional[Scratch]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Gram of every input of the ``(L_i, *, n, p_i)`` parts, its rows shifted by
    their mean over the real rows (padding rows zeroed) as
    :func:`reference._centred_gram` forms it, stacked ``(sum L_i, *, n, n)`` as its
    strictly upper part and its diagonal; and ``|mean|^2`` of each input.

    Consecutive parts of one width are shifted into one stack, followed by zero rows
    up to a multiple of ``_ROW_ALIGN`` (zero rows add nothing; the views returned
    leave them out), and multiplied in batched products straight into the stacked
    result. Only the row blocks on and above the diagonal are multiplied: about
    ``(b + 1) / 2b`` of the multiply-adds for ``b`` blocks. With ``scratch``, the
    shifted features and the Grams are written into its buffers.
    """
    shapes = [t.shape[1:-2] for t in parts] + ([] if rows is None else [rows.shape[:-1]])
    # torch.broadcast_shapes takes as long as a small operation: only when needed.
    lead = shapes[0] if all(s == shapes[0] for s in shapes) else torch.broadcast_shapes(*shapes)
    n = parts[0].shape[-2]
    padded = -(-n // _ROW_ALIGN) * _ROW_ALIGN
    block = _gram_block(padded)
    device = parts[0].device
    gram = _buffer(scratch, "gram", (sum(t.shape[0] for t in parts), *lead, padded, padded), dtype, device)
    weights = None if rows is None else rows[..., None]
    means, start = [], 0
    for g, group in enumerate(_same_width_runs(parts)):
        layers = sum(t.shape[0] for t in group)
        shifted = _buffer(scratch, f"shifted{g}", (layers, *lead, padded, group[0].shape[-1]), dtype, device)
        at = 0
        for t in group:
            z = t.to(dtype)
            if weights is None:
                mean = z.mean(-2, keepdim=True)
            else:
                mean = (z * weights).sum(-2, keepdim=True) / weights.sum(-2, keepdim=True).clamp(min=1)
            means.append(mean.square().sum((-2, -1)).expand(t.shape[0], *lead))
            _write_shift(shifted[at:at + t.shape[0], ..., :n, :], z, mean, weights, in_place=scratch is not None)
            at += t.shape[0]
        if padded > n:
            shifted[..., n:, :] = 0
        out = gram[start:start + layers]
        start += layers
        for lo in range(0, padded, block):
            hi = min(lo + block, padded)
            # Product then copy: matmul(out=) into this strided block is several times
            # slower with two threads.
            out[..., lo:hi, lo:] = shifted[..., lo:hi, :] @ shifted[..., lo:, :].mT
    gram = gram[..., :n, :n]
    diagonal = gram.diagonal(dim1=-2, dim2=-1).clone()  # the rest below the blocks: cleared next
    return gram.triu_(1), diagonal, torch.cat(means).detach()


def _same_width_runs(parts: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``parts`` in runs of consecutive parts with one width, each run shifted into
    one stack and multiplied with one product per row block."""
    runs: list[list[torch.Tensor]] = []
    for t in parts:
        if runs and runs[-1][0].shape[-1] == t.shape[-1]:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def _buffer(
    scratch: Optional[Scratch], name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device) if scratch is None else scratch.take(name, shape, dtype, device)


def _write_shift(
    into: torch.Tensor, z: torch.Tensor, mean: torch.Tensor, weights: Optional[torch.Tensor], *, in_place: bool
) -> None:
    """``into = (z - mean) * weights`` (``weights`` None: 1), broadcast to ``into``:
    ``in_place`` (for scratch buffers) writes with ``out=`` and in-place operations,
    which allocate nothing but which autograd does not follow; otherwise the result
    is copied in, and autograd records the copy."""
    if not in_place:
        into.copy_(z - mean if weights is None else (z - mean) * weights)
        return
    torch.sub(z.expand(into.shape), mean, out=into)
    if weights is not None:
        into.mul_(weights)


def _inner_block(n: int) -> int:
    """Rows of the kernel matrices converted to float64 at a time by :func:`_inner`:
    the Gram's row blocks (the products then skip the zero blocks below the diagonal),
    at most 128 (the float64 copies stay small)."""
    return min(128, _gram_block(n))


def _inner(
    a: torch.Tensor, b: Optional[torch.Tensor] = None, *, all_pairs: bool = False, scratch: Optional[Scratch] = None
) -> torch.Tensor:
    """``2 <a, b>`` in float64 for strictly upper ``(*, n, n)`` matrices whose leading
    dims broadcast (one batched product per row block: the broadcast is never
    materialised); ``b=None`` gives ``2 <a, a>``, or with ``all_pairs`` the ``(S, S, *)``
    products of every pair along ``a``'s first dim.

    Every HSIC is a sum of ``n^2`` products: summed in float32, that sum alone loses
    more than all the other steps together (a CKA error of 3e-6 against 6e-10 at
    ``n = 512``). Converting a block of rows at a time keeps the float64 copies small
    (and, with ``scratch``, in one reused buffer).
    """
    n = a.shape[-1]
    if n == 0:
        lead = (a.shape[0], *a.shape[:-2]) if all_pairs else a.shape[:-2]
        lead = lead if b is None else torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        return torch.zeros(lead, dtype=torch.float64, device=a.device)
    step = n if a.dtype == torch.float64 else _inner_block(n)
    parts = []
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        # Columns left of lo are zero in these rows (strictly upper matrices).
        block = a[..., lo:hi, lo:]
        if block.dtype == torch.float64 or scratch is None:
            block = block.to(torch.float64)
        else:
            block = scratch.take("inner", block.shape, torch.float64, block.device).copy_(block)
        if all_pairs:
            # (*, S, rows * columns) times its transpose: no copy of the block.
            flat = block.movedim(0, -3).flatten(-2)
            parts.append((flat @ flat.mT).movedim((-2, -1), (0, 1)))
        elif b is None:
            parts.append(torch.linalg.vector_norm(block, dim=(-2, -1)).square())
        else:
            parts.append(torch.einsum("...ij,...ij->...", block, b[..., lo:hi, lo:].to(torch.float64)))
    return 2 * sum(parts[1:], parts[0])


def _hollow_row_sums(upper: torch.Tensor) -> torch.Tensor:
    """Row sums, diagonal left out, of the symmetric matrix with strictly upper part
    ``upper``: its row sums plus its column sums."""
    return upper.sum(-1) + upper.sum(-2)


def _rbf_kernel(
    upper: torch.Tensor,
    diagonal: torch.Tensor,
    rows: Optional[torch.Tensor],
    pair: Optional[torch.Tensor],
    count: Union[float, torch.Tensor],
    sigma: Optional[float],
    rbf_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The RBF kernel matrix of a Gram given as (strictly upper part, diagonal), in the
    same form and zero outside the real rows, and a usable-bandwidth flag."""
    n = upper.shape[-1]
    count = torch.as_tensor(count, dtype=upper.dtype, device=upper.device).expand(upper.shape[:-2])
    strict = torch.ones(n, n, dtype=torch.bool, device=upper.device).triu(1)
    if pair is not None:
        strict = strict & (pair > 0)
    dist = (diagonal[..., :, None] + diagonal[..., None, :] - 2 * upper).clamp(min=0)
    dist = torch.where(strict, dist, torch.zeros_like(dist))
    if sigma is not None:
        bandwidth = torch.full_like(count, sigma * sigma)
    else:
        bandwidth = rbf_threshold**2 * _median(dist.detach(), strict, None if pair is None else count)
    ok = (bandwidth > 0) & torch.isfinite(bandwidth)
    bandwidth = torch.where(ok, bandwidth, torch.ones_like(bandwidth))
    k = torch.exp(dist / (-2 * bandwidth[..., None, None]))
    # Shifted by its mean above the diagonal (on the diagonal too): neither estimator
    # changes, and the expanded HSIC formulas no longer cancel most of their terms.
    pairs = (count * (count - 1) / 2).clamp(min=1)
    mean = (torch.where(strict, k, torch.zeros_like(k)).sum((-2, -1)) / pairs).detach()
    k = torch.where(strict, k - mean[..., None, None], torch.zeros_like(k))
    ones = torch.ones_like(diagonal) if rows is None else rows.expand_as(diagonal)
    return k, (1 - mean[..., None]) * ones, ok


def _median(dist: torch.Tensor, strict: torch.Tensor, count: Optional[torch.Tensor]) -> torch.Tensor:
    """numpy's median of the ``m * m`` squared distances among each entry's ``m`` real
    rows, zero diagonal included, from the strictly upper part (``strict``): in the
    sorted full list the ``m`` zeros come first and every value above the diagonal
    then appears twice. ``count`` holds ``m``; None means every entry has all ``n``
    rows, and then a selection (``kthvalue``) replaces the sort."""
    n = dist.shape[-1]
    flat = torch.where(strict, dist, torch.full_like(dist, math.inf)).flatten(-2)
    if count is None:
        def at(k: int) -> torch.Tensor:
            if k < n:
                return torch.zeros_like(flat[..., 0])
            return torch.kthvalue(flat, (k - n) // 2 + 1, dim=-1).values

        lo, hi = (n * n - 1) // 2, n * n // 2
        return at(lo) if lo == hi else 0.5 * (at(lo) + at(hi))
    if flat.shape[-1] == 0:
        return flat.sum(-1)
    m = count.to(torch.int64)
    ordered = torch.sort(flat, dim=-1).values

    def gathered(k: torch.Tensor) -> torch.Tensor:
        index = ((k - m) // 2).clamp(min=0, max=flat.shape[-1] - 1)
        value = ordered.gather(-1, index[..., None]).squeeze(-1)
        return torch.where(k < m, torch.zeros_like(value), value)

    total = m * m
    return 0.5 * (gathered((total - 1).clamp(min=0) // 2) + gathered(total // 2))
