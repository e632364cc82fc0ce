"""GPU kernels for half-precision parameters: bfloat16/float16 ``p`` and ``g``, float32 ``h``.

The same per-element work as :func:`fastadagrad.cpu_half.adagrad_half_span`, with the
same bits:

* the 16-bit conversions and the random stream are the CPU module's own LLVM
  intrinsics (``widen``, ``narrow``, ``_bf16_stochastic``, ``rand32``), which NVVM
  compiles to ``cvt.f32.f16``/``cvt.rn.f16.f32`` and 32-bit integer shifts and
  multiplies: one definition for both targets;
* the float32 math is the dense kernel's element update (``cuda_formula.py``): each
  operation rounded once through libdevice's ``*_rn`` functions, in the CPU's order,
  so nothing is contracted into an FMA unless the rule asks for one.

Stochastic rounding draws from ``rand32(k0, k1, element index)``: the same stream on
the CPU and the GPU for the same (seed, step, tensor), whatever the launch geometry.

Under the CUDA simulator the intrinsics cannot run (the kernels are Python there), so
NumPy statements of the same conversions stand in (``_rounding.py``): the simulator
checks the kernel's logic; the PTX test checks the instructions.

Lazy like ``cuda.py``: nothing compiles before the first launch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
from numba import uint64 as _u64

from . import _hyper as H
from . import _rounding as R
from . import cuda as fcuda
from ._arrays import Labels, cross_overlap, is_cuda_array
from .cuda_formula import element, ops

_FORMATS = ("bfloat16", "float16")

try:  # a module global, as in cuda.py: the simulator swaps it for its fake module
    from numba import cuda as _cuda
except Exception:  # pragma: no cover - numba-cuda missing: require_gpu() says so
    _cuda = None  # type: ignore[assignment]


def _sim_helpers(fmt: str) -> tuple[Any, Any, Any, Any]:
    """``(widen, narrow, narrow_stochastic, rand32)`` in NumPy, for the simulator."""
    dt = np.dtype(np.float16) if fmt == "float16" else None

    def widen(b: Any) -> Any:
        if fmt == "float16":
            return np.float32(b)  # the simulator's element is a float16 scalar
        u = np.array([b], np.int16).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return u.view(np.float32)[0]

    def _out(bits16: np.ndarray) -> Any:
        return bits16.view(np.float16)[0] if fmt == "float16" else \
            bits16.view(np.int16)[0]

    def _round(x: Any, rounding: str, bits: Any) -> Any:
        target = dt if dt is not None else _bf16_dtype()
        r = R.round_to(np.array([x], np.float32), target, rounding,  # type: ignore[arg-type]
                       None if bits is None else np.array([bits], np.uint32))
        return _out(r.view(np.uint16))

    def narrow(x: Any, proto: Any) -> Any:
        return _round(x, "nearest", None)

    def narrow_stochastic(x: Any, r: Any, proto: Any) -> Any:
        return _round(x, "stochastic", r)

    def rand32(k0: Any, k1: Any, i: Any) -> Any:
        return R.rand32(k0, k1, np.array([int(i)], np.uint64))[0]

    return widen, narrow, narrow_stochastic, rand32


def _bf16_dtype() -> np.dtype:
    import ml_dtypes  # only reached under the simulator, with bfloat16 data

    return np.dtype(ml_dtypes.bfloat16)


@cache
def kernels(fmt: str, flags: int, stochastic: bool, master: bool) -> tuple[Any, Any]:
    """``(adagrad, nonfinite)`` for the 16-bit format ``fmt`` and compile-time options.

    ``adagrad(p, g, h, m, k0, k1, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
    grad_scale)``: ``p``/``g`` are the 16-bit patterns (int16 for bfloat16, uint16 for
    float16; float16 arrays under the simulator), ``h`` and ``m`` float32 (``m`` is
    ignored unless ``master``).
    """
    cuda = _cuda  # building (and compiling to PTX) needs no GPU; launching does
    if cuda is None:
        fcuda.require_gpu()  # raises, saying why
    div = ops(np.dtype(np.float32))[2]
    gradient, update = element(np.dtype(np.float32), flags)
    if fcuda.simulator():
        widen, narrow, narrow_sr, rand32 = _sim_helpers(fmt)
    else:
        from . import cpu_half as K

        widen, narrow, rand32 = K.widen, K.narrow, K.rand32
        if fmt == "bfloat16":
            bf16_sr = K._bf16_stochastic

            @cuda.jit(device=True, inline=True)
            def narrow_sr(x, r, proto):  # type: ignore[no-untyped-def]
                return bf16_sr(x, r)
        else:
            narrow_sr = cuda.jit(device=True, inline=True)(K._f16_stochastic.py_func)

    scale = (flags & H.GRAD_SCALE) != 0

    @cuda.jit
    def adagrad(p, g, h, m, k0, k1, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                grad_scale):
        """cpu_half.adagrad_half_span per element; cuda.py's operation order."""
        zero = eps_in - eps_in
        n = _u64(p.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            gi = gradient(widen(g[i]), grad_scale)
            if master:
                pi = m[i]
            else:
                pi = widen(p[i])
            x = update(gi, pi, h, i, zero, lr_num, lr_after, eps_in, eps_out, wd, lr_wd)
            if master:
                m[i] = x
            if stochastic:
                p[i] = narrow_sr(x, rand32(k0, k1, i), p)
            else:
                p[i] = narrow(x, p)
            i += stride

    @cuda.jit
    def nonfinite(g, grad_scale, found, k):
        """``found[k] = 1`` if any widened ``g`` (over ``grad_scale``) is NaN or inf."""
        bad = False
        n = _u64(g.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            x = widen(g[i])
            if scale:
                x = div(x, grad_scale)
            if math.isinf(x) or math.isnan(x):
                bad = True
            i += stride
        if bad:
            found[k] = 1

    return adagrad, nonfinite


# --- launcher -------------------------------------------------------------------------

_TYPESTR_FMT = {"<f2": "float16"}


def _describe_half(x: Any, label: str, *, writable: bool) -> tuple[Any, str]:
    """(description, format) of a 16-bit device array; raises naming it.

    torch bfloat16 tensors (which export no ``__cuda_array_interface__`` for that
    dtype) are described through an int16 view of the same memory.
    """
    fmt = None
    if fcuda._is_torch(x):
        import torch

        if x.dtype == torch.bfloat16:
            x, fmt = x.detach().view(torch.int16), "bfloat16"
    d = fcuda._describe(x, label)
    fmt = fmt or _TYPESTR_FMT.get(d.typestr)
    if fmt is None:
        raise TypeError(f"{label} has dtype {d.typestr!r}; the half-precision GPU path "
                        "takes float16 arrays or torch bfloat16 tensors")
    fcuda.check_data(d, label)
    fcuda.check_layout(d, label, 2, writable)
    return d, fmt


def _describe_f32(x: Any, label: str, shape: tuple[int, ...], what: str,
                  owner: str) -> Any:
    d = fcuda._describe(x, label)
    if d.typestr in ("<f2", "<i2", "<u2") or (fcuda._is_torch(x) and
                                              str(x.dtype) == "torch.bfloat16"):
        raise TypeError(f"{label} is a 16-bit array: a 16-bit sum of squared gradients "
                        "overflows (float16) or stops growing (bfloat16); "
                        f"{what} of {owner} must be float32")
    if d.typestr != "<f4":
        raise TypeError(f"{label} has dtype {d.typestr!r}; {what} of {owner} must be "
                        "float32")
    if d.shape != shape:
        raise ValueError(f"{label} has shape {d.shape} but {owner} has shape {shape}; "
                         "they must match")
    fcuda.check_data(d, label)
    fcuda.check_layout(d, label, 4, True)
    return d


def _flat(d: Any, typestr: str) -> Any:
    """A 1-D Numba device array of ``typestr`` over ``d``'s memory (no copy)."""
    if fcuda.simulator():
        return d.obj.reshape(d.size)
    desc = {"shape": (d.size,), "typestr": typestr, "data": (d.ptr, False),
            "strides": None, "version": 3, "stream": None}
    return _cuda.from_cuda_array_interface(desc, owner=d.obj, sync=False)


def _check_overlap(work: list[tuple], labels: Sequence[Labels]) -> None:
    """No written array (param, state, master) may share bytes with any other array."""
    ranges = []
    for i, (dp, dg, dh, dm, _) in enumerate(work):
        for d, role, isz, w in ((dp, "param", 2, True), (dg, "grad", 2, False),
                                (dh, "state", 4, True), (dm, "master", 4, True)):
            if d is not None and d.size:
                ranges.append((d.ptr, d.ptr + d.size * isz, w, i, role))
    ranges.sort()
    for a in range(len(ranges)):
        for b in range(a + 1, len(ranges)):
            if ranges[b][0] >= ranges[a][1]:
                break
            if ranges[a][2] or ranges[b][2]:
                names = [f"the master copy of {labels[r[3]].param}" if r[4] == "master"
                         else getattr(labels[r[3]], r[4]) for r in (ranges[a], ranges[b])]
                raise ValueError(f"{names[0]} and {names[1]} share memory; a parameter, "
                                 "its state and master copy are updated in place and "
                                 "must not alias any other input")


def _span(x: Any, label: str) -> tuple[int, int] | None:
    """``x``'s device bytes ``(start, end)``; None for an empty or non-contiguous array
    (refused by its own validation, which runs before any write)."""
    if fcuda._is_torch(x):
        if not x.is_contiguous():
            return None
        start, n = x.data_ptr(), x.numel() * x.element_size()
    else:
        d = fcuda._describe(x, label)
        if d.strides is not None:
            return None
        start, n = d.ptr, d.size * int(d.typestr[2:])
    return (start, start + n) if n else None


def check_across(half: Sequence[int], params: Sequence[Any], grads: Sequence[Any],
                 states: Sequence[Any], labels: Sequence[Labels]) -> None:
    """A model's 16-bit arrays (positions ``half``, validated by :func:`prepare`)
    against its other CUDA arrays: no array written by one group (a parameter, a state)
    may share memory with any array of the other. Each group checks its own."""
    hs = set(half)
    ranges = []
    for i in range(len(params)):
        for x, role in ((params[i], "param"), (grads[i], "grad"), (states[i], "state")):
            if is_cuda_array(x):
                name = getattr(labels[i], role)
                span = _span(x, name)
                if span is not None:
                    ranges.append((*span, i in hs, role != "grad", name))
    hit = cross_overlap(ranges)
    if hit is not None:
        raise ValueError(f"{hit[0]} and {hit[1]} share memory; a parameter and its state "
                         "are updated in place and must not alias any other input")


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           masters: Sequence[Any], labels: Sequence[Labels], hyper: H.Hyper, step: int,
           nonfinite: str, rounding: R.Rounding, seed: int | None,
           tensors: Sequence[int] | None = None) -> bool:
    """Validate every array, then launch one kernel per tensor on the producer's stream
    (``cuda.py``'s policy), without synchronizing, except that ``nonfinite='skip'`` /
    ``'raise'`` reads one flag per tensor back. ``tensors``: each array's position in
    the model, which keys its random stream (default 0, 1, ...)."""
    go = prepare(params, grads, states, masters, labels, hyper, step, nonfinite,
                 rounding, seed, tensors)
    if go is None:
        return False
    go()
    return True


def prepare(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
            masters: Sequence[Any], labels: Sequence[Labels], hyper: H.Hyper, step: int,
            nonfinite: str, rounding: R.Rounding, seed: int | None,
            tensors: Sequence[int] | None = None) -> Any:
    """Everything :func:`update` checks (the NaN/inf scan included), nothing written:
    returns a function that launches the updates, or None if ``nonfinite='skip'``
    skips the step."""
    cuda = fcuda.require_gpu()
    work = []
    devs: dict[int, str] = {}
    for i, (p, g, h) in enumerate(zip(params, grads, states)):
        lab = labels[i]
        for x, label in ((p, lab.param), (g, lab.grad), (h, lab.state),
                         (masters[i], f"the master copy of {lab.param}")):
            if x is not None:
                fcuda.note_device(devs, x, label)
        dp, fmt = _describe_half(p, lab.param, writable=True)
        dg, gfmt = _describe_half(g, lab.grad, writable=False)
        if gfmt != fmt:
            raise TypeError(f"{lab.grad} is {gfmt} but {lab.param} is {fmt}; they must "
                            "match")
        if dg.shape != dp.shape:
            raise ValueError(f"{lab.grad} has shape {dg.shape} but {lab.param} has shape "
                             f"{dp.shape}; they must match")
        dh = _describe_f32(h, lab.state, dp.shape, "the state", lab.param)
        dm = None if masters[i] is None else _describe_f32(
            masters[i], f"the master copy of {lab.param}", dp.shape, "the master copy",
            lab.param)
        work.append((dp, dg, dh, dm, fmt))
    _check_overlap(work, labels)
    if not work:
        return lambda: None
    ids = range(len(work)) if tensors is None else tensors
    stream = fcuda._stream_for(params[0], work[0][0])
    coefs = hyper.coefficients(np.dtype(np.float32), step)
    flags = coefs[7]
    stochastic = rounding == "stochastic"
    carrier = {"bfloat16": "<i2", "float16": "<u2"}
    guard = fcuda.device_guard(devs)  # (the arrays' device is current for each launch)
    if nonfinite != "ignore":
        with guard:
            found = cuda.to_device(np.zeros(len(work), np.int32), stream=stream)
            for k, (_, dg, _, _, fmt) in enumerate(work):
                _, check = kernels(fmt, flags, False, False)
                blocks, tpb = fcuda.launch_config(dg.size)
                check[blocks, tpb, stream](_flat(dg, carrier[fmt]), coefs[6], found, k)
            bad = np.flatnonzero(found.copy_to_host(stream=stream))
            stream.synchronize()
        if bad.size:
            if nonfinite == "skip":
                return None
            raise FloatingPointError(f"{labels[int(bad[0])].grad} contains NaN or inf; "
                                     "nothing was updated")
    return lambda: _launch(work, ids, stream, coefs, flags, stochastic, seed, step, guard)


def _launch(work: list[tuple], ids: Sequence[int], stream: Any, coefs: tuple, flags: int,
            stochastic: bool, seed: int | None, step: int, guard: Any) -> None:
    with guard:
        _launch_all(work, ids, stream, coefs, flags, stochastic, seed, step)


def _launch_all(work: list[tuple], ids: Sequence[int], stream: Any, coefs: tuple,
                flags: int, stochastic: bool, seed: int | None, step: int) -> None:
    carrier = {"bfloat16": "<i2", "float16": "<u2"}
    for t, (dp, dg, dh, dm, fmt) in zip(ids, work):
        n = dp.size
        if n == 0:
            continue
        key = (fmt, flags, stochastic, dm is not None)
        k0, k1 = R.stream_key(seed, step, t) if seed is not None else (
            np.uint32(0), np.uint32(0))
        blocks, tpb = fcuda.launch_config(n)
        # Numba's dispatcher, a public API (a launcher that packed Numba's array ABI by
        # hand from private internals was removed: it could not be checked, and it
        # retried a non-idempotent step after any error); errors propagate.
        hf = _flat(dh, "<f4")
        kernels(*key)[0][blocks, tpb, stream](
            _flat(dp, carrier[fmt]), _flat(dg, carrier[fmt]), hf,
            hf if dm is None else _flat(dm, "<f4"), k0, k1, *coefs[:7])


def state_like(p: Any, fill: float) -> Any:
    """A float32 device array shaped like the 16-bit ``p``, all ``fill`` (its state)."""
    fcuda.require_gpu()
    if fcuda._is_torch(p):
        import torch

        return torch.full(tuple(p.shape), fill, dtype=torch.float32, device=p.device)
    with fcuda.on_device_of(p):  # (on p's device, not whichever is current)
        if type(p).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy.full(p.shape, fill, np.float32)
        return fcuda.full(int(np.prod(p.shape)), np.float32, fill).reshape(p.shape)


def master_like(p: Any) -> Any:
    """A float32 device copy of the 16-bit ``p`` (torch and CuPy arrays)."""
    fcuda.require_gpu()
    if fcuda._is_torch(p):
        return p.detach().float().clone()
    if type(p).__module__.split(".")[0] == "cupy":
        with fcuda.on_device_of(p):
            return p.astype(np.float32)
    raise TypeError("master_weights=True on the GPU takes torch or CuPy arrays (a Numba "
                    "device array has no float32 conversion here); pass master copies "
                    "yourself to adagrad_update(master=...)")
