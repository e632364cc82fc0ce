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
``rsqrtps`` instruction, and whose scalar path (inputs outside its normal range) is
the IEEE square root for every input with a clear sign bit. Exhaustively equal on all
2^24 mantissa/exponent-parity patterns and on every sign-clear input outside the normal
range; ``fastadagrad.torch`` re-checks both against the routine once per process and
uses the calling kernels where they differ (another CPU, another MKL). Why: the
routine costs 0.3 ns per element at any length plus ~95 ns per call (measured
through this module, 2^16 float32, one thread: 20 us in one call, 32 us in blocks of
512, where the IEEE ``vsqrtps`` loop takes 12 us), which made torch's eager formula
2x slower than the fused one over the same memory traffic. The emulation runs in the
same pass as the rest of the update, ``LANES`` elements at a time
(:func:`adagrad_span_emu`).

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

#: Inputs whose bits lie in [NORMAL_LO, NORMAL_HI] take MKL's vector path (the
#: comparison MKL makes: ``bits + 0x7f800000 > 0xfefff000`` as signed int32 is the
#: complement); the others, its scalar path. That path returns the IEEE square root of
#: every input whose sign bit is clear (zero, subnormals, the largest floats, inf, NaN:
#: all 16,781,311 such bit patterns compared, MKL 2024.2 on an AMD EPYC) and, for a
#: negative input, a NaN of its own (+NaN where the IEEE square root gives -NaN), which
#: the kernels take from the routine itself.
NORMAL_LO, NORMAL_HI = 0x00800000, 0x7F7FF000

#: float32 elements per step of the vector code: four AVX-512 registers (eight AVX
#: ones), whose independent operations LLVM interleaves. One thread, AMD EPYC, median of
#: interleaved runs, 64 lanes against 16: 2^14 float32 5.65 vs 6.12 us, 2^16 21.9 vs
#: 28.0 us, 2^20 319-340 vs 348 us (the IEEE loop of torch's fused formula: 5.59, 22.9,
#: 305-409 us); 128 lanes were no faster (6.05, 24.3, 390 us), 8 lanes slower than 16.
LANES = 64

_VF = ir.VectorType(ir.FloatType(), LANES)
_VI = ir.VectorType(_I32, LANES)


def _declare(module: ir.Module, name: str, ret: ir.Type, args: list[ir.Type]
             ) -> ir.Function:
    fn = module.globals.get(name)
    if fn is None:
        fn = ir.Function(module, ir.FunctionType(ret, args), name)
    return fn


def _splat(value: int | float, ty: ir.VectorType) -> ir.Constant:
    return ir.Constant(ty, [value] * LANES)


def _broadcast(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), x, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v, v, _splat(0, _VI))


def _any(builder: ir.IRBuilder, mask: ir.Value) -> ir.Value:
    """Whether any lane of an i1 vector is set."""
    ty = ir.IntType(LANES)
    return builder.icmp_unsigned("!=", builder.bitcast(mask, ty), ir.Constant(ty, 0))


