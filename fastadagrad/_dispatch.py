"""The thin layer between the public API and the kernels.

Validation (shapes, dtypes, contiguity, writability, aliasing, hyperparameters), the
CPU/GPU choice, the serial/parallel choice and the chunk tables live here, so that
``cpu.py`` and ``cuda.py`` stay bare loops. Everything is checked before the first
write: an error leaves every input bit-unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _hyper as H
from . import config, cpu
from ._arrays import (  # noqa: F401  (re-exported: the public modules' one way down)
    _FLOATS,
    FUNCTIONAL_LABELS,
    KeyedLabels,
    Labels,
    _address,
    check_host_array,
    check_no_overlap,
    check_triple,
    coefficients,
    cross_overlap,
    describe,
    is_cuda_array,
)
from ._plan import Plan, chunk_table  # noqa: F401

# --- CPU --------------------------------------------------------------------------

def _has_nonfinite(g: np.ndarray, coefs: tuple) -> bool:
    if g.size >= config.parallel_from(g.itemsize):
        with cpu.PARALLEL_LOCK:
            return bool(cpu.flat_has_nonfinite_parallel(g, config.chunk(), coefs[6],
                                                         coefs[7]))
    return bool(cpu.span_has_nonfinite(g, coefs[6], coefs[7]))


def cpu_update_one(p: np.ndarray, g: np.ndarray, h: np.ndarray, coefs: tuple,
                   nonfinite: str, labels: Labels) -> bool:
    """Fused step on one validated triple; False when ``nonfinite='skip'`` skipped it."""
    n = p.size
    # ndarray's own reshape: a subclass may override it (one returning a copy left the
    # param unchanged while its state was updated); C-contiguous, so these are views
    flat = np.ndarray.reshape
    pf, gf, hf = flat(p, -1), flat(g, -1), flat(h, -1)
    if nonfinite != "ignore" and _has_nonfinite(gf, coefs):
        if nonfinite == "raise":
            raise FloatingPointError(f"{labels.grad} contains NaN or inf; nothing was "
                                     "updated")
        return False
    if n >= config.parallel_from(p.itemsize):
        with cpu.PARALLEL_LOCK:
            cpu.adagrad_flat_parallel(pf, gf, hf, np.array(coefs[:7], np.float64),
                                      coefs[7])
    elif n:
        cpu.adagrad_span(pf, gf, hf, *coefs)
    return True


def cpu_update_many(params: Sequence[np.ndarray], grads: Sequence[Any],
                    states: Sequence[np.ndarray], labels: Sequence[Labels],
                    hyper: H.Hyper, step: int, nonfinite: str, plan: Plan,
                    gaddr: np.ndarray) -> bool:
    """Fused step over many validated triples: one compiled call per dtype.

    ``plan`` describes ``params``/``states`` and ``gaddr`` holds the grads' data
    addresses, both confirmed in this call.
    """
    if plan.any_parallel():  # the table's balance matters
        threads = cpu.numba_threads()  # thread-local: may change any time
        if threads != plan.threads or plan.chunk != config.CHUNK:
            plan.plan_groups(threads)

    # the kernels' scalars per dtype group, for the last few (hyper, step) pairs: a loop
    # alternating between two (with and without a loss scale) recomputes nothing
    key = (id(hyper), step if hyper.lr_decay else 1)
    hit = plan.coef_cache.get(key)
    if hit is None or hit[0] is not hyper:
        last = plan.coef_last  # a learning-rate schedule: the last step's, another lr
        if last is not None and last[0].family() is hyper.family():
            coefs = [hyper.relr(c, g[0].dtype, step) for c, g in zip(last[1], plan.groups)]
            # relr makes entries 0, 1 and 5 again (the learning rate's), and keeps the
            # flags: the same kernels, and the other floats as they were (~1 us a step)
            serial = [(k, (float(c[0]), float(c[1]), f[2], f[3], f[4], float(c[5]), f[6]))
                      for (k, f), c in zip(last[2], coefs)]
        else:
            coefs = [coefficients(hyper, g[0].dtype, step) for g in plan.groups]
            # the serial kernel called directly with float coefficients: the by-name
            # entry point's flag lookup and NumPy-scalar unboxing cost ~0.5 us per call
            serial = [(cpu.kernels(c[7]).many_serial, tuple(float(x) for x in c[:7]))
                      for c in coefs]
        if len(plan.coef_cache) >= 4:
            plan.coef_cache.clear()
        hit = plan.coef_cache[key] = (hyper, coefs, serial)
    plan.coef_last = hit
    _, plan_coefs, plan_serial = hit
    runs = []
    for (proto, idx, table, total), coefs in zip(plan.groups, plan_coefs):
        addrs = (plan.paddr, gaddr, plan.haddr) if idx is None else (
            plan.paddr[idx], gaddr[idx], plan.haddr[idx])
        runs.append((proto, idx, addrs, table, total, coefs))

    if nonfinite != "ignore":  # read-only pre-pass over every gradient before any write
        first = -1
        for proto, idx, (_, ga, _), (ct, cs, cl), total, coefs in runs:
            if total >= config.parallel_from(proto.itemsize):
                with cpu.PARALLEL_LOCK:
                    bad = cpu.first_nonfinite_many(proto, ga, ct, cs, cl, coefs[6],
                                                   coefs[7])
            else:
                bad = cpu.first_nonfinite_many_serial(proto, ga, ct, cs, cl, coefs[6],
                                                      coefs[7])
            if bad >= 0:
                if nonfinite == "skip":
                    return False
                k = bad if idx is None else int(idx[bad])
                first = k if first < 0 else min(first, k)  # dtype groups: name the 1st
        if first >= 0:
            raise FloatingPointError(f"{labels[first].grad} contains NaN or inf; nothing "
                                     "was updated")

    for (proto, _, (pa, ga, ha), (ct, cs, cl), total, coefs), (serial, fcoefs) in zip(
            runs, plan_serial):
        if total >= config.parallel_from(proto.itemsize):
            with cpu.PARALLEL_LOCK:
                cpu.adagrad_many_parallel(proto, pa, ga, ha, ct, cs, cl, *coefs)
        else:
            serial(proto, pa, ga, ha, ct, cs, cl, *fcoefs)
    return True


# --- front door -------------------------------------------------------------------

_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def checked_kernel(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple | None:
    """What :func:`update_one_fast` needs for ``hyper``'s formula on ``dtype`` at
    ``step``: ``(checked serial kernel, coefficients as a float64 array, parallel
    kernel, the coefficients as dtype scalars, the step's learning rate (a float), the
    bound a learning rate must stay below on this dtype)`` (both kernels take the array
    and round its values to the array dtype: the same bits as dtype scalars); or None
    for a dtype the kernels do not take. Raises like :meth:`Hyper.coefficients` (a
    float32 overflow). Meant to be cached by the caller per set of hyperparameters; a
    schedule's new learning rate needs no new entry (:func:`update_one_fast`'s ``lr``).
    """
    if dtype != _F32 and dtype != _F64:  # (an equal dtype object from pickle too)
        return None
    coefs = coefficients(hyper, dtype, step)
    k = cpu.kernels(coefs[7])
    table = np.array([float(c) for c in coefs[:7]], np.float64)
    table.flags.writeable = False  # shared by every call with these hyperparameters
    return (k.checked_span, table, k.flat_parallel, coefs, float(hyper.clr(step)),
            H.F32_INF_FROM if dtype == _F32 else math.inf)


def checked_kernel_relr(fast: tuple, hyper: H.Hyper, dtype: np.dtype, step: int
                        ) -> tuple:
    """:func:`checked_kernel` for ``hyper`` from ``fast``, made by it for a Hyper of
    the same family (:meth:`Hyper.with_lr`: only ``lr`` differs) and dtype: the
    kernels kept, the learning rate's entries replaced (~1 us where the whole set took
    ~5)."""
    coefs = hyper.relr(fast[3], dtype, step)
    return fast[0], _lr_table(fast[1], coefs), fast[2], coefs, float(hyper.clr(step)), \
        fast[5]


def _lr_table(table: np.ndarray, coefs: tuple) -> np.ndarray:
    """``table`` with the learning-rate entries (0, 1 and 5) of ``coefs``."""
    new = table.copy()
    new[0], new[1], new[5] = coefs[0], coefs[1], coefs[5]
    new.flags.writeable = False
    return new


def update_one_fast(p: Any, g: Any, h: Any, fast: tuple, lr: float | None = None) -> bool:
    """The functional update on three NumPy arrays, checked in compiled code.

    ``fast`` from :func:`checked_kernel` for ``p.dtype``; ``lr``: the step's learning
    rate (``clr``) where it is not ``fast``'s own: a float, finite, >= 0 and below
    ``fast[5]`` (the caller checks; a float32 overflow must take the full path, which
    raises). True if the step was applied: by the checked serial kernel itself, or, for
    arrays at or above the parallel threshold that it checked, by the parallel kernel.
    False means nothing was written: not three plain C-contiguous float arrays of one
    dtype and shape, or overlapping arrays; the caller then takes :func:`update`, which
    raises naming the problem. For nonfinite="ignore" only.
    """
    if type(p) is not np.ndarray or type(g) is not np.ndarray or type(h) is not np.ndarray:
        return False
    if lr is None:
        lr = fast[4]
    try:
        code = fast[0](p, g, h, fast[1], lr, config.PARALLEL_THRESHOLD)
    except Exception:  # Numba cannot type an argument (e.g. a byte-swapped dtype):
        return False  # nothing ran; the full path says what is wrong
    if code == 0:
        return True
    if code == 4:  # checked; large enough for all threads
        run_parallel_checked(p, g, h, fast[2], table_at(fast, lr))
        return True
    return False


def table_at(fast: tuple, lr: float) -> np.ndarray:
    """``fast``'s coefficient table with learning rate ``lr`` (the parallel kernel
    reads it from the table; only large arrays get there, where a copy is nothing)."""
    if lr is fast[4]:
        return fast[1]
    t = type(fast[3][0])
    r = t(lr)
    return _lr_table(fast[1], (t(1.0), r, 0, 0, 0, r) if fast[3][7] & H.LR_AFTER
                     else (r, t(1.0), 0, 0, 0, r))


def run_parallel_checked(p: np.ndarray, g: np.ndarray, h: np.ndarray,
                         parallel: Any, table: np.ndarray) -> None:
    """The parallel kernel on arrays the checked kernel accepted (code 4): C-contiguous,
    of one dtype and shape, not overlapping; flat views of them."""
    if p.ndim != 1:  # three reshapes cost ~0.45 us: only where they are needed
        n = p.size
        p, g, h = p.reshape(n), g.reshape(n), h.reshape(n)
    with cpu.PARALLEL_LOCK:
        parallel(p, g, h, table)


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           labels: Sequence[Labels], hyper: H.Hyper, step: int, nonfinite: str,
           plan: Plan | None = None) -> bool:
    """Validate everything, then run one fused step on the CPU or the GPU.

    The device is chosen by the kind of arrays passed: NumPy arrays run on the CPU,
    CUDA arrays (``__cuda_array_interface__``: Numba, CuPy, torch) on the GPU. A mix
    is an error. Returns False if the step was skipped (``nonfinite='skip'``).
    ``plan`` (optional, owned by an optimizer) caches per-model work across steps; it
    is re-checked against the arrays passed, in one compiled call, at every step.
    """
    n = len(params)
    if not (len(grads) == len(states) == len(labels) == n):
        raise ValueError("params, grads and states must have the same length")
    if plan is not None and n:
        code, gaddr = plan.check(params, states, grads)
        if code == -1:  # the plan's arrays, unchanged; grads checked: the common case
            return cpu_update_many(params, grads, states, labels, hyper, step, nonfinite,
                                   plan, gaddr)
        if code >= 2 * n and plan.matches(params, states):  # a grad to look at closely
            gaddr = _check_grads(params, grads, states, labels, plan)
            return cpu_update_many(params, grads, states, labels, hyper, step, nonfinite,
                                   plan, gaddr)
    if any(type(x) is not np.ndarray and is_cuda_array(x)
           for seq in (params, grads, states) for x in seq):
        from . import cuda

        # the host/device mix check runs only when the GPU path validates (its cached
        # arrays were all checked CUDA arrays): ~0.2 us per array saved on every step
        return cuda.update(params, grads, states, labels, hyper, step, nonfinite, plan,
                           lambda: _check_all_device(params, grads, states, labels))
    if n == 1 and plan is None:
        p, g, h = params[0], grads[0], states[0]
        lab = labels[0]
        check_triple(p, g, h, lab)
        if np.may_share_memory(p, g) or np.may_share_memory(p, h) or \
                np.may_share_memory(g, h):
            check_no_overlap(*(np.array([_address(a)], np.int64) for a in (p, g, h)),
                             np.array([p.nbytes], np.int64), labels)
        return cpu_update_one(p, g, h, coefficients(hyper, p.dtype, step), nonfinite, lab)
    # a new model, or the cached one changed (in place, or other arrays): start again
    plan = plan if plan is not None else Plan()
    for i in range(n):
        check_triple(params[i], grads[i], states[i], labels[i])  # raises, naming it
    plan.build(params, states, labels)
    code, gaddr = plan.check(params, states, grads)
    if code != -1:
        gaddr = _check_grads(params, grads, states, labels, plan)
    return cpu_update_many(params, grads, states, labels, hyper, step, nonfinite, plan,
                           gaddr)


def validate(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
             labels: Sequence[Labels], hyper: H.Hyper, step: int) -> None:
    """Everything :func:`update` checks, with nothing written: raises naming the
    offending array (for a step that another part of the model skips: bad input is
    still refused)."""
    if any(type(x) is not np.ndarray and is_cuda_array(x)
           for seq in (params, grads, states) for x in seq):
        from . import cuda

        _check_all_device(params, grads, states, labels)
        cuda.validate(params, grads, states, labels, hyper, step)
        return
    n = len(params)
    if not (len(grads) == len(states) == len(labels) == n):
        raise ValueError("params, grads and states must have the same length")
    for i in range(n):
        check_triple(params[i], grads[i], states[i], labels[i])
    if n:
        check_no_overlap(*(np.fromiter(map(_address, seq), np.int64, n)
                           for seq in (params, grads, states)),
                         np.fromiter((p.nbytes for p in params), np.int64, n), labels)
    for dt in {p.dtype for p in params}:  # a coefficient that overflows the dtype
        coefficients(hyper, dt, step)


def prepared_update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                    labels: Sequence[Labels], hyper: H.Hyper, step: int, nonfinite: str,
                    plan: Plan) -> Callable[[], bool | None] | None:
    """:func:`update` with ``plan`` as a function to call right away, when the plan's
    device cache holds every array as validated by an earlier step (checked now), so
    that calling it validates nothing again; None (nothing checked beyond that, nothing
    raised) when it does not, or for host arrays: the caller then chooses its path
    (e.g. :func:`update`, which validates)."""
    gc = plan.gpu
    if gc is None or len(params) == 0:
        return None
    from . import cuda  # imported already: a device cache exists

    return cuda.prepared(gc, params, grads, states, labels, hyper, step, nonfinite)


def _check_grads(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                 labels: Sequence[Labels], plan: Plan) -> np.ndarray:
    """Check the grads against a plan that holds, in Python: the slow path.

    For what the compiled scan could not confirm: another array type, a dtype object
    that is equal but not the same, a non-contiguous array (raises naming it), an
    overlap (raises naming both), or a NumPy whose struct layout is not the expected
    one. Returns the grads' data addresses.
    """
    n = len(params)
    if any(type(g) is not np.ndarray and is_cuda_array(g) for g in grads):
        _check_all_device(params, grads, states, labels)  # raises: a host/device mix
    for i in range(n):
        p, g = params[i], grads[i]
        if (type(g) is not np.ndarray or not g.flags.c_contiguous
                or g.dtype != p.dtype or g.shape != p.shape):
            check_triple(p, g, states[i], labels[i])  # raises, naming it
    gaddr = np.fromiter((_address(g) for g in grads), np.int64, n)
    check_no_overlap(plan.paddr, gaddr, plan.haddr, plan.nbytes, labels)
    plan.learn_grads(grads)  # (their dtype objects and types: the scan's next step)
    return gaddr


def _check_all_device(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                      labels: Sequence[Labels]) -> None:
    roles = ((params, "param"), (grads, "grad"), (states, "state"))
    device = next(getattr(lab, attr) for seq, attr in roles
                  for x, lab in zip(seq, labels) if is_cuda_array(x))
    for seq, attr in roles:
        for x, lab in zip(seq, labels):
            if not is_cuda_array(x):
                raise TypeError(
                    f"{getattr(lab, attr)} is a host array ({describe(x)}) but {device} "
                    "is a CUDA array; pass all arrays on one device (nothing was "
                    "updated)")
