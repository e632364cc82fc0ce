"""GPU kernels: the fused one-pass AdaGrad update with numba-cuda, and their launcher.

The kernels are bare grid-stride loops over flat 1-D device buffers (64-bit indices,
so buffers above 2^31 elements work) that compute exactly the per-element operations
of :func:`fastadagrad.cpu.adagrad_span`, in the same order, each rounded once:

* every multiply and add goes through libdevice's ``fmul_rn``/``fadd_rn``
  (``dmul_rn``/``dadd_rn`` in float64), which NVVM cannot contract into an FMA —
  ``@cuda.jit`` otherwise turns ``h + g*g`` into ``fma.rn`` while the CPU rounds twice;
* an FMA appears only where the rule asks for one (``FMA_ACCUMULATE``,
  ``FMA_WEIGHT_DECAY``: ``fmaf_rn``/``fma_rn``, like the CPU's ``llvm.fma``);
* ``/`` and ``sqrt`` are ``fdiv_rn``/``fsqrt_rn`` (IEEE ``div.rn``/``sqrt.rn``), no
  fastmath, no flush-to-zero.

So for the same inputs the GPU writes the same bits as the CPU (checked on hardware by
``python -m fastadagrad validate``; the PTX is checked in CI by
``tests/test_cuda_ptx.py``).

Launch policy (documented for users in :func:`update`):

* one launch per tensor. ``AdaGrad`` with :class:`~fastadagrad.FlatBuffer` params,
  grads and state of one layout passes one flat buffer, i.e. ONE launch per step for
  the whole model; separate device arrays take one launch per tensor (each costs
  ~60-120 us of host time on the H100 machine, see :class:`_DirectLaunch`).
* the stream is the producer's: torch tensors run on
  ``torch.cuda.current_stream()``; arrays whose ``__cuda_array_interface__`` names a
  stream (CuPy) on that stream; Numba device arrays on their own ``.stream`` (the
  default stream unless bound). All tensors of one call go on the stream of the first
  parameter. Launches are asynchronous: ``update`` does NOT synchronize, except that
  ``nonfinite="skip"``/``"raise"`` must read one flag per tensor back to the host to
  decide, which waits for that stream.

Everything here is lazy: importing this module needs neither a GPU nor numba-cuda;
the kernels compile on first use, and asking for the GPU where CUDA cannot be used
raises :class:`CudaUnavailableError`.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np
from numba import uint64 as _u64

from . import _hyper as H
from . import config

try:  # numba-cuda is an optional dependency (the ``[cuda]`` extra)
    from numba import cuda as _cuda

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    _cuda = None  # type: ignore[assignment]
    _IMPORT_ERROR = f"numba.cuda cannot be imported ({exc}); pip install fastadagrad[cuda]"


class CudaUnavailableError(RuntimeError):
    """CUDA arrays were passed (or the GPU was asked for) but CUDA cannot be used here."""


def simulator() -> bool:
    """True when Numba's CUDA simulator is on (``NUMBA_ENABLE_CUDASIM=1``)."""
    return _cuda is not None and bool(_cuda.config.ENABLE_CUDASIM)


_AVAILABLE = False  # once CUDA was found usable it stays so: skip the check per step


def unavailable_reason() -> str | None:
    """Why the GPU cannot be used here, or None if it can."""
    global _AVAILABLE
    if _AVAILABLE:
        return None
    if _cuda is None:
        return _IMPORT_ERROR
    try:
        if _cuda.is_available():
            _AVAILABLE = True
            return None
    except Exception as exc:  # pragma: no cover - driver-dependent
        return f"the CUDA driver cannot be initialised ({exc})"
    return ("no usable CUDA GPU/driver was found (numba.cuda.is_available() is False; "
            "`python -c 'from numba import cuda; cuda.detect()'` says why)")


def require_gpu() -> Any:
    """Return ``numba.cuda`` or raise :class:`CudaUnavailableError` saying why not."""
    reason = unavailable_reason()
    if reason is not None:
        raise CudaUnavailableError(f"fastadagrad: the GPU path cannot be used: {reason}")
    return _cuda


# --- kernels -------------------------------------------------------------------------


