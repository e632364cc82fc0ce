"""Half-precision GPU kernels (cuda_half.py) under the simulator or on a GPU, against
the CPU kernels.

Under the simulator the float32 math is Python's (no FMA, ``math.sqrt`` in double:
see test_cuda_kernels.py), so float32 results agree within a few ulp and the 16-bit
params within one unit of their last place (a 1-ulp float32 difference can flip a
rounding); the conversions, the random stream and every branch are checked. On a GPU
the results must be bit-identical (the rule without FMA, nearest and stochastic).
"""

from __future__ import annotations

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

import fastadagrad as fa  # noqa: E402
from fastadagrad import _rounding as R  # noqa: E402
from fastadagrad import cuda_half  # noqa: E402
from fastadagrad._hyper import Hyper, Rule  # noqa: E402

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
SIM = fcuda.simulator()


def _close16(a: np.ndarray, b: np.ndarray, bound: int) -> None:
    x = a.reshape(-1).view(np.int16).astype(np.int64)
    y = b.reshape(-1).view(np.int16).astype(np.int64)
    assert np.abs(x - y).max(initial=0) <= bound, np.abs(x - y).max()


def _close32(a: np.ndarray, b: np.ndarray, bound: int) -> None:
    x = a.reshape(-1).view(np.int32).astype(np.int64)
    y = b.reshape(-1).view(np.int32).astype(np.int64)
    assert np.abs(x - y).max(initial=0) <= bound


RULES = [
    dict(lr=0.05),
    dict(lr=0.05, weight_decay=0.1, rule=Rule(weight_decay_mode="decoupled")),
    dict(lr=0.05, maximize=True, grad_scale=4.0),
    dict(lr=0.05, eps=1e-3, rule=Rule(eps_placement="inside", lr_placement="after",
                                      zero_where_h0=True)),
]


@pytest.mark.parametrize("kw", RULES, ids=range(len(RULES)))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_kernel_matches_cpu(rng, fmt, master, rounding, kw):
    """Direct launches (bfloat16 as int16 patterns) over 100 elements: several blocks
    and a grid-stride tail (conftest), 3 steps, against the CPU kernel."""
    n = 100
    dt = BF16 if fmt == "bfloat16" else np.dtype(np.float16)
    p = rng.standard_normal(n).astype(dt)
    p[::9] = 0
    hyper = Hyper.make(rule=kw.get("rule"), **{k: v for k, v in kw.items() if k != "rule"})
    seed = 99 if rounding == "stochastic" else None
    pc, hc = p.copy(), np.zeros(n, np.float32)
    mc = p.astype(np.float32) if master else None
    carrier = np.int16 if fmt == "bfloat16" else (np.float16 if SIM else np.uint16)
    pd = cuda.to_device(p.view(carrier))
    hd = cuda.to_device(np.zeros(n, np.float32))
    md = cuda.to_device(p.astype(np.float32)) if master else None
    coefs = hyper.coefficients(np.float32, 1)
    for step in (1, 2, 3):
        g = (rng.standard_normal(n) * 0.5).astype(dt)
        g[::7] = 0
        fa.adagrad_update(pc, g, hc, step=step, rounding=rounding, seed=seed, master=mc,
                          **kw)
        coefs = hyper.coefficients(np.float32, step)
        kern, _ = cuda_half.kernels(fmt, coefs[7], rounding == "stochastic", master)
        k0, k1 = R.stream_key(seed, step, 0) if seed is not None else (np.uint32(0),) * 2
        blocks, tpb = fcuda.launch_config(n)
        kern[blocks, tpb](pd, cuda.to_device(g.view(carrier)), hd,
                          hd if md is None else md, k0, k1, *coefs[:7])
    pg = pd.copy_to_host().view(dt)
    if SIM:
        _close16(pg, pc, 1)
        _close32(hd.copy_to_host(), hc, 16)
    else:
        np.testing.assert_array_equal(pg.view(np.uint16), pc.view(np.uint16))
        np.testing.assert_array_equal(hd.copy_to_host().view(np.uint32), hc.view(np.uint32))
        if master:
            np.testing.assert_array_equal(md.copy_to_host(), mc)


