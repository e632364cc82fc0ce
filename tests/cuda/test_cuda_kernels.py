"""Every CUDA kernel against the NumPy reference, plus the GPU front door's checks.

Tolerance: on a real GPU the kernels must agree with the NumPy reference bit for bit
(0 ulp). Under the CUDA simulator the kernels run as Python, which does not reproduce
GPU rounding — there is no FMA (``fma(g, g, h)`` becomes ``g*g + h``, rounded twice)
and float32 ``math.sqrt`` returns a Python float — so there these tests check the
logic (indexing, every formula branch, both wrapping loops, validation, skip/raise)
with a bound of a few ulp; the rounding instructions are checked by
``tests/test_cuda_ptx.py``.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import cuda as fcuda  # noqa: E402
from fastadagrad import cuda_kernels as K  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

import fastadagrad as fa  # noqa: E402
from fastadagrad._hyper import Hyper, Rule  # noqa: E402
from fastadagrad.presets import PRESETS  # noqa: E402
from fastadagrad.reference import reference_step  # noqa: E402

# The simulator's FMA is two roundings (up to 1 ulp of h per step), and in the torch rule
# ``g + wd*p`` can cancel, which magnifies p's 1-ulp differences in g; over 3 steps of
# the sizes tested here (up to 100 elements) the worst case seen is 10 ulp (torch rule,
# float32; larger arrays draw more cancellations: 64 ulp at 1,000). On a GPU, and for
# the rules without an FMA under the simulator too, the bits are the CPU's.
ULP_BOUND = 16 if fcuda.simulator() else 0


def ulp_bound(rule: Rule) -> int:
    """The tolerance for ``rule``: :data:`ULP_BOUND` where it has an FMA, else 0."""
    return ULP_BOUND if rule.fma_accumulate or rule.fma_weight_decay else 0

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
    assert ulps(dp.copy_to_host(), p) <= ulp_bound(r)
    assert ulps(dh.copy_to_host(), h) <= ulp_bound(r)
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


def test_raise_then_skip_on_the_same_model_reports_correctly():
    """A refused step ("raise") leaves the device's flags clear and its counts in step
    with the host, so a later "skip" step on the same arrays reports what happened."""
    params, grads = _device_model(bad_index=0)
    dparams = [cuda.to_device(p) for p in params]
    bad = [cuda.to_device(g) for g in grads]
    good = [cuda.to_device(np.nan_to_num(g)) for g in grads]
    dstate = [cuda.to_device(np.zeros_like(p)) for p in params]
    labels = fa._dispatch.KeyedLabels(list(range(3)))
    hy = Hyper.make(lr=0.1)
    with pytest.raises(FloatingPointError, match=r"grads\[0\]"):
        fa._dispatch.update(dparams, bad, dstate, labels, hy, 1, "raise")
    assert fa._dispatch.update(dparams, good, dstate, labels, hy, 1, "skip") is True
    assert fa._dispatch.update(dparams, bad, dstate, labels, hy, 2, "skip") is False
    assert fa._dispatch.update(dparams, good, dstate, labels, hy, 2, "skip") is True


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

def _count_launches(monkeypatch):
    """Count every kernel launch by kind, whichever launch path runs."""
    from fastadagrad import cuda_launch

    launches = []
    real = cuda_launch.run_kernel

    def counting(kernel, stream, blocks, tpb, packed):
        launches.append((kernel.kind, blocks, tpb))
        real(kernel, stream, blocks, tpb, packed)

    monkeypatch.setattr(cuda_launch, "run_kernel", counting)
    return launches


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

    launches = _count_launches(monkeypatch)
    opt = fa.AdaGrad.from_preset("torch", lr=0.1)
    for _ in range(3):
        opt.update(params, grads)
        ref_opt.update(ref, {k: grads_h[k] for k in shapes})
    assert [k for k, _, _ in launches] == ["update"] * 3  # one per step
    out = params.to_host()
    for k in shapes:
        assert ulps(out[k], ref[k]) <= ULP_BOUND


@pytest.mark.parametrize("nonfinite", ["ignore", "skip"])
def test_separate_arrays_one_launch_per_dtype_per_step(monkeypatch, nonfinite):
    """A model of separate device arrays of two dtypes: one update launch per dtype
    per step (plus the check and end-of-step kernels for "skip"), the tables built
    once and reused, new gradient arrays picked up every step, and the same bits (on
    a GPU) as the CPU."""
    rng = np.random.default_rng(7)
    shapes = [(3, 40), (7,), (0,), (100,), (1,), (2, 2)]
    dts = [np.float32, np.float64, np.float32, np.float32, np.float64, np.float32]
    host = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dts)]
    dev = [cuda.to_device(p) for p in host]
    launches = _count_launches(monkeypatch)
    opt = fa.AdaGrad.from_preset("torch", lr=0.1, lr_decay=0.05, nonfinite=nonfinite)
    ref = fa.AdaGrad.from_preset("torch", lr=0.1, lr_decay=0.05)
    tables = None
    for _ in range(3):
        grads = [rng.standard_normal(s).astype(d) for s, d in zip(shapes, dts)]
        assert opt.update(dev, [cuda.to_device(g) for g in grads]) is True  # new arrays
        ref.update(host, grads)
        if tables is None:
            tables = opt._plan.gpu.tables
        assert opt._plan.gpu.tables is tables  # built once, grads' column refreshed
    per_step = ["update", "update"] if nonfinite == "ignore" else \
        ["check", "check", "update", "update", "finish"]
    assert [k for k, _, _ in launches] == per_step * 3
    assert all(b <= 2 for _, b, _ in launches)  # the forced small grid
    assert len(tables.groups) == 2 and tables.groups[0].nchunks > 2  # blocks wrap
    for d, h in zip(dev, host):
        assert ulps(d.copy_to_host(), h) <= ULP_BOUND


def test_same_arrays_skip_validation_but_not_the_checks(monkeypatch):
    """Cached across steps: unchanged arrays are not described again; a param replaced
    by another array of another shape is validated (and refused) before any write."""
    rng = np.random.default_rng(8)
    host = [rng.standard_normal(10).astype(np.float32) for _ in range(3)]
    dev = [cuda.to_device(p) for p in host]
    grads = [cuda.to_device(np.ones(10, np.float32)) for _ in range(3)]
    opt = fa.AdaGrad(lr=0.1)
    opt.update(dev, grads)
    calls = []
    real = fcuda._describe
    monkeypatch.setattr(fcuda, "_describe", lambda x, lab: calls.append(lab) or real(x, lab))
    opt.update(dev, grads)  # the tables and launches of this model are reused
    assert calls == []
    gc = opt._plan.gpu
    assert gc.holds(dev, opt.h, grads)
    opt.update(dev, grads)
    assert calls == []
    before = [d.copy_to_host() for d in dev]
    bad = list(grads)
    bad[1] = cuda.to_device(np.ones(11, np.float32))
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        opt.update(dev, bad)
    assert calls  # validated
    for d, b in zip(dev, before):
        np.testing.assert_array_equal(d.copy_to_host(), b)


# the simulator computes the discarded 0/0 in NumPy, which warns (threads escape
# np.errstate); the GPU's div.rn gives a NaN that the kernel then replaces by 0
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_eps_zero_zero_gradient_optax():
    """optax's rule with eps=0: where g = 0 and h = 0 the update is 0 (not 0/0 = NaN);
    ZERO_WHERE_H0 is the only thing that keeps those parameters finite."""
    r = PRESETS["optax"].rule
    p = np.linspace(-1, 1, 70).astype(np.float32)
    g = np.where(np.arange(70) % 3 == 0, 0, 0.5).astype(np.float32)
    h = np.zeros(70, np.float32)
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
    for step in (1, 2):
        fa.adagrad_update(dp, dg, dh, lr=0.1, eps=0.0, rule=r, step=step)
        reference_step(p, g, h, Hyper.make(lr=0.1, eps=0.0, rule=r), step)
    out = dp.copy_to_host()
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[::3], np.linspace(-1, 1, 70).astype(np.float32)[::3])
    assert ulps(out, p) <= ULP_BOUND


def test_launch_path_is_reported():
    from fastadagrad import cuda_launch

    path, why = cuda_launch.launch_path()
    if fcuda.simulator():
        assert path == "simulator"
    else:
        assert path in ("cuda.core", "dispatcher") and why


def test_capturable_counts_on_device_and_matches_eager():
    """capturable=True: step, lr (with lr_decay) and the skip flag on the device; the
    same bits as eager steps; skipped steps counted on the device, not the host."""
    rng = np.random.default_rng(9)
    host = [rng.standard_normal(s).astype(np.float32) for s in (30, 5)]
    grads = [rng.standard_normal(s).astype(np.float32) for s in (30, 5)]
    bad = [g.copy() for g in grads]
    bad[1][2] = np.nan
    dev = [cuda.to_device(p) for p in host]
    dg, dbad = [cuda.to_device(g) for g in grads], [cuda.to_device(g) for g in bad]
    kw = dict(lr=0.1, lr_decay=0.5, nonfinite="skip")
    opt = fa.AdaGrad.from_preset("torch", capturable=True, **kw)
    ref = fa.AdaGrad.from_preset("torch", **kw)
    refp = [cuda.to_device(p) for p in host]
    for gs, rgs in ((dg, dg), (dbad, dbad), (dg, dg), (dg, dg)):
        assert opt.update(dev, gs) is True  # queued
        ref.update(refp, rgs)
    assert opt.step == 0  # the host does not know yet
    opt.sync_steps()
    assert (opt.step, opt.skipped_steps) == (3, 1) == (ref.step, ref.skipped_steps)
    for a, b in zip(dev, refp):
        np.testing.assert_array_equal(a.copy_to_host(), b.copy_to_host())
    opt.lr = 0.05  # written to the device at the next step
    ref.lr = 0.05
    opt.update(dev, dg)
    ref.update(refp, dg)
    for a, b in zip(dev, refp):
        np.testing.assert_array_equal(a.copy_to_host(), b.copy_to_host())


def test_capturable_learning_rate_sign_of_zero_reaches_the_device():
    # lr 0.0 -> -0.0: equal as numbers, but the sign reaches the update (a -0.0
    # parameter stays -0.0 under +0 and becomes +0 under -0); capturable writes the
    # new bits to the device as the eager step uses them
    def run(capturable: bool) -> list[int]:
        p = [cuda.to_device(np.array([-0.0, 1.0], np.float32))]
        g = [cuda.to_device(np.array([1.0, 1.0], np.float32))]
        opt = fa.AdaGrad(lr=0.0, capturable=capturable)
        opt.update(p, g)
        opt.lr = -0.0
        opt.update(p, g)
        return p[0].copy_to_host().view(np.uint32).tolist()

    assert run(True) == run(False) == [0, 0x3F800000]


def test_capturable_refuses_raise_and_schedules():
    with pytest.raises(ValueError, match="capturable"):
        fa.AdaGrad(capturable=True, nonfinite="raise")
    with pytest.raises(ValueError, match="capturable"):
        fa.AdaGrad(lambda s: 0.1, capturable=True)
    opt = fa.AdaGrad(lr=0.1, capturable=True)
    with pytest.raises(ValueError, match="capturable"):  # the setter as the constructor
        opt.lr = lambda s: 0.1 / s
    assert opt.lr == 0.1 and opt.schedule is None


def _capturable_run(opt, dev, grads):
    for gs in grads:
        opt.update(dev, gs)
    opt.sync_steps()


@pytest.mark.parametrize("how", ["into the running optimizer", "into a new one"])
def test_capturable_resume_keeps_the_loaded_counters(how):
    """The device's step and skipped counters (and the learning rate with lr_decay) are
    the checkpoint's after a load, whether into the optimizer that kept running (its
    device counters are the old run's) or into a new one (the device count of skipped
    steps starts from the loaded one)."""
    rng = np.random.default_rng(11)
    host = [rng.standard_normal(s).astype(np.float32) for s in (30, 5)]
    good = [cuda.to_device(rng.standard_normal(s).astype(np.float32)) for s in (30, 5)]
    bad_host = [g.copy_to_host() for g in good]
    bad_host[1][0] = np.nan
    bad = [cuda.to_device(g) for g in bad_host]
    kw = dict(lr=0.1, lr_decay=0.5, nonfinite="skip", capturable=True)
    first = [good, bad, good, bad]  # 2 applied, 2 skipped
    rest = [good, good]
    ref, refp = fa.AdaGrad(**kw), [cuda.to_device(p) for p in host]
    _capturable_run(ref, refp, first + rest)
    assert (ref.step, ref.skipped_steps) == (4, 2)

    opt, dev = fa.AdaGrad(**kw), [cuda.to_device(p) for p in host]
    _capturable_run(opt, dev, first)
    sd = opt.state_dict()
    saved_params = [d.copy_to_host() for d in dev]
    if how == "into the running optimizer":
        _capturable_run(opt, dev, [good, good, bad])  # runs on, then goes back
        for d, p in zip(dev, saved_params):
            d.copy_to_device(p)
        opt.load_state_dict(sd)
    else:
        opt = fa.AdaGrad(**kw)
        dev = [cuda.to_device(p) for p in saved_params]
        opt.load_state_dict(sd, params=dev)
    assert (opt.step, opt.skipped_steps) == (2, 2)
    assert opt.state_dict()["state"][0]["step"] == 2  # nothing read from an old device
    _capturable_run(opt, dev, rest)
    assert (opt.step, opt.skipped_steps) == (4, 2)
    for a, b in zip(dev, refp):
        np.testing.assert_array_equal(a.copy_to_host(), b.copy_to_host())


def test_optimizer_step_uses_its_own_gradients_after_a_functional_call():
    """A functional call on an optimizer's own param and state with another gradient
    (the same layout) must not change the gradient addresses the optimizer's cached
    step launches with: they are its own tables, not shared by layout."""
    import gc

    rng = np.random.default_rng(12)
    p0 = rng.standard_normal(16).astype(np.float32)
    g1 = rng.standard_normal(16).astype(np.float32)
    g2 = rng.standard_normal(16).astype(np.float32) * 100
    dev, dg1 = [cuda.to_device(p0)], [cuda.to_device(g1)]
    opt = fa.AdaGrad(lr=0.1)
    opt.update(dev, dg1)
    rp, rh = p0.copy(), np.zeros(16, np.float32)
    fa.adagrad_update(rp, g1, rh, lr=0.1)
    other = cuda.to_device(g2)
    fa.adagrad_update(dev[0], other, opt.h[0], lr=0.1)
    fa.adagrad_update(rp, g2, rh, lr=0.1)
    del other
    gc.collect()
    opt.update(dev, dg1)  # the cached step, with its own gradient
    fa.adagrad_update(rp, g1, rh, lr=0.1)
    assert ulps(dev[0].copy_to_host(), rp) <= ULP_BOUND
    assert ulps(opt.h[0].copy_to_host(), rh) <= ULP_BOUND


@pytest.mark.parametrize("via", ["state_dict", "file"])
def test_zero_d_device_param_resumes(tmp_path, via):
    """A scalar device parameter's state stays 0-d through a load."""
    host = {"s": np.float32(0.5) * np.ones((), np.float32),
            "v": np.arange(3, dtype=np.float32)}
    grads = {k: cuda.to_device(np.full_like(v, 0.25)) for k, v in host.items()}
    dev = {k: cuda.to_device(v) for k, v in host.items()}
    opt = fa.AdaGrad(lr=0.1)
    opt.update(dev, grads)
    new = fa.AdaGrad(lr=0.1)
    if via == "state_dict":
        new.load_state_dict(opt.state_dict(), params=dev)
    else:
        new.load(opt.save(tmp_path / "ck"), params=dev)
    assert new.h["s"].shape == ()
    new.update(dev, grads)
    opt.update({k: cuda.to_device(v) for k, v in host.items()}, grads)  # (its own copy)
    np.testing.assert_array_equal(new.h["s"].copy_to_host(), opt.h["s"].copy_to_host())


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
    # the fill kernel's grid: BLOCKS_PER_SM (2 here) per SM, and at least 128 blocks on
    # a real GPU (fewer would draw Numba's performance warning)
    cap = fcuda._sm_count() * 2 if fcuda.simulator() else \
        max(fcuda._sm_count() * 2, fcuda._MIN_BLOCKS)
    assert blocks == cap


