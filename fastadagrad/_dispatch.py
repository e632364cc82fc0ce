"""The thin layer between the public API and the kernels.

Validation (shapes, dtypes, contiguity, writability, aliasing, hyperparameters), the
CPU/GPU choice, the serial/parallel choice and the chunk tables live here, so that
``cpu.py`` and ``cuda.py`` stay bare loops. Everything is checked before the first
write: an error leaves every input bit-unchanged.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from . import _hyper as H
from . import config, cpu
from ._jit import jit

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
            "float32 and float64 arrays in native byte order only"
        )
    if not x.flags.c_contiguous:
        raise ValueError(f"{label} is not C-contiguous; pass np.ascontiguousarray(...) "
                         "(a parameter must be updated in place, so no copy is made)")
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


@jit()
def _find_overlap(start, end, writable):
    """Indices ``(i, j)`` of two byte ranges that overlap where one is written, or (-1, -1).

    Sweep over ranges sorted by start, tracking the furthest end seen so far among
    all ranges and among written ranges. Empty ranges never overlap.
    """
    order = np.argsort(start, kind="mergesort")
    far_all, arg_all = 0, -1
    far_w, arg_w = 0, -1
    for k in range(order.size):
        i = order[k]
        if end[i] <= start[i]:
            continue
        if arg_w >= 0 and start[i] < far_w:
            return arg_w, i
        if writable[i] and arg_all >= 0 and start[i] < far_all:
            return arg_all, i
        if end[i] > far_all:
            far_all, arg_all = end[i], i
        if writable[i] and end[i] > far_w:
            far_w, arg_w = end[i], i
    return -1, -1


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


# --- chunk tables -----------------------------------------------------------------

_TABLES: dict[tuple[int, int, tuple[int, ...]],
              tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def chunk_table(sizes: tuple[int, ...], threads: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor, start, length) of every span of at most ``config.CHUNK`` elements.

    With ``threads > 1`` the spans are ordered for the parallel kernel's static
    schedule, which hands each thread one contiguous run of the table: longest first,
    dealt round-robin into one run per thread, so every thread gets about the same
    number of elements. In tensor order a 100-tensor model (2.95M f32) gave one thread
    1.16M elements and the other 1.79M: the kernel took 960 us, balanced 761 us (a flat
    buffer: 671 us). Cached per model layout: a training loop asks for the same table
    every step.
    """
    key = (config.CHUNK, threads, sizes)
    table = _TABLES.get(key)
    if table is None:
        chunk = config.CHUNK
        sz = np.asarray(sizes, np.int64)
        counts = (sz + chunk - 1) // chunk
        tensor = np.repeat(np.arange(sz.size, dtype=np.int64), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        start = (np.arange(tensor.size, dtype=np.int64) - first) * chunk
        length = np.minimum(sz[tensor] - start, chunk)
        if threads > 1 and tensor.size > 1:
            order = np.argsort(-length, kind="stable")
            order = np.concatenate([order[k::threads] for k in range(threads)])
            tensor, start, length = tensor[order], start[order], length[order]
        table = (tensor, start, length)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


# --- CPU --------------------------------------------------------------------------

@functools.lru_cache(maxsize=512)
def _coefficients(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple:
    return hyper.coefficients(dtype, step)


def coefficients(hyper: H.Hyper, dtype: np.dtype, step: int) -> tuple:
    """``hyper.coefficients`` memoised: ~2 us of scalar casts saved on every call.

    The step only matters through ``lr_decay``; without it every step shares one entry.
    """
    return _coefficients(hyper, dtype, step if hyper.lr_decay else 1)


def _has_nonfinite(g: np.ndarray, coefs: tuple) -> bool:
    if g.size >= config.PARALLEL_THRESHOLD:
        with cpu.PARALLEL_LOCK:
            return bool(cpu.flat_has_nonfinite_parallel(g, config.CHUNK, coefs[6],
                                                         coefs[7]))
    return bool(cpu.span_has_nonfinite(g, coefs[6], coefs[7]))


def cpu_update_one(p: np.ndarray, g: np.ndarray, h: np.ndarray, coefs: tuple,
                   nonfinite: str, labels: Labels) -> bool:
    """Fused step on one validated triple; False when ``nonfinite='skip'`` skipped it."""
    n = p.size
    pf, gf, hf = p.reshape(-1), g.reshape(-1), h.reshape(-1)
    if nonfinite != "ignore" and _has_nonfinite(gf, coefs):
        if nonfinite == "raise":
            raise FloatingPointError(f"{labels.grad} contains NaN or inf; nothing was "
                                     "updated")
        return False
    if n >= config.PARALLEL_THRESHOLD:
        with cpu.PARALLEL_LOCK:
            cpu.adagrad_flat_parallel(pf, gf, hf, config.CHUNK, *coefs)
    elif n:
        cpu.adagrad_span(pf, gf, hf, *coefs)
    return True


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # type: ignore[no-any-return]


class Plan:
    """What stays the same between steps of one optimizer, computed once.

    A training loop passes the same parameter and state arrays every step: their
    validation, data addresses, mutual overlap check, dtype groups and chunk tables
    are kept here while the very same objects come back. Holding references also
    makes the cached addresses safe: ``ndarray.resize`` refuses to reallocate an
    array that is referenced elsewhere. Gradients are fresh arrays every step and are
    checked every step (one ``__array_interface__`` read each: shape, dtype,
    contiguity and address at once).
    """

    __slots__ = ("params", "states", "paddr", "haddr", "nbytes", "typestr", "shape",
                 "groups", "threads")

    def __init__(self) -> None:
        self.params: tuple[Any, ...] = ()
        self.states: tuple[Any, ...] = ()

    def matches(self, params: Sequence[Any], states: Sequence[Any]) -> bool:
        return (len(params) == len(self.params) and len(states) == len(self.states)
                and all(map(operator.is_, params, self.params))
                and all(map(operator.is_, states, self.states)))

    def build(self, params: Sequence[np.ndarray], states: Sequence[np.ndarray],
              labels: Sequence[Labels]) -> None:
        """Cache a validated model (params and states checked by the caller)."""
        n = len(params)
        self.params, self.states = (), ()
        paddr = np.fromiter((_address(a) for a in params), np.int64, n)
        haddr = np.fromiter((_address(a) for a in states), np.int64, n)
        nbytes = np.fromiter((a.nbytes for a in params), np.int64, n)
        # params and states must not overlap each other (grads are checked per step)
        check_no_overlap(paddr, np.zeros(n, np.int64), haddr, nbytes, labels,
                         grads=False)
        self.paddr, self.haddr, self.nbytes = paddr, haddr, nbytes
        self.typestr = [a.__array_interface__["typestr"] for a in params]
        self.shape = [a.shape for a in params]
        self.params, self.states = tuple(params), tuple(states)
        self.plan_groups(numba.get_num_threads())

    def plan_groups(self, threads: int) -> None:
        """Dtype groups and their chunk tables, balanced for ``threads`` threads."""
        params = self.params
        n = len(params)
        sizes = [a.size for a in params]
        dtypes = sorted({a.dtype for a in params}, key=lambda d: d.itemsize)
        groups = []
        for dt in dtypes:
            idx = None if len(dtypes) == 1 else np.fromiter(
                (i for i in range(n) if params[i].dtype == dt), np.int64)
            gsizes = tuple(sizes) if idx is None else tuple(sizes[i] for i in idx)
            groups.append((np.empty(0, dt), idx, chunk_table(gsizes, threads),
                           sum(gsizes)))
        self.groups, self.threads = groups, threads


def cpu_update_many(params: Sequence[np.ndarray], grads: Sequence[Any],
                    states: Sequence[np.ndarray], labels: Sequence[Labels],
                    hyper: H.Hyper, step: int, nonfinite: str, plan: Plan) -> bool:
    """Fused step over many triples: one compiled call per dtype.

    ``plan`` must match ``params``/``states`` (validated); grads are checked here.
    """
    n = len(params)
    for i, p in enumerate(params):
        if not p.flags.writeable:
            check_host_array(p, labels[i].param, writable=True)
    gaddr = np.empty(n, np.int64)
    typestr, shape = plan.typestr, plan.shape
    for i, g in enumerate(grads):
        ai = g.__array_interface__ if type(g) is np.ndarray else None
        if (ai is None or ai["strides"] is not None or ai["typestr"] != typestr[i]
                or ai["shape"] != shape[i]):
            if type(g) is not np.ndarray and is_cuda_array(g):
                _check_all_device(params, grads, states, labels)  # raises: a mix
            check_triple(params[i], g, states[i], labels[i])  # raises, naming it
            ai = g.__array_interface__  # a C-contiguous array with explicit strides
        gaddr[i] = ai["data"][0]
    check_no_overlap(plan.paddr, gaddr, plan.haddr, plan.nbytes, labels)
    threads = numba.get_num_threads()  # thread-local: a caller may change it any time
    if threads != plan.threads:
        plan.plan_groups(threads)

    runs = []
    for proto, idx, table, total in plan.groups:
        coefs = coefficients(hyper, proto.dtype, step)
        addrs = (plan.paddr, gaddr, plan.haddr) if idx is None else (
            plan.paddr[idx], gaddr[idx], plan.haddr[idx])
        runs.append((proto, idx, addrs, table, total, coefs))

    if nonfinite != "ignore":  # read-only pre-pass over every gradient before any write
        first = -1
        for proto, idx, (_, ga, _), (ct, cs, cl), total, coefs in runs:
            if total >= config.PARALLEL_THRESHOLD:
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

    for proto, _, (pa, ga, ha), (ct, cs, cl), total, coefs in runs:
        if total >= config.PARALLEL_THRESHOLD:
            with cpu.PARALLEL_LOCK:
                cpu.adagrad_many_parallel(proto, pa, ga, ha, ct, cs, cl, *coefs)
        else:
            cpu.adagrad_many_serial(proto, pa, ga, ha, ct, cs, cl, *coefs)
    return True


# --- front door -------------------------------------------------------------------

def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           labels: Sequence[Labels], hyper: H.Hyper, step: int, nonfinite: str,
           plan: Plan | None = None) -> bool:
    """Validate everything, then run one fused step on the CPU or the GPU.

    The device is chosen by the kind of arrays passed: NumPy arrays run on the CPU,
    CUDA arrays (``__cuda_array_interface__``: Numba, CuPy, torch) on the GPU. A mix
    is an error. Returns False if the step was skipped (``nonfinite='skip'``).
    ``plan`` (optional, owned by an optimizer) caches per-model work across steps.
    """
    n = len(params)
    if not (len(grads) == len(states) == len(labels) == n):
        raise ValueError("params, grads and states must have the same length")
    if plan is not None and n > 1 and plan.matches(params, states):
        # the same host params and states as the last step: only the grads are new,
        # and cpu_update_many checks each of them (a CUDA grad there is a mix error)
        return cpu_update_many(params, grads, states, labels, hyper, step, nonfinite,
                               plan)
    if any(type(x) is not np.ndarray and is_cuda_array(x)
           for seq in (params, grads, states) for x in seq):
        _check_all_device(params, grads, states, labels)
        from . import cuda

        return cuda.update(params, grads, states, labels, hyper, step, nonfinite)
    if n == 1:
        p, g, h = params[0], grads[0], states[0]
        lab = labels[0]
        check_triple(p, g, h, lab)
        if np.may_share_memory(p, g) or np.may_share_memory(p, h) or \
                np.may_share_memory(g, h):
            check_no_overlap(*(np.array([_address(a)], np.int64) for a in (p, g, h)),
                             np.array([p.nbytes], np.int64), labels)
        return cpu_update_one(p, g, h, coefficients(hyper, p.dtype, step), nonfinite, lab)
    if plan is None or not plan.matches(params, states):
        plan = plan if plan is not None else Plan()
        for i in range(n):
            check_triple(params[i], grads[i], states[i], labels[i])
        plan.build(params, states, labels)
    return cpu_update_many(params, grads, states, labels, hyper, step, nonfinite, plan)


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
