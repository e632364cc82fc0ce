"""The CUDA kernels of the fused AdaGrad update, written against raw device addresses.

Every kernel takes only scalars: 64-bit addresses, 64-bit counts and the update's
coefficients. The arrays they read are described by two tables that live in device
memory and whose layout this module owns (``apex.multi_tensor_apply`` / torch
``_foreach`` style):

* the **tensor table**, ``int64[ROW * ntens]``: per tensor ``(p, g, h, n, k)``, the
  data addresses of the parameter, gradient and accumulator, the element count, and
  ``k``, the tensor's index in the whole model (for the per-tensor non-finite flags);
* the **chunk table**, ``int64[2 * nchunks]`` right after it: per chunk
  ``(tensor, start)``; a chunk covers ``start .. min(start + chunk, n)``.

Block ``b`` walks chunks ``b, b + gridDim.x, ...``; its threads walk a chunk with a
stride of ``blockDim.x``. Both loops wrap (tested with a forced small grid).

The **control block** ``ctl`` (``int64[CTL_HEAD + ntot]``, one per model and device)
holds what must live in device memory for CUDA graphs and for a non-finite check with
no host round trip: the "found a NaN/inf" flag, the number of applied and skipped
steps, ``lr`` and ``lr_decay`` (as float64 bits), and one flag per tensor.

Rounding (the reason GPU and CPU agree bit for bit): every multiply and add goes
through libdevice's ``fmul_rn``/``fadd_rn`` (``dmul_rn``/``dadd_rn``), which NVVM
cannot contract into an FMA; an FMA appears only where the rule asks for one; ``/`` and
``sqrt`` are IEEE ``div.rn``/``sqrt.rn``; no fastmath, no flush-to-zero. The same per
element operations in the same order as :func:`fastadagrad.cpu.adagrad_span`, written
once in ``cuda_formula.py`` for this kernel, the row kernels and the half-precision one.

Under Numba's CUDA simulator the address casts become NumPy views over host memory
(simulated device memory is host memory) and libdevice becomes plain operators, so the
same kernel source runs there; the simulator checks the logic, not GPU rounding.

Nothing here needs a GPU at import: kernels are built on first use.
"""

from __future__ import annotations

import ctypes
import math
import re
from functools import cache
from typing import Any

import numpy as np

from . import _hyper as H
from .cuda_formula import element, ops, parts, simulator

try:  # the kernels name ``cuda`` as a module global: the simulator swaps it at launch
    from numba import cuda
except Exception:  # pragma: no cover - numba-cuda is the optional [cuda] extra
    cuda = None

# --- table and control-block layout (shared with the host side, cuda.py) -------------

ROW = 5  # tensor table row: p, g, h, n, k
CTL_FOUND, CTL_STEP, CTL_SKIPPED, CTL_LR, CTL_LR_DECAY, CTL_NTOT = 0, 1, 2, 3, 4, 5
CTL_HEAD = 8  # then one int64 flag per tensor of the model

# Mode bits above the rule's flags (H.MAXIMIZE ... H.GRAD_SCALE use bits 0-6).
CHECKED = 1 << 16      # the update kernel skips when ctl[CTL_FOUND] is set
CAPTURABLE = 1 << 17   # step and lr are read from ctl (CUDA graphs)
LR_AFTER = 1 << 18     # capturable: the rule multiplies by lr after the division
FMA_LR_DECAY = 1 << 19  # capturable: lr_decay's denominator rounded once (fma)
GRID_STRIDE = 1 << 20  # one tensor: grid-stride, UNROLL elements per thread per pass
UNROLL_CHUNKS = 1 << 21  # the chunked kernel, UNROLL elements per thread per pass

#: Elements a thread loads before it stores anything, per pass of a GRID_STRIDE or
#: UNROLL_CHUNKS kernel (more loads in flight per thread; the same per-element
#: operations).
UNROLL = 4


# --- address casts -------------------------------------------------------------------

_CTYPES = {np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double,
           np.dtype(np.int64): ctypes.c_int64}


def _sim_view(dtype: np.dtype) -> Any:
    ct = _CTYPES[np.dtype(dtype)]

    def view(addr: Any, n: Any) -> np.ndarray:
        """A NumPy view of ``n`` elements at host address ``addr`` (the simulator)."""
        return np.ctypeslib.as_array((ct * max(int(n), 1)).from_address(int(addr)))

    return view


