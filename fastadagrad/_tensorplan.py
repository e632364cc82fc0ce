"""torch tensors on the CPU → one compiled call per dtype, with per-model work cached.

The dispatch layer of :mod:`fastadagrad.torch`: it reads each tensor's address with
``data_ptr()`` (no array interface, no copy), validates every tensor it will write
through in this very call, and hands address tables to the many-tensor kernels of
``cpu.py`` (torch's fused formula) or ``cpu_vsqrt.py`` (torch's eager formula).

What stays the same between steps of a training loop (the parameters' and
accumulators' addresses, shapes and dtypes, their mutual overlap check, the dtype
groups and their chunk tables) is kept in a :class:`TensorPlan`. The cache is keyed on
the addresses, shapes and dtypes read again at every step, so a parameter whose storage
was swapped (``p.data = ...``, ``load_state_dict``, ``resize_``) rebuilds the plan
instead of being written through a stale address. Gradients are new tensors every step
and are checked every step. Once a step's tensors passed every check, the next steps
read their metadata (type, device, layout, dtype, shape, strides, negative bit,
inference) in one C++ call of a guard kept in the plan (:mod:`_tensorguard`), and only
the addresses and storage sizes in Python.
"""

from __future__ import annotations

import bisect
import functools
import math
import operator
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

from . import _dispatch as D
from . import _tensorguard, config, cpu, cpu_rows, cpu_vsqrt, cpu_vsqrt_z0
from ._jit import jit

NP_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}

_ptr = torch.Tensor.data_ptr
_contig = torch.Tensor.is_contiguous
_is_neg = torch.Tensor.is_neg
_is_inference = torch.Tensor.is_inference
#: ``meta(t)``: (shape, dtype, is_cpu, layout), the description a plan is keyed on, read
#: in one call per tensor: for one tensor ~0.35 us where four passes cost ~1.3 us (the
#: fixed cost of a pass dominates small models), for 100 tensors about the same
meta = attrgetter("shape", "dtype", "is_cpu", "layout")
#: what a state tensor's key needs besides its address: its shape (checked against the
#: parameter's when the plan is built: a sum replaced by a view of another shape is
#: torch's error, not a flat update), dtype and device (a dense tensor cannot change
#: layout in place)
_state_meta = attrgetter("shape", "dtype", "is_cpu")
_dtype = attrgetter("dtype")
_storage = torch.Tensor.untyped_storage
_storage_nbytes = torch.UntypedStorage.nbytes
_offset = torch.Tensor.storage_offset
_lt, _sub, _mul = operator.lt, operator.sub, operator.mul
_numel = torch.Tensor.numel
_strided = torch.strided

#: kernel pairs (parallel, serial) by formula; both take
#: (proto, paddr, gaddr, haddr, ctensor, cstart, clen, *coefficients)
KERNELS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "fused": (cpu.adagrad_many_parallel, cpu.adagrad_many_serial),
    "vsqrt": (cpu_vsqrt.adagrad_many_vsqrt_parallel, cpu_vsqrt.adagrad_many_vsqrt_serial),
    # float32 and float64: the same bits as "vsqrt" where MKL's generic kernels run
    # (used per dtype only where its self-check against the routine passed)
    "vsqrt-emu": (cpu_vsqrt.adagrad_many_emu_parallel, cpu_vsqrt.adagrad_many_emu_serial),
    # the same bits where MKL's AVX-512 kernels run (float32 and float64, each used only
    # where its self-check passed)
    "vsqrt-z0": (cpu_vsqrt_z0.Z0.many_parallel, cpu_vsqrt_z0.Z0.many_serial),
}
#: the sparse row kernels (serial, parallel) by emulation of MKL's square root (None:
#: the routine itself; the generic family's kernels, told not to emulate)
SPARSE_KERNELS: dict[str | None, tuple[Callable[..., Any], Callable[..., Any]]] = {
    None: (cpu_vsqrt.EX.sparse_serial, cpu_vsqrt.EX.sparse_parallel),
    "vsqrt-emu": (cpu_vsqrt.EX.sparse_serial, cpu_vsqrt.EX.sparse_parallel),
    "vsqrt-z0": (cpu_vsqrt_z0.Z0.sparse_serial, cpu_vsqrt_z0.Z0.sparse_parallel),
}


#: tensor types whose ``__torch_function__`` is torch's own (or disabled, as
#: ``nn.Parameter``'s): reading their attributes runs no user code
_HOOKLESS = frozenset((torch.Tensor, torch.nn.Parameter))
_DISABLED_TF = torch.nn.Parameter.__torch_function__
_TENSOR_TF = torch.Tensor.__torch_function__.__func__


def hookless(tensors: Sequence[Any]) -> bool:
    """Whether no tensor of ``tensors`` is of a subclass that overrides
    ``__torch_function__``: reading such a tensor's attributes (its ``data_ptr()``,
    ``.grad``) runs the subclass's code, which can swap or free the storage of a tensor
    already checked in this step. Those go to torch's implementation, whose operations
    read each pointer as they run (and call the override, as torch's steps do)."""
    types = set(map(type, tensors))
    if types <= _HOOKLESS:
        return True
    for t in types - _HOOKLESS:  # (subclasses: rare; read every time, never cached)
        f = getattr(t, "__torch_function__", None)
        if f is not _DISABLED_TF and getattr(f, "__func__", None) is not _TENSOR_TF:
            return False
    return True


