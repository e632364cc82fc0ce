"""The plain fused loop: the AdaGrad update as anyone would first write it in Numba.

``plain_parallel`` is one ``for i in prange(n)`` over the elements and ``plain_serial``
one ``for i in range(n)``, both with ``error_model='numpy'`` (so the loops vectorise)
and the NumPy class's formula with its roundings::

    h = h + g*g
    p = p - (lr*g) / (sqrt(h) + eps)

(``lr`` and ``eps`` rounded to the array dtype first, as NumPy does), so they give the
same bits as ``fastadagrad.adagrad_update`` with its defaults. No validation, no
options, no blocking, prefetch or chunk tuning: it is the comparator that says whether
the library's kernels earn their complexity. The benchmark suite times it as
"plain numba" next to the roofline kernel (``bench/roofline.py``); if fastadagrad is
slower than this on some machine, the library's tuning has backfired there.

``OPTION_SETS`` holds the same kind of loops for other formulas (torch with every
option, Keras with weight decay, optax, loss scaling): each with the ``adagrad_update``
options that give the same bits, so the kernel of every flag set has its comparator
(``bench/cpu_probe.py``'s "options" section).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from fastadagrad._hyper import Hyper
from fastadagrad._intrinsics import fma  # llvm.fma: a primitive, not the library's loop
from fastadagrad.presets import PRESETS


@njit(parallel=True, error_model="numpy", cache=True)
def plain_parallel(p: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float,
                   eps: float) -> None:
    """One fused AdaGrad step over 1-D ``p``, ``g``, ``h`` on all Numba threads."""
    for i in prange(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - (lr * gi) / (math.sqrt(hi) + eps)


@njit(error_model="numpy", cache=True)
def plain_serial(p: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float,
                 eps: float) -> None:
    """:func:`plain_parallel` on one thread."""
    for i in range(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - (lr * gi) / (math.sqrt(hi) + eps)


def plain_step(p: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float, eps: float,
               serial: bool = False) -> None:
    """Call the plain kernel with ``lr``/``eps`` cast to the arrays' dtype."""
    t = p.dtype.type
    (plain_serial if serial else plain_parallel)(p, g, h, t(lr), t(eps))


# --- the other option sets -------------------------------------------------------------
#
# The same plain loops for the formulas the presets and options select, each written
# the way ``fastadagrad.reference.reference_step`` writes it, operation for operation
# (so the bits are those of ``adagrad_update`` with the same options). One element
# function per option set, inlined into a serial and a parallel driver of two lines
# each: nothing but the formula inside ``for i in (p)range(n)``. The drivers are plain
# module-level functions (a factory building them around the element function would
# close over a dispatcher, which Numba's cache cannot key: every process recompiled).
# Every scalar arrives already rounded to the array dtype (see ``OptionSet.scalars``).


@njit(inline="always", error_model="numpy")
def _torch_all(p, g, h, i, lr, eps, wd):  # type: ignore[no-untyped-def]
    """torch's fused CPU Adagrad with maximize and weight decay: ``g = -g``,
    ``g = fma(p, wd, g)``, ``h = fma(g, g, h)``, ``p = p - (lr*g) / (sqrt(h) + eps)``."""
    gi = -g[i]
    pi = p[i]
    gi = fma(pi, wd, gi)
    hi = fma(gi, gi, h[i])
    h[i] = hi
    p[i] = pi - (lr * gi) / (math.sqrt(hi) + eps)


@njit(parallel=True, error_model="numpy", cache=True)
def torch_all_parallel(p, g, h, lr, eps, wd):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        _torch_all(p, g, h, i, lr, eps, wd)


@njit(error_model="numpy", cache=True)
def torch_all_serial(p, g, h, lr, eps, wd):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        _torch_all(p, g, h, i, lr, eps, wd)


@njit(inline="always", error_model="numpy")
def _keras_wd(p, g, h, i, lr, eps, wd):  # type: ignore[no-untyped-def]
    """Keras 3 with decoupled weight decay: ``p = p - (p*wd)*lr``, ``h = h + g*g``,
    ``p = p - (lr*g) / sqrt(h + eps)``."""
    gi = g[i]
    pi = p[i]
    pi = pi - (pi * wd) * lr
    hi = h[i] + gi * gi
    h[i] = hi
    p[i] = pi - (lr * gi) / math.sqrt(hi + eps)


@njit(parallel=True, error_model="numpy", cache=True)
def keras_wd_parallel(p, g, h, lr, eps, wd):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        _keras_wd(p, g, h, i, lr, eps, wd)


