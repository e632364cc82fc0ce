"""CPU kernels for half-precision parameters: bfloat16/float16 ``p`` and ``g``, float32 ``h``.

Per element the kernel widens ``p`` and ``g`` to float32, runs the float32 update of
``cpu.py`` (same formula, same flags, same roundings), stores ``h`` in float32 and
writes ``p`` back rounded to its 16-bit format: 2 + 2 + 4 bytes read and 2 + 4 written,
14 bytes per element against 20 for float32. With float32 master weights ``m`` the
update starts from ``m`` instead of ``p`` (which is then not read) and writes both:
m, g and h read, m, h and p written, 20 bytes per element.

Numba's CPU target has no float16 or bfloat16 arrays (NotImplementedError), so the
kernels take the 16-bit *bits* and convert with small LLVM intrinsics. The carrier
integer type tells the two formats apart at compile time, so each format gets its own
specialisation with no runtime branch:

* ``int16`` carries bfloat16: widen is ``bits << 16``; narrow is round-to-nearest-even
  on the integer (``(u + 0x7fff + ((u >> 16) & 1)) >> 16``), NaN canonicalised to
  ``0x7fc0`` with its sign, exactly as ``ml_dtypes`` does.
* ``uint16`` carries float16: widen/narrow are LLVM ``fpext``/``fptrunc`` (IEEE,
  round-to-nearest-even: ``vcvtph2ps``/``vcvtps2ph`` on x86 with F16C), exactly as
  NumPy's ``astype(np.float16)``.

Stochastic rounding draws 32 random bits per element from a counter-based hash of
(key, element index) (:func:`rand32`), so the bits depend on the seed, the step and
the element's position only: not on threads, chunking or CPU vs GPU.

Validation and dispatch live in ``_half_dispatch.py``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from . import _hyper as H
from ._intrinsics import fma
from ._jit import jit

#: The integer dtypes the kernels see the 16-bit formats as (``arr.view(carrier)``).
BF16_CARRIER = np.dtype(np.int16)
F16_CARRIER = np.dtype(np.uint16)

#: Flag bit of the half kernels only (above every bit of ``_hyper``): stochastic rounding.
STOCHASTIC = 1 << 16

_I16, _I32, _I64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)


@intrinsic
def widen(typingctx, x):  # type: ignore[no-untyped-def]
    """16-bit pattern -> float32, exactly: int16 is bfloat16, uint16 is float16."""
    if x == types.int16:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            u = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(u, ir.FloatType())
    elif x == types.uint16:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    else:
        return None
    return types.float32(x), codegen


def _bf16_nearest(builder, f):  # type: ignore[no-untyped-def]
    """IR: float32 ``f`` -> bfloat16 bits (i16), round to nearest even, NaN -> 0x7fc0|sign."""
    u = builder.bitcast(f, _I32)
    hi = builder.lshr(u, ir.Constant(_I32, 16))
    bias = builder.add(ir.Constant(_I32, 0x7FFF), builder.and_(hi, ir.Constant(_I32, 1)))
    r = builder.trunc(builder.lshr(builder.add(u, bias), ir.Constant(_I32, 16)), _I16)
    nan = builder.or_(builder.and_(builder.trunc(hi, _I16), ir.Constant(_I16, 0x8000)),
                      ir.Constant(_I16, 0x7FC0))
    return builder.select(builder.fcmp_unordered("uno", f, f), nan, r)


@intrinsic
def narrow(typingctx, f, proto):  # type: ignore[no-untyped-def]
    """float32 -> the bits of ``proto``'s format, round to nearest even."""
    if f != types.float32 or not isinstance(proto, types.Array):
        return None
    if proto.dtype == types.int16:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return _bf16_nearest(builder, args[0])
    elif proto.dtype == types.uint16:
        def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)
    else:
        return None
    return proto.dtype(f, proto), codegen


@intrinsic
def _bf16_stochastic(typingctx, f, r):  # type: ignore[no-untyped-def]
    """float32 -> bfloat16 bits, rounding up with probability (dropped bits) / 2^16.

    Adding 16 uniform random bits to the 16 bits that are dropped carries into the kept
    part with exactly that probability. NaN and inf take the nearest path (a NaN's
    payload must not be perturbed).
    """
    if f != types.float32 or r != types.uint32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        x, rnd = args
        u = builder.bitcast(x, _I32)
        s = builder.add(u, builder.and_(rnd, ir.Constant(_I32, 0xFFFF)))
        r16 = builder.trunc(builder.lshr(s, ir.Constant(_I32, 16)), _I16)
        mag = builder.and_(u, ir.Constant(_I32, 0x7FFFFFFF))
        finite = builder.icmp_unsigned("<", mag, ir.Constant(_I32, 0x7F800000))
        return builder.select(finite, r16, _bf16_nearest(builder, x))

    return types.int16(f, r), codegen