def dense_strides(x: Any) -> tuple[int, ...] | None:
    """The strides of strided tensor ``x`` if its elements fill one block of memory
    with no gaps and no overlap (contiguous, ``channels_last``, any permutation of the
    dimensions), with 0 for the dimensions of size 1 (their stride moves no element);
    None if they do not.

    The kernels update a tensor as the flat block at ``data_ptr()`` (torch's strides
    are never negative, so that is its lowest address), element by element: three
    tensors of one shape whose dense strides are equal hold the same element at the
    same offset of their blocks, whatever the order of the dimensions in memory.
    """
    shape, stride = x.shape, x.stride()
    expect = 1
    for st, n in sorted((st, n) for n, st in zip(shape, stride) if n != 1):
        if st != expect:
            return None
        expect *= n
    return tuple(st if n != 1 else 0 for n, st in zip(shape, stride))


def unsupported(x: Any, dense: bool = False) -> str | None:
    """Why the CPU kernels cannot update tensor ``x`` in place, or None if they can.

    ``dense``: a non-contiguous tensor whose elements still fill one block of memory
    (:func:`dense_strides`: ``channels_last`` weights) is taken too; the caller then
    checks that the tensors updated together have the same strides.
    """
    if x.layout is not _strided:
        return f"has layout {x.layout}"
    if not x.is_cpu:
        return f"is on device {x.device}"
    if x.dtype not in NP_DTYPES:
        return f"has dtype {x.dtype} (the CPU kernels take float32 and float64)"
    if not x.is_contiguous() and not (dense and dense_strides(x) is not None):
        return ("is neither contiguous nor dense (its elements leave gaps or overlap)"
                if dense else "is not contiguous")
    if x.numel():
        if x.data_ptr() == 0:  # a wrapper subclass, a ZeroTensor, a freed storage
            return "has no data in memory (data_ptr() is 0)"
        short = storage_short(x)
        if short:
            return short
    if x.is_neg():  # its memory holds the values' negations
        return "has its negative bit set (a lazy negation, e.g. .conj().imag)"
    if x.is_inference():  # torch refuses in-place updates of these outside inference mode
        return "is an inference tensor"
    return None


def storage_short(x: Any) -> str | None:
    """Why strided tensor ``x``'s elements reach beyond its storage (freed or shrunk in
    place, as FSDP does with ``untyped_storage().resize_(0)``), or None if they do not.
    torch's own steps then read and write past it. Checked when a plan is built; the
    plan's key holds the sizes of the storages written through, read again at every
    step (a storage shrunk in place can keep its address), and the gradients' room in
    their storages is checked at every step."""
    try:
        if not x.numel():
            return None
        extent = x.storage_offset() + 1 + sum((n - 1) * st
                                              for n, st in zip(x.shape, x.stride()))
        have = x.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return None  # no strides or storage of its own (nested, functional...): torch's
    if have >= extent * x.element_size():
        return None
    return (f"has {x.numel()} elements but its storage holds {have} bytes (freed or "
            "shrunk)")


def dense_key(x: Any) -> tuple[int, ...] | None:
    """None for a contiguous tensor, else its :func:`dense_strides` (a tensor whose
    elements do not fill one block has none: ``()`` then, which no dense tensor of
    its shape has, except a 0-d one, which is contiguous)."""
    if x.is_contiguous():
        return None
    strides = dense_strides(x)
    return () if strides is None else strides


def eligible(p: Any, g: Any, h: Any) -> bool:
    """True when (param, grad, state) can take the compiled CPU path: each contiguous,
    or all three dense with the same strides (:func:`dense_strides`)."""
    return (unsupported(p, True) is None and unsupported(g, True) is None
            and unsupported(h, True) is None
            and g.dtype == p.dtype == h.dtype and g.shape == p.shape == h.shape
            and dense_key(p) == dense_key(g) == dense_key(h))


