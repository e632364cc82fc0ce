"""The row update's CUDA kernels (``fastadagrad/cuda_rows.py``) against the NumPy reference.

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) the kernels run as Python: no FMA (the
rowwise update's ``fma(c, p, -(g*m))`` is rounded twice there) and float32 ``sqrt``
returns a Python float, so these tests check the logic (grouping, duplicate order,
indexing, the grid-stride tail with the patched-down grid of ``conftest.py``, every
formula branch, validation, skip/raise) within a few ulp, and exactly where the formula
has no FMA. Bit-identity with the CPU kernels is checked on hardware by
``python -m fastadagrad validate``; the instructions by ``tests/test_rows_ptx.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

from fastadagrad import Rule  # noqa: E402
from fastadagrad._hyper import Hyper  # noqa: E402
from fastadagrad.presets import PRESETS  # noqa: E402
from fastadagrad.reference import reference_rows_step  # noqa: E402
from fastadagrad.rows import FBGEMM_ROWWISE, RowAdaGrad, adagrad_update_rows  # noqa: E402
from fastadagrad.testing import assert_bits_equal  # noqa: E402

#: The simulator's two-rounding "FMA" moves h or p by up to an ulp per step; cancellation
#: in coupled weight decay magnifies it (as in test_cuda_kernels.py). On a GPU the row
#: kernels give the CPU's bits: no tolerance there.
ULP_BOUND = 16 if fcuda.simulator() else 0

RULES = {
    "numpy": (Rule(), {}),
    "torch": (PRESETS["torch"].rule, dict(lr_decay=0.1, weight_decay=0.01)),
    "keras": (PRESETS["keras"].rule, dict(weight_decay=0.004)),
    "optax": (PRESETS["optax"].rule, {}),
    "fbgemm-l2": (FBGEMM_ROWWISE, dict(weight_decay=0.01)),
    "maximize": (Rule(), dict(maximize=True)),
}


def close(got, ref):
    """Within ULP_BOUND ulp, measured against the array's largest magnitude: where
    ``c*p - g*m`` cancels, the simulator's extra rounding is many ulp of a tiny result."""
    eps = np.finfo(ref.dtype).eps
    np.testing.assert_allclose(got, ref, rtol=ULP_BOUND * eps,
                               atol=ULP_BOUND * eps * float(np.abs(ref).max(initial=0)))


