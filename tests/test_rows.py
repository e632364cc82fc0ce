"""The row update (``adagrad_update_rows``, ``RowAdaGrad``) against the NumPy reference.

Bit for bit: every dtype, awkward sizes, duplicates, every option and rule, the serial
and the parallel kernel, 1 and 2 threads; bad input leaves every argument unchanged;
FBGEMM's CPU ``EXACT_ROWWISE_ADAGRAD`` and torch's sparse Adagrad as outside checks
(skipped when not installed).
"""

from __future__ import annotations

import dataclasses
import warnings

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fastadagrad as fa
from fastadagrad import Rule, config, cpu_rows
from fastadagrad._hyper import Hyper
from fastadagrad.presets import PRESETS
from fastadagrad.reference import reference_rows_step, reference_step, reference_sum_rows
from fastadagrad.rows import FBGEMM_ROWWISE, RowAdaGrad, adagrad_update_rows
from fastadagrad.testing import assert_bits_equal

DTYPES = [np.float32, np.float64]


def make_case(rng, r, d, k, dtype, *, rowwise=False, h0=0.0, index_dtype=np.int64,
              zipf=False):
    table = rng.standard_normal((r, d)).astype(dtype)
    state = np.full((r,) if rowwise else (r, d), h0, dtype)
    if zipf:
        idx = (rng.zipf(1.3, k) - 1) % r
    else:
        idx = rng.integers(0, r, k)
    g = (rng.standard_normal((k, d)) * 10.0 ** rng.uniform(-3, 1, (k, 1))).astype(dtype)
    return table, state, idx.astype(index_dtype), g


def run_both(table, state, idx, grads, *, steps=1, rowwise=False, nan_ok=False, **kw):
    """Run the kernel and the reference from the same start; assert bit equality
    (``nan_ok``: NaNs only at the same places, their sign and payload free)."""
    rule = kw.get("rule")
    hyper = Hyper.make(**{k: v for k, v in kw.items() if k not in ("nonfinite",)})
    tr, sr = table.copy(), state.copy()
    for s in range(1, steps + 1):
        g = grads if not isinstance(grads, list) else grads[(s - 1) % len(grads)]
        assert adagrad_update_rows(table, state, idx, g, step=s, rowwise=rowwise, **kw)
        reference_rows_step(tr, sr, idx, g, hyper, s, rowwise=rowwise)
    if nan_ok:
        np.testing.assert_array_equal(table, tr)
        np.testing.assert_array_equal(state, sr)
        return
    assert_bits_equal(table, tr, f"table (rowwise={rowwise}, rule={rule})")
    assert_bits_equal(state, sr, f"state (rowwise={rowwise}, rule={rule})")


# --- reference ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("d", [1, 15, 16, 17, 64])
@pytest.mark.parametrize("k", [0, 1, 2, 17, 300])
def test_rows_match_reference(rng, dtype, rowwise, d, k):
    table, state, idx, g = make_case(rng, 40, d, k, dtype, rowwise=rowwise, h0=0.1)
    grads = [g, (g * 3).astype(dtype), (-g).astype(dtype)]
    run_both(table, state, idx, grads, steps=4, rowwise=rowwise, lr=0.05)


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
def test_index_dtypes_and_strided_indices(rng, index_dtype, rowwise):
    table, state, idx, g = make_case(rng, 100, 8, 50, np.float32, rowwise=rowwise,
                                     index_dtype=index_dtype)
    strided = np.repeat(idx, 2)[::2]  # a non-contiguous view with the same values
    assert not strided.flags.c_contiguous
    run_both(table, state, strided, g, rowwise=rowwise)


def test_zero_columns_and_empty_table():
    t = np.zeros((5, 0), np.float32)
    assert adagrad_update_rows(t, np.zeros((5, 0), np.float32), np.array([1, 1]),
                               np.zeros((2, 0), np.float32))
    assert adagrad_update_rows(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0, np.int64),
                               np.zeros((0, 3)))


RULES = {name: p.rule for name, p in PRESETS.items()}
RULES["fbgemm"] = FBGEMM_ROWWISE
RULES["every-flag"] = Rule(eps_placement="inside", fma_accumulate=True,
                           lr_placement="after", zero_where_h0=True,
                           fma_weight_decay=True)
