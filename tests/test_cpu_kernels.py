"""The CPU kernels are specialised per formula variant at compile time.

``cpu.kernels(flags)`` builds one set of kernels per flag set; each contains only its
variant's operations (checked in the generated LLVM IR), its results match the
NumPy reference bit for bit (``test_presets.py`` covers every rule through the public
API; here the entry points are called directly), and Numba's on-disk cache keeps every
variant apart (a second process loads each of them, compiling none).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fastadagrad import _hyper as H
from fastadagrad import cpu
from fastadagrad.reference import reference_step
from fastadagrad.testing import assert_bits_equal

ROOT = Path(__file__).resolve().parent.parent


def _ir(dispatcher, *args):  # type: ignore[no-untyped-def]
    """The optimised LLVM IR of the kernel compiled for ``args``."""
    dispatcher(*args)
    return "\n".join(dispatcher.inspect_llvm().values())


def test_each_variant_holds_only_its_operations(monkeypatch):
    from fastadagrad import config

    monkeypatch.setattr(config, "CACHE", False)  # Numba cannot inspect cached code
    p, g, h = (np.ones(64, np.float32) for _ in range(3))
    c = (0.01, 1.0, 0.0, 1e-7, 0.1, 0.01, 2.0)
    plain = _ir(cpu._build(0).span, p, g, h, *c)
    fused = _ir(cpu._build(H.FMA_ACCUMULATE).span, p, g, h, *c)
    assert "@llvm.fma" not in plain and "@llvm.fma" in fused
    # the default loop divides once per element (the update); GRAD_SCALE adds a second
    # division, which the other variants must not carry
    scaled = _ir(cpu._build(H.GRAD_SCALE).span, p, g, h, *c)
    assert scaled.count(" fdiv ") > plain.count(" fdiv ") > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flags", [0, H.MAXIMIZE | H.WD_COUPLED | H.FMA_WEIGHT_DECAY,
                                   H.WD_DECOUPLED | H.FMA_ACCUMULATE | H.GRAD_SCALE,
                                   H.EPS_INSIDE | H.LR_AFTER | H.ZERO_WHERE_H0])
def test_entry_points_take_numpy_scalars_or_floats_with_the_same_bits(dtype, flags):
    """The historical ``adagrad_span(p, g, h, *coefficients)`` (NumPy scalars, flags
    last) and the specialised kernel fed Python floats give identical bits."""
    hyper = H.Hyper.make(lr=0.05, eps=1e-3, weight_decay=0.01 if flags & 6 else 0.0,
                         maximize=bool(flags & H.MAXIMIZE),
                         grad_scale=8.0 if flags & H.GRAD_SCALE else None,
                         rule=H.Rule(fma_accumulate=bool(flags & H.FMA_ACCUMULATE),
                                     fma_weight_decay=bool(flags & H.FMA_WEIGHT_DECAY),
                                     weight_decay_mode="decoupled"
                                     if flags & H.WD_DECOUPLED else "coupled",
                                     eps_placement="inside" if flags & H.EPS_INSIDE
                                     else "outside",
                                     lr_placement="after" if flags & H.LR_AFTER
                                     else "numerator",
                                     zero_where_h0=bool(flags & H.ZERO_WHERE_H0)))
    coefs = hyper.coefficients(np.dtype(dtype))
    assert coefs[-1] == flags
    rng = np.random.default_rng(flags)
    n = 1037
    p0 = rng.standard_normal(n).astype(dtype)
    g = rng.standard_normal(n).astype(dtype)
    h0 = rng.random(n).astype(dtype)
    h0[::7] = 0  # with g = 0 there: h stays 0 (ZERO_WHERE_H0's case)
    g[::7] = 0
    p1, h1, p2, h2 = p0.copy(), h0.copy(), p0.copy(), h0.copy()
    cpu.adagrad_span(p1, g, h1, *coefs)
    cpu.kernels(flags).span(p2, g, h2, *(float(x) for x in coefs[:-1]))
    assert_bits_equal(p2, p1)
    assert_bits_equal(h2, h1)
    p3, h3 = p0.copy(), h0.copy()
    reference_step(p3, g, h3, hyper, step=1)
    assert_bits_equal(p1, p3)
    assert_bits_equal(h1, h3)


def test_on_disk_cache_keeps_every_variant(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        from fastadagrad import _hyper as H, cpu
        for flags in (0, H.FMA_ACCUMULATE, H.MAXIMIZE | H.WD_COUPLED):
            k = cpu.kernels(flags).span
            p = np.linspace(-1, 1, 50, dtype=np.float32)
            k(p, p * 0.5, np.ones(50, np.float32), 0.01, 1.0, 0.0, 1e-7, 0.1, 0.01, 1.0)
            print(flags, sum(k.stats.cache_hits.values()),
                  sum(k.stats.cache_misses.values()), float(p.sum()))
    """)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    env.pop("FASTADAGRAD_NO_CACHE", None)

    def run() -> list[list[str]]:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300, cwd=ROOT, check=True).stdout
        return [line.split() for line in out.strip().splitlines()]

    first, second = run(), run()
    assert [r[1:3] for r in first] == [["0", "1"]] * 3  # compiled, written
    assert [r[1:3] for r in second] == [["1", "0"]] * 3  # each loaded, none compiled
    assert [r[3] for r in first] == [r[3] for r in second]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0,), (1,), (17,), (3, 5), (2, 3, 4)])
