"""Half-precision params (bfloat16/float16) with a float32 accumulator, on the CPU.

Nearest rounding is checked bit for bit against the NumPy reference (float32 math,
then ``astype``); stochastic rounding bit for bit against the NumPy statement of the
same random stream, for reproducibility across thread counts, and statistically.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest

import fastadagrad
from fastadagrad import _rounding as R
from fastadagrad import config, cpu_half
from fastadagrad._hyper import Hyper, Rule
from fastadagrad.presets import PRESETS
from fastadagrad.reference import reference_step_half
from fastadagrad.testing import assert_bits_equal

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
DTYPES = [BF16, F16]
SIZES = [0, 1, 15, 16, 17, 2**16 + 3]


@pytest.fixture(params=["parallel", "serial"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test through the parallel kernel (threshold 0, 64-element chunks: several
    chunks and a ragged last one) and through the serial one."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0 if request.param == "parallel"
                        else 1 << 62)
    monkeypatch.setattr(config, "CHUNK", 64)
    return request.param


def _arrays(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype,
            steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    p = rng.standard_normal(shape).astype(dtype)
    return p, [(rng.standard_normal(shape) * 0.3).astype(dtype) for _ in range(steps)]


def _run(p: np.ndarray, gs: list[np.ndarray], kw: dict, *, master: bool = False,
         rounding: str = "nearest", seed: int | None = None, init: float = 0.0
         ) -> None:
    """fastadagrad and the reference side by side; assert every array bit for bit."""
    hyper_kw = {k: v for k, v in kw.items() if k != "rule"}
    hyper = Hyper.make(rule=kw.get("rule"), **hyper_kw)
    pr, h, hr = p.copy(), np.full(p.shape, init, np.float32), np.full(p.shape, init,
                                                                      np.float32)
    m = p.astype(np.float32) if master else None
    mr = None if m is None else m.copy()
    for step, g in enumerate(gs, 1):
        assert fastadagrad.adagrad_update(p, g, h, step=step, rounding=rounding,
                                          seed=seed, master=m, **kw) is True
        reference_step_half(pr, g, hr, hyper, step, master=mr, rounding=rounding,
                            seed=seed)
    assert_bits_equal(p, pr, "param")
    assert_bits_equal(h, hr, "state")
    if m is not None:
        assert mr is not None
        assert_bits_equal(m, mr, "master")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_nearest_matches_reference(rng, path, n, dtype):
    p, gs = _arrays(rng, (n,), dtype, 3 if n > 1000 else 10)
    _run(p, gs, dict(lr=0.05))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (1, 0, 3), (7, 1, 1, 9)])
def test_nd_shapes(rng, path, shape, dtype):
    p, gs = _arrays(rng, shape, dtype, 4)
    _run(p, gs, dict(lr=0.05))


OPTIONS = [
    dict(lr=0.1, lr_decay=0.01),
    dict(lr=0.1, weight_decay=0.05),
    dict(lr=0.1, weight_decay=0.05, rule=Rule(weight_decay_mode="decoupled")),
    dict(lr=0.1, weight_decay=0.05, rule=Rule(fma_weight_decay=True)),
    dict(lr=0.1, rule=Rule(fma_accumulate=True)),
    dict(lr=0.1, eps=1e-3, rule=Rule(eps_placement="inside")),
    dict(lr=0.1, rule=Rule(lr_placement="after", zero_where_h0=True)),
    dict(lr=0.1, maximize=True),
    dict(lr=0.1, grad_scale=1024.0),
    dict(lr=0.0),
    dict(lr=3.0, eps=0.0),
] + [dict(rule=pr.rule, **{k: v for k, v in pr.defaults.items()
                          if k != "initial_accumulator_value"}) for pr in PRESETS.values()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kw", OPTIONS, ids=lambda kw: ",".join(
    f"{k}={v}" for k, v in kw.items() if k != "rule") + (
    f",{kw['rule']}" if "rule" in kw else ""))
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_every_option(rng, kw, dtype, rounding):
    """Every flag and preset, nearest and stochastic, with and without master weights;
    a zero gradient in places (the zero_where_h0 branch), accumulator started at 0.1."""
    p, gs = _arrays(rng, (300,), dtype, 6)
    for g in gs[:3]:
        g[::7] = 0
    seed = 7 if rounding == "stochastic" else None
    for master in (False, True):
        _run(p.copy(), gs, kw, master=master, rounding=rounding, seed=seed, init=0.1)
        _run(p.copy(), gs, kw, master=master, rounding=rounding, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_stochastic_matches_numpy_statement(rng, path, n, dtype):
    p, gs = _arrays(rng, (n,), dtype, 3 if n > 1000 else 10)
    _run(p, gs, dict(lr=0.05), rounding="stochastic", seed=12345)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_master_weights_many_steps(rng, path, dtype):
    p, gs = _arrays(rng, (1001,), dtype, 30)
    _run(p, gs, dict(lr=0.01), master=True)
    _run(p, gs, dict(lr=0.01), master=True, rounding="stochastic", seed=3)


def test_hand_computed_values():
    """Guards against the kernel and the reference drifting together: 1 - 0.1*0.5/0.5
    = 0.9 in float32 (0x3f666666), rounded: bfloat16 0x3f66, float16 0x3b33."""
    for dtype, expected in ((BF16, 0.8984375), (F16, 0.89990234375)):
        p, g, h = np.ones(4, dtype), np.full(4, 0.5, dtype), np.zeros(4, np.float32)
        fastadagrad.adagrad_update(p, g, h, lr=0.1)
        assert p.astype(np.float64).tolist() == [expected] * 4
        assert h.tolist() == [0.25] * 4


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nonfinite_values_follow_the_reference(rng, dtype):
    """NaN and inf gradients and params, huge values that overflow the 16-bit format
    when rounded, float16 subnormals: the reference's bits (NaN canonicalisation
    included)."""
    n = 64
    p = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    g[0], g[1], p[2], p[3] = np.nan, np.inf, -np.inf, np.nan
    p[4] = -np.asarray(6e-8, np.float32).astype(dtype)  # subnormal in float16
    big = np.float32(3.38e38) if dtype == BF16 else np.float32(65500)
    p[5:9] = np.asarray([big, -big, big, -big], np.float32).astype(dtype)
    for rounding, seed in (("nearest", None), ("stochastic", 9)):
        _run(p.copy(), [g, g], dict(lr=200.0), rounding=rounding, seed=seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_stochastic_same_seed_same_bits_thread_count_irrelevant(rng, dtype, monkeypatch):
    n = 50_003
    p0, gs = _arrays(rng, (n,), dtype, 3)
    results = []
    for threads, chunk, threshold in ((1, 1 << 14, 0), (2, 64, 0), (2, 1000, 0),
                                      (numba.config.NUMBA_NUM_THREADS, 4096, 1 << 62)):
        monkeypatch.setattr(config, "CHUNK", chunk)
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", threshold)
        old = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            p, h = p0.copy(), np.zeros(n, np.float32)
            for step, g in enumerate(gs, 1):
                fastadagrad.adagrad_update(p, g, h, lr=0.01, step=step,
                                           rounding="stochastic", seed=42)
        finally:
            numba.set_num_threads(old)
        results.append(p)
    for r in results[1:]:
        assert_bits_equal(r, results[0], "threads/chunking")
    p = p0.copy()  # another seed gives other bits
    h = np.zeros(n, np.float32)
    for step, g in enumerate(gs, 1):
        fastadagrad.adagrad_update(p, g, h, lr=0.01, step=step, rounding="stochastic",
                                   seed=43)
    assert (p.view(np.uint16) != results[0].view(np.uint16)).mean() > 0.1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frac", [1 / 32, 0.25, 0.5, 29 / 32])  # exact lr, x
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stochastic_rounding_is_unbiased(dtype, frac, sign):
    """One step that takes every element of a 2^16 array to the same float32 value
    ``x = 1 - frac*ulp`` (between two 16-bit neighbours): the mean of the rounded
    results is ``x`` within 5 standard errors, ``5 * ulp * sqrt(f(1-f)/N)`` (a false
    alarm about once in 3.5 million runs). Nearest rounding fails the same criterion."""
    n = 1 << 16
    ulp = 2.0**-8 if dtype == BF16 else 2.0**-11  # spacing just below 1.0
    # g = 1, h = 0: q = lr*1/(sqrt(1) + 0) = lr exactly; x = 1 - lr is exact in float32
    lr = frac * ulp
    p = np.full(n, sign, dtype)
    g = np.full(n, sign, dtype)
    x = sign * (1.0 - lr)
    assert float(np.float32(x)) == x
    for rounding, seed in (("stochastic", 2026), ("nearest", None)):
        q, h = p.copy(), np.zeros(n, np.float32)
        fastadagrad.adagrad_update(q, g, h, lr=lr, eps=0.0, rounding=rounding, seed=seed)
        vals = q.astype(np.float64)
        assert set(np.unique(vals)) <= {sign * 1.0, sign * (1.0 - ulp)}
        tol = 5 * ulp * np.sqrt(frac * (1 - frac) / n)
        if rounding == "stochastic":
            assert abs(vals.mean() - x) <= tol, (vals.mean(), x, tol)
        else:
            assert abs(vals.mean() - x) > 2 * tol  # the criterion rejects nearest


def test_stochastic_unbiased_in_float16_subnormals():
    """The float16 path where the neighbours are subnormals (gap 2^-24)."""
    n = 1 << 16
    x = np.float32(5.3 * 2.0**-24)  # between 5 and 6 * 2^-24; frac ~0.3 (float32-exact)
    bits = R.rand32(*R.stream_key(1, 1), np.arange(n))
    vals = R.round_to(np.full(n, x), F16, "stochastic", bits).astype(np.float64)
    # the kernel: p = 0, g = -1, lr = x, h = 0, eps = 0 -> p' = 0 - (x*-1)/1 = x
    p, g, h = np.zeros(n, F16), np.full(n, -1.0, F16), np.zeros(n, np.float32)
    fastadagrad.adagrad_update(p, g, h, lr=float(x), eps=0.0, rounding="stochastic",
                               seed=1)
    assert_bits_equal(p, vals.astype(F16), "kernel vs reference")
    f = float(x) / 2.0**-24 - 5
    tol = 5 * 2.0**-24 * np.sqrt(f * (1 - f) / n)
    assert abs(vals.mean() - float(x)) <= tol


def test_tiny_updates_move_bfloat16_like_float32():
    """10^4 steps with g = 1: q_t = lr/sqrt(t) <= 1e-3, below half the bfloat16 spacing
    under 1.0 (2^-9): nearest rounding never moves p from 1.0, float32 moves it by
    sum(q_t) ~ 0.199. Stochastic rounding: each step's rounding error has mean 0 and
    variance <= ulp*q_t, so over the run sd <= sqrt(2^-8 * 0.2) ~ 0.028 per element;
    every element within 0.15 (5.3 sd) of float32 and the mean of 1024 elements within
    0.005 (5.7 sd of the mean)."""
    n, steps, lr = 1024, 10_000, 1e-3
    pb, pn = np.ones(n, BF16), np.ones(n, BF16)
    p32 = np.ones(n, np.float32)
    hb, hn, h32 = (np.zeros(n, np.float32) for _ in range(3))
    gb, g32 = np.ones(n, BF16), np.ones(n, np.float32)
    for step in range(1, steps + 1):
        fastadagrad.adagrad_update(pb, gb, hb, lr=lr, step=step, rounding="stochastic",
                                   seed=11)
        fastadagrad.adagrad_update(pn, gb, hn, lr=lr, step=step)
        fastadagrad.adagrad_update(p32, g32, h32, lr=lr, step=step)
    assert np.all(pn.astype(np.float32) == 1.0)  # nearest: stuck
    moved = 1.0 - float(p32[0])
    assert 0.19 < moved < 0.21
    d = pb.astype(np.float64) - p32.astype(np.float64)
    assert np.abs(d).max() < 0.15, np.abs(d).max()
    assert abs(d.mean()) < 0.005, d.mean()


def test_master_weights_track_float32_exactly(rng):
    """With master weights the float32 copy follows float32 training bit for bit (the
    grads being the same) and the half params are its rounding."""
    n = 777
    p32 = rng.standard_normal(n).astype(np.float32)
    pb = p32.astype(BF16)
    m = p32.copy()
    h, h32 = np.zeros(n, np.float32), np.zeros(n, np.float32)
    for step in range(1, 21):
        g = rng.standard_normal(n).astype(BF16)
        fastadagrad.adagrad_update(pb, g, h, lr=0.01, step=step, master=m)
        fastadagrad.adagrad_update(p32, g.astype(np.float32), h32, lr=0.01, step=step)
    assert_bits_equal(m, p32, "master")
    assert_bits_equal(pb, p32.astype(BF16), "param")


def test_nonfinite_skip_and_raise_change_nothing(rng):
    for dtype in DTYPES:
        p, g = rng.standard_normal(100).astype(dtype), rng.standard_normal(100).astype(dtype)
        g[57] = np.nan
        h = np.ones(100, np.float32)
        p0, h0 = p.copy(), h.copy()
        assert fastadagrad.adagrad_update(p, g, h, nonfinite="skip") is False
        with pytest.raises(FloatingPointError, match="grad contains NaN"):
            fastadagrad.adagrad_update(p, g, h, nonfinite="raise")
        g[57] = 1e4  # finite in the format, inf after dividing by grad_scale=1e-36
        with pytest.raises(FloatingPointError):
            fastadagrad.adagrad_update(p, g, h, nonfinite="raise", grad_scale=1e-36)
        assert_bits_equal(p, p0)
        assert_bits_equal(h, h0)
        assert fastadagrad.adagrad_update(p, g, h, nonfinite="skip") is True


def test_no_recompilation(rng):
    p, g, h = np.ones(10, BF16), np.ones(10, BF16), np.zeros(10, np.float32)
    for _ in range(2):
        for dtype in DTYPES:
            fastadagrad.adagrad_update(p.astype(dtype), g.astype(dtype), h.copy())
    nearest_sigs = [s for s in cpu_half.adagrad_half_span.signatures
                    if isinstance(s[3], numba.types.NoneType)]
    assert len({s[0] for s in nearest_sigs}) == len(nearest_sigs) <= 2


# --- bad input: a clear error naming the argument, and nothing changed --------------

def _bad_cases(rng):
    def ok():
        return (rng.standard_normal(8).astype(BF16), rng.standard_normal(8).astype(BF16),
                np.zeros(8, np.float32))

    p, g, h = ok()
    yield "grad dtype", (p, g.astype(F16), h), {}, TypeError, "grad has dtype float16"
    p, g, h = ok()
    yield "grad f32", (p, g.astype(np.float32), h), {}, TypeError, "grad has dtype float32"
    p, g, h = ok()
    yield "f16 state", (p.astype(F16), g.astype(F16), h.astype(F16)), {}, TypeError, \
        "state_sum has dtype float16: a 16-bit sum .* overflows"
    p, g, h = ok()
    yield "bf16 state", (p, g, h.astype(BF16)), {}, TypeError, "stops growing"
    p, g, h = ok()
    yield "f64 state", (p, g, h.astype(np.float64)), {}, TypeError, "must be float32"
    p, g, h = ok()
    yield "big-endian", (p.astype(">f2"), g.astype(">f2"), h), {}, TypeError, \
        "param has dtype >f2; .*native byte order only"
    p, g, h = ok()
    yield "rounding", (p, g, h), dict(rounding="up"), ValueError, "rounding must be one"
    p, g, h = ok()
    yield "no seed", (p, g, h), dict(rounding="stochastic"), ValueError, "needs seed"
    p, g, h = ok()
    yield "seed type", (p, g, h), dict(rounding="stochastic", seed=1.5), TypeError, "seed"
    p, g, h = ok()
    yield "seed range", (p, g, h), dict(rounding="stochastic", seed=-1), ValueError, "seed"
    p, g, h = ok()
    yield "shape", (p, g[:4], h), {}, ValueError, "grad has shape"
    p, g, h = ok()
    yield "state shape", (p, g, h[:4]), {}, ValueError, "state_sum has shape"
    p, g, h = ok()
    yield "master dtype", (p, g, h), dict(master=np.zeros(8, np.float64)), TypeError, \
        "master has dtype float64"
    p, g, h = ok()
    yield "master shape", (p, g, h), dict(master=np.zeros(7, np.float32)), ValueError, \
        "master has shape"
    p, g, h = ok()
    yield "alias", (p, g, h), dict(master=h), ValueError, "share memory"
    p, g, h = ok()
    h2 = np.zeros(16, np.float32)
    yield "alias p/h", (p, g, h2[:8].view(np.float32)), dict(master=h2[4:12]), \
        ValueError, "share memory"
    p, g, h = ok()
    pr = p.copy()
    pr.flags.writeable = False
    yield "read-only", (pr, g, h), {}, ValueError, "param is read-only"
    p, g, h = ok()
    big = np.zeros(16, BF16)
    yield "strided", (big[::2], g, h), {}, ValueError, "param is not C-contiguous"
    p, g, h = ok()
    yield "f32 stochastic", (p.astype(np.float32), g.astype(np.float32), h), \
        dict(rounding="stochastic", seed=1), TypeError, "applies to bfloat16/float16"
    p, g, h = ok()
    yield "f32 master", (p.astype(np.float32), g.astype(np.float32), h), \
        dict(master=np.zeros(8, np.float32)), TypeError, "master= applies"
    p, g, h = ok()
    yield "grad list", (p, list(g), h), {}, TypeError, "grad must be a NumPy array"


def test_bad_input_changes_nothing(rng):
    seen = 0
    for name, args, kw, exc, msg in _bad_cases(rng):
        before = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        master = kw.get("master")
        m0 = None if master is None else master.copy()
        with pytest.raises(exc, match=msg):
            fastadagrad.adagrad_update(*args, **kw)
        for a, b in zip(args, before):
            if isinstance(a, np.ndarray):
                assert_bits_equal(a, b, name)
        if master is not None:
            assert_bits_equal(master, m0, name)
        seen += 1
    assert seen == 21


# --- the AdaGrad class -----------------------------------------------------------

def _model(rng):
    return {"emb": rng.standard_normal((40, 8)).astype(BF16),
            "w": rng.standard_normal((8, 3)).astype(np.float32),
            "b": rng.standard_normal(3).astype(F16)}


def _reference_model(params, grads_seq, *, rounding, seed, master, lr=0.05, init=0.1):
    """The class's contract, element by element: float32 state, one stream per
    position in the model, float32 params through reference_step."""
    from fastadagrad.reference import reference_step

    hyper = Hyper.make(lr=lr)
    p = {k: v.copy() for k, v in params.items()}
    h = {k: np.full(v.shape, init, np.float32 if v.dtype.itemsize == 2 else v.dtype)
         for k, v in params.items()}
    m = {k: v.astype(np.float32) for k, v in params.items() if v.dtype.itemsize == 2
         } if master else {}
    for step, grads in enumerate(grads_seq, 1):
        for t, k in enumerate(p):
            if p[k].dtype.itemsize == 2:
                reference_step_half(p[k], grads[k], h[k], hyper, step, master=m.get(k),
                                    rounding=rounding, seed=seed, tensor=t)
            else:
                reference_step(p[k], grads[k], h[k], hyper, step)
    return p, h, m


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_class_mixed_model_matches_reference(rng, path, rounding, master):
    params = _model(rng)
    grads_seq = [{k: (rng.standard_normal(v.shape) * 0.5).astype(v.dtype)
                  for k, v in params.items()} for _ in range(5)]
    ref_p, ref_h, ref_m = _reference_model(params, grads_seq, rounding=rounding, seed=5,
                                           master=master)
    p = {k: v.copy() for k, v in params.items()}
    ids = {k: id(v) for k, v in p.items()}
    opt = fastadagrad.AdaGrad(lr=0.05, initial_accumulator_value=0.1, rounding=rounding,
                              seed=5, master_weights=master)
    for grads in grads_seq:
        assert opt.update(p, grads) is True
    assert opt.step == 5
    assert {k: id(v) for k, v in p.items()} == ids  # updated in place
    for k in p:
        assert_bits_equal(p[k], ref_p[k], k)
        assert_bits_equal(opt.h[k], ref_h[k], k)
        assert opt.h[k].dtype == (np.float32 if p[k].dtype.itemsize == 2 else p[k].dtype)
    if master:
        assert set(opt.master) == {"emb", "b"}
        for k in opt.master:
            assert_bits_equal(opt.master[k], ref_m[k], k)
    else:
        assert opt.master is None


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("model", ["float", "mixed"])
@pytest.mark.parametrize("change", ["to 16 bits", "to float32"])
def test_class_param_changing_dtype_steps_as_a_fresh_optimizer(rng, model, change, master):
    """A param that changes between float32 and 16 bits between two steps (its float32
    state still fits it) is updated as by a fresh optimizer given the same state: the
    list of 16-bit params the optimizer caches is made again (with master weights: a
    new 16-bit param gets its float32 copy, one now float32 drops its own)."""
    p = {"a": rng.standard_normal(6).astype(BF16 if model == "mixed" else np.float32),
         "b": rng.standard_normal(5).astype(np.float32 if change == "to 16 bits" else BF16)}
    opt = fastadagrad.AdaGrad(lr=0.1, master_weights=master)
    opt.update(p, {k: np.ones_like(v) for k, v in p.items()})
    p["b"] = p["b"].astype(BF16 if change == "to 16 bits" else np.float32)
    grads = {k: (rng.standard_normal(v.shape) * 0.5).astype(v.dtype) for k, v in p.items()}
    sd = opt.state_dict()
    if master and change == "to float32":  # (its copy no longer describes a 16-bit param)
        sd["state"][1].pop("master", None)
    fresh = fastadagrad.AdaGrad(lr=0.1, master_weights=master)
    q = {k: v.copy() for k, v in p.items()}
    fresh.load_state_dict(sd, params=q)
    assert fresh.update(q, grads) is True
    assert opt.update(p, grads) is True
    for k in p:
        assert_bits_equal(p[k], q[k], k)
        assert_bits_equal(opt.h[k], fresh.h[k], k)
    assert opt.step == 2
    if master:
        half = {k for k, v in p.items() if v.dtype == BF16}
        assert set(opt.master or {}) == half
        for k in half:
            assert_bits_equal(opt.master[k], fresh.master[k], k)


def test_class_bad_input_changes_nothing(rng):
    params = _model(rng)
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    opt = fastadagrad.AdaGrad(master_weights=True, rounding="stochastic", seed=1)
    opt.update(params, grads)
    before = {k: v.copy() for k, v in params.items()}
    h0 = {k: v.copy() for k, v in opt.h.items()}
    m0 = {k: v.copy() for k, v in opt.master.items()}
    for k, bad, exc, msg in (
            ("emb", grads["emb"].astype(F16), TypeError, r"grads\['emb'\] has dtype float16"),
            ("w", grads["w"][:2], ValueError, r"grads\['w'\] has shape"),
            ("b", np.full(3, np.nan, F16), None, None)):
        g = dict(grads)
        g[k] = bad
        if exc is None:  # a NaN in a 16-bit grad, with nonfinite="raise"
            opt.nonfinite = "raise"
            with pytest.raises(FloatingPointError, match=r"grads\['b'\] contains NaN"):
                opt.update(params, g)
            opt.nonfinite = "ignore"
        else:
            with pytest.raises(exc, match=msg):
                opt.update(params, g)
        for key in params:
            assert_bits_equal(params[key], before[key], key)
            assert_bits_equal(opt.h[key], h0[key], key)
        for key in opt.master:
            assert_bits_equal(opt.master[key], m0[key], key)
    assert opt.step == 1
    for kw, exc in ((dict(rounding="down"), ValueError), (dict(seed="1"), TypeError),
                    (dict(master_weights=1), TypeError)):
        with pytest.raises(exc):
            fastadagrad.AdaGrad(**kw)


def _cross_alias(case, opt, params, grads):
    """Make one array of the float32 group share memory with one of the 16-bit group."""
    if case == "float16 param over float32 param":
        params["b"] = params["w"].reshape(-1)[:2].view(F16)[:3]
        params["b"][:] = 1.0  # (the test's snapshot is taken after this)
    elif case == "bf16 grad over float32 param":
        grads["b"] = params["w"].reshape(-1)[:3].view(F16)[:3]
    elif case == "float32 grad over bf16 param":
        grads["w"] = params["emb"].reshape(-1)[:48].view(np.float32).reshape(8, 3)
    elif case == "float32 grad is a bf16 state":
        grads["w"] = opt.h["emb"].reshape(-1)[:24].reshape(8, 3)
    elif case == "float32 grad is a master copy":
        grads["w"] = opt.master["emb"].reshape(-1)[:24].reshape(8, 3)
    return {"float16 param over float32 param": ("params['w']", "params['b']"),
            "bf16 grad over float32 param": ("params['w']", "grads['b']"),
            "float32 grad over bf16 param": ("params['emb']", "grads['w']"),
            "float32 grad is a bf16 state": ("state_sum['emb']", "grads['w']"),
            "float32 grad is a master copy": ("the master copy of params['emb']",
                                              "grads['w']")}[case]


def test_data_addresses_are_numpys():
    from fastadagrad._plan import data_addresses

    arrays = [np.zeros(n, dt) for n, dt in ((5, np.float32), (0, BF16), (3, np.float64),
                                            (7, np.float16))]
    arrays.append(np.zeros((4, 6), np.float32)[1:3])  # a view: its own data address
    for k in (1, 2, len(arrays)):  # (two or fewer: read in Python)
        assert data_addresses(arrays[:k]) == [a.__array_interface__["data"][0]
                                              for a in arrays[:k]]


def _assert_alias_refused(opt, params, grads, names):
    """The step raises "share memory" naming both arrays; nothing changes."""
    before = {k: v.copy() for k, v in params.items()}
    h0 = {k: v.copy() for k, v in opt.h.items()}
    m0 = {k: v.copy() for k, v in opt.master.items()}
    with pytest.raises(ValueError, match="share memory") as err:
        opt.update(params, grads)
    assert all(name in str(err.value) for name in names), str(err.value)
    for key in params:
        assert_bits_equal(params[key], before[key], key)
    for key in opt.h:
        assert_bits_equal(opt.h[key], h0[key], key)
    for key in opt.master:
        assert_bits_equal(opt.master[key], m0[key], key)
    assert opt.step == 1


@pytest.mark.parametrize("case", ["grad is its own param", "grad over another param",
                                  "grad is another state", "grad is a master copy",
                                  "param over another param"])
def test_class_16bit_model_refuses_aliasing_within_the_group(rng, case):
    """A model of several 16-bit arrays: one sort of all their byte ranges checks each
    set's own arrays and the sets against each other (the compiled address read); an
    alias raises naming both arrays, and nothing changes."""
    params = {k: rng.standard_normal(s).astype(BF16)
              for k, s in (("a", (6, 4)), ("b", (24,)), ("c", (3, 8)))}
    grads = {k: rng.standard_normal(v.shape).astype(BF16) for k, v in params.items()}
    opt = fastadagrad.AdaGrad(master_weights=True)
    opt.update(params, grads)
    if case == "grad is its own param":
        grads["b"], names = params["b"], ("params['b']", "grads['b']")
    elif case == "grad over another param":
        grads["c"] = params["a"].reshape(-1)[:24].reshape(3, 8)
        names = ("params['a']", "grads['c']")
    elif case == "grad is another state":
        grads["b"] = opt.h["a"].reshape(-1)[:12].view(BF16)
        names = ("state_sum['a']", "grads['b']")
    elif case == "grad is a master copy":
        grads["a"] = opt.master["c"].reshape(-1)[:12].view(BF16).reshape(6, 4)
        names = ("the master copy of params['c']", "grads['a']")
    else:
        params["c"] = params["b"].reshape(3, 8)
        names = ("params['b']", "params['c']")
    _assert_alias_refused(opt, params, grads, names)


@pytest.mark.parametrize("case", ["float16 param over float32 param",
                                  "bf16 grad over float32 param",
                                  "float32 grad over bf16 param",
                                  "float32 grad is a bf16 state",
                                  "float32 grad is a master copy"])
def test_class_mixed_model_refuses_aliasing_across_groups(rng, case):
    # each dtype group checks its own arrays; these share memory across the groups
    params = _model(rng)
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    opt = fastadagrad.AdaGrad(master_weights=True)
    opt.update(params, grads)
    names = _cross_alias(case, opt, params, grads)
    _assert_alias_refused(opt, params, grads, names)


@pytest.mark.parametrize("bad", ["wrong shape", "overflowing lr"])
def test_skipped_step_still_refuses_bad_float32_input(rng, bad):
    # a NaN in a 16-bit gradient skips the step (nonfinite="skip"); the float32 arrays
    # must still be validated, as a float32-only model's are, and nothing counted
    params = _model(rng)
    grads = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    opt = fastadagrad.AdaGrad(nonfinite="skip", lr=0.05)
    opt.update(params, grads)
    g = dict(grads)
    g["b"] = np.full(3, np.nan, F16)
    if bad == "wrong shape":
        g["w"], exc, msg = grads["w"][:2], ValueError, r"grads\['w'\] has shape"
    else:
        opt.lr, exc, msg = 1e39, ValueError, "overflows to inf in float32"
    before = {k: v.copy() for k, v in params.items()}
    h0 = {k: v.copy() for k, v in opt.h.items()}
    with pytest.raises(exc, match=msg):
        opt.update(params, g)
    assert (opt.step, opt.skipped_steps) == (1, 0)
    for k in params:
        assert_bits_equal(params[k], before[k], k)
        assert_bits_equal(opt.h[k], h0[k], k)


@pytest.mark.parametrize("how", ["state_dict", "file", "pickle"])
def test_checkpoint_carries_master_and_rounding(rng, tmp_path, how):
    """Train 3 steps, save, train 3 more; a fresh optimizer loaded from the save and
    trained on the same 3 grads gives the same bits (stochastic rounding included)."""
    import pickle

    params = _model(rng)
    grads_seq = [{k: rng.standard_normal(v.shape).astype(v.dtype)
                  for k, v in params.items()} for _ in range(6)]
    opt = fastadagrad.AdaGrad(lr=0.05, rounding="stochastic", seed=77, master_weights=True)
    for grads in grads_seq[:3]:
        opt.update(params, grads)
    saved_params = {k: v.copy() for k, v in params.items()}
    if how == "state_dict":
        sd = opt.state_dict()
        assert set(sd["state"][0]) == {"sum", "step", "master"}  # emb: 16-bit
        assert set(sd["state"][1]) == {"sum", "step"}  # w: float32, no master
        assert sd["param_groups"][0]["fastadagrad"]["rounding"] == "stochastic"
        new = fastadagrad.AdaGrad(lr=0.05)
        new.load_state_dict(sd, saved_params)
    elif how == "file":
        path = opt.save(tmp_path / "ckpt")
        new = fastadagrad.AdaGrad(lr=0.05)
        new.load(path, saved_params)
    else:
        new = pickle.loads(pickle.dumps(opt))
    assert (new.rounding, new.seed, new.master_weights) == ("stochastic", 77, True)
    for grads in grads_seq[3:]:
        opt.update(params, grads)
        new.update(saved_params, grads)
    for k in params:
        assert_bits_equal(saved_params[k], params[k], k)
        assert_bits_equal(new.h[k], opt.h[k], k)
    for k in opt.master:
        assert_bits_equal(new.master[k], opt.master[k], k)


def test_checkpoint_bad_master_refused(rng):
    params = _model(rng)
    opt = fastadagrad.AdaGrad(master_weights=True)
    opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
    sd = opt.state_dict()
    sd["state"][0]["master"] = sd["state"][0]["master"][:3]
    fresh = fastadagrad.AdaGrad()
    from fastadagrad.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"state\[0\]\['master'\] must be a float32"):
        fresh.load_state_dict(sd, params)
    assert fresh.h is None and fresh.master is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_random_stream_across_the_2_32_index_boundary(rng, dtype):
    """A span whose indices cross 2^32 (a tensor of > 4G elements): the kernel splits
    it so the high index word is constant per piece; the bits are still
    rand32(k0, k1, index) element by element."""
    n, base = 40, 2**32 - 17
    x = rng.standard_normal(n).astype(np.float32)
    p = np.zeros(n, dtype)  # p = 0, g = -1, h = 0, lr = x: p' = x exactly (eps = 0)
    k0, k1 = R.stream_key(3, 5, 1)
    carrier = R.HALF_CARRIERS[dtype.name]
    for i in range(n):  # lr per element: one call per element, each at its own index
        hyper = Hyper.make(lr=float(abs(x[i])), eps=0.0)
        co = hyper.coefficients(np.float32, 1)
        g = np.full(1, -np.sign(x[i]), dtype)
        cpu_half.adagrad_half_span(p[i:i + 1].view(carrier), g.view(carrier),
                                   np.zeros(1, np.float32), None, base + i, k0, k1,
                                   *co[:7], co[7] | cpu_half.STOCHASTIC)
    bits = R.rand32(k0, k1, base + np.arange(n, dtype=np.uint64))
    assert_bits_equal(p, R.round_to(x, dtype, "stochastic", bits))
    # and one call over the whole span, crossing the boundary inside
    q = np.zeros(n, dtype)
    y = np.full(n, 0.3, np.float32) + np.arange(n, dtype=np.float32) * np.float32(1e-3)
    co = Hyper.make(lr=1.0, eps=0.0).coefficients(np.float32, 1)
    # p = 0, g = -y, h = 0: q = (1*-y)/(|y|) = -1, p' = 1: use master = y - 1 instead
    m = (y - np.float32(1.0)).astype(np.float32)
    expect_m = m + np.float32(1.0)
    cpu_half.adagrad_half_span(q.view(carrier), np.full(n, -1.0, dtype).view(carrier),
                               np.zeros(n, np.float32), m, base, k0, k1, *co[:7],
                               co[7] | cpu_half.STOCHASTIC)
    assert_bits_equal(m, expect_m)
    bits = R.rand32(k0, k1, base + np.arange(n, dtype=np.uint64))
    assert_bits_equal(q, R.round_to(expect_m, dtype, "stochastic", bits))


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"),
                    reason="checks x86 instructions")
@pytest.mark.parametrize("carrier", [np.int16, np.uint16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_loop_vectorises(carrier, stochastic):
    """The per-element loop compiles to packed square roots and divisions (SIMD), with
    the 16-bit conversions and the random stream inline: a fresh, uncached compile of
    the loop (cached code cannot be inspected)."""
    fresh = numba.njit(error_model="numpy", cache=False)(cpu_half._half_piece.py_func)
    co = Hyper.make(lr=0.1).coefficients(np.float32, 1)
    n = 64
    p, g = np.zeros(n, carrier), np.zeros(n, carrier)
    fresh(p, g, np.zeros(n, np.float32), None, np.uint32(0), np.uint32(1), np.uint32(2),
          *co[:7], co[7] | (cpu_half.STOCHASTIC if stochastic else 0))
    asm = next(iter(fresh.inspect_asm().values()))
    assert "sqrtps" in asm and "divps" in asm, "no packed sqrt/div: the loop is scalar"
    if carrier is np.uint16:
        assert "cvtps2ph" in asm and "cvtph2ps" in asm  # F16C, packed
    if stochastic:
        assert "pmulld" in asm  # the hash, packed 32-bit multiplies


def test_flat_buffer_converts_16_bit_arrays_when_asked():
    """FlatBuffer holds float32/float64: bfloat16 and float16 arrays need dtype=, and
    with it convert exactly (bfloat16 was refused as a dtype 'which does not convert',
    contradicting the message that asked for dtype=)."""
    for dt in DTYPES:
        a = np.array([1.5, -2.0, 3.0], dt)
        with pytest.raises(TypeError, match="pass dtype= to convert"):
            fastadagrad.FlatBuffer({"a": a})
        buf = fastadagrad.FlatBuffer({"a": a}, dtype=np.float32)
        assert_bits_equal(buf["a"], a.astype(np.float32), str(dt))