@njit(error_model="numpy", cache=True)
def keras_wd_serial(p, g, h, lr, eps, wd):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        _keras_wd(p, g, h, i, lr, eps, wd)


@njit(inline="always", error_model="numpy")
def _optax(p, g, h, i, lr, eps):  # type: ignore[no-untyped-def]
    """optax's adagrad: ``h = fma(g, g, h)``, ``u = g / sqrt(h + eps)`` (0 where
    ``h == 0``), ``p = p - u*lr``."""
    gi = g[i]
    hi = fma(gi, gi, h[i])
    u = gi / math.sqrt(hi + eps)
    if hi == 0:
        u = hi  # +0 in the array dtype (h is never -0); a literal 0.0 would make u float64
    h[i] = hi
    p[i] = p[i] - u * lr


@njit(parallel=True, error_model="numpy", cache=True)
def optax_parallel(p, g, h, lr, eps):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        _optax(p, g, h, i, lr, eps)


@njit(error_model="numpy", cache=True)
def optax_serial(p, g, h, lr, eps):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        _optax(p, g, h, i, lr, eps)


@njit(inline="always", error_model="numpy")
def _grad_scale(p, g, h, i, lr, eps, scale):  # type: ignore[no-untyped-def]
    """The NumPy class's formula on an unscaled gradient: ``g = g / scale`` first."""
    gi = g[i] / scale
    hi = h[i] + gi * gi
    h[i] = hi
    p[i] = p[i] - (lr * gi) / (math.sqrt(hi) + eps)


@njit(parallel=True, error_model="numpy", cache=True)
def grad_scale_parallel(p, g, h, lr, eps, scale):  # type: ignore[no-untyped-def]
    for i in prange(p.size):
        _grad_scale(p, g, h, i, lr, eps, scale)


@njit(error_model="numpy", cache=True)
def grad_scale_serial(p, g, h, lr, eps, scale):  # type: ignore[no-untyped-def]
    for i in range(p.size):
        _grad_scale(p, g, h, i, lr, eps, scale)


@dataclass(frozen=True)
class OptionSet:
    """One formula variant: the ``adagrad_update`` options that select it and its plain
    loops.

    ``options`` are the keyword arguments of ``fastadagrad.adagrad_update`` (``step``
    included); ``names`` says which scalars the loops take after ``p, g, h``, in order,
    out of ``lr`` (the step's learning rate), ``eps``, ``wd`` and ``scale``.
    """

    name: str
    options: dict[str, Any]
    parallel: Any
    serial: Any
    names: tuple[str, ...]

    def hyper(self) -> Hyper:
        return Hyper.make(**{k: v for k, v in self.options.items() if k != "step"})

    def scalars(self, dtype: Any) -> tuple[Any, ...]:
        """The loops' scalars, rounded to ``dtype`` (as NumPy rounds ``lr`` and ``eps``)."""
        t = np.dtype(dtype).type
        hy = self.hyper()
        value = {"lr": hy.clr(self.options.get("step", 1)), "eps": hy.eps,
                 "wd": hy.weight_decay, "scale": hy.grad_scale}
        return tuple(t(value[k]) for k in self.names)

    def step(self, p: np.ndarray, g: np.ndarray, h: np.ndarray,
             serial: bool = False) -> None:
        """One plain step with this set's options on 1-D ``p``, ``g``, ``h``."""
        (self.serial if serial else self.parallel)(p, g, h, *self.scalars(p.dtype))


def _preset(name: str) -> Any:
    return PRESETS[name].rule


#: Option sets with a plain comparator, by name (bench/cpu_probe.py's "options"
#: section, bench/test_bench_flat.py's options group).
OPTION_SETS: dict[str, OptionSet] = {o.name: o for o in (
    OptionSet("torch, all options",
              dict(rule=_preset("torch"), lr=0.01, eps=1e-10, weight_decay=1e-4,
                   maximize=True, lr_decay=0.01, step=10),
              torch_all_parallel, torch_all_serial, ("lr", "eps", "wd")),
    OptionSet("keras, weight decay",
              dict(rule=_preset("keras"), lr=0.001, eps=1e-7, weight_decay=1e-4),
              keras_wd_parallel, keras_wd_serial, ("lr", "eps", "wd")),
    OptionSet("optax", dict(rule=_preset("optax"), lr=0.01, eps=1e-7),
              optax_parallel, optax_serial, ("lr", "eps")),
    OptionSet("grad_scale", dict(lr=0.01, eps=1e-7, grad_scale=1024.0),
              grad_scale_parallel, grad_scale_serial, ("lr", "eps", "scale")),
)}