def test_functional_fast_path_matches_reference(monkeypatch, dtype, shape):
    """Small float arrays are checked and updated in one compiled call: the full path
    (``_dispatch.update``) is never entered, and the bits are the reference's."""
    import fastadagrad
    from fastadagrad import _dispatch
    from fastadagrad._hyper import Hyper
    from fastadagrad.reference import reference_step
    from fastadagrad.testing import assert_bits_equal

    def full_path(*a, **k):
        raise AssertionError("the full path ran")

    monkeypatch.setattr(_dispatch, "update", full_path)
    rng = np.random.default_rng(3)
    p = rng.standard_normal(shape).astype(dtype)
    h = np.abs(rng.standard_normal(shape)).astype(dtype)
    rp, rh = p.copy(), h.copy()
    kw = dict(lr=0.05, eps=1e-8, weight_decay=0.01, maximize=True)
    for step in range(1, 4):
        g = rng.standard_normal(shape).astype(dtype)
        assert fastadagrad.adagrad_update(p, g, h, step=step, **kw)
        reference_step(rp, g, rh, Hyper.make(**kw), step)
    assert_bits_equal(p, rp)
    assert_bits_equal(h, rh)


@pytest.mark.parametrize("case", ["alias", "shape", "dtype", "readonly", "strided",
                                  "byteswapped", "large"])
def test_functional_fast_path_defers_to_the_full_path(monkeypatch, case):
    """Whatever the compiled check refuses goes to the full path, untouched; arrays it
    checked at or above the parallel threshold go to the parallel kernel directly."""
    import fastadagrad
    from fastadagrad import _dispatch, config

    calls = []
    real = _dispatch.update

    def full_path(*a, **k):
        calls.append(case)
        return real(*a, **k)

    monkeypatch.setattr(_dispatch, "update", full_path)
    p, g, h = np.ones(8, np.float32), np.ones(8, np.float32), np.zeros(8, np.float32)
    if case == "alias":
        g = p[:]
    elif case == "shape":
        g = np.ones(9, np.float32)
    elif case == "dtype":
        g = np.ones(8, np.float64)
    elif case == "readonly":
        p.flags.writeable = False
    elif case == "strided":
        p = np.ones(16, np.float32)[::2]
    elif case == "byteswapped":
        p = np.ones(8, ">f4")
    else:
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 8)
    before = p.copy()
    if case == "large":
        from fastadagrad.reference import NumpyAdaGrad

        ref = {"p": p.copy()}
        NumpyAdaGrad().update(ref, {"p": g})
        assert fastadagrad.adagrad_update(p, g, h)
        assert np.array_equal(p, ref["p"])
        assert calls == []
    else:
        with pytest.raises((TypeError, ValueError)):
            fastadagrad.adagrad_update(p, g, h)
        assert np.array_equal(p, before) and not h.any()
        assert calls == [case]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rule", [H.Rule(), H.Rule(eps_placement="inside"),
                                  H.Rule(eps_placement="inside", lr_placement="after",
                                         zero_where_h0=True, fma_accumulate=True)])
@pytest.mark.parametrize("eps", [1e-3, 0.0, -0.0])
def test_special_values_keep_the_reference_bits(dtype, rule, eps):
    """The exact no-ops the kernels leave out (``h + 0``, ``sqrt(.) + 0``, ``* 1``) are
    no-ops for NaN, infinities, negative accumulators (a NaN square root) and signed
    zeros too: the kernel's bits equal the reference's on every such element."""
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 1e-30, 3.0],
                        dtype)
    # every combination of a special parameter, gradient and accumulator
    p0, g, h0 = (a.ravel().copy() for a in np.meshgrid(specials, specials, specials))
    hyper = H.Hyper.make(lr=0.05, eps=eps, rule=rule)
    coefs = hyper.coefficients(np.dtype(dtype))
    p1, h1, p2, h2 = p0.copy(), h0.copy(), p0.copy(), h0.copy()
    with np.errstate(all="ignore"):
        reference_step(p1, g, h1, hyper)
    cpu.kernels(coefs[-1]).span(p2, g, h2, *(float(x) for x in coefs[:-1]))
    assert_bits_equal(h2, h1)
    assert_bits_equal(p2, p1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_counter_kernels_match_python(dtype):
    """``add_one_at`` and ``next_common_at`` (the torch adapter's step counters, one
    number at each address) against the same arithmetic in NumPy: + 1 rounded to the
    counters' dtype (float32 stops at 2^24), a common value or none, read-only."""
    proto = np.empty(0, dtype)
    for values in ([3.0, 3.0, 3.0], [2.0**24, 2.0**24], [2.0**24 - 1] * 4, [5.0],
                   [1.0, 2.0], [7.0, 7.0, 8.0], []):
        buf = np.array(values, dtype)
        addresses = np.array([buf.ctypes.data + i * buf.itemsize for i in range(buf.size)],
                             np.int64)
        before = buf.copy()
        ok, nxt = cpu.next_common_at(proto, addresses)
        assert_bits_equal(buf, before)  # (read-only)
        same = len(set(values)) <= 1
        assert ok == same
        if same and values:
            assert nxt == float(dtype(values[0]) + dtype(1))
        cpu.add_one_at(proto, addresses)
        assert_bits_equal(buf, (before + dtype(1)).astype(dtype))
        if same and values:
            assert float(buf[0]) == nxt  # the value the increment leaves
