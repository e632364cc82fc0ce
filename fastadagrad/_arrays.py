"""Array description and validation shared by the host and device paths.

What every path needs before it writes anything: how a tensor is named in an error,
whether an object lives on a CUDA device, the checks of one (param, grad, state)
triple, the aliasing check over byte ranges, and the kernels' scalar coefficients.
It sits below both backends (``cpu.py``/``cuda.py`` never import the dispatcher).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _hyper as H

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


class Labels:
    """How one tensor is named in error messages: ``params['fc1.W']`` and friends."""

    __slots__ = ("param", "grad", "state")

    def __init__(self, param: str, grad: str, state: str) -> None:
        self.param, self.grad, self.state = param, grad, state

    @classmethod
    def keyed(cls, key: Any, params: str = "params", grads: str = "grads",
              state: str = "state_sum") -> Labels:
        return cls(f"{params}[{key!r}]", f"{grads}[{key!r}]", f"{state}[{key!r}]")


class KeyedLabels(Sequence[Labels]):
    """Labels for a container's keys, built only when an error needs one.

    Formatting 300 strings per step costs more than the validation itself.
    """

    __slots__ = ("keys",)

    def __init__(self, keys: Sequence[Any]) -> None:
        self.keys = keys

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [Labels.keyed(k) for k in self.keys[i]]
        return Labels.keyed(self.keys[i])


FUNCTIONAL_LABELS = Labels("param", "grad", "state_sum")


def is_cuda_array(x: object) -> bool:
    """True for objects that live on a CUDA device (Numba, CuPy, torch CUDA tensors)."""
    if isinstance(x, np.ndarray):
        return False
    if getattr(type(x), "__cuda_ndarray__", False):  # Numba device arrays, incl. the
        return True  # CUDA simulator's (which have no __cuda_array_interface__)
    is_cuda = getattr(x, "is_cuda", None)  # torch tensors: an attribute, not a dict built
    if isinstance(is_cuda, bool) and type(x).__module__.startswith("torch"):  # per call
        return is_cuda
    try:
        return getattr(x, "__cuda_array_interface__", None) is not None
    except Exception:  # torch raises RuntimeError for CUDA tensors that require grad
        return True


def describe(x: object) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def check_host_array(x: object, label: str, *, writable: bool) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{label} must be a NumPy array (or, for the GPU path, a CUDA array), "
            f"got {describe(x)}"
        )
    if type(x) is not np.ndarray and isinstance(x, (np.matrix, np.ma.MaskedArray)):
        raise TypeError(f"{label} is a {describe(x)}: the flat in-place update would "
                        "ignore its mask or 2-d indexing; pass a plain ndarray "
                        "(np.asarray(...) shares its memory)")
    dt = x.dtype
    if dt not in _FLOATS:
        raise TypeError(
            f"{label} has dtype {dt.str if dt.kind == 'f' else dt}; fastadagrad updates "
            "float32 and float64 arrays (and float16/bfloat16 params with a float32 "
            "state) in native byte order only"
        )
    return check_flags(x, label, writable=writable)


def check_flags(x: np.ndarray, label: str, *, writable: bool) -> np.ndarray:
    """``x`` if it is C-contiguous, and writeable where ``writable``; else the error
    naming it (the 32-bit and the 16-bit host paths' common checks)."""
    if not x.flags.c_contiguous:
        raise ValueError(f"{label} is not C-contiguous; pass np.ascontiguousarray(...) "
                         + ("(it is updated in place, so no copy is made)" if writable
                            else "(it is read where it lies: no copy is made)"))
    if writable and not x.flags.writeable:
        raise ValueError(f"{label} is read-only; it is updated in place")
    return x


def check_triple(p: Any, g: Any, h: Any, labels: Labels) -> None:
    """Check one (param, grad, state) triple of host arrays."""
    check_host_array(p, labels.param, writable=True)
    check_host_array(g, labels.grad, writable=False)
    check_host_array(h, labels.state, writable=True)
    for other, label in ((g, labels.grad), (h, labels.state)):
        if other.dtype != p.dtype:
            raise TypeError(f"{label} has dtype {other.dtype} but {labels.param} has "
                            f"dtype {p.dtype}; they must match")
        if other.shape != p.shape:
            raise ValueError(f"{label} has shape {other.shape} but {labels.param} has "
                             f"shape {p.shape}; they must match")


def _find_overlap(start: np.ndarray, end: np.ndarray, writable: np.ndarray
                  ) -> tuple[int, int]:
    """Indices ``(i, j)`` of two byte ranges that overlap where one is written, or (-1, -1).

    A sweep over the non-empty ranges sorted by start, tracking the furthest end seen
    so far among all ranges and among written ranges, in NumPy: this runs once per
    model (and on error paths), and compiling it with Numba cost ~1.3 s of a cold
    first step. ``j`` is the first range (in start order) that overlaps an earlier one,
    ``i`` the earliest range reaching the furthest end it overlaps.
    """
    idx = np.flatnonzero(end > start)  # empty ranges never overlap
    if idx.size < 2:
        return -1, -1
    order = idx[np.argsort(start[idx], kind="mergesort")]
    s, e, w = start[order], end[order], writable[order]
    low = np.iinfo(np.int64).min
    far_all = np.concatenate(([low], np.maximum.accumulate(e)[:-1]))
    far_w = np.concatenate(([low], np.maximum.accumulate(np.where(w, e, low))[:-1]))
    bad = (s < far_w) | (w & (s < far_all))
    if not bad.any():
        return -1, -1
    k = int(np.argmax(bad))
    if s[k] < far_w[k]:
        m = int(np.argmax(w[:k] & (e[:k] == far_w[k])))
    else:
        m = int(np.argmax(e[:k] == far_all[k]))
    return int(order[m]), int(order[k])


def check_no_overlap(paddr: np.ndarray, gaddr: np.ndarray, haddr: np.ndarray,
                     nbytes: np.ndarray, labels: Sequence[Labels], *,
                     grads: bool = True) -> None:
    """Raise if a parameter or state overlaps any other array (grads may share memory).

    ``grads=False`` leaves the gradients out (their ranges are then ignored).
    """
    n = paddr.size
    start = np.concatenate((paddr, gaddr, haddr))
    end = start + np.concatenate((nbytes, nbytes if grads else np.zeros_like(nbytes),
                                  nbytes))
    writable = np.ones(3 * n, np.bool_)
    writable[n:2 * n] = False
    i, j = _find_overlap(start, end, writable)
    if i >= 0:
        def name(k: int) -> str:
            lab = labels[k % n]
            return (lab.param, lab.grad, lab.state)[k // n]
        raise ValueError(f"{name(i)} and {name(j)} share memory; a parameter and its "
                         "state are updated in place and must not alias any other input")



def cross_overlap(ranges: list[tuple[int, int, int, bool, Any]]) -> tuple[Any, Any] | None:
    """The first two byte ranges ``(start, end, group, written, tag)`` of DIFFERENT
    groups that overlap, one of them written, as their tags; None if there are none
    (ranges of one group are each group's own business). One sort, then a sweep that
    keeps each group's furthest end among its written ranges and among all of them."""
    ranges = sorted(ranges, key=lambda r: r[:2])
    ends: dict[tuple[int, bool], tuple[int, Any]] = {}  # (group, written): end, tag
    for start, end, group, written, tag in ranges:
        for (g, w), (far, other) in ends.items():
            if g != group and (w or written) and start < far:
                return other, tag
        key = (group, written)
        if key not in ends or end > ends[key][0]:
            ends[key] = (end, tag)
    return None


# --- coefficients ---------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _coefficients(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple:
    return hyper.coefficients(dtype, step)


def coefficients(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple:
    """``hyper.coefficients`` memoised: ~2 us of scalar casts saved on every call.

    The step only matters through ``lr_decay``; without it every step shares one entry.
    """
    return _coefficients(hyper, dtype, step if hyper.lr_decay else 1)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # type: ignore[no-any-return]
