"""CPU kernels whose square root is an external vector routine: torch's eager formula.

``torch.optim.Adagrad`` on the CPU (its default single-tensor path and ``foreach=True``)
takes the square root with ``torch.sqrt``, which ATen hands to Intel MKL's
``vmsSqrt``/``vmdSqrt`` (VML, high-accuracy mode). That routine is not correctly
rounded: measured with torch 2.13.0 (MKL 2024.2) on an AMD EPYC, 17% of random float32
inputs and 1.2% of float64 inputs come out 1 ulp away from the IEEE square root, the
same for any ``ATEN_CPU_CAPABILITY``, and always the same function of the input (not of
its position or of the vector length). No formula choice of the IEEE kernels can give
those bits, so these kernels call the very routine torch calls, through its address,
on blocks of ``BLOCK`` elements that stay in L1: still one pass over memory.

Per element, in the dtype of the arrays (coefficients already cast to it)::

    g' = -g                   if MAXIMIZE
    g' = fma(p, wd, g')       if WD_COUPLED     (ATen's add(alpha=wd) is an FMA)
    h  = fma(g', g', h)                         (ATen's addcmul_ is an FMA)
    s  = vsqrt(h)                               (the external routine, on a block)
    p  = p + (neg_clr * g') / (s + eps)         (ATen's addcdiv_(value=-clr))

Validation and dispatch live in ``_tensorplan.py``; this module knows nothing of torch.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import carray, prange, types
from numba.extending import intrinsic

from . import _hyper as H
from ._intrinsics import _as_pointer, fma
from ._jit import jit

#: Elements per call of the external square root: 512 float32 = 2 KiB per array, so
#: the block of h written before the call and read by it, and the block of square roots
#: read after it, stay in L1.
BLOCK = 512

#: The mode torch passes to vmsSqrt/vmdSqrt (aten/src/ATen/cpu/vml.h):
#: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
VML_MODE = 0x2 | 0x140000 | 0x100


@intrinsic
def _vsqrt(typingctx, fn, src, dst):  # type: ignore[no-untyped-def]
    """Call ``void fn(int n, const T *src, T *dst, int64 mode)`` (VML's signature) on
    ``src.size`` elements; ``fn`` is the routine's address."""
    if not (isinstance(fn, types.Integer) and isinstance(src, types.Array)
            and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = context.make_array(sig.args[1])(context, builder, args[1])
        b = context.make_array(sig.args[2])(context, builder, args[2])
        fp = a.data.type
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i32, fp, fp, i64])
        callee = builder.inttoptr(args[0], fnty.as_pointer())
        n = builder.trunc(a.nitems, i32)
        builder.call(callee, [n, a.data, b.data, ir.Constant(i64, VML_MODE)])
        return context.get_dummy_value()

    return types.void(fn, src, dst), codegen


@jit(error_model="numpy")
def adagrad_span_vsqrt(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags):
    """One step of torch's eager formula (module docstring) over 1-D spans.

    ``tmp`` is scratch of at least ``min(BLOCK, p.size)`` elements.
    """
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    n = p.size
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        pb, gb, hb, sb = p[s:s + m], g[s:s + m], h[s:s + m], tmp[:m]
        for i in range(m):
            gi = -gb[i] if maximize else gb[i]
            if coupled:
                gi = fma(pb[i], wd, gi)
            hb[i] = fma(gi, gi, hb[i])
        _vsqrt(sqrt_fn, hb, sb)
        for i in range(m):  # g' again: cheaper than a second scratch block
            gi = -gb[i] if maximize else gb[i]
            if coupled:
                gi = fma(pb[i], wd, gi)
            pb[i] = pb[i] + (neg_clr * gi) / (sb[i] + eps)


@jit(parallel=True)
def adagrad_many_vsqrt_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                                sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_span_vsqrt` over many separate arrays in ONE compiled call.

    Same chunk table as ``cpu.adagrad_many_parallel`` (tensor index, first element,
    length per chunk); ``proto`` is an empty array that carries the dtype.
    """
    isz = proto.itemsize
    for c in prange(ctensor.size):
        t = ctensor[c]
        off = cstart[c] * isz
        n = clen[c]
        tmp = np.empty(min(BLOCK, n), proto.dtype)
        adagrad_span_vsqrt(carray(_as_pointer(paddr[t] + off, proto), n),
                           carray(_as_pointer(gaddr[t] + off, proto), n),
                           carray(_as_pointer(haddr[t] + off, proto), n),
                           tmp, sqrt_fn, neg_clr, eps, wd, flags)


@jit()
def adagrad_many_vsqrt_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                              sqrt_fn, neg_clr, eps, wd, flags):
    """Serial twin of :func:`adagrad_many_vsqrt_parallel` for small models."""
    isz = proto.itemsize
    tmp = np.empty(BLOCK, proto.dtype)
    for c in range(ctensor.size):
        t = ctensor[c]
        off = cstart[c] * isz
        n = clen[c]
        adagrad_span_vsqrt(carray(_as_pointer(paddr[t] + off, proto), n),
                           carray(_as_pointer(gaddr[t] + off, proto), n),
                           carray(_as_pointer(haddr[t] + off, proto), n),
                           tmp, sqrt_fn, neg_clr, eps, wd, flags)
