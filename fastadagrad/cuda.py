"""The GPU path: validation, per-model device tables and the step's launches.

The kernels live in :mod:`fastadagrad.cuda_kernels` (bare loops over raw addresses,
bit-identical to :func:`fastadagrad.cpu.adagrad_span`), their loading and launching in
:mod:`fastadagrad.cuda_launch` (numba-cuda's public ``compile`` + ``cuda.core``, or
Numba's dispatcher). This module turns a call of :func:`update` into launches:

* **one update launch per dtype per step for the whole model**, however many separate
  device arrays it has (Numba, CuPy, torch CUDA tensors): a device-side table of the
  tensors' addresses and of fixed-size chunks (:class:`Tables`, apex
  ``multi_tensor_apply`` / torch ``_foreach`` style), built once per model layout and
  reused; only the gradients' column is rewritten when a gradient moves.
* **validation cached across steps** (:class:`GpuCache`, kept by the optimizer's plan):
  every step re-reads each array's address, shape, strides and dtype (identity for
  Numba arrays) and compares them with what was validated; any difference sends the
  step through full validation before anything is launched. No launch uses an address
  that was not confirmed in the same call.
* **non-finite check on the device**: a check kernel sets a flag in a preallocated
  control block, the update kernel reads it, an end-of-step kernel counts the step
  and clears the flag. ``"skip"`` needs no host round trip to decide (see
  :func:`update` for what the return value costs); ``"raise"`` reads the flags back.
* **CUDA graphs** (``capturable``): step and learning rate live in the control block,
  so a captured step replays correctly.
* **streams and devices**: launches go on the producer's stream — torch's current
  stream for torch tensors, the ``__cuda_array_interface__`` stream for CuPy, a Numba
  array's own stream (default stream otherwise) — on the device that owns the arrays
  (a device guard on multi-GPU machines); arrays of two devices are refused, naming
  both. Caches (tables, SM counts, loaded kernels) are keyed by device.

Everything is lazy: importing this module needs neither a GPU nor numba-cuda; kernels
compile on first use, and asking for the GPU where CUDA cannot be used raises
:class:`CudaUnavailableError`.
"""

from __future__ import annotations

import math
import operator
import weakref
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np
from numba import uint64 as _u64

from . import _hyper as H
from . import config
from ._arrays import coefficients

try:  # numba-cuda is an optional dependency (the ``[cuda]`` extra)
    from numba import cuda as _cuda

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the installation
    _cuda = None  # type: ignore[assignment]
    _IMPORT_ERROR = (f"numba.cuda cannot be imported ({exc}); install the cuda extra "
                     '(pip install ".[cuda]" in a checkout of fastadagrad)')


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


_SM: dict[int, int] = {}


def _sm_count(device: int | None = None) -> int:
    """Streaming multiprocessors of ``device`` (default: the current one), cached per
    device."""
    key = -1 if device is None else device
    n = _SM.get(key)
    if n is None:
        try:
            dev = _cuda.get_current_device() if device is None else _cuda.gpus[device]
            n = int(getattr(dev, "MULTIPROCESSOR_COUNT", None) or
                    _cuda.get_current_device().MULTIPROCESSOR_COUNT)
        except Exception:  # the simulator's fake device has no attributes
            n = 1
        _SM[key] = n
    return n


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


def check_data(d: _Dev, label: str) -> None:
    """Refuse an array with elements but a null data pointer (a torch tensor whose
    storage was freed with ``untyped_storage().resize_(0)``, as FSDP does): a kernel
    writing there stops the CUDA context with an illegal-address error."""
    if d.ptr == 0 and d.size:
        raise ValueError(f"{label} has {d.size} elements but no memory (a null device "
                         "pointer: its storage was freed?); nothing was updated")


def _check_array(d: _Dev, label: str, *, writable: bool) -> np.dtype:
    check_data(d, label)
    dt = _TYPESTRS.get(d.typestr)
    if dt is None:
        raise TypeError(f"{label} has dtype {d.typestr!r}; fastadagrad updates float32 and "
                        "float64 arrays in native (little-endian) byte order only")
    check_layout(d, label, dt.itemsize, writable)
    return dt


def check_layout(d: Any, label: str, itemsize: int, writable: bool) -> None:
    """Raise, naming ``label``, unless device array ``d`` (its ``_Dev`` description)
    is C-contiguous for elements of ``itemsize`` bytes, and writable where asked."""
    if d.strides is not None and d.size > 1:
        expect = itemsize
        for extent, stride in zip(reversed(d.shape), reversed(d.strides)):
            if extent != 1 and stride != expect:
                raise ValueError(f"{label} is not C-contiguous; pass a contiguous array "
                                 + ("(it is updated in place, so no copy is made)"
                                    if writable else "(it is read where it lies: no copy "
                                    "is made)"))
            expect *= extent
    if writable and d.readonly:
        raise ValueError(f"{label} is read-only; it is updated in place")