class TensorPlan:
    """Per-model work for one list of (param, state) tensors, reused while it matches."""

    __slots__ = ("key", "pdtypes", "sizes", "paddr", "haddr", "nbytes", "groups",
                 "threads", "largest", "wstart", "wend", "wlists", "skey", "scalls",
                 "ckey", "ccoefs", "contig", "dense", "nbytes_list", "itemsize_list",
                 "chunk", "caddr", "dense_raw", "sok", "scpu", "sdistinct", "gview",
                 "guard")

    def __init__(self) -> None:
        self.key: Any = None
        #: None when every parameter (and so its state) was contiguous when the plan
        #: was built; else [(index, dense strides)] of the others, and ``contig`` the
        #: parameters' contiguity, which their states and gradients must share
        self.dense: list[tuple[int, tuple[int, ...]]] | None = None
        self.contig: list[bool] = []
        self.skey: Any = None
        self.scalls: Any = None
        self.ckey: Any = None
        #: the gradients' storage sizes and offsets (views) the last step accepted for
        #: this plan's parameters, or None
        self.gview: Any = None
        #: (guard, key, skey, tensor count): torch's C++ metadata check
        #: (:mod:`_tensorguard`) of the tensors the last full check accepted, in
        #: :func:`_unchanged`'s order, for this ``key`` and ``skey``; or None
        self.guard: Any = None

    def build_steps(self, steps: Sequence[Any], key: Any) -> None:
        """The step counters' increment: (proto, addresses) per dtype, or None when a
        counter is not a one-element CPU float32/float64 tensor (the step is then
        torch's: its implementations read, convert or refuse other counters, each its
        own way). ``key``: (addresses, dtypes, sizes) of ``steps``, read in this call."""
        self.skey = None
        # every counter a tensor torch's steps can add to in place (CPU or CUDA): the
        # condition of counter() and of the GPU paths, whatever the written ranges
        self.sok = all(map(counter_ok, steps))
        calls: Any = []
        for t in steps:
            if not steps_ok(t):
                calls = None
                break
        self.scpu = calls is not None  # (every one a compiled path's counter)
        if calls is not None and self.key is not None:
            # a counter inside a parameter or a sum (a hand-made or loaded state):
            # torch's single-tensor step increments it just before that parameter's
            # update, not all of them first: torch's implementation takes the step
            item = {torch.float32: 4, torch.float64: 8}
            ws, we = self.wlists[0], self.wlists[1]
            for a, dt in zip(key[0], key[1]):
                i = bisect.bisect_left(ws, a + item.get(dt, 8)) - 1
                if i >= 0 and we[i] > a:
                    calls = None
                    break
        if calls is not None:
            c = sorted(key[0])  # (for _grads_hold_counters: as a list and an array)
            self.caddr = (c, np.array(c, np.int64))
            self.sdistinct = len(set(c)) == len(c)  # (no counter for two parameters)
            dts = key[1]
            for dt in sorted(set(dts), key=str):
                addr = np.fromiter((a for a, d in zip(key[0], dts) if d == dt), np.int64)
                calls.append((np.empty(0, NP_DTYPES[dt]), addr))
        self.scalls, self.skey = calls, key

    def build(self, params: Sequence[Any], states: Sequence[Any], labels: Sequence[Any],
              key: Any) -> None:
        n = len(params)
        self.key = self.gview = None  # (gview: checked against other sizes)
        for i in range(n):
            p, h = params[i], states[i]
            for x, label in ((p, labels[i].param), (h, labels[i].state)):
                why = unsupported(x, dense=True)
                if why is not None:
                    raise ValueError(f"{label} {why}; nothing was updated")
            if h.dtype != p.dtype or h.shape != p.shape:
                raise ValueError(f"{labels[i].state} has dtype {h.dtype} and shape "
                                 f"{tuple(h.shape)} but {labels[i].param} has dtype "
                                 f"{p.dtype} and shape {tuple(p.shape)}; nothing was "
                                 "updated")
            if dense_key(h) != dense_key(p):  # the same element at another offset
                raise ValueError(f"{labels[i].state} has strides {h.stride()} but "
                                 f"{labels[i].param} has strides {p.stride()}; nothing "
                                 "was updated")
        paddr = np.fromiter(key[0], np.int64, n)
        haddr = np.fromiter(key[1], np.int64, n)
        itemsize = np.fromiter((p.element_size() for p in params), np.int64, n)
        nbytes = np.fromiter((p.numel() for p in params), np.int64, n) * itemsize
        D.check_no_overlap(paddr, np.zeros(n, np.int64), haddr, nbytes, labels,
                           grads=False)
        self.paddr, self.haddr, self.nbytes = paddr, haddr, nbytes
        self.nbytes_list, self.itemsize_list = nbytes.tolist(), itemsize.tolist()
        # the written byte ranges, disjoint (just checked), sorted: a gradient overlaps
        # one of them iff it overlaps the last one that starts before the gradient ends
        start = np.concatenate((paddr, haddr))
        end = start + np.concatenate((nbytes, nbytes))
        keep = end > start
        order = np.argsort(start[keep], kind="stable")
        self.wstart, self.wend = start[keep][order], end[keep][order]
        self.wlists = (self.wstart.tolist(), self.wend.tolist(), self.nbytes_list)
        self.pdtypes = [NP_DTYPES[m[1]] for m in key[2]]
        self.sizes = [p.numel() for p in params]
        self.contig = list(map(_contig, params))
        self.dense = None if all(self.contig) else [
            (i, dense_strides(params[i])) for i, c in enumerate(self.contig) if not c]
        # their strides as torch gives them: equal ones are the same layout (one list
        # comparison a step instead of a sort per tensor: channels_last models 2.5x)
        self.dense_raw = [params[i].stride() for i, _ in self.dense or ()]
        self.plan_groups(cpu.numba_threads())
        self.ckey = None
        self.skey = None  # the counters are checked against the new written ranges
        self.key = key

    def plan_groups(self, threads: int) -> None:
        sizes, dtypes = self.sizes, self.pdtypes
        groups = []
        kinds = sorted(set(dtypes), key=lambda d: d.itemsize)
        for dt in kinds:
            idx = None if len(kinds) == 1 else np.fromiter(
                (i for i, d in enumerate(dtypes) if d == dt), np.int64)
            gsizes = tuple(sizes) if idx is None else tuple(sizes[i] for i in idx)
            groups.append((np.empty(0, dt), idx, D.chunk_table(gsizes, threads),
                           sum(gsizes)))
        self.groups, self.threads, self.chunk = groups, threads, config.CHUNK
        self.largest = max((g[3] for g in groups), default=0)