def case(seed, r, d, k, dtype, rowwise, h0=0.0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((r, d)).astype(dtype)
    state = np.full((r,) if rowwise else (r, d), h0, dtype)
    idx = rng.integers(0, r, k)
    g = (rng.standard_normal((k, d)) * 10.0 ** rng.uniform(-3, 1, (k, 1))).astype(dtype)
    return table, state, idx, g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("k, d", [(0, 3), (1, 1), (17, 15), (40, 16), (70, 17)])
@pytest.mark.parametrize("rule", list(RULES))
def test_rows_cuda_matches_reference(rule, k, d, rowwise, dtype):
    r, kw = RULES[rule]
    table, state, idx, g = case(k + d, 12, d, k, dtype, rowwise, h0=0.0 if rule == "optax"
                                else 0.1)
    dt, ds, dg = cuda.to_device(table), cuda.to_device(state), cuda.to_device(g)
    hyper = Hyper.make(rule=r, lr=0.05, **kw)
    for step in (1, 2, 3):
        assert adagrad_update_rows(dt, ds, idx, dg, step=step, rowwise=rowwise, rule=r,
                                   lr=0.05, **kw)
        reference_rows_step(table, state, idx, g, hyper, step, rowwise=rowwise)
    got_t, got_s = dt.copy_to_host(), ds.copy_to_host()
    exact = not rowwise and not (r.fma_accumulate or r.fma_weight_decay)
    if exact:
        assert_bits_equal(got_t, table, "table")
        assert_bits_equal(got_s, state, "state")
    else:
        close(got_t, table)
        close(got_s, state)


def test_rows_cuda_device_indices_and_duplicate_order():
    """Device indices are accepted; duplicates are summed left to right (1e8 + 1 - 1e8
    is 0 in float32, as on the CPU)."""
    big = np.float32(1e8)
    g = np.array([[big], [1], [-big]], np.float32)
    idx = np.array([3, 3, 3])
    for rowwise in (False, True):
        table = np.ones((5, 1), np.float32)
        state = np.zeros(5 if rowwise else (5, 1), np.float32)
        dt, ds = cuda.to_device(table), cuda.to_device(state)
        assert adagrad_update_rows(dt, ds, cuda.to_device(idx), cuda.to_device(g),
                                   rowwise=rowwise)
        assert ds.copy_to_host().reshape(-1).tolist() == [0.0] * 5


@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
def test_rows_cuda_nonfinite(rowwise):
    table, state, idx, g = case(1, 10, 4, 9, np.float32, rowwise)
    g[5, 1] = np.nan
    dt, ds, dg = cuda.to_device(table), cuda.to_device(state), cuda.to_device(g)
    assert adagrad_update_rows(dt, ds, idx, dg, rowwise=rowwise, nonfinite="skip") is False
    with pytest.raises(FloatingPointError, match="grad_rows contains NaN"):
        adagrad_update_rows(dt, ds, idx, dg, rowwise=rowwise, nonfinite="raise")
    assert_bits_equal(dt.copy_to_host(), table)
    assert_bits_equal(ds.copy_to_host(), state)


@pytest.mark.parametrize("mutate, exc, msg", [
    (lambda a: a.__setitem__("indices", np.array([0, 10, 1])), IndexError,
     r"indices\[1\] = 10 is out of range"),
    (lambda a: a.__setitem__("indices", np.array([0.0, 1.0, 2.0])), TypeError,
     "indices has dtype float64"),
    (lambda a: a.__setitem__("grad_rows", cuda.to_device(np.zeros((2, 4), np.float32))),
     ValueError, r"grad_rows has shape \(2, 4\)"),
    (lambda a: a.__setitem__("state", cuda.to_device(np.zeros(10, np.float32))),
     ValueError, "state must be 2-D"),
    (lambda a: a.__setitem__("state", cuda.to_device(np.zeros((10, 4), np.float64))),
     TypeError, "state has dtype float64 but table has dtype float32"),
    (lambda a: a.__setitem__("state", np.zeros((10, 4), np.float32)), TypeError,
     "state is a host array but table is a CUDA array"),
])
def test_rows_cuda_bad_input_changes_nothing(mutate, exc, msg):
    table, state, idx, g = case(2, 10, 4, 3, np.float32, False)
    a = dict(table=cuda.to_device(table), state=cuda.to_device(state), indices=idx,
             grad_rows=cuda.to_device(g))
    mutate(a)
    with pytest.raises(exc, match=msg):
        adagrad_update_rows(a["table"], a["state"], a["indices"], a["grad_rows"])
    assert_bits_equal(a["table"].copy_to_host(), table)


def test_row_adagrad_on_device():
    table, _, idx, g = case(3, 10, 4, 6, np.float32, True)
    dt = cuda.to_device(table)
    opt = RowAdaGrad(dt, lr=0.1, rowwise=True, initial_accumulator_value=0.5)
    assert opt.update(idx, cuda.to_device(g))
    h = np.full(10, 0.5, np.float32)
    reference_rows_step(table, h, idx, g, Hyper.make(lr=0.1), 1, rowwise=True)
    close(opt.h.copy_to_host(), h)
    assert opt.state_dict()["sum"].shape == (10,)


def test_validate_rows_case_runs():
    """``python -m fastadagrad validate``'s row case, tiny, through the same code (the
    simulator has no FMA, so the FMA-free "numpy" case is the one that must agree)."""
    from fastadagrad import validate

    spec = ("numpy", "numpy", {}, dict(lr=0.01, eps=1e-7), False, 50, 5, 40, "zipf")
    row = validate.run_rows_case(spec, np.float32, 2, cuda, seed=1, timing=False)
    assert row["ok"] and row["bits_differ"] == 0 and row["steps"] == 2
    assert "rows full" in row["kind"]
