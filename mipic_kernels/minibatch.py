"""Minibatch CKA maps: every layer of one network against every layer of another,
accumulated over any number of examples (Nguyen, Raghu & Kornblith 2021)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import api, rules
from .pairwise import Features, check_finite, defined_inputs, layer_stacks, side_statistics, stack_features
from .scratch import Scratch
from .selection import accumulation_dtype

MIN_ROWS = 4
# Minibatches whose statistics wait to be added to the sums: the rule and the per-pair
# bookkeeping then run once on all of them, not once per (small) minibatch.
_PENDING = 256


class _Minibatch(NamedTuple):
    """What one minibatch adds, before the rule: the HSIC of every pair of the stack of
    both sides ``(S, S)`` float64, each input's ``spread``, ``size`` and ``ok``
    ``(S,)`` (see :class:`mipic_kernels.pairwise.Side`), and its real rows."""

    pairs: torch.Tensor
    spread: torch.Tensor
    size: torch.Tensor
    ok: torch.Tensor
    rows: int


class MinibatchCKA:
    """Accumulates the unbiased HSIC of every layer pair over minibatches.

    For minibatch ``t`` with ``n_t`` rows, kernel matrices ``K_i`` (layer ``i`` of the
    first network) and ``L_j`` (layer ``j`` of the second), :meth:`update` adds the
    unbiased estimates (Song et al. 2012)

        HSIC_1(A, B) = <U(A), U(B)> / (n_t (n_t - 3))

    of ``(K_i, L_j)`` for every pair and of ``(K_i, K_i)``, ``(L_j, L_j)`` to float64
    sums; :meth:`compute` returns

        CKA_ij = sum_t HSIC_1(K_i, L_j) / sqrt(sum_t HSIC_1(K_i, K_i) * sum_t HSIC_1(L_j, L_j)).

    Every minibatch counts equally, whatever its size. This is an unbiased-HSIC
    estimate over minibatches, not the unbiased CKA of all examples in one Gram: the
    two coincide for a single minibatch and differ by sampling noise otherwise.

    Exact where the reference is: nothing is clamped, a negative estimate stays
    negative, and an entry is NaN exactly when one of its layers never had variance
    (the rule of :func:`mipic_kernels.cka`, judged per minibatch). A layer without
    variance in a minibatch adds exactly 0 to that minibatch's sums, its exact
    unbiased HSIC, rather than rounding noise. Grams are formed in float32 (float64 for
    float64 features); every HSIC from them is taken and summed in float64. No autograd.

    Args:
        kernel: ``"linear"`` or ``"rbf"``.
        sigma: RBF bandwidth for every Gram; None gives each layer in each minibatch
            ``sigma^2 = rbf_threshold^2 * median`` of its squared distances (the
            bandwidth then follows the minibatch, as in Nguyen et al.).
        rbf_threshold: scales the median bandwidth.

    Attributes:
        hsic_xy, hsic_xx, hsic_yy: the float64 sums ``(La, Lb)``, ``(La,)``, ``(Lb,)``
            (None before the first update); sums from disjoint data, e.g. other
            processes, add up to the sums of their union. Up to 256 minibatches wait
            to be added, in one pass, until the sums are read or :meth:`compute` runs.
        batches, rows: minibatches and rows seen.

    Between updates it keeps its largest intermediates (the shifted features, the
    Grams and their float64 blocks, up to 8 MiB each) for the next minibatch;
    :meth:`reset` releases them.

    Example::

        acc = MinibatchCKA()
        for batch in loader:
            acc.update(layers_a(batch), layers_b(batch))   # (La, n, p), (Lb, n, q)
        cka = acc.compute()                                 # (La, Lb) float64
    """

    def __init__(self, *, kernel: str = "linear", sigma: Optional[float] = None, rbf_threshold: float = 1.0):
        self.kernel, self.sigma = api._check_kernel(kernel, sigma, rbf_threshold)
        self.rbf_threshold = float(rbf_threshold)
        self.reset()

    def reset(self) -> None:
        """Forget every minibatch."""
        self._xy: Optional[torch.Tensor] = None
        self._xx: Optional[torch.Tensor] = None
        self._yy: Optional[torch.Tensor] = None
        self._pending: list[_Minibatch] = []
        self._scratch = Scratch()
        self.self_map: Optional[bool] = None
        self.batches = 0
        self.rows = 0

    @property
    def hsic_xy(self) -> Optional[torch.Tensor]:
        self._fold()
        return self._xy

    @property
    def hsic_xx(self) -> Optional[torch.Tensor]:
        self._fold()
        return self._xx

    @property
    def hsic_yy(self) -> Optional[torch.Tensor]:
        self._fold()
        return self._yy

    @torch.no_grad()
    def update(self, xs: Features, ys: Optional[Features] = None, *, mask: Optional[torch.Tensor] = None) -> None:
        """Add one minibatch.

        Args:
            xs: the first network's layers on the minibatch: a ``(La, n, p)`` tensor or
                ``La`` tensors ``(n, p_i)``; row ``r`` of every layer is the same example
                (or token).
            ys: the second network's ``(Lb, n, q)`` (or ``Lb`` tensors) on the same
                rows; None compares ``xs`` with itself (a self-similarity map; each Gram
                formed once). Every update must say the same.
            mask: optional ``(n,)`` bool tensor, True for the rows to use.
        """
        first = stack_features("xs", xs, check_values=False)
        second = first if ys is None else stack_features("ys", ys, check_values=False)
        x0, y0 = first[0], second[0]
        if x0.dim() != 2:
            raise ValueError(f"xs must hold (n, p) layers, one row per example; got a layer of shape {tuple(x0.shape)}")
        if y0.shape[0] != x0.shape[0]:
            raise ValueError(
                f"ys must have the row count of xs ({x0.shape[0]}); got a layer of shape {tuple(y0.shape)}"
            )
        if y0.dim() != 2:
            raise ValueError(f"ys must hold (n, q) layers, one row per example; got a layer of shape {tuple(y0.shape)}")
        if y0.dtype != x0.dtype:
            raise TypeError(f"ys must have the dtype of xs ({x0.dtype}); got {y0.dtype}")
        api._check_same_device("ys", y0, x0)
        if mask is not None:
            mask = api._check_mask(mask, x0)
        rows = int(mask.sum()) if mask is not None else x0.shape[0]
        if rows < MIN_ROWS:
            raise ValueError(
                f"a minibatch needs at least {MIN_ROWS} rows for the unbiased HSIC; got {rows}"
            )

        options = dict(
            kernel=self.kernel, unbiased=True, sigma=self.sigma, rbf_threshold=self.rbf_threshold,
            dtype=accumulation_dtype(x0.dtype),
        )
        parts = layer_stacks(first) if ys is None else layer_stacks(first, second)
        both = side_statistics(parts, mask, all_pairs=True, scratch=self._scratch, **options)  # both sides in one stack
        if not bool(torch.isfinite(both.pairs).all()):
            # NaN or inf in the features reaches every pair: name the input (finite
            # features whose products overflow pass, as in cka_matrix).
            check_finite("xs", first)
            check_finite("ys", second)
        self._check_layout(len(first), len(second), ys is None, x0.device)
        self._pending.append(_Minibatch(both.pairs, both.spread, both.size, both.ok, rows))
        self.batches += 1
        self.rows += rows
        if len(self._pending) >= _PENDING:
            self._fold()

    def compute(self) -> torch.Tensor:
        """The ``(La, Lb)`` float64 CKA map so far; NaN where a layer never had variance."""
        if self._xy is None:
            raise RuntimeError("MinibatchCKA.compute() needs at least one update()")
        self._fold()
        xx, yy = self._xx[:, None], self._yy[None, :]
        # Only minibatches where a layer was defined added to its self terms.
        return rules.cka_value(self._xy, xx, yy, (xx > 0) & (yy > 0))

    def _fold(self) -> None:
        """Add the waiting minibatches to the sums: per minibatch, every pair's HSIC
        where both of its layers are defined (else exactly 0), over ``n (n - 3)``."""
        if not self._pending:
            return
        pairs, spread, size, ok = (torch.stack(field) for field in list(zip(*self._pending))[:4])
        rows = [batch.rows for batch in self._pending]
        self._pending = []
        count = torch.tensor(rows, dtype=spread.dtype, device=pairs.device)[:, None]
        defined = defined_inputs(count, spread, size, pairs.diagonal(dim1=-2, dim2=-1), ok,
                                 kernel=self.kernel, unbiased=True)
        scale = torch.tensor([n * (n - 3) for n in rows], dtype=torch.float64, device=pairs.device)
        total = pairs.where(defined[:, :, None] & defined[:, None, :], 0.0).div(scale[:, None, None]).sum(0)
        first = self._xy.shape[0]
        if self.self_map:
            # One side against itself: symmetric, and the self terms are its diagonal,
            # so every defined diagonal entry of the map is exactly 1.
            total = (total + total.mT) / 2
            self._xy += total
            self._xx += total.diagonal()
        else:
            self._xy += total[:first, first:]
            self._xx += total.diagonal()[:first]
            self._yy += total.diagonal()[first:]

    def _check_layout(self, layers_x: int, layers_y: int, self_map: bool, device: torch.device) -> None:
        if self._xy is not None:
            if device != self._xy.device:
                raise ValueError(f"every update must be on the device of the first ({self._xy.device}); got {device}")
            if self_map != self.self_map:
                said = "without ys (a self map)" if self.self_map else "with ys"
                raise ValueError(f"every update must be {said}, like the first one")
            if (layers_x, layers_y) != tuple(self._xy.shape):
                raise ValueError(
                    f"every update must have the layer counts of the first, {tuple(self._xy.shape)}; "
                    f"got ({layers_x}, {layers_y})"
                )
            return
        self.self_map = self_map
        f64 = dict(dtype=torch.float64, device=device)
        self._xy = torch.zeros(layers_x, layers_y, **f64)
        self._xx = torch.zeros(layers_x, **f64)
        self._yy = self._xx if self_map else torch.zeros(layers_y, **f64)

