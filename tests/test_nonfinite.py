"""Non-finite gradients and loss scaling (issue 6, items 2 and 3), CPU.

``nonfinite="skip"`` leaves params and state bit-unchanged and reports the skip (return
value False, ``skipped_steps`` + 1, ``step`` unchanged); ``"raise"`` raises
FloatingPointError naming the first offending gradient and changes nothing;
``"ignore"`` propagates NaN/inf exactly like the NumPy reference. Checked on the
one-array path, on the many-array path (the bad tensor in the middle, serial and
parallel pre-pass) and on the flat-buffer path, with and without ``grad_scale``
(a finite gradient whose ``g / grad_scale`` overflows counts as non-finite).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fastadagrad import AdaGrad, FlatBuffer, adagrad_update, config
from fastadagrad._hyper import Hyper
from fastadagrad.reference import reference_step
from fastadagrad.testing import assert_bits_equal

LR = 0.05
BAD = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}


def _model(rng: np.random.Generator, sizes: list[int], dtype: Any = np.float32
           ) -> dict[str, np.ndarray]:
    return {f"t{i}": rng.standard_normal(n).astype(dtype) for i, n in enumerate(sizes)}


def _grads(rng: np.random.Generator, params: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
    return {k: rng.standard_normal(p.shape).astype(p.dtype) for k, p in params.items()}


def _copy(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in d.items()}


def _reference(params: dict[str, np.ndarray], grad_steps: list[dict[str, np.ndarray]],
               hyper: Hyper) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Params and state after ``grad_steps``, starting from zero state."""
    p = _copy(params)
    h = {k: np.zeros_like(v) for k, v in p.items()}
    for step, grads in enumerate(grad_steps, 1):
        for k in p:
            reference_step(p[k], grads[k], h[k], hyper, step)
    return p, h


# Sizes: "serial" stays below the parallel threshold, "parallel" crosses it in total
# (several chunks, the bad tensor's chunk not the first one).
SIZES = {
    "serial": [100, 37, 1000, 5, 64],
    "parallel": [config.CHUNK + 3, 2 * config.CHUNK + 1, config.CHUNK, 17,
                 config.PARALLEL_THRESHOLD],
}


@pytest.mark.parametrize("value", list(BAD))
@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("path", list(SIZES))
def test_skip_many_leaves_everything_unchanged(rng: np.random.Generator, path: str,
                                               where: str, value: str) -> None:
    params = _model(rng, SIZES[path])
    p0 = _copy(params)
    opt = AdaGrad(lr=LR, nonfinite="skip")
    g1 = _grads(rng, params)
    assert opt.update(params, g1) is True
    after1, h1 = _copy(params), _copy(opt.h)

    bad = _grads(rng, params)
    bad["t2"][0 if where == "first" else -1] = BAD[value]  # the middle tensor
    bad_copy = _copy(bad)
    assert opt.update(params, bad) is False
    assert (opt.step, opt.skipped_steps) == (1, 1)
    for k in params:
        assert_bits_equal(params[k], after1[k], f"params[{k}] after skip")
        assert_bits_equal(opt.h[k], h1[k], f"h[{k}] after skip")
        assert_bits_equal(bad[k], bad_copy[k], f"grads[{k}] after skip")

    # training goes on as if the bad step never happened
    g3 = _grads(rng, params)
    assert opt.update(params, g3) is True
    assert (opt.step, opt.skipped_steps) == (2, 1)
    ref_p, ref_h = _reference(p0, [g1, g3], Hyper.make(lr=LR))
    for k in params:
        assert_bits_equal(params[k], ref_p[k], k)
        assert_bits_equal(opt.h[k], ref_h[k], k)