@cache
def _gpu_view(dtype: np.dtype) -> Any:
    """An intrinsic: ``view(addr, n)`` is ``addr`` as a pointer to ``dtype`` (global
    memory). ``n`` is for the simulator's view only; the GPU reads no bounds."""
    from llvmlite import ir
    from numba.cuda import types
    from numba.cuda.extending import intrinsic

    nbt = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64,
           np.dtype(np.int64): types.int64}[np.dtype(dtype)]

    @intrinsic
    def view(typingctx, addr, n):  # type: ignore[no-untyped-def]
        if not isinstance(addr, types.Integer):
            return None
        ptrty = types.CPointer(nbt)

        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            elem = context.get_value_type(nbt)
            # via addrspace(1) so that NVVM knows these are global loads (ld.global)
            glob = builder.inttoptr(args[0], ir.PointerType(elem, addrspace=1))
            return builder.addrspacecast(glob, ir.PointerType(elem))

        return ptrty(addr, n), codegen

    return view


def _views(dtype: np.dtype) -> tuple[Any, Any, Any]:
    """``(view of dtype, view of int64, view of float64)``."""
    mk = _sim_view if simulator() else _gpu_view
    return mk(np.dtype(dtype)), mk(np.dtype(np.int64)), mk(np.dtype(np.float64))


# --- kernel sources ------------------------------------------------------------------