OPTIONS = {
    "defaults": {},
    "lr_decay": {"lr_decay": 0.05},
    "weight_decay": {"weight_decay": 0.02},
    "maximize": {"maximize": True},
    "all": {"lr_decay": 0.05, "weight_decay": 0.02, "maximize": True},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_rule_and_option(rng, dtype, rowwise, rule, option):
    h0 = 0.0 if rule in ("optax", "every-flag") else 0.1  # zero_where_h0 needs h == 0
    table, state, idx, g = make_case(rng, 30, 5, 40, dtype, rowwise=rowwise, h0=h0)
    g[3] = 0  # with h0 = 0 some accumulators stay 0 (zero_where_h0)
    run_both(table, state, idx, [g, (g * 2).astype(dtype)], steps=3, rowwise=rowwise,
             lr=0.05, eps=1e-6, rule=RULES[rule], **OPTIONS[option])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rule", ["numpy", "torch", "keras", "optax"])
def test_full_equals_dense_update_on_summed_rows(rng, dtype, rule):
    """The full accumulator is the dense kernel on the touched rows (same bits)."""
    table, state, idx, g = make_case(rng, 60, 7, 200, dtype, h0=0.1)
    kw = dict(lr=0.03, weight_decay=0.01, lr_decay=0.1, step=3, rule=RULES[rule])
    rows, sums = reference_sum_rows(idx, g)
    p, h = table[rows].copy(), state[rows].copy()
    fa.adagrad_update(p, sums, h, **kw)
    adagrad_update_rows(table, state, idx, g, **kw)
    assert_bits_equal(table[rows], p)
    assert_bits_equal(state[rows], h)


def test_untouched_rows_are_untouched(rng):
    for rowwise in (False, True):
        table, state, idx, g = make_case(rng, 500, 9, 60, np.float32, rowwise=rowwise)
        t0, s0 = table.copy(), state.copy()
        adagrad_update_rows(table, state, idx, g, rowwise=rowwise, weight_decay=0.1)
        other = np.setdiff1d(np.arange(500), idx)
        assert_bits_equal(table[other], t0[other])
        assert_bits_equal(state[other], s0[other])
        assert not np.array_equal(table[idx], t0[idx])


# --- duplicates ---------------------------------------------------------------------------


def test_duplicates_sum_left_to_right_in_index_order():
    """1e8 + 1 rounds to 1e8 in float32: ((1e8 + 1) - 1e8) = 0 but 1e8 + (1 - 1e8) = 1.

    Row 2 gets its gradients in the order (1e8, 1, -1e8): summed left to right that is
    exactly 0, so its accumulator stays 0 and the row does not move (lr * 0 / eps). Row 0
    gets them as (1, 1e8, -1e8): (1 + 1e8) - 1e8 = 0 as well; row 4 as (1e8, -1e8, 1): 1.
    """
    big = np.float32(1e8)
    g = np.array([[big], [1], [1], [big], [-big], [big], [-big], [-big], [1],
                  [-big]], np.float32)
    idx = np.array([2, 2, 0, 0, 2, 4, 4, 0, 4, 5])  # row 5 alone: -1e8
    for rowwise in (False, True):
        table = np.ones((6, 1), np.float32)
        state = np.zeros(6 if rowwise else (6, 1), np.float32)
        adagrad_update_rows(table, state, idx, g, lr=0.5, rowwise=rowwise)
        one, half, eps = np.float32(1), np.float32(0.5), np.float32(1e-7)
        assert state.reshape(-1).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0, float(big * big)]
        assert table[:, 0].tolist() == [1.0, 1.0, 1.0, 1.0, float(one - half / (one + eps)),
                                        float(one + (half * big) / (big + eps))]


@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
def test_result_independent_of_distinct_row_order(rng, rowwise):
    """Permuting the lookups of different rows (keeping each row's own order) changes
    nothing; the duplicates' own order is what fixes the bits."""
    table, state, idx, g = make_case(rng, 20, 6, 200, np.float32, rowwise=rowwise)
    order = np.argsort(idx, kind="stable")  # grouped, each group still in index order
    t2, s2 = table.copy(), state.copy()
    adagrad_update_rows(table, state, idx, g, rowwise=rowwise)
    adagrad_update_rows(t2, s2, idx[order], g[order], rowwise=rowwise)
    assert_bits_equal(table, t2)
    assert_bits_equal(state, s2)


def test_duplicate_sum_starts_from_the_first_row_not_from_zero():
    """-0.0 + -0.0 = -0.0, but 0.0 + -0.0 + -0.0 = +0.0: the sum starts from the first
    row. Seen in the table: -0.0 - (lr * -0.0) / eps = -0.0 + 0.0 = +0.0, while a +0.0
    gradient would leave -0.0."""
    for rowwise in (False, True):
        table = np.full((2, 3), -0.0)
        state = np.zeros(2) if rowwise else np.zeros((2, 3))
        adagrad_update_rows(table, state, np.array([1, 1]), np.full((2, 3), -0.0),
                            rowwise=rowwise)
        assert not np.signbit(table[1]).any()
        assert np.signbit(table[0]).all()


@pytest.mark.parametrize("rowwise", [False, True])
def test_zero_learning_rates_keep_their_sign_in_any_order(rowwise):
    # -0.0 == 0.0 and hashes alike: a cache keyed on lr must not hand one the other's
    # coefficients; the sign reaches a zero row: -0.0 - (+0.0 * g) / d = -0.0, while
    # -0.0 - (-0.0 * g) / d = +0.0
    for order in ((0.0, -0.0), (-0.0, 0.0)):
        for lr in order:
            table = np.full((2, 3), -0.0)
            state = np.zeros(2) if rowwise else np.zeros((2, 3))
            ref_t, ref_s = table.copy(), state.copy()
            idx, g = np.array([1]), np.full((1, 3), 0.5)
            adagrad_update_rows(table, state, idx, g, lr=lr, rowwise=rowwise)
            reference_rows_step(ref_t, ref_s, idx, g, Hyper.make(lr=lr), 1, rowwise=rowwise)
            assert_bits_equal(table, ref_t, f"lr={lr!r} after {order[0]!r}")
            assert np.signbit(table[1]).all() == (lr == 0 and np.signbit(lr) == 0)


