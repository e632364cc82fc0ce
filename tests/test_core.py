"""The CPU fast paths against the plain-NumPy reference, bit for bit (issue 2)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastadagrad
from fastadagrad import _dispatch, config, cpu
from fastadagrad._hyper import Hyper
from fastadagrad.reference import NumpyAdaGrad, reference_step
from fastadagrad.testing import assert_bits_equal

SIZES = [0, 1, 15, 16, 17, 1000, 2**20 + 3]
DTYPES = [np.float32, np.float64]


def _grads(rng: np.random.Generator, shape: tuple[int, ...], dtype: type, steps: int
           ) -> list[np.ndarray]:
    return [rng.standard_normal(shape).astype(dtype) for _ in range(steps)]


@pytest.fixture(params=["parallel", "serial"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test through the parallel kernel (threshold 0) and the serial one."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0 if request.param == "parallel"
                        else 1 << 62)
    # small chunks so that several chunks and a ragged last chunk run at modest sizes
    monkeypatch.setattr(config, "CHUNK", 64)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_functional_matches_reference(rng, path, n, dtype):
    steps = 3 if n > 10**5 else 12
    p0 = rng.standard_normal(n).astype(dtype)
    p, h = p0.copy(), np.zeros(n, dtype)
    pr, hr = p0.copy(), np.zeros(n, dtype)
    hyper = Hyper.make(lr=0.05, eps=1e-7)
    for g in _grads(rng, (n,), dtype, steps):
        assert fastadagrad.adagrad_update(p, g, h, lr=0.05, eps=1e-7) is True
        reference_step(pr, g, hr, hyper)
    assert_bits_equal(p, pr, "param")
    assert_bits_equal(h, hr, "state")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_class_matches_numpy_class(rng, path, n, dtype):
    """Drop-in: bit-identical to the NumPy class the project started from."""
    steps = 3 if n > 10**5 else 20
    init = {"w": rng.standard_normal(n).astype(dtype),
            "b": rng.standard_normal(7).astype(dtype)}
    ours = {k: v.copy() for k, v in init.items()}
    theirs = {k: v.copy() for k, v in init.items()}
    opt, ref = fastadagrad.AdaGrad(lr=0.01), NumpyAdaGrad(lr=0.01)
    for _ in range(steps):
        grads = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in init.items()}
        opt.update(ours, grads)
        ref.update(theirs, grads)
    for k in init:
        assert_bits_equal(ours[k], theirs[k], k)
        assert_bits_equal(opt.h[k], ref.h[k], f"h[{k}]")


@pytest.mark.parametrize("shape", [(), (3, 5), (2, 3, 4, 5), (1, 1, 17), (0, 4)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nd_shapes_are_flat(rng, path, shape, dtype):
    p = rng.standard_normal(shape).astype(dtype)
    pr = p.copy()
    h, hr = np.zeros_like(p), np.zeros_like(p)
    for g in _grads(rng, shape, dtype, 5):
        fastadagrad.adagrad_update(p, g, h)
        reference_step(pr, g, hr, Hyper.make())
    assert p.shape == shape
    assert_bits_equal(p, pr)
    assert_bits_equal(h, hr)


def test_hand_computed_values():
    """Guards against the kernel and the reference drifting together.

    p0 = 1, g = 0.5 every step, lr = 0.1: h_k = 0.25 k, so
    p_k = 1 - sum_{j<=k} 0.05 / (0.5 sqrt(j) + 1e-7), summed here in Python floats.
    """
    p, g, h = np.ones(3), np.full(3, 0.5), np.zeros(3)
    expected = 1.0
    for k in range(1, 6):
        fastadagrad.adagrad_update(p, g, h, lr=0.1)
        expected -= 0.05 / (0.5 * math.sqrt(k) + 1e-7)
        np.testing.assert_allclose(p, expected, rtol=1e-15)
        np.testing.assert_allclose(h, 0.25 * k, rtol=0)
    # first float32 step by hand: float32(0.5 + 1e-7) = 0.50000011920928955 (one ulp at
    # 0.5 is 2^-24 ~ 6e-8, so 1e-7 rounds to 2 ulp); f32(0.1)*0.5 / that = 0.099999979...,
    # rounds to 0.09999998; 1 - 0.09999998 = 0.90000002 -> nearest float32 is 0.90000004
    p32 = np.ones(1, np.float32)
    fastadagrad.adagrad_update(p32, np.full(1, 0.5, np.float32), np.zeros(1, np.float32),
                               lr=0.1)
    assert p32[0] == np.float32(0.90000004)


class Layer:
    """A layer that holds references to its parameter arrays, as real code does."""

    def __init__(self, w: np.ndarray, b: np.ndarray) -> None:
        self.W, self.b = w, b

    def forward(self, x: np.ndarray) -> np.ndarray:
        return x @ self.W + self.b


@pytest.mark.parametrize("dtype", DTYPES)
def test_drop_in_two_layer_net_keeps_identity(rng, dtype):
    shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
    params = {k: (0.01 * rng.standard_normal(s)).astype(dtype) for k, s in shapes.items()}
    ref_params = {k: v.copy() for k, v in params.items()}
    layers = [Layer(params["W1"], params["b1"]), Layer(params["W2"], params["b2"])]
    ids = {k: id(v) for k, v in params.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    for _ in range(30):
        grads = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        opt.update(params, grads)
        ref.update(ref_params, grads)
    assert {k: id(v) for k, v in params.items()} == ids
    assert layers[0].W is params["W1"] and layers[1].b is params["b2"]
    for k in shapes:
        assert_bits_equal(params[k], ref_params[k], k)
    x = rng.standard_normal((2, 784)).astype(dtype)
    out = layers[1].forward(layers[0].forward(x))
    ref_out = (x @ ref_params["W1"] + ref_params["b1"]) @ ref_params["W2"] + ref_params["b2"]
    assert_bits_equal(out, ref_out)


def test_list_params_and_mixed_dtypes(rng, path):
    init = [rng.standard_normal(s).astype(dt) for s, dt in
            [((40, 3), np.float32), ((100,), np.float64), ((5,), np.float32), (17, np.float64)]]
    ours = [a.copy() for a in init]
    theirs = {i: a.copy() for i, a in enumerate(init)}
    opt, ref = fastadagrad.AdaGrad(lr=0.03), NumpyAdaGrad(lr=0.03)
    for _ in range(10):
        grads = [rng.standard_normal(a.shape).astype(a.dtype) for a in init]
        opt.update(ours, grads)
        ref.update(theirs, dict(enumerate(grads)))
    assert isinstance(opt.h, list)
    for i in range(len(init)):
        assert_bits_equal(ours[i], theirs[i], str(i))


def test_hashable_keys(rng):
    keys = [("layer", 0), 3, frozenset({"a"}), "x"]
    params = {k: rng.standard_normal(9).astype(np.float32) for k in keys}
    ref_params = {k: v.copy() for k, v in params.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    grads = {k: rng.standard_normal(9).astype(np.float32) for k in keys}
    opt.update(params, grads)
    ref.update(ref_params, grads)
    for k in keys:
        assert_bits_equal(params[k], ref_params[k])


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of the kernel ``name`` (``adagrad_flat_parallel`` and friends),
    whether through its by-name entry point or the per-formula set (``cpu.kernels``)
    that the functional fast path and the plans call directly."""
    from fastadagrad import optim

    calls = [0]
    real = getattr(cpu, name)

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(cpu, name, counting)
    field = name.removeprefix("adagrad_")
    real_kernels = cpu.kernels

    def kernels(flags):
        k = real_kernels(flags)
        inner = getattr(k, field)

        def counted(*args):
            calls[0] += 1
            return inner(*args)

        return k._replace(**{field: counted})

    monkeypatch.setattr(cpu, "kernels", kernels)
    optim._cached_fast.cache_clear()  # cached kernels from before the patch
    optim._PLAIN.clear()
    optim._PLAIN_LAST.clear()
    return calls


