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

The float32 kernels ``adagrad_many_emu_*`` give the same bits without calling the
routine on the common path: on this machine MKL runs its generic SSE kernel
(``mkl_vml_kernel_sSqrt_EXHAynn``: MKL does not pick its AVX2/AVX-512 kernels on AMD
CPUs), whose arithmetic is :func:`mkl_ex_sqrt_normal` below, reproduced with the same
``rsqrtps`` instruction. Exhaustively equal on all 2^24 mantissa/exponent-parity
patterns; ``fastadagrad.torch`` re-checks it against the routine once per process
and uses the calling kernels where it differs (another CPU, another MKL). Why: the
routine costs 0.3 ns per element at any length plus ~95 ns per call (measured
through this module, 2^16 float32, one thread: 20 us in one call, 32 us in blocks of
512, where the IEEE ``vsqrtps`` loop takes 12 us), which made torch's eager formula
2x slower than the fused one over the same memory traffic.

Validation and dispatch live in ``_tensorplan.py``; this module knows nothing of torch.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from . import _hyper as H
from ._intrinsics import chunk_views, fma
from ._jit import jit

_V4F32 = ir.VectorType(ir.FloatType(), 4)
_I32 = ir.IntType(32)

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
    for c in prange(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        tmp = np.empty(min(BLOCK, p.size), proto.dtype)
        adagrad_span_vsqrt(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags)


@jit()
def adagrad_many_vsqrt_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                              sqrt_fn, neg_clr, eps, wd, flags):
    """Serial twin of :func:`adagrad_many_vsqrt_parallel` for small models."""
    tmp = np.empty(BLOCK, proto.dtype)
    for c in range(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        adagrad_span_vsqrt(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags)


# --- float32: MKL's generic sqrt kernel, reproduced -------------------------------------

def _declare(module: ir.Module, name: str) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(_V4F32, [_V4F32]), name)
    return fn


