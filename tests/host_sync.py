"""Catch host synchronisations issued by the package's Python code.

A host sync is anything that makes the host wait for the device, or copy host data
to it, in the middle of an operation: it costs a round trip per call and makes a CUDA
graph capture fail. :class:`HostSyncRecorder` records them while it is active, from
two sources:

* every ATen operator that needs a device value on the host or host data on the
  device, seen by a ``TorchDispatchMode``: ``_local_scalar_dense`` (``item``,
  ``bool(t)``, ``int(t)``, ``float(t)``, ``t`` as an index), data-dependent output
  shapes (``nonzero``, ``masked_select``, boolean indexing, ``unique``,
  ``repeat_interleave`` without ``output_size``), ``equal``, ``lift_fresh`` (a tensor
  made from Python data, e.g. ``torch.tensor(list, device=...)``) and copies between
  devices. The package's custom operators are run through their implementations with
  the mode still active, so what happens inside them is seen too;
* ``Tensor.tolist`` and ``Tensor.numpy``, which read CPU memory without an operator.

Under Triton's interpreter the kernels themselves run on the host and the
interpreter converts tensors to NumPy and back; that is no part of the code under
test. An event is attributed by the innermost stack frame that belongs either to
the package or to triton: only events attributed to the package are recorded, the
others are counted in ``ignored``.
"""

from __future__ import annotations

import functools
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mipic_kernels

PACKAGE_DIR = str(Path(mipic_kernels.__file__).resolve().parent)
_TRITON_MARK = "/triton/"

# ATen operators whose result needs a device value on the host (or whose output
# shape depends on device data).
_ALWAYS_SYNC = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "masked_select", "equal",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
    "lift_fresh", "lift_fresh_copy",
}


def _is_sync(func: torch._ops.OpOverload, args: tuple, kwargs: dict) -> bool:
    name = func.overloadpacket.__name__
    if name in _ALWAYS_SYNC:
        return True
    if name in ("index", "index_put", "index_put_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None
    if name in ("_to_copy", "copy_"):
        src = args[1] if name == "copy_" else args[0]
        dst = args[0].device if name == "copy_" else kwargs.get("device") or src.device
        return torch.device(dst) != src.device
    return False


def _origin() -> tuple[str, str]:
    """(``"package"``, ``"file:line"``) when the innermost frame of the package or of
    triton on the stack is the package's, (``"triton"``, ...) or (``"outside"``, "")."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = str(Path(frame.filename).resolve())
        if path.startswith(PACKAGE_DIR):
            return "package", f"{Path(path).relative_to(Path(PACKAGE_DIR).parent)}:{frame.lineno}"
        if _TRITON_MARK in path:
            return "triton", ""
    return "outside", ""


class HostSyncRecorder(TorchDispatchMode):
    """Record host synchronisations issued by the package while active.

    ``events`` lists ``(what, "file:line")`` of the package's frame that issued each;
    ``ignored`` counts the ones attributed to triton (its interpreter's conversions).
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []
        self.ignored = 0
        self._patched: list[tuple[str, Callable[..., Any]]] = []
        self._depth = 0

    def _record(self, what: str) -> None:
        where, line = _origin()
        if where == "package":
            self.events.append((what, line))
        elif where == "triton":
            self.ignored += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            self._record(str(func))
        if func.namespace == "mipic_kernels":
            # Run the custom operator's implementation with this mode active again, so
            # the operators it calls are seen (a mode is off inside its own handler).
            with self:
                return func._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, *args, **kwargs)
        return func(*args, **kwargs)

    def __enter__(self):
        # Entered again around every custom operator: patch on the outermost entry.
        if self._depth == 0:
            for name in ("tolist", "numpy"):
                original = getattr(torch.Tensor, name)
                self._patched.append((name, original))
                setattr(torch.Tensor, name, self._watch(f"Tensor.{name}", original))
        self._depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for name, original in self._patched:
                setattr(torch.Tensor, name, original)
            self._patched.clear()
        return super().__exit__(*exc)

    def _watch(self, what: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def watched(*args, **kwargs):
            self._record(what)
            return method(*args, **kwargs)

        return watched
