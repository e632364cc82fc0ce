"""CPU kernels: the fused one-pass AdaGrad update, compiled with Numba.

Each kernel is a bare loop over flat buffers that reads ``p``, ``g``, ``h`` once and
writes ``p``, ``h`` once per element (20 bytes per float32 element): no temporaries,
no ``fastmath`` (``sqrt`` and ``/`` stay IEEE, nothing is contracted into an FMA
except where a formula asks for one explicitly through :func:`fma`).

The formula variant (the ``flags`` bit mask of ``Hyper.coefficients``) is a
compile-time constant, as in ``cuda.py``: :func:`kernels` builds, on first use of a flag
set, kernels whose loop holds only that variant's operations (``tests/test_cpu_kernels.py``
checks the IR). One loop carrying all seven flags as run-time values made LLVM unswitch
it into many copies. Cold compile of the float32 default variant, fresh process, 2-core
AMD EPYC, load 1.1-1.5 (two runs each, before -> after): serial 0.68/0.68 s ->
0.37/0.37 s, flat parallel 0.91/0.97 s -> 0.54/0.54 s, many-tensor parallel 0.97/1.04 s
-> 0.82/0.82 s. Numba's on-disk cache keeps each variant apart (its index key includes
the closure's constants); loaded from it, each kernel's first call takes 3-15 ms after
the first one (~0.14 s: Numba's own start). Passing the flags as a ``numba.literally``
argument instead re-types the function on every call (7 ms per call measured), and a
flag-encoding
argument type (a namedtuple class per flag set) costs ~0.5 us per call to fingerprint.

The loops are the plain fused loop and nothing more: ``for i in prange(n)`` (parallel)
or ``for i in range(n)`` (serial). A 64-element blocking with ``llvm.prefetch`` 256
elements ahead had won ~5% on one Intel Xeon and lost 1.2-2.9x on an AMD EPYC Zen 4
(2^16 f32 serial 140 us vs 63 us plain), so it was removed; ``bench/plain.py`` keeps the
plain loop as a benchmark comparator so that any regression shows in ``make bench``,
and ``bench/cpu_probe.py`` measures both on a new machine.

Validation, dispatch and the parallel/serial choice live in ``_dispatch.py``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic, overload

from . import _hyper as H
from . import config
from ._intrinsics import _view, chunk_views, fma, layer_threads  # noqa: F401  (fma: part of this module's API)
from ._jit import jit
from .config import parallel_from


@intrinsic
def _like(typingctx, x, arr):  # type: ignore[no-untyped-def]
    """``x`` converted to ``arr``'s dtype (round to nearest, as ``np.float32(x)``).

    A coefficient may arrive as a NumPy scalar of the array dtype (a no-op here) or as a
    Python float: the dispatcher unboxes a Python float in ~5 ns and a NumPy scalar in
    ~50 ns, which is 0.3 us of a 1 us call with seven coefficients. Rounding the double
    here gives the bits ``np.float32(x)`` would.
    """
    if not (isinstance(x, (types.Float, types.Integer)) and isinstance(arr, types.Array)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return context.cast(builder, args[0], sig.args[0], sig.return_type)

    return arr.dtype(x, arr), codegen


# error_model="numpy" everywhere: no ZeroDivisionError check, so the loops vectorise
# (zmm vsqrtps/vdivps); with the default "python" model a serial loop stays scalar, ~6x
# slower. inline="always": Numba pastes the body into each caller before typing, where
# ``flags`` is the caller's compile-time constant, so only one variant reaches LLVM.
@jit(error_model="numpy", inline="always")
def _update_at(p, g, h, i, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale,
               flags):
    """One element of the fused step (the math is in :func:`kernels`' docstring)."""
    # loop-invariant: LLVM hoists the conversions out of the loop
    lr_num, lr_after, eps_in, eps_out = (_like(lr_num, p), _like(lr_after, p),
                                         _like(eps_in, p), _like(eps_out, p))
    wd, lr_wd, grad_scale = _like(wd, p), _like(lr_wd, p), _like(grad_scale, p)
    gi = g[i]
    if flags & H.GRAD_SCALE:
        gi = gi / grad_scale
    if flags & H.MAXIMIZE:
        gi = -gi
    pi = p[i]
    if flags & H.WD_COUPLED:
        if flags & H.FMA_WEIGHT_DECAY:
            gi = fma(pi, wd, gi)
        else:
            gi = gi + pi * wd
    elif flags & H.WD_DECOUPLED:
        pi = pi - (pi * wd) * lr_wd
    if flags & H.FMA_ACCUMULATE:
        hi = fma(gi, gi, h[i])
    else:
        hi = h[i] + gi * gi
    # The placements the flags do not select have their coefficient at 0 (eps_in,
    # eps_out) or 1 (lr_num, lr_after), and the operation on it is exact: ``h + 0`` is
    # ``h`` (``h`` is never -0: it is a sum with g*g, and -0 + +0 is +0), so is
    # ``sqrt(x) + 0`` (a square root is never -0 here), ``1 * g`` is ``g``, ``q * 1`` is
    # ``q``, NaN payloads included. Leaving them out keeps the bits and the default loop
    # is the NumPy class's formula, operation for operation (LLVM keeps ``x + 0.0``: it
    # cannot know x is not -0, so the ``+ eps_out`` of the inside placement would be one
    # more add per element than the plain loops of optax's and Keras's formulas have).
    if flags & H.EPS_INSIDE:
        d = math.sqrt(hi + eps_in)
    else:
        d = math.sqrt(hi) + eps_out
    if flags & H.LR_AFTER:
        q = gi / d
    else:
        q = (lr_num * gi) / d
    if flags & H.ZERO_WHERE_H0:
        if hi == eps_in - eps_in:
            q = eps_in - eps_in
    h[i] = hi
    if flags & H.LR_AFTER:
        p[i] = pi - q * lr_after
    else:
        p[i] = pi - q


@jit(error_model="numpy", inline="always")
def _chunk_at(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c, lr_num, lr_after,
              eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """The fused step over span ``c`` of a chunk table (the many-tensor kernels' body)."""
    pv, gv, hv = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
    for i in range(pv.size):
        _update_at(pv, gv, hv, i, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale,
                   flags)


@jit(error_model="numpy", inline="always")
def _nonfinite_at(g, i, grad_scale, flags):
    x = g[i] / _like(grad_scale, g) if flags & H.GRAD_SCALE else g[i]
    return np.int32(not math.isfinite(x))


def _checked_span(p, g, h, c, lr, threshold, flags):  # type: ignore[no-untyped-def]
    """Typing stub of the checked functional update (see :func:`_checked_span_impl`)."""


@overload(_checked_span, inline="always", jit_options={"error_model": "numpy"})
def _checked_span_impl(p, g, h, c, lr, threshold, flags):  # type: ignore[no-untyped-def]
    """One serial step on three arrays, checked inside the compiled call.

    What the Python validator would check, without it (its ~10 us per call were 5-10x
    the kernel at 2^10): the argument types decide at compile time whether these are
    C-contiguous float32/float64 arrays of one dtype and rank with ``p`` and ``h``
    writable (else the compiled function is just ``return 1``); at run time the shapes
    must match (2) and no two arrays may overlap (3). ``c`` holds the seven coefficients
    as float64 (``lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale``): one array
    argument instead of seven floats is ~0.1-0.15 us less of dispatcher work per call.
    The learning rate comes apart, as ``lr`` (a float: the step's ``clr``, rounded to
    the array dtype here, as the table's entries are), and takes the place of the
    table's three learning-rate entries: a learning-rate schedule changes only this
    argument (a new table per step cost ~1.5 us of a ~1 us call). The caller checks
    that ``lr`` is finite, >= 0 and, for float32, below float32's overflow threshold.
    At or above ``config.parallel_from(itemsize)`` of ``threshold``
    (``config.PARALLEL_THRESHOLD``), it returns 4 having checked everything but updated
    nothing (the caller runs the parallel kernel). Returns 0 after the update; codes 1-3
    mean nothing was written and the caller takes the full path, which raises the
    clear error.
    """
    arrays = (p, g, h)
    ok = (all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)
          and p.dtype in (types.float32, types.float64) and p.dtype == g.dtype == h.dtype
          and p.ndim == g.ndim == h.ndim and p.mutable and h.mutable
          and isinstance(c, types.Array) and c.dtype == types.float64 and c.ndim == 1
          and c.layout == "C")
    if not ok or not isinstance(lr, types.Float):
        return lambda p, g, h, c, lr, threshold, flags: 1

    def impl(p, g, h, c, lr, threshold, flags):
        if p.shape != g.shape or p.shape != h.shape or c.size != 7:
            return 2
        n = p.size
        nb = n * p.itemsize
        pa, ga, ha = p.ctypes.data, g.ctypes.data, h.ctypes.data
        if nb and ((pa < ga + nb and ga < pa + nb) or (pa < ha + nb and ha < pa + nb)
                   or (ga < ha + nb and ha < ga + nb)):
            return 3
        if n >= parallel_from(p.itemsize, threshold):
            return 4
        # flat views of the C-contiguous arrays (``reshape(n)``, whose implementation
        # is compiled apart, made the cached kernel import numba.np.arrayobj on loading)
        pf, gf, hf = _view(pa, n, p), _view(ga, n, g), _view(ha, n, h)
        eps_in, eps_out, wd, grad_scale = c[2], c[3], c[4], c[6]
        if flags & H.LR_AFTER:  # (the table's entries 0, 1 and 5, from lr)
            lr_num, lr_after = 1.0, lr
        else:
            lr_num, lr_after = lr, 1.0
        for i in range(n):
            _update_at(pf, gf, hf, i, lr_num, lr_after, eps_in, eps_out, wd, lr,
                       grad_scale, flags)
        return 0

    return impl


class Kernels(NamedTuple):
    """The CPU kernels of one formula variant (see :func:`kernels`)."""

    span: Any
    flat_parallel: Any
    many_parallel: Any
    many_serial: Any
    span_has_nonfinite: Any
    flat_has_nonfinite_parallel: Any
    first_nonfinite_many: Any
    first_nonfinite_many_serial: Any
    checked_span: Any


def _build(flags: int) -> Kernels:
    F = int(flags)  # a closure constant: Numba freezes it into the compiled code
    S = F & H.GRAD_SCALE  # the non-finite check depends on this bit only

    @jit(error_model="numpy")
    def span(p, g, h, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale):
        for i in range(p.size):
            _update_at(p, g, h, i, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                       grad_scale, F)

    # Plain prange over the elements (split statically into one contiguous run per
    # thread), as bench/plain.py. The previous prange over 16k-element chunks, each
    # walked in prefetching 64-element blocks, took 1.2-1.9x the time of the plain loop
    # on the 2-core EPYC (2^12..2^22 f32, interleaved, load 1.5). The seven
    # coefficients come as one float64 array ``c`` (as for checked_span): four
    # arguments instead of eleven are ~0.1 us less of dispatcher work per call.
    @jit(parallel=True, error_model="numpy")
    def flat_parallel(p, g, h, c):
        lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale = (
            c[0], c[1], c[2], c[3], c[4], c[5], c[6])
        for i in prange(p.size):
            _update_at(p, g, h, i, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                       grad_scale, F)

    @jit(parallel=True, error_model="numpy")
    def many_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen, lr_num,
                      lr_after, eps_in, eps_out, wd, lr_wd, grad_scale):
        for c in prange(ctensor.size):
            _chunk_at(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c, lr_num,
                      lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, F)

    @jit(error_model="numpy")
    def many_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen, lr_num,
                    lr_after, eps_in, eps_out, wd, lr_wd, grad_scale):
        for c in range(ctensor.size):
            _chunk_at(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c, lr_num,
                      lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, F)

    @jit(error_model="numpy")
    def checked_span(p, g, h, c, lr, threshold):
        return _checked_span(p, g, h, c, lr, threshold, F)

    if S != F:  # the check kernels are shared by every flag set with the same S
        k = kernels(S)
        return Kernels(span, flat_parallel, many_parallel, many_serial, *k[4:8],
                       checked_span)

    # An integer OR-reduction so the loop vectorises (a float sum would not: without
    # reassociation LLVM keeps float reductions in order). Read-only.
    @jit(error_model="numpy")
    def span_has_nonfinite(g, grad_scale):
        bad = np.int32(0)
        for i in range(g.size):
            bad |= _nonfinite_at(g, i, grad_scale, S)
        return bad != 0

    # The serial check alone made nonfinite='skip' 2x slower than 'ignore' at 2^24 f32
    # (bench/results/cpu.md); on all threads it is one extra read.
    @jit(parallel=True, error_model="numpy")
    def flat_has_nonfinite_parallel(g, chunk, grad_scale):
        bad = 0
        for i in prange(g.size):
            bad += _nonfinite_at(g, i, grad_scale, S)
        return bad != 0

    @jit(parallel=True, error_model="numpy")
    def first_nonfinite_many(proto, gaddr, ctensor, cstart, clen, grad_scale):
        isz = proto.itemsize
        nc = ctensor.size
        bad = np.zeros(nc, np.bool_)
        for c in prange(nc):
            n = clen[c]
            gv = _view(gaddr[ctensor[c]] + cstart[c] * isz, n, proto)
            b = np.int32(0)
            for i in range(n):
                b |= _nonfinite_at(gv, i, grad_scale, S)
            bad[c] = b != 0
        first = -1  # the lowest tensor index: the table may be in any order
        for c in range(nc):
            if bad[c] and (first < 0 or ctensor[c] < first):
                first = ctensor[c]
        return first

    @jit(error_model="numpy")
    def first_nonfinite_many_serial(proto, gaddr, ctensor, cstart, clen, grad_scale):
        isz = proto.itemsize
        first = -1  # the lowest tensor index: the table may be in any order
        for c in range(ctensor.size):
            t = ctensor[c]
            if first >= 0 and t >= first:
                continue
            n = clen[c]
            gv = _view(gaddr[t] + cstart[c] * isz, n, proto)
            b = np.int32(0)
            for i in range(n):
                b |= _nonfinite_at(gv, i, grad_scale, S)
            if b != 0:
                first = t
        return first

    return Kernels(span, flat_parallel, many_parallel, many_serial, span_has_nonfinite,
                   flat_has_nonfinite_parallel, first_nonfinite_many,
                   first_nonfinite_many_serial, checked_span)