def test_flat_buffers_take_one_kernel_call(rng, monkeypatch):
    shapes = {f"t{i}": (int(s),) for i, s in enumerate(rng.integers(1, 5000, 30))}
    init = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params = fastadagrad.FlatBuffer(init)
    ref_params = {k: v.copy() for k, v in init.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    # one call per step over the whole buffer, whichever parallel kernel takes it
    flat = _count_calls(monkeypatch, "adagrad_flat_parallel")
    many = _count_calls(monkeypatch, "adagrad_many_parallel")
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0)
    for step in range(5):
        grads = params.zeros_like()
        for k in shapes:
            grads[k][...] = rng.standard_normal(shapes[k])
        opt.update(params, grads)
        ref.update(ref_params, {k: grads[k].copy() for k in shapes})
        assert flat[0] + many[0] == step + 1
    for k in shapes:
        assert_bits_equal(params[k], ref_params[k], k)
    assert np.shares_memory(params["t0"], params.data)


def test_chunk_setting_changed_between_steps(rng, monkeypatch):
    """A cached plan reads config.CHUNK again: its spans follow a new setting."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0)
    params = {f"t{i}": rng.standard_normal(n).astype(np.float32)
              for i, n in enumerate((40_000, 2**15 + 3, 9))}
    ref_params = {k: v.copy() for k, v in params.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    for chunk in (1 << 14, 1000, 1 << 14):
        monkeypatch.setattr(config, "CHUNK", chunk)
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.update(params, grads)
        ref.update(ref_params, grads)
        assert opt._plan.groups[0][2][2].max() == chunk
    for k in params:
        assert_bits_equal(params[k], ref_params[k], k)


@pytest.mark.parametrize("bad", [-5, 0, 2.5, True])
@pytest.mark.parametrize("case", ["dict", "flat-skip", "float16"])
def test_bad_chunk_setting_raises_before_writing(monkeypatch, bad, case):
    """config.CHUNK that is not an int >= 1: a clear error naming it, nothing written
    (a negative one made the parallel kernels skip every element and report success)."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0)
    monkeypatch.setattr(config, "CHUNK", bad)
    dt = np.float16 if case == "float16" else np.float32
    params = {"w": np.ones(5000, dt), "b": np.ones(7, dt)}
    if case == "flat-skip":
        params = fastadagrad.FlatBuffer(params)
    grads = {k: np.full(v.shape, 0.5, dt) for k, v in params.items()}
    before = {k: params[k].copy() for k in ("w", "b")}
    opt = fastadagrad.AdaGrad(nonfinite="skip" if case == "flat-skip" else "ignore")
    with pytest.raises(ValueError, match=r"config\.CHUNK must be an int >= 1"):
        opt.update(params, grads)
    for k in before:
        assert_bits_equal(params[k], before[k], k)
    assert opt.step == 0