def prepare(plan: TensorPlan, params: Sequence[Any], grads: Sequence[Any],
            states: Sequence[Any], labels: Sequence[Any], formula: str | dict[Any, str],
            coefficients: Callable[[np.dtype], tuple], pmeta: list[Any] | None = None,
            steps: Sequence[Any] | None = None, rebuild: bool = True,
            count: bool = True) -> Callable[[], None] | None:
    """Validate a step now; return the function that runs it, or None if it cannot.

    Every tensor is checked in this call, before anything is written: CPU, strided,
    contiguous, float32/float64, the gradient and the state of the parameter's dtype and
    shape, and no parameter or state sharing memory with any other tensor. None means
    some tensor cannot be updated in place by the kernels (the caller then takes a
    slower path that can); nothing has been written. ``formula`` picks the kernel
    (a key of :data:`KERNELS`, or a dict from NumPy dtype to one); ``coefficients(dtype)`` returns
    its scalar arguments and may raise (before anything is written, too); the plan keeps
    them while the same ``coefficients`` object comes back. ``pmeta``: the parameters'
    :data:`meta` if the caller read them in this call. ``steps``: torch's step counters,
    incremented by 1 before the update (as torch does), in one compiled call where they
    are one-element CPU float tensors. ``rebuild=False``: None where the parameters or
    states are not those the plan describes (instead of describing them again).
    ``count=False``: ``steps`` are only checked (the caller increments them): None where
    one lies inside a parameter or a state, as with ``count=True``.
    """
    repeated = pmeta is None  # (a repeated step's call: the next one will be too)
    if repeated and plan.key is not None and (plan.dense is None
                                              or plan.guard is not None):
        got = _unchanged(plan, params, grads, states, steps)
        if got is not None:  # (None: read everything again, below, and decide there)
            return _runner(plan, params, states, steps,
                           None if steps is None else plan.scalls,
                           got[0], formula, coefficients, count, got[1])
    n = len(params)
    if not hookless([*params, *states, *grads, *(steps or ())]):
        return None  # (before any attribute is read: torch's implementation)
    if pmeta is None:
        pmeta = list(map(meta, params))
    # the addresses and metas are read again at every step (a parameter whose storage
    # was swapped keeps neither), contiguity too (a transposed square tensor keeps its
    # address and shape), and the sizes of the storages written through (one shrunk in
    # place can stay at its address: the allocator reuses it), and the negative bit (a
    # lazy negation, ``p.data = z.conj().imag``, keeps the address: the values in
    # memory are the negated ones), and the inference bit (``p.data = q`` with an
    # inference tensor ``q`` on the same storage keeps the address; torch refuses to
    # update those): a change rebuilds the plan, which checks every tensor (~7 us per
    # 100 tensors for each read)
    try:
        stores = list(map(_storage, [*params, *states]))
        key = (list(map(_ptr, params)), list(map(_ptr, states)), pmeta,
               list(map(_state_meta, states)),
               list(map(_storage_nbytes, stores[:n])),
               list(map(_storage_nbytes, stores[n:])))
        if key != plan.key or not ((all(map(_contig, params)) and all(map(_contig, states)))
                                   if plan.dense is None
                                   else _same_layout(plan, params, states)) or any(
                map(_is_neg, params)) or any(map(_is_neg, states)) or any(
                map(_is_inference, params)) or any(map(_is_inference, states)):
            if not rebuild:
                return None
            plan.build(params, states, labels, key)
        # gradients, new tensors every step: each of its parameter's shape, dtype,
        # device (the CPU: the plan checked the parameters), layout (strided) and
        # strides
        if (list(map(meta, grads)) != pmeta
                or not (all(map(_contig, grads)) if plan.dense is None
                        else _same_layout(plan, grads))
                or any(map(_is_neg, grads))):  # (a lazy negation: -values in memory)
            return None
        gaddr = np.fromiter(map(_ptr, grads), np.int64, n)
        # each gradient's bytes within its storage (one freed or shrunk in place would
        # be read past its end: the mixed path then raises, naming it). Autograd's
        # gradients fill their storages exactly, from offset 0: one list comparison
        # (~1.4 us for 4 tensors, ~14 us for 100; NumPy's fixed costs were ~5 us)
        stores += map(_storage, grads)
        room = list(map(_storage_nbytes, stores[2 * n:]))
        offsets = list(map(_offset, grads))
        if room != plan.nbytes_list or any(offsets):  # views into larger buffers
            if any(map(_lt, map(_sub, room, map(_mul, offsets, plan.itemsize_list)),
                       plan.nbytes_list)):  # (the bytes after each view)
                return None
            plan.gview = (room, offsets)  # (for _unchanged: these views hold theirs)
    except (ValueError, RuntimeError):  # RuntimeError: data_ptr() of a sparse tensor,
        return None  # the storage of a tensor without one (NotImplementedError)
    if _grads_overlap(plan, gaddr):  # a gradient sharing memory with what is written
        return None
    scalls = None if steps is None else _step_calls(plan, steps)
    if steps is not None and scalls is None:
        return None  # a counter only torch's implementations take
    if scalls is not None and _grads_hold_counters(plan, gaddr):
        return None  # torch's single-tensor step: counted between the reads
    if steps is not None:
        stores += map(_storage, steps)  # (checked by _step_calls: each has one)
    if repeated and plan.dense is not None:  # every check passed, strides included:
        # the next steps check the metadata in C++ (:func:`_unchanged`)
        _new_guard(plan, [*params, *states, *(steps or ()), *grads])
    return _runner(plan, params, states, steps, scalls, gaddr, formula, coefficients, count,
                   stores)


