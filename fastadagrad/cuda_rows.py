"""GPU kernels for the row update (numba-cuda), with the CPU row kernels' semantics and bits.

Same three steps as ``cpu_rows.py``; the grouping is the CPU's:

1. the ``K`` indices are grouped on the host by :func:`fastadagrad.cpu_rows.group_by_row`
   (a stable radix sort of ``K`` integers, ~0.3 ms for 65,536; a device array of indices
   is copied to the host first, which waits for its stream), and the groups
   (``rows``, ``order``, ``starts``, in row order: the CPU kernels' first-appearance
   order ``perm`` is not needed here) are copied to the device;
2. :func:`kernels` ``[0]`` (full accumulator): one thread per element of a touched row
   (group ``u``, column ``d``); it sums the gradients of its group in the order of
   ``indices``, left to right from the first, then applies the dense kernel's formula
   (:func:`fastadagrad.cpu_rows._update_row`). Neighbouring threads read neighbouring
   columns: coalesced;
3. :func:`kernels` ``[1]`` (rowwise): one thread per touched row, the sum of squares
   over ``d`` left to right, as :func:`fastadagrad.cpu_rows._update_row_rowwise`; the
   group sums are computed twice (once for the sum of squares, once for the update),
   in the same order, so they are the same bits.

Rounding control as in ``cuda.py``: every multiply, add, divide and square root through
libdevice's correctly rounded ``*_rn`` functions (no contraction into FMA), an FMA only
where the CPU kernel has one; the full kernel's element update and both kernels' scaled
gradient are the dense kernel's, from ``cuda_formula.py``. Each row is written by one
thread (full: each element by one thread): no atomics, the bits do not depend on the
launch configuration.

Lazy: nothing compiles before the first launch; no GPU or numba-cuda is needed to import.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
from numba import uint64 as _u64

from . import _hyper as H
from . import cpu_rows
from . import cuda as fcuda
from .cuda_formula import element, ops, rule

try:  # a module global, as in cuda.py: the simulator swaps it for its fake inside kernels
    from numba import cuda as _cuda
except Exception:  # pragma: no cover - numba-cuda missing: require_gpu() says why
    _cuda = None  # type: ignore[assignment]


@cache
def kernels(dtype: Any, flags: int) -> tuple[Any, Any]:
    """``(full, rowwise)``: the row kernels for ``dtype`` and the rule ``flags``
    (compile-time constants, as in :func:`fastadagrad.cuda.kernels`)."""
    cuda = _cuda  # compiling (to PTX, or lazily) needs numba-cuda, not a GPU
    if cuda is None:
        fcuda.require_gpu()  # raises CudaUnavailableError saying why
    mul, add, div, sqrt, fma = ops(np.dtype(dtype))
    gradient, update = element(np.dtype(dtype), flags)
    _, _, coupled, decoupled, fma_h, fma_wd, zero_h0 = rule(flags)

    @cuda.jit(device=True, inline="always")
    def group_sum(g, order, s, e, width, d):
        """Column ``d`` of the group ``order[s:e]``'s gradient rows summed left to right
        from the first, as :func:`cpu_rows._sum_group`. ``full`` writes the same sum
        out: it reads ``starts[u + 1]`` after the first row, a call would read it
        before, which reorders the kernel's PTX."""
        gi = g[_u64(order[s]) * width + d]
        for k in range(s + 1, e):
            gi = add(gi, g[_u64(order[k]) * width + d])
        return gi

    @cuda.jit
    def full(p, g, h, width, rows, order, starts, lr_num, lr_after, eps_in, eps_out, wd,
             lr_wd, grad_scale):
        """One thread per (group, column): :func:`cpu_rows._update_row` per element."""
        zero = eps_in - eps_in
        ngroups = _u64(rows.size)
        n = ngroups * width
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            u = i // width
            d = i - u * width
            s = starts[u]
            gi = g[_u64(order[s]) * width + d]  # the group's sum: left to right from
            for k in range(s + 1, starts[u + 1]):  # the first, as cpu_rows._sum_group
                gi = add(gi, g[_u64(order[k]) * width + d])
            gi = gradient(gi, grad_scale)
            j = _u64(rows[u]) * width + d
            p[j] = update(gi, p[j], h, j, zero, lr_num, lr_after, eps_in, eps_out, wd, lr_wd)
            i += stride

    @cuda.jit
    def rowwise(p, g, h, width, dn, one, rows, order, starts, eps_in, eps_out, wd, lr_wd,
                grad_scale):
        """One thread per group: :func:`cpu_rows._update_row_rowwise`."""
        zero = eps_in - eps_in
        ngroups = _u64(rows.size)
        u = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while u < ngroups:
            s = starts[u]
            e = starts[u + 1]
            base = _u64(rows[u]) * width
            acc = zero
            for d in range(width):
                gi = gradient(group_sum(g, order, s, e, width, d), grad_scale)
                if coupled:
                    if fma_wd:
                        gi = fma(p[base + d], wd, gi)
                    else:
                        gi = add(gi, mul(p[base + d], wd))
                if fma_h:
                    acc = fma(gi, gi, acc)
                else:
                    acc = add(acc, mul(gi, gi))
            hr = add(h[rows[u]], div(acc, dn))
            m = div(lr_wd, add(sqrt(add(hr, eps_in)), eps_out))
            if zero_h0 and hr == zero:
                m = zero
            c = one
            if coupled:
                c = fma(-m, wd, one)
            elif decoupled:
                c = add(one, -mul(lr_wd, wd))
            h[rows[u]] = hr
            for d in range(width):
                # the same sum again, same bits
                gi = gradient(group_sum(g, order, s, e, width, d), grad_scale)
                p[base + d] = fma(c, p[base + d], -mul(gi, m))
            u += stride

    return full, rowwise


