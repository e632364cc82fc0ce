"""Every CUDA kernel against the NumPy reference, plus the GPU front door's checks.

Tolerance: under the CUDA simulator the kernels run as Python, which does not
reproduce GPU rounding — there is no FMA (``fma(g, g, h)`` becomes ``g*g + h``, rounded
twice) and float32 ``math.sqrt`` returns a Python float. So these tests check the
logic (indexing, every formula branch, the grid-stride tail, validation, skip/raise)
with a bound of a few ulp; bit-identity with the CPU is checked on real hardware by
``python -m fastadagrad validate`` and the rounding instructions by
``tests/test_cuda_ptx.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

import fastadagrad as fa  # noqa: E402
from fastadagrad._hyper import Hyper, Rule  # noqa: E402
from fastadagrad.presets import PRESETS  # noqa: E402
from fastadagrad.reference import reference_step  # noqa: E402

# The simulator's FMA is two roundings (up to 1 ulp of h per step), and in the torch rule
# ``g + wd*p`` can cancel, which magnifies p's 1-ulp differences in g; over 3 steps the
# worst case seen is 10 ulp (torch rule, float32). The rules without FMA agree exactly.
ULP_BOUND = 16

RULES = {
    "numpy": (Rule(), dict(lr=0.01, eps=1e-7), 0.0),
    "torch": (PRESETS["torch"].rule, dict(lr=0.05, eps=1e-10, lr_decay=0.1,
                                          weight_decay=0.01), 0.0),
    "fma-wd": (replace(PRESETS["torch"].rule, fma_weight_decay=True),
               dict(lr=0.05, eps=1e-10, weight_decay=0.1), 0.1),
    "keras": (PRESETS["keras"].rule, dict(lr=0.01, eps=1e-7, weight_decay=0.004), 0.1),
    "optax": (PRESETS["optax"].rule, dict(lr=0.01, eps=1e-7), 0.0),
    "maximize+scale": (Rule(), dict(lr=0.01, eps=1e-7, maximize=True, grad_scale=4.0), 0.0),
}


def ulps(a: np.ndarray, b: np.ndarray) -> int:
    ai = np.int32 if a.dtype == np.float32 else np.int64
    x, y = a.reshape(-1).view(ai).astype(object), b.reshape(-1).view(ai).astype(object)
    width = 32 if ai is np.int32 else 64

    def ordered(v: int) -> int:
        mag = v & ((1 << (width - 1)) - 1)
        return -mag if v < 0 else mag

    return max((abs(ordered(u) - ordered(v)) for u, v in zip(x, y)), default=0)


def inputs(n: int, dtype, seed: int = 0, h0: float = 0.0):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(dtype)
    g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 1, n)).astype(dtype)
    g[::7] = 0  # zero gradients: h stays 0 for optax's zero-where-h0 branch
    h = np.full(n, h0, dtype)
    return p, g, h


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 100])
@pytest.mark.parametrize("rule", list(RULES))
def test_cuda_kernel_matches_reference(rule, n, dtype):
    r, kw, h0 = RULES[rule]
    p, g, h = inputs(n, dtype, seed=n, h0=h0)
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
    hyper = Hyper.make(rule=r, **kw)
    for step in (1, 2, 3):
        assert fa.adagrad_update(dp, dg, dh, step=step, rule=r, **kw) is True
        reference_step(p, g, h, hyper, step)
    assert ulps(dp.copy_to_host(), p) <= ULP_BOUND
    assert ulps(dh.copy_to_host(), h) <= ULP_BOUND
    np.testing.assert_array_equal(dg.copy_to_host(), g)  # the gradient is read only


def test_nd_arrays_are_processed_flat():
    p, g, h = (a.reshape(5, 4) for a in inputs(20, np.float32))
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
    fa.adagrad_update(dp, dg, dh, lr=0.1)
    reference_step(p, g, h, Hyper.make(lr=0.1))
    assert dp.shape == (5, 4)
    assert ulps(dp.copy_to_host(), p) <= ULP_BOUND


def test_tail_and_many_blocks_are_covered():
    """100 elements on 64 threads: every element must move (wrap-around and tail)."""
    n = 100
    p, g, h = np.zeros(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
    fa.adagrad_update(dp, dg, dh, lr=0.5, eps=0.0)
    np.testing.assert_array_equal(dh.copy_to_host(), np.ones(n, np.float32))
    np.testing.assert_array_equal(dp.copy_to_host(), np.full(n, -0.5, np.float32))


def test_known_values_two_steps():
    """Hand-computed: g=2, h=0, lr=0.5, eps=0 -> h=4, p=1-0.5; then h=8, p-=1/sqrt(8)."""
    dp, dg, dh = (cuda.to_device(np.array(v, np.float64)) for v in ([1.0], [2.0], [0.0]))
    fa.adagrad_update(dp, dg, dh, lr=0.5, eps=0.0, step=1)
    assert dp.copy_to_host()[0] == 0.5 and dh.copy_to_host()[0] == 4.0
    fa.adagrad_update(dp, dg, dh, lr=0.5, eps=0.0, step=2)
    assert dh.copy_to_host()[0] == 8.0
    assert abs(dp.copy_to_host()[0] - (0.5 - 1.0 / np.sqrt(8.0))) < 1e-15


# --- the non-finite check kernel ---------------------------------------------------------

def _device_model(bad_index=None, value=np.nan, n=3):
    rng = np.random.default_rng(1)
    params = [rng.standard_normal(17 + i).astype(np.float32) for i in range(n)]
    grads = [rng.standard_normal(17 + i).astype(np.float32) for i in range(n)]
    if bad_index is not None:
        grads[bad_index][-1] = value  # the very last element: the tail of the loop
    return params, grads


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nonfinite_skip_changes_nothing(value):
    params, grads = _device_model(bad_index=2, value=value)
    dparams = [cuda.to_device(p) for p in params]
    dgrads = [cuda.to_device(g) for g in grads]
    opt = fa.AdaGrad(lr=0.1, nonfinite="skip")
    assert opt.update(dparams, dgrads) is False
    assert opt.skipped_steps == 1 and opt.step == 0
    for d, p in zip(dparams, params):
        np.testing.assert_array_equal(d.copy_to_host(), p)
    dgrads[2] = cuda.to_device(np.zeros_like(grads[2]))
    assert opt.update(dparams, dgrads) is True


def test_nonfinite_raise_names_first_bad_gradient():
    params, grads = _device_model(bad_index=1)
    grads[2][0] = np.inf
    dparams = [cuda.to_device(p) for p in params]
    dgrads = [cuda.to_device(g) for g in grads]
    opt = fa.AdaGrad(lr=0.1, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
        opt.update(dparams, dgrads)
    for d, p in zip(dparams, params):
        np.testing.assert_array_equal(d.copy_to_host(), p)


# The simulator runs kernels as Python in threads: NumPy's overflow/invalid warnings
# from inf arithmetic escape np.errstate (thread-local) there.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_check_applies_grad_scale():
    """A finite gradient that overflows once divided by grad_scale counts as non-finite,
    as the update would see it (the CPU check does the same)."""
    big = np.float32(3e38)
    dp, dh = cuda.to_device(np.ones(5, np.float32)), cuda.to_device(np.zeros(5, np.float32))
    dg = cuda.to_device(np.full(5, big, np.float32))
    assert fa.adagrad_update(dp, dg, dh, grad_scale=0.5, nonfinite="skip") is False
    np.testing.assert_array_equal(dp.copy_to_host(), np.ones(5, np.float32))
    assert fa.adagrad_update(dp, dg, dh, grad_scale=4.0, nonfinite="skip") is True


# The simulator runs kernels as Python in threads: NumPy's overflow/invalid warnings
# from inf arithmetic escape np.errstate (thread-local) there.
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nonfinite_ignore_is_default_and_unchecked():
    params, grads = _device_model(bad_index=0, value=np.inf)
    dp, dg = cuda.to_device(params[0]), cuda.to_device(grads[0])
    dh = cuda.to_device(np.zeros_like(params[0]))
    assert fa.adagrad_update(dp, dg, dh) is True
    assert np.isnan(dp.copy_to_host()[-1])


# --- validation before any write --------------------------------------------------------

def _triple(n=8, dtype=np.float32):
    p, g, h = inputs(n, dtype, seed=3)
    return p, g, h, cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)


def _unchanged(pairs):
    for host, dev in pairs:
        np.testing.assert_array_equal(dev.copy_to_host(), host)


def test_dtype_mismatch_names_the_array():
    p, g, h, dp, dg, dh = _triple()
    dg64 = cuda.to_device(g.astype(np.float64))
    with pytest.raises(TypeError, match="grad"):
        fa.adagrad_update(dp, dg64, dh)
    _unchanged([(p, dp), (h, dh)])


def test_shape_mismatch_names_the_array():
    p, g, h, dp, dg, dh = _triple()
    with pytest.raises(ValueError, match="state_sum"):
        fa.adagrad_update(dp, dg, cuda.to_device(np.zeros(9, np.float32)))
    _unchanged([(p, dp), (g, dg)])


def test_integer_dtype_rejected():
    p, g, h, dp, dg, dh = _triple()
    with pytest.raises(TypeError, match="param"):
        fa.adagrad_update(cuda.to_device(np.zeros(8, np.int32)), dg, dh)
    _unchanged([(g, dg), (h, dh)])


def test_non_contiguous_rejected():
    p, g, h, dp, dg, dh = _triple(16)
    strided = cuda.to_device(np.zeros((4, 8), np.float32))[:, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        fa.adagrad_update(strided, dg[:8].reshape(4, 2), dh[:8].reshape(4, 2))
    _unchanged([(g, dg), (h, dh)])


def test_aliasing_rejected():
    p, g, h, dp, dg, dh = _triple()
    with pytest.raises(ValueError, match="share memory"):
        fa.adagrad_update(dp, dg, dp)
    with pytest.raises(ValueError, match="share memory"):
        fa.adagrad_update(dp, dp, dh)
    _unchanged([(p, dp), (g, dg), (h, dh)])


def test_overlapping_views_across_tensors_rejected():
    buf = cuda.to_device(np.arange(20, dtype=np.float32))
    host = buf.copy_to_host()
    g = cuda.to_device(np.ones(10, np.float32))
    h1, h2 = cuda.to_device(np.zeros(10, np.float32)), cuda.to_device(np.zeros(10, np.float32))
    opt = fa.AdaGrad()
    with pytest.raises(ValueError, match="share memory"):
        opt.update([buf[0:10], buf[5:15]], [g, g])
    del h1, h2
    np.testing.assert_array_equal(buf.copy_to_host(), host)


def test_mixed_host_and_device_rejected():
    p, g, h, dp, dg, dh = _triple()
    with pytest.raises(TypeError, match="host array"):
        fa.adagrad_update(dp, g, dh)
    _unchanged([(p, dp), (h, dh)])


# --- whole models, flat buffers and the allocation helpers ------------------------------

def test_flat_buffer_model_takes_one_launch(monkeypatch):
    rng = np.random.default_rng(5)
    shapes = {"W1": (7, 5), "b1": (5,), "W2": (5, 3), "b2": (3,)}
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params = fa.FlatBuffer(host).to_device()
    grads_h = fa.FlatBuffer({k: rng.standard_normal(s).astype(np.float32)
                             for k, s in shapes.items()})
    grads = grads_h.to_device()
    ref = {k: v.copy() for k, v in host.items()}
    ref_opt = fa.AdaGrad.from_preset("torch", lr=0.1)

    launches = []
    real = fcuda.kernels

    def counting(dtype, flags):
        kern = real(dtype, flags)

        class Count:
            def __getitem__(self, cfg):
                launches.append(cfg)
                return kern[0][cfg]
        return Count(), kern[1]

    monkeypatch.setattr(fcuda, "kernels", counting)
    opt = fa.AdaGrad.from_preset("torch", lr=0.1)
    for _ in range(3):
        opt.update(params, grads)
        ref_opt.update(ref, {k: grads_h[k] for k in shapes})
    assert len(launches) == 3  # one launch per step for the whole model
    out = params.to_host()
    for k in shapes:
        assert ulps(out[k], ref[k]) <= ULP_BOUND


def test_separate_device_arrays_dict():
    rng = np.random.default_rng(6)
    host = {"a": rng.standard_normal((3, 4)).astype(np.float64),
            "b": rng.standard_normal(5).astype(np.float64)}
    grads = {k: rng.standard_normal(v.shape).astype(np.float64) for k, v in host.items()}
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    dgrads = {k: cuda.to_device(v) for k, v in grads.items()}
    opt = fa.AdaGrad(lr=0.1, initial_accumulator_value=0.1)
    ref = fa.AdaGrad(lr=0.1, initial_accumulator_value=0.1)
    for _ in range(2):
        opt.update(dev, dgrads)
        ref.update(host, grads)
    for k in host:
        assert ulps(dev[k].copy_to_host(), host[k]) <= ULP_BOUND
        assert ulps(opt.h[k].copy_to_host(), ref.h[k]) <= ULP_BOUND


def test_full_and_full_like():
    a = fcuda.full(37, np.float32, 0.1)
    np.testing.assert_array_equal(a.copy_to_host(), np.full(37, 0.1, np.float32))
    b = fcuda.full_like(cuda.to_device(np.zeros((2, 3), np.float64)), 0.25)
    assert b.shape == (2, 3) and b.dtype == np.float64
    np.testing.assert_array_equal(b.copy_to_host(), np.full((2, 3), 0.25))
    assert fcuda.full(0, np.float32, 1.0).size == 0


def test_launch_config_is_capped_and_covers_small_inputs():
    blocks, tpb = fcuda.launch_config(10)
    assert tpb == 32 and blocks >= 1
    blocks, _ = fcuda.launch_config(10**6)
    assert blocks <= fcuda._sm_count() * 2 or not fcuda.simulator()