@intrinsic
def _f32_bits(typingctx, f):  # type: ignore[no-untyped-def]
    if f != types.float32:
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], _I32)

    return types.uint32(f), codegen


@jit(inline="always")
def _f16_stochastic(x, r, proto):
    """float32 -> float16 bits, rounding up with probability (distance to the lower
    neighbour) / (gap between the neighbours).

    The neighbours come from the nearest rounding: ``lo``/``hi`` are the float16
    magnitudes around ``|x|`` (consecutive bit patterns). ``|x| - lo`` and ``hi - lo``
    are exact in float32 (``|x|`` has 24 bits, ``lo`` 11), so the probability is exact
    wherever ``x`` is a float16 normal; below 2^-14 (float16 subnormals) it is truncated
    to 24 bits, a bias of at most 2^-24 of one float16 ulp. The 24 high bits of ``r``
    give a uniform ``u`` in [0, 1). NaN, inf, exact values and magnitudes that round
    to inf keep the nearest result.
    """
    n = narrow(x, proto)  # uint16 bits, nearest
    a = abs(x)
    na = np.uint16(n & np.uint16(0x7FFF))
    xa = widen(na)
    if not (a < np.float32(65520.0)) or xa == a:  # NaN/inf, rounds to inf, or exact
        return n
    if xa > a:
        lo = np.uint16(na - np.uint16(1))
        hi = na
    else:
        lo = na
        hi = np.uint16(na + np.uint16(1))
    wl = widen(lo)
    frac = (a - wl) / (widen(hi) - wl)
    u = np.float32(r >> np.uint32(8)) * np.float32(2.0**-24)
    mag = hi if u < frac else lo
    return np.uint16(mag | (n & np.uint16(0x8000)))


def narrow_stochastic(x, r, proto):  # type: ignore[no-untyped-def]
    """float32 -> the bits of ``proto``'s format, stochastic rounding with bits ``r``."""
    raise NotImplementedError("compiled only (numba.extending.overload)")


@overload(narrow_stochastic, inline="always")
def _narrow_stochastic(x, r, proto):  # type: ignore[no-untyped-def]
    if proto.dtype == types.int16:  # one format per specialisation, chosen by type
        return lambda x, r, proto: _bf16_stochastic(x, r)
    if proto.dtype == types.uint16:
        return lambda x, r, proto: _f16_stochastic(x, r, proto)
    return None


def _mix32(builder, x):  # type: ignore[no-untyped-def]
    """IR: the 'lowbias32' integer hash (C. Wellons, 2018): a bijection of uint32."""
    c16, c15 = ir.Constant(_I32, 16), ir.Constant(_I32, 15)
    x = builder.xor(x, builder.lshr(x, c16))
    x = builder.mul(x, ir.Constant(_I32, 0x7FEB352D))
    x = builder.xor(x, builder.lshr(x, c15))
    x = builder.mul(x, ir.Constant(_I32, 0x846CA68B))
    return builder.xor(x, builder.lshr(x, c16))