_KERNELS: dict[int, Kernels] = {}
_BUILD_LOCK = threading.RLock()


def kernels(flags: int) -> Kernels:
    """The kernels of the formula variant ``flags``, built on first use (then cached).

    Per element, in the dtype of the arrays (every coefficient already cast to it),
    with ``(lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags)`` from
    :meth:`fastadagrad._hyper.Hyper.coefficients`::

        g' = g / grad_scale             if GRAD_SCALE
        g' = -g'                        if MAXIMIZE
        g' = g' + p * wd                if WD_COUPLED     (fma(p, wd, g') if FMA_WEIGHT_DECAY)
        p' = p - (p * wd) * lr_wd       if WD_DECOUPLED   (else p' = p)
        h  = h + g' * g'                                  (fma(g', g', h) if FMA_ACCUMULATE)
        q  = (lr_num * g') / (sqrt(h + eps_in) + eps_out)
        q  = 0                          if ZERO_WHERE_H0 and h == 0
        p  = p' - q * lr_after

    Without EPS_INSIDE the ``+ eps_in`` (0) is left out, with it the ``+ eps_out`` (0),
    and without LR_AFTER the ``* lr_after`` (1), with LR_AFTER the ``lr_num *`` (1):
    exact no-ops, so the bits are those of the formula above and the default loop is
    exactly the NumPy class,
    ``h += g*g; p -= lr*g / (sqrt(h) + eps)``, operation for operation.

    Each kernel takes the scalars without ``flags``: ``span(p, g, h, lr_num, ...,
    grad_scale)``, ``flat_parallel(p, g, h, c)`` (``c``: the seven as a float64
    array), ``many_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen, ...)``
    (and ``many_serial``), and the
    read-only non-finite checks ``span_has_nonfinite(g, grad_scale)``,
    ``flat_has_nonfinite_parallel(g, chunk, grad_scale)``, ``first_nonfinite_many(proto,
    gaddr, ctensor, cstart, clen, grad_scale)`` (and ``..._serial``). Compilation is
    lazy: nothing compiles until a kernel is first called with a dtype.
    """
    k = _KERNELS.get(flags)
    if k is None:
        with _BUILD_LOCK:
            k = _KERNELS.get(flags)
            if k is None:
                k = _KERNELS[flags] = _build(flags)
    return k


