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

The kernels ``adagrad_many_emu_*`` give the same bits without calling the routine on
the common path: on this machine MKL runs its generic SSE kernels
(``mkl_vml_kernel_sSqrt_EXHAynn``, ``mkl_vml_kernel_dSqrt_EXHAynn``: MKL does not pick
its AVX2/AVX-512 kernels on AMD CPUs), whose arithmetic is :func:`mkl_ex_sqrt_normal`
and :func:`mkl_ex_dsqrt_normal` below, reproduced with the same ``rsqrtps``
instruction. float32: exhaustively equal on all 2^24 mantissa/exponent-parity patterns
of the kernel's vector path, and its scalar path is the IEEE square root for every
sign-clear input outside it (all compared). float64: equal on 1,090,519,040 inputs of
the vector path, random and with long runs of ones or zeros in the mantissa (no
exhaustive check is possible); other inputs but +0 go to the routine.
``fastadagrad.torch`` re-checks both dtypes against the routine once per process and
uses the calling kernels where they differ (another CPU, another MKL).
Why: the routine costs 0.3 ns (float32) and ~1.4 ns (float64) per element plus ~95 ns
per call (measured through this module, 2^16 float32, one thread: 20 us in one call,
32 us in blocks of 512, where the IEEE ``vsqrtps`` loop takes 12 us), which made
torch's eager formula 2-3x slower than the fused one over the same memory traffic. The
emulation runs in the same pass as the rest of the update, :data:`LANES` (float32) or
:data:`LANES64` (float64) elements at a time (:func:`adagrad_span_emu`).

