"""Dispatch for half-precision parameters: validation, keys and the kernel calls.

bfloat16/float16 params and grads, float32 state (and optional float32 master
weights). Everything is checked before the first write, as in ``_dispatch.py``: an
error leaves every input bit-unchanged. The kernels are in ``cpu_half.py`` (host) and
``cuda_half.py`` (device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from . import _hyper as H
from . import _rounding as R
from . import config
from ._arrays import Labels, check_flags, coefficients, cross_overlap, describe, is_cuda_array
from ._plan import data_addresses
from ._rounding import check_options  # noqa: F401  (the public modules' way down)

_F32 = np.dtype(np.float32)
_NO_KEY = (np.uint32(0), np.uint32(0))


def _check_host(x: Any, label: str, *, writable: bool) -> np.ndarray:
    if not isinstance(x, np.ndarray) or type(x) is not np.ndarray:
        raise TypeError(f"{label} must be a NumPy array, got {describe(x)}")
    return check_flags(x, label, writable=writable)


def check_half_triple(p: Any, g: Any, h: Any, m: Any, lab: Labels, alone: bool = True
                      ) -> None:
    """Check one (param, grad, state[, master]) set: half p and g, float32 h and m.
    ``alone=False``: the caller checks every array's bytes against every other's
    (:func:`_check_across`), these among them."""
    _check_host(p, lab.param, writable=True)
    if not R.is_half(p.dtype):
        raise TypeError(f"{lab.param} has dtype {p.dtype}; the half-precision path "
                        "takes bfloat16 or float16 params")
    _check_host(g, lab.grad, writable=False)
    if g.dtype != p.dtype:
        raise TypeError(f"{lab.grad} has dtype {g.dtype} but {lab.param} has dtype "
                        f"{p.dtype}; they must match")
    _check_host(h, lab.state, writable=True)
    if R.is_half(h.dtype):
        raise TypeError(
            f"{lab.state} has dtype {h.dtype}: a 16-bit sum of squared gradients "
            "overflows or stops growing (float16 reaches inf at 65504, i.e. after one "
            "gradient of 256; bfloat16's 8-bit mantissa swallows every g*g below 1/256 "
            f"of the sum); pass a float32 state for {p.dtype} {lab.param}")
    if h.dtype != _F32:
        raise TypeError(f"{lab.state} has dtype {h.dtype}; with {p.dtype} params the "
                        "state must be float32")
    arrays = [(p, lab.param, True), (g, lab.grad, False), (h, lab.state, True)]
    if m is not None:
        mlab = lab.param.replace("param", "master", 1) if "param" in lab.param \
            else f"master of {lab.param}"
        _check_host(m, mlab, writable=True)
        if m.dtype != _F32:
            raise TypeError(f"{mlab} has dtype {m.dtype}; master weights are float32")
        arrays.append((m, mlab, True))
    for x, label, _ in arrays[1:]:
        if x.shape != p.shape:
            raise ValueError(f"{label} has shape {x.shape} but {lab.param} has shape "
                             f"{p.shape}; they must match")
    for i, (a, la, wa) in enumerate(arrays if alone else ()):  # written arrays must
        for b, lb, wb in arrays[i + 1:]:  # alias nothing
            if (wa or wb) and a.size and np.may_share_memory(a, b):
                raise ValueError(f"{la} and {lb} share memory; a parameter, its state "
                                 "and master copy are updated in place and must not "
                                 "alias any other input")


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           masters: Sequence[Any] | None, labels: Sequence[Labels], hyper: H.Hyper,
           step: int, nonfinite: str, rounding: R.Rounding, seed: int | None,
           tensors: Sequence[int] | None = None) -> bool:
    """Validate every half-precision set, then run one fused step on each.

    Returns False when ``nonfinite='skip'`` found a NaN/inf gradient (nothing written).
    The i-th array's random stream is keyed by (seed, step, ``tensors[i]``), its
    position in the model (default: i).
    """
    if any(is_cuda_array(x) for seq in (params, grads, states) for x in seq):
        return _update_device(params, grads, states, masters, labels, hyper, step,
                              nonfinite, rounding, seed)
    calls = prepare(params, grads, states, masters, labels, hyper, step, nonfinite,
                    rounding, seed, tensors)
    if calls is None:
        return False
    run(calls)
    return True


def prepare(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
            masters: Sequence[Any] | None, labels: Sequence[Labels], hyper: H.Hyper,
            step: int, nonfinite: str, rounding: R.Rounding, seed: int | None,
            tensors: Sequence[int] | None = None) -> list[tuple] | None:
    """Everything :func:`update` checks, nothing written: the kernel calls to make, or
    None if ``nonfinite='skip'`` skips the step. Raises naming the offending array."""
    n = len(params)
    ms = list(masters) if masters is not None else [None] * n
    if not (len(grads) == len(states) == len(ms) == len(labels) == n):
        raise ValueError("params, grads and states must have the same length")
    tensors = range(n) if tensors is None else tensors
    for i in range(n):
        check_half_triple(params[i], grads[i], states[i], ms[i], labels[i], n == 1)
    if n > 1:  # one sort of every array's bytes: each set's own aliases, and across
        _check_across(params, grads, states, ms, labels)  # (~3 us a set pair by pair)
    K = _kernels()
    chunk = config.chunk()  # (the parallel kernels' span: checked before any write)
    coefs = coefficients(hyper, _F32, step)
    flags = coefs[7] | (K.STOCHASTIC if rounding == "stochastic" else 0)
    carriers = [R.carrier_of(p.dtype) for p in params]
    if nonfinite != "ignore":  # read-only pre-pass before any write
        for i in range(n):
            g = grads[i].reshape(-1).view(carriers[i])
            if g.size >= config.PARALLEL_THRESHOLD:
                with _lock():
                    bad = K.half_has_nonfinite_parallel(g, chunk, coefs[6],
                                                        coefs[7])
            else:
                bad = K.half_has_nonfinite(g, coefs[6], coefs[7])
            if bad:
                if nonfinite == "skip":
                    return None
                raise FloatingPointError(f"{labels[i].grad} contains NaN or inf; "
                                         "nothing was updated")
    calls = []
    for i, t in zip(range(n), tensors):
        # (the random stream's key: stochastic rounding only; nearest ignores it)
        k0, k1 = R.stream_key(seed, step, t) if seed is not None and (
            rounding == "stochastic") else _NO_KEY
        calls.append((params[i].reshape(-1).view(carriers[i]),
                      grads[i].reshape(-1).view(carriers[i]), states[i].reshape(-1),
                      None if ms[i] is None else ms[i].reshape(-1), k0, k1,
                      *coefs[:7], flags))
    if any(c[0].size >= config.PARALLEL_THRESHOLD for c in calls):
        from .cpu import numba_threads  # start the threading layer now: if it fails,
        numba_threads()  # it raises before anything (the rest of the model) is written
    return calls


def _update_device(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                   masters: Sequence[Any] | None, labels: Sequence[Labels],
                   hyper: H.Hyper, step: int, nonfinite: str, rounding: R.Rounding,
                   seed: int | None) -> bool:
    """The GPU path: every array must be a CUDA array (``cuda_half.py``)."""
    for seq, role in ((params, "param"), (grads, "grad"), (states, "state")):
        for x, lab in zip(seq, labels):
            if not is_cuda_array(x):
                raise TypeError(f"{getattr(lab, role)} is a host array ({describe(x)}) "
                                "but other arrays are CUDA arrays; pass all arrays on "
                                "one device (nothing was updated)")
    from . import cuda_half

    ms = list(masters) if masters is not None else [None] * len(params)
    return cuda_half.update(params, grads, states, ms, labels, hyper, step, nonfinite,
                            rounding, seed)


def new_state(p: Any, fill: float) -> Any:
    """The float32 accumulator of a 16-bit param ``p`` (host or device)."""
    if is_cuda_array(p):
        from . import cuda_half

        return cuda_half.state_like(p, fill)
    return np.full(np.shape(p), fill, np.float32)


def new_master(p: Any) -> Any:
    """A float32 copy of a validated 16-bit param ``p`` (host or device)."""
    if is_cuda_array(p):
        from . import cuda_half

        return cuda_half.master_like(p)
    return np.array(p, np.float32)


def run(calls: list[tuple]) -> None:
    """Make the kernel calls :func:`prepare` returned."""
    K = _kernels()
    for p, g, h, m, k0, k1, *coefs in calls:
        if p.size >= config.PARALLEL_THRESHOLD:
            with _lock():
                K.adagrad_half_parallel(p, g, h, m, config.CHUNK, k0, k1, *coefs)
        elif p.size:
            K.adagrad_half_span(p, g, h, m, 0, k0, k1, *coefs)


def _lock() -> Any:
    """The lock every parallel kernel runs under (cpu.py: the workqueue layer aborts
    when two Python threads enter parallel code at once)."""
    from .cpu import PARALLEL_LOCK

    return PARALLEL_LOCK


_K: Any = None


def _kernels() -> Any:
    """``cpu_half``, imported on first use (importing the package compiles nothing)."""
    global _K
    if _K is None:
        from . import cpu_half

        _K = cpu_half
    return _K


def update_model(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                 labels: Sequence[Labels], hyper: H.Hyper, step: int, nonfinite: str,
                 plan: Any, half: Sequence[int], masters: Sequence[Any] | None,
                 rounding: R.Rounding, seed: int) -> bool:
    """One step of a model whose arrays ``half`` are 16-bit (``AdaGrad.update``).

    The 16-bit arrays are validated first (and scanned for NaN/inf), then the others
    go through ``_dispatch.update`` (which validates, then writes), then the 16-bit
    arrays are written: an error anywhere leaves everything unchanged. ``masters``
    lines up with ``half``.
    """
    from . import _dispatch as D

    hs = set(half)
    if any(is_cuda_array(params[i]) for i in half):  # the GPU: the same order of work
        for i in half:
            for x, role in ((grads[i], "grad"), (states[i], "state")):
                if not is_cuda_array(x):
                    raise TypeError(f"{getattr(labels[i], role)} is a host array "
                                    f"({describe(x)}) but {labels[i].param} is a CUDA "
                                    "array; pass all arrays on one device (nothing was "
                                    "updated)")
        from . import cuda_half

        go = cuda_half.prepare([params[i] for i in half], [grads[i] for i in half],
                               [states[i] for i in half],
                               masters if masters is not None else [None] * len(half),
                               [labels[i] for i in half], hyper, step, nonfinite,
                               rounding, seed, half)
        rest = [i for i in range(len(params)) if i not in hs]
        if rest:  # each group checks its own arrays; this checks one against the other
            cuda_half.check_across(half, params, grads, states, labels)
        if go is None:  # skipped (a 16-bit gradient's NaN/inf): the rest still checked
            _validate_rest(params, grads, states, labels, rest, hyper, step)
            return False
        if rest and not D.update([params[i] for i in rest], [grads[i] for i in rest],
                                 [states[i] for i in rest], [labels[i] for i in rest],
                                 hyper, step, nonfinite, plan):
            return False
        go()
        return True
    calls = prepare([params[i] for i in half], [grads[i] for i in half],
                    [states[i] for i in half], masters, [labels[i] for i in half], hyper,
                    step, nonfinite, rounding, seed, half)
    rest = [i for i in range(len(params)) if i not in hs]
    if rest:  # each group checks its own arrays; this checks one against the other
        _check_model(params, grads, states, masters, labels, half)
    if calls is None:  # skipped (a 16-bit gradient's NaN/inf): the rest still checked
        _validate_rest(params, grads, states, labels, rest, hyper, step)
        return False
    if rest and not D.update([params[i] for i in rest], [grads[i] for i in rest],
                             [states[i] for i in rest], [labels[i] for i in rest],
                             hyper, step, nonfinite, plan):
        return False
    run(calls)
    return True


def _validate_rest(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                   labels: Sequence[Labels], rest: list[int], hyper: H.Hyper,
                   step: int) -> None:
    """The float32/float64 arrays ``rest`` validated as ``_dispatch.update`` would,
    nothing written: a step skipped for a 16-bit gradient still refuses bad input."""
    if rest:
        from . import _dispatch as D

        D.validate([params[i] for i in rest], [grads[i] for i in rest],
                   [states[i] for i in rest], [labels[i] for i in rest], hyper, step)


def _check_model(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                 masters: Sequence[Any] | None, labels: Sequence[Labels],
                 half: Sequence[int]) -> None:
    """The 16-bit arrays (validated) against the model's other arrays, before anything
    is written: no array written by one group (a parameter, its state or master copy)
    may share memory with any array of the other (each group checks its own). The
    other arrays are taken where they are C-contiguous NumPy arrays (their byte range is
    then exact); anything else is refused by their own validation, before any write."""
    hs = set(half)
    ms: list[Any] = [None] * len(params)
    if masters is not None:
        for i, m in zip(half, masters):
            ms[i] = m
    ranges = []
    for i in range(len(params)):
        lab = labels[i]
        for x, written, name in ((params[i], True, lab.param), (grads[i], False, lab.grad),
                                 (states[i], True, lab.state),
                                 (ms[i], True, f"the master copy of {lab.param}")):
            if (isinstance(x, np.ndarray) and x.size and (i in hs or x.flags.c_contiguous)):
                a = x.__array_interface__["data"][0]
                ranges.append((a, a + x.nbytes, i in hs, written, name))
    hit = cross_overlap(ranges)
    if hit is not None:
        raise ValueError(f"{hit[0]} and {hit[1]} share memory; a parameter and its state "
                         "are updated in place and must not alias any other input")


def _check_across(params: Sequence[np.ndarray], grads: Sequence[np.ndarray],
                  states: Sequence[np.ndarray], masters: Sequence[Any],
                  labels: Sequence[Labels]) -> None:
    """Byte ranges of every written array against every other array: one sort.
    (The arrays were checked: exact, C-contiguous NumPy arrays.)"""
    arrays, about = [], []
    for i in range(len(params)):
        for arr, role, w in ((params[i], "param", True), (grads[i], "grad", False),
                             (states[i], "state", True), (masters[i], "master", True)):
            if arr is not None and arr.size:
                arrays.append(arr)
                about.append((arr.nbytes, w, i, role))
    ranges = [(a, a + nb, w, i, role)
              for a, (nb, w, i, role) in zip(data_addresses(arrays), about)]
    ranges.sort()
    far_w: tuple[int, Any] | None = None
    far_all: tuple[int, Any] | None = None
    for r in ranges:
        start, end, w = r[0], r[1], r[2]
        other = far_all if w else far_w
        if other is not None and start < other[0]:
            raise ValueError(f"{_name(other[1], labels)} and {_name(r, labels)} share "
                             "memory; a parameter and its state are updated in place "
                             "and must not alias any other input")
        if far_all is None or end > far_all[0]:
            far_all = (end, r)
        if w and (far_w is None or end > far_w[0]):
            far_w = (end, r)


def _name(r: tuple, labels: Sequence[Labels]) -> str:
    lab = labels[r[3]]
    role = r[4]
    if role == "master":
        return f"the master copy of {lab.param}"
    return str(getattr(lab, role))


def update_functional(param: Any, grad: Any, state_sum: Any, master: Any,
                      hyper: H.Hyper, step: int, nonfinite: str, rounding: object,
                      seed: object) -> bool:
    """``adagrad_update`` for half-precision params (or with half-only options)."""
    r, s = check_options(rounding, seed)
    dt = getattr(param, "dtype", None)
    if not R.is_half(dt) and not is_cuda_array(param):
        what = "master=" if master is not None else (
            "seed=" if r == "nearest" else f"rounding={r!r}")
        raise TypeError(f"{what} applies to bfloat16/float16 params; param has dtype "
                        f"{dt} (nothing was updated)")
    return update([param], [grad], [state_sum], None if master is None else [master],
                  [_FUNCTIONAL], hyper, step, nonfinite, r, s)


_FUNCTIONAL = Labels("param", "grad", "state_sum")
