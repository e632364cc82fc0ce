"""Shared fixtures: deterministic random arrays and a byte-exact comparison helper."""

from __future__ import annotations

import numpy as np
import pytest


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    a, e = actual.reshape(-1), expected.reshape(-1)
    ai = a.view(np.uint32 if a.dtype == np.float32 else np.uint64)
    ei = e.view(np.uint32 if e.dtype == np.float32 else np.uint64)
    bad = np.flatnonzero(ai != ei)
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} elements differ, first at "
                           f"{bad[0]}: {a[bad[0]]!r} != {e[bad[0]]!r}")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261125)