def _any_negative(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Whether any lane has its sign bit set (MKL's NaN for it is the routine's own)."""
    bits = builder.bitcast(x, _VI)
    return _any(builder, builder.icmp_signed("<", bits, _splat(0, _VI)))


def _rsqrtps(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """``rsqrtps`` on every lane: the x86 approximate reciprocal square root (12 bits;
    its bits are the CPU's table, which is why the emulation is re-checked on each
    machine), called on each 4-lane quarter (``llvm.x86.sse.rsqrt.ps``; the loop
    vectoriser cannot widen a target intrinsic, LLVM merges the quarters into the widest
    ``vrsqrtps`` the CPU has, which reads the same table)."""
    fn = _declare(builder.module, "llvm.x86.sse.rsqrt.ps", _V4F32, [_V4F32])
    quarter = ir.VectorType(_I32, 4)
    parts = [builder.call(fn, [builder.shuffle_vector(
        x, x, ir.Constant(quarter, list(range(k, k + 4))))]) for k in range(0, LANES, 4)]
    while len(parts) > 1:
        width = 2 * parts[0].type.count
        order = ir.Constant(ir.VectorType(_I32, width), list(range(width)))
        parts = [builder.shuffle_vector(a, b, order) for a, b in zip(parts[::2], parts[1::2])]
    return parts[0]


def _emit_sqrt(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """MKL's square root of every lane of ``x`` (whose sign bits are all clear): the
    arithmetic of :func:`mkl_ex_sqrt_normal` where a lane is in the normal range, the
    IEEE square root where it is not (computed only when a lane needs it)."""
    mul, add, sub = builder.fmul, builder.fadd, builder.fsub
    half = _splat(0.5, _VF)
    y = _rsqrtps(builder, x)
    s0 = mul(x, y)
    hy = mul(y, half)
    e = sub(half, mul(s0, hy))
    s1 = add(mul(s0, e), s0)
    hy1 = add(mul(e, hy), hy)
    r = sub(x, mul(s1, s1))
    s = add(mul(r, hy1), s1)
    off = builder.sub(builder.bitcast(x, _VI), _splat(NORMAL_LO, _VI))
    outside = builder.icmp_unsigned(">", off, _splat(NORMAL_HI - NORMAL_LO, _VI))
    before = builder.block
    with builder.if_then(_any(builder, outside), likely=False):
        ieee = builder.call(_declare(builder.module, f"llvm.sqrt.v{LANES}f32", _VF, [_VF]),
                            [x])
        mixed = builder.select(outside, ieee, s)
        after = builder.block
    out = builder.phi(_VF)
    out.add_incoming(s, before)
    out.add_incoming(mixed, after)
    return out


def _lane_pointer(context, builder, ty, array, i):  # type: ignore[no-untyped-def]
    data = context.make_array(ty)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [i]), _VF.as_pointer())


def _f32_array(t: types.Type) -> bool:
    return isinstance(t, types.Array) and t.dtype == types.float32


@intrinsic
def _sqrt_lanes(typingctx, x, out, i):  # type: ignore[no-untyped-def]
    """``out[i:i+LANES]`` = MKL's square root of ``x[i:i+LANES]``; False, with nothing
    written, when a lane has its sign bit set."""
    if not (_f32_array(x) and _f32_array(out) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        xv = builder.load(_lane_pointer(context, builder, sig.args[0], args[0], args[2]),
                          align=4)
        done = builder.not_(_any_negative(builder, xv))
        with builder.if_then(done, likely=True):
            builder.store(_emit_sqrt(builder, xv),
                          _lane_pointer(context, builder, sig.args[1], args[1], args[2]),
                          align=4)
        return done

    return types.boolean(x, out, i), codegen


@intrinsic
def _emu_lanes(typingctx, p, g, h, i, neg_clr, eps, wd, maximize, coupled
               ):  # type: ignore[no-untyped-def]
    """One step of torch's eager formula (module docstring) on ``[i, i+LANES)`` of the
    float32 spans, with MKL's square root emulated (:func:`_emit_sqrt`); False, with
    nothing written, when a new accumulator has its sign bit set."""
    if not (_f32_array(p) and _f32_array(g) and _f32_array(h) and isinstance(i, types.Integer)
            and neg_clr == eps == wd == types.float32
            and maximize == coupled == types.boolean):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        pp, gp, hp = (_lane_pointer(context, builder, sig.args[k], args[k], args[3])
                      for k in range(3))
        neg_clr, eps, wd, maximize, coupled = args[4:]
        fma_v = _declare(builder.module, f"llvm.fma.v{LANES}f32", _VF, [_VF, _VF, _VF])
        pv, gv, hv = (builder.load(x, align=4) for x in (pp, gp, hp))
        # -g as Numba negates (0.0 - g with a negative zero), then the coupled decay
        gv = builder.select(maximize, builder.fsub(_splat(-0.0, _VF), gv), gv)
        gv = builder.select(coupled, builder.call(fma_v, [pv, _broadcast(builder, wd), gv]),
                            gv)
        hv = builder.call(fma_v, [gv, gv, hv])
        done = builder.not_(_any_negative(builder, hv))
        with builder.if_then(done, likely=True):
            std = builder.fadd(_emit_sqrt(builder, hv), _broadcast(builder, eps))
            step = builder.fdiv(builder.fmul(_broadcast(builder, neg_clr), gv), std)
            builder.store(hv, hp, align=4)
            builder.store(builder.fadd(pv, step), pp, align=4)
        return done

    return types.boolean(p, g, h, i, neg_clr, eps, wd, maximize, coupled), codegen


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
def _f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """The bits of a float32 as an int32 (a bit cast)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _I32)

    return types.int32(x), codegen


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
def _sqrt_one(x):
    """MKL's square root of one float32 whose sign bit is clear: the scalar twin of
    :func:`_emit_sqrt`, for the elements after the last whole step of ``LANES``."""
    if np.uint32(np.uint32(_f32_bits(x)) - np.uint32(NORMAL_LO)) <= np.uint32(
            NORMAL_HI - NORMAL_LO):
        return mkl_ex_sqrt_normal(x, _rsqrt1(x))
    return np.sqrt(x)