def _ops(dtype: np.dtype) -> tuple[Any, ...]:
    """``(mul, add, div, sqrt, fma)``, each rounding exactly once, for ``dtype``.

    Under the simulator the libdevice functions are stubs that return None, so plain
    operators stand in there; the simulator does not reproduce GPU rounding anyway
    (no FMA, float32 ``math.sqrt`` returns a Python float), it checks the logic.
    """
    if simulator():
        return (lambda a, b: a * b, lambda a, b: a + b, lambda a, b: a / b, math.sqrt,
                lambda a, b, c: a * b + c)
    from numba.cuda import libdevice as L

    if np.dtype(dtype) == np.float32:
        return L.fmul_rn, L.fadd_rn, L.fdiv_rn, L.fsqrt_rn, L.fmaf_rn
    return L.dmul_rn, L.dadd_rn, L.ddiv_rn, L.dsqrt_rn, L.fma_rn


@cache
def kernels(dtype: Any, flags: int) -> tuple[Any, Any]:
    """``(adagrad, nonfinite)``: the CUDA kernels for ``dtype`` and the rule ``flags``.

    Built on first use (``@cuda.jit`` without a signature compiles at the first launch).
    ``flags`` (the bit mask of :meth:`Hyper.coefficients`) is a compile-time constant:
    each kernel contains only the operations of its rule (the "numpy" rule's kernel has
    no FMA instruction at all, which ``tests/test_cuda_ptx.py`` checks) and spends no
    registers on the others. A training run uses one or two variants (with and without
    ``grad_scale``); each compiles once per process (about 1.5 s). One set per dtype too,
    because libdevice's correctly-rounded functions are typed.
    """
    cuda = _cuda
    if cuda is None:
        raise CudaUnavailableError(f"fastadagrad: the GPU path cannot be used: "
                                   f"{_IMPORT_ERROR}")
    mul, add, div, sqrt, fma = _ops(np.dtype(dtype))
    scale = (flags & H.GRAD_SCALE) != 0
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    decoupled = (flags & H.WD_DECOUPLED) != 0
    fma_h = (flags & H.FMA_ACCUMULATE) != 0
    fma_wd = (flags & H.FMA_WEIGHT_DECAY) != 0
    zero_h0 = (flags & H.ZERO_WHERE_H0) != 0

    @cuda.jit
    def adagrad(p, g, h, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale):
        """:func:`fastadagrad.cpu.adagrad_span`, same operations in the same order.

        ``a - b`` is written ``add(a, -b)``: negation is exact and IEEE defines
        subtraction that way, so the bits are those of the CPU's ``a - b``.
        """
        zero = eps_in - eps_in
        # 64-bit indices (grid() widens before multiplying), unsigned so that Numba
        # emits no negative-index wraparound fix-up on each of the five accesses.
        n = _u64(p.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            gi = g[i]
            if scale:
                gi = div(gi, grad_scale)
            if maximize:
                gi = -gi
            pi = p[i]
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
            p[i] = add(pi, -mul(q, lr_after))
            i += stride

    @cuda.jit
    def nonfinite(g, grad_scale, found, k):
        """Set ``found[k] = 1`` if any ``g`` (divided by ``grad_scale`` when GRAD_SCALE is
        set, as the update would) is NaN or inf. Read-only on ``g``."""
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
            found[k] = 1  # every writer writes 1: the race is benign

    return adagrad, nonfinite


@cache
def _fill_kernel() -> Any:
    cuda = require_gpu()

    @cuda.jit
    def fill(a, value):
        n = _u64(a.size)
        i = _u64(_cuda.grid(1))
        stride = _u64(_cuda.gridsize(1))
        while i < n:
            a[i] = value
            i += stride

    return fill


@cache
def _sm_count() -> int:
    try:
        return int(_cuda.get_current_device().MULTIPROCESSOR_COUNT)
    except Exception:  # the simulator's fake device has no attributes
        return 1


def launch_config(n: int) -> tuple[int, int]:
    """``(blocks, threads)`` for ``n`` elements: enough blocks to fill the GPU
    (``config.BLOCKS_PER_SM`` per SM), never more than the data needs; the
    grid-stride loop covers the rest."""
    tpb = config.THREADS_PER_BLOCK
    blocks = max(1, min((n + tpb - 1) // tpb, _sm_count() * config.BLOCKS_PER_SM))
    if not simulator():
        # Numba warns (NumbaPerformanceWarning) on every launch of fewer than 128 blocks,
        # which a small tensor legitimately needs; blocks past the end exit at once.
        blocks = max(blocks, _MIN_BLOCKS)
    return blocks, tpb


_MIN_BLOCKS = 128


# --- device arrays ---------------------------------------------------------------------


class _Dev:
    """What validation needs to know about one device array, and its flat view."""

    __slots__ = ("obj", "ptr", "shape", "typestr", "strides", "readonly", "stream")

    def __init__(self, obj: Any, ptr: int, shape: tuple[int, ...], typestr: str,
                 strides: Any, readonly: bool, stream: Any) -> None:
        self.obj, self.ptr, self.shape, self.typestr = obj, ptr, shape, typestr
        self.strides, self.readonly, self.stream = strides, readonly, stream

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _describe(x: Any, label: str) -> _Dev:
    """Read ``x``'s array interface (the simulator's fake arrays wrap a NumPy array)."""
    if simulator() and hasattr(x, "_ary"):
        ai = x._ary.__array_interface__
        return _Dev(x, ai["data"][0], tuple(ai["shape"]), ai["typestr"], ai["strides"],
                    ai["data"][1], None)
    if _is_torch(x) and getattr(x, "requires_grad", False):
        x = x.detach()  # shares storage; torch optimizers also update params under no_grad
    try:
        cai = x.__cuda_array_interface__
    except Exception as exc:
        raise TypeError(f"{label} ({type(x).__module__}.{type(x).__qualname__}) does not "
                        f"expose a usable __cuda_array_interface__: {exc}") from None
    data = cai["data"]
    return _Dev(x, int(data[0] or 0), tuple(int(s) for s in cai["shape"]),
                cai["typestr"], cai.get("strides"), bool(data[1]), cai.get("stream"))


_TYPESTRS = {"<f4": np.dtype(np.float32), "<f8": np.dtype(np.float64)}


def _check_array(d: _Dev, label: str, *, writable: bool) -> np.dtype:
    dt = _TYPESTRS.get(d.typestr)
    if dt is None:
        raise TypeError(f"{label} has dtype {d.typestr!r}; fastadagrad updates float32 and "
                        "float64 arrays in native (little-endian) byte order only")
    if d.strides is not None and d.size > 1:
        expect = dt.itemsize
        for extent, stride in zip(reversed(d.shape), reversed(d.strides)):
            if extent != 1 and stride != expect:
                raise ValueError(f"{label} is not C-contiguous; pass a contiguous array "
                                 "(a parameter is updated in place, so no copy is made)")
            expect *= extent
    if writable and d.readonly:
        raise ValueError(f"{label} is read-only; it is updated in place")
    return dt


def _device_id(x: Any) -> Any:
    dev = getattr(x, "device", None)
    if dev is None:
        return None
    for attr in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        v = getattr(dev, attr, None)
        if isinstance(v, int):
            return v
    return None


def _flat(d: _Dev, dt: np.dtype) -> Any:
    """A 1-D Numba device array over ``d``'s memory (no copy)."""
    n = d.size
    if simulator():
        return d.obj.reshape(n)
    obj = d.obj
    if getattr(type(obj), "__cuda_ndarray__", False):
        # a Numba device array (e.g. a FlatBuffer's data): use it, or a reshaped view,
        # directly; wrapping its interface again costs ~17 us per array per step (H100)
        return obj if obj.ndim == 1 else obj.reshape(n)
    desc = {"shape": (n,), "typestr": d.typestr, "data": (d.ptr, False), "strides": None,
            "version": 3, "stream": None}
    # sync=False: the kernel is launched on the producer's stream, which orders it.
    return _cuda.from_cuda_array_interface(desc, owner=d.obj, sync=False)


_STREAMS: dict[Any, Any] = {}


def _builtin_stream(kind: str) -> Any:
    """``numba.cuda.default_stream()`` and friends, made once: each call of those looks
    the CUDA context up again (``_require_cuda_context``), the largest single cost of a
    step's host overhead in a profile on the H100 machine."""
    s = _STREAMS.get(kind)
    if s is None:
        s = _STREAMS[kind] = getattr(_cuda, kind)()
    return s


def _stream_for(x: Any, d: _Dev) -> Any:
    """The producer's stream for ``x`` (see the module docstring)."""
    cuda = _cuda
    if simulator():
        return cuda.default_stream()
    if _is_torch(x):
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # ~1 us, vs ~27 us
        ptr = int(raw(x.device.index) if raw is not None  # for current_stream() (H100)
                  else torch.cuda.current_stream(x.device).cuda_stream)
        if ptr == 0:  # torch's default stream is the legacy NULL stream
            return _builtin_stream("legacy_default_stream")
    elif isinstance(d.stream, int) and d.stream:  # CAI v3 "stream" (CuPy exports one)
        ptr = d.stream
        if ptr == 1:
            return _builtin_stream("legacy_default_stream")
        if ptr == 2:
            return _builtin_stream("per_thread_default_stream")
    else:  # Numba device arrays carry a stream (0: Numba's default stream)
        s = getattr(x, "stream", 0)
        return s if s else _builtin_stream("default_stream")
    s = _STREAMS.get(ptr)
    if s is None:
        if len(_STREAMS) > 64:
            _STREAMS.clear()
        s = _STREAMS[ptr] = cuda.external_stream(ptr)
    return s


# --- front door ------------------------------------------------------------------------


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           labels: Sequence[Any], hyper: H.Hyper, step: int, nonfinite: str) -> bool:
    """One fused step on device arrays, in place; False if ``nonfinite="skip"`` skipped it.

    Called by :func:`fastadagrad._dispatch.update` once every input is known to be a
    CUDA array. Validates every array (dtype, shape, contiguity, writability, device,
    aliasing) before anything is written or launched. Launches one kernel per tensor on
    the producer's stream (module docstring) without synchronizing, except for the
    non-finite check of ``"skip"``/``"raise"``, which reads its flags back.
    """
    cuda = require_gpu()
    from ._arrays import check_no_overlap, coefficients

    n = len(params)
    triples = []
    dev0: Any = None
    for i in range(n):
        lab = labels[i]
        dp = _describe(params[i], lab.param)
        dg = _describe(grads[i], lab.grad)
        dh = _describe(states[i], lab.state)
        dt = _check_array(dp, lab.param, writable=True)
        for d, label, writable in ((dg, lab.grad, False), (dh, lab.state, True)):
            other = _check_array(d, label, writable=writable)
            if other != dt:
                raise TypeError(f"{label} has dtype {other} but {lab.param} has dtype "
                                f"{dt}; they must match")
            if d.shape != dp.shape:
                raise ValueError(f"{label} has shape {d.shape} but {lab.param} has shape "
                                 f"{dp.shape}; they must match")
        for x, label in ((params[i], lab.param), (grads[i], lab.grad),
                         (states[i], lab.state)):
            dev = _device_id(x)
            if dev is not None:
                if dev0 is None:
                    dev0 = dev
                elif dev != dev0:
                    raise ValueError(f"{label} is on CUDA device {dev} but other inputs "
                                     f"are on device {dev0}; pass arrays of one device")
        triples.append((dp, dg, dh, dt))
    if n == 0:
        return True
    nbytes = np.fromiter((t[0].size * t[3].itemsize for t in triples), np.int64, n)
    addr = [np.fromiter((t[k].ptr for t in triples), np.int64, n) for k in range(3)]
    check_no_overlap(addr[0], addr[1], addr[2], nbytes, labels)

    stream = _stream_for(params[0], triples[0][0])
    work = [(dp, dg, dh, dt, coefficients(hyper, dt, step))
            for dp, dg, dh, dt in triples if dp.size]

    if nonfinite != "ignore" and work:
        found = cuda.to_device(np.zeros(len(work), np.int32), stream=stream)
        for k, (_, dg, _, dt, coefs) in enumerate(work):
            blocks, tpb = launch_config(dg.size)
            kernels(dt, coefs[7])[1][blocks, tpb, stream](_flat(dg, dt), coefs[6], found,
                                                         k)
        bad = found.copy_to_host(stream=stream)  # waits for the stream
        stream.synchronize()
        if bad.any():
            if nonfinite == "raise":
                k = int(np.flatnonzero(bad)[0])
                idx = [i for i, t in enumerate(triples) if t[0].size][k]
                raise FloatingPointError(f"{labels[idx].grad} contains NaN or inf; nothing "
                                         "was updated")
            return False

    for dp, dg, dh, dt, coefs in work:
        blocks, tpb = launch_config(dp.size)
        direct = _direct_launcher(dt, coefs[7])
        if direct is not None and direct.launch(stream, blocks, tpb, dp, dg, dh, coefs):
            continue
        kernels(dt, coefs[7])[0][blocks, tpb, stream](
            _flat(dp, dt), _flat(dg, dt), _flat(dh, dt), *coefs[:7])
    return True


class _DirectLaunch:
    """Launch one compiled update kernel without Numba's dispatcher (real GPUs only).

    Each dispatcher launch costs ~50-85 us of host time on the H100 machine, and wrapping
    the three arrays as Numba device arrays ~17 us each: more than the kernel itself
    takes below ~2^24 elements. This packs the arguments the way Numba's launcher does
    (a 1-D C array is ``meminfo, parent, nitems, itemsize, data, shape, stride``; a
    float32/float64 scalar a ``ctypes.c_float``/``c_double``) straight from the arrays'
    pointers and calls ``cuda.core``'s ``launch``. It is built from the kernel that the
    dispatcher compiled on its first launch, only if that kernel has exactly the
    expected signature; any failure turns it off for good and the dispatcher is used.
    """

    def __init__(self, dispatcher: Any, dtype: np.dtype) -> None:
        from cuda.core import LaunchConfig, launch
        from numba.cuda import types as nbt
        from numba.cuda._compat import CUDA_CORE_GE_1_0

        (kern,) = dispatcher.overloads.values()  # one signature per (dtype, rule)
        scalar = nbt.float32 if dtype == np.float32 else nbt.float64
        want_arr = nbt.Array(scalar, 1, "C")
        if tuple(kern.argument_types) != (want_arr,) * 3 + (scalar,) * 7 or \
                kern.cooperative:
            raise TypeError("unexpected kernel signature")
        self.kernel = kern._codelibrary.get_cufunc().kernel
        self.itemsize = np.dtype(dtype).itemsize
        self.box = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self.launch_fn = launch
        self.config = (lambda b, t: LaunchConfig(grid=b, block=t, shmem_size=0,
                                                 is_cooperative=False)) \
            if CUDA_CORE_GE_1_0 else \
            (lambda b, t: LaunchConfig(grid=b, block=t, shmem_size=0,
                                       cooperative_launch=False))
        self.ok = True

    def launch(self, stream: Any, blocks: int, tpb: int, dp: _Dev, dg: _Dev, dh: _Dev,
               coefs: tuple) -> bool:
        """Launch; False (and off for good) if anything is not as expected."""
        if not self.ok:
            return False
        try:
            from numba.cuda.cudadrv.driver import _to_core_stream

            n, isz = dp.size, self.itemsize
            args: list[Any] = []
            for d in (dp, dg, dh):
                args += (0, 0, n, isz, d.ptr, n, isz)
            args += [self.box(c) for c in coefs[:7]]
            self.launch_fn(_to_core_stream(stream), self.config(blocks, tpb), self.kernel,
                           *args)
            return True
        except Exception:  # noqa: BLE001 - any surprise: use the dispatcher from now on
            self.ok = False
            return False


_DIRECT: dict[tuple[Any, int], Any] = {}


def _direct_launcher(dtype: np.dtype, flags: int) -> _DirectLaunch | None:
    """The direct launcher for a kernel the dispatcher has compiled, else None."""
    if simulator():
        return None
    key = (np.dtype(dtype), flags)
    direct = _DIRECT.get(key)
    if direct is None:
        dispatcher = kernels(dtype, flags)[0]
        if not dispatcher.overloads:
            return None  # not compiled yet: the first launch goes through Numba
        try:
            direct = _DirectLaunch(dispatcher, np.dtype(dtype))
        except Exception:  # noqa: BLE001 - another numba-cuda layout: keep the dispatcher
            direct = False
        _DIRECT[key] = direct
    return direct or None


# --- allocation helpers used by FlatBuffer and AdaGrad -----------------------------------


def to_device(host: np.ndarray) -> Any:
    """A Numba device array holding a copy of ``host``."""
    return require_gpu().to_device(np.ascontiguousarray(host))


def full(n: int, dtype: Any, value: float) -> Any:
    """A new 1-D Numba device array of ``n`` elements of ``dtype``, all ``value``.

    Filled by a kernel on the default stream: no host buffer, no transfer.
    """
    cuda = require_gpu()
    dt = np.dtype(dtype)
    out = cuda.device_array(int(n), dt)
    if n:
        blocks, tpb = launch_config(int(n))
        _fill_kernel()[blocks, tpb](out, dt.type(value))
    return out


def full_like(x: Any, value: float) -> Any:
    """A new C-contiguous device array like ``x`` (same library when that is torch or
    CuPy, else a Numba device array) filled with ``value`` rounded to its dtype."""
    require_gpu()
    if _is_torch(x):
        import torch

        return torch.full_like(x.detach(), value, memory_format=torch.contiguous_format)
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.full(x.shape, value, x.dtype)
    d = _describe(x, "array")
    dt = _TYPESTRS.get(d.typestr)
    if dt is None:  # let validation name the offending array later
        dt = np.dtype(np.float32)
    return full(d.size, dt, value).reshape(d.shape)