@pytest.mark.parametrize("case", ["pickled params", "pickled grad", "memmap grads"])
def test_grads_the_scan_did_not_know_are_learned(rng, monkeypatch, tmp_path, case):
    """Params from pickle (a dtype object equal to float32 but not NumPy's), a grad
    computed from pickled data, np.memmap grads: after the first Python check of them,
    later steps take the compiled scan (they took the Python check every step, 9-13x
    slower), with the reference's bits; a grad of another dtype is still refused."""
    import pickle

    params = {f"w{i}": rng.standard_normal(64).astype(np.float32) for i in range(5)}
    if case == "pickled params":
        params = pickle.loads(pickle.dumps(params))
        assert params["w0"].dtype is not np.dtype(np.float32)
    ref_params = {k: v.copy() for k, v in params.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    slow = [0]
    real = _dispatch._check_grads

    def counting(*args):
        slow[0] += 1
        return real(*args)

    monkeypatch.setattr(_dispatch, "_check_grads", counting)
    for step in range(4):
        grads = {k: rng.standard_normal(64).astype(np.float32) for k in params}
        if case == "pickled grad":
            grads["w2"] = pickle.loads(pickle.dumps(grads["w2"]))
        elif case == "memmap grads":
            for k, g in grads.items():
                m = np.memmap(tmp_path / f"{k}{step}", np.float32, "w+", shape=g.shape)
                m[...] = g
                grads[k] = m
        opt.update(params, grads)
        ref.update(ref_params, {k: np.array(g) for k, g in grads.items()})
    assert slow[0] <= 1 + (case == "pickled grad") * 3  # (a new dtype object each step)
    for k in params:
        assert_bits_equal(params[k], ref_params[k], k)
    grads["w3"] = grads["w3"].astype(np.float64)
    before = {k: v.copy() for k, v in params.items()}
    with pytest.raises(TypeError, match=r"grads\['w3'\]"):
        opt.update(params, grads)
    for k in params:
        assert_bits_equal(params[k], before[k], k)


@pytest.mark.parametrize("n", [1000, config.PARALLEL_THRESHOLD + 5])
@pytest.mark.parametrize("dtype", DTYPES)
def test_functional_call_with_a_new_lr_each_call(rng, dtype, n, monkeypatch):
    """adagrad_update(lr=...) with a new value at each call (a schedule: the compiled
    checked call takes the learning rate as its own argument, the parallel kernel a
    table made for it): the reference's bits, serial and parallel, -0.0's sign
    included, without the full path; a value the check refuses (NaN, inf, negative,
    beyond float32) still takes the full path, which raises naming lr with nothing
    written; then on again."""
    from fastadagrad import optim

    slow = {"_adagrad_update": 0, "_plain_fast": 0}  # the paths a new lr no longer takes
    def counter(name):
        real = getattr(optim, name)

        def counting(*a, **kw):
            slow[name] += 1
            return real(*a, **kw)
        return counting

    for name in slow:
        monkeypatch.setattr(optim, name, counter(name))
    p, h = rng.standard_normal(n).astype(dtype), np.zeros(n, dtype)
    p[:3] = (-0.0, 0.0, -0.0)
    ref_p, ref_h = p.copy(), h.copy()
    eps = 1e-7 + rng.random() * 1e-9  # (a pair of this test's own in the caches)
    lrs = (0.1, 0.05, 0.0, -0.0, 0.02, 1e-30, 0.02, 3e-3, 0.5)
    for lr in lrs:
        g = rng.standard_normal(n).astype(dtype)
        g[:3] = 0.5
        assert fastadagrad.adagrad_update(p, g, h, lr=lr, eps=eps)
        reference_step(ref_p, g, ref_h, Hyper.make(lr=lr, eps=eps))
        assert_bits_equal(p, ref_p, f"lr={lr}")
        assert_bits_equal(h, ref_h, f"lr={lr}")
    # only the first call with this eps goes past adagrad_update's first test (and
    # makes its entry, unless an earlier case of this test made it); every new lr after
    # it is the compiled call's argument (before, each one went through _adagrad_update
    # and made an entry through _plain_fast)
    assert slow["_adagrad_update"] == 1 and slow["_plain_fast"] <= 1, slow
    before = p.copy(), h.copy()
    bad = [math.nan, math.inf, -1.0] + ([1e39] if dtype == np.float32 else [])
    for lr in bad:
        with pytest.raises(ValueError, match="lr"):
            fastadagrad.adagrad_update(p, g, h, lr=lr, eps=eps)
        assert_bits_equal(p, before[0], f"p after lr={lr}")
        assert_bits_equal(h, before[1], f"h after lr={lr}")
    fastadagrad.adagrad_update(p, g, h, lr=0.01, eps=eps)
    reference_step(ref_p, g, ref_h, Hyper.make(lr=0.01, eps=eps))
    assert_bits_equal(p, ref_p, "after")


def test_separate_arrays_take_one_call_per_dtype(rng, monkeypatch):
    """A whole model of separate arrays goes through ONE compiled call per step."""
    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 0)
    calls = _count_calls(monkeypatch, "adagrad_many_parallel")
    params = {f"t{i}": rng.standard_normal(int(s)).astype(np.float32)
              for i, s in enumerate(rng.integers(1, 70000, 100))}
    ref_params = {k: v.copy() for k, v in params.items()}
    opt, ref = fastadagrad.AdaGrad(), NumpyAdaGrad()
    for step in range(3):
        grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        opt.update(params, grads)
        ref.update(ref_params, grads)
        assert calls[0] == step + 1
    for k in params:
        assert_bits_equal(params[k], ref_params[k], k)


