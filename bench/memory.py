"""Page-aligned arrays for the benchmarks and the standalone CPU probe (NumPy only)."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["page_aligned"]


def page_aligned(src_or_n: np.ndarray | int, dtype: Any = None) -> np.ndarray:
    """A copy of ``src_or_n`` (or ``n`` zeros of ``dtype``) whose data starts on a
    4096-byte boundary.

    The flat cases put every implementation's p, g and h at the same offsets modulo the
    page: where NumPy happens to place an array otherwise decides how often loads and
    stores of the three streams alias in the low 12 address bits, which moved the plain
    loop alone by 6-7% at 2^14-2^18 f32 (2-core AMD EPYC: all three at one offset vs
    staggered by 1 KiB), more than the 5% the kernel-vs-plain-loop target allows.
    All at one offset is also where NumPy puts large arrays (each mmap-ed, +16 bytes).
    """
    src = None if isinstance(src_or_n, int) else src_or_n
    dt = np.dtype(dtype if src is None else src.dtype)
    n = src_or_n if src is None else src.size
    buf = np.empty(n * dt.itemsize + 4096, np.uint8)
    off = (-buf.ctypes.data) % 4096
    a = buf[off:off + n * dt.itemsize].view(dt)
    if src is None:
        a[:] = 0
    else:
        a[:] = src
    return a
