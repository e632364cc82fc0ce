"""Per-model plans: the work that stays the same between steps of one optimizer.

A training loop passes the same parameter and state arrays every step. Their
validation, data addresses, mutual overlap check, dtype groups and chunk tables are
computed once and kept in a :class:`Plan`. A cache of raw addresses is only safe while
it still describes the arrays, so every step :func:`scan` re-reads, in ONE compiled
call, what each cached array is *now* (type, data address, dtype, shape, contiguity,
writability) and compares it with the plan; the same call reads the fresh gradients'
addresses and checks that no gradient overlaps a parameter or state. Anything that no
longer matches (an in-place ``dtype``/``shape`` change, ``resize(refcheck=False)``, a
deep copy or an unpickled optimizer) sends the caller back to full validation, which
re-plans or raises naming the array. Nothing is written through an address that was
not confirmed in the same call.

The fields are read from NumPy's ``PyArrayObject`` struct (``numpy/ndarraytypes.h``:
``data``, ``nd``, ``dimensions``, ``descr``, ``flags`` after the object header): it is
the layout every compiled NumPy extension is built against, so it is stable across
releases, but it is not a Python API. :func:`struct_layout_ok` checks it against
``__array_interface__`` on probe arrays at first use; if it ever differs the fast scan is
switched off with one logged warning and every step takes the slow, Python-level path
(same checks, ~1 us per array instead of ~0.03 us).
"""

from __future__ import annotations

import bisect
import logging
import operator
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from . import config, cpu
from ._arrays import Labels, _address, check_no_overlap
from ._jit import jit

log = logging.getLogger("fastadagrad")

# --- reading NumPy's array struct ------------------------------------------------

#: Byte offsets in PyArrayObject_fields on a 64-bit CPython: ob_refcnt, ob_type, data,
#: nd (int, padded), dimensions, strides, base, descr, flags (int).
OFF_TYPE, OFF_DATA, OFF_ND, OFF_DIMS, OFF_DESCR, OFF_FLAGS = 8, 16, 24, 32, 56, 64
C_CONTIGUOUS, WRITEABLE = 0x0001, 0x0400  # NPY_ARRAY_C_CONTIGUOUS, NPY_ARRAY_WRITEABLE
#: CPython's PyListObject: ob_size (after ob_refcnt, ob_type), then ob_item.
OFF_LIST_SIZE, OFF_LIST_ITEMS = 16, 24


@intrinsic
def _load_i64(typingctx, address):  # type: ignore[no-untyped-def]
    """The 8-byte integer at ``address``."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.load(ptr)

    return types.int64(address), codegen


@intrinsic
def _load_i32(typingctx, address):  # type: ignore[no-untyped-def]
    """The 4-byte integer at ``address``, widened to int64."""
    if not isinstance(address, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], ir.IntType(32).as_pointer())
        return builder.sext(builder.load(ptr), ir.IntType(64))

    return types.int64(address), codegen


_LAYOUT_OK: bool | None = None


def struct_layout_ok() -> bool:
    """True if :data:`OFF_DATA` and friends describe this NumPy's arrays (checked once)."""
    global _LAYOUT_OK
    if _LAYOUT_OK is None:
        _LAYOUT_OK = False  # while probing: plans built by the probe take the slow path
        ok = _probe_layout()
        if not ok:
            log.warning("fastadagrad: NumPy's array struct does not have the expected "
                        "layout; per-step checks fall back to Python (slower, same "
                        "checks)")
        _LAYOUT_OK = ok
    return _LAYOUT_OK


class _Sub(np.ndarray):
    """An ndarray subclass: the scan must refuse it (another ``ob_type``)."""


