"""Loading and launching the kernels of :mod:`fastadagrad.cuda_kernels`, on public APIs.

Two launch paths, chosen once per process before anything is launched:

* ``"cuda.core"`` (real GPUs, the default when ``cuda.core`` imports): each kernel is
  compiled by numba-cuda's public ``numba.cuda.compile`` to PTX for the device's
  compute capability (:data:`fastadagrad.cuda_kernels.COMPILE_OPTIONS`), loaded with
  ``cuda.core.ObjectCode.from_ptx`` and launched with ``cuda.core.launch`` with a
  cached ``LaunchConfig`` and a cached ``cuda.core.Stream`` per stream handle. At load
  the kernel's argument count and sizes (``Kernel.num_arguments``/``arguments_info``)
  are compared with the layout the kernels are written for; a difference raises.
* ``"dispatcher"``: the same kernel sources through ``numba.cuda.jit``, compiled at
  the first launch for the argument types :meth:`DispatcherKernel.prepare` passes (those
  of the kernel's signature), launched by Numba's dispatcher (~50-85 us of host time
  per launch on the H100 machine, against a few us). Used under the CUDA simulator,
  when ``cuda.core`` cannot be imported, or when ``FASTADAGRAD_CUDA_LAUNCHER=dispatcher``
  asks for it.

No fallback happens after a launch: an error raised by a launch propagates (the update
is not idempotent, ``h += g*g``, so it is never retried on another path).
``FASTADAGRAD_CUDA_LAUNCHER=core`` makes a missing ``cuda.core`` an error instead of a
fallback. :func:`launch_path` says which path runs and why.
"""

from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any

import numpy as np

from . import cuda_kernels as K

_PATH: tuple[str, str] | None = None  # (path, why)


def launch_path() -> tuple[str, str]:
    """``(path, reason)``: ``"cuda.core"``, ``"dispatcher"`` or ``"simulator"``."""
    global _PATH
    if _PATH is None:
        want = os.environ.get("FASTADAGRAD_CUDA_LAUNCHER", "auto").strip().lower()
        if want not in ("auto", "core", "dispatcher"):
            raise ValueError(f"FASTADAGRAD_CUDA_LAUNCHER={want!r}: use auto, core or "
                             "dispatcher")
        if K.simulator():
            _PATH = ("simulator", "the CUDA simulator runs kernels through Numba's "
                                  "dispatcher")
        elif want == "dispatcher":
            _PATH = ("dispatcher", "FASTADAGRAD_CUDA_LAUNCHER=dispatcher")
        else:
            try:
                import cuda.core  # noqa: F401
            except Exception as exc:
                if want == "core":
                    raise RuntimeError(f"FASTADAGRAD_CUDA_LAUNCHER=core but cuda.core "
                                       f"cannot be imported: {exc}") from exc
                _PATH = ("dispatcher", f"cuda.core cannot be imported ({exc})")
            else:
                _PATH = ("cuda.core", "numba.cuda.compile -> cuda.core ObjectCode/launch")
    return _PATH


def _reset_path_for_tests() -> None:
    global _PATH
    _PATH = None
    _KERNELS.clear()
    _CONFIGS.clear()
    _CORE_STREAMS.clear()


_BOX = {4: ctypes.c_float, 8: ctypes.c_double}


class CoreKernel:
    """One kernel loaded through ``cuda.core`` for one device."""

    def __init__(self, kind: str, dtype: Any, flags: int, device: int) -> None:
        from cuda.core import Device

        dev = Device(device)
        # cuda.core wants a current context to load code; the device's primary context
        # is the one Numba and torch use too
        dev.set_current()
        cc = dev.compute_capability
        arch = (int(cc[0]), int(cc[1]))
        ptx, name = K.compile_ptx(kind, dtype, flags, arch)
        self.kernel = load(ptx, arch).get_kernel(name)
        want = K.arg_sizes(kind, dtype)
        got_n = self.kernel.num_arguments
        got = [int(a.size if hasattr(a, "size") else a[1])  # ParamInfo(offset, size)
               for a in self.kernel.arguments_info]
        if got_n != len(want) or got != want:
            raise RuntimeError(
                f"fastadagrad: the loaded {kind} kernel takes {got_n} arguments of sizes "
                f"{got}, but the launcher packs {len(want)} of sizes {want}; refusing to "
                "launch (set FASTADAGRAD_CUDA_LAUNCHER=dispatcher to use Numba's "
                "dispatcher)")
        from cuda.core import launch

        self._launch = launch
        # coefficients boxed as the C type of the size checked above
        self.kind, self.real = kind, _BOX[np.dtype(dtype).itemsize]
        self.flags = flags  # what it was compiled for (cuda_kernels' bits)

    def prepare(self, args: tuple) -> list[Any]:
        """Box each argument as the C type of its slot (uint64 addresses, int64 counts,
        float32/float64 coefficients)."""
        if self.kind == "finish":
            return [ctypes.c_uint64(args[0])]
        real = self.real
        n = len(args)
        out = [ctypes.c_uint64(args[0]), ctypes.c_int64(args[1]), ctypes.c_int64(args[2]),
               ctypes.c_int64(args[3])]
        out += [real(a) for a in args[4:n - 1]]
        out.append(ctypes.c_uint64(args[n - 1]))
        return out

    def launch_prepared(self, stream: Any, blocks: int, tpb: int, packed: list) -> None:
        self._launch(stream.core, _config(blocks, tpb), self.kernel, *packed)

    def launch(self, stream: Any, blocks: int, tpb: int, args: tuple) -> None:
        self.launch_prepared(stream, blocks, tpb, self.prepare(args))


