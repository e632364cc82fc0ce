"""Checks of the row update's arguments shared by the host and the device paths.

Below both ``_rows_dispatch.py`` and ``cuda_rows.py`` (which need the same index,
shape and range checks and the same memoised coefficients), so neither imports the other.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from . import _hyper as H
from . import cpu_rows

_INTS = (np.dtype(np.int32), np.dtype(np.int64))


def _describe(x: object) -> str:
    return f"{type(x).__module__}.{type(x).__qualname__}"


def check_indices(indices: Any, label: str = "indices") -> np.ndarray:
    """``indices`` as a 1-D int32/int64 NumPy array (no copy when already one)."""
    if isinstance(indices, (list, tuple)):
        raise TypeError(f"{label} must be a NumPy int32 or int64 array, got a "
                        f"{type(indices).__name__}; pass np.asarray(..., np.int64)")
    if not isinstance(indices, np.ndarray):
        raise TypeError(f"{label} must be a NumPy int32 or int64 array, got "
                        f"{_describe(indices)}")
    if isinstance(indices, np.ma.MaskedArray):  # its mask would be ignored
        raise TypeError(f"{label} is a masked array; pass the rows to update as a plain "
                        f"array (e.g. {label}.compressed())")
    if type(indices) is not np.ndarray:  # e.g. np.memmap: the same memory, plain type
        indices = indices.view(np.ndarray)
    if indices.dtype not in _INTS:
        raise TypeError(f"{label} has dtype {indices.dtype}; row indices must be int32 or "
                        "int64 (float indices are not rounded or truncated)")
    if indices.ndim != 1:
        raise ValueError(f"{label} must be 1-D, got shape {indices.shape}")
    return indices


def check_range(indices: np.ndarray, nrows: int, label: str = "indices") -> None:
    bad = int(cpu_rows.first_bad_index(indices, nrows))
    if bad >= 0:
        valid = f"valid: 0 .. {nrows - 1}" if nrows else "it has no rows"
        raise IndexError(f"{label}[{bad}] = {int(indices[bad])} is out of range for a table "
                         f"of {nrows} rows ({valid}); nothing was updated")


def check_shapes(table_shape: tuple[int, ...], state_shape: tuple[int, ...],
                 k: int, grad_shape: tuple[int, ...], rowwise: bool) -> None:
    r, d = table_shape
    if grad_shape != (k, d):
        raise ValueError(f"grad_rows has shape {tuple(grad_shape)} but must be (K, D) = "
                         f"({k}, {d}): one row per index, as wide as the table")
    want = (r,) if rowwise else (r, d)
    if tuple(state_shape) != want:
        what = ("one accumulator per row (rowwise=True)" if rowwise else
                "one accumulator per element (rowwise=False)")
        raise ValueError(f"state has shape {tuple(state_shape)} but must be {want}: "
                         f"{what}")


@functools.lru_cache(maxsize=512)
def coefficients(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple:
    """``hyper.coefficients`` memoised (the step matters only through ``lr_decay``)."""
    return hyper.coefficients(dtype, step if hyper.lr_decay else 1)
