"""torch's eager formula with the square root of MKL's AVX-512 kernels emulated.

Where MKL runs its AVX-512 square-root kernels (``mkl_vml_kernel_sSqrt_Z0HAynn`` and
``mkl_vml_kernel_dSqrt_Z0HAynn``: Intel CPUs with AVX-512, MKL 2024.2 in torch 2.13),
``torch.sqrt`` is not the IEEE square root either (float32: 98,955 of the 2^24
mantissa/exponent-parity patterns differ by 1 ulp), and :mod:`cpu_vsqrt`'s emulation
of MKL's generic kernels does not give its bits. Read from those kernels, for an input
``x`` of their main path, every product and FMA rounded to nearest::

    float32:  r = vrsqrt14ps(x); s = r*x; h = r*0.5
              sqrt = fma(fma(-s, s, x), h, s)
    float64:  r = vrsqrt14pd(x); s = r*x; h = r*0.5; e = fma(-s, h, 0.5)
              s = fma(e, s, s); h = fma(e, h, h)
              sqrt = fma(fma(-s, s, x), h, s)

MKL takes other paths for zeros, negatives, infinities, NaN (by class) and for inputs
whose ``r`` exceeds 2^39 (float32) or 2^458 (float64), i.e. below about 2^-78 or
2^-916. The kernels here emulate ``x`` in [2^-76, the largest finite float] (float32)
and [2^-914, the largest finite double] (float64), whose ``r`` stays below those
bounds, and hand every other accumulator to the routine itself (:func:`cpu_vsqrt._vsqrt`),
as :mod:`cpu_vsqrt` does. ``vrsqrt14`` is the CPU's table, so ``fastadagrad.torch``
checks the emulation against the routine once per process (float32: every 61st of the
2^24 patterns of [1, 4) and random inputs of every exponent; the tests check them all)
and uses it only where it passed.

Why: the emulation runs in the same pass as the rest of the update, where the kernels
of :mod:`cpu_vsqrt` call the routine on blocks of 512 elements. One thread, 2-core Intel
Xeon (AVX-512), the span kernels called directly, median of 7 blocks: float32 2^16 16.1
against 27.5 us, 2^20 507 against 599 us; float64 2^16 45.5 against 75.3 us, 2^20 971
against 1,450 us; 1.2 us both at 2^10 float32 (a plain IEEE loop of torch's fused
formula: 26.4 and 485 us at float32 2^16 and 2^20: ``vrsqrt14`` and FMAs leave the
divider to the division).

The instructions need AVX-512F: :func:`available` says whether this CPU has it, and
nothing here is compiled where it does not.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from . import cpu_vsqrt as V

#: float32 bits of the inputs emulated: [2^-76, largest finite]
LO, HI = 0x19800000, 0x7F7FFFFF
#: float64 bits of the inputs emulated: [2^-914, largest finite]
D_LO, D_HI = 0x06D0000000000000, 0x7FEFFFFFFFFFFFFF


def available() -> bool:
    """Whether this CPU has the AVX-512F instructions the emulation is made of (as LLVM
    sees the host, which is what Numba compiles for)."""
    from llvmlite import binding

    return "+avx512f" in binding.get_host_cpu_features().flatten().split(",")


def _outside(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Per lane, whether ``x`` is outside the emulated range (the sign bit set, NaN and
    infinities included): one unsigned comparison of ``bits - LO``."""
    n = x.type.count
    f32 = x.type.element == V._F32
    it = ir.IntType(32 if f32 else 64)
    lo, hi = (LO, HI) if f32 else (D_LO, D_HI)
    bits = builder.bitcast(x, ir.VectorType(it, n))
    off = builder.sub(bits, V._splat(lo, bits.type))
    return builder.icmp_unsigned(">", off, V._splat(hi - lo, bits.type))


def _needs_routine(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """Whether any lane of ``x`` needs the routine."""
    return V._any(builder, _outside(builder, x))


def _rsqrt14(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """``vrsqrt14ps``/``vrsqrt14pd`` on every lane, 512 bits at a time (LLVM's
    ``llvm.x86.avx512.rsqrt14.*.512``; the loop vectoriser cannot widen a target
    intrinsic)."""
    f32 = x.type.element == V._F32
    width = 16 if f32 else 8
    part = ir.VectorType(x.type.element, width)
    mask = ir.IntType(width)
    fn = V._declare(builder.module, f"llvm.x86.avx512.rsqrt14.{'ps' if f32 else 'pd'}.512",
                    part, [part, part, mask])
    undefined, every = ir.Constant(part, ir.Undefined), ir.Constant(mask, -1)
    return V.by_parts(builder, x, width,
                      lambda v: builder.call(fn, [v, undefined, every]))


def _emit_sqrt(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    """MKL's AVX-512 square root (module docstring) of every lane of ``x`` (whose lanes
    are all in the emulated range)."""
    suffix = "f32" if x.type.element == V._F32 else "f64"
    fma = V._declare(builder.module, f"llvm.fma.v{x.type.count}{suffix}", x.type,
                     [x.type] * 3)
    half = V._splat(0.5, x.type)
    r = _rsqrt14(builder, x)
    s = builder.fmul(r, x)
    h = builder.fmul(r, half)
    if suffix == "f64":
        e = builder.call(fma, [builder.fneg(s), h, half])
        s, h = builder.call(fma, [e, s, s]), builder.call(fma, [e, h, h])
    d = builder.call(fma, [builder.fneg(s), s, x])
    return builder.call(fma, [d, h, s])


@intrinsic
def _sqrt_one(typingctx, x):  # type: ignore[no-untyped-def]
    """The emulated square root of one float (in the emulated range): the vector code
    on a vector of copies of ``x`` (the same instructions, hence the same table)."""
    if x not in (types.float32, types.float64):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        elem = V._F32 if sig.args[0] == types.float32 else V._F64
        vt = ir.VectorType(elem, 16 if elem == V._F32 else 8)
        v = V._broadcast(builder, args[0], vt)
        return builder.extract_element(_emit_sqrt(builder, v), ir.Constant(V._I32, 0))

    return x(x), codegen


def _sqrt_scalar(x):  # type: ignore[no-untyped-def]
    """Typing stub: ``(True, MKL's AVX-512 square root of x)`` in the emulated range,
    ``(False, x)`` where the routine must give it."""


@overload(_sqrt_scalar, jit_options={"error_model": "numpy"})
def _sqrt_scalar_impl(x):  # type: ignore[no-untyped-def]
    if x == types.float32:
        def impl(x):  # type: ignore[no-untyped-def]
            if np.uint32(np.uint32(V._bits(x)) - np.uint32(LO)) <= np.uint32(HI - LO):
                return True, _sqrt_one(x)
            return False, x
        return impl
    if x == types.float64:
        def impl(x):  # type: ignore[no-untyped-def]
            if np.uint64(V._bits(x) - np.uint64(D_LO)) <= np.uint64(D_HI - D_LO):
                return True, _sqrt_one(x)
            return False, x
        return impl
    return None


#: the kernels' tag of this emulation (see :data:`cpu_vsqrt.GENERIC`)
AVX512 = np.uint16(0)
V.register(AVX512, _emit_sqrt, _needs_routine, _sqrt_scalar)
#: the kernels of torch's eager formula with MKL's AVX-512 square root emulated (compiled
#: on first use, only after :func:`available`)
Z0 = V.family(AVX512)