@jit(error_model="numpy")
def mkl_sqrt_emulated(x, out, lanes):
    """``out`` = MKL's square root of ``x`` (1-D float32), in steps of ``LANES`` if
    ``lanes`` (as the kernels), else element by element (as their tails). Returns how
    many elements had their sign bit set: those are left unwritten."""
    n = x.size
    nv = n - n % LANES if lanes else 0
    left = 0
    for i in range(0, nv, LANES):
        if not _sqrt_lanes(x, out, i):
            for j in range(i, i + LANES):
                left += _sqrt_into(x, out, j)
    for j in range(nv, n):
        left += _sqrt_into(x, out, j)
    return left


@jit(error_model="numpy", inline="always")
def _sqrt_into(x, out, j):
    if _f32_bits(x[j]) < 0:
        return 1
    out[j] = _sqrt_one(x[j])
    return 0


@jit(error_model="numpy")
def mkl_sqrt_routine(sqrt_fn, x, out):
    """``out = vmsSqrt(x)`` through the routine's address (the reference side)."""
    _vsqrt(sqrt_fn, x, out)


@jit(error_model="numpy")
def _emu_elements(p, g, h, one, lo, hi, sqrt_fn, neg_clr, eps, wd, maximize, coupled):
    """:func:`_emu_lanes` element by element on ``[lo, hi)``, a negative accumulator's
    square root from the routine (``one``: scratch of one element)."""
    for i in range(lo, hi):
        gi = -g[i] if maximize else g[i]
        if coupled:
            gi = fma(p[i], wd, gi)
        x = fma(gi, gi, h[i])
        h[i] = x
        if _f32_bits(x) >= 0:
            s = _sqrt_one(x)
        else:  # e.g. a loaded state: the routine's own NaN
            _vsqrt(sqrt_fn, h[i:i + 1], one)
            s = one[0]
        p[i] = p[i] + (neg_clr * gi) / (s + eps)


@jit(error_model="numpy")
def adagrad_span_emu(p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_span_vsqrt` on float32 spans with MKL's square root emulated, in
    ONE pass: ``LANES`` elements at a time (:func:`_emu_lanes`), the elements after the
    last whole step and any step whose new accumulators hold a negative number
    (:func:`_emu_elements`: the routine then gives that element's NaN). ``one``:
    scratch of one element.

    Single thread, float32, AMD EPYC, median of interleaved runs: about the time of the
    IEEE loop of torch's fused formula (see :data:`LANES`), where the blocked version
    this replaced (``rsqrtps`` on a block of 512 written back to memory, then a second
    loop) took 7.3, 28.4 and 462 us at 2^14, 2^16 and 2^20 (the IEEE loop: 5.6, 22.1,
    327 us).
    """
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    n = p.size
    nv = n - n % LANES
    for i in range(0, nv, LANES):
        if not _emu_lanes(p, g, h, i, neg_clr, eps, wd, maximize, coupled):
            _emu_elements(p, g, h, one, i, i + LANES, sqrt_fn, neg_clr, eps, wd,
                          maximize, coupled)
    _emu_elements(p, g, h, one, nv, n, sqrt_fn, neg_clr, eps, wd, maximize, coupled)


@jit(parallel=True)
def adagrad_many_emu_parallel(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                              sqrt_fn, neg_clr, eps, wd, flags):
    """:func:`adagrad_many_vsqrt_parallel` with :func:`adagrad_span_emu` (float32)."""
    for c in prange(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        one = np.empty(1, proto.dtype)
        adagrad_span_emu(p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags)


@jit()
def adagrad_many_emu_serial(proto, paddr, gaddr, haddr, ctensor, cstart, clen,
                            sqrt_fn, neg_clr, eps, wd, flags):
    """Serial twin of :func:`adagrad_many_emu_parallel` for small models."""
    one = np.empty(1, proto.dtype)
    for c in range(ctensor.size):
        p, g, h = chunk_views(proto, paddr, gaddr, haddr, ctensor, cstart, clen, c)
        adagrad_span_emu(p, g, h, one, sqrt_fn, neg_clr, eps, wd, flags)


# --- sparse gradients: torch's sparse branch on coalesced rows -----------------------------

def _sqrt_rows(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
    """Typing stub: ``out = torch.sqrt(x)`` bits (see :func:`_sqrt_rows_impl`)."""


@overload(_sqrt_rows, jit_options={"error_model": "numpy"})
def _sqrt_rows_impl(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
    """float32 with ``emulate``: MKL's square root emulated (:func:`mkl_sqrt_emulated`)
    unless an input is negative; otherwise (and for float64) the routine ``sqrt_fn``."""
    if x.dtype == types.float32:
        def impl(sqrt_fn, x, out, emulate):  # type: ignore[no-untyped-def]
            if emulate and mkl_sqrt_emulated(x, out, True) == 0:
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