def _probe_layout() -> bool:
    """Run :func:`scan` itself on arrays whose answers NumPy gives: a plain model must
    pass with the right grad addresses, and each kind of change (read-only, another
    dtype, shape or type, non-contiguous) must be caught at the right index. Checking
    the scan rather than a separate reader costs no extra compile (~0.3 s cold)."""
    if sys.maxsize != 2**63 - 1:
        return False
    params = [np.zeros(5, np.float32), np.zeros((2, 3, 4)), np.zeros((), np.float64),
              np.zeros(0, np.float32)]
    states = [np.zeros_like(a) for a in params]
    grads = [np.ones_like(a) for a in params]
    n = len(params)
    plan = Plan()
    plan.build(params, states, [Labels("p", "g", "h")] * n)
    plan.fast = True
    try:
        code, gaddr = plan.check(params, states, grads)
        if code != -1 or list(gaddr) != [a.__array_interface__["data"][0] for a in grads]:
            return False
        bad = {2 * n + 0: np.ones(5, np.float64),  # dtype
               2 * n + 1: np.ones((2, 3, 8))[:, :, ::2],  # not C-contiguous
               2 * n + 2: np.ones(1, np.float64),  # rank
               2 * n + 3: np.ones(0, np.float32).view(_Sub)}  # type
        for want, g in bad.items():
            if plan.check(params, states, [*grads[:want - 2 * n], g,
                                           *grads[want - 2 * n + 1:]])[0] != want:
                return False
        wrong_shape = [grads[0], np.ones((2, 3, 5)), *grads[2:]]
        if plan.check(params, states, wrong_shape)[0] != 2 * n + 1:
            return False
        states[1].flags.writeable = False
        if plan.check(params, states, grads)[0] != n + 1:
            return False
        # a param of an ndarray subclass (np.memmap's case) passes as long as it keeps
        # its type
        params[0] = params[0].view(_Sub)
        plan.build(params, [np.zeros_like(a) for a in params], [Labels("p", "g", "h")] * n)
        plan.fast = True
        if plan.check(params, plan.states, grads)[0] != -1:
            return False
    except Exception:  # pragma: no cover - a Numba that cannot compile the scan
        return False
    return True


# --- the per-step scan --------------------------------------------------------------

@jit(inline="always")
def _same(o, array_type, descr, shape, b, e, flags):
    """The array at ``o`` is of type ``array_type`` (an ndarray type object's address),
    with dtype object ``descr``, shape ``shape[b:e]`` and all of ``flags`` set."""
    if _load_i64(o + OFF_TYPE) != array_type or _load_i64(o + OFF_DESCR) != descr:
        return False
    if (_load_i32(o + OFF_FLAGS) & flags) != flags or _load_i32(o + OFF_ND) != e - b:
        return False
    dims = _load_i64(o + OFF_DIMS)
    for d in range(e - b):
        if _load_i64(dims + 8 * d) != shape[b + d]:
            return False
    return True