def _update_launches(monkeypatch, bit):
    """Record (kernel compiled with ``bit``?, blocks) of every update launch planned
    from now on."""
    seen: list[tuple[bool, int]] = []
    real = fcuda._plan_launches

    def spy(tables, *a):
        out = real(tables, *a)
        seen.extend((bool(k.flags & bit), blocks) for k, blocks, *_ in out[1])
        return out

    monkeypatch.setattr(fcuda, "_plan_launches", spy)
    return seen


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
@pytest.mark.parametrize("rule", list(RULES))
def test_grid_stride_variant_matches_the_chunked_kernel(monkeypatch, rule, n, dtype):
    """config.GPU_GRID_STRIDE: one tensor takes the 4-per-pass grid-stride kernel, with
    the chunked kernel's bits (the same per-element operations), and, for the rules
    without an FMA (which the simulator rounds twice), the reference's. On the forced
    2 x 32-thread grid a pass covers 256 elements, so these sizes run the unrolled loop
    zero, one and several times, with and without a remainder."""
    from fastadagrad import config

    seen = _update_launches(monkeypatch, K.GRID_STRIDE)
    r, kw, h0 = RULES[rule]
    hyper = Hyper.make(rule=r, **kw)
    out = []
    for grid_stride in (False, True):
        monkeypatch.setattr(config, "GPU_GRID_STRIDE", grid_stride)
        p, g, h = inputs(n, dtype, seed=n, h0=h0)
        dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
        for step in (1, 2, 3):
            assert fa.adagrad_update(dp, dg, dh, step=step, rule=r, **kw) is True
            reference_step(p, g, h, hyper, step)
        out.append((dp.copy_to_host(), dh.copy_to_host()))
        np.testing.assert_array_equal(dg.copy_to_host(), g)  # the gradient is read only
    assert seen[-1] == (True, 2) and not seen[0][0]  # grid-stride on a grid that wraps
    np.testing.assert_array_equal(out[1][0], out[0][0])
    np.testing.assert_array_equal(out[1][1], out[0][1])
    if not (r.fma_accumulate or r.fma_weight_decay):
        assert ulps(out[1][0], p) <= ULP_BOUND
        assert ulps(out[1][1], h) <= ULP_BOUND