def _device_id(x: Any) -> Any:
    """The CUDA device of array ``x``: torch's ``.device.index``, CuPy's
    ``.device.id``, a Numba device array's allocation context's device; None where it
    cannot tell."""
    dev = getattr(x, "device", None)
    if dev is None:  # Numba: the context its memory was allocated in
        dev = getattr(getattr(getattr(x, "gpu_data", None), "context", None), "device",
                      None)
        if dev is None:
            return None
    for attr in ("index", "id"):  # torch.device.index, cupy.cuda.Device.id
        v = getattr(dev, attr, None)
        if isinstance(v, int):
            return v
    return None


_STREAMS: dict[Any, Any] = {}


def _builtin_stream(kind: str) -> Any:
    """``numba.cuda.default_stream()`` and friends, made once: each call of those looks
    the CUDA context up again (``_require_cuda_context``), the largest single cost of a
    step's host overhead in a profile on the H100 machine."""
    s = _STREAMS.get(kind)
    if s is None:
        s = _STREAMS[kind] = getattr(_cuda, kind)()
    return s


_RAW_STREAM_CHECKED: set[int] = set()


def _torch_stream(torch: Any, device: Any) -> int:
    """torch's current stream on ``device``, as a raw pointer.

    The public ``torch.cuda.current_stream(device).cuda_stream`` costs ~27 us per call
    on the H100 machine (it builds a Stream object); torch's private
    ``_cuda_getCurrentRawStream`` returns the same pointer in ~1 us. The private one is
    used only after it returned exactly the public answer on this device once; if it
    ever disagrees, that is an error (torch changed what it means), not a fallback.
    """
    idx = device.index if device.index is not None else torch.cuda.current_device()
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is None:
        return int(torch.cuda.current_stream(device).cuda_stream)
    ptr = int(raw(idx))
    if idx not in _RAW_STREAM_CHECKED:
        public = int(torch.cuda.current_stream(device).cuda_stream)
        if ptr != public:
            raise RuntimeError(
                f"torch._C._cuda_getCurrentRawStream({idx}) returned {ptr:#x} but "
                f"torch.cuda.current_stream() is {public:#x}: this torch version changed "
                "that private function; fastadagrad must be updated for it")
        _RAW_STREAM_CHECKED.add(idx)
    return ptr


def _stream_for(x: Any, d: _Dev | None) -> Any:
    """The producer's stream for ``x`` (see the module docstring)."""
    cuda = _cuda
    if simulator():
        return cuda.default_stream()
    if _is_torch(x):
        import torch

        ptr = _torch_stream(torch, x.device)
        if ptr == 0:  # torch's default stream is the legacy NULL stream
            return _builtin_stream("legacy_default_stream")
    elif d is not None and isinstance(d.stream, int) and d.stream:  # CAI v3 "stream"
        # (CuPy exports one)
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


# --- per-model device tables -----------------------------------------------------------


class _Group:
    """One dtype group of a model: its tensor and chunk table on the device."""

    __slots__ = ("dtype", "idx", "ntens", "nchunks", "blocks", "host", "dev", "addr")

    def __init__(self, dtype: np.dtype, idx: list[int], host: np.ndarray, ntens: int,
                 nchunks: int, blocks: int) -> None:
        self.dtype, self.idx, self.host = dtype, idx, host
        self.ntens, self.nchunks, self.blocks = ntens, nchunks, blocks
        self.dev: Any = None
        self.addr = 0