def test_hard_coded_values():
    """Guards against the kernel and the reference drifting together."""
    table = np.array([[1.0, -2.0], [0.5, 0.25], [3.0, 3.0]], np.float32)
    state = np.zeros_like(table)
    idx = np.array([2, 0, 2])
    g = np.array([[0.5, -1.0], [2.0, 0.0], [0.25, 0.5]], np.float32)
    for step in (1, 2):
        adagrad_update_rows(table, state, idx, g, lr=0.1, step=step)
    assert state.tolist() == [[8.0, 0.0], [0.0, 0.0], [1.125, 0.5]]
    # computed with NumPy float32 scalars: p = p - (0.1*g) / (sqrt(h) + 1e-7), twice
    assert table.view(np.uint32).tolist() == [[1062489166, 3221225472],
                                              [1056964608, 1048576000],
                                              [1077220116, 1078652140]]
    hr = np.zeros(3, np.float32)
    t2 = np.ones((3, 2), np.float32)
    adagrad_update_rows(t2, hr, idx, g, lr=0.1, rowwise=True)
    # row 2: g = (0.75, -0.5): h = (0.5625 + 0.25) / 2 = 0.40625
    assert hr.tolist() == [2.0, 0.0, 0.40625]


# --- threads, serial/parallel ---------------------------------------------------------


@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_parallel_matches_serial_and_threads(rng, monkeypatch, rowwise, dtype):
    table, state, idx, g = make_case(rng, 3000, 33, 4000, dtype, rowwise=rowwise, zipf=True)
    results = []
    for threshold, threads in ((1 << 62, 1), (1, 1), (1, 2), (1, numba.config.NUMBA_NUM_THREADS)):
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", threshold)
        t, s = table.copy(), state.copy()
        before = numba.get_num_threads()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        try:
            for step in (1, 2, 3):
                assert adagrad_update_rows(t, s, idx, g, rowwise=rowwise, step=step,
                                           lr_decay=0.1, weight_decay=0.01,
                                           nonfinite="skip")
        finally:
            numba.set_num_threads(before)
        results.append((t, s))
    for t, s in results[1:]:
        assert_bits_equal(t, results[0][0], "table")
        assert_bits_equal(s, results[0][1], "state")
    tr, sr = table.copy(), state.copy()
    hyper = Hyper.make(lr_decay=0.1, weight_decay=0.01)
    for step in (1, 2, 3):
        reference_rows_step(tr, sr, idx, g, hyper, step, rowwise=rowwise)
    assert_bits_equal(results[0][0], tr)
    assert_bits_equal(results[0][1], sr)


def test_block_bounds_never_split_a_group():
    idx = np.array([5] * 50 + [1, 2, 3] + [7] * 10 + list(range(8, 40)))
    work = np.empty(cpu_rows.workspace_size(idx.size), np.int64)
    _, starts, perm, first, _ = cpu_rows.group_by_row(idx, 40, work)
    ngroups = perm.size
    for weight in (0, 1, cpu_rows.GROUP_WEIGHT_FULL, 100):
        work = first + weight * np.arange(first.size)  # work before each group
        for nb in (1, 2, 3, 8, ngroups):
            b = cpu_rows.block_bounds(first, idx.size, nb, weight)
            assert b[0] == 0 and b[-1] == ngroups
            assert np.all(np.diff(b) >= 0)
            # no block holds more than its share plus one group's work
            biggest = np.max(np.diff(starts)) + weight
            assert np.all(np.diff(work[b]) <= work[-1] / nb + biggest)