def test_grid_stride_variant_only_for_one_tensor(monkeypatch):
    """A dtype group of several tensors keeps the chunked kernel; one tensor with
    nonfinite='skip', capturable=True and lr_decay takes the grid-stride one, with the
    chunked kernel's bits."""
    from fastadagrad import config

    seen = _update_launches(monkeypatch, K.GRID_STRIDE)
    rng = np.random.default_rng(3)
    host = [rng.standard_normal(700).astype(np.float32)]
    grads = [cuda.to_device(rng.standard_normal(700).astype(np.float32))]
    results = []
    for on in (False, True):
        monkeypatch.setattr(config, "GPU_GRID_STRIDE", on)
        opt = fa.AdaGrad.from_preset("torch", lr=0.1, lr_decay=0.5, capturable=True,
                                     nonfinite="skip")
        dev = [cuda.to_device(p) for p in host]
        for _ in range(3):
            opt.update(dev, grads)
        results.append(dev[0].copy_to_host())
        two = [cuda.to_device(p) for p in host * 2]
        fa.AdaGrad.from_preset("torch", lr=0.1).update(two, grads * 2)
    assert [gs for gs, _ in seen] == [False, False, True, False]
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", list(RULES))
def test_unrolled_chunks_match_the_chunked_kernel(monkeypatch, rule, dtype):
    """config.GPU_UNROLL_CHUNKS: the multi-tensor kernel takes 4 elements per thread per
    pass within each chunk, with the same bits. 300-element chunks on 32 threads: two
    128-element passes and a 44-element remainder per whole chunk; the tensors' sizes
    leave partial chunks with and without a pass."""
    from fastadagrad import config

    monkeypatch.setattr(config, "GPU_CHUNK", 300)
    seen = _update_launches(monkeypatch, K.UNROLL_CHUNKS)
    r, kw, h0 = RULES[rule]
    sizes = (1, 300, 700, 129, 1000)
    out = []
    for unrolled in (False, True):
        monkeypatch.setattr(config, "GPU_UNROLL_CHUNKS", unrolled)
        host = [inputs(n, dtype, seed=n, h0=h0) for n in sizes]
        ps = [cuda.to_device(p) for p, _, _ in host]
        gs = [cuda.to_device(g) for _, g, _ in host]
        # (AdaGrad takes no grad_scale: the functional call's option, tested above)
        opt = fa.AdaGrad(rule=r, initial_accumulator_value=h0,
                         **{k: v for k, v in kw.items() if k != "grad_scale"})
        for _ in range(3):
            assert opt.update(ps, gs) is True
        out.append([a.copy_to_host() for a in ps] + [opt.h[k].copy_to_host()
                                                   for k in range(len(sizes))])
    flags = [k for k, _ in seen]  # planned once per run, or per step with lr_decay
    half = len(flags) // 2
    assert half and flags == [False] * half + [True] * half
    for a, b in zip(*out):
        np.testing.assert_array_equal(b, a)
    if not (r.fma_accumulate or r.fma_weight_decay):  # the simulator's rounding is exact
        hyper = Hyper.make(rule=r, **{k: v for k, v in kw.items() if k != "grad_scale"})
        for k, (p, g, h) in enumerate(inputs(n, dtype, seed=n, h0=h0) for n in sizes):
            for step in (1, 2, 3):
                reference_step(p, g, h, hyper, step)
            assert ulps(out[1][k], p) <= ULP_BOUND
            assert ulps(out[1][len(sizes) + k], h) <= ULP_BOUND