class _ByName(dict):  # type: ignore[type-arg]
    """flags -> that variant's kernel of one name, built on first use of the flags."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __missing__(self, flags: int) -> Any:
        kernel = self[flags] = getattr(kernels(flags), self.name)
        return kernel


class _ByFlags:
    """``name(*args, flags)``: the kernel ``kernels(flags).name`` called with ``args``.

    Keeps the entry points' historical signature (``flags`` last, as
    :meth:`Hyper.coefficients` returns it). The Python-level hop (a dict lookup and a
    tuple slice) costs a few hundred ns per call; a caller that keeps ``kernels(flags)``
    (or ``for_flags(flags)``) and passes Python floats skips it and the NumPy-scalar
    unboxing. ``signatures`` lists the distinct argument types compiled across flag
    sets (one per dtype in a training run); other attributes are those of the default
    variant's Numba dispatcher.
    """

    __slots__ = ("_by", "_doc")

    def __init__(self, name: str, doc: str) -> None:
        self._by = _ByName(name)
        self._doc = doc

    def __call__(self, *args: Any) -> Any:
        return self._by[args[-1]](*args[:-1])

    def for_flags(self, flags: int) -> Callable[..., Any]:
        return self._by[flags]  # type: ignore[no-any-return]

    @property
    def signatures(self) -> list[tuple[Any, ...]]:
        seen: dict[tuple[Any, ...], None] = {}
        for k in list(_KERNELS.values()):
            for sig in getattr(k, self._by.name).signatures:
                seen[tuple(sig)] = None
        return list(seen)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._by[0], attr)


adagrad_span = _ByFlags("span", "One fused AdaGrad step over equal-length 1-D spans "
                        "``p, g, h``: ``adagrad_span(p, g, h, *coefficients)``.")
adagrad_flat_parallel = _ByFlags("flat_parallel", "The fused step over one flat buffer on "
                                 "all threads: ``(p, g, h, chunk, *coefficients)``.")
adagrad_many_parallel = _ByFlags("many_parallel", "The fused step over many separate "
                                 "arrays in one compiled call, from a chunk table.")
adagrad_many_serial = _ByFlags("many_serial", "Serial twin of adagrad_many_parallel.")
span_has_nonfinite = _ByFlags("span_has_nonfinite", "True if any ``g`` (divided by "
                              "``grad_scale`` when GRAD_SCALE is set) is NaN or inf.")
flat_has_nonfinite_parallel = _ByFlags("flat_has_nonfinite_parallel",
                                       "span_has_nonfinite on all threads.")
first_nonfinite_many = _ByFlags("first_nonfinite_many", "Lowest index of a tensor whose "
                                "gradient has a NaN/inf, or -1. Read-only.")
first_nonfinite_many_serial = _ByFlags("first_nonfinite_many_serial",
                                       "Serial twin of first_nonfinite_many.")


#: Parallel kernels are called under this lock: Numba's workqueue layer aborts the
#: process when two Python threads enter parallel code at once, and even with omp two
#: concurrent 2-thread kernels only oversubscribe the cores. Serial kernels need none.
#: Entering it also starts Numba's threading layer as :func:`numba_threads` does.
class _ParallelLock:
    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        if not _STARTED:  # (before the lock: if the layer fails to start, it raises
            numba_threads()  # with the lock free, and the next call raises again)
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


PARALLEL_LOCK = _ParallelLock()
_STARTED = False


def numba_threads() -> int:
    """``numba.get_num_threads()``; the first call starts Numba's threading layer and
    leaves torch's thread count as it was, where torch is loaded. Numba's omp pool
    shares the OpenMP runtime torch loaded and, starting, sets that runtime's thread
    count to Numba's: after ``torch.set_num_threads(1)``, torch then ran on every core.
    Every path to the parallel kernels calls it first (or enters :data:`PARALLEL_LOCK`)."""
    global _STARTED
    if _STARTED:
        return _count()
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    n = numba.get_num_threads()
    _use_compiled_count(n)
    if before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)
    _STARTED = True
    return n


@jit()
def _compiled_count():  # type: ignore[no-untyped-def]
    return layer_threads()


#: what :func:`numba_threads` calls once the threading layer runs: ``_compiled_count``
#: where it gave Numba's count, else ``numba.get_num_threads``. The Python function
#: takes Numba's start-up lock (a multiprocessing lock) and then a ctypes call at every
#: call: 1.8-2.1 us between the parallel steps of a training loop on the 2-core Intel
#: Xeon, where the compiled call takes 0.15-0.35 us; a step of the 4-array 784-50-10
#: network takes ~20 us.
_count: Callable[[], int] = numba.get_num_threads


def _use_compiled_count(n: int) -> None:
    """Switch :data:`_count` to the compiled call if it returns ``n``, Numba's count just
    read, both as it is and after ``numba.set_num_threads`` (a layer whose symbol is
    missing or returns something else keeps the Python function)."""
    global _count
    try:
        if _compiled_count() != n:
            return
        if n > 1:
            numba.set_num_threads(n - 1)
            try:
                if _compiled_count() != n - 1:
                    return
            finally:
                numba.set_num_threads(n)
    except Exception:  # (a compile or link error: Numba's own function stays)
        return
    _count = _compiled_count


def _after_fork_in_child() -> None:
    """In a process forked from one that ran parallel kernels on Numba's omp layer,
    run the serial kernels only: GNU OpenMP cannot run a parallel region in such a
    child, and Numba terminates the process when one starts ("fork() called from a
    process already using GNU OpenMP, this is unsafe"), e.g. in a ``multiprocessing``
    worker forked after a training step. The same where torch is loaded and Numba's
    layer could be omp, even if Numba's pool never started: its omp layer then shares
    the OpenMP runtime torch's operations may have used, and the child's first parallel
    kernel hung. (The tbb and workqueue layers are fork-safe; a parent that used neither
    pool leaves the child free to start its own.) The lock is new too: a thread of the
    parent may have held it at the fork."""
    global PARALLEL_LOCK
    PARALLEL_LOCK = _ParallelLock()
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel region of Numba's has run in the parent
        asked = str(numba.config.THREADING_LAYER).lower()
        layer = "omp" if "torch" in sys.modules and asked not in ("tbb", "workqueue") \
            else None
    if layer == "omp":
        config.PARALLEL_THRESHOLD = sys.maxsize  # every size below it: serial


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


@jit()
def add_one_at(proto, addresses):
    """``x += 1`` for the one ``proto``-dtype number at each address, in order.

    The step counters of ``fastadagrad.torch`` (one 0-dim tensor per parameter): one
    compiled call for 100 of them takes ~1 us where ``torch._foreach_add_`` takes
    ~39 us (2-core AMD EPYC). Integer-valued counts + 1 are exact in either dtype.
    """
    for a in addresses:
        x = _view(a, 1, proto)
        x[0] += 1


@jit()
def next_common_at(proto, addresses):
    """``(True, x + 1)`` if the ``proto``-dtype numbers at ``addresses`` are all equal
    to one ``x`` (the sum rounded to the dtype, then widened to float64: the value
    :func:`add_one_at` will leave), else ``(False, 0.0)``. Read-only."""
    if addresses.size == 0:
        return True, 0.0
    first = _view(addresses[0], 1, proto)[0]
    for a in addresses:
        if _view(a, 1, proto)[0] != first:
            return False, 0.0
    nxt = np.empty(1, proto.dtype)  # + 1 rounded to the dtype, as add_one_at's store
    nxt[0] = first + 1
    return True, np.float64(nxt[0])