def test_flatbuffer_views_and_layout(rng):
    arrays = {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4), "c": np.zeros(())}
    buf = fastadagrad.FlatBuffer(arrays)
    assert list(buf) == ["a", "b", "c"] and len(buf) == 3
    assert buf.data.shape == (11,) and buf.data.flags.c_contiguous
    for k, v in arrays.items():
        assert buf[k].shape == v.shape and np.array_equal(buf[k], v)
        assert np.shares_memory(buf[k], buf.data)
    buf["b"][1] = 42.0
    assert buf.data[7] == 42.0
    z = buf.full_like(0.5)
    assert z.same_layout(buf) and np.all(z.data == 0.5)
    with pytest.raises(TypeError, match="dtype float64 but"):
        fastadagrad.FlatBuffer({"x": np.ones(2, np.float32), "y": np.ones(2)})
    with pytest.raises(TypeError, match="float32 or float64"):
        fastadagrad.FlatBuffer({"x": np.ones(2, np.int64)})


def test_no_recompilation(rng):
    """Repeated calls with the same dtypes and shapes reuse the compiled signatures:
    after the first round, further rounds add none (other tests in the same process
    may have compiled other signatures of the same kernels before, e.g. N-d arrays)."""
    from fastadagrad._hyper import Hyper

    k = cpu.kernels(Hyper.make().coefficients(np.float32)[7])  # the default formula's set
    kernels = (k.checked_span, k.flat_parallel, k.many_parallel, k.many_serial)

    def one_round():
        for dt in DTYPES:
            for n in (10, config.PARALLEL_THRESHOLD + 5):
                p, g, h = np.ones(n, dt), np.ones(n, dt), np.zeros(n, dt)
                fastadagrad.adagrad_update(p, g, h)
            for big in (config.PARALLEL_THRESHOLD, 5):  # parallel and serial many-kernels
                params = {"a": np.ones(10, dt), "b": np.ones(big, dt)}
                opt = fastadagrad.AdaGrad()
                opt.update(params, {k: np.ones_like(v) for k, v in params.items()})
                opt.update(params, {k: np.ones_like(v) for k, v in params.items()})

    one_round()
    counts = [len(kern.signatures) for kern in kernels]
    assert all(c >= len(DTYPES) for c in counts), counts  # each ran for every dtype
    for _ in range(2):
        one_round()
    assert [len(kern.signatures) for kern in kernels] == counts


