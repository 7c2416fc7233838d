"""``@triton.jit`` tile helpers shared by the forward and backward kernels.

Conventions of every kernel in this package: a tensor argument ``t`` arrives as the
pointer ``t_ptr`` and its strides as ``stride_<t><dim>``, e.g. ``stride_xb``,
``stride_xt``, ``stride_xd`` for ``x (B, T, D)`` and ``stride_gi``, ``stride_gj`` for
the rows and columns of a Gram. Row ``r`` of example ``b`` is the token
``x[b, order[b, r]]``: the kernels read the selected tokens through the ranking and
never gather them into a copy. Grids are one-dimensional with the example as the
slowest axis, so the programs of one example run together and share its rows in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def widest_count(n_ptr, b, stride_nb, stride_nw, W):
    """``max_w n[b, w]``: the rows of example ``b`` that some width selects, from its
    counts (read in the kernel, so that no launch computes them)."""
    kmax = tl.load(n_ptr + b * stride_nb)
    for w in range(1, W):
        kmax = tl.maximum(kmax, tl.load(n_ptr + b * stride_nb + w * stride_nw))
    return kmax


@triton.jit
def triangle_tile(t):
    """Tile ``(ti, tj)``, ``ti <= tj``, of index ``t`` in the upper triangle enumerated
    column by column: ``t = tj (tj + 1) / 2 + ti``."""
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    # The square root is exact enough for any realistic tile count; make it exact.
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    return t - tj * (tj + 1) // 2, tj


@triton.jit
def _round_bits(z, DROP: tl.constexpr):
    """``z`` (fp32) rounded to ``24 - DROP`` significant bits, ties away from zero, on
    its bit pattern: exactly the same values under the interpreter and on a GPU. NaN
    stays NaN (the integer carry would turn some NaN patterns into zeros)."""
    bits = z.to(tl.int32, bitcast=True)
    rounded = ((bits + (1 << (DROP - 1))) & -(1 << DROP)).to(tl.float32, bitcast=True)
    return tl.where(z == z, rounded, z)


@triton.jit
def split(z, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``(hi, lo)`` with ``z ~ hi + lo`` in the operand type of the dot scheme ``DOT``
    (see :mod:`.launch`): ``hi`` is ``z`` rounded to that type and ``lo`` the rounded
    remainder ``z - hi`` (computed exactly in fp32). For ``"ieee"`` both are ``z``.

    Under the interpreter the halves stay fp32 (their values are exact there): its dot
    of bf16 tiles multiplies the bit patterns as integers.
    """
    if DOT == "ieee":
        hi = z
        lo = z
    elif DOT == "fp16x3":
        hi = z.to(tl.float16).to(tl.float32)
        lo = (z - hi).to(tl.float16).to(tl.float32)
    elif DOT == "tf32x3":
        hi = _round_bits(z, 13)
        lo = _round_bits(z - hi, 13)
    else:
        hi = _round_bits(z, 16)
        lo = _round_bits(z - hi, 16)
    if not INTERPRET:
        if DOT == "fp16x3":
            hi = hi.to(tl.float16)
            lo = lo.to(tl.float16)
        elif DOT == "bf16x3" or DOT == "bf16x4":
            hi = hi.to(tl.bfloat16)
            lo = lo.to(tl.bfloat16)
    return hi, lo


@triton.jit
def _mma(a, b, acc, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    if INTERPRET:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif DOT == "tf32x3":
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dot_split(a_hi, a_lo, b_hi, b_lo, acc, DOT: tl.constexpr, INTERPRET: tl.constexpr):
    """``acc + a @ b`` from the halves of :func:`split`: ``hi.hi + hi.lo + lo.hi`` (and
    ``lo.lo`` for ``"bf16x4"``), each product exact in fp32 and accumulated in fp32 on
    tensor cores; the small terms go first. ``"ieee"``: one fp32 FMA dot of ``a_hi``
    and ``b_hi``."""
    if DOT == "ieee":
        return tl.dot(a_hi, b_hi, acc, input_precision="ieee")
    if DOT == "bf16x4":
        acc = _mma(a_lo, b_lo, acc, DOT, INTERPRET)
    acc = _mma(a_lo, b_hi, acc, DOT, INTERPRET)
    acc = _mma(a_hi, b_lo, acc, DOT, INTERPRET)
    return _mma(a_hi, b_hi, acc, DOT, INTERPRET)


@triton.jit
def load_shifted(
    x_ptr, b, stride_xb, stride_xt, stride_xd, pos, row_ok, shift_ptr, D, cols, col_ok,
):
    """Tokens ``pos`` of example ``b`` at columns ``cols``: (raw fp32, fp32 shifted by the
    example's ``shift`` row, zero outside ``row_ok`` x ``col_ok``)."""
    ok = row_ok[:, None] & col_ok[None, :]
    raw = tl.load(
        x_ptr + b * stride_xb + pos[:, None] * stride_xt + cols[None, :] * stride_xd,
        mask=ok, other=0.0,
    ).to(tl.float32)
    shift = tl.load(shift_ptr + b * D + cols, mask=col_ok, other=0.0)
    return raw, tl.where(ok, raw - shift[None, :], 0.0)


@triton.jit
def distance_tile(g, sq_r, sq_c, rows, cols):
    """Squared distances from a Gram tile and the Gram's diagonal at its rows and
    columns; clamped at 0 (rounding) and exactly 0 on the diagonal."""
    dist = tl.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * g, 0.0)
    return tl.where(rows[:, None] == cols[None, :], 0.0, dist)