@jit()
def scan(plist, hlist, glist, obj, gaddr, meta, n, m):
    """Check a cached model against what its arrays are now; read the grads' addresses.

    ``plist``, ``hlist``, ``glist`` are the addresses of three Python lists (params,
    states, grads), whose item pointers are read here (``PyListObject.ob_item``): no
    per-array Python work at all. ``obj`` holds the cached params' then states' object
    addresses: the lists must hold exactly those objects (the plan keeps them alive,
    so an equal address is the same object). ``meta`` packs, in this order:
    ``descr`` (2n: each param's and state's dtype object), ``cached`` (3n: params' and
    states' data addresses, then each tensor's size in bytes), ``shape_off`` (n + 1)
    and ``w_start``/``w_end`` (m each: the params' and states' non-empty byte ranges
    sorted by start, which do not overlap each other: checked when the plan was
    built), ``types`` (2n: each param's and state's type object, the one it had when
    the plan was built: ``np.memmap`` arrays stay on this path), ``gdescr`` and
    ``gtypes`` (n each: the dtype and type objects each grad may have: the param's
    dtype object and ``np.ndarray`` when built, those of a grad the Python check
    accepted since, see :meth:`Plan.learn_grads`), then the shapes, concatenated (one
    array argument instead of eight: each costs ~0.1 us of unboxing per call).

    Params and states must have their recorded type and dtype object ``descr[k]``,
    grad ``i`` type ``gtypes[i]`` and dtype object ``gdescr[i]``; each array
    C-contiguous, with shape ``shape[shape_off[i]:shape_off[i+1]]``. Params and states
    must also be writable and still at data address ``cached[k]``. Grads' addresses go
    to ``gaddr``; a non-empty grad range that intersects a written range is reported.

    Returns -1 when everything holds, ``k`` (< 3n) for the first array that does not
    (params and states first), or ``3n + i`` when grad ``i`` overlaps a param or state.
    """
    # offsets into meta (plain indexing: slices would be views that Numba refcounts)
    cached, shape_off, w_start = 2 * n, 5 * n, 6 * n + 1
    w_end, tys = w_start + m, w_start + 2 * m
    gdescr, gtys = tys + 2 * n, tys + 3 * n
    shape = tys + 4 * n
    if _load_i64(plist + OFF_LIST_SIZE) != n or _load_i64(hlist + OFF_LIST_SIZE) != n:
        return 0
    if _load_i64(glist + OFF_LIST_SIZE) != n:
        return 2 * n
    pitems = _load_i64(plist + OFF_LIST_ITEMS)
    hitems = _load_i64(hlist + OFF_LIST_ITEMS)
    items = _load_i64(glist + OFF_LIST_ITEMS)
    # params, then states (unchanged since the plan was built), then grads (fresh arrays
    # of the params' dtypes and shapes): one loop, so one inlined copy of _same (each
    # copy cost ~50 ms of the first compile)
    for k in range(3 * n):
        if k < 2 * n:
            i = k if k < n else k - n
            o = _load_i64((pitems if k < n else hitems) + 8 * i)
            if o != obj[k]:
                return k
            d, flags, ty = meta[k], C_CONTIGUOUS | WRITEABLE, meta[tys + k]
        else:
            i = k - 2 * n
            o = _load_i64(items + 8 * i)
            d, flags, ty = meta[gdescr + i], C_CONTIGUOUS, meta[gtys + i]
        if not _same(o, ty, d, meta, shape + meta[shape_off + i],
                     shape + meta[shape_off + i + 1], flags):
            return k
        if k < 2 * n:
            if _load_i64(o + OFF_DATA) != meta[cached + k]:
                return k
        else:
            gaddr[i] = _load_i64(o + OFF_DATA)
    for i in range(n):
        nb = meta[cached + 2 * n + i]
        if nb == 0 or m == 0:
            continue
        gs = gaddr[i]
        # j: the first written range ending after gs (``np.searchsorted(w_end, gs,
        # side="right")``, written out: the library one made the cached scan import
        # numba.np.arraymath and numba.cpython.unicode when loaded, ~30 ms)
        j, hi = 0, m
        while j < hi:
            mid = (j + hi) >> 1
            if meta[w_end + mid] <= gs:
                j = mid + 1
            else:
                hi = mid
        if j < m and meta[w_start + j] < gs + nb:
            return 3 * n + i
    return -1


@jit()
def _data_addresses(lst, out):
    """``out[i]``: the data address of item ``i`` of the Python list at ``lst`` (exact
    ndarrays), read from NumPy's array struct."""
    items = _load_i64(lst + OFF_LIST_ITEMS)
    for i in range(out.size):
        out[i] = _load_i64(_load_i64(items + 8 * i) + OFF_DATA)


def data_addresses(arrays: list) -> list[int]:
    """The data addresses of ``arrays``, a list of arrays of type ``np.ndarray`` exactly
    (the caller checked each one's type): one compiled read where the struct's layout
    is the expected one (:func:`struct_layout_ok`), ``__array_interface__`` otherwise
    (~1 us an array: most of the 16-bit path's check of a model's aliases)."""
    if type(arrays) is list and len(arrays) > 2 and struct_layout_ok():
        out = np.empty(len(arrays), np.int64)
        _data_addresses(id(arrays), out)  # (``arrays`` holds its items alive)
        return out.tolist()
    return [_address(a) for a in arrays]


# --- chunk tables -----------------------------------------------------------------