def test_state_commits_only_after_a_successful_first_step():
    opt = fastadagrad.AdaGrad()
    params = {"a": np.ones(3, np.float32)}
    with pytest.raises(TypeError):
        opt.update(params, {"a": np.ones(3, np.float64)})
    assert opt.h is None and opt.step == 0
    opt.update(params, {"a": np.ones(3, np.float32)})
    assert opt.step == 1 and opt.h["a"].dtype == np.float32


def test_import_without_writable_cache(tmp_path):
    """Importing and running must work where Numba has no usable cache location.

    The package is imported from a zip archive with ``HOME`` and ``XDG_CACHE_HOME``
    pointing where no directory can be made (even as root): Numba accepts
    ``cache=True`` there but fails with OSError when it first writes the cache.
    """
    pkg = Path(fastadagrad.__file__).parent
    archive = tmp_path / "fastadagrad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in pkg.glob("*.py"):
            zf.write(f, f"fastadagrad/{f.name}")
    code = ("import sys;"  # drop an editable install's finder so the zip copy is imported
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)];"
            "import numpy as np, fastadagrad, fastadagrad.cpu as c;"
            "assert 'zip' in fastadagrad.__file__, fastadagrad.__file__;"
            "assert type(c.adagrad_span._cache).__name__ == 'NullCache';"
            "p = np.ones(3); fastadagrad.adagrad_update(p, np.ones(3), np.zeros(3));"
            "print(p[0])")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(PYTHONPATH=str(archive), HOME="/proc/nonexistent",
               XDG_CACHE_HOME="/proc/nonexistent")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == 1 - 0.01 / (1 + 1e-7)


