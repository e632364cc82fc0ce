"""CPU kernels: the fused one-pass AdaGrad update, compiled with Numba.

Each kernel is a bare loop over flat buffers that reads ``p``, ``g``, ``h`` once and
writes ``p``, ``h`` once per element (20 bytes per float32 element): no temporaries,
no ``fastmath`` (``sqrt`` and ``/`` stay IEEE, nothing is contracted into an FMA
except where a formula asks for one explicitly through :func:`fma`).

Validation, dispatch and the parallel/serial choice live in ``_dispatch.py``.
"""

from __future__ import annotations

import math
import threading

import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.extending import intrinsic

from . import _hyper as H
from ._jit import jit


@intrinsic
def fma(typingctx, a, b, c):  # type: ignore[no-untyped-def]
    """``a*b + c`` rounded once (``llvm.fma``), for formulas that are defined with one."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.fma(*args)

    return a(a, b, c), codegen


@intrinsic
def _as_pointer(typingctx, address, proto):  # type: ignore[no-untyped-def]
    """Turn an integer address into a typed pointer to ``proto``'s dtype."""
    if not (isinstance(address, types.Integer) and isinstance(proto, types.Array)):
        return None
    ptr = types.CPointer(proto.dtype)

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, proto), codegen


@intrinsic
def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Hint the cache to fetch ``arr[idx]`` (``llvm.prefetch``, read/write, keep)."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, fnty, "llvm.prefetch.p0")
        addr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [addr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


#: Software prefetch: each block of BLOCK elements first asks for the cache lines
#: PREFETCH elements ahead. The hardware prefetcher alone left the kernel at 1.10-1.14x
#: the memory-only roofline at 2^24 f32 (sqrt/div stall the core while DRAM idles);
#: with 256 elements ahead it measured 1.01-1.03x (2^20: 1.00-1.01x), and in cache it
#: costs nothing (interleaved runs against the previous kernel). Frozen at compile time.
BLOCK = 64
PREFETCH = 256


# error_model="numpy": no ZeroDivisionError check, so the loop vectorises (zmm
# vsqrtps/vdivps); with the default "python" model the same loop stays scalar, ~6x slower.
@jit(error_model="numpy")
def adagrad_span(p, g, h, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """One fused AdaGrad step over equal-length 1-D spans ``p``, ``g``, ``h``.

    Per element, in the dtype of the arrays (every coefficient already cast to it)::

        g' = g / grad_scale             if GRAD_SCALE
        g' = -g'                        if MAXIMIZE
        g' = g' + p * wd                if WD_COUPLED     (fma(p, wd, g') if FMA_WEIGHT_DECAY)
        p' = p - (p * wd) * lr_wd       if WD_DECOUPLED   (else p' = p)
        h  = h + g' * g'                                  (fma(g', g', h) if FMA_ACCUMULATE)
        q  = (lr_num * g') / (sqrt(h + eps_in) + eps_out)
        q  = 0                          if ZERO_WHERE_H0 and h == 0
        p  = p' - q * lr_after

    With the default coefficients (``lr_after = 1``, ``eps_in = 0``) this is exactly
    the NumPy class: ``h += g*g; p -= lr*g / (sqrt(h) + eps)``, every rounding the same.
    The span is walked in blocks of ``BLOCK`` elements, each prefetching ``PREFETCH``
    elements ahead; the math per element does not depend on the blocking.
    """
    n = p.size
    line = max(1, 64 // p.itemsize)  # elements per 64-byte cache line
    nb = n // BLOCK
    for b in range(nb):
        s = b * BLOCK
        if s + PREFETCH < n:
            for k in range(0, BLOCK, line):
                _prefetch(p, s + PREFETCH + k)
                _prefetch(g, s + PREFETCH + k)
                _prefetch(h, s + PREFETCH + k)
        _update_block(p[s:s + BLOCK], g[s:s + BLOCK], h[s:s + BLOCK], lr_num, lr_after,
                      eps_in, eps_out, wd, lr_wd, grad_scale, flags)
    s = nb * BLOCK
    _update_block(p[s:], g[s:], h[s:], lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                  grad_scale, flags)


@jit(error_model="numpy", inline="always")
def _update_block(p, g, h, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale,
                  flags):
    """The per-element loop of :func:`adagrad_span` (its docstring has the math)."""
    scale = (flags & H.GRAD_SCALE) != 0
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    decoupled = (flags & H.WD_DECOUPLED) != 0
    fma_h = (flags & H.FMA_ACCUMULATE) != 0
    fma_wd = (flags & H.FMA_WEIGHT_DECAY) != 0
    zero_h0 = (flags & H.ZERO_WHERE_H0) != 0
    zero = eps_in - eps_in
    for i in range(p.size):
        gi = g[i]
        if scale:
            gi = gi / grad_scale
        if maximize:
            gi = -gi
        pi = p[i]
        if coupled:
            if fma_wd:
                gi = fma(pi, wd, gi)
            else:
                gi = gi + pi * wd
        elif decoupled:
            pi = pi - (pi * wd) * lr_wd
        if fma_h:
            hi = fma(gi, gi, h[i])
        else:
            hi = h[i] + gi * gi
        q = (lr_num * gi) / (math.sqrt(hi + eps_in) + eps_out)
        if zero_h0 and hi == zero:
            q = zero
        h[i] = hi
        p[i] = pi - q * lr_after


@jit(parallel=True)
def adagrad_flat_parallel(p, g, h, chunk, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                          grad_scale, flags):
    """:func:`adagrad_span` over one flat buffer, split into ``chunk``-element spans.

    Each span starts at its own offset so the inner loop is a plain ``range(len)`` over
    a view, which LLVM vectorises.
    """
    n = p.size
    for c in prange((n + chunk - 1) // chunk):
        b = c * chunk
        e = min(b + chunk, n)
        adagrad_span(p[b:e], g[b:e], h[b:e], lr_num, lr_after, eps_in, eps_out, wd,
                     lr_wd, grad_scale, flags)


@jit(parallel=True)
def adagrad_many_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen, lr_num,
                          lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """:func:`adagrad_span` over many separate arrays in ONE compiled call.

    ``paddr``/``gaddr``/``haddr`` hold each tensor's data address; the chunk table
    (``ctensor``, ``cstart``, ``clen``: tensor index, first element, length) splits
    the model into spans of at most ``config.CHUNK`` elements. ``proto`` is an empty
    array that carries the dtype. Passing the arrays as a tuple instead does not
    compile in reasonable time for 100 tensors (NUMBA_NOTES.md).
    """
    isz = proto.itemsize
    for c in prange(ctensor.size):
        t = ctensor[c]
        off = cstart[c] * isz
        n = clen[c]
        adagrad_span(carray(_as_pointer(paddr[t] + off, proto), n),
                     carray(_as_pointer(gaddr[t] + off, proto), n),
                     carray(_as_pointer(haddr[t] + off, proto), n),
                     lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags)


@jit()
def adagrad_many_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen, lr_num,
                        lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """Serial twin of :func:`adagrad_many_parallel` for small models."""
    isz = proto.itemsize
    for c in range(ctensor.size):
        t = ctensor[c]
        off = cstart[c] * isz
        n = clen[c]
        adagrad_span(carray(_as_pointer(paddr[t] + off, proto), n),
                     carray(_as_pointer(gaddr[t] + off, proto), n),
                     carray(_as_pointer(haddr[t] + off, proto), n),
                     lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags)


@jit(error_model="numpy")
def span_has_nonfinite(g, grad_scale, flags):
    """True if any ``g`` (divided by ``grad_scale`` when GRAD_SCALE is set) is NaN/inf.

    Read-only; an integer OR-reduction so the loop vectorises (a float sum would not:
    without reassociation LLVM keeps float reductions in order).
    """
    n = g.size
    line = max(1, 64 // g.itemsize)
    nb = n // (4 * BLOCK)
    bad = False
    for b in range(nb):  # blocks, prefetching ahead like adagrad_span
        s = b * 4 * BLOCK
        if s + 4 * PREFETCH < n:
            for k in range(0, 4 * BLOCK, line):
                _prefetch(g, s + 4 * PREFETCH + k)
        bad |= _block_has_nonfinite(g[s:s + 4 * BLOCK], grad_scale, flags)
    return bad | _block_has_nonfinite(g[nb * 4 * BLOCK:], grad_scale, flags)


@jit(error_model="numpy", inline="always")
def _block_has_nonfinite(g, grad_scale, flags):
    scale = (flags & H.GRAD_SCALE) != 0
    bad = np.int32(0)
    for i in range(g.size):
        x = g[i] / grad_scale if scale else g[i]
        bad |= np.int32(not math.isfinite(x))
    return bad != 0


@jit(parallel=True)
def flat_has_nonfinite_parallel(g, chunk, grad_scale, flags):
    """:func:`span_has_nonfinite` over one flat buffer on all threads. Read-only.

    The serial check alone made ``nonfinite='skip'`` 2x slower than ``'ignore'`` at
    2^24 float32 (bench/results/cpu.md); split like the update, it is one extra read.
    """
    n = g.size
    nc = (n + chunk - 1) // chunk
    bad = 0
    for c in prange(nc):
        b = c * chunk
        bad += span_has_nonfinite(g[b:min(b + chunk, n)], grad_scale, flags)
    return bad != 0


@jit(parallel=True)
def first_nonfinite_many(proto, gaddr, ctensor, cstart, clen, grad_scale, flags):
    """Lowest index of a tensor whose gradient has a NaN/inf, or -1. Read-only."""
    isz = proto.itemsize
    nc = ctensor.size
    bad = np.zeros(nc, np.bool_)
    for c in prange(nc):
        g = carray(_as_pointer(gaddr[ctensor[c]] + cstart[c] * isz, proto), clen[c])
        bad[c] = span_has_nonfinite(g, grad_scale, flags)
    first = -1  # the lowest tensor index: the table may be in any order
    for c in range(nc):
        if bad[c] and (first < 0 or ctensor[c] < first):
            first = ctensor[c]
    return first


@jit()
def first_nonfinite_many_serial(proto, gaddr, ctensor, cstart, clen, grad_scale, flags):
    isz = proto.itemsize
    first = -1  # the lowest tensor index: the table may be in any order
    for c in range(ctensor.size):
        t = ctensor[c]
        if first >= 0 and t >= first:
            continue
        g = carray(_as_pointer(gaddr[t] + cstart[c] * isz, proto), clen[c])
        if span_has_nonfinite(g, grad_scale, flags):
            first = t
    return first


#: Parallel kernels are called under this lock: Numba's workqueue layer aborts the
#: process when two Python threads enter parallel code at once, and even with omp two
#: concurrent 2-thread kernels only oversubscribe the cores. Serial kernels need none.
PARALLEL_LOCK = threading.Lock()