The loops around an emulation (:func:`span_emu`, :func:`many_emu_parallel`, the sparse
rows' kernels...) are written once: their ``em`` argument names the emulation whose
arithmetic they compile in (:data:`GENERIC`, this module's; :mod:`cpu_vsqrt_z0` adds
MKL's AVX-512 kernels', the ones it runs on Intel CPUs with AVX-512), and
:func:`family` binds it.

Validation and dispatch live in ``_tensorplan.py``; this module knows nothing of torch.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import prange, typeof, types
from numba.core import cgutils
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
    """Call ``void sqrt(int n, const T *src, T *dst, int64 mode)`` (VML's signature) on
    ``src.size`` elements. ``fn``: the routine's address, or the pair
    ``(routine, threads)`` that :func:`fastadagrad.torch` passes, ``threads`` being the
    address of MKL's ``int MKL_Set_Num_Threads_Local(int)`` (or 0: no such call). With
    one, the routine runs on the calling thread alone: MKL's thread-local count is set
    to 1 for the call and put back after it. Why: ``torch.set_num_threads`` turns off
    MKL's dynamic threading, after which every routine call, however short, starts an
    OpenMP team of all the threads (torch's own calls come from inside its parallel
    regions, where MKL runs on one thread). Measured on a 2-core Intel Xeon, the
    serial kernel on 2^16 float32 (blocks of :data:`BLOCK`) took 242 us instead of 30,
    and a 100-tensor model's step 3.0 ms instead of 1.4."""
    pair = (isinstance(fn, types.UniTuple) and fn.count == 2
            and isinstance(fn.dtype, types.Integer))
    if not ((isinstance(fn, types.Integer) or pair) and isinstance(src, types.Array)
            and isinstance(dst, types.Array) and src.dtype == dst.dtype):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a = context.make_array(sig.args[1])(context, builder, args[1])
        b = context.make_array(sig.args[2])(context, builder, args[2])
        fp = a.data.type
        i32, i64 = ir.IntType(32), ir.IntType(64)
        fnty = ir.FunctionType(ir.VoidType(), [i32, fp, fp, i64])
        if pair:
            routine = builder.extract_value(args[0], 0)
            threads = builder.extract_value(args[0], 1)
        else:
            routine, threads = args[0], None
        callee = builder.inttoptr(routine, fnty.as_pointer())
        n = builder.trunc(a.nitems, i32)
        if threads is not None:
            local = builder.inttoptr(threads, ir.FunctionType(i32, [i32]).as_pointer())
            has = builder.icmp_unsigned("!=", threads, ir.Constant(threads.type, 0))
            prev = cgutils.alloca_once_value(builder, ir.Constant(i32, 0))
            with builder.if_then(has):
                builder.store(builder.call(local, [ir.Constant(i32, 1)]), prev)
        builder.call(callee, [n, a.data, b.data, ir.Constant(i64, VML_MODE)])
        if threads is not None:
            with builder.if_then(has):
                builder.call(local, [builder.load(prev)])
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


# --- MKL's generic sqrt kernels, reproduced ---------------------------------------------

#: float32: inputs whose bits lie in [NORMAL_LO, NORMAL_HI] take MKL's vector path (the
#: comparison MKL makes: ``bits + 0x7f800000 > 0xfefff000`` as signed int32 is the
#: complement); the others, its scalar path. That path returns the IEEE square root of
#: every input whose sign bit is clear (zero, subnormals, the largest floats, inf, NaN:
#: all 16,781,311 such bit patterns compared, MKL 2024.2 on an AMD EPYC) and, for a
#: negative input, a NaN of its own (+NaN where the IEEE square root gives -NaN), which
#: the kernels take from the routine itself.
NORMAL_LO, NORMAL_HI = 0x00800000, 0x7F7FF000

#: float64: MKL's generic kernel (``mkl_vml_kernel_dSqrt_EXHAynn``) takes its vector
#: path where the high 32 bits of the input lie in [D_NORMAL_LO, D_NORMAL_HI] (its
#: comparison: ``hi + 0x7ff00000 > 0xffbfffff`` as signed int32 is the complement),
#: 2^-1022 <= x < 2^1021; the kernels emulate that path and +0 (whose square root is +0)
#: and hand any other input (subnormals, the largest doubles, inf, NaN, negatives) to
#: the routine itself.
D_NORMAL_LO, D_NORMAL_HI = 0x00100000, 0x7FCFFFFF

#: float64: the coefficients of MKL's polynomial in ``e = 1 - x*r^2``
#: (:func:`mkl_ex_dsqrt_normal`), as stored in the routine's constants
D_POLY = (float.fromhex("0x1.1800032338cbbp-2"), float.fromhex("0x1.40000b13001d9p-2"),
          float.fromhex("0x1.80000000000f6p-2"), float.fromhex("0x1.ffffffffffe71p-2"))

#: float32 elements per step of the vector code: four AVX-512 registers (eight AVX
#: ones), whose independent operations LLVM interleaves. One thread, AMD EPYC, median of
#: interleaved runs, 64 lanes against 16: 2^14 float32 5.65 vs 6.12 us, 2^16 21.9 vs
#: 28.0 us, 2^20 319-340 vs 348 us (the IEEE loop of torch's fused formula: 5.59, 22.9,
#: 305-409 us); 128 lanes were no faster (6.05, 24.3, 390 us), 8 lanes slower than 16.
LANES = 64
#: float64 elements per step: four AVX-512 registers. One thread, AMD EPYC, median of
#: interleaved runs, two runs each: 2^14 float64 17.4 us, 2^16 66.9-68.1 us, 2^20
#: 1,139-1,194 us, where 16 lanes took 18.7, 73.6-75.5 and 1,194-1,242 us, the kernel
#: calling the routine 37.4-38.4, 151-154 and 3,006-3,312 us, and the IEEE loop of
#: torch's fused formula 14.4-16.4, 59.4-62.2 and 944-1,058 us.
LANES64 = 32

_F32, _F64, _I64 = ir.FloatType(), ir.DoubleType(), ir.IntType(64)


def _declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]
             ) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, args), name)
    return fn


def _lanes_of(dtype: types.Type) -> tuple[ir.Type, int, str]:
    """(element type, lanes per step, LLVM type suffix) of a float32/float64 dtype."""
    if dtype == types.float32:
        return _F32, LANES, "f32"
    return _F64, LANES64, "f64"


def _splat(value: int | float, ty: ir.VectorType) -> ir.Constant:
    return ir.Constant(ty, [value] * ty.count)


