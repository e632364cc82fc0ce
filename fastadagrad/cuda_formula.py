"""The per-element AdaGrad update of the CUDA kernels, written once.

The dense multi-tensor kernel (``cuda_kernels.py``), the embedding-row kernels
(``cuda_rows.py``) and the half-precision kernel (``cuda_half.py``) differ in how they
find an element (address tables, row groups, 16-bit carriers) but apply the same
formula to it, in the same order as :func:`fastadagrad.cpu.adagrad_span`. Each builds
its kernel around the two device functions of :func:`element`, compiled for the rule's
flags (the rowwise row kernel, whose accumulator is one per row, uses the first only).

Rounding: every multiply and add goes through :func:`ops`, libdevice's correctly
rounded ``*_rn`` functions, which NVVM cannot contract into an FMA; an FMA appears only
where the rule asks for one; ``/`` and ``sqrt`` are IEEE ``div.rn``/``sqrt.rn``. The
device functions are inlined at Numba IR level (``inline="always"``): the kernels' PTX
is the PTX of the formula written out inline in each kernel, instruction for
instruction (checked on 215 kernel variants when the formula was moved here).

Nothing here compiles or needs a GPU at import: device functions are built on first use
by a kernel builder, and numba-cuda is optional.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any, NamedTuple

import numpy as np

from . import _hyper as H

try:  # imported by the GPU kernel modules only, which are imported on first GPU use
    from numba import cuda
except Exception:  # pragma: no cover - numba-cuda is the optional [cuda] extra
    cuda = None


def simulator() -> bool:
    """Whether Numba's CUDA simulator stands in for the GPU (``NUMBA_ENABLE_CUDASIM=1``)."""
    return cuda is not None and bool(cuda.config.ENABLE_CUDASIM)


def ops(dtype: np.dtype) -> tuple[Any, ...]:
    """``(mul, add, div, sqrt, fma)`` each rounding once, for ``dtype``; plain operators
    under the simulator (whose libdevice functions are stubs returning None)."""
    if simulator():
        return (lambda a, b: a * b, lambda a, b: a + b, lambda a, b: a / b, math.sqrt,
                lambda a, b, c: a * b + c)
    from numba.cuda import libdevice as L

    if np.dtype(dtype) == np.float32:
        return L.fmul_rn, L.fadd_rn, L.fdiv_rn, L.fsqrt_rn, L.fmaf_rn
    return L.dmul_rn, L.dadd_rn, L.ddiv_rn, L.dsqrt_rn, L.fma_rn


class Rule(NamedTuple):
    """The rule's flag bits (:meth:`Hyper.coefficients`) as the booleans a kernel closes
    over: compile-time constants, so a kernel contains only the operations of its rule."""

    scale: bool      # GRAD_SCALE
    maximize: bool   # MAXIMIZE
    coupled: bool    # WD_COUPLED
    decoupled: bool  # WD_DECOUPLED
    fma_h: bool      # FMA_ACCUMULATE
    fma_wd: bool     # FMA_WEIGHT_DECAY
    zero_h0: bool    # ZERO_WHERE_H0


def rule(flags: int) -> Rule:
    """The :class:`Rule` of ``flags``."""
    return Rule(*((flags & bit) != 0 for bit in (
        H.GRAD_SCALE, H.MAXIMIZE, H.WD_COUPLED, H.WD_DECOUPLED, H.FMA_ACCUMULATE,
        H.FMA_WEIGHT_DECAY, H.ZERO_WHERE_H0)))