def update_source(dtype: Any, flags: int) -> Any:
    """The Python source of the update kernel for ``dtype`` and ``flags`` (rule bits of
    :meth:`Hyper.coefficients` plus the mode bits above), not yet compiled.

    Arguments: ``(tab, ntens, nchunks, chunk, lr_num, lr_after, eps_in, eps_out, wd,
    lr_wd, grad_scale, ctl)``. Each flag is a compile-time constant: a kernel contains
    only the operations of its rule.

    With :data:`GRID_STRIDE` (a table of one tensor; the chunk table is not read), the
    threads of the whole grid walk the tensor with a stride of the grid's size; with
    :data:`UNROLL_CHUNKS`, each block's threads walk each chunk as without it. Either
    way a thread loads the gradient, parameter and accumulator of :data:`UNROLL`
    elements one stride apart, stores their accumulators, then computes and stores
    their parameters (the formula's three parts, :func:`fastadagrad.cuda_formula.parts`),
    and takes what is left one by one; the thread-local arrays stay in registers.
    Storing the accumulators first keeps every load of a pass ahead of the divisions
    (NVVM moves loads down to their uses when all stores come last). A stand-alone
    4-per-pass grid-stride kernel written this way reached 92.5% of a copy's bandwidth
    at 2^26 float32 on an H200, where the chunked kernel reached 67.8% in the same
    run (``bench/results/gpu-h200/check-2/sweep.txt``).
    """
    dt = np.dtype(dtype)
    fview, iview, dview = _views(dt)
    gradient, update = element(dt, flags)
    accumulate, quotient, step = parts(dt, flags)
    dmul, dadd, ddiv, _, dfma = ops(np.dtype(np.float64))
    to_t = np.float32 if dt == np.float32 else np.float64
    checked = (flags & CHECKED) != 0
    capturable = (flags & CAPTURABLE) != 0
    after = (flags & LR_AFTER) != 0
    fma_decay = (flags & FMA_LR_DECAY) != 0
    grid_stride = (flags & GRID_STRIDE) != 0
    unroll_chunks = (flags & UNROLL_CHUNKS) != 0
    nb_t = _numba_type(dt)

    def adagrad(tab, ntens, nchunks, chunk, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                grad_scale, ctl):
        """:func:`fastadagrad.cpu.adagrad_span` over every chunk of the table: each
        element through :func:`fastadagrad.cuda_formula.element`."""
        if checked or capturable:
            C = iview(ctl, CTL_HEAD)
            if checked and C[CTL_FOUND] != 0:
                return  # a gradient holds NaN/inf: the whole step is skipped
            if capturable:
                # the step about to be applied, and torch's lr_decay rule in double,
                # exactly as Hyper.clr computes it on the host
                D = dview(ctl, CTL_HEAD)
                k = np.float64(C[CTL_STEP])  # = step - 1
                if fma_decay:
                    den = dfma(k, D[CTL_LR_DECAY], np.float64(1.0))
                else:
                    den = dadd(np.float64(1.0), dmul(k, D[CTL_LR_DECAY]))
                clr = to_t(ddiv(D[CTL_LR], den))
                if after:
                    lr_after = clr
                else:
                    lr_num = clr
                lr_wd = clr
        zero = eps_in - eps_in
        T = iview(tab, ROW * ntens + 2 * nchunks)
        if grid_stride:
            tpb = np.int64(cuda.blockDim.x)
            n = T[3]
            p = fview(T[0], n)
            g = fview(T[1], n)
            h = fview(T[2], n)
            i = np.int64(cuda.blockIdx.x) * tpb + np.int64(cuda.threadIdx.x)
            s = np.int64(cuda.gridDim.x) * tpb
            unrolled_span(p, g, h, i, s, n, zero, lr_num, lr_after, eps_in, eps_out, wd,
                          lr_wd, grad_scale)
            return
        base = ROW * ntens
        c = np.int64(cuda.blockIdx.x)
        step_c = np.int64(cuda.gridDim.x)
        tpb = np.int64(cuda.blockDim.x)
        while c < nchunks:
            t = T[base + 2 * c]
            s = T[base + 2 * c + 1]
            n = T[ROW * t + 3]
            e = min(s + chunk, n)
            p = fview(T[ROW * t], n)
            g = fview(T[ROW * t + 1], n)
            h = fview(T[ROW * t + 2], n)
            i = s + np.int64(cuda.threadIdx.x)
            chunk_span(p, g, h, i, tpb, e, zero, lr_num, lr_after, eps_in, eps_out, wd,
                       lr_wd, grad_scale)
            c += step_c

    def make_span(unrolled: bool) -> Any:
        @cuda.jit(device=True, inline="always")
        def span(p, g, h, i, s, e, zero, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                 grad_scale):
            """Elements ``i, i + s, ...`` below ``e``: if ``unrolled``, :data:`UNROLL` per
            pass while a whole pass fits, then one by one."""
            if unrolled:
                hv = cuda.local.array(UNROLL, nb_t)
                gv = cuda.local.array(UNROLL, nb_t)
                pv = cuda.local.array(UNROLL, nb_t)
                while i + (UNROLL - 1) * s < e:
                    for u in range(UNROLL):
                        gv[u] = gradient(g[i + u * s], grad_scale)
                        pv[u] = p[i + u * s]
                        hv[u] = h[i + u * s]
                    for u in range(UNROLL):
                        gv[u], pv[u], hv[u] = accumulate(gv[u], pv[u], hv, u, wd, lr_wd)
                    # the accumulators' stores first: every load of the pass is then
                    # issued before them (the arrays may alias, as far as NVVM knows)
                    for u in range(UNROLL):
                        h[i + u * s] = hv[u]
                    for u in range(UNROLL):
                        p[i + u * s] = step(pv[u], quotient(gv[u], hv[u], zero, lr_num,
                                                            eps_in, eps_out), lr_after)
                    i += UNROLL * s
            while i < e:
                p[i] = update(gradient(g[i], grad_scale), p[i], h, i, zero, lr_num,
                              lr_after, eps_in, eps_out, wd, lr_wd)
                i += s

        return span

    unrolled_span, chunk_span = make_span(True), make_span(unroll_chunks)
    return adagrad


def _numba_type(dt: np.dtype) -> Any:
    """The Numba type of ``dt`` (for thread-local arrays); None without numba-cuda."""
    if cuda is None:  # pragma: no cover - numba-cuda is the optional [cuda] extra
        return None
    from numba.cuda import types

    return types.float32 if dt == np.float32 else types.float64