def _broadcast(builder: ir.IRBuilder, x: ir.Value, ty: ir.VectorType) -> ir.Value:
    v = builder.insert_element(ir.Constant(ty, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _splat(0, ir.VectorType(_I32, ty.count)))


def _any(builder: ir.IRBuilder, mask: ir.Value) -> ir.Value:
    """Whether any lane of an i1 vector is set."""
    ty = ir.IntType(mask.type.count)
    return builder.icmp_unsigned("!=", builder.bitcast(mask, ty), ir.Constant(ty, 0))


def _rsqrtps(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """``rsqrtps`` on every lane of a float32 vector: the x86 approximate reciprocal
    square root (12 bits; its bits are the CPU's table, which is why the emulation is
    re-checked on each machine), called on each 4-lane quarter
    (``llvm.x86.sse.rsqrt.ps``; the loop vectoriser cannot widen a target intrinsic,
    LLVM merges the quarters into the widest ``vrsqrtps`` the CPU has, which reads the
    same table)."""
    fn = _declare(builder.module, "llvm.x86.sse.rsqrt.ps", _V4F32, [_V4F32])
    return by_parts(builder, x, 4, lambda part: builder.call(fn, [part]))


def by_parts(builder: ir.IRBuilder, x: ir.Value, width: int, op: Any) -> ir.Value:
    """``op`` (a vector of ``width`` lanes to one of the same type) on each ``width``
    lanes of ``x`` in turn, the results joined back into one vector of ``x``'s lanes:
    how a fixed-width target intrinsic is applied to the kernels' wider vectors."""
    idx = ir.VectorType(_I32, width)
    parts = [op(builder.shuffle_vector(x, x, ir.Constant(idx, list(range(k, k + width)))))
             for k in range(0, x.type.count, width)]
    while len(parts) > 1:
        w = 2 * parts[0].type.count
        order = ir.Constant(ir.VectorType(_I32, w), list(range(w)))
        parts = [builder.shuffle_vector(a, b, order) for a, b in zip(parts[::2], parts[1::2])]
    return parts[0]


def _needs_routine(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Whether a lane of ``x`` is one whose square root the kernels take from the
    routine itself: float32, a set sign bit; float64, outside MKL's vector path and
    not +0."""
    n = x.type.count
    if x.type.element == _F32:
        bits = builder.bitcast(x, ir.VectorType(_I32, n))
        return _any(builder, builder.icmp_signed("<", bits, _splat(0, bits.type)))
    bits = builder.bitcast(x, ir.VectorType(_I64, n))
    hi = builder.trunc(builder.lshr(bits, _splat(32, bits.type)), ir.VectorType(_I32, n))
    off = builder.sub(hi, _splat(D_NORMAL_LO, hi.type))
    outside = builder.icmp_unsigned(">", off, _splat(D_NORMAL_HI - D_NORMAL_LO, hi.type))
    zero = builder.icmp_unsigned("==", bits, _splat(0, bits.type))
    return _any(builder, builder.and_(outside, builder.not_(zero)))


def _emit_sqrt(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """MKL's square root of every lane of ``x`` (none of which :func:`_needs_routine`):
    float32, the arithmetic of :func:`mkl_ex_sqrt_normal` where a lane is in the normal
    range, the IEEE square root where it is not (computed only when a lane needs it);
    float64, that of :func:`mkl_ex_dsqrt_normal` (which gives +0 for +0)."""
    if x.type.element == _F64:
        return _emit_dsqrt(builder, x)
    mul, add, sub = builder.fmul, builder.fadd, builder.fsub
    half = _splat(0.5, x.type)
    y = _rsqrtps(builder, x)
    s0 = mul(x, y)
    hy = mul(y, half)
    e = sub(half, mul(s0, hy))
    s1 = add(mul(s0, e), s0)
    hy1 = add(mul(e, hy), hy)
    r = sub(x, mul(s1, s1))
    s = add(mul(r, hy1), s1)
    vi = ir.VectorType(_I32, x.type.count)
    off = builder.sub(builder.bitcast(x, vi), _splat(NORMAL_LO, vi))
    outside = builder.icmp_unsigned(">", off, _splat(NORMAL_HI - NORMAL_LO, vi))
    before = builder.block
    with builder.if_then(_any(builder, outside), likely=False):
        ieee = builder.call(_declare(builder.module, f"llvm.sqrt.v{x.type.count}f32",
                                     x.type, [x.type]), [x])
        mixed = builder.select(outside, ieee, s)
        after = builder.block
    out = builder.phi(x.type)
    out.add_incoming(s, before)
    out.add_incoming(mixed, after)
    return out


def _emit_dsqrt(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """:func:`mkl_ex_dsqrt_normal` on every lane of a float64 vector (+0 gives +0)."""
    n = x.type.count
    vi = ir.VectorType(_I64, n)
    and_, mul, add, sub = builder.and_, builder.fmul, builder.fadd, builder.fsub

    def c(v: int) -> ir.Constant:
        return _splat(v, vi)

    bits = builder.bitcast(x, vi)
    odd = and_(builder.xor(bits, c(-1)), c(1 << 52))
    m = builder.lshr(builder.or_(and_(bits, c(0x001FFFFFE0000000)),
                                 builder.add(odd, c(0x07F0000000000000))), c(29))
    m = builder.bitcast(builder.trunc(m, ir.VectorType(_I32, n)), ir.VectorType(_F32, n))
    y = builder.fpext(_rsqrtps(builder, m), x.type)
    scale = builder.lshr(builder.add(builder.sub(odd, and_(bits, c(0x7FF0000000000000))),
                                     c(0xBFD0000000000000 - (1 << 64))), c(1))
    r0 = mul(builder.bitcast(scale, x.type), y)
    t = mul(r0, r0)
    x_hi = builder.bitcast(and_(bits, c(0xFFFFFFFFF8000000 - (1 << 64))), x.type)
    x_lo = sub(x, x_hi)
    e = sub(sub(_splat(1.0, x.type), mul(t, x_hi)), mul(t, x_lo))
    p = e
    p = mul(p, _splat(D_POLY[0], x.type))
    for k in (1, 2, 3):
        p = mul(add(p, _splat(D_POLY[k], x.type)), e)
    # +0 needs nothing of its own: x_hi = x_lo = 0 and every other term is finite
    return add(mul(x_hi, r0), add(mul(x_lo, r0), mul(mul(p, r0), x)))


def _lane_pointer(context, builder, ty, array, i, vt):  # type: ignore[no-untyped-def]
    data = context.make_array(ty)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [i]), vt.as_pointer())


def _float_array(t: types.Type) -> bool:
    return isinstance(t, types.Array) and t.dtype in (types.float32, types.float64)


#: The kernels' ``em`` argument names the emulation of MKL's square root they compile in:
#: a NumPy scalar whose type is the emulation's key in :data:`_ARITHMETIC` (its value is
#: not read). A NumPy scalar is typed in Numba's C dispatcher (~25 ns a call, measured);
#: an object of a class of ours took ~0.3 us with ``_numba_type_`` and 2.6 us through
#: ``typeof``, and the same loops built as closures per emulation are cached under a
#: key that changes from process to process (their cells pickle with the dispatchers'
#: ids), so they compiled again in every process. This one: MKL's generic kernels.
GENERIC = np.uint8(0)
#: Numba type of an emulation tag -> (``emit(builder, v)``: its square root of every
#: lane of a vector, ``needs(builder, v)``: whether any lane needs the routine, and a
#: scalar overload stub ``f(x) -> (True, sqrt) | (False, x)``)
_ARITHMETIC: dict[types.Type, tuple[Any, Any, Any]] = {}


def register(tag: Any, emit: Any, needs: Any, scalar: Any) -> None:
    """Give the emulation tag ``tag`` (a NumPy scalar of a type no other uses) its
    arithmetic (see :data:`_ARITHMETIC`)."""
    _ARITHMETIC[typeof(tag)] = (emit, needs, scalar)


def _arithmetic(em: types.Type) -> tuple[Any, Any, Any] | None:
    return _ARITHMETIC.get(em) if isinstance(em, types.Integer) else None


@intrinsic
def _sqrt_lanes(typingctx, x, out, i, em):  # type: ignore[no-untyped-def]
    """``out[i:i+L]`` = emulation ``em``'s square root of ``x[i:i+L]`` (``L``:
    :data:`LANES` for float32, :data:`LANES64` for float64); False, with nothing written,
    when a lane needs the routine."""
    arith = _arithmetic(em)
    if arith is None or not (_float_array(x) and _float_array(out) and x.dtype == out.dtype
                             and isinstance(i, types.Integer)):
        return None
    emit, needs, _ = arith

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        elem, n, _ = _lanes_of(sig.args[0].dtype)
        vt = ir.VectorType(elem, n)
        align = 4 if elem == _F32 else 8
        xv = builder.load(_lane_pointer(context, builder, sig.args[0], args[0], args[2], vt),
                          align=align)
        done = builder.not_(needs(builder, xv))
        with builder.if_then(done, likely=True):
            builder.store(emit(builder, xv), _lane_pointer(
                context, builder, sig.args[1], args[1], args[2], vt), align=align)
        return done

    return types.boolean(x, out, i, em), codegen


@intrinsic
def _emu_lanes(typingctx, p, g, h, i, neg_clr, eps, wd, maximize, coupled, em
               ):  # type: ignore[no-untyped-def]
    """One step of torch's eager formula (module docstring) on ``[i, i+L)`` of the
    spans (``L`` as for :func:`_sqrt_lanes`), with emulation ``em``'s square root;
    False, with nothing written, when a new accumulator needs the routine."""
    arith = _arithmetic(em)
    if arith is None or not (
            _float_array(p) and p.dtype == g.dtype == h.dtype and _float_array(g)
            and _float_array(h) and isinstance(i, types.Integer)
            and neg_clr == eps == wd == p.dtype and maximize == coupled == types.boolean):
        return None
    emit, needs, _ = arith

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        elem, n, suffix = _lanes_of(sig.args[0].dtype)
        vt = ir.VectorType(elem, n)
        pp, gp, hp = (_lane_pointer(context, builder, sig.args[k], args[k], args[3], vt)
                      for k in range(3))
        neg_clr, eps, wd, maximize, coupled = args[4:9]
        fma_v = _declare(builder.module, f"llvm.fma.v{n}{suffix}", vt, [vt, vt, vt])
        align = 4 if elem == _F32 else 8
        pv, gv, hv = (builder.load(x, align=align) for x in (pp, gp, hp))
        # -g as Numba negates (0.0 - g with a negative zero), then the coupled decay
        gv = builder.select(maximize, builder.fsub(_splat(-0.0, vt), gv), gv)
        gv = builder.select(coupled, builder.call(
            fma_v, [pv, _broadcast(builder, wd, vt), gv]), gv)
        hv = builder.call(fma_v, [gv, gv, hv])
        done = builder.not_(needs(builder, hv))
        with builder.if_then(done, likely=True):
            std = builder.fadd(emit(builder, hv), _broadcast(builder, eps, vt))
            step = builder.fdiv(builder.fmul(_broadcast(builder, neg_clr, vt), gv), std)
            builder.store(hv, hp, align=align)
            builder.store(builder.fadd(pv, step), pp, align=align)
        return done

    return types.boolean(p, g, h, i, neg_clr, eps, wd, maximize, coupled, em), codegen


def _sqrt_emulated(x, em):  # type: ignore[no-untyped-def]
    """Typing stub: emulation ``em``'s ``(True, sqrt(x))``, or ``(False, x)`` where the
    routine must give it."""


@overload(_sqrt_emulated, jit_options={"error_model": "numpy"})
def _sqrt_emulated_impl(x, em):  # type: ignore[no-untyped-def]
    arith = _arithmetic(em)
    if arith is None:
        return None
    scalar = arith[2]
    return lambda x, em: scalar(x)


@intrinsic
def _rsqrt1(typingctx, x):  # type: ignore[no-untyped-def]
    """``rsqrtss(x)``: the scalar form of :func:`_rsqrtps` (the same table)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        fn = _declare(builder.module, "llvm.x86.sse.rsqrt.ss", _V4F32, [_V4F32])
        v = builder.insert_element(ir.Constant(_V4F32, ir.Undefined), args[0],
                                   ir.Constant(_I32, 0))
        return builder.extract_element(builder.call(fn, [v]), ir.Constant(_I32, 0))

    return types.float32(x), codegen


@intrinsic
def _bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The bits of a float (a bit cast): float32 as an int32 (its sign is the float's),
    float64 as a uint64."""
    ret = {types.float32: types.int32, types.float64: types.uint64}.get(x)
    if ret is None:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], context.get_value_type(sig.return_type))

    return ret(x), codegen


@intrinsic
def _bits_as(typingctx, bits, proto):  # type: ignore[no-untyped-def]
    """The float of ``proto``'s type whose bits are the low bits of ``bits``."""
    if not (isinstance(bits, types.Integer) and proto in (types.float32, types.float64)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        elem = _F32 if sig.args[1] == types.float32 else _F64
        width = ir.IntType(32 if elem == _F32 else 64)
        v = args[0]
        if v.type.width > width.width:
            v = builder.trunc(v, width)
        elif v.type.width < width.width:
            v = builder.zext(v, width)
        return builder.bitcast(v, elem)

    return proto(bits, proto), codegen


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
def mkl_ex_dsqrt_normal(x):
    """The square root MKL's generic float64 kernel returns for ``x`` in its vector path
    (:data:`D_NORMAL_LO`..:data:`D_NORMAL_HI`).

    Read from ``mkl_vml_kernel_dSqrt_EXHAynn`` (MKL 2024.2): ``rsqrtps`` of a float32
    built from the exponent's parity and the top 23 mantissa bits, scaled by a power of
    two made from the exponent; ``e = 1 - x*r^2`` with ``x`` split in two (Dekker: the
    high 26 bits and the rest), a degree-4 polynomial in ``e``, and the result summed as
    ``x_hi*r + (x_lo*r + p*r*x)``; float64, no FMA, in this order. Compared with the
    routine on 1,090,519,040 inputs of the range (random, and with long runs of ones or
    zeros in the mantissa): no difference (the IEEE square root differs on 1.3% of
    random ones).
    """
    bits = _bits(x)
    odd = ~bits & np.uint64(1 << 52)
    m = ((bits & np.uint64(0x001FFFFFE0000000)) | (odd + np.uint64(0x07F0000000000000))
         ) >> np.uint64(29)
    y = np.float64(_rsqrt1(_bits_as(m, np.float32(0))))
    scale = (odd - (bits & np.uint64(0x7FF0000000000000)) + np.uint64(0xBFD0000000000000)
             ) >> np.uint64(1)
    r0 = _bits_as(scale, 0.0) * y
    t = r0 * r0
    x_hi = _bits_as(bits & np.uint64(0xFFFFFFFFF8000000), 0.0)
    x_lo = x - x_hi
    e = (1.0 - t * x_hi) - t * x_lo
    p = (((e * D_POLY[0] + D_POLY[1]) * e + D_POLY[2]) * e + D_POLY[3]) * e
    return x_hi * r0 + (x_lo * r0 + (p * r0) * x)


@jit(error_model="numpy", inline="always")
def _sqrt_one(x):
    """MKL's square root of one float32 whose sign bit is clear: the scalar twin of
    :func:`_emit_sqrt`, for the elements after the last whole step of ``LANES``."""
    if np.uint32(np.uint32(_bits(x)) - np.uint32(NORMAL_LO)) <= np.uint32(
            NORMAL_HI - NORMAL_LO):
        return mkl_ex_sqrt_normal(x, _rsqrt1(x))
    return np.sqrt(x)


def _sqrt_generic(x):  # type: ignore[no-untyped-def]
    """Typing stub: ``(True, MKL's square root of x)`` where the kernels emulate it (the
    scalar twin of :func:`_emit_sqrt`), ``(False, x)`` where the routine must give it."""


@overload(_sqrt_generic, jit_options={"error_model": "numpy"})
def _sqrt_generic_impl(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        def impl(x):  # type: ignore[no-untyped-def]
            if _bits(x) < 0:
                return False, x
            return True, _sqrt_one(x)
        return impl
    if x == types.float64:
        def impl(x):  # type: ignore[no-untyped-def]
            bits = _bits(x)
            if np.uint32(np.uint32(bits >> np.uint64(32)) - np.uint32(D_NORMAL_LO)) <= (
                    np.uint32(D_NORMAL_HI - D_NORMAL_LO)):
                return True, mkl_ex_dsqrt_normal(x)
            return bits == 0, x  # +0: +0, as the arithmetic above gives
        return impl
    return None


def _lanes(a):  # type: ignore[no-untyped-def]
    """Typing stub: the vector code's elements per step for ``a``'s dtype."""


@overload(_lanes, inline="always")
def _lanes_impl(a):  # type: ignore[no-untyped-def]
    n = LANES if a.dtype == types.float32 else LANES64
    return lambda a: n


@jit(error_model="numpy", inline="always")
def _sqrt_into(x, out, j, em):
    ok, s = _sqrt_emulated(x[j], em)
    if not ok:
        return 1
    out[j] = s
    return 0


@jit(error_model="numpy")
def sqrt_emulated(em, x, out, lanes):
    """``out`` = emulation ``em``'s square root of ``x`` (1-D float32 or float64), in
    steps of :data:`LANES`/:data:`LANES64` if ``lanes`` (as the kernels), else element
    by element (as their tails). Returns how many elements need the routine: those are
    left unwritten."""
    n = x.size
    step = _lanes(x)
    nv = n - n % step if lanes else 0
    left = 0
    for i in range(0, nv, step):
        if not _sqrt_lanes(x, out, i, em):
            for j in range(i, i + step):
                left += _sqrt_into(x, out, j, em)
    for j in range(nv, n):
        left += _sqrt_into(x, out, j, em)
    return left


@jit(error_model="numpy")
def _emu_elements(p, g, h, one, lo, hi, sqrt_fn, neg_clr, eps, wd, maximize, coupled, em):
    """:func:`_emu_lanes` element by element on ``[lo, hi)``, the square root of an
    accumulator the emulation does not cover from the routine (``one``: scratch of one
    element)."""
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if coupled:
            gi = fma(p[i], wd, gi)
        x = fma(gi, gi, h[i])
        h[i] = x
        ok, s = _sqrt_emulated(x, em)
        if not ok:  # e.g. a loaded state: the routine's own NaN
            _vsqrt(sqrt_fn, h[i:i + 1], one)
            s = one[0]
        p[i] = p[i] + (neg_clr * gi) / (s + eps)


@jit(error_model="numpy")
def span_emu(em, p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_span_vsqrt` with emulation ``em``'s square root, in ONE pass:
    :data:`LANES` (float32) or :data:`LANES64` (float64) elements at a time
    (:func:`_emu_lanes`), element by element after the last whole step and in any step
    with an accumulator the emulation does not cover (:func:`_emu_elements`: the
    routine then gives that element's square root). ``one``: scratch of one element.

    Single thread, float32, AMD EPYC, median of interleaved runs, MKL's generic kernels
    emulated: about the time of the IEEE loop of torch's fused formula (see
    :data:`LANES`), where the blocked version this replaced (``rsqrtps`` on a block of
    512 written back to memory, then a second loop) took 7.3, 28.4 and 462 us at 2^14,
    2^16 and 2^20 (the IEEE loop: 5.6, 22.1, 327 us).
    """
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    n = p.size
    step = _lanes(p)
    nv = n - n % step
    for i in range(0, nv, step):
        if not _emu_lanes(p, g, h, i, neg_clr, eps, wd, maximize, coupled, em):
            _emu_elements(p, g, h, one, i, i + step, sqrt_fn, neg_clr, eps, wd, maximize,
                          coupled, em)
    _emu_elements(p, g, h, one, nv, n, sqrt_fn, neg_clr, eps, wd, maximize, coupled, em)


@jit(parallel=True)
def many_emu_parallel(em, proto, paddr, gaddr, haddr, ctensor, cstart, clen, sqrt_fn,
                      neg_clr, eps, wd, flags):
    """:func:`adagrad_many_vsqrt_parallel` with :func:`span_emu`."""
    for c in prange(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        one = np.empty(1, proto.dtype)
        span_emu(em, p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags)


@jit()
def many_emu_serial(em, proto, paddr, gaddr, haddr, ctensor, cstart, clen, sqrt_fn,
                    neg_clr, eps, wd, flags):
    """Serial twin of :func:`many_emu_parallel` for small models."""
    one = np.empty(1, proto.dtype)
    for c in range(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        span_emu(em, p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags)


@jit(error_model="numpy")
def mkl_sqrt_routine(sqrt_fn, x, out):
    """``out = vmsSqrt(x)``/``vmdSqrt(x)`` through the routine's address (the reference
    side)."""
    _vsqrt(sqrt_fn, x, out)


# --- sparse gradients: torch's sparse branch on coalesced rows -----------------------------

@jit(error_model="numpy")
def _sqrt_rows(sqrt_fn, x, out, emulate, em):
    """``out = torch.sqrt(x)``'s bits: with ``emulate``, emulation ``em``'s square root
    unless an input needs the routine; otherwise the routine ``sqrt_fn`` itself."""
    if emulate and sqrt_emulated(em, x, out, True) == 0:
        return
    _vsqrt(sqrt_fn, x, out)


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
                     emulate, em):
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
    _sqrt_rows(sqrt_fn, hs[:k], ss[:k], emulate, em)
    k = 0
    for j in range(lo, hi):
        r = rows[j]
        for i in range(d):
            g = -vals[j, i] if maximize else vals[j, i]
            p[r, i] = fma(g / (ss[k + i] + eps), neg_clr, p[r, i])
        k += d


@jit()
def sparse_rows_serial(em, p, h, rows, vals, per_block, sqrt_fn, neg_clr, eps, maximize,
                       emulate):
    """:func:`sparse_rows_span` over all rows, ``per_block`` rows per square-root call
    (about :data:`BLOCK` elements, so the scratch stays in L1)."""
    d = vals.shape[1]
    hs = np.empty(per_block * d, p.dtype)
    ss = np.empty(per_block * d, p.dtype)
    for lo in range(0, rows.size, per_block):
        sparse_rows_span(p, h, rows, vals, lo, min(lo + per_block, rows.size), hs, ss,
                         sqrt_fn, neg_clr, eps, maximize, emulate, em)


@jit(parallel=True)
def sparse_rows_parallel(em, p, h, rows, vals, per_block, sqrt_fn, neg_clr, eps, maximize,
                         emulate):
    """:func:`sparse_rows_serial` on all threads (the rows are unique: no two blocks
    write the same row)."""
    d = vals.shape[1]
    nblocks = (rows.size + per_block - 1) // per_block
    for b in prange(nblocks):
        lo = b * per_block
        hs = np.empty(per_block * d, p.dtype)
        ss = np.empty(per_block * d, p.dtype)
        sparse_rows_span(p, h, rows, vals, lo, min(lo + per_block, rows.size), hs, ss,
                         sqrt_fn, neg_clr, eps, maximize, emulate, em)


class Family(NamedTuple):
    """The kernels of torch's eager formula with one emulation of MKL's square root
    (:func:`family`): the module's kernels with their ``em`` argument bound."""

    #: ``(x, out, lanes)``: :func:`sqrt_emulated`
    sqrt_emulated: Any
    #: ``(p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags)``: :func:`span_emu`
    span: Any
    #: :func:`many_emu_parallel`
    many_parallel: Any
    #: :func:`many_emu_serial`
    many_serial: Any
    #: ``(p, h, rows, vals, per_block, sqrt_fn, neg_clr, eps, maximize, emulate)``:
    #: :func:`sparse_rows_serial` (the routine's square root where ``emulate`` is False)
    sparse_serial: Any
    #: :func:`sparse_rows_parallel`
    sparse_parallel: Any


def family(tag: Any) -> Family:
    """The kernels for the emulation tag ``tag`` (see :data:`GENERIC`, :func:`register`)."""
    bind = functools.partial
    return Family(*(bind(k, tag) for k in (
        sqrt_emulated, span_emu, many_emu_parallel, many_emu_serial, sparse_rows_serial,
        sparse_rows_parallel)))


register(GENERIC, _emit_sqrt, _needs_routine, _sqrt_generic)
#: the kernels with MKL's generic square root emulated
EX = family(GENERIC)
mkl_sqrt_emulated = EX.sqrt_emulated
adagrad_span_emu = EX.span
adagrad_many_emu_parallel = EX.many_parallel
adagrad_many_emu_serial = EX.many_serial
