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
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


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