@pytest.mark.parametrize("path", list(SIZES))
def test_raise_many_names_first_offending_tensor(rng: np.random.Generator,
                                                 path: str) -> None:
    params = _model(rng, SIZES[path])
    opt = AdaGrad(lr=LR, nonfinite="raise")
    opt.update(params, _grads(rng, params))
    before, h_before = _copy(params), _copy(opt.h)
    bad = _grads(rng, params)
    bad["t2"][-1] = np.inf
    bad["t4"][0] = np.nan  # a later one too: the message names t2
    with pytest.raises(FloatingPointError, match=r"grads\['t2'\] contains NaN or inf"):
        opt.update(params, bad)
    assert (opt.step, opt.skipped_steps) == (1, 0)
    for k in params:
        assert_bits_equal(params[k], before[k], k)
        assert_bits_equal(opt.h[k], h_before[k], k)


def test_raise_names_first_tensor_across_dtypes(rng: np.random.Generator) -> None:
    """float64 and float32 tensors run as two groups; the message still follows key order."""
    params = {"a64": rng.standard_normal(10), "b32": rng.standard_normal(10).astype(np.float32),
              "c32": rng.standard_normal(10).astype(np.float32)}
    before = _copy(params)
    grads = _grads(rng, params)
    grads["a64"][3] = np.nan
    grads["c32"][3] = np.nan
    opt = AdaGrad(lr=LR, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"grads\['a64'\]"):
        opt.update(params, grads)
    assert opt.h is None and opt.step == 0
    for k in params:
        assert_bits_equal(params[k], before[k], k)


def test_skip_and_raise_on_first_call_commit_no_progress(rng: np.random.Generator) -> None:
    params = _model(rng, [10, 10])
    before = _copy(params)
    grads = _grads(rng, params)
    grads["t1"][4] = np.nan
    opt = AdaGrad(lr=LR, nonfinite="raise", initial_accumulator_value=0.5)
    with pytest.raises(FloatingPointError, match=r"grads\['t1'\]"):
        opt.update(params, grads)
    assert opt.h is None and opt.step == 0
    opt = AdaGrad(lr=LR, nonfinite="skip", initial_accumulator_value=0.5)
    assert opt.update(params, grads) is False
    assert (opt.step, opt.skipped_steps) == (0, 1)
    for k in params:
        assert_bits_equal(params[k], before[k], k)
        # any state the skipped call created holds only the initial value
        assert opt.h is None or np.all(opt.h[k] == np.float32(0.5))