def check_source(dtype: Any, flags: int) -> Any:
    """The non-finite check kernel: ``(tab, ntens, nchunks, chunk, grad_scale, ctl)``.

    Sets ``ctl[CTL_FOUND]`` and tensor ``k``'s flag ``ctl[CTL_HEAD + k]`` to 1 if any
    of its gradients (divided by ``grad_scale`` when GRAD_SCALE is set, as the update
    would) is NaN or inf. Read-only on the gradients; every writer writes 1, so the
    race between writers is benign.
    """
    dt = np.dtype(dtype)
    fview, iview, _ = _views(dt)
    div = ops(dt)[2]
    scale = (flags & H.GRAD_SCALE) != 0

    def nonfinite(tab, ntens, nchunks, chunk, grad_scale, ctl):
        T = iview(tab, ROW * ntens + 2 * nchunks)
        C = iview(ctl, CTL_HEAD)
        C = iview(ctl, CTL_HEAD + C[CTL_NTOT])
        base = ROW * ntens
        c = np.int64(cuda.blockIdx.x)
        while c < nchunks:
            t = T[base + 2 * c]
            s = T[base + 2 * c + 1]
            n = T[ROW * t + 3]
            e = min(s + chunk, n)
            g = fview(T[ROW * t + 1], n)
            bad = False
            i = s + np.int64(cuda.threadIdx.x)
            while i < e:
                x = g[i]
                if scale:
                    x = div(x, grad_scale)
                if math.isinf(x) or math.isnan(x):
                    bad = True
                i += np.int64(cuda.blockDim.x)
            if bad:
                C[CTL_HEAD + T[ROW * t + 4]] = 1
                C[CTL_FOUND] = 1
            c += np.int64(cuda.gridDim.x)

    return nonfinite


def finish_source() -> Any:
    """The end-of-step kernel (one thread): count the step as applied or skipped,
    clear the found flag and the per-tensor flags for the next step."""
    _, iview, _ = _views(np.dtype(np.int64))

    def finish(ctl):
        if cuda.grid(1) == 0:
            C = iview(ctl, CTL_HEAD)
            ntot = C[CTL_NTOT]
            C = iview(ctl, CTL_HEAD + ntot)
            if C[CTL_FOUND] != 0:
                C[CTL_SKIPPED] += 1
            else:
                C[CTL_STEP] += 1
            C[CTL_FOUND] = 0
            for k in range(ntot):
                C[CTL_HEAD + k] = 0

    return finish


# --- signatures and compile options (what the launcher really uses) ------------------

def signature(kind: str, dtype: Any) -> tuple[Any, ...]:
    """The kernel's argument types: the layout this module owns."""
    from numba.cuda import types

    t = types.float32 if np.dtype(dtype) == np.float32 else types.float64
    u64, i64 = types.uint64, types.int64
    if kind == "update":
        return (u64, i64, i64, i64) + (t,) * 7 + (u64,)
    if kind == "check":
        return (u64, i64, i64, i64, t, u64)
    if kind == "finish":
        return (u64,)
    raise ValueError(kind)


def arg_sizes(kind: str, dtype: Any) -> list[int]:
    """The byte size of each kernel argument, checked against the loaded kernel."""
    isz = np.dtype(dtype).itemsize
    return {"update": [8, 8, 8, 8] + [isz] * 7 + [8], "check": [8, 8, 8, 8, isz, 8],
            "finish": [8]}[kind]


def source(kind: str, dtype: Any, flags: int) -> Any:
    if kind == "update":
        return update_source(dtype, flags)
    if kind == "check":
        return check_source(dtype, flags)
    return finish_source()


#: Options of ``numba.cuda.compile`` for every kernel: IEEE division and square root,
#: no flush-to-zero, no contraction beyond the libdevice calls (fastmath=False), the
#: Numba ABI (the only one numba-cuda supports for kernels), PTX out.
COMPILE_OPTIONS: dict[str, Any] = dict(device=False, abi="numba", output="ptx",
                                       fastmath=False, debug=False, lineinfo=False,
                                       opt=True)

_ENTRY = re.compile(r"\.visible\s+\.entry\s+(\S+?)\s*\(")


def compile_ptx(kind: str, dtype: Any, flags: int, cc: tuple[int, int]) -> tuple[str, str]:
    """``(ptx, entry name)`` of a kernel, compiled with :data:`COMPILE_OPTIONS` for
    compute capability ``cc`` through numba-cuda's public ``numba.cuda.compile``."""
    ptx, _ = cuda.compile(source(kind, dtype, flags), signature(kind, dtype), cc=cc,
                          **COMPILE_OPTIONS)
    names = _ENTRY.findall(ptx)
    if len(names) != 1:
        raise RuntimeError(f"fastadagrad: expected one kernel entry in the PTX of the "
                           f"{kind} kernel, found {names}")
    return ptx, names[0]