def test_a_variant_switched_between_calls_on_the_same_arrays_takes_effect(monkeypatch):
    """The launches packed for one call are reused by the next only while the
    variants' switches stay as they were: switching config.GPU_GRID_STRIDE,
    GRID_STRIDE_BLOCKS_PER_SM or GPU_UNROLL_CHUNKS between two calls on the same arrays
    changes the kernel (or its grid) at the next call."""
    from fastadagrad import config

    seen = _update_launches(monkeypatch, K.GRID_STRIDE | K.UNROLL_CHUNKS)
    monkeypatch.setattr(config, "GPU_CHUNK", 4)
    n = 300 * config.GPU_CHUNK  # more chunks than one block per SM
    p, g, h = inputs(n, np.float32, seed=5)
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)
    monkeypatch.setattr(config, "GPU_MAX_BLOCKS", None)  # the grids' own sizes
    for grid_stride, per_sm, unrolled in ((False, 4, False), (True, 4, False),
                                          (True, 1, False), (False, 1, True),
                                          (False, 1, False)):
        monkeypatch.setattr(config, "GPU_GRID_STRIDE", grid_stride)
        monkeypatch.setattr(config, "GRID_STRIDE_BLOCKS_PER_SM", per_sm)
        monkeypatch.setattr(config, "GPU_UNROLL_CHUNKS", unrolled)
        assert fa.adagrad_update(dp, dg, dh) is True
        reference_step(p, g, h, Hyper.make(), 1)
    sms = fcuda._sm_count()
    cap = min(300, sms * config.BLOCKS_PER_SM)  # the chunked kernel's grid
    assert min(cap, 4 * sms) != min(cap, sms)  # (the blocks-per-SM switch shows)
    assert seen == [(False, cap), (True, min(cap, 4 * sms)), (True, min(cap, sms)),
                    (True, cap), (False, cap)]
    np.testing.assert_array_equal(dh.copy_to_host(), h)
    assert ulps(dp.copy_to_host(), p) <= ULP_BOUND


