"""Dispatch for the row update: validation, the CPU/GPU choice, the serial/parallel choice.

Kept apart from ``_dispatch.py`` (the dense update's dispatcher): the row update shares
the hyperparameters (``_hyper.Hyper``) and the array checks' wording, not its plans or
chunk tables. Everything is validated before the first write: an error leaves every
input bit-unchanged.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from . import _hyper as H
from . import config, cpu, cpu_rows
from ._dispatch import is_cuda_array
from ._rows_check import (
    _describe,
    check_indices,
    check_range,
    check_shapes,
    coefficients,
)

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))

#: Lookups per block of the parallel kernel, at least: a block costs a task dispatch and
#: a scratch row. With 8 blocks per thread a Zipf batch (one group holding ~10% of the
#: lookups) still leaves the other threads enough blocks to balance.
BLOCKS_PER_THREAD = 8


_WORK = threading.local()


def workspace(k: int) -> np.ndarray:
    """This thread's scratch for :func:`cpu_rows.group_by_row`, grown on demand.

    Kept between calls (fresh scratch costs ~1 ms of page faults per step at 65,536
    lookups); one per Python thread, because two threads may update two tables at once.
    It holds 48 bytes per lookup of the largest batch this thread has seen.
    """
    need = cpu_rows.workspace_size(k)
    work = getattr(_WORK, "buf", None)
    if work is None or work.size < need:
        work = _WORK.buf = np.empty(need, np.int64)
    return work


def check_float_array(x: Any, label: str, *, writable: bool, ndim: int) -> np.ndarray:
    if not isinstance(x, np.ndarray) or isinstance(x, (np.matrix, np.ma.MaskedArray)):
        raise TypeError(f"{label} must be a NumPy ndarray (or, for the GPU path, a CUDA "
                        f"array), got {_describe(x)}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{label} has dtype {x.dtype}; the row update takes float32 and "
                        "float64 arrays in native byte order only")
    if x.ndim != ndim:
        raise ValueError(f"{label} must be {ndim}-D, got shape {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{label} is not C-contiguous; pass np.ascontiguousarray(...)"
                         + (" (it is updated in place, so no copy is made)" if writable
                            else ""))
    if writable and not x.flags.writeable:
        raise ValueError(f"{label} is read-only; it is updated in place")
    return x


def update_rows(table: Any, state: Any, indices: Any, grad_rows: Any, hyper: H.Hyper,
                step: int, nonfinite: str, rowwise: bool) -> bool:
    """Validate everything, then update the touched rows on the CPU or the GPU.

    NumPy ``table``/``state``/``grad_rows`` run on the CPU; CUDA arrays on the GPU
    (``indices`` may then be a host or a device array). A mix is an error.
    Returns False if ``nonfinite="skip"`` skipped the step.
    """
    on_device = [is_cuda_array(x) for x in (table, state, grad_rows)]
    if any(on_device):
        if not all(on_device):
            names = ("table", "state", "grad_rows")
            host = names[on_device.index(False)]
            dev = names[on_device.index(True)]
            raise TypeError(f"{host} is a host array but {dev} is a CUDA array; pass "
                            "table, state and grad_rows on one device (nothing was "
                            "updated)")
        from . import cuda_rows

        return cuda_rows.update_rows(table, state, indices, grad_rows, hyper, step,
                                     nonfinite, rowwise)
    return cpu_update_rows(table, state, indices, grad_rows, hyper, step, nonfinite,
                           rowwise)


def cpu_update_rows(table: Any, state: Any, indices: Any, grad_rows: Any, hyper: H.Hyper,
                    step: int, nonfinite: str, rowwise: bool) -> bool:
    p = check_float_array(table, "table", writable=True, ndim=2)
    h = check_float_array(state, "state", writable=True, ndim=1 if rowwise else 2)
    idx = check_indices(indices)
    g = check_float_array(grad_rows, "grad_rows", writable=False, ndim=2)
    for x, label in ((h, "state"), (g, "grad_rows")):
        if x.dtype != p.dtype:
            raise TypeError(f"{label} has dtype {x.dtype} but table has dtype {p.dtype}; "
                            "they must match")
    k = idx.shape[0]
    check_shapes(p.shape, h.shape, k, g.shape, rowwise)
    # the indices too: the kernels read them while they write the rows, so indices
    # inside the table or the state could change under them after the range check
    # (an out-of-bounds write); bounds overlap (exact for the contiguous arrays,
    # conservative for strided indices)
    for a, b, la, lb in ((p, h, "table", "state"), (p, g, "table", "grad_rows"),
                         (h, g, "state", "grad_rows"), (p, idx, "table", "indices"),
                         (h, idx, "state", "indices")):
        if np.may_share_memory(a, b):
            raise ValueError(f"{la} and {lb} share memory; the table and its state are "
                             "updated in place and must not alias any other input")
    nrows, d = p.shape
    check_range(idx, nrows)
    coefs = coefficients(hyper, p.dtype, step)
    if k == 0 or d == 0:
        return True
    if not idx.flags.c_contiguous:
        idx = np.ascontiguousarray(idx)  # K integers: one compiled layout, not two
    big = k * d >= config.PARALLEL_THRESHOLD
    # (asked only for a parallel-sized update: the first ask starts Numba's thread
    # pool, and a process with a started pool forks children limited to serial kernels)
    threads = cpu.numba_threads() if big else 1
    if nonfinite != "ignore":
        if big and threads > 1:
            with cpu.PARALLEL_LOCK:
                bad = cpu_rows.has_nonfinite_parallel(g, min(k, BLOCKS_PER_THREAD * threads))
        else:
            bad = cpu_rows.has_nonfinite(g)
        if bad:
            if nonfinite == "raise":
                raise FloatingPointError("grad_rows contains NaN or inf; nothing was "
                                         "updated")
            return False
    groups = cpu_rows.group_by_row(idx, nrows, workspace(k))  # order .. pos
    first = groups[3]
    ngroups = first.size - 1
    if big and threads > 1 and ngroups > 1:
        weight = cpu_rows.GROUP_WEIGHT_ROWWISE if rowwise else cpu_rows.GROUP_WEIGHT_FULL
        bounds = cpu_rows.block_bounds(first, k, min(ngroups, BLOCKS_PER_THREAD * threads),
                                       weight)
        kern = cpu_rows.rows_rowwise_parallel if rowwise else cpu_rows.rows_full_parallel
        with cpu.PARALLEL_LOCK:
            kern(p, g, h, idx, *groups, bounds, *coefs)
    else:
        span = cpu_rows.rows_span_rowwise if rowwise else cpu_rows.rows_span_full
        span(p, g, h, idx, *groups, 0, ngroups, *coefs)
    return True