def _unchanged(plan: TensorPlan, params: Sequence[Any], grads: Sequence[Any],
               states: Sequence[Any], steps: Sequence[Any] | None
               ) -> tuple[np.ndarray, list[Any]] | None:
    """The gradients' addresses and every tensor's storage when the step's tensors are
    those the plan describes (every parameter contiguous when it was built) and the
    gradients and counters are as they were at the last step: contiguous gradients
    filling their storages (as autograd makes them) or views at the offsets, in
    storages of the sizes, accepted at the last step, clear of the written memory; the
    same counters. None otherwise, with nothing changed (:func:`prepare` then reads
    everything again, one question at a time, and decides). The same checks as that
    path, for this case, with one pass per attribute over all the tensors instead of
    one per attribute and list (the fixed cost of ~25 passes was half a small model's
    overhead); and where the last step passed them, the metadata (type, device,
    layout, dtype, shape, strides, negative bit, inference) in one C++ call of a guard
    kept from that step (:mod:`_tensorguard`; the Python passes were ~0.7 us per
    parameter). Tensors of a subclass with a ``__torch_function__`` are left to it."""
    n = len(params)
    # the tensors written (parameters, states, counters), then the gradients
    ts = [*params, *states] if steps is None else [*params, *states, *steps]
    w = len(ts)
    ts += grads
    key, skey = plan.key, plan.skey
    g = plan.guard
    # (the guard reads no Python attribute: it runs first, in place of hookless)
    guarded = (g is not None and g[1] is key and g[2] is skey and g[3] == len(ts)
               and config.TORCH_GUARDS)
    if guarded:
        if not _tensorguard.holds(g[0], ts):
            return None
    elif plan.dense is not None or not hookless(ts):  # (dense: prepare's path checks
        return None  # their strides, and keeps a guard)
    try:
        ptrs = list(map(_ptr, ts))
        stores = list(map(_storage, ts))
        rooms = list(map(_storage_nbytes, stores))
        if guarded:  # (the guard: the metadata are those this key was checked with)
            if (ptrs[:n] != key[0] or ptrs[n:2 * n] != key[1] or rooms[:n] != key[4]
                    or rooms[n:2 * n] != key[5]):
                return None
        else:
            metas = list(map(meta, ts[:n] + ts[w:]))
            if ((ptrs[:n], ptrs[n:2 * n], metas[:n], list(map(_state_meta, states)),
                 rooms[:n], rooms[n:2 * n]) != key
                    or metas[n:] != metas[:n]
                    or not all(map(_contig, ts)) or any(map(_is_neg, ts))
                    or any(map(_is_inference, ts[:w]))):
                return None
        offsets = list(map(_offset, ts[2 * n:]))  # the counters' and the gradients'
        groom, goffsets = rooms[w:], offsets[w - 2 * n:]
        # autograd's gradients fill their storages from offset 0; views into a larger
        # buffer (DDP's gradient_as_bucket_view) at the offsets, in storages of the
        # sizes, that the other path accepted at the last step hold their bytes too
        if (groom != plan.nbytes_list or any(goffsets)) and plan.gview != (groom,
                                                                          goffsets):
            return None
        if steps is not None:
            if plan.scalls is None:
                return None
            if guarded:
                if (ptrs[2 * n:w] != skey[0] or rooms[2 * n:w] != skey[3]
                        or offsets[:w - 2 * n] != skey[4]):
                    return None
            elif (ptrs[2 * n:w], list(map(_dtype, steps)), list(map(_numel, steps)),
                  rooms[2 * n:w], offsets[:w - 2 * n]) != skey:
                return None
    except (ValueError, RuntimeError, TypeError, NotImplementedError):
        return None  # (data_ptr() of a sparse tensor...: the other path says which)
    gaddr = np.array(ptrs[w:], np.int64)
    if _grads_check(gaddr, plan.nbytes, plan.wstart, plan.wend,
                    _NONE if steps is None else plan.caddr[1]):
        return None
    if not guarded:  # every check passed in Python: the next steps check the metadata
        _new_guard(plan, ts)  # in C++
    return gaddr, stores


def _new_guard(plan: TensorPlan, ts: list[Any]) -> None:
    """Keep a guard of ``ts`` (in :func:`_unchanged`'s order), every one of them
    checked in this call against the plan's ``key`` and ``skey``, where the C++ guards
    are used and every tensor is of a hookless type (the guard then sees a new type)."""
    made = _tensorguard.guard(ts) if (
        _tensorguard.usable() and set(map(type, ts)) <= _HOOKLESS) else None
    plan.guard = None if made is None else (made, plan.key, plan.skey, len(ts))


