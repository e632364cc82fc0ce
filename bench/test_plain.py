"""The plain comparator computes the same update as the library, bit for bit.

If it did not, "fastadagrad vs plain numba" in the report would compare different work.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadagrad
from bench.plain import plain_step
from fastadagrad.testing import assert_bits_equal


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 17, 1000, (1 << 16) + 3])
@pytest.mark.parametrize("serial", [False, True])
def test_plain_matches_fastadagrad(dtype: type, n: int, serial: bool) -> None:
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(dtype)
    p1, p2 = p0.copy(), p0.copy()
    h1, h2 = np.zeros(n, dtype), np.zeros(n, dtype)
    for _ in range(3):
        g = (rng.standard_normal(n) * 0.1).astype(dtype)
        fastadagrad.adagrad_update(p1, g, h1, lr=0.01, eps=1e-7)
        plain_step(p2, g, h2, 0.01, 1e-7, serial=serial)
    assert_bits_equal(p2, p1)
    assert_bits_equal(h2, h1)