_TABLES: dict[tuple[int, int, tuple[int, ...]],
              tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def chunk_table(sizes: tuple[int, ...], threads: int = 1
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tensor, start, length) of every span of at most ``config.CHUNK`` elements.

    With ``threads > 1`` the table is laid out for the parallel kernels' static
    schedule, which hands thread k the k-th of ``threads`` equal runs of the table: the
    elements of all tensors, in memory order, are cut into ``threads`` ranges of equal
    size (each cut rounded down to a multiple of 16 elements of its tensor), each range
    is split into spans, and shorter runs are padded with empty spans (length 0) so
    that every run has the same number of entries. Each thread thus streams through
    one contiguous stretch of the model. The previous layout (spans longest first,
    dealt round-robin) balanced the work as well but sent each thread through every
    other 64 KiB of a tensor: 1.5x slower on one 2^20 float32 tensor (238 vs 154 us;
    the flat kernel 154 us) and 614 vs 453 us on the 100-tensor model (2-core AMD EPYC,
    interleaved). Cached per model layout: a training loop asks for the same table
    every step.
    """
    chunk = config.chunk()
    key = (chunk, threads, sizes)
    table = _TABLES.get(key)
    if table is None:
        table = _build_table(sizes, max(1, threads), chunk)
        if len(_TABLES) > 64:
            _TABLES.clear()
        _TABLES[key] = table
    return table


def _build_table(sizes: tuple[int, ...], threads: int, chunk: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ends = np.cumsum(np.asarray(sizes, np.int64)).tolist()
    starts = [e - s for e, s in zip(ends, sizes)]
    total = ends[-1] if ends else 0
    cuts = [0]
    for k in range(1, threads):
        c = k * total // threads
        i = bisect.bisect_right(ends, c)  # the tensor that holds element c
        if i < len(sizes):
            c = starts[i] + (c - starts[i]) // 16 * 16
        cuts.append(max(c, cuts[-1]))
    cuts.append(total)
    runs = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        run = []
        i = bisect.bisect_right(ends, lo)
        while lo < hi:
            b = min(hi, ends[i])
            run += [(i, s - starts[i], min(chunk, b - s)) for s in range(lo, b, chunk)]
            lo, i = b, i + 1
        runs.append(run)
    width = max(map(len, runs))
    rows = []
    for run in runs:
        pad = (run[-1][0] if run else 0, 0, 0)
        rows += run + [pad] * (width - len(run))
    table = np.array(rows, np.int64).reshape(-1, 3)
    return (np.ascontiguousarray(table[:, 0]), np.ascontiguousarray(table[:, 1]),
            np.ascontiguousarray(table[:, 2]))


# --- the plan ---------------------------------------------------------------------

class Plan:
    """What stays the same between steps of one optimizer, computed once.

    Holds references to the validated param and state arrays (so their ids stay
    valid), their addresses and descriptions, dtype groups and chunk tables. A plan is
    never copied or pickled with its contents: ``copy.deepcopy`` and ``pickle`` give an
    empty plan (the copy's arrays live elsewhere), rebuilt at the next step.
    """

    __slots__ = ("params", "states", "descrs", "paddr", "haddr", "nbytes", "obj", "meta",
                 "nw", "gaddr", "groups", "threads", "fast", "coef_cache", "gpu", "par",
                 "chunk", "gkinds", "gmeta", "coef_last")

    def __init__(self) -> None:
        self.params: tuple[Any, ...] = ()
        self.states: tuple[Any, ...] = ()
        self.gaddr = np.empty(0, np.int64)
        self.par: tuple[int, bool] | None = None  # (threshold, any_parallel() at it)
        # (id(hyper), step) -> (hyper, kernel scalars per dtype group, (serial kernel,
        # float scalars) per group): filled by the dispatcher, emptied with the groups
        self.coef_cache: dict[tuple[int, int], tuple[Any, list, list]] = {}
        self.coef_last: tuple[Any, list, list] | None = None
        self.gpu: Any = None  # the GPU path's cache (fastadagrad.cuda.GpuCache)

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy and pickle: empty
        return (Plan, ())

    def clear(self) -> None:
        self.params, self.states = (), ()
        self.gpu = None  # device tables and counters are rebuilt from the host state

    def matches(self, params: Sequence[Any], states: Sequence[Any]) -> bool:
        """The same array objects as when the plan was built (their contents and
        description are checked every step by :meth:`check`)."""
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
        obj = np.zeros(2 * n, np.int64)
        obj[:n] = np.fromiter(map(id, params), np.int64, n)
        obj[n:] = np.fromiter(map(id, states), np.int64, n)
        shapes = [a.shape for a in params]
        shape_off = np.zeros(n + 1, np.int64)
        np.cumsum(np.fromiter(map(len, shapes), np.int64, n), out=shape_off[1:])
        shape = np.fromiter((d for s in shapes for d in s), np.int64, int(shape_off[-1]))
        # the scan compares dtype objects by address: keep them alive, so that no other
        # dtype object (a byte-swapped float32, say, after ``a.dtype = ...`` freed one)
        # can take an address the plan trusts
        self.descrs = tuple(a.dtype for seq in (params, states) for a in seq)
        descr = np.fromiter(map(id, self.descrs), np.int64, 2 * n)
        start = np.concatenate((paddr, haddr))
        size = np.concatenate((nbytes, nbytes))
        keep = size > 0
        order = np.argsort(start[keep], kind="stable")
        w_start = start[keep][order]
        # (a type object is alive while an array of it is: the plan holds the arrays)
        tys = np.fromiter((id(type(a)) for seq in (params, states) for a in seq),
                          np.int64, 2 * n)
        # what each grad may be (learn_grads adds others): the param's dtype object, a
        # plain ndarray; the objects are kept alive (self.descrs, self.gkinds)
        self.gkinds: list[Any] = [None] * n
        self.meta = np.concatenate((descr, paddr, haddr, nbytes, shape_off, w_start,
                                    w_start + size[keep][order], tys, descr[:n],
                                    np.full(n, _NDARRAY, np.int64), shape))
        self.gmeta = 6 * n + 1 + 2 * int(w_start.size) + 2 * n  # (gdescr's offset)
        self.nw = int(w_start.size)
        self.paddr, self.haddr, self.nbytes = paddr, haddr, nbytes
        self.obj, self.gaddr = obj, np.empty(n, np.int64)
        self.fast = struct_layout_ok()
        self.params, self.states = tuple(params), tuple(states)
        # the thread count only orders the table for the parallel kernel: a model below
        # its threshold runs serially (the dispatcher re-plans it if the threshold drops
        # under it) and does not start Numba's thread pool (~15 ms on first use, 2-core
        # AMD EPYC); nor does the layout probe's model
        self.plan_groups(1)
        if self.any_parallel():  # the rule of cpu_update_many
            self.plan_groups(cpu.numba_threads())

    def any_parallel(self) -> bool:
        """Whether a dtype group reaches the parallel kernels' threshold for its dtype
        (the threshold read now: it may be changed between steps; the answer kept
        while it and the groups stay the same)."""
        t, par = config.PARALLEL_THRESHOLD, self.par
        if par is None or par[0] != t:
            par = self.par = (t, any(g[3] >= config.parallel_from(g[0].itemsize, t)
                                     for g in self.groups))
        return par[1]

    def check(self, params: Sequence[Any], states: Sequence[Any], grads: Sequence[Any]
              ) -> tuple[int, np.ndarray]:
        """:func:`scan` this step: ``(code, grad addresses)``.

        Code -1: ``params`` and ``states`` are the plan's arrays, unchanged, and the
        grads are plain C-contiguous arrays of their dtypes and shapes that overlap
        neither. Below ``2n``: a param or state is not what the plan describes (build
        again). From ``2n``: a grad needs a closer look. The address array is this
        call's own: a plan shared by two threads' calls (a misuse, see
        docs/guarantees.md) must not hand one call's kernel the other's gradients,
        which may be freed by then.
        """
        if not self.params or not self.fast:
            return 0, self.gaddr
        lists = [x if type(x) is list else list(x) for x in (params, states, grads)]
        gaddr = np.empty(len(self.params), np.int64)
        code = scan(id(lists[0]), id(lists[1]), id(lists[2]), self.obj, gaddr,
                    self.meta, len(self.params), self.nw)
        return code, gaddr

    def learn_grads(self, grads: Sequence[Any]) -> None:
        """Let the scan accept, from the next step on, grads of the dtype objects and
        array types of ``grads``, which the Python check just accepted: a dtype equal
        to the param's but another object (arrays from ``pickle``: ``x @ w`` keeps
        ``x``'s dtype object), an ndarray subclass (``np.memmap``). Without this every
        step took the Python check (9-13x slower on a 50-array model). The objects are
        kept alive with the plan: no other object can take an address it trusts."""
        if not self.params or len(grads) != len(self.params):
            return
        n, meta, at = len(self.params), self.meta, self.gmeta
        for i, g in enumerate(grads):
            dt, ty = g.dtype, type(g)
            if id(dt) != meta[at + i] or id(ty) != meta[at + n + i]:
                self.gkinds[i] = (dt, ty)
                meta[at + i], meta[at + n + i] = id(dt), id(ty)

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
        self.groups, self.threads, self.par = groups, threads, None
        self.chunk = config.CHUNK  # (the tables' span length: a setting read at build)
        self.coef_cache = {}
        self.coef_last = None  # (the last hit: its groups are these)


_NDARRAY = id(np.ndarray)