def _runner(plan: TensorPlan, params: Sequence[Any], states: Sequence[Any],
            steps: Sequence[Any] | None, scalls: Any, gaddr: np.ndarray,
            formula: str | dict[Any, str], coefficients: Callable[[np.dtype], tuple],
            count: bool, pins: list[Any]) -> Callable[[], None]:
    """:func:`prepare`'s step, every tensor checked: the compiled calls per dtype
    group, the counters' increment first (``count``), the autograd versions after.
    ``pins``: the storages of the tensors read and written, as they were checked; the
    run holds them, so that their memory stays allocated until it has run, whatever
    code runs before it (the other groups' checks can call a tensor subclass's
    ``__torch_function__``, which may swap a checked tensor's storage: ``p.data = x``)."""
    threshold = config.PARALLEL_THRESHOLD
    if plan.largest >= threshold:  # below, only serial kernels run: any table serves
        threads = cpu.numba_threads()  # thread-local: the caller may change it
        if threads != plan.threads or plan.chunk != config.CHUNK:
            plan.plan_groups(threads)
    ck = plan.ckey  # each group's kernels and scalars, kept while all three are the same
    if ck is None or ck[0] is not coefficients or ck[1] is not plan.groups or ck[2] != formula:
        plan.ccoefs = [(KERNELS[formula if isinstance(formula, str) else
                                formula[proto.dtype]], coefficients(proto.dtype))
                       for proto, *_ in plan.groups]
        plan.ckey = (coefficients, plan.groups, formula)
    calls = []
    for (proto, idx, (ct, cs, cl), total), ((parallel, serial), coefs) in zip(
            plan.groups, plan.ccoefs):
        if idx is None:
            pa, ga, ha = plan.paddr, gaddr, plan.haddr
        else:
            pa, ga, ha = plan.paddr[idx], gaddr[idx], plan.haddr[idx]
        if total:
            calls.append((parallel if total >= threshold else None,
                          serial, (proto, pa, ga, ha, ct, cs, cl, *coefs)))
    if not count:
        steps = scalls = None
    written = [*params, *states] if steps is None else [*params, *states, *steps]

    def run(pins: list[Any] = pins) -> None:  # (a default: held, even under -O)
        if scalls is not None:  # torch counts the step before it updates
            _count(scalls)
        for par, ser, args in calls:
            if par is not None:
                with cpu.PARALLEL_LOCK:
                    par(*args)
            else:
                ser(*args)
        increment_version(written)

    return run


def check_settings() -> None:
    """Raise, naming it, for a bad :mod:`fastadagrad.config` setting the plans read
    (``CHUNK``): called before a step is prepared, where the error would otherwise be
    a plan that cannot be built (and the step torch's, without a word)."""
    config.chunk()


def _same_layout(plan: TensorPlan, *tensors: Sequence[Any]) -> bool:
    """Whether each list of ``tensors`` (one per parameter of the plan) is laid out as
    the plan's parameters were when it was built: contiguous, or dense with the same
    strides. Read at every step: a transposed square tensor keeps its address and
    shape. Only for plans with dense tensors (``plan.dense``): where every parameter is
    contiguous, the callers test one ``is_contiguous`` per tensor inline."""
    contig, dense, raws = plan.contig, plan.dense, plan.dense_raw
    for ts in tensors:
        if list(map(_contig, ts)) != contig:
            return False
        got = [ts[i].stride() for i, _ in dense]
        if got != raws:  # (a dimension of size 1 can have any stride: compare densely)
            for (i, strides), g, r in zip(dense, got, raws):
                if g != r and dense_strides(ts[i]) != strides:
                    return False
    return True


def counter_ok(t: Any) -> bool:
    """Whether step counter ``t`` is a strided tensor (on any device) that an in-place
    add after the update can take: with its data, within its storage, neither negative
    nor an inference tensor (torch's steps refuse those, or count them otherwise,
    before they write anything)."""
    return (isinstance(t, torch.Tensor) and t.layout is _strided and t.data_ptr() != 0
            and not t.is_neg() and not t.is_inference() and storage_short(t) is None)


def steps_ok(t: Any) -> bool:
    """Whether step counter ``t`` is a one-element CPU float32/float64 tensor (with its
    data, within its storage): the counters the compiled paths increment and read."""
    return (isinstance(t, torch.Tensor) and t.is_cpu and t.numel() == 1
            and t.dtype in NP_DTYPES and counter_ok(t))


def counter(plan: TensorPlan, steps: Sequence[Any]) -> Callable[[], None] | None:
    """torch's ``step_t += 1`` on each of ``steps``, checked now, as a function to call
    later (after the update: the GPU path's order): one compiled call per dtype where
    they are one-element CPU float tensors (:meth:`TensorPlan.build_steps`), torch's
    ``_foreach_add_`` otherwise. The counters' autograd versions are incremented either
    way. None, with nothing done, where a counter fails :func:`counter_ok` (the caller
    then takes the path that hands it to torch, or refuses it, before any update)."""
    if not counters_ok(plan, steps):
        return None
    return functools.partial(_count, plan.scalls, list(steps))


def counters_ok(plan: TensorPlan, steps: Sequence[Any], cpu_only: bool = False) -> bool:
    """Whether every counter passes :func:`counter_ok` (``cpu_only``: :func:`steps_ok`),
    read with the cached key of :func:`_step_calls` (~1 us per counter otherwise)."""
    if _step_calls(plan, steps) is None and plan.skey is None:
        return False  # (a negative or inference counter, one without a storage...)
    return plan.scpu if cpu_only else plan.sok


def _step_calls(plan: TensorPlan, steps: Sequence[Any]) -> list[tuple[Any, Any]] | None:
    # a counter whose address, dtype, size, storage size or offset in it changed gets
    # re-checked; one that kept all of them stays a one-element CPU tensor at that
    # address, within its storage (one shrunk in place, as FSDP does with
    # ``untyped_storage().resize_``, can keep its address). None: a counter the
    # compiled path does not take (a Python number, an int64 or 2-element tensor, a
    # negative or inference tensor: torch's step reads or refuses those its own way)
    try:
        skey = (list(map(_ptr, steps)), list(map(_dtype, steps)), list(map(_numel, steps)),
                list(map(_storage_nbytes, map(_storage, steps))), list(map(_offset, steps)))
        if any(map(_is_neg, steps)) or any(map(_is_inference, steps)):
            plan.skey = None
            return None
    except (RuntimeError, TypeError, NotImplementedError):  # a sparse tensor, not a
        plan.skey = None  # tensor, one without a storage
        return None
    if skey != plan.skey:
        plan.build_steps(steps, skey)
    return plan.scalls