@cache
def element(dtype: Any, flags: int) -> tuple[Any, Any]:
    """``(gradient, update)``: the two device functions of one element's update for
    ``dtype`` and the rule ``flags`` (bits of :meth:`Hyper.coefficients`, compile-time
    constants: each function contains only the operations of its rule)::

        gradient(g, grad_scale) -> g'
            g' = g / grad_scale (GRAD_SCALE), then g' = -g' (MAXIMIZE)
        update(g', p, h, j, zero, lr_num, lr_after, eps_in, eps_out, wd, lr_wd) -> p'
            coupled:   g' = g' + p*wd              (fma(p, wd, g') with FMA_WEIGHT_DECAY)
            decoupled: p  = p - (p*wd)*lr_wd
            h[j] = h[j] + g'*g'                    (fma(g', g', h[j]) with FMA_ACCUMULATE)
            q  = (lr_num*g') / (sqrt(h[j] + eps_in) + eps_out)
            q  = zero where h[j] == zero           (ZERO_WHERE_H0)
            p' = p - q*lr_after

    A kernel calls ``update(gradient(g, grad_scale), p, h, j, ...)``: it reads the
    parameter after scaling the gradient, and ``update`` itself reads and writes
    ``h[j]`` before it computes ``p'``, which the kernel stores: the order of the
    formula written out in each kernel, so NVVM emits the same PTX (instruction for
    instruction; it schedules loads differently when the order of loads and stores
    changes). ``zero`` is ``eps_in - eps_in``, computed by the kernel once, up front.

    ``a - b`` is written ``add(a, -b)``: negation is exact and IEEE defines subtraction
    that way, so the bits are those of the CPU's ``a - b``.
    """
    scale, maximize = rule(flags)[:2]
    div = ops(np.dtype(dtype))[2]
    accumulate, quotient, step = parts(dtype, flags)

    @cuda.jit(device=True, inline="always")
    def gradient(gi, grad_scale):
        if scale:
            gi = div(gi, grad_scale)
        if maximize:
            gi = -gi
        return gi

    @cuda.jit(device=True, inline="always")
    def update(gi, pi, h, j, zero, lr_num, lr_after, eps_in, eps_out, wd, lr_wd):
        gi, pi, hi = accumulate(gi, pi, h, j, wd, lr_wd)
        q = quotient(gi, hi, zero, lr_num, eps_in, eps_out)
        h[j] = hi
        return step(pi, q, lr_after)

    return gradient, update


@cache
def parts(dtype: Any, flags: int) -> tuple[Any, Any, Any]:
    """``(accumulate, quotient, step)``: :func:`element`'s ``update`` in three device
    functions, for kernels that store every accumulator of a pass before they compute
    the parameters (``cuda_kernels.GRID_STRIDE`` and ``UNROLL_CHUNKS``)::

        accumulate(g', p, h, j, wd, lr_wd) -> (g', p, h')   weight decay; h' from h[j]
        quotient(g', h', zero, lr_num, eps_in, eps_out) -> q
        step(p, q, lr_after) -> p'

    ``update`` is exactly these three in this order, with ``h[j] = h'`` between the
    last two.
    """
    mul, add, div, sqrt, fma = ops(np.dtype(dtype))
    _, _, coupled, decoupled, fma_h, fma_wd, zero_h0 = rule(flags)

    @cuda.jit(device=True, inline="always")
    def accumulate(gi, pi, h, j, wd, lr_wd):
        if coupled:
            if fma_wd:
                gi = fma(pi, wd, gi)
            else:
                gi = add(gi, mul(pi, wd))
        elif decoupled:
            pi = add(pi, -mul(mul(pi, wd), lr_wd))
        if fma_h:
            hi = fma(gi, gi, h[j])
        else:
            hi = add(h[j], mul(gi, gi))
        return gi, pi, hi

    @cuda.jit(device=True, inline="always")
    def quotient(gi, hi, zero, lr_num, eps_in, eps_out):
        q = div(mul(lr_num, gi), add(sqrt(add(hi, eps_in)), eps_out))
        if zero_h0 and hi == zero:
            q = zero
        return q

    @cuda.jit(device=True, inline="always")
    def step(pi, q, lr_after):
        return add(pi, -mul(q, lr_after))

    return accumulate, quotient, step