@triton.jit
def kernel_tile(g, sq_r, sq_c, bw, rows, cols, valid, RBF: tl.constexpr, UNBIASED: tl.constexpr):
    """Kernel-matrix tile from a Gram tile; zero outside ``valid`` (and on the diagonal
    for the unbiased estimator)."""
    if RBF:
        k = tl.exp(-distance_tile(g, sq_r, sq_c, rows, cols) / (2.0 * bw))
    else:
        k = g
    if UNBIASED:
        k = tl.where(rows[:, None] == cols[None, :], 0.0, k)
    return tl.where(valid, k, 0.0)


@triton.jit
def load_gram_tile(g_ptr, stride_gi, stride_gj, rows, cols, row_ok, col_ok):
    """(Gram tile, Gram diagonal at ``rows``) of the Gram at ``g_ptr``, zero outside
    ``row_ok`` x ``col_ok``."""
    valid = row_ok[:, None] & col_ok[None, :]
    gram = tl.load(g_ptr + rows[:, None] * stride_gi + cols[None, :] * stride_gj, mask=valid, other=0.0)
    return gram, tl.load(g_ptr + rows * (stride_gi + stride_gj), mask=row_ok, other=0.0)


@triton.jit
def load_kernel_tile(
    g_ptr, stride_gi, stride_gj, rows, cols, row_ok, col_ok, sq_c, bw,
    RBF: tl.constexpr, UNBIASED: tl.constexpr,
):
    """(Gram tile, kernel tile) of rows ``rows`` x columns ``cols`` of the Gram at
    ``g_ptr``; ``sq_c`` is the Gram's diagonal at ``cols``."""
    gram, sq_r = load_gram_tile(g_ptr, stride_gi, stride_gj, rows, cols, row_ok, col_ok)
    valid = row_ok[:, None] & col_ok[None, :]
    return gram, kernel_tile(gram, sq_r, sq_c, bw, rows, cols, valid, RBF, UNBIASED)


@triton.jit
def centred_tile(k, r_rows, r_cols, total, n, rows, cols, valid, UNBIASED: tl.constexpr):
    """Biased: the double-centred ``HKH``; unbiased: the U-centred
    ``U(K) = K~ + S/((n-1)(n-2)) - (r_i + r_j)/(n-2)`` off the diagonal, 0 on it.

    ``r`` are the row sums and ``S`` (``total``) the sum of the kernel matrix. Both
    centrings are orthogonal projections, so ``HSIC(K, L) = <P(K), P(L)> = <P(K), L>``,
    and ``P(L)`` is the derivative of ``HSIC(K, L)`` in ``K``.

    The mean entry ``m`` is taken out of ``K`` first: centring ignores it, ``K - m``
    is nearly exact when the entries are close to each other (an RBF kernel with a
    wide bandwidth), and the remaining rounding then sits in per-row and per-column
    terms, which the centred inner products do not see.
    """
    if UNBIASED:
        m = total / (n * (n - 1.0))
        c_r = (r_rows - (n - 1.0) * m) / (n - 2.0)
        c_c = (r_cols - (n - 1.0) * m) / (n - 2.0)
        rest = (total - n * (n - 1.0) * m) / ((n - 1.0) * (n - 2.0))
    else:
        m = total / (n * n)
        c_r = (r_rows - n * m) / n
        c_c = (r_cols - n * m) / n
        rest = (total - n * n * m) / (n * n)
    p = (k - m) - c_r[:, None] - c_c[None, :] + rest
    if UNBIASED:
        p = tl.where(rows[:, None] == cols[None, :], 0.0, p)
    return tl.where(valid, p, 0.0)