def next_common_step(plan: TensorPlan) -> float | None:
    """The value every step counter of the plan will hold after its increment, if they
    all hold one value now (torch's ``step`` for ``lr_decay``: one learning rate for the
    whole group), else None. Only after :func:`prepare` checked the counters in this
    call (it reads them through their addresses). None too where two parameters share
    a counter: torch increments it between their updates, each its own step."""
    if not plan.sdistinct:
        return None
    value = None
    for proto, addresses in plan.scalls:
        ok, nxt = cpu.next_common_at(proto, addresses)
        if not ok or (value is not None and addresses.size and nxt != value):
            return None
        if addresses.size:
            value = nxt
    return value


def _count(scalls: list[tuple[Any, Any]] | None, steps: list[Any] | None = None) -> None:
    if scalls is None:  # other counters (the CUDA path's): as torch's foreach path adds
        with torch.no_grad():  # (the repeated step runs in the caller's grad mode)
            torch._foreach_add_(steps, 1)
    else:
        for proto, addresses in scalls:
            cpu.add_one_at(proto, addresses)
    if steps is not None:  # (prepare's run increments its own tensors' versions)
        increment_version(steps)


#: :func:`_grads_check`'s bits: a gradient overlaps a written range (or has no data),
#: a step counter lies in (or within 8 bytes before) a gradient
OVERLAPS, HOLDS_COUNTER = 1, 2
_NONE = np.zeros(0, np.int64)


@jit()
def _grads_check(gaddr, nbytes, wstart, wend, caddr):  # type: ignore[no-untyped-def]
    """:data:`OVERLAPS` | :data:`HOLDS_COUNTER` for the gradients at ``gaddr`` (of
    ``nbytes`` bytes each; empty ones are skipped), against the plan's written ranges
    (``wstart``/``wend``: disjoint, sorted) and its step counters' sorted addresses
    ``caddr``. Binary searches, written out (``np.searchsorted`` would make the cached
    function import Numba's array library when loaded). One compiled call in place of
    the NumPy calls that took 25-30 us of a 100-tensor step (and 3-5 us of one tensor's,
    as bisect on lists)."""
    out = 0
    m, k = wstart.size, caddr.size
    for i in range(gaddr.size):
        a, nb = gaddr[i], nbytes[i]
        if nb == 0:
            continue
        if a == 0:  # (no data to read: a ZeroTensor, a freed storage)
            out |= OVERLAPS
        # the last written range that starts before the gradient ends
        lo, hi = 0, m
        while lo < hi:
            mid = (lo + hi) >> 1
            if wstart[mid] < a + nb:
                lo = mid + 1
            else:
                hi = mid
        if lo > 0 and wend[lo - 1] > a:
            out |= OVERLAPS
        # the first counter at or after a - 7: inside if it is before the end.
        # Conservative by a few bytes: torch's single-tensor step increments each
        # counter just before its parameter's update, so an earlier parameter reads
        # that gradient element before the increment, where the compiled path counts
        # every step first
        lo, hi = 0, k
        while lo < hi:
            mid = (lo + hi) >> 1
            if caddr[mid] < a - 7:
                lo = mid + 1
            else:
                hi = mid
        if lo < k and caddr[lo] < a + nb:
            out |= HOLDS_COUNTER
    return out


def _grads_overlap(plan: TensorPlan, gaddr: np.ndarray) -> bool:
    """Whether any gradient's bytes overlap a parameter's or a state's (read: fine), or
    a gradient with elements has no data (address 0: a ZeroTensor, a freed storage):
    binary search in the plan's sorted, disjoint written ranges."""
    return bool(_grads_check(gaddr, plan.nbytes, plan.wstart, plan.wend, _NONE) & OVERLAPS)


def _grads_hold_counters(plan: TensorPlan, gaddr: np.ndarray) -> bool:
    """Whether a step counter lies in (or within 8 bytes before) a gradient's bytes
    (see :func:`_grads_check`)."""
    return bool(_grads_check(gaddr, plan.nbytes, _NONE, _NONE, plan.caddr[1])
                & HOLDS_COUNTER)


def sparse_index_error(g: Any) -> str | None:
    """What is wrong with the indices of sparse COO tensor ``g``, or None: one outside
    its sparse dimensions. torch builds such tensors without checking them
    (``check_invariants`` is off by default) and its ``coalesce()`` then writes out of
    bounds for a negative one (heap corruption): checked before anything coalesces."""
    idx = g._indices()
    if idx.numel() == 0:
        return None
    if idx.dtype != torch.int64 or not idx.is_contiguous():
        idx = idx.to(torch.int64).contiguous()
    rows = _numpy_rows(idx)
    for d in range(rows.shape[0]):  # (compiled: ~1 us a dimension; torch.aminmax ~10 us)
        n = g.shape[d]
        i = cpu_rows.first_bad_index(rows[d], n)
        if i >= 0:
            return (f"has index {int(rows[d, i])} in its sparse dimension {d}, outside "
                    f"[0, {n})")
    return None


_NP_INDEX = {torch.int64: np.dtype(np.int64), **NP_DTYPES}


