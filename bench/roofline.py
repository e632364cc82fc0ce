"""The memory-bandwidth limit for the AdaGrad update, as a kernel.

``roofline`` makes exactly the memory traffic of the fused update — reads ``p``, ``g``,
``h`` once and writes ``p``, ``h`` once per element (20 B per float32 element, 40 B
per float64) — with trivial math (two adds), so the time it takes is what moving
those bytes costs on this machine. A fused AdaGrad kernel cannot be faster than this
at sizes that do not fit in cache; the benchmark report quotes every implementation as
a multiple of it.

It is compiled the same way as the library's parallel kernel (``parallel=True``, omp,
``error_model='numpy'`` so the loop vectorises, on-disk cache) but has no chunking
and no serial fallback: one ``prange`` over the elements, split statically across the
threads.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange


@njit(parallel=True, error_model="numpy", cache=True)
def roofline(p: np.ndarray, g: np.ndarray, h: np.ndarray) -> None:
    """``h += g; p -= g``: the fused update's loads and stores, none of its math."""
    for i in prange(p.size):
        gi = g[i]
        h[i] = h[i] + gi
        p[i] = p[i] - gi


# What bounds the update where the arrays fit in a cache: the plain fused loop
# (``bench/plain.py``) with its square root or its division taken out (the probe's
# "bound" section times them against it and against ``roofline``). Not AdaGrad: the
# results are wrong on purpose, only the instruction mix matters.


@njit(parallel=True, error_model="numpy", cache=True)
def without_sqrt(p: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float,
                 eps: float) -> None:
    """The plain fused loop with ``h`` in place of ``sqrt(h)``."""
    for i in prange(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - (lr * gi) / (hi + eps)


@njit(parallel=True, error_model="numpy", cache=True)
def without_division(p: np.ndarray, g: np.ndarray, h: np.ndarray, lr: float,
                     eps: float) -> None:
    """The plain fused loop with a multiplication in place of the division."""
    for i in prange(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - (lr * gi) * (math.sqrt(hi) + eps)