def test_cache_fallback_unit(monkeypatch):
    from fastadagrad import _jit

    real = _jit.njit

    def picky(**kw):
        if kw.get("cache"):
            raise RuntimeError("cannot cache function: no locator available")
        return real(**kw)

    monkeypatch.setattr(_jit, "njit", picky)
    f = _jit.jit()(lambda x: x + 1)
    assert f(1) == 2


@pytest.mark.parametrize("dtype,n", [(np.float32, config.PARALLEL_THRESHOLD),
                                     (np.float64, config.PARALLEL_THRESHOLD // 4)])
def test_threshold_dispatch(monkeypatch, dtype, n):
    """Small buffers take the serial kernel, large ones the parallel one; float64
    switches at a quarter of the float32 count (config.parallel_from)."""
    assert config.parallel_from(np.dtype(dtype).itemsize) == n
    par = _count_calls(monkeypatch, "adagrad_flat_parallel")
    a = lambda m: (np.ones(m, dtype), np.ones(m, dtype), np.zeros(m, dtype))  # noqa: E731
    fastadagrad.adagrad_update(*a(n - 1))
    assert par[0] == 0
    fastadagrad.adagrad_update(*a(n))
    assert par[0] == 1


@pytest.mark.parametrize("threads", [1, 2, 3, 16])
def test_chunk_table_covers_every_element(threads):
    sizes = (0, 1, 5, 64, 65, 200, 3, 1000, 7)
    old = config.CHUNK
    try:
        config.CHUNK = 64
        t, s, ln = _dispatch.chunk_table(sizes, threads)
    finally:
        config.CHUNK = old
    covered = {i: [] for i in range(len(sizes))}
    for ti, si, li in zip(t, s, ln):
        assert 0 <= li <= 64 and 0 <= ti < len(sizes)
        if threads == 1:
            assert li > 0  # empty spans only pad the runs of several threads
        covered[int(ti)].extend(range(int(si), int(si + li)))
    for i, n in enumerate(sizes):
        assert sorted(covered[i]) == list(range(n))
    if threads > 1:
        # the static schedule's runs: equal entry counts, about equal work, and each
        # run one stretch of the model in memory order
        assert ln.size % threads == 0
        runs = np.split(np.arange(ln.size), threads)
        work = [int(ln[r].sum()) for r in runs]
        assert max(work) - min(work) <= 16 * threads, work
        flat = np.cumsum((0,) + sizes)[t] + s
        for r in runs:
            r = r[ln[r] > 0]
            assert (flat[r][1:] == (flat[r] + ln[r])[:-1]).all()  # one stretch, in order


@pytest.mark.parametrize("preset", ["numpy", "torch"])
@pytest.mark.parametrize("lr_decay, step", [(0.1, 10**400), (1e308, 3)],
                         ids=["step 10**400", "lr_decay 1e308"])
def test_lr_decay_beyond_double_range_gives_a_zero_rate(preset: str, lr_decay: float,
                                                        step: int) -> None:
    """``1 + (step - 1) * lr_decay`` beyond double range rounds to inf, as in torch's
    double arithmetic: the step's learning rate is 0 (the accumulator still grows),
    not an OverflowError."""
    from fastadagrad.presets import PRESETS

    p, g = np.array([1.0, -0.0, 3.0], np.float32), np.full(3, 0.5, np.float32)
    h = np.zeros(3, np.float32)
    p0 = p.copy()
    fastadagrad.adagrad_update(p, g, h, lr=0.1, lr_decay=lr_decay, step=step,
                               rule=PRESETS[preset].rule)
    assert_bits_equal(p, p0 - np.float32(0.0) * g, "param")
    assert_bits_equal(h, g * g, "state_sum")