def check_groups(idx, order, starts, perm, first, pos):
    """``group_by_row``'s five arrays against NumPy: groups in row order, positions
    ascending inside each, ``perm`` by first appearance, ``first`` its lookup counts,
    ``pos`` where each group appears first."""
    uniq, first_seen = np.unique(idx, return_index=True)
    assert starts.size == uniq.size + 1 and starts[0] == 0 and starts[-1] == idx.size
    expect = np.concatenate([np.flatnonzero(idx == r) for r in uniq] or
                            [np.zeros(0, np.int64)])
    assert_bits_equal(order, expect)
    assert_bits_equal(idx[order[starts[:-1]]], uniq)
    assert_bits_equal(perm, np.argsort(first_seen).astype(np.int64))
    sizes = np.diff(starts)[perm]
    assert_bits_equal(first, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
    assert_bits_equal(pos, np.sort(first_seen).astype(np.int64))
    assert_bits_equal(pos, order[starts[perm]])


# 1 << 50: 50 row bits + 12 position bits (3,000 lookups) fill the packed key's 62 bits;
# 1 << 62: too wide to pack, keys and positions are sorted side by side
@pytest.mark.parametrize("nrows", [1, 2, 3, 2047, 2048, 2049, 1 << 22, (1 << 22) + 1,
                                   1 << 40, 1 << 50, 1 << 62])
def test_group_by_row_groups_in_first_appearance_order(rng, nrows):
    idx = rng.integers(0, nrows, 3000)
    idx[:5] = nrows - 1
    idx[100:140] = idx[7]
    work = np.full(cpu_rows.workspace_size(idx.size) + 5, -7, np.int64)
    check_groups(idx, *cpu_rows.group_by_row(idx, nrows, work))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("wide", [0, 1 << 55, 1 << 62], ids=["fit", "2^55", "2^62"])
def test_group_by_row_small_and_all_distinct(rng, index_dtype, wide):
    """Every row distinct (as many groups as lookups: ``starts`` is full) and many small
    random batches, through a scratch filled with garbage. In a table of 2^55 rows the
    radix sort takes 5 passes (an odd number: the result lands in the other buffer),
    packed up to 128 lookups, in pairs beyond; in one of 2^62 rows, 6 passes in pairs."""
    cases = [rng.permutation(n) for n in (1, 2, 6, 64, 1000)]
    cases += [rng.integers(0, int(rng.integers(1, 41)), int(rng.integers(0, 81)))
              for _ in range(300)]
    for idx in cases:
        idx = idx.astype(index_dtype)
        nrows = wide or int(idx.max(initial=0)) + 1
        work = np.full(cpu_rows.workspace_size(idx.size), -7, np.int64)
        check_groups(idx, *cpu_rows.group_by_row(idx, nrows, work))

# --- non-finite ------------------------------------------------------------------------


@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("big", [False, True], ids=["serial", "parallel"])
def test_nonfinite_modes(rng, monkeypatch, rowwise, bad, big):
    if big:
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 1)
    table, state, idx, g = make_case(rng, 50, 4, 30, np.float32, rowwise=rowwise)
    g[17, 2] = bad
    t0, s0 = table.copy(), state.copy()
    assert adagrad_update_rows(table, state, idx, g, rowwise=rowwise,
                               nonfinite="skip") is False
    assert_bits_equal(table, t0)
    assert_bits_equal(state, s0)
    with pytest.raises(FloatingPointError, match="grad_rows contains NaN or inf"):
        adagrad_update_rows(table, state, idx, g, rowwise=rowwise, nonfinite="raise")
    assert_bits_equal(table, t0)
    assert_bits_equal(state, s0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_both(table, state, idx, g, rowwise=rowwise, nonfinite="ignore", nan_ok=True)
    assert not np.isfinite(table[idx[17]]).all() or not np.isfinite(state[idx[17]]).all()


def test_nonfinite_bad_mode():
    t = np.zeros((2, 2), np.float32)
    with pytest.raises(ValueError, match="nonfinite"):
        adagrad_update_rows(t, np.zeros_like(t), np.array([0]), np.zeros((1, 2), np.float32),
                            nonfinite="maybe")


# --- bad input ---------------------------------------------------------------------------


def assert_unchanged(a, before):
    for k, v in a.items():
        v = np.asarray(v)
        assert (v.dtype, v.shape) == (before[k].dtype, before[k].shape), k
        assert v.tobytes() == before[k].tobytes(), f"{k} was changed"


def _args(rowwise=False, dtype=np.float32):
    rng = np.random.default_rng(3)
    table, state, idx, g = make_case(rng, 10, 3, 6, dtype, rowwise=rowwise)
    return dict(table=table, state=state, indices=idx, grad_rows=g)


def _indices_inside(a: dict, name: str) -> None:
    # valid row numbers stored in the first bytes of the table or the state, and the
    # indices a view of them: the kernels would read them while writing those rows
    inside = a[name].reshape(-1)[:12].view(np.int64)
    inside[:] = np.arange(6)[::-1]
    a["indices"] = inside


BAD = {
    "indices inside state": (lambda a: _indices_inside(a, "state"), ValueError,
                             r"state and indices share memory"),
    "indices inside table": (lambda a: _indices_inside(a, "table"), ValueError,
                             r"table and indices share memory"),
    "masked indices": (lambda a: a.__setitem__("indices", np.ma.masked_array(a["indices"])),
                       TypeError, r"indices is a masked array"),
    "index too large": (lambda a: a["indices"].__setitem__(4, 10), IndexError,
                        r"indices\[4\] = 10 is out of range for a table of 10 rows"),
    "negative index": (lambda a: a["indices"].__setitem__(2, -1), IndexError,
                       r"indices\[2\] = -1 is out of range"),
    "float indices": (lambda a: a.__setitem__("indices", a["indices"].astype(np.float64)),
                      TypeError, r"indices has dtype float64; row indices must be int32"),
    "uint8 indices": (lambda a: a.__setitem__("indices", a["indices"].astype(np.uint8)),
                      TypeError, r"indices has dtype uint8"),
    "list indices": (lambda a: a.__setitem__("indices", a["indices"].tolist()),
                     TypeError, r"indices must be a NumPy int32 or int64 array"),
    "2-d indices": (lambda a: a.__setitem__("indices", a["indices"].reshape(2, 3)),
                    ValueError, r"indices must be 1-D"),
    "grad_rows too few": (lambda a: a.__setitem__("grad_rows", a["grad_rows"][:5]),
                          ValueError, r"grad_rows has shape \(5, 3\) but must be \(K, D\) "
                                      r"= \(6, 3\)"),
    "grad_rows too wide": (lambda a: a.__setitem__("grad_rows", np.zeros((6, 4), np.float32)),
                           ValueError, r"grad_rows has shape \(6, 4\)"),
    "grad_rows 1-d": (lambda a: a.__setitem__("grad_rows", np.zeros(18, np.float32)),
                      ValueError, r"grad_rows must be 2-D"),
    "grad_rows dtype": (lambda a: a.__setitem__("grad_rows", a["grad_rows"].astype(np.float64)),
                        TypeError, r"grad_rows has dtype float64 but table has dtype float32"),
    "grad_rows strided": (lambda a: a.__setitem__("grad_rows",
                                                  np.zeros((6, 6), np.float32)[:, ::2]),
                          ValueError, r"grad_rows is not C-contiguous"),
    "state dtype": (lambda a: a.__setitem__("state", a["state"].astype(np.float64)),
                    TypeError, r"state has dtype float64 but table has dtype float32"),
    "state rowwise shape": (lambda a: a.__setitem__("state", np.zeros(10, np.float32)),
                            ValueError, r"state must be 2-D"),
    "state wrong rows": (lambda a: a.__setitem__("state", np.zeros((9, 3), np.float32)),
                         ValueError, r"state has shape \(9, 3\) but must be \(10, 3\)"),
    "table strided": (lambda a: a.__setitem__("table", np.zeros((10, 6), np.float32)[:, ::2]),
                      ValueError, r"table is not C-contiguous"),
    "table 1-d": (lambda a: a.__setitem__("table", np.zeros(30, np.float32)),
                  ValueError, r"table must be 2-D"),
    "table int": (lambda a: a.__setitem__("table", np.zeros((10, 3), np.int32)),
                  TypeError, r"table has dtype int32"),
    "table float16": (lambda a: a.__setitem__("table", np.zeros((10, 3), np.float16)),
                      TypeError, r"table has dtype float16"),
    "table list": (lambda a: a.__setitem__("table", [[0.0] * 3] * 10),
                   TypeError, r"table must be a NumPy ndarray"),
    "table read-only": (lambda a: a["table"].setflags(write=False), ValueError,
                        r"table is read-only"),
    "state read-only": (lambda a: a["state"].setflags(write=False), ValueError,
                        r"state is read-only"),
    "state is table": (lambda a: a.__setitem__("state", a["table"]), ValueError,
                       r"table and state share memory"),
    "grad is table rows": (lambda a: a.__setitem__("grad_rows", a["table"][:6]), ValueError,
                           r"table and grad_rows share memory"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_names_argument_and_changes_nothing(case):
    a = _args()
    mutate, exc, msg = BAD[case]
    mutate(a)
    before = {k: np.array(v, copy=True) for k, v in a.items()}
    with pytest.raises(exc, match=msg):
        adagrad_update_rows(a["table"], a["state"], a["indices"], a["grad_rows"], lr=0.1)
    assert_unchanged(a, before)


def test_index_into_an_empty_table_says_it_has_no_rows() -> None:
    table, state = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.float32)
    with pytest.raises(IndexError, match=r"table of 0 rows \(it has no rows\)"):
        adagrad_update_rows(table, state, np.zeros(1, np.int64),
                            np.ones((1, 3), np.float32), lr=0.1)


def test_memmap_indices_are_taken_as_plain_arrays(tmp_path) -> None:
    a, ref = _args(), _args()
    mm = np.memmap(tmp_path / "idx", dtype=a["indices"].dtype, mode="w+",
                   shape=a["indices"].shape)
    mm[:] = a["indices"]
    adagrad_update_rows(a["table"], a["state"], mm, a["grad_rows"], lr=0.1)
    adagrad_update_rows(ref["table"], ref["state"], ref["indices"], ref["grad_rows"], lr=0.1)
    assert_bits_equal(a["table"], ref["table"])
    assert_bits_equal(a["state"], ref["state"])


@pytest.mark.parametrize("case", ["state full shape", "state 2-d"])
def test_bad_rowwise_state(case):
    a = _args(rowwise=True)
    a["state"] = np.zeros(11, np.float32) if case == "state full shape" else \
        np.zeros((10, 3), np.float32)
    before = {k: np.array(v, copy=True) for k, v in a.items()}
    msg = r"state has shape \(11,\) but must be \(10,\)" if case == "state full shape" \
        else r"state must be 1-D"
    with pytest.raises(ValueError, match=msg):
        adagrad_update_rows(a["table"], a["state"], a["indices"], a["grad_rows"],
                            rowwise=True)
    assert_unchanged(a, before)


@pytest.mark.parametrize("kw, exc, msg", [
    ({"lr": -1.0}, ValueError, "lr must be >= 0"),
    ({"eps": float("nan")}, ValueError, "eps must be finite"),
    ({"step": 0}, ValueError, "step counts from 1"),
    ({"step": 1.5}, TypeError, "step must be an int"),
    ({"rowwise": "yes"}, TypeError, "rowwise must be a bool"),
    ({"maximize": 1}, TypeError, "maximize must be a bool"),
    ({"rule": "torch"}, TypeError, "rule must be a fastadagrad.Rule"),
    ({"lr": 1e39}, ValueError, "overflows to inf in float32"),
])
def test_bad_hyperparameters_change_nothing(kw, exc, msg):
    a = _args()
    before = {k: v.copy() for k, v in a.items()}
    with pytest.raises(exc, match=msg):
        adagrad_update_rows(a["table"], a["state"], a["indices"], a["grad_rows"], **kw)
    assert_unchanged(a, before)


def test_device_mix_is_an_error():
    cuda = pytest.importorskip("numba.cuda")
    from fastadagrad import cuda as fcuda

    if fcuda.unavailable_reason() is not None and not fcuda.simulator():
        pytest.skip("no GPU and no simulator: a device array cannot be made")
    a = _args()
    with pytest.raises(TypeError, match="table is a host array but state is a CUDA"):
        adagrad_update_rows(a["table"], cuda.to_device(a["state"]), a["indices"],
                            a["grad_rows"])


# --- property test ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_property_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    rowwise = data.draw(st.booleans())
    r = data.draw(st.integers(1, 40))
    d = data.draw(st.integers(1, 20))
    k = data.draw(st.integers(0, 80))
    seed = data.draw(st.integers(0, 2**32 - 1))
    rule = data.draw(st.sampled_from(list(RULES.values())))
    opts = data.draw(st.sampled_from(list(OPTIONS.values())))
    rng = np.random.default_rng(seed)
    table, state, idx, g = make_case(rng, r, d, k, dtype, rowwise=rowwise, h0=0.1,
                                     index_dtype=data.draw(st.sampled_from([np.int32,
                                                                            np.int64])))
    run_both(table, state, idx, g, steps=2, rowwise=rowwise, lr=0.05, rule=rule, **opts)


# --- the class --------------------------------------------------------------------------


@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
def test_row_adagrad_class(rng, rowwise):
    table, _, idx, g = make_case(rng, 50, 6, 40, np.float32, rowwise=rowwise)
    t2 = table.copy()
    opt = RowAdaGrad(table, lr=0.05, lr_decay=0.1, initial_accumulator_value=0.2,
                     rowwise=rowwise)
    assert opt.h.shape == ((50,) if rowwise else (50, 6)) and opt.h.dtype == np.float32
    h2 = np.full(opt.h.shape, 0.2, np.float32)
    for s in range(1, 4):
        assert opt.update(idx, g)
        adagrad_update_rows(t2, h2, idx, g, lr=0.05, lr_decay=0.1, step=s, rowwise=rowwise)
    assert opt.step == 3
    assert_bits_equal(table, t2)
    assert_bits_equal(opt.h, h2)

    sd = opt.state_dict()
    assert sd["step"] == 3 and sd["rowwise"] is rowwise
    table3 = table.copy()
    opt2 = RowAdaGrad(table3, lr=0.05, rowwise=rowwise)
    opt2.load_state_dict(sd)
    assert opt2.step == 3 and opt2.hyper.lr_decay == 0.1
    opt.update(idx, g)
    opt2.update(idx, g)
    assert_bits_equal(table3, table)
    assert_bits_equal(opt2.h, opt.h)
    sd["sum"][:] = 7  # a copy: the optimizer's state is not affected
    assert not (opt.h == 7).any()


def test_row_adagrad_skip_counts(rng):
    table, _, idx, g = make_case(rng, 20, 3, 10, np.float64)
    opt = RowAdaGrad(table, nonfinite="skip")
    g[0, 0] = np.nan
    assert opt.update(idx, g) is False
    assert (opt.step, opt.skipped_steps) == (0, 1)


def test_row_adagrad_from_preset(rng):
    table, _, idx, g = make_case(rng, 20, 3, 10, np.float32)
    opt = RowAdaGrad.from_preset(table, "torch", lr=0.1)
    assert opt.hyper.rule == PRESETS["torch"].rule and opt.hyper.eps == 1e-10
    assert opt.hyper.lr == 0.1


@pytest.mark.parametrize("bad, exc, msg", [
    ({"rowwise": True}, ValueError, "rowwise=True but this optimizer has rowwise=False"),
    ({"sum": np.zeros((20, 4), np.float32)}, ValueError, r"state_dict\['sum'\] has shape"),
    ({"sum": np.zeros((20, 3), np.float64)}, ValueError, "dtype float64"),
    ({"step": -1}, ValueError, r"state_dict\['step'\] must be an int >= 0"),
    ({"lr": -1.0}, ValueError, "lr must be >= 0"),
    ({"rule": {"nope": True}}, ValueError, r"state_dict\['rule'\] is not a Rule"),
    ({"rule": {"eps_placement": "nowhere"}}, ValueError, r"state_dict\['rule'\] is not"),
    ({"rule": None}, ValueError, r"state_dict\['rule'\] must be a dict"),
    ({"skipped_steps": -2}, ValueError, r"state_dict\['skipped_steps'\] must be"),
])
def test_row_adagrad_load_state_dict_validates_first(rng, bad, exc, msg):
    table, _, idx, g = make_case(rng, 20, 3, 10, np.float32)
    opt = RowAdaGrad(table, lr=0.05)
    opt.update(idx, g)
    sd = {**opt.state_dict(), **bad}
    h0, step0, hyper0 = opt.h.copy(), opt.step, opt.hyper
    with pytest.raises(exc, match=msg):
        opt.load_state_dict(sd)
    assert_bits_equal(opt.h, h0)
    assert (opt.step, opt.hyper) == (step0, hyper0)


@pytest.mark.parametrize("rowwise", [False, True])
def test_row_adagrad_resume_keeps_the_rule(rng, rowwise):
    """A run saved with a rule and resumed in a fresh RowAdaGrad continues with that
    rule, bit for bit, and its skipped-step count (the state dict had neither)."""
    table, _, _, _ = make_case(rng, 6, 8, 5, np.float32)
    steps = [(rng.integers(0, 6, 5), rng.standard_normal((5, 8)).astype(np.float32))
             for _ in range(4)]
    steps[1][1][0, 0] = np.nan
    rule = Rule(fma_accumulate=True, fma_weight_decay=True)

    def make(t):
        return RowAdaGrad(t, lr=0.1, weight_decay=0.5, rule=rule, rowwise=rowwise,
                          nonfinite="skip")

    whole = make(table.copy())
    for idx, g in steps:
        whole.update(idx, g)
    first = make(table.copy())
    for idx, g in steps[:2]:
        first.update(idx, g)
    resumed = RowAdaGrad(first.table, lr=0.1, rowwise=rowwise, nonfinite="skip")
    resumed.load_state_dict(first.state_dict())
    assert resumed.hyper.rule == rule and resumed.skipped_steps == 1
    for idx, g in steps[2:]:
        resumed.update(idx, g)
    assert_bits_equal(resumed.table, whole.table)
    assert_bits_equal(resumed.h, whole.h)


def test_row_adagrad_rejects_bad_table():
    with pytest.raises(ValueError, match="table must be 2-D"):
        RowAdaGrad(np.zeros(4, np.float32))


def test_no_recompile(rng):
    """Repeated calls reuse one compiled signature per (dtype, index dtype, layout)."""
    for rowwise in (False, True):
        table, state, idx, g = make_case(rng, 30, 4, 20, np.float32, rowwise=rowwise)
        for _ in range(3):
            adagrad_update_rows(table, state, idx, g, rowwise=rowwise)
    span = cpu_rows.rows_span_full
    sigs = [s for s in span.signatures if s[0] == numba.types.float32[:, ::1]
            and s[3] == numba.types.int64[::1]]
    assert len(sigs) == 1


# --- outside checks: FBGEMM, torch --------------------------------------------------------


def _fbgemm():
    pytest.importorskip("torch")
    try:
        with warnings.catch_warnings():  # its import warns about optional SSD modules
            warnings.simplefilter("ignore")
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
                ComputeDevice,
                EmbeddingLocation,
                SplitTableBatchedEmbeddingBagsCodegen,
                WeightDecayMode,
            )
    except Exception as exc:  # not installed, or a build that does not load
        pytest.skip(f"fbgemm-gpu-cpu is not usable here ({exc}); pip install "
                    "'fastadagrad[peers]'")
    return (SplitTableBatchedEmbeddingBagsCodegen, ComputeDevice, EmbeddingLocation,
            EmbOptimType, PoolingMode, WeightDecayMode)


#: Measured bound for FBGEMM's CPU EXACT_ROWWISE_ADAGRAD (fbgemm-gpu-cpu 1.8.0, torch
#: 2.13.0): 0 ulp, i.e. bit-identical, with ``rule=FBGEMM_ROWWISE``. Its
#: ``1.0 - m * wd`` is evaluated in double and rounded to float, ours rounded once from
#: the exact value: the two differ only when double rounding bites (about 1 in 2^29).
FBGEMM_MAX_ULP = 0


@pytest.mark.parametrize("mode", ["none", "l2", "decoupled"])
@pytest.mark.parametrize("dups", [False, True], ids=["unique", "duplicates"])
def test_rowwise_matches_fbgemm_cpu(mode, dups):
    import torch

    Tbe, Dev, Loc, Opt, Pool, Wdm = _fbgemm()
    from fastadagrad.validate import ulp_diff

    r, d, k, lr, wd = 400, 68, 300, 0.05, 0.01
    wdm = {"none": Wdm.NONE, "l2": Wdm.L2, "decoupled": Wdm.DECOUPLE}[mode]
    emb = Tbe([(r, d, Loc.HOST, Dev.CPU)], optimizer=Opt.EXACT_ROWWISE_ADAGRAD,
              learning_rate=lr, eps=1e-7, weight_decay=wd if mode != "none" else 0.0,
              weight_decay_mode=wdm, pooling_mode=Pool.NONE)
    rng = np.random.default_rng(5)
    p = rng.standard_normal((r, d)).astype(np.float32)
    with torch.no_grad():
        emb.split_embedding_weights()[0].copy_(torch.from_numpy(p))
    h = np.zeros(r, np.float32)
    rule = dataclasses.replace(FBGEMM_ROWWISE, weight_decay_mode="decoupled"
                               if mode == "decoupled" else "coupled")
    for step in range(1, 6):
        idx = rng.integers(0, r, k) if dups else rng.choice(r, k, replace=False)
        g = (rng.standard_normal((k, d)) * 10.0 ** rng.uniform(-3, 1, (k, 1))).astype(
            np.float32)
        emb(torch.from_numpy(idx), torch.arange(k + 1)).backward(torch.from_numpy(g))
        adagrad_update_rows(p, h, idx, g, lr=lr, eps=1e-7, step=step, rowwise=True,
                            weight_decay=wd if mode != "none" else 0.0, rule=rule)
    wt = emb.split_embedding_weights()[0].detach().numpy()
    ht = emb.split_optimizer_states()[0][0].detach().numpy()
    assert ulp_diff(p, wt)[0] <= FBGEMM_MAX_ULP
    assert ulp_diff(h, ht)[0] <= FBGEMM_MAX_ULP


#: torch.optim.Adagrad with sparse gradients (torch 2.13.0 CPU): after ``coalesce()``
#: it computes ``std = sqrt(h[rows]) + eps`` and ``p[rows] += -clr * (g / std)``; the
#: accumulator is bit-identical with ``Rule(lr_placement="after")``. The parameter is
#: not, for two reasons measured here: MKL's axpy rounds ``p + (-clr) * q`` once (an
#: FMA), and torch's CPU ``sqrt`` is not correctly rounded (1 ulp off for about 17% of
#: random float32 inputs, 1% of float64, against NumPy's IEEE sqrt). Bound: after 3
#: steps the parameters differ by at most TORCH_SPARSE_MAX_ULP ulp of max(|p|, 1)
#: (measured: 1 in float32, 2 in float64; near 0 that is many ulp of p itself).
TORCH_SPARSE_RULE = Rule(lr_placement="after")
TORCH_SPARSE_MAX_ULP = 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_full_close_to_torch_sparse_adagrad(dtype):
    torch = pytest.importorskip("torch")
    r, d, k = 60, 16, 200
    rng = np.random.default_rng(9)
    p = rng.standard_normal((r, d)).astype(dtype)
    h = np.zeros_like(p)
    emb = torch.nn.Embedding(r, d, sparse=True, dtype=torch.from_numpy(p).dtype)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(p))
    opt = torch.optim.Adagrad(emb.parameters(), lr=0.05, eps=1e-10, lr_decay=0.01)
    for step in range(1, 4):
        idx = torch.from_numpy(rng.integers(0, r, k))
        g = torch.from_numpy(rng.standard_normal((k, d)).astype(dtype))
        emb.weight.grad = torch.sparse_coo_tensor(idx[None], g, (r, d),
                                                  check_invariants=True)
        with warnings.catch_warnings():  # torch's own _make_sparse warns about invariants
            warnings.filterwarnings("ignore", "Sparse invariant checks")
            opt.step()
        # torch sums duplicates in its own (unstable) sort order: pass it the coalesced
        # gradient, as the torch adapter does
        c = emb.weight.grad.coalesce()
        adagrad_update_rows(p, h, c.indices()[0].numpy(), c.values().numpy(), lr=0.05,
                            eps=1e-10, lr_decay=0.01, step=step, rule=TORCH_SPARSE_RULE)
    assert_bits_equal(h, opt.state[emb.weight]["sum"].numpy(), "state")
    pt = emb.weight.detach().numpy()
    tol = TORCH_SPARSE_MAX_ULP * np.finfo(dtype).eps * np.maximum(np.abs(pt), 1)
    assert (np.abs(p - pt) <= tol).all()