def test_functional_float16_device_arrays(rng):
    """``adagrad_update`` routes float16 device arrays to the GPU; bad input named."""
    n = 77
    p = rng.standard_normal(n).astype(np.float16)
    g = rng.standard_normal(n).astype(np.float16)
    pc, hc = p.copy(), np.zeros(n, np.float32)
    pd, gd, hd = cuda.to_device(p), cuda.to_device(g), cuda.to_device(np.zeros(n, np.float32))
    for step in (1, 2):
        fa.adagrad_update(pc, g, hc, lr=0.1, step=step, rounding="stochastic", seed=4)
        assert fa.adagrad_update(pd, gd, hd, lr=0.1, step=step, rounding="stochastic",
                                 seed=4) is True
    _close16(pd.copy_to_host(), pc, 0 if not SIM else 1)
    before = pd.copy_to_host()
    with pytest.raises(TypeError, match="state_sum is a 16-bit array"):
        fa.adagrad_update(pd, gd, cuda.to_device(np.zeros(n, np.float16)))
    with pytest.raises(TypeError, match="host array"):
        fa.adagrad_update(pd, g, hd)
    g2 = g.copy()
    g2[5] = np.inf
    with pytest.raises(FloatingPointError, match="grad contains NaN or inf"):
        fa.adagrad_update(pd, cuda.to_device(g2), hd, nonfinite="raise")
    assert fa.adagrad_update(pd, cuda.to_device(g2), hd, nonfinite="skip") is False
    np.testing.assert_array_equal(pd.copy_to_host().view(np.uint16), before.view(np.uint16))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_adagrad_class_float16_device_arrays(rng, rounding):
    """``AdaGrad`` with float16 device params: float32 device state, the same stream
    per tensor position as on the CPU."""
    host = {"a": rng.standard_normal(50).astype(np.float16),
            "b": rng.standard_normal((3, 7)).astype(np.float16)}
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    cpu = {k: v.copy() for k, v in host.items()}
    o_dev = fa.AdaGrad(lr=0.05, rounding=rounding, seed=8, initial_accumulator_value=0.1)
    o_cpu = fa.AdaGrad(lr=0.05, rounding=rounding, seed=8, initial_accumulator_value=0.1)
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(np.float16) for k, v in host.items()}
        assert o_dev.update(dev, {k: cuda.to_device(v) for k, v in g.items()}) is True
        o_cpu.update(cpu, g)
    for k in host:
        _close16(dev[k].copy_to_host(), cpu[k], 1 if SIM else 0)
        _close32(o_dev.h[k].copy_to_host(), o_cpu.h[k], 16 if SIM else 0)
    with pytest.raises(TypeError, match="master_weights=True on the GPU"):
        fa.AdaGrad(master_weights=True).update(dev, {k: cuda.to_device(v)
                                                     for k, v in host.items()})


@pytest.mark.parametrize("case", ["float32 grad is a float16 state",
                                  "float32 param is a float16 state",
                                  "float16 grad is a float32 param"])
def test_mixed_model_refuses_aliasing_across_groups(rng, case):
    """A model of float16 and float32 device arrays: each group checks its own arrays,
    and one group's written arrays against the other's, before anything is written."""
    host = {"a": rng.standard_normal(8).astype(np.float16),
            "w": rng.standard_normal(4).astype(np.float32)}
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    opt = fa.AdaGrad(lr=0.05)
    grads = {k: cuda.to_device(rng.standard_normal(v.shape).astype(v.dtype))
             for k, v in host.items()}
    opt.update(dev, grads)
    # opt.h["a"]: the float16 param's float32 state, 8 floats; the float32 param: 4
    if case == "float32 grad is a float16 state":
        grads["w"], names = opt.h["a"][:4], ("grads['w']", "state_sum['a']")
    elif case == "float32 param is a float16 state":
        dev["w"], names = opt.h["a"][:4], ("params['w']", "state_sum['a']")
        opt.h["w"] = cuda.to_device(np.zeros(4, np.float32))  # (w's state follows w)
    else:
        grads["a"], names = dev["w"].view(np.float16), ("grads['a']", "params['w']")
    before = {k: v.copy_to_host() for k, v in dev.items()}
    h0 = {k: v.copy_to_host() for k, v in opt.h.items()}
    with pytest.raises(ValueError, match="share memory") as err:
        opt.update(dev, grads)
    assert all(n in str(err.value) for n in names), str(err.value)
    for k, v in dev.items():
        assert np.array_equal(v.copy_to_host().view(np.uint8), before[k].view(np.uint8)), k
    for k, v in opt.h.items():
        assert np.array_equal(v.copy_to_host(), h0[k]), k


def test_skipped_step_still_refuses_bad_float32_input():
    """A NaN in a float16 device gradient skips the step (nonfinite="skip"); the
    float32 device arrays are still validated, and nothing is counted."""
    dev = {"h": cuda.to_device(np.ones(6, np.float16)),
           "f": cuda.to_device(np.ones(5, np.float32))}
    opt = fa.AdaGrad(lr=0.1, nonfinite="skip")
    opt.update(dev, {"h": cuda.to_device(np.ones(6, np.float16)),
                     "f": cuda.to_device(np.ones(5, np.float32))})
    bad = {"h": cuda.to_device(np.full(6, np.nan, np.float16)),
           "f": cuda.to_device(np.ones(7, np.float32))}
    before = {k: v.copy_to_host() for k, v in dev.items()}
    with pytest.raises(ValueError, match=r"grads\['f'\] has shape \(7,\)"):
        opt.update(dev, bad)
    assert (opt.step, opt.skipped_steps) == (1, 0)
    for k, v in dev.items():
        assert np.array_equal(v.copy_to_host(), before[k]), k