# --- front door ------------------------------------------------------------------------


def _index_array(indices: Any) -> np.ndarray:
    """``indices`` on the host: a NumPy array as is, a device array copied (K integers)."""
    if isinstance(indices, np.ndarray):
        return indices
    if fcuda._is_torch(indices):
        return indices.detach().cpu().numpy()
    if hasattr(indices, "copy_to_host"):
        return indices.copy_to_host()
    if hasattr(indices, "get"):  # CuPy
        return indices.get()
    return indices  # let check_indices name it


def update_rows(table: Any, state: Any, indices: Any, grad_rows: Any, hyper: H.Hyper,
                step: int, nonfinite: str, rowwise: bool) -> bool:
    """The row update on device arrays; everything validated before the first launch.

    Launches on the table's producer stream (as :func:`fastadagrad.cuda.update`);
    returns False if ``nonfinite="skip"`` skipped the step (that check reads one flag
    back, waiting for the stream).
    """
    fcuda.require_gpu()
    from ._rows_check import (
        check_indices,
        check_range,
        check_shapes,
        coefficients,
    )

    dp = fcuda._describe(table, "table")
    dh = fcuda._describe(state, "state")
    dg = fcuda._describe(grad_rows, "grad_rows")
    devs: dict[int, str] = {}
    for x, label in ((table, "table"), (state, "state"), (grad_rows, "grad_rows"),
                     (indices, "indices")):
        fcuda.note_device(devs, x, label)
    dt = fcuda._check_array(dp, "table", writable=True)
    if len(dp.shape) != 2:
        raise ValueError(f"table must be 2-D, got shape {dp.shape}")
    for d, label, writable, ndim in ((dh, "state", True, 1 if rowwise else 2),
                                     (dg, "grad_rows", False, 2)):
        other = fcuda._check_array(d, label, writable=writable)
        if other != dt:
            raise TypeError(f"{label} has dtype {other} but table has dtype {dt}; they "
                            "must match")
        if len(d.shape) != ndim:
            raise ValueError(f"{label} must be {ndim}-D, got shape {d.shape}")
    idx = check_indices(_index_array(indices))
    k = idx.shape[0]
    check_shapes(dp.shape, dh.shape, k, dg.shape, rowwise)
    isz = dt.itemsize
    spans = {"table": (dp.ptr, dp.size * isz), "state": (dh.ptr, dh.size * isz),
             "grad_rows": (dg.ptr, dg.size * isz)}
    names = list(spans)
    for a in range(3):
        for b in range(a + 1, 3):
            (pa, na), (pb, nb) = spans[names[a]], spans[names[b]]
            if na and nb and pa < pb + nb and pb < pa + na:
                raise ValueError(f"{names[a]} and {names[b]} share memory; the table and "
                                 "its state are updated in place and must not alias any "
                                 "other input")
    nrows, width = dp.shape
    check_range(idx, nrows)
    coefs = coefficients(hyper, dt, step)
    if k == 0 or width == 0:
        return True
    with fcuda.device_guard(devs):  # the arrays' device is current for the launches
        return _launch(dp, dh, dg, idx, table, hyper, dt, coefs, nonfinite, rowwise)