class Tables:
    """The device-side description of one model layout on one device, built once.

    Per dtype group a tensor table and a chunk table (see :mod:`fastadagrad.cuda_kernels`
    for the layout) and one control block for the whole model. Only the gradients'
    column is rewritten (and the table uploaded again) when a gradient's address
    changes. ``capturable`` control blocks also hold the step count and the learning
    rate for CUDA graphs.
    """

    def __init__(self, layout: tuple, pptr: list[int], gptr: list[int], hptr: list[int],
                 sizes: list[int], dtypes: list[np.dtype], device: int, stream: Any,
                 capturable: bool, step: int, hyper: H.Hyper) -> None:
        from . import cuda_kernels as K

        self.layout, self.device, self.capturable = layout, device, capturable
        self.chunk, self.tpb = config.GPU_CHUNK, config.THREADS_PER_BLOCK
        self.gptr = list(gptr)
        self.skipped_seen = 0  # the device's skipped count when last read
        self.launches: Any = None  # the last step's packed launches (see _run)
        n = len(pptr)
        max_blocks = config.GPU_MAX_BLOCKS or max(1, _sm_count(device) *
                                                  config.BLOCKS_PER_SM)
        self.groups: list[_Group] = []
        for dt in sorted(set(dtypes), key=lambda d: d.itemsize):
            idx = [i for i in range(n) if dtypes[i] == dt and sizes[i]]
            if not idx:
                continue
            rows = np.zeros((len(idx), K.ROW), np.int64)
            rows[:, 0] = [pptr[i] for i in idx]
            rows[:, 1] = [gptr[i] for i in idx]
            rows[:, 2] = [hptr[i] for i in idx]
            rows[:, 3] = [sizes[i] for i in idx]
            rows[:, 4] = idx
            chunk = self.chunk
            counts = np.array([(sizes[i] + chunk - 1) // chunk for i in idx], np.int64)
            t = np.repeat(np.arange(len(idx), dtype=np.int64), counts)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            start = (np.arange(t.size, dtype=np.int64) - first) * chunk
            host = np.concatenate((rows.reshape(-1), np.stack((t, start), 1).reshape(-1)))
            self.groups.append(_Group(dt, idx, host, len(idx), int(t.size),
                                      min(int(t.size), max_blocks)))
        ctl = np.zeros(K.CTL_HEAD + n, np.int64)
        ctl[K.CTL_NTOT] = n
        ctl[K.CTL_STEP] = step - 1
        self.lr = _lr_bits(hyper)
        ctl[K.CTL_LR:K.CTL_LR_DECAY + 1] = self.lr
        self.ctl_host = ctl
        with _on_device(device):
            for g in self.groups:
                g.dev, g.addr = _upload(g.host, stream)
            self.ctl_dev, self.ctl = _upload(ctl, stream)

    def refresh_grads(self, gptr: list[int], stream: Any) -> None:
        """Write the gradients' new addresses into the tables (only those that moved)."""
        from . import cuda_kernels as K

        _refuse_if_capturing("the gradients' addresses changed since the last step")
        for g in self.groups:
            col = g.host[1:K.ROW * g.ntens:K.ROW]
            new = np.fromiter((gptr[i] for i in g.idx), np.int64, g.ntens)
            if not np.array_equal(col, new):
                col[:] = new
                with _on_device(self.device):
                    _copy_in(g.dev, g.host, stream)
        self.gptr = list(gptr)

    def set_lr(self, hyper: H.Hyper, stream: Any) -> None:
        """Capturable mode: the learning rate lives on the device; write a new one."""
        from . import cuda_kernels as K

        lr = _lr_bits(hyper)  # (bits: -0.0 == 0.0, but the sign reaches the update)
        if lr != self.lr:
            _refuse_if_capturing("the learning rate changed since the last step")
            self.ctl_host[K.CTL_LR:K.CTL_LR_DECAY + 1] = lr
            with _on_device(self.device):
                _copy_slice_in(self.ctl_dev, self.ctl_host, K.CTL_LR, K.CTL_LR_DECAY + 1,
                               stream)
            self.lr = lr

    def counters(self, stream: Any) -> tuple[int, int]:
        """``(applied steps, skipped steps)`` counted on the device; waits for
        ``stream``."""
        from . import cuda_kernels as K

        with _on_device(self.device):
            c = _copy_out(self.ctl_dev, stream)
        return int(c[K.CTL_STEP]), int(c[K.CTL_SKIPPED])

    def flags(self, stream: Any) -> np.ndarray:
        """The control block (found flag and per-tensor flags); waits for ``stream``."""
        with _on_device(self.device):
            return _copy_out(self.ctl_dev, stream)


def _lr_bits(hyper: H.Hyper) -> tuple[int, int]:
    """The bits of the learning rate and its decay, as the control block holds them."""
    lr, decay = np.array((hyper.lr, hyper.lr_decay), np.float64).view(np.int64).tolist()
    return lr, decay


def _upload(host: np.ndarray, stream: Any) -> tuple[Any, int]:
    """A device copy of ``host`` and its address (under the simulator: ``host`` itself,
    whose memory is the simulated device's)."""
    if simulator():
        return host, int(host.ctypes.data)
    dev = _cuda.to_device(host, stream=stream.numba)
    return dev, int(dev.__cuda_array_interface__["data"][0])


def _copy_in(dev: Any, host: np.ndarray, stream: Any) -> None:
    if dev is not host:  # the simulator's tables are the host arrays themselves
        dev.copy_to_device(host, stream=stream.numba)


def _copy_slice_in(dev: Any, host: np.ndarray, a: int, b: int, stream: Any) -> None:
    if dev is not host:
        dev[a:b].copy_to_device(host[a:b], stream=stream.numba)


def _copy_out(dev: Any, stream: Any) -> np.ndarray:
    if simulator():
        return np.array(dev)
    out = dev.copy_to_host(stream=stream.numba)
    stream.numba.synchronize()
    return out


class _NoGuard:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_GUARD = _NoGuard()
_NGPUS: list[int] = []


def _on_device(device: int) -> Any:
    """A device guard: the arrays' device is current inside (a no-op on one GPU)."""
    if simulator():
        return _NO_GUARD
    if not _NGPUS:
        _NGPUS.append(len(_cuda.gpus))
    if _NGPUS[0] <= 1:
        return _NO_GUARD
    return _cuda.gpus[device]


def on_device_of(x: Any) -> Any:
    """A device guard for allocating beside array ``x``: its device is current inside
    (CuPy's own guard for a CuPy array, which allocates on CuPy's current device; a
    no-op where the device is unknown or there is one GPU). torch allocates on the
    tensor's device by itself."""
    dev = None if simulator() else _device_id(x)
    if dev is None:
        return _NO_GUARD
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy.cuda.Device(dev)
    return _on_device(dev)


def _refuse_if_capturing(what: str) -> None:
    """Raise if a CUDA graph is being captured on torch's current stream: a host to
    device copy cannot be captured, and the captured step would use stale tables."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and \
            torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"fastadagrad: {what}, which needs a host-to-device copy that "
                           "cannot be captured in a CUDA graph; run one eager step with "
                           "the same tensors and learning rate before capturing")


_TABLES: dict[tuple, Tables] = {}
K_SKIPPED = 2  # cuda_kernels.CTL_SKIPPED (kept here: cuda_kernels imports numba.cuda)


def _getters(x: Any) -> tuple[Any, ...]:
    """Cheap readers of what validation established about arrays of ``x``'s kind:
    data address, shape, contiguity or strides, dtype (~0.1 us each on a torch tensor,
    against ~5 us for a ``__cuda_array_interface__`` dict). Numba arrays never change
    address, shape or dtype in place, so their identity is enough (the cache keeps
    them alive, so an id is never reused meanwhile). The same tuple object for every
    array of one family (torch parameters and plain tensors alike), () for others."""
    if getattr(type(x), "__cuda_ndarray__", False):
        return _ID_GETTERS
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        global _TORCH_GETTERS
        if _TORCH_GETTERS is None:
            import torch

            # is_contiguous() rather than stride(): a bool, not a new tuple;
            # with the same address, shape and dtype it pins down the same memory
            _TORCH_GETTERS = (torch.Tensor.data_ptr, operator.attrgetter("shape"),
                              torch.Tensor.is_contiguous, operator.attrgetter("dtype"))
        return _TORCH_GETTERS
    if mod == "cupy":
        return _CUPY_GETTERS
    return ()  # anything else: validated in full at every step


_ID_GETTERS: tuple[Any, ...] = (id,)
_TORCH_GETTERS: tuple[Any, ...] | None = None
_CUPY_GETTERS = (operator.attrgetter("data.ptr"), operator.attrgetter("shape"),
                 operator.attrgetter("strides"), operator.attrgetter("dtype"))


class GpuCache:
    """What an optimizer keeps between GPU steps: its arrays' identities and what
    :func:`_getters` reads from each, as validated, and the device tables.

    Each step re-reads every param, state and grad with those getters (one map per
    getter over the whole model) and compares with the cached lists: params and
    states must be the same objects, unchanged; grads must be unchanged since the last
    step. Anything else goes through full validation (and, if the addresses moved,
    a table refresh). ``capturable=True`` keeps step and learning rate on the device
    (CUDA graphs).
    """

    def __init__(self, capturable: bool = False, skipped: int = 0) -> None:
        self.capturable = capturable
        #: capturable: the skipped steps counted so far (the device's count starts here)
        self.skipped = skipped
        self.objs: tuple[Any, ...] = ()
        self.getters: tuple[Any, ...] = ()
        self.seen: list[list[Any]] = []
        self.gobjs: tuple[Any, ...] = ()  # Numba grads: keeps their ids unique
        self.tables: Tables | None = None
        self.stream: Any = None  # the stream of the last step

    def counters(self) -> tuple[int, int] | None:
        """``(applied, skipped)`` steps as counted on the device (capturable mode), or
        None before the first step. Reads them back: waits for the device."""
        if self.tables is None or not self.capturable:
            return None
        # replays of a captured step run on whatever stream replays the graph: wait
        # for the whole device, not only the stream the step was queued on
        with _on_device(self.tables.device):
            if not simulator():
                _cuda.synchronize()
            return self.tables.counters(self.stream)

    def remember(self, params: Sequence[Any], states: Sequence[Any],
                 grads: Sequence[Any]) -> None:
        getters = _getters(params[0])
        reps: dict[type, Any] = {}  # one array of each type (torch: Parameter, Tensor)
        for seq in (params, states, grads):
            for x in seq:
                reps.setdefault(type(x), x)
        if not getters or any(_getters(x) is not getters for x in reps.values()):
            self.objs, self.getters = (), ()  # a mix of array kinds: validate each step
            return
        arrays = [*params, *states, *grads]
        self.objs = tuple(params) + tuple(states)
        # Numba arrays are recognised by identity: their grads are held so that an id
        # is not reused meanwhile. torch and CuPy grads are compared by address, shape,
        # layout and dtype, which hold for whatever array lies there now: not held (a
        # loop that drops its gradients, zero_grad(set_to_none=True), frees them)
        self.gobjs = tuple(grads) if getters is _ID_GETTERS else ()
        self.getters = getters
        self.seen = [list(map(g, arrays)) for g in getters]

    def holds(self, params: Sequence[Any], states: Sequence[Any],
              grads: Sequence[Any]) -> bool:
        """Every array is as validated (see the class docstring)."""
        objs = self.objs
        n = len(params)
        if not objs or len(objs) != 2 * n or len(states) != n or len(grads) != n:
            return False
        if not (all(map(operator.is_, params, objs)) and
                all(map(operator.is_, states, objs[n:]))):
            return False
        if self.getters is _ID_GETTERS:  # arrays that cannot change: the same objects
            return all(map(operator.is_, grads, self.gobjs))
        arrays = [*params, *states, *grads]
        for g, seen in zip(self.getters, self.seen):
            if list(map(g, arrays)) != seen:
                return False
        return True


# --- front door ------------------------------------------------------------------------


def update(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
           labels: Sequence[Any], hyper: H.Hyper, step: int, nonfinite: str,
           plan: Any = None, check_mix: Any = None) -> bool | None:
    """One fused step on device arrays, in place: one kernel launch per dtype.

    Called by :func:`fastadagrad._dispatch.update` once every input is known to be a
    CUDA array (``check_mix``, if given, is called before validating: it raises if
    host arrays are mixed in). Validates every array (dtype, shape, contiguity,
    writability, device, aliasing) before anything is written or launched; an
    optimizer's ``plan`` keeps the validated description (:class:`GpuCache`) and the
    device tables across steps, so a step whose arrays all match what was validated
    validates nothing again. A functional call (no ``plan``, one array of each) is
    remembered the same way, holding its arrays weakly (:class:`_Call`): a later call on
    the same live param and state, with a gradient that reads the same, reuses it.

    Launches run on the producer's stream (module docstring), on the device that owns
    the arrays, without synchronizing, except:

    * ``nonfinite="skip"``: a check kernel sets a device flag that the update kernel
      reads, so the decision needs no host round trip; returning the bool (was the step
      skipped?) reads 16 bytes back, which waits for the stream. In capturable mode
      nothing is read back: the function returns None and the device counts applied
      and skipped steps (:meth:`Tables.counters`).
    * ``nonfinite="raise"`` reads the flags back (waits for the stream) and raises
      FloatingPointError naming the first tensor with NaN/inf, nothing updated.

    Returns True (applied), False (skipped) or None (capturable: decided on the device).
    """
    n = len(params)
    if n == 0:
        return True
    gc = getattr(plan, "gpu", None) if plan is not None else None
    if gc is None and plan is not None and hasattr(plan, "gpu"):
        gc = plan.gpu = GpuCache()
    capturable = gc is not None and gc.capturable
    if capturable and nonfinite == "raise":
        raise ValueError("nonfinite='raise' reads the device's flag back at every step, "
                         "which a CUDA graph cannot capture; use 'skip' or 'ignore' with "
                         "capturable=True")
    if gc is not None:
        run = prepared(gc, params, grads, states, labels, hyper, step, nonfinite)
        if run is not None:
            return run()
    elif plan is None and n == 1:  # a functional call: as validated by an earlier one?
        call = _CALLS.get((id(params[0]), id(states[0])))
        if call is not None and call.holds(params[0], grads[0], states[0]):
            tables, stream = call.tables, _stream_ref(params[0], None)
            if tables.gptr != call.gptr:  # another call of this layout moved them
                tables.refresh_grads(call.gptr, stream)
            return _run(tables, stream, hyper, step, nonfinite, labels)
    if check_mix is not None:
        check_mix()
    require_gpu()
    tables, stream = _validate_and_plan(params, grads, states, labels, hyper, step, gc)
    if plan is None and n == 1:
        _remember_call(params[0], grads[0], states[0], tables)
    return _run(tables, stream, hyper, step, nonfinite, labels)


class _Call:
    """The arrays of a functional call that validated, held weakly (the cache keeps no
    array alive), with what :func:`_getters` read from them and their tables.

    A later call is as validated when its param and state are the same live objects,
    every getter reads the same from param, grad and state (Numba arrays, which never
    change in place: the grad is the same live object too), and the launch
    configuration that the tables were built with is still ``config``'s. That is the
    test :meth:`GpuCache.holds` makes for an optimizer's arrays.
    """

    __slots__ = ("refs", "getters", "seen", "tables", "gptr")

    def __init__(self, p: Any, g: Any, h: Any, getters: tuple, tables: Tables) -> None:
        self.getters = getters
        ident = getters is _ID_GETTERS
        # (weakref.ref raises TypeError for a type that cannot be referenced weakly)
        self.refs = (weakref.ref(p), weakref.ref(h), weakref.ref(g) if ident else None)
        self.seen = None if ident else [(f(p), f(g), f(h)) for f in getters]
        self.tables, self.gptr = tables, list(tables.gptr)

    def holds(self, p: Any, g: Any, h: Any) -> bool:
        refs, layout = self.refs, self.tables.layout
        if refs[0]() is not p or refs[1]() is not h or layout[1:5] != (
                config.GPU_CHUNK, config.THREADS_PER_BLOCK, config.BLOCKS_PER_SM,
                config.GPU_MAX_BLOCKS):
            return False
        if self.seen is None:
            return refs[2]() is g
        for f, seen in zip(self.getters, self.seen):
            if (f(p), f(g), f(h)) != seen:
                return False
        return True


#: functional calls that validated, by (id(param), id(state)); each entry checks that
#: those are still the same live objects before it is used
_CALLS: dict[tuple[int, int], _Call] = {}


def _remember_call(p: Any, g: Any, h: Any, tables: Tables) -> None:
    getters = _getters(p)
    if not getters or _getters(g) is not getters or _getters(h) is not getters:
        return  # a mix of array kinds (or another kind): validated at every call
    try:
        call = _Call(p, g, h, getters, tables)
    except TypeError:  # an array type without weak references: not cached
        return
    if len(_CALLS) >= 1024:
        _CALLS.clear()
    _CALLS[(id(p), id(h))] = call


def prepared(gc: GpuCache, params: Sequence[Any], grads: Sequence[Any],
             states: Sequence[Any], labels: Sequence[Any], hyper: H.Hyper, step: int,
             nonfinite: str) -> Callable[[], bool | None] | None:
    """The step :func:`update` would launch, as a function to call right away, if
    every array is as ``gc`` validated it (:meth:`GpuCache.holds`, checked now);
    None otherwise, with nothing validated, launched or raised: the caller then takes
    :func:`update` or another path. The function reads the producer's stream when
    called and returns what :func:`update` returns."""
    if gc.tables is None or (gc.capturable and nonfinite == "raise") or \
            not gc.holds(params, states, grads):
        return None
    tables = gc.tables

    def run() -> bool | None:
        stream = gc.stream = _stream_ref(params[0], None)
        return _run(tables, stream, hyper, step, nonfinite, labels)

    return run


def validate(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
             labels: Sequence[Any], hyper: H.Hyper, step: int) -> None:
    """Everything :func:`update` checks, with nothing launched or cached: raises naming
    the offending array (e.g. for a step that another part of the model skips)."""
    require_gpu()
    _check_all(params, grads, states, labels, hyper, step)


def _check_all(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
               labels: Sequence[Any], hyper: H.Hyper, step: int
               ) -> tuple[list[tuple], dict[int, str]]:
    """Validate every array (the docstring of :func:`update`): (per tensor (param, grad,
    state descriptions, dtype), the devices seen with an array's name)."""
    from ._arrays import check_no_overlap

    n = len(params)
    if not (len(grads) == len(states) == n):
        raise ValueError("params, grads and states must have the same length")
    triples = []
    devs: dict[int, str] = {}
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
            note_device(devs, x, label)
        triples.append((dp, dg, dh, dt))
    nbytes = np.fromiter((t[0].size * t[3].itemsize for t in triples), np.int64, n)
    addr = [np.fromiter((t[k].ptr for t in triples), np.int64, n) for k in range(3)]
    check_no_overlap(addr[0], addr[1], addr[2], nbytes, labels)
    for _, _, _, dt in triples:  # overflow of a coefficient in the dtype: raise now
        coefficients(hyper, dt, step)
    return triples, devs


def note_device(devs: dict[int, str], x: Any, label: str) -> None:
    """Record the CUDA device of array ``x`` (torch and CuPy arrays carry one) in
    ``devs`` (device -> the first array's name); raise ValueError naming two arrays on
    different devices (before anything is launched)."""
    dev = _device_id(x)
    if dev is not None:
        devs.setdefault(dev, label)
        if len(devs) > 1:
            (d0, l0), (d1, l1) = list(devs.items())[:2]
            raise ValueError(f"{l0} is on CUDA device {d0} but {l1} is on CUDA device "
                             f"{d1}; pass arrays of one device (nothing was updated)")


def device_guard(devs: dict[int, str]) -> Any:
    """The device guard for arrays whose devices :func:`note_device` recorded (the
    current device where none carries one)."""
    return _on_device(next(iter(devs)) if devs else _current_device())


def _validate_and_plan(params: Sequence[Any], grads: Sequence[Any], states: Sequence[Any],
                       labels: Sequence[Any], hyper: H.Hyper, step: int,
                       gc: GpuCache | None) -> tuple[Tables, Any]:
    triples, devs = _check_all(params, grads, states, labels, hyper, step)
    device = next(iter(devs)) if devs else _current_device()
    stream = _stream_ref(params[0], triples[0][0])
    pptr, gptr, hptr = ([t[k].ptr for t in triples] for k in range(3))
    sizes = [t[0].size for t in triples]
    dtypes = [t[3] for t in triples]
    layout = (device, config.GPU_CHUNK, config.THREADS_PER_BLOCK, config.BLOCKS_PER_SM,
              config.GPU_MAX_BLOCKS,
              tuple(pptr), tuple(hptr), tuple(sizes), tuple(dtypes))
    capturable = gc is not None and gc.capturable
    tables = gc.tables if gc is not None else None
    if tables is None or tables.layout != layout:
        if capturable:  # its step counter and lr are this optimizer's own
            skipped = gc.skipped  # (the host's count when the cache was made)
            if tables is not None:  # a new layout: carry the device's counts over
                done, skipped = tables.counters(stream)
                step = done + 1
            tables = Tables(layout, pptr, gptr, hptr, sizes, dtypes, device, stream, True,
                            step, hyper)
            if skipped:
                tables.ctl_host[K_SKIPPED] = skipped
                with _on_device(device):
                    _copy_in(tables.ctl_dev, tables.ctl_host, stream)
        elif gc is not None:  # an optimizer's own: its cached fast path (prepared)
            # launches with the gradient addresses it last wrote there, which a shared
            # table would let another caller of the same layout change (then free)
            tables = Tables(layout, pptr, gptr, hptr, sizes, dtypes, device, stream,
                            False, step, hyper)
        else:  # functional calls: shared by layout, the gradients refreshed below
            tables = _TABLES.get(layout)
            if tables is None:
                tables = Tables(layout, pptr, gptr, hptr, sizes, dtypes, device, stream,
                                False, step, hyper)
                if len(_TABLES) >= 1024:  # (a model stepped one tensor per call)
                    _TABLES.clear()
                _TABLES[layout] = tables
    if tables.gptr != gptr:
        tables.refresh_grads(gptr, stream)
    if gc is not None:
        gc.stream = stream
        gc.remember(params, states, grads)
        gc.tables = tables
    return tables, stream


def _plan_launches(tables: Tables, hyper: H.Hyper, step: int, nonfinite: str
                   ) -> tuple[list[tuple], list[tuple], tuple | None]:
    """The step's launches as ``(kernel, blocks, threads, packed arguments)``: the
    checks, the updates (one per dtype group) and the end-of-step kernel (or None)."""
    from . import cuda_kernels as K
    from . import cuda_launch as L

    dev, tpb, chunk, ctl = tables.device, tables.tpb, tables.chunk, tables.ctl
    mode = (K.CHECKED if nonfinite == "skip" else 0)
    if tables.capturable:
        mode |= K.CAPTURABLE | (K.LR_AFTER if hyper.rule.lr_placement == "after" else 0) \
            | (K.FMA_LR_DECAY if hyper.rule.fma_lr_decay else 0)
    checks, updates = [], []
    for g in tables.groups:
        coefs = coefficients(hyper, g.dtype, step)
        if nonfinite != "ignore":
            k = L.kernel("check", g.dtype, coefs[7], dev)
            checks.append((k, g.blocks, tpb, k.prepare(
                (g.addr, g.ntens, g.nchunks, chunk, coefs[6], ctl))))
        blocks, gmode = g.blocks, mode
        if g.ntens == 1 and config.GPU_GRID_STRIDE:  # one tensor: grid-stride variant
            gmode |= K.GRID_STRIDE
            blocks = config.GPU_MAX_BLOCKS or max(1, min(
                g.blocks, _sm_count(dev) * config.GRID_STRIDE_BLOCKS_PER_SM))
        elif config.GPU_UNROLL_CHUNKS:
            gmode |= K.UNROLL_CHUNKS
        k = L.kernel("update", g.dtype, coefs[7] | gmode, dev)
        updates.append((k, blocks, tpb, k.prepare(
            (g.addr, g.ntens, g.nchunks, chunk, *coefs[:7], ctl))))
    fin = L.kernel("finish", np.float64, 0, dev)
    finish = (fin, 1, 1, fin.prepare((ctl,)))
    return checks, updates, finish


def _run(tables: Tables, stream: Any, hyper: H.Hyper, step: int, nonfinite: str,
         labels: Sequence[Any]) -> bool | None:
    """Launch the step's kernels: [check per group], update per group, [finish].

    The launches (kernels, grids, packed arguments) are kept in ``tables`` for the
    next step while the hyperparameters object, the step's learning rate and the
    non-finite mode stay the same: a training loop packs its arguments once.
    """
    from . import cuda_kernels as K
    from .cuda_launch import run_kernel

    capturable = tables.capturable
    # (the variants' switches too: packed launches name their kernel and grid)
    key = (step if hyper.lr_decay and not capturable else 0, nonfinite,
           config.GPU_GRID_STRIDE, config.GRID_STRIDE_BLOCKS_PER_SM, config.GPU_UNROLL_CHUNKS)
    last = tables.launches
    with _on_device(tables.device):  # (loading a kernel makes its device current too)
        if last is None or last[0] is not hyper or last[1] != key:
            # coefficients() raises here, before anything is written, if one overflows
            last = tables.launches = (hyper, key, *_plan_launches(tables, hyper, step,
                                                                  nonfinite))
        if capturable:
            tables.set_lr(hyper, stream)
        _, _, checks, updates, finish = last
        for k, blocks, tpb, args in checks:
            run_kernel(k, stream, blocks, tpb, args)
        if nonfinite == "raise":
            flags = tables.flags(stream)  # waits for the stream
            if flags[K.CTL_FOUND]:
                run_kernel(*finish[:1], stream, *finish[1:])  # clear the flags
                tables.skipped_seen += 1  # which the device counts as a skipped step
                k = int(np.flatnonzero(flags[K.CTL_HEAD:])[0])
                raise FloatingPointError(f"{labels[k].grad} contains NaN or inf; "
                                         "nothing was updated")
        for k, blocks, tpb, args in updates:
            run_kernel(k, stream, blocks, tpb, args)
        if capturable or nonfinite == "skip":
            run_kernel(*finish[:1], stream, *finish[1:])
    if capturable:
        return None
    if nonfinite == "skip":
        before = tables.skipped_seen
        _, skipped = tables.counters(stream)  # waits for the stream
        tables.skipped_seen = skipped
        return skipped == before
    return True


def _current_device() -> int:
    if simulator():
        return 0
    return int(_cuda.get_current_device().id)


_REFS: dict[int, Any] = {}


def _stream_ref(x: Any, d: _Dev | None) -> Any:
    """The producer's stream for ``x`` (module docstring), as a launcher StreamRef."""
    from .cuda_launch import StreamRef

    if simulator():
        ref = _REFS.get(0)
        if ref is None:
            ref = _REFS[0] = StreamRef(0, _cuda.default_stream())
        return ref
    if d is None and not _is_torch(x) and not getattr(type(x), "__cuda_ndarray__", False):
        d = _describe(x, "array")
    s = _stream_for(x, d)
    h = int(s)
    ref = _REFS.get(h)
    if ref is None or ref.numba is not s:
        if len(_REFS) > 64:
            _REFS.clear()
        ref = _REFS[h] = StreamRef(h, s)
    return ref


# --- allocation helpers used by FlatBuffer and AdaGrad -----------------------------------


def to_device(host: np.ndarray) -> Any:
    """A Numba device array holding a copy of ``host``."""
    # order="C", not np.ascontiguousarray, which makes a 0-d array (a scalar
    # parameter's state) 1-d
    return require_gpu().to_device(np.asarray(host, order="C"))


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
    with on_device_of(x):  # (on x's device, not whichever is current)
        if type(x).__module__.split(".")[0] == "cupy":
            import cupy

            return cupy.full(x.shape, value, x.dtype)
        d = _describe(x, "array")
        dt = _TYPESTRS.get(d.typestr)
        if dt is None:  # let validation name the offending array later
            dt = np.dtype(np.float32)
        return full(d.size, dt, value).reshape(d.shape)


def to_host(a: Any) -> np.ndarray:
    """A NumPy copy of device array ``a`` (Numba, torch or CuPy)."""
    if _is_torch(a):
        return a.detach().cpu().numpy()
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return a.copy_to_host()


def to_device_like(host: np.ndarray, proto: Any) -> Any:
    """A device copy of ``host`` in ``proto``'s library (torch, CuPy, else Numba) and on
    its device, so that a model's state stays one kind of array."""
    host = np.asarray(host, order="C")  # (0-d stays 0-d: see to_device)
    if _is_torch(proto):
        import torch

        return torch.from_numpy(host.copy()).to(proto.device)
    if type(proto).__module__.split(".")[0] == "cupy":
        import cupy

        with proto.device:
            return cupy.asarray(host)
    return to_device(host)


def copy_into(dev: Any, host: np.ndarray) -> None:
    """Overwrite device array ``dev`` with ``host`` (same shape and dtype)."""
    host = np.asarray(host, order="C")  # (0-d stays 0-d: see to_device)
    if host.size == 0:  # nothing to copy (the simulator refuses zero-size copies)
        return
    if _is_torch(dev):
        import torch

        dev.detach().copy_(torch.from_numpy(host.copy()))
    elif type(dev).__module__.split(".")[0] == "cupy":
        dev.set(host)
    else:
        dev.copy_to_device(host)
