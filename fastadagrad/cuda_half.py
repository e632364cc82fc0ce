"""GPU kernels for half-precision parameters: bfloat16/float16 ``p`` and ``g``, float32 ``h``.

The same per-element work as :func:`fastadagrad.cpu_half.adagrad_half_span`, with the
same bits:

* the 16-bit conversions and the random stream are the CPU module's own LLVM
  intrinsics (``widen``, ``narrow``, ``_bf16_stochastic``, ``rand32``), which NVVM
  compiles to ``cvt.f32.f16``/``cvt.rn.f16.f32`` and 32-bit integer shifts and
  multiplies: one definition for both targets;
* the float32 math rounds each operation once through libdevice's ``*_rn`` functions,
  in the order of ``cuda.py`` (which is the CPU's order), so nothing is contracted
  into an FMA unless the rule asks for one.

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
from ._arrays import Labels

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
    mul, add, div, sqrt, fma = fcuda._ops(np.dtype(np.float32))
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
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    decoupled = (flags & H.WD_DECOUPLED) != 0
    fma_h = (flags & H.FMA_ACCUMULATE) != 0
    fma_wd = (flags & H.FMA_WEIGHT_DECAY) != 0
    zero_h0 = (flags & H.ZERO_WHERE_H0) != 0

    @cuda.jit
    def adagrad(p, g, h, m, k0, k1, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                grad_scale):
        """cpu_half.adagrad_half_span per element; cuda.py's operation order."""
        zero = eps_in - eps_in
        n = _u64(p.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            gi = widen(g[i])
            if scale:
                gi = div(gi, grad_scale)
            if maximize:
                gi = -gi
            if master:
                pi = m[i]
            else:
                pi = widen(p[i])
            if coupled:
                if fma_wd:
                    gi = fma(pi, wd, gi)
                else:
                    gi = add(gi, mul(pi, wd))
            elif decoupled:
                pi = add(pi, -mul(mul(pi, wd), lr_wd))
            if fma_h:
                hi = fma(gi, gi, h[i])
            else:
                hi = add(h[i], mul(gi, gi))
            q = div(mul(lr_num, gi), add(sqrt(add(hi, eps_in)), eps_out))
            if zero_h0 and hi == zero:
                q = zero
            h[i] = hi
            x = add(pi, -mul(q, lr_after))
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


def _device_half(x: Any, label: str, *, writable: bool) -> tuple[Any, str]:
    """(flat carrier device array, format) for a 16-bit device array; raises naming it.

    torch bfloat16 tensors (which export no ``__cuda_array_interface__`` for that
    dtype) are viewed as int16, sharing memory.
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
    itemsize = 2
    if d.strides is not None and d.size > 1:
        expect = itemsize
        for extent, stride in zip(reversed(d.shape), reversed(d.strides)):
            if extent != 1 and stride != expect:
                raise ValueError(f"{label} is not C-contiguous; pass a contiguous array "
                                 "(it is updated in place, so no copy is made)")
            expect *= extent
    if writable and d.readonly:
        raise ValueError(f"{label} is read-only; it is updated in place")
    if fcuda.simulator():
        return d.obj.reshape(d.size), fmt
    carrier = "<i2" if fmt == "bfloat16" else "<u2"
    desc = {"shape": (d.size,), "typestr": carrier, "data": (d.ptr, False),
            "strides": None, "version": 3, "stream": None}
    return fcuda._cuda.from_cuda_array_interface(desc, owner=d.obj, sync=False), fmt


def _device_f32(x: Any, label: str, shape: tuple[int, ...], what: str) -> Any:
    d = fcuda._describe(x, label)
    if d.typestr != "<f4":
        raise TypeError(f"{label} has dtype {d.typestr!r}; {what} must be float32")
    if d.shape != shape:
        raise ValueError(f"{label} has shape {d.shape} but the param has shape {shape}")
    fcuda._check_array(d, label, writable=True)
    return fcuda._flat(d, np.dtype(np.float32))


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           masters: Sequence[Any], labels: Sequence[Labels], hyper: H.Hyper, step: int,
           nonfinite: str, rounding: R.Rounding, seed: int | None) -> bool:
    """Validate every array, then launch one kernel per tensor (asynchronous, except
    that ``nonfinite='skip'``/``'raise'`` reads one flag per tensor back)."""
    cuda = fcuda.require_gpu()
    work = []
    for i, (p, g, h) in enumerate(zip(params, grads, states)):
        lab = labels[i]
        pf, fmt = _device_half(p, lab.param, writable=True)
        gf, gfmt = _device_half(g, lab.grad, writable=False)
        if gfmt != fmt:
            raise TypeError(f"{lab.grad} is {gfmt} but {lab.param} is {fmt}; they must "
                            "match")
        shape = tuple(fcuda._describe(p, lab.param).shape) if not fcuda._is_torch(p) \
            else tuple(p.shape)
        if tuple(fcuda._describe(g, lab.grad).shape if not fcuda._is_torch(g)
                 else g.shape) != shape:
            raise ValueError(f"{lab.grad} has a different shape than {lab.param}")
        hf = _device_f32(h, lab.state, shape, "the state")
        mf = None if masters[i] is None else _device_f32(masters[i], f"master of "
                                                         f"{lab.param}", shape,
                                                         "master weights")
        work.append((pf, gf, hf, mf, fmt))
    coefs = hyper.coefficients(np.dtype(np.float32), step)
    flags = coefs[7]
    stochastic = rounding == "stochastic"
    if nonfinite != "ignore":
        found = cuda.to_device(np.zeros(len(work), np.int32))
        for k, (_, gf, _, _, fmt) in enumerate(work):
            _, check = kernels(fmt, flags, False, False)
            blocks, tpb = fcuda.launch_config(gf.size)
            check[blocks, tpb](gf, coefs[6], found, k)
        bad = np.flatnonzero(found.copy_to_host())
        if bad.size:
            if nonfinite == "skip":
                return False
            raise FloatingPointError(f"{labels[int(bad[0])].grad} contains NaN or inf; "
                                     "nothing was updated")
    for t, (pf, gf, hf, mf, fmt) in enumerate(work):
        if pf.size == 0:
            continue
        kern, _ = kernels(fmt, flags, stochastic, mf is not None)
        k0, k1 = R.stream_key(seed, step, t) if seed is not None else (
            np.uint32(0), np.uint32(0))
        blocks, tpb = fcuda.launch_config(pf.size)
        kern[blocks, tpb](pf, gf, hf, hf if mf is None else mf, k0, k1, *coefs[:7])
    return True