def _numpy_rows(x: Any, rows: int | None = None) -> np.ndarray:
    """A (rows, row size) NumPy array over contiguous CPU tensor ``x``'s memory, made
    from its address: no copy, and unlike ``Tensor.numpy()`` it leaves the storage
    resizable (``sum.resize_``, a storage freed with ``resize_(0)``, as torch's step
    does). The caller keeps ``x`` alive while the array is used."""
    rows = (x.shape[0] if x.dim() else 1) if rows is None else rows
    n = x.numel()
    shape = (rows, n // rows if rows else math.prod(x.shape[1:]))
    dt = _NP_INDEX[x.dtype]
    if n == 0:
        return np.empty(shape, dt)
    # an array interface, not a ctypes buffer: ctypes makes (and its cache soon drops)
    # a new array type for each byte size, ~10-17 us a call against ~2 us
    m = _Memory()
    m.__array_interface__ = {"data": (x.data_ptr(), False), "shape": shape,
                             "typestr": dt.str, "version": 3}
    return np.asarray(m)


class _Memory:
    """Memory described by an ``__array_interface__`` (the array's ``base``)."""

    __array_interface__: dict[str, Any]


def prepare_sparse(param: Any, grad: Any, state: Any, neg_clr: float, eps: float,
                   maximize: bool, sqrt_fn: tuple[int, int], emulation: str | None
                   ) -> Callable[[], None] | None:
    """torch's sparse Adagrad step for one parameter, validated; None if it cannot run.

    ``grad``: a sparse COO gradient with one sparse dimension (``nn.Embedding(sparse=
    True)``'s), its indices in range (checked by the caller). Everything the kernel
    reads or writes is checked in this call, before anything is written: the parameter
    and ``state`` CPU, contiguous, of one float dtype and shape, not sharing memory with
    each other or with the gradient's values; the coalesced row indices sorted, unique
    and in range. An uncoalesced gradient is coalesced by torch itself (duplicates
    summed in torch's order, which is not the order of appearance) when the step runs,
    as torch's step does when it reaches this parameter: values that lie in a tensor
    updated before it are read after that update. None means torch's implementation
    should take this parameter (nothing was written).
    """
    if not (grad.layout is torch.sparse_coo and grad.is_cpu and grad.sparse_dim() == 1
            and grad.dtype == param.dtype and grad.shape == param.shape
            and param.dim() >= 1):
        return None
    if unsupported(param) is not None or unsupported(state) is not None or (
            state.dtype != param.dtype or state.shape != param.shape):
        return None
    p, h = _numpy_rows(param), _numpy_rows(state)
    if np.may_share_memory(p, h) or grad._indices().dtype != torch.int64:
        return None
    dt = p.dtype.type
    scalars = (sqrt_fn, dt(neg_clr), dt(eps), bool(maximize), emulation is not None)
    kernels = SPARSE_KERNELS[emulation]
    written = [param, state]
    if grad.is_coalesced():  # its values are read where they lie, when it runs
        call = _sparse_call(p, h, grad, scalars, kernels)
        return None if call is None else functools.partial(_run_sparse, call, written)
    if grad._values().numel() >= config.parallel_from(p.itemsize):
        cpu.numba_threads()  # start the threading layer while nothing is written

    def run() -> None:
        call = _sparse_call(p, h, grad.coalesce(), scalars, kernels)
        if call is None:  # (in-range indices, new memory: cannot happen)
            raise RuntimeError("fastadagrad: the coalesced sparse gradient of a "
                               "parameter failed its checks after validation")
        _run_sparse(call, written)

    return run


def _sparse_call(p: np.ndarray, h: np.ndarray, gc: Any, scalars: tuple,
                 kernels: tuple[Callable[..., Any], Callable[..., Any]]) -> tuple | None:
    """The row kernel's call for coalesced gradient ``gc`` of table ``p`` with state
    ``h``: (kernel, parallel, arguments, tensors to keep alive), () when there is
    nothing to write, None when its rows or values cannot be taken (shared memory, a
    bad row). ``kernels``: a (serial, parallel) pair of :data:`SPARSE_KERNELS`."""
    rows_t, vals_t = gc._indices()[0], gc._values()
    if not vals_t.is_contiguous():
        vals_t = vals_t.contiguous()
    if not rows_t.is_contiguous():
        rows_t = rows_t.contiguous()
    rows = _numpy_rows(rows_t, 1).reshape(-1)
    vals = _numpy_rows(vals_t, rows.size)
    for a, b in ((p, vals), (h, vals), (p, rows), (h, rows)):
        if np.may_share_memory(a, b):
            return None
    if cpu_vsqrt.first_bad_row(rows, p.shape[0]) >= 0:
        return None
    if rows.size == 0 or p.shape[1] == 0:
        return ()
    per_block = max(1, cpu_vsqrt.BLOCK // p.shape[1])
    parallel = vals.size >= config.parallel_from(p.itemsize) and cpu.numba_threads() > 1
    # the arrays are made from addresses: the call holds their tensors
    return (kernels[parallel], parallel, (p, h, rows, vals, per_block, *scalars),
            (rows_t, vals_t))


def _run_sparse(call: tuple, written: list[Any]) -> None:
    if call:
        kernel, parallel, args, _keep = call
        if parallel:
            with cpu.PARALLEL_LOCK:
                kernel(*args)
        else:
            kernel(*args)
    increment_version(written)
