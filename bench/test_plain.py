"""The plain comparator computes the same update as the library, bit for bit.

If it did not, "fastadagrad vs plain numba" in the report would compare different work.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastadagrad
from bench.plain import OPTION_SETS, plain_step
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


@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 17, 1001, (1 << 16) + 3])
@pytest.mark.parametrize("serial", [False, True])
def test_option_set_matches_fastadagrad(name: str, dtype: type, n: int,
                                        serial: bool) -> None:
    """Every option set's plain loop gives adagrad_update's bits with the same options
    (3 steps, p, g and h of mixed magnitudes, h starting at 0.1 like Keras and optax)."""
    opt = OPTION_SETS[name]
    rng = np.random.default_rng(n)
    p0 = rng.standard_normal(n).astype(dtype)
    p1, p2 = p0.copy(), p0.copy()
    h1, h2 = np.full(n, 0.1, dtype), np.full(n, 0.1, dtype)
    for _ in range(3):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 2, n)).astype(dtype)
        fastadagrad.adagrad_update(p1, g, h1, **opt.options)
        opt.step(p2, g, h2, serial=serial)
    assert_bits_equal(p2, p1, f"{name} p")
    assert_bits_equal(h2, h1, f"{name} h")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("serial", [False, True])
def test_optax_zero_where_h0(dtype: type, serial: bool) -> None:
    """optax's zero update where the accumulator is 0: h starting at 0 with zero (and,
    in float32, underflowing) gradients; the other elements take a normal step."""
    opt = OPTION_SETS["optax"]
    n = 1003
    rng = np.random.default_rng(7)
    p0 = rng.standard_normal(n).astype(dtype)
    p0[::5] = -0.0  # a -0 parameter keeps its sign only if the update is +0
    p1, p2 = p0.copy(), p0.copy()
    h1, h2 = np.zeros(n, dtype), np.zeros(n, dtype)
    tiny = np.finfo(dtype).smallest_subnormal
    for step in range(3):
        g = rng.standard_normal(n).astype(dtype)
        g[step::3] = 0.0
        g[1::7] = -tiny  # g*g underflows to 0, so h stays 0 (g/sqrt(eps) would not be 0)
        fastadagrad.adagrad_update(p1, g, h1, **opt.options)
        opt.step(p2, g, h2, serial=serial)
    zero = h1 == 0
    assert 0 < zero.sum() < n  # the zero-update branch and the normal one both ran
    assert_bits_equal(p1[zero], p0[zero])  # untouched (the -0 too) where h == 0
    assert_bits_equal(p2, p1, "optax p")
    assert_bits_equal(h2, h1, "optax h")


def test_option_sets_scalars_are_in_the_array_dtype() -> None:
    opt = OPTION_SETS["torch, all options"]
    lr, eps, wd = opt.scalars(np.float32)
    assert all(type(x) is np.float32 for x in (lr, eps, wd))
    # step 10 with lr_decay 0.01: clr = 0.01 / 1.09, rounded to float32
    assert lr == np.float32(0.01 / 1.09) and wd == np.float32(1e-4)
    assert opt.hyper().maximize and opt.hyper().rule.fma_accumulate