@intrinsic
def rand32(typingctx, k0, k1, idx):  # type: ignore[no-untyped-def]
    """32 random bits for element ``idx`` under key ``(k0, k1)``:
    ``mix(mix(lo32(idx) ^ k0) ^ hi32(idx) ^ k1)`` with ``mix`` = lowbias32.

    Counter-based: a pure function of its arguments, cheap in SIMD (two 32-bit
    multiplies per hash). ``cuda_half.py`` and ``reference.py`` compute the same bits.
    """
    if not (k0 == types.uint32 and k1 == types.uint32 and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a0, a1, i = args
        i = builder.sext(i, _I64) if i.type.width < 64 else i
        lo = builder.trunc(i, _I32)
        hi = builder.trunc(builder.lshr(i, ir.Constant(_I64, 32)), _I32)
        x = _mix32(builder, builder.xor(lo, a0))
        return _mix32(builder, builder.xor(builder.xor(x, hi), a1))

    return types.uint32(k0, k1, idx), codegen


@intrinsic
def _rand32_lo(typingctx, k0, k1x, lo0, i):  # type: ignore[no-untyped-def]
    """:func:`rand32` of element ``lo0 + i`` of a piece whose high index word is folded
    into ``k1x = k1 ^ hi32``: ``mix(mix((lo0 + i) ^ k0) ^ k1x)``, all in 32 bits.

    The same bits as ``rand32(k0, k1, idx)`` (xor is associative), without the 64-bit
    index arithmetic in the vector loop: stochastic rounding measured 54 -> 48 us at
    2^16 bfloat16 elements, one thread.
    """
    if not (k0 == types.uint32 and k1x == types.uint32 and lo0 == types.uint32
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        a0, a1, base, idx = args
        lo = builder.add(base, builder.trunc(idx, _I32) if idx.type.width > 32 else idx)
        x = _mix32(builder, builder.xor(lo, a0))
        return _mix32(builder, builder.xor(x, a1))

    return types.uint32(k0, k1x, lo0, i), codegen


# error_model="numpy": no ZeroDivisionError check, so the loop vectorises (cpu.py).
@jit(error_model="numpy")
def adagrad_half_span(p, g, h, m, base, k0, k1, lr_num, lr_after, eps_in, eps_out, wd,
                      lr_wd, grad_scale, flags):
    """One fused AdaGrad step over 1-D spans: ``p``/``g`` 16-bit patterns, ``h`` float32.

    ``m`` is the float32 master copy of ``p`` or None (a separate compiled
    specialisation: Numba prunes the ``m is None`` branches). Per element::

        x  = m               if m is not None, else float32(p)
        (x, h) <- the float32 update of cpu.adagrad_span with float32(g)
        m  = x               if m is not None
        p  = round(x)        to nearest even, or stochastically (STOCHASTIC flag) with
                             the bits rand32(k0, k1, base + i)

    ``base`` is the index of ``p[0]`` in its tensor (the random stream is per element).
    """
    n = p.size
    s = 0
    while s < n:  # pieces within one 2^32 block of indices: the high word is constant
        b = base + s
        lo0 = np.uint32(b & 0xFFFFFFFF)
        e = min(n, s + ((1 << 32) - (b & 0xFFFFFFFF)))
        k1x = np.uint32(k1 ^ np.uint32(b >> 32))
        if m is None:
            _half_piece(p[s:e], g[s:e], h[s:e], None, lo0, k0, k1x, lr_num, lr_after,
                        eps_in, eps_out, wd, lr_wd, grad_scale, flags)
        else:
            _half_piece(p[s:e], g[s:e], h[s:e], m[s:e], lo0, k0, k1x, lr_num, lr_after,
                        eps_in, eps_out, wd, lr_wd, grad_scale, flags)
        s = e


@jit(error_model="numpy")
def _half_piece(p, g, h, m, lo0, k0, k1x, lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                grad_scale, flags):
    """The loop of :func:`adagrad_half_span` over one piece (its docstring has the math);
    element ``i`` draws ``_rand32_lo(k0, k1x, lo0, i)``."""
    scale = (flags & H.GRAD_SCALE) != 0
    maximize = (flags & H.MAXIMIZE) != 0
    coupled = (flags & H.WD_COUPLED) != 0
    decoupled = (flags & H.WD_DECOUPLED) != 0
    fma_h = (flags & H.FMA_ACCUMULATE) != 0
    fma_wd = (flags & H.FMA_WEIGHT_DECAY) != 0
    zero_h0 = (flags & H.ZERO_WHERE_H0) != 0
    stochastic = (flags & STOCHASTIC) != 0
    zero = eps_in - eps_in
    for i in range(p.size):
        gi = widen(g[i])
        if scale:
            gi = gi / grad_scale
        if maximize:
            gi = -gi
        if m is None:
            pi = widen(p[i])
        else:
            pi = m[i]
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
        x = pi - q * lr_after
        if m is not None:
            m[i] = x
        if stochastic:
            p[i] = narrow_stochastic(x, _rand32_lo(k0, k1x, lo0, i), p)
        else:
            p[i] = narrow(x, p)


@jit(parallel=True)
def adagrad_half_parallel(p, g, h, m, chunk, k0, k1, lr_num, lr_after, eps_in, eps_out,
                          wd, lr_wd, grad_scale, flags):
    """:func:`adagrad_half_span` over a whole tensor in ``chunk``-element spans on all
    threads; each span passes its offset so the random stream ignores the split."""
    n = p.size
    for c in prange((n + chunk - 1) // chunk):
        b = c * chunk
        e = min(b + chunk, n)
        if m is None:
            adagrad_half_span(p[b:e], g[b:e], h[b:e], None, b, k0, k1, lr_num, lr_after,
                              eps_in, eps_out, wd, lr_wd, grad_scale, flags)
        else:
            adagrad_half_span(p[b:e], g[b:e], h[b:e], m[b:e], b, k0, k1, lr_num,
                              lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags)


@jit(error_model="numpy")
def half_has_nonfinite(g, grad_scale, flags):
    """True if any widened ``g`` (divided by ``grad_scale`` when GRAD_SCALE) is NaN/inf.

    Read-only; an integer OR-reduction so the loop vectorises.
    """
    scale = (flags & H.GRAD_SCALE) != 0
    bad = np.int32(0)
    for i in range(g.size):
        x = widen(g[i])
        if scale:
            x = x / grad_scale
        bad |= np.int32(not math.isfinite(x))
    return bad != 0


@jit(parallel=True)
def half_has_nonfinite_parallel(g, chunk, grad_scale, flags):
    n = g.size
    bad = 0
    for c in prange((n + chunk - 1) // chunk):
        b = c * chunk
        bad += half_has_nonfinite(g[b:min(b + chunk, n)], grad_scale, flags)
    return bad != 0