@pytest.mark.parametrize("n", [1, 1000, config.PARALLEL_THRESHOLD + 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_functional_skip_and_raise(rng: np.random.Generator, n: int, dtype: Any) -> None:
    p = rng.standard_normal(n).astype(dtype)
    h = np.abs(rng.standard_normal(n)).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    g[n // 2] = np.nan
    snap = [a.copy() for a in (p, g, h)]
    assert adagrad_update(p, g, h, lr=LR, nonfinite="skip") is False
    with pytest.raises(FloatingPointError, match=r"^grad contains NaN or inf"):
        adagrad_update(p, g, h, lr=LR, nonfinite="raise")
    for a, b in zip((p, g, h), snap, strict=True):
        assert_bits_equal(a, b)


@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_flat_buffer_path(rng: np.random.Generator, mode: str) -> None:
    params = FlatBuffer(_model(rng, [300, 40000, 7]))
    grads = FlatBuffer(_grads(rng, dict(params.items())))
    opt = AdaGrad(lr=LR, nonfinite=mode)
    assert opt.update(params, grads) is True
    before, h_before = params.data.copy(), _copy(opt.h)
    grads["t1"][123] = np.inf
    if mode == "skip":
        assert opt.update(params, grads) is False
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match=r"grads\['t1'\]"):
            opt.update(params, grads)
    assert opt.step == 1
    assert_bits_equal(params.data, before)
    for k in h_before:
        assert_bits_equal(opt.h[k], h_before[k], k)


@pytest.mark.parametrize("path", list(SIZES))
def test_ignore_propagates_like_numpy(rng: np.random.Generator, path: str) -> None:
    params = _model(rng, SIZES[path])
    p0 = _copy(params)
    steps = [_grads(rng, params) for _ in range(3)]
    steps[1]["t2"][5] = np.nan
    steps[1]["t0"][-1] = np.inf
    steps[2]["t3"][0] = -np.inf
    opt = AdaGrad(lr=LR)  # the default is "ignore"
    with np.errstate(invalid="ignore"):
        for g in steps:
            assert opt.update(params, g) is True
        ref_p, ref_h = _reference(p0, steps, Hyper.make(lr=LR))
    assert opt.skipped_steps == 0 and opt.step == 3
    for k in params:
        np.testing.assert_array_equal(params[k], ref_p[k], err_msg=k)  # NaN where NaN
        np.testing.assert_array_equal(opt.h[k], ref_h[k], err_msg=k)
    assert np.isnan(params["t2"][5]) and np.isnan(params["t0"][-1])


# --- loss scaling -----------------------------------------------------------------------

SCALES = [2.0**16, 1024.0, 3.0, 0.5, 1e-3]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", ["one", *SIZES])
def test_grad_scale_matches_reference(rng: np.random.Generator, scale: float, dtype: Any,
                                      path: str) -> None:
    sizes = [1001] if path == "one" else SIZES[path]
    params = _model(rng, sizes, dtype)
    p0 = _copy(params)
    hyper = Hyper.make(lr=LR, grad_scale=scale)
    steps = [{k: (v * scale).astype(dtype) for k, v in _grads(rng, params).items()}
             for _ in range(3)]
    if path == "one":
        h = np.zeros_like(params["t0"])
        for step, g in enumerate(steps, 1):
            assert adagrad_update(params["t0"], g["t0"], h, lr=LR, grad_scale=scale,
                                  step=step, nonfinite="skip")
        state: Any = {"t0": h}
    else:
        opt = AdaGrad(lr=LR, nonfinite="skip")
        for g in steps:
            assert opt.update(params, g, grad_scale=scale)
        state = opt.h
    ref_p, ref_h = _reference(p0, steps, hyper)
    for k in params:
        assert_bits_equal(params[k], ref_p[k], k)
        assert_bits_equal(state[k], ref_h[k], k)


@pytest.mark.parametrize("path", ["one", *SIZES])
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_grad_scale_overflow_counts_as_nonfinite(rng: np.random.Generator, path: str,
                                                 mode: str) -> None:
    """A finite gradient whose g / grad_scale overflows float32 is non-finite."""
    sizes = [1001] if path == "one" else SIZES[path]
    params = _model(rng, sizes)
    grads = _grads(rng, params)
    grads["t0" if path == "one" else "t2"][7] = np.float32(3e38)  # finite
    assert all(np.isfinite(g).all() for g in grads.values())
    before = _copy(params)
    scale = 1e-3  # 3e38 / 1e-3 = 3e41 > float32 max
    if path == "one":
        h = np.zeros_like(params["t0"])
        if mode == "skip":
            assert adagrad_update(params["t0"], grads["t0"], h, grad_scale=scale,
                                  nonfinite="skip") is False
        else:
            with pytest.raises(FloatingPointError, match=r"^grad contains"):
                adagrad_update(params["t0"], grads["t0"], h, grad_scale=scale,
                               nonfinite="raise")
        assert not h.any()
    else:
        opt = AdaGrad(lr=LR, nonfinite=mode)
        if mode == "skip":
            assert opt.update(params, grads, grad_scale=scale) is False
            assert opt.skipped_steps == 1
        else:
            with pytest.raises(FloatingPointError, match=r"grads\['t2'\]"):
                opt.update(params, grads, grad_scale=scale)
        assert opt.step == 0
        # the same gradients without the scale are finite: the step applies
        assert opt.update(params, grads) is True
        return
    for k in params:
        assert_bits_equal(params[k], before[k], k)


def test_grad_scale_ignore_propagates_overflow_like_reference() -> None:
    p = np.ones(3, np.float32)
    g = np.array([1.0, 3e38, -3e38], np.float32)
    h = np.zeros(3, np.float32)
    pr, hr = p.copy(), h.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        assert adagrad_update(p, g, h, lr=LR, grad_scale=1e-3) is True
        reference_step(pr, g, hr, Hyper.make(lr=LR, grad_scale=1e-3))
    assert_bits_equal(p, pr)
    assert_bits_equal(h, hr)
    assert np.isinf(h[1]) and np.isnan(p[1])