def _launch(dp: Any, dh: Any, dg: Any, idx: np.ndarray, table: Any, hyper: H.Hyper,
            dt: np.dtype, coefs: tuple, nonfinite: str, rowwise: bool) -> bool:
    cuda = fcuda.require_gpu()
    k = idx.shape[0]
    nrows, width = dp.shape
    stream = fcuda._stream_for(table, dp)
    fg = _flat(dg, dt)
    if nonfinite != "ignore":
        found = cuda.to_device(np.zeros(1, np.int32), stream=stream)
        blocks, tpb = fcuda.launch_config(dg.size)
        _nonfinite_kernel(dt, bool(coefs[7] & H.GRAD_SCALE))[blocks, tpb, stream](
            fg, coefs[6], found)
        bad = found.copy_to_host(stream=stream)
        stream.synchronize()
        if bad[0]:
            if nonfinite == "raise":
                raise FloatingPointError("grad_rows contains NaN or inf; nothing was "
                                         "updated")
            return False
    idx = np.ascontiguousarray(idx)
    # fresh scratch, not the host path's per-thread one: order and starts are views of
    # it and are copied to the device below
    work = np.empty(cpu_rows.workspace_size(k), np.int64)
    order, starts = cpu_rows.group_by_row(idx, nrows, work)[:2]  # groups in row order
    rows = idx[order[starts[:-1]]].astype(np.int64)
    d_rows = cuda.to_device(rows, stream=stream)
    d_order = cuda.to_device(order, stream=stream)
    d_starts = cuda.to_device(starts, stream=stream)
    full, rw = kernels(dt, coefs[7])
    fp, fh = _flat(dp, dt), _flat(dh, dt)
    if rowwise:
        blocks, tpb = fcuda.launch_config(rows.size)
        rw[blocks, tpb, stream](fp, fg, fh, np.uint64(width), dt.type(width), dt.type(1),
                                d_rows, d_order, d_starts, *coefs[2:7])
    else:
        blocks, tpb = fcuda.launch_config(rows.size * width)
        full[blocks, tpb, stream](fp, fg, fh, np.uint64(width), d_rows, d_order, d_starts,
                                  *coefs[:7])
    return True


@cache
def _nonfinite_kernel(dtype: Any, scale: bool) -> Any:
    """Sets ``found[0] = 1`` if any ``g`` (divided by ``grad_scale`` when ``scale``, as
    the update would) is NaN or inf. Read-only on ``g``."""
    cuda = _cuda
    if cuda is None:
        fcuda.require_gpu()
    div = ops(np.dtype(dtype))[2]

    @cuda.jit
    def nonfinite(g, grad_scale, found):
        bad = False
        n = _u64(g.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            x = g[i]
            if scale:
                x = div(x, grad_scale)
            if math.isinf(x) or math.isnan(x):
                bad = True
            i += stride
        if bad:
            found[0] = 1  # every writer writes 1: the race is benign

    return nonfinite


def _flat(d: Any, dt: np.dtype) -> Any:
    """A 1-D Numba device array over ``d``'s memory (a ``cuda._Dev``; no copy)."""
    n = d.size
    if fcuda.simulator():
        return d.obj.reshape(n)
    obj = d.obj
    if getattr(type(obj), "__cuda_ndarray__", False):
        return obj if obj.ndim == 1 else obj.reshape(n)
    desc = {"shape": (n,), "typestr": d.typestr, "data": (d.ptr, False), "strides": None,
            "version": 3, "stream": None}
    # sync=False: the kernel is launched on the producer's stream, which orders it.
    return _cuda.from_cuda_array_interface(desc, owner=d.obj, sync=False)
