"""Testing helpers for fastadagrad's own tests and for users who check its results."""

from __future__ import annotations

import numpy as np


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Assert bit-for-bit equality (NaN payloads and signed zeros included).

    Raises AssertionError naming how many elements differ and the first of them.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    a, e = np.ascontiguousarray(actual).reshape(-1), np.ascontiguousarray(expected).reshape(-1)
    view = {2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]
    bad = np.flatnonzero(a.view(view) != e.view(view))
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} elements differ, first at "
                           f"{bad[0]}: {a[bad[0]]!r} != {e[bad[0]]!r}")
