"""One C++ call that tells whether many tensors still have the metadata they had.

A repeated step of :mod:`fastadagrad.torch` must know, before it writes anything, that
every parameter, state, step counter and gradient is still what the step's plan was
checked against: its Python type, device, layout, dtype, shape and strides, its
negative and conjugate bits, not an inference tensor. Reading those in Python costs one
attribute call per tensor and property (~0.7 us per parameter, 300 us of a 100-tensor
model's step on a 2-core Xeon, more than a third of its compiled update).

torch has that check in C++: the tensor guards of its compiler (``TensorGuards`` of
``torch._C._dynamo.guards``, what ``torch.compile`` runs before reusing a compiled
graph). It records each tensor's Python type, dispatch key set (which holds the
device, the layout, the negative and conjugate bits and whether it is an inference
tensor), dtype, device index, ``requires_grad``, sizes and strides, and compares a
new list of tensors against them, ~0.1 us per tensor. It is not a public API: it is
used only after :func:`_self_check` has shown, in this process, that it rejects each
change the step relies on it to see; where it is missing the Python checks run, and
where it is present but fails the self-check they run too, with a warning saying why.
It reads no Python attribute (no subclass's ``__torch_function__`` runs) and holds no
reference to the tensors.

Addresses and storage sizes are not metadata it keeps: the callers read those in
Python at every step, as before.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from . import config


def usable() -> bool:
    """Whether the C++ guards are used: ``config.TORCH_GUARDS`` on, and torch's there
    and passing the self-check (run once per process, at the first call)."""
    return config.TORCH_GUARDS and _guards_class() is not None


def guard(tensors: Sequence[Any]) -> Any | None:
    """A guard for ``tensors`` as they are now (its ``check(*tensors)`` is True while
    each of them has the same metadata), or None where the C++ guards are not used
    (:func:`usable`)."""
    if not usable():
        return None
    try:
        return _guards_class()(*tensors, dynamic_dims_sizes=None, dynamic_dims_strides=None)
    except (TypeError, RuntimeError):  # a tensor it cannot describe: the Python checks
        return None


def holds(g: Any, tensors: Sequence[Any]) -> bool:
    """Whether guard ``g`` (from :func:`guard`) accepts ``tensors`` (False for a list
    of another length, or anything it refuses to read)."""
    try:
        return bool(g.check(*tensors))
    except (TypeError, RuntimeError):  # ("wrong length")
        return False


@functools.cache
def _guards_class() -> Any | None:
    try:
        from torch._C._dynamo.guards import TensorGuards
    except (ImportError, AttributeError):
        return None
    why = _self_check(TensorGuards)
    if why is not None:
        warnings.warn(f"torch {torch.__version__}'s TensorGuards ({why}): fastadagrad.torch "
                      "checks the tensors of each step in Python instead (slower)",
                      RuntimeWarning, stacklevel=3)
        return None
    return TensorGuards


def _self_check(cls: Any) -> str | None:
    """None if guards of ``cls`` accept tensors with the same metadata and reject each
    change a repeated step relies on them to see; else what went wrong. Every tensor
    is made with an explicit dtype and device (a caller's ``torch.set_default_dtype``
    or ``set_default_device`` must not make two of them alike), outside inference
    mode (where every new tensor would be an inference tensor)."""
    f32, f64 = torch.float32, torch.float64

    def z(*shape: int, dtype: Any = f32, **kw: Any) -> Any:
        return torch.zeros(shape, dtype=dtype, device="cpu", **kw)

    def tensors() -> list[Any]:
        return [z(3, 3), z(3, 3, dtype=f64), torch.nn.Parameter(z(4)), z(1)]

    try:
        with torch.inference_mode(False):
            with torch.inference_mode():
                inference = z(3, 3)
            moved = tensors()
            moved[0].data = z(9)  # metadata changed in place, the same object
            changes = {
                "dtype": (0, z(3, 3, dtype=f64)),
                "shape": (0, z(1, 9)),
                "strides": (0, z(3, 3).t()),
                "negative bit": (0, z(3, 3)._neg_view()),
                "inference tensor": (0, inference),
                "layout": (0, z(3, 3).to_sparse()),
                "device": (0, torch.empty(3, 3, dtype=f32, device="meta")),
                "type (Parameter)": (1, torch.nn.Parameter(z(3, 3, dtype=f64))),
                "type (plain tensor)": (2, z(4, requires_grad=True)),
            }
            base = tensors()
            g = cls(*base, dynamic_dims_sizes=None, dynamic_dims_strides=None)
            if not (g.check(*base) and g.check(*tensors())):
                return "it rejected tensors with the same metadata"
            for what, (i, x) in changes.items():
                other = tensors()
                other[i] = x
                if g.check(*other):
                    return f"it did not see a changed {what}"
            if g.check(*moved):
                return "it did not see a tensor's .data replaced"
            if holds(g, base[:-1]):
                return "it accepted a shorter list"
    except Exception as exc:  # (any failure of a private API: say which, use Python)
        return f"its self-check raised {type(exc).__name__}: {exc}"
    return None