def test_reference_full_is_reference_step_on_rows(rng):
    """The reference itself: full rows == reference_step on the gathered rows."""
    table, state, idx, g = make_case(rng, 25, 4, 60, np.float32)
    rows, sums = reference_sum_rows(idx, g)
    p, h = table[rows].copy(), state[rows].copy()
    reference_step(p, sums, h, Hyper.make(lr=0.1))
    reference_rows_step(table, state, idx, g, Hyper.make(lr=0.1))
    assert_bits_equal(table[rows], p)


def test_threads_update_separate_tables(monkeypatch):
    """Python threads updating their own tables at once (each has its own grouping
    scratch; parallel kernels take cpu.PARALLEL_LOCK) give the serial results."""
    import threading

    monkeypatch.setattr(config, "PARALLEL_THRESHOLD", 2000)  # some calls parallel

    def work(seed, table, state, rowwise, steps=40):
        rng = np.random.default_rng(seed)
        for s in range(1, steps + 1):
            k = int(rng.integers(1, 400))
            idx = rng.integers(0, table.shape[0], k)
            g = rng.standard_normal((k, table.shape[1])).astype(table.dtype)
            adagrad_update_rows(table, state, idx, g, step=s, rowwise=rowwise)

    jobs = []
    for i in range(4):
        rowwise = bool(i % 2)
        t = np.random.default_rng(i).standard_normal((300, 9)).astype(np.float32)
        jobs.append((i, t, np.zeros(300 if rowwise else (300, 9), np.float32), rowwise))
    expect = [(t.copy(), s.copy()) for _, t, s, _ in jobs]
    for (i, _, _, rowwise), (t, s) in zip(jobs, expect):
        work(i, t, s, rowwise)
    threads = [threading.Thread(target=work, args=job) for job in jobs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for (_, t, s, _), (te, se) in zip(jobs, expect):
        assert_bits_equal(t, te)
        assert_bits_equal(s, se)