def test_functional_calls_on_the_same_arrays_are_validated_once(monkeypatch):
    """adagrad_update on the same live param and state, and the same gradient (Numba
    arrays never change in place: identity), validates at the first call only; another
    gradient, another state or a changed launch configuration validates again; the
    cache holds no array alive; bad input after cached calls is still refused, naming
    the array, with nothing written; every step gives the reference's bits."""
    import gc
    import weakref

    from fastadagrad import config

    calls = []
    real = fcuda._validate_and_plan
    monkeypatch.setattr(fcuda, "_validate_and_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    hyper = Hyper.make()
    p, g, h = inputs(300, np.float32, seed=9)
    dp, dg, dh = cuda.to_device(p), cuda.to_device(g), cuda.to_device(h)

    def step(dp, dg, dh, g, h):  # the device arrays, then the reference's
        assert fa.adagrad_update(dp, dg, dh) is True
        reference_step(p, g, h, hyper, 1)

    for _ in range(3):
        step(dp, dg, dh, g, h)
    assert len(calls) == 1
    g2 = (g * 0.5).astype(np.float32)
    dg2 = cuda.to_device(g2)
    step(dp, dg2, dh, g2, h)
    step(dp, dg2, dh, g2, h)
    assert len(calls) == 2  # another gradient object: validated once
    h2 = h.copy()
    dh2 = cuda.to_device(h2)
    step(dp, dg2, dh2, g2, h2)
    assert len(calls) == 3  # another state for the same param
    monkeypatch.setattr(config, "GPU_CHUNK", 64)
    step(dp, dg2, dh, g2, h)
    assert len(calls) == 4  # the tables were built for another chunk size
    bad = cuda.to_device(np.ones(299, np.float32))
    before = dp.copy_to_host(), dh.copy_to_host()
    with pytest.raises(ValueError, match="grad has shape"):
        fa.adagrad_update(dp, bad, dh)
    np.testing.assert_array_equal(dp.copy_to_host(), before[0])
    np.testing.assert_array_equal(dh.copy_to_host(), before[1])
    assert ulps(dp.copy_to_host(), p) <= ULP_BOUND
    np.testing.assert_array_equal(dh.copy_to_host(), h)
    np.testing.assert_array_equal(dh2.copy_to_host(), h2)
    refs = [weakref.ref(x) for x in (dp, dg, dh, dg2, dh2)]
    del dp, dg, dh, dg2, dh2, bad
    gc.collect()
    assert all(r() is None for r in refs)  # the cache kept none of them


def test_device_flat_buffer_nonfinite_error_names_the_tensor():
    """As on the host: the first tensor of the buffer whose gradient is NaN/inf."""
    rng = np.random.default_rng(13)
    arrays = {"w": rng.standard_normal(10).astype(np.float32),
              "b": rng.standard_normal(4).astype(np.float32)}
    grads = {k: np.ones_like(v) for k, v in arrays.items()}
    grads["b"][1] = np.nan
    params = fa.FlatBuffer(arrays).to_device()
    opt = fa.AdaGrad(lr=0.1, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"grads\['b'\] \(in a flat buffer\)"):
        opt.update(params, fa.FlatBuffer(grads).to_device())
    np.testing.assert_array_equal(params.to_host().data,
                                  fa.FlatBuffer(arrays).data)


def test_gpu_cache_holds_no_gradient_it_does_not_need():
    """The cache compares torch and CuPy gradients by address, shape, layout and dtype:
    it does not keep them alive (a loop that drops its gradients frees them before the
    next backward pass). Numba arrays are compared by identity, so it holds those."""
    import types
    import weakref

    class Fake:  # what the cache reads of a CuPy array
        __module__ = "cupy.fake"

        def __init__(self, ptr: int) -> None:
            self.data = types.SimpleNamespace(ptr=ptr)
            self.shape, self.strides, self.dtype = (4,), (4,), np.dtype(np.float32)

    params, states, grads = [Fake(1 << 20)], [Fake(2 << 20)], [Fake(3 << 20)]
    gc = fcuda.GpuCache()
    gc.remember(params, states, grads)
    assert gc.holds(params, states, [Fake(3 << 20)])  # another array at that address
    assert not gc.holds(params, states, [Fake(4 << 20)])
    ref = weakref.ref(grads[0])
    del grads
    assert ref() is None
    numba_grads = [cuda.to_device(np.zeros(4, np.float32))]
    gc.remember([cuda.to_device(np.zeros(4, np.float32))],
                [cuda.to_device(np.zeros(4, np.float32))], numba_grads)
    assert gc.gobjs[0] is numba_grads[0]