@intrinsic
def _rsqrt4(typingctx, src, dst, i):  # type: ignore[no-untyped-def]
    """``dst[i:i+4] = rsqrtps(src[i:i+4])``: the x86 SSE approximate reciprocal square
    root (12 bits; its bits are the CPU's, which is why the emulation is re-checked on
    each machine). The loop vectoriser cannot widen a target intrinsic, so the kernels
    call this on 4 elements at a time."""
    if not (isinstance(src, types.Array) and isinstance(dst, types.Array)
            and src.dtype == dst.dtype == types.float32 and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = context.make_array(sig.args[0])(context, builder, args[0])
        b = context.make_array(sig.args[1])(context, builder, args[1])
        fn = _declare(builder.module, "llvm.x86.sse.rsqrt.ps")
        pa = builder.bitcast(builder.gep(a.data, [args[2]]), _V4F32.as_pointer())
        pb = builder.bitcast(builder.gep(b.data, [args[2]]), _V4F32.as_pointer())
        builder.store(builder.call(fn, [builder.load(pa, align=4)]), pb, align=4)
        return context.get_dummy_value()

    return types.void(src, dst, i), codegen


@intrinsic
def _rsqrt1(typingctx, x):  # type: ignore[no-untyped-def]
    """``rsqrtss(x)``: the scalar form of :func:`_rsqrt4` (the same table)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        fn = _declare(builder.module, "llvm.x86.sse.rsqrt.ss")
        v = builder.insert_element(ir.Constant(_V4F32, ir.Undefined), args[0],
                                   ir.Constant(_I32, 0))
        return builder.extract_element(builder.call(fn, [v]), ir.Constant(_I32, 0))

    return types.float32(x), codegen


@intrinsic
def _f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The bits of a float32 as an int32 (a bit cast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _I32)

    return types.int32(x), codegen


#: Inputs whose bits lie in [NORMAL_LO, NORMAL_HI] take MKL's vector path (the
#: comparison MKL makes: ``bits + 0x7f800000 > 0xfefff000`` as signed int32 is the
#: complement); the others, its scalar path.
NORMAL_LO, NORMAL_HI = 0x00800000, 0x7F7FF000


@jit(error_model="numpy", inline="always")
def mkl_ex_sqrt_normal(x, y):
    """The square root MKL's generic kernel returns for ``x`` in its normal range
    (:data:`NORMAL_LO`..:data:`NORMAL_HI`), given ``y = rsqrtps(x)``.

    Read from ``mkl_vml_kernel_sSqrt_EXHAynn`` (MKL 2024.2): two Newton steps on
    ``s = x*y`` and ``y/2`` in float32, no FMA, in this order.
    """
    half = np.float32(0.5)
    s0 = x * y
    hy = y * half
    e = half - s0 * hy
    s1 = s0 * e + s0
    hy1 = e * hy + hy
    r = x - s1 * s1
    return r * hy1 + s1


@jit(error_model="numpy", inline="always")
def _outside_normal(x):
    """1 if MKL's scalar path takes ``x``: zero, subnormals, the largest floats, inf,
    NaN, negatives (one unsigned comparison, as a number so that loops can sum it).
    The kernels hand a block holding one to the routine itself."""
    return np.uint32(np.uint32(_f32_bits(x)) - np.uint32(NORMAL_LO)) > np.uint32(
        NORMAL_HI - NORMAL_LO)


@jit(error_model="numpy")
def rsqrt_block(x, y):
    """``y[:] = rsqrtps(x)`` over a whole 1-D float32 array."""
    n = x.size
    n4 = n & ~3
    for i in range(0, n4, 4):
        _rsqrt4(x, y, i)
    for i in range(n4, n):
        y[i] = _rsqrt1(x[i])


@jit(error_model="numpy")
def mkl_sqrt_emulated(x, out):
    """``out = mkl_ex_sqrt_normal(x)`` elementwise, for ``x`` in the normal range (the
    self-check's side of the comparison)."""
    rsqrt_block(x, out)
    for i in range(x.size):
        out[i] = mkl_ex_sqrt_normal(x[i], out[i])


@jit(error_model="numpy")
def mkl_sqrt_routine(sqrt_fn, x, out):
    """``out = vmsSqrt(x)`` through the routine's address (the reference side)."""
    _vsqrt(sqrt_fn, x, out)


@jit(error_model="numpy")
def adagrad_span_emu(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_span_vsqrt` on float32 spans with the square root of
    :func:`mkl_ex_sqrt_normal`.

    A block whose new accumulators are all in MKL's normal range (the common case)
    updates ``p`` in the same loop that finishes the square root; a block holding a
    zero, a subnormal, inf or NaN (e.g. a parameter whose gradient stayed 0) calls the
    routine ``sqrt_fn`` on that block, as :func:`adagrad_span_vsqrt` does everywhere.
    Single thread, 2^16 float32, AMD EPYC: 28-30 us, where the calling kernel takes
    45 us and the fused formula's IEEE loop 20 us.
    """
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    n = p.size
    for s in range(0, n, BLOCK):
        m = min(BLOCK, n - s)
        pb, gb, hb, sb = p[s:s + m], g[s:s + m], h[s:s + m], tmp[:m]
        outside = 0
        for i in range(m):
            gi = -gb[i] if maximize else gb[i]
            if coupled:
                gi = fma(pb[i], wd, gi)
            hi = fma(gi, gi, hb[i])
            hb[i] = hi
            outside += _outside_normal(hi)
        if outside:
            _vsqrt(sqrt_fn, hb, sb)
            for i in range(m):
                gi = -gb[i] if maximize else gb[i]
                if coupled:
                    gi = fma(pb[i], wd, gi)
                pb[i] = pb[i] + (neg_clr * gi) / (sb[i] + eps)
        else:
            rsqrt_block(hb, sb)
            for i in range(m):
                gi = -gb[i] if maximize else gb[i]
                if coupled:
                    gi = fma(pb[i], wd, gi)
                pb[i] = pb[i] + (neg_clr * gi) / (mkl_ex_sqrt_normal(hb[i], sb[i]) + eps)


@jit(parallel=True)
def adagrad_many_emu_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                              sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_many_vsqrt_parallel` with :func:`adagrad_span_emu` (float32)."""
    for c in prange(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        tmp = np.empty(min(BLOCK, p.size), proto.dtype)
        adagrad_span_emu(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags)


@jit()
def adagrad_many_emu_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                            sqrt_fn, neg_clr, eps, wd, flags):
    """Serial twin of :func:`adagrad_many_emu_parallel` for small models."""
    tmp = np.empty(BLOCK, proto.dtype)
    for c in range(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        adagrad_span_emu(p, g, h, tmp, sqrt_fn, neg_clr, eps, wd, flags)


# --- sparse gradients: torch's sparse branch on coalesced rows -----------------------------

def _sqrt_rows(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
    """Typing stub: ``out = torch.sqrt(x)`` bits (see :func:`_sqrt_rows_impl`)."""


@overload(_sqrt_rows, jit_options={"error_model": "numpy"})
def _sqrt_rows_impl(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
    """float32 with ``emulate``: :func:`mkl_ex_sqrt_normal` unless an input is outside
    MKL's normal range; otherwise (and for float64) the routine ``sqrt_fn`` itself."""
    if x.dtype == types.float32:
        def impl(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
            if emulate:
                outside = 0
                for i in range(x.size):
                    outside += _outside_normal(x[i])
                if not outside:
                    rsqrt_block(x, out)
                    for i in range(x.size):
                        out[i] = mkl_ex_sqrt_normal(x[i], out[i])
                    return
            _vsqrt(sqrt_fn, x, out)
    else:
        def impl(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
            _vsqrt(sqrt_fn, x, out)
    return impl


@jit()
def first_bad_row(rows, nrows):
    """Position of the first row index that is out of ``[0, nrows)`` or not above the
    one before it (a coalesced gradient's indices are sorted and unique), or -1."""
    prev = -1
    for j in range(rows.size):
        r = rows[j]
        if r <= prev or r >= nrows:
            return j
        prev = r
    return -1


@jit(error_model="numpy")
def sparse_rows_span(p, h, rows, vals, lo, hi, hs, ss, sqrt_fn, neg_clr, eps, maximize,
                     emulate):
    """torch's sparse Adagrad step on the rows ``rows[lo:hi]`` (unique, coalesced).

    ``p``, ``h``: (R, D) views of the parameter and its accumulator; ``vals``: (nnz, D),
    the coalesced gradient's values; ``hs``, ``ss``: scratch of ``(hi - lo) * D``
    elements. torch 2.13's ``_single_tensor_adagrad`` sparse branch, operation for
    operation (each rounded once in the dtype; bit-identical, ``tests/test_torch.py``)::

        g = -v if maximize
        h[r] = h[r] + g * g                      (add_ of values.pow(2): no FMA)
        s = torch.sqrt(h[r]) + eps               (MKL's routine: see _sqrt_rows)
        p[r] = fma(g / s, neg_clr, p[r])         (add_(alpha=-clr): MKL's axpy, an FMA)
    """
    d = vals.shape[1]
    k = 0
    for j in range(lo, hi):
        r = rows[j]
        for i in range(d):
            g = vals[j, i]
            x = h[r, i] + g * g
            h[r, i] = x
            hs[k + i] = x
        k += d
    _sqrt_rows(sqrt_fn, hs[:k], ss[:k], emulate)
    k = 0
    for j in range(lo, hi):
        r = rows[j]
        for i in range(d):
            g = -vals[j, i] if maximize else vals[j, i]
            p[r, i] = fma(g / (ss[k + i] + eps), neg_clr, p[r, i])
        k += d


@jit()
def adagrad_sparse_rows_serial(p, h, rows, vals, per_block, sqrt_fn, neg_clr, eps,
                               maximize, emulate):
    """:func:`sparse_rows_span` over all rows, ``per_block`` rows per square-root call
    (about :data:`BLOCK` elements, so the scratch stays in L1)."""
    d = vals.shape[1]
    hs = np.empty(per_block * d, p.dtype)
    ss = np.empty(per_block * d, p.dtype)
    for lo in range(0, rows.size, per_block):
        sparse_rows_span(p, h, rows, vals, lo, min(lo + per_block, rows.size), hs, ss,
                         sqrt_fn, neg_clr, eps, maximize, emulate)


@jit(parallel=True)
def adagrad_sparse_rows_parallel(p, h, rows, vals, per_block, sqrt_fn, neg_clr, eps,
                                 maximize, emulate):
    """:func:`adagrad_sparse_rows_serial` on all threads (the rows are unique: no two
    blocks write the same row)."""
    d = vals.shape[1]
    nblocks = (rows.size + per_block - 1) // per_block
    for b in prange(nblocks):
        lo = b * per_block
        hs = np.empty(per_block * d, p.dtype)
        ss = np.empty(per_block * d, p.dtype)
        sparse_rows_span(p, h, rows, vals, lo, min(lo + per_block, rows.size), hs, ss,
                         sqrt_fn, neg_clr, eps, maximize, emulate)