def load(ptx: str, arch: tuple[int, int]) -> Any:
    """A ``cuda.core.ObjectCode`` for ``ptx``: linked to a cubin for ``sm_<arch>`` by
    ``cuda.core.Program`` (nvJitLink, as numba-cuda links its own kernels), so that a
    driver older than the NVVM that wrote the PTX still loads it (NVVM 13.5 writes PTX
    ISA 9.5; an R580 driver JIT-compiles PTX up to ISA 9.0). Without nvJitLink the PTX
    goes to the driver's JIT."""
    from cuda.core import ObjectCode, Program, ProgramOptions

    global LOADED_AS
    try:
        prog = Program(ptx, code_type="ptx",
                       options=ProgramOptions(arch=f"sm_{arch[0]}{arch[1]}"))
        obj = prog.compile("cubin")
        LOADED_AS = "cubin linked by cuda.core.Program"
        return obj
    except Exception as exc:  # nothing launched yet: the driver's JIT may still load it
        LOADED_AS = f"PTX JIT-compiled by the driver (Program could not link: {exc})"
        return ObjectCode.from_ptx(ptx)


#: How the last kernel was loaded (reported by ``python -m fastadagrad validate``).
LOADED_AS = "nothing loaded yet"


class DispatcherKernel:
    """The same kernel through ``numba.cuda.jit`` (simulator, or no ``cuda.core``)."""

    def __init__(self, kind: str, dtype: Any, flags: int) -> None:
        from numba import cuda

        # compiled at the first launch for the NumPy scalar types prepare() passes,
        # which are those of K.signature (uint64, int64, the dtype)
        self.kernel = cuda.jit(K.source(kind, dtype, flags))
        self.kind, self.flags = kind, flags
        self.real = np.float32 if np.dtype(dtype) == np.float32 else np.float64

    def prepare(self, args: tuple) -> tuple:
        """The arguments as NumPy scalars of the signature's types."""
        if self.kind == "finish":
            return (np.uint64(args[0]),)
        n = len(args)
        return (np.uint64(args[0]), np.int64(args[1]), np.int64(args[2]),
                np.int64(args[3]), *(self.real(x) for x in args[4:n - 1]),
                np.uint64(args[n - 1]))

    def launch_prepared(self, stream: Any, blocks: int, tpb: int, packed: tuple) -> None:
        if blocks >= 128:
            self.kernel[blocks, tpb, stream.numba](*packed)
            return
        # Numba warns (NumbaPerformanceWarning) at every launch of fewer than 128 blocks:
        # the one-block end-of-step kernel and small models do so by design. Silenced
        # for these launches only (a fallback path: ~50-85 us per launch, so the ~3 us
        # of catch_warnings do not matter), not for the user's own kernels.
        with warnings.catch_warnings():
            for category in _performance_warnings():
                warnings.simplefilter("ignore", category)
            self.kernel[blocks, tpb, stream.numba](*packed)


def _performance_warnings() -> list[type[Warning]]:
    """Numba's performance-warning classes: numba-cuda (which warns about small grids)
    has its own, not a subclass of numba's."""
    from numba.core import errors

    found = [errors.NumbaPerformanceWarning]
    try:
        from numba.cuda.core import errors as cuda_errors
    except ImportError:  # an older numba-cuda: numba's class is the one it uses
        return found
    return [*found, cuda_errors.NumbaPerformanceWarning]


def run_kernel(kernel: Any, stream: Any, blocks: int, tpb: int, packed: Any) -> None:
    """Launch a loaded kernel with arguments from its ``prepare``: the one place every
    launch of the front door goes through (tests count launches here)."""
    kernel.launch_prepared(stream, blocks, tpb, packed)


_KERNELS: dict[tuple[Any, ...], Any] = {}


def kernel(kind: str, dtype: Any, flags: int, device: int) -> Any:
    """The loaded kernel ``kind`` ("update", "check", "finish") for ``dtype``, ``flags``
    (rule and mode bits) and device ordinal ``device``; built once per process."""
    key = (kind, np.dtype(dtype), flags, device)
    k = _KERNELS.get(key)
    if k is None:
        path = launch_path()[0]
        k = CoreKernel(kind, dtype, flags, device) if path == "cuda.core" else \
            DispatcherKernel(kind, dtype, flags)
        _KERNELS[key] = k
    return k


_CONFIGS: dict[tuple[int, int], Any] = {}


def _config(blocks: int, tpb: int) -> Any:
    c = _CONFIGS.get((blocks, tpb))
    if c is None:
        from cuda.core import LaunchConfig

        if len(_CONFIGS) > 256:
            _CONFIGS.clear()
        c = _CONFIGS[(blocks, tpb)] = LaunchConfig(grid=blocks, block=tpb)
    return c


_CORE_STREAMS: dict[int, Any] = {}


class StreamRef:
    """A stream known by its raw handle, as Numba and (lazily) ``cuda.core`` objects.

    Handles 0 and 1 are the legacy default stream, 2 the per-thread default stream, as
    in the CUDA driver API and the ``__cuda_array_interface__`` protocol.
    """

    __slots__ = ("handle", "numba", "_core")

    def __init__(self, handle: int, numba_stream: Any) -> None:
        self.handle, self.numba, self._core = handle, numba_stream, None

    @property
    def core(self) -> Any:
        s = self._core
        if s is None:
            s = _CORE_STREAMS.get(self.handle)
            if s is None:
                import cuda.core as cc

                h = self.handle
                s = cc.LEGACY_DEFAULT_STREAM if h in (0, 1) else \
                    cc.PER_THREAD_DEFAULT_STREAM if h == 2 else cc.Stream.from_handle(h)
                if len(_CORE_STREAMS) > 64:
                    _CORE_STREAMS.clear()
                _CORE_STREAMS[h] = s
            self._core = s
        return s
