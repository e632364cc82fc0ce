"""Caches never write into memory other than the arrays passed in this call, and
checkpoints never load state under the wrong name.

Every reproducer of a corruption, crash or mix-up found by probing the optimizer as a
user would is a test here: deep copies and pickles of params and optimizer together
(in a subprocess where the old code crashed), in-place ``dtype``/``shape``/``resize``
changes after a step, name matching on load, and a stateful property test that random
sequences of those operations never change an array that was not passed to ``update``.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import fastadagrad
from fastadagrad import _plan
from fastadagrad.checkpoint import CheckpointError
from fastadagrad.reference import reference_step
from fastadagrad.testing import assert_bits_equal

F32 = np.float32


def _model(n: int = 2, size: int = 4, dtype: type = F32) -> tuple[dict, dict]:
    p = {f"t{i}": np.ones(size, dtype) for i in range(n)}
    g = {k: np.full(size, 0.5, dtype) for k in p}
    return p, g


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_struct_layout_is_recognised() -> None:
    """The fast per-step scan is on here (else every step takes the slow path)."""
    assert _plan.struct_layout_ok()


# --- copies and pickles -----------------------------------------------------------

def test_deepcopy_of_params_and_optimizer_leaves_the_originals_alone() -> None:
    p, g = _model()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    before = {k: v.copy() for k, v in p.items()}
    h_before = {k: v.copy() for k, v in opt.h.items()}
    p2, opt2 = copy.deepcopy((p, opt))
    opt2.update(p2, g)
    for k in p:
        assert_bits_equal(p[k], before[k], k)
        assert_bits_equal(opt.h[k], h_before[k], k)
    # the copy took exactly the step a fresh run takes
    ref_p, _ = _model()
    ref = fastadagrad.AdaGrad(lr=0.1)
    ref.update(ref_p, g)
    ref.update(ref_p, g)
    for k in p:
        assert_bits_equal(p2[k], ref_p[k], k)
        assert_bits_equal(opt2.h[k], ref.h[k], k)


def test_pickled_params_and_optimizer_update_in_a_new_process(tmp_path: Path) -> None:
    """The old plan kept raw addresses through pickle: SIGSEGV in a new process."""
    p, g = _model(3, 1000)
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    (tmp_path / "both.pkl").write_bytes(pickle.dumps({"params": p, "opt": opt}))
    out = _run_python(f"""
        import pickle, numpy as np
        d = pickle.loads(open({str(tmp_path / 'both.pkl')!r}, 'rb').read())
        p, opt = d['params'], d['opt']
        g = {{k: np.full(1000, 0.5, np.float32) for k in p}}
        for _ in range(3):
            opt.update(p, g)
        np.savez({str(tmp_path / 'out.npz')!r}, **p)
    """)
    assert out.returncode == 0, out.stderr
    ref_p, _ = _model(3, 1000)
    ref = fastadagrad.AdaGrad(lr=0.1)
    for _ in range(4):
        ref.update(ref_p, g)
    with np.load(tmp_path / "out.npz") as z:
        for k in p:
            assert_bits_equal(z[k], ref_p[k], k)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_optimizer_keeps_its_views_on_its_buffers(how: str) -> None:
    p, g = _model()
    p["b"] = np.ones((2, 3), np.float64)  # two dtypes: two flat buffers
    g["b"] = np.full((2, 3), 0.25, np.float64)
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    opt2 = copy.deepcopy(opt) if how == "deepcopy" else pickle.loads(pickle.dumps(opt))
    for k, v in opt2.h.items():
        assert any(np.shares_memory(v, fb.data) for fb in opt2._flat), k
        assert not any(np.shares_memory(v, fb.data) for fb in opt._flat), k
    h_orig = {k: v.copy() for k, v in opt.h.items()}
    opt2.update(copy.deepcopy(p), g)
    sd = opt2.state_dict()
    for i, k in enumerate(p):
        assert_bits_equal(opt2.h[k], sd["state"][i]["sum"], k)
        assert_bits_equal(opt2.h[k], h_orig[k] * 2, k)  # g*g added once more, exactly
        assert_bits_equal(opt.h[k], h_orig[k], k)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_flat_buffer_views_point_into_the_copy(how: str) -> None:
    fb = fastadagrad.FlatBuffer({"W": np.ones((2, 3)), "b": np.zeros(3)})
    fb2 = copy.deepcopy(fb) if how == "deepcopy" else pickle.loads(pickle.dumps(fb))
    fb2["W"][0, 0] = 7.0
    assert fb2.data[0] == 7.0 and fb.data[0] == 1.0 and fb["W"][0, 0] == 1.0
    assert fb2.layout == fb.layout


def test_copied_flat_model_trains_like_the_original() -> None:
    params = fastadagrad.FlatBuffer({"W": np.ones((3, 4), F32), "b": np.ones(4, F32)})
    grads = params.full_like(0.5)
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(params, grads)
    params2, opt2 = copy.deepcopy((params, opt))
    opt.update(params, grads)
    opt2.update(params2, grads)
    assert_bits_equal(params2.data, params.data)
    for k in params:
        assert_bits_equal(opt2.h[k], opt.h[k], k)
        assert np.shares_memory(opt2.h[k], opt2._flat[0].data)


# --- in-place changes after a step --------------------------------------------------

def _trained() -> tuple[dict, dict, fastadagrad.AdaGrad]:
    p, g = _model(2, 4)
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    return p, g, opt


@pytest.mark.parametrize("new", [np.int32, ">f4", np.float64])
def test_in_place_dtype_change_is_refused(new: object) -> None:
    p, g, opt = _trained()
    p["t0"].dtype = new
    bits = {k: v.view(np.uint8).copy() for k, v in p.items()}
    hb = {k: v.copy() for k, v in opt.h.items()}
    with pytest.raises(TypeError, match=r"params\['t0'\]"):
        opt.update(p, g)
    for k in p:
        assert np.array_equal(p[k].view(np.uint8), bits[k]), k
        assert_bits_equal(opt.h[k], hb[k], k)
    assert opt.step == 1


def test_freed_dtype_object_address_is_not_trusted() -> None:
    # a param restored from a pickle has its own float32 dtype object; the per-step
    # scan compares dtype objects by address, so the plan keeps the one it checked
    # alive: after ``b.dtype = ...`` drops the array's reference, no new dtype object
    # (here a byte-swapped float32) may land at that address and pass as checked
    b = pickle.loads(pickle.dumps(np.ones(4, np.float32)))
    assert b.dtype is not np.dtype(np.float32)
    p = {"a": np.ones(4, np.float32), "b": b}
    del b
    opt = fastadagrad.AdaGrad(lr=0.5)
    opt.update(p, {k: np.full_like(v, 0.5) for k, v in p.items()})
    addr = id(p["b"].dtype)
    p["b"].dtype = np.int32
    swapped = [np.dtype(np.float32).newbyteorder(">") for _ in range(64)]
    assert addr not in set(map(id, swapped))
    p["b"].dtype = swapped[0]
    bits = {k: v.view(np.uint8).copy() for k, v in p.items()}
    with pytest.raises(TypeError, match=r"params\['b'\] has dtype >f4"):
        opt.update(p, {"a": np.full(4, 0.5, np.float32), "b": np.full(4, 0.5, ">f4")})
    for k in p:
        assert np.array_equal(p[k].view(np.uint8), bits[k]), k


def test_in_place_dtype_change_of_the_state_is_refused() -> None:
    p, g, opt = _trained()
    opt.h["t1"].dtype = np.int32
    with pytest.raises(TypeError, match=r"state_sum\['t1'\]"):
        opt.update(p, g)


def test_in_place_shape_change_is_refused() -> None:
    p, g, opt = _trained()
    p["t0"].shape = (2, 2)
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match=r"grads\['t0'\] has shape \(4,\)"):
        opt.update(p, g)
    for k in p:
        assert_bits_equal(p[k], before[k], k)


def test_in_place_shape_change_with_matching_grads_replans() -> None:
    p, g, opt = _trained()
    p["t0"].shape = (2, 2)
    with pytest.raises(ValueError, match=r"state_sum\['t0'\] has shape \(4,\)"):
        opt.update(p, {"t0": np.full((2, 2), 0.5, F32), "t1": g["t1"]})


def test_resize_after_a_step_never_writes_freed_memory() -> None:
    """Run in a subprocess: the old code wrote into freed memory (one run segfaulted)."""
    out = _run_python("""
        import numpy as np, fastadagrad
        p = {"W": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
        g = {k: np.full(4, .5, np.float32) for k in p}
        opt = fastadagrad.AdaGrad(lr=.1)
        opt.update(p, g)
        p["W"].resize((200000,), refcheck=False)
        try:
            opt.update(p, g)
        except ValueError as e:
            print("refused:", e)
        else:
            raise SystemExit("accepted a resized parameter")
    """)
    assert out.returncode == 0, out.stderr + out.stdout
    assert "refused: " in out.stdout and "params['W']" in out.stdout


def test_resize_away_and_back_writes_the_new_memory() -> None:
    """Same shape, dtype and object, but the data moved: the step must follow it."""
    p, g, opt = _trained()
    ref_p, _ = _model(2, 4)
    ref = fastadagrad.AdaGrad(lr=0.1)
    ref.update(ref_p, g)
    old = p["t0"].__array_interface__["data"][0]
    keep = p["t0"].copy()
    for size in (1 << 20, 4):  # realloc twice: usually a new address
        p["t0"].resize((size,), refcheck=False)
    p["t0"][:] = keep
    moved = p["t0"].__array_interface__["data"][0] != old
    opt.update(p, g)
    ref.update(ref_p, g)
    for k in p:
        assert_bits_equal(p[k], ref_p[k], k)
    if not moved:
        pytest.skip("the allocator returned the same address; the scan was not exercised")


@pytest.mark.parametrize("how", ["one entry", "whole dict"])
@pytest.mark.parametrize("kind", ["flat", "dict"])
def test_replaced_accumulator_is_the_one_updated(how: str, kind: str) -> None:
    """``opt.h[k] = ...`` (or ``opt.h = ...``) after a step, as with the NumPy class: the
    new array is updated and saved; the buffer behind the old one is not."""
    from fastadagrad.reference import NumpyAdaGrad

    rng = np.random.default_rng(0)
    init = {"W": rng.standard_normal(6).astype(F32), "b": rng.standard_normal(3).astype(F32)}
    gs = [{k: rng.standard_normal(v.shape).astype(F32) for k, v in init.items()}
          for _ in range(3)]
    wrap = fastadagrad.FlatBuffer if kind == "flat" else (lambda d: {k: v.copy()
                                                                   for k, v in d.items()})

    def run(opt: Any, p: Any, mk: Any) -> None:
        opt.update(p, mk(gs[0]))
        if how == "one entry":
            opt.h["W"] = np.full(6, 0.5, F32)
        else:
            opt.h = {k: np.full(v.shape, 0.5, F32) for k, v in opt.h.items()}
        for g in gs[1:]:
            opt.update(p, mk(g))

    ref_p, ref = {k: v.copy() for k, v in init.items()}, NumpyAdaGrad(lr=0.1)
    run(ref, ref_p, lambda g: {k: v.copy() for k, v in g.items()})
    p, opt = wrap(init), fastadagrad.AdaGrad(lr=0.1)
    run(opt, p, wrap)
    for k in init:
        assert_bits_equal(p[k], ref_p[k], k)
        assert_bits_equal(opt.h[k], ref.h[k], k)
    saved = opt.state_dict()["state"]
    for i, k in enumerate(init):
        assert_bits_equal(saved[i]["sum"], ref.h[k], k)


def test_swapped_accumulators_of_a_flat_model_follow_their_keys() -> None:
    """``opt.h`` with two accumulators swapped (same shapes): a FlatBuffer model updates
    each param with the accumulator its key now names, as a dict model does."""
    rng = np.random.default_rng(1)
    init = {"a": rng.standard_normal(3).astype(F32), "b": rng.standard_normal(3).astype(F32)}
    out = []
    for wrap in (fastadagrad.FlatBuffer, lambda d: {k: v.copy() for k, v in d.items()}):
        p, opt = wrap(init), fastadagrad.AdaGrad(lr=0.1)
        opt.update(p, wrap({"a": np.full(3, 2.0, F32), "b": np.full(3, 0.1, F32)}))
        opt.h = {"b": opt.h["a"], "a": opt.h["b"]}  # (the views in the buffer's order)
        opt.update(p, wrap({"a": np.ones(3, F32), "b": np.ones(3, F32)}))
        out.append([np.array(x) for k in init for x in (p[k], opt.h[k])])
    for x, y in zip(*out):
        assert_bits_equal(x, y)


def test_memmap_params_keep_their_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """np.memmap params and states (an ndarray subclass) pass the per-step compiled
    check: the plan is not built again at every step; a param whose class is changed in
    place is described again."""
    builds = []
    real = _plan.Plan.build
    monkeypatch.setattr(_plan.Plan, "build",
                        lambda self, *a, **k: (builds.append(1), real(self, *a, **k))[1])
    p = {i: np.memmap(tmp_path / f"p{i}", F32, "w+", shape=(16,)) for i in range(3)}
    plain = {i: np.zeros(16, F32) for i in p}
    g = {i: np.full(16, 0.5, F32) for i in p}
    opt, ref = fastadagrad.AdaGrad(lr=0.1), fastadagrad.AdaGrad(lr=0.1)
    for _ in range(5):
        opt.update(p, g)
        ref.update(plain, g)
    assert len(builds) == 2  # one per optimizer
    for i in p:
        assert_bits_equal(np.asarray(p[i]), plain[i], str(i))

    class Other(np.memmap):
        pass

    p[0].__class__ = Other  # the same object, another type: described again
    opt.update(p, g)
    assert len(builds) == 3


def test_read_only_after_a_step_is_refused() -> None:
    p, g, opt = _trained()
    p["t1"].flags.writeable = False
    with pytest.raises(ValueError, match=r"params\['t1'\] is read-only"):
        opt.update(p, g)


def test_grad_that_becomes_a_param_view_is_refused() -> None:
    p, g, opt = _trained()
    g2 = dict(g, t1=p["t0"])
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match="share memory"):
        opt.update(p, g2)
    for k in p:
        assert_bits_equal(p[k], before[k], k)


def test_equal_but_distinct_grad_dtype_objects_still_work() -> None:
    """Grads whose dtype object is equal to but not the params' take the slow path."""
    p, g, opt = _trained()
    ref_p, _ = _model(2, 4)
    ref = fastadagrad.AdaGrad(lr=0.1)
    ref.update(ref_p, g)
    odd = np.dtype(np.float32).newbyteorder("=")  # a distinct, equal dtype object
    g2 = {k: np.frombuffer(v.tobytes(), dtype=odd) for k, v in g.items()}
    opt.update(p, g2)
    ref.update(ref_p, g)
    for k in p:
        assert_bits_equal(p[k], ref_p[k], k)


def test_empty_model_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="params is empty"):
        fastadagrad.AdaGrad().update({}, {})
    with pytest.raises(ValueError, match="params is empty"):
        fastadagrad.AdaGrad().update([], [])


# --- checkpoints: names, resets, settings -------------------------------------------

def _net(order: tuple[str, ...] = ("fc1", "fc2")) -> dict:
    shapes = {"fc1": (3, 2), "fc2": (3, 2)}
    return {k: np.ones(shapes[k], F32) for k in order}


def _grads_for(params: dict, scale: dict) -> dict:
    return {k: np.full(v.shape, scale[k], F32) for k, v in params.items()}


@pytest.mark.parametrize("into", ["params", "stepped"])
def test_load_matches_accumulators_by_name(tmp_path: Path, into: str) -> None:
    p = _net()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 3.0}))
    opt.save(tmp_path / "ck.npz")
    swapped = _net(("fc2", "fc1"))
    new = fastadagrad.AdaGrad(lr=0.1)
    if into == "stepped":
        new.update(swapped, _grads_for(swapped, {"fc1": 0.0, "fc2": 0.0}))
        new.load(tmp_path / "ck.npz")
    else:
        new.load(tmp_path / "ck.npz", params=swapped)
    assert_bits_equal(new.h["fc1"], opt.h["fc1"], "fc1")
    assert_bits_equal(new.h["fc2"], opt.h["fc2"], "fc2")


def test_load_refuses_other_names(tmp_path: Path) -> None:
    p = _net()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 3.0}))
    opt.save(tmp_path / "ck.npz")
    other = {"x": np.ones((3, 2), F32), "y": np.ones((3, 2), F32)}
    with pytest.raises(CheckpointError, match="names do not match"):
        fastadagrad.AdaGrad().load(tmp_path / "ck.npz", params=other)
    stepped = fastadagrad.AdaGrad(lr=0.5)
    stepped.update(other, _grads_for(other, {"x": 1.0, "y": 1.0}))
    h = {k: v.copy() for k, v in stepped.h.items()}
    with pytest.raises(CheckpointError, match="names do not match"):
        stepped.load(tmp_path / "ck.npz")
    assert stepped.step == 1 and stepped.lr == 0.5
    for k in h:
        assert_bits_equal(stepped.h[k], h[k], k)


def test_int_keyed_dict_round_trips_without_params(tmp_path: Path) -> None:
    p = {0: np.ones(3, F32), 1: np.ones(2, F32)}
    g = {0: np.full(3, 0.5, F32), 1: np.full(2, 2.0, F32)}
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    opt.save(tmp_path / "ck")
    new = fastadagrad.AdaGrad()
    new.load(tmp_path / "ck")
    assert isinstance(new.h, dict) and list(new.h) == [0, 1]
    new.update(p, g)  # the old code raised KeyError: state has keys [0, 1]...
    opt.update({k: v.copy() for k, v in p.items()}, g)
    for k in p:
        assert_bits_equal(new.h[k], opt.h[k], str(k))


def test_int_keyed_state_and_flat_buffer_do_not_swap_keys() -> None:
    """A flat-buffer state built from {1: a, 0: b} must not pair with FlatBuffer({0, 1})."""
    a, b = np.ones(3, F32), np.ones(3, F32)
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update({1: a, 0: b}, {1: np.full(3, 1.0, F32), 0: np.full(3, 3.0, F32)})
    fb = fastadagrad.FlatBuffer({0: b, 1: a})
    gfb = fastadagrad.FlatBuffer({0: np.full(3, 3.0, F32), 1: np.full(3, 1.0, F32)})
    h0, h1 = opt.h[0].copy(), opt.h[1].copy()
    opt.update(fb, gfb)
    assert_bits_equal(opt.h[0], h0 + F32(9.0), "key 0")
    assert_bits_equal(opt.h[1], h1 + F32(1.0), "key 1")


@pytest.mark.parametrize("how", ["state_dict", "file"])
def test_dict_with_unsaved_keys_is_named_by_the_first_update(tmp_path: Path, how: str
                                                             ) -> None:
    """Tuple keys are not recorded in a checkpoint: loaded without ``params=``, the
    state is matched by position at the first update (as torch matches unnamed state)
    and continues like the original; a first update that fails leaves it unnamed."""
    rng = np.random.default_rng(3)
    P = {("l", 1): rng.standard_normal(3).astype(F32),
         ("l", 2): rng.standard_normal(2).astype(F32)}
    gs = [{k: rng.standard_normal(v.shape).astype(F32) for k, v in P.items()}
          for _ in range(3)]
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(P, gs[0])
    Q = {k: v.copy() for k, v in P.items()}
    other = fastadagrad.AdaGrad(lr=0.1)
    if how == "file":
        other.load(opt.save(tmp_path / "ck"))
    else:
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError):  # a wrong shape: nothing changes, still unnamed
        other.update({("l", 1): np.ones(4, F32), ("l", 2): np.ones(2, F32)},
                     {("l", 1): np.ones(4, F32), ("l", 2): np.ones(2, F32)})
    assert list(other.h) == [0, 1] and other.step == 1
    # saved again before it is named, it stays unnamed
    again = fastadagrad.AdaGrad(lr=0.1)
    again.load_state_dict(other.state_dict())
    other = again
    for g in gs[1:]:
        opt.update(P, g)
        other.update(Q, g)
    assert list(other.h) == list(P)
    for k in P:
        assert_bits_equal(Q[k], P[k], str(k))
        assert_bits_equal(other.h[k], opt.h[k], str(k))


def test_loading_a_never_stepped_checkpoint_resets(tmp_path: Path) -> None:
    fastadagrad.AdaGrad(lr=0.3).save(tmp_path / "fresh.npz")
    p = _net()
    opt = fastadagrad.AdaGrad(lr=0.1, nonfinite="skip")
    opt.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 1.0}))
    opt.update(p, _grads_for(p, {"fc1": np.nan, "fc2": 1.0}))
    opt.load(tmp_path / "fresh.npz")
    assert (opt.h, opt.step, opt.skipped_steps, opt.lr) == (None, 0, 0, 0.3)
    q = _net()
    ref = fastadagrad.AdaGrad(lr=0.3)
    for o, params in ((opt, p), (ref, q)):
        o.update(params, _grads_for(params, {"fc1": 1.0, "fc2": 2.0}))
    for k in ref.h:
        assert_bits_equal(opt.h[k], ref.h[k], k)


def test_load_keeps_the_optimizers_nonfinite_policy(tmp_path: Path) -> None:
    p = _net()
    src = fastadagrad.AdaGrad(lr=0.1)  # nonfinite="ignore"
    src.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 1.0}))
    src.save(tmp_path / "ck.npz")
    opt = fastadagrad.AdaGrad(nonfinite="raise")
    opt.load(tmp_path / "ck.npz")
    assert opt.nonfinite == "raise"
    with pytest.raises(FloatingPointError):
        opt.update(p, _grads_for(p, {"fc1": np.nan, "fc2": 1.0}))


def test_initial_accumulator_value_that_overflows_float32_is_refused() -> None:
    opt = fastadagrad.AdaGrad(initial_accumulator_value=1e39)
    p, g = _model()
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match="initial_accumulator_value=1e\\+39 overflows"):
        opt.update(p, g)
    assert opt.h is None and opt.step == 0
    for k in p:
        assert_bits_equal(p[k], before[k], k)
    # float64 holds it
    p64, g64 = _model(dtype=np.float64)
    assert opt.update(p64, g64)


@pytest.mark.parametrize("value,exc,msg", [
    (10**400, ValueError, "lr=1000.*not representable"),
    (float("nan"), ValueError, "lr must be finite"),
    ("0.1", TypeError, "lr must be a real number"),
])
def test_bad_hyperparameter_names_itself(value: object, exc: type, msg: str) -> None:
    with pytest.raises(exc, match=msg):
        fastadagrad.AdaGrad(lr=value)  # type: ignore[arg-type]


def test_fraction_is_a_real_number() -> None:
    from fractions import Fraction

    assert fastadagrad.AdaGrad(lr=Fraction(1, 10)).lr == 0.1


def test_crafted_negative_skipped_steps_is_refused() -> None:
    p = _net()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 1.0}))
    sd = opt.state_dict()
    sd["param_groups"][0]["fastadagrad"]["skipped_steps"] = -5
    with pytest.raises(CheckpointError, match="skipped_steps"):
        fastadagrad.AdaGrad().load_state_dict(sd)


def test_save_paths_like_np_savez(tmp_path: Path) -> None:
    p = _net()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, _grads_for(p, {"fc1": 1.0, "fc2": 1.0}))
    assert opt.save(tmp_path / "ck") == str(tmp_path / "ck.npz")
    assert (tmp_path / "ck.npz").exists() and not (tmp_path / "ck").exists()
    assert opt.save(os.fsencode(tmp_path / "b.npz")) == str(tmp_path / "b.npz")
    fastadagrad.AdaGrad().load(os.fsencode(tmp_path / "b.npz"))
    # a symbolic link is written through: the link stays, its target is replaced
    (tmp_path / "real.npz").write_bytes(b"old")
    (tmp_path / "link.npz").symlink_to(tmp_path / "real.npz")
    opt.save(tmp_path / "link.npz")
    assert (tmp_path / "link.npz").is_symlink()
    fastadagrad.AdaGrad().load(tmp_path / "real.npz")
    with pytest.raises(FileNotFoundError, match="folder .*nowhere.* does not exist"):
        opt.save(tmp_path / "nowhere" / "ck.npz")


# --- schedules -----------------------------------------------------------------------

def test_lr_is_settable_and_accepts_a_schedule(tmp_path: Path) -> None:
    p, g = _model()
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    opt.lr = 0.05
    assert opt.lr == 0.05
    opt.lr = lambda step: 0.1 / step
    assert opt.lr == 0.1 / 2  # the value the next step (step 2) uses
    ref_p, _ = _model()
    ref_h = {k: np.zeros(4, F32) for k in ref_p}
    for step in (1, 2, 3):
        hyper = fastadagrad._hyper.Hyper.make(lr=0.1 if step == 1 else 0.1 / step)
        for k in ref_p:
            reference_step(ref_p[k], g[k], ref_h[k], hyper, step)
        if step > 1:
            opt.update(p, g)
    for k in p:
        assert_bits_equal(p[k], ref_p[k], k)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["lr"] == 0.1 / 4


def test_schedule_to_a_zero_of_the_other_sign_is_followed() -> None:
    # -0.0 == 0.0, yet the sign reaches a zero parameter's bits
    for first, second in ((0.0, -0.0), (-0.0, 0.0)):
        p = {"w": np.array([-0.0, 0.0, -0.0], F32)}
        g = {"w": np.full(3, 0.5, F32)}
        ref = {"w": p["w"].copy()}
        ref_h = {"w": np.zeros(3, F32)}
        opt = fastadagrad.AdaGrad(lr=lambda step, a=first, b=second: a if step == 1 else b)
        for step, lr in ((1, first), (2, second)):
            opt.update(p, g)
            reference_step(ref["w"], g["w"], ref_h["w"], fastadagrad._hyper.Hyper.make(lr=lr),
                           step)
            assert_bits_equal(p["w"], ref["w"], f"step {step}: {first!r} then {second!r}")


@pytest.mark.parametrize("model", ["one array", "dict", "mixed dtypes"])
@pytest.mark.parametrize("rule", [None, "after"])
@pytest.mark.parametrize("lr_decay", [0.0, 0.3])
def test_learning_rate_changed_every_step_is_the_reference(model: str, rule: str | None,
                                                           lr_decay: float) -> None:
    """A learning rate set before every step (a schedule: only the lr entries of the
    cached scalars are made again, Hyper.with_lr / relr), through the one-array and
    the many-array paths, float32 and float64, each placement of lr, with lr_decay:
    the reference's bits at every step; a value float32 cannot hold raises naming lr,
    nothing written, and the next good value steps on."""
    from fastadagrad._hyper import Hyper, Rule

    rng = np.random.default_rng(5)
    shapes = {"one array": {"w": (64, F32)}, "dict": {"w": (64, F32), "b": (7, F32)},
              "mixed dtypes": {"w": (64, F32), "b": (7, np.float64)}}[model]
    p = {k: rng.standard_normal(n).astype(dt) for k, (n, dt) in shapes.items()}
    ref_p = {k: v.copy() for k, v in p.items()}
    ref_h = {k: np.zeros_like(v) for k, v in p.items()}
    r = Rule(lr_placement="after") if rule else Rule()
    opt = fastadagrad.AdaGrad(lr=0.1, lr_decay=lr_decay, weight_decay=0.01, rule=r)
    lrs = [0.1, 0.05, 0.0, -0.0, 1e-30, 3e-3, 0.2, 0.2, 1e-3]
    for step, lr in enumerate(lrs, 1):
        opt.lr = lr
        g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p.items()}
        opt.update(p, g)
        hyper = Hyper.make(lr=lr, lr_decay=lr_decay, weight_decay=0.01, rule=r)
        for k in p:
            reference_step(ref_p[k], g[k], ref_h[k], hyper, step)
            assert_bits_equal(p[k], ref_p[k], f"step {step}, {k}")
    opt.lr = 1e40  # finite in double, inf in float32 (after lr_decay too)
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(ValueError, match="lr"):
        opt.update(p, g)
    for k in p:
        assert_bits_equal(p[k], before[k], k)
    opt.lr = 0.01
    opt.update(p, g)
    hyper = Hyper.make(lr=0.01, lr_decay=lr_decay, weight_decay=0.01, rule=r)
    for k in p:
        reference_step(ref_p[k], g[k], ref_h[k], hyper, len(lrs) + 1)
        assert_bits_equal(p[k], ref_p[k], k)


@pytest.mark.parametrize("bad,exc", [(-1.0, ValueError), (float("inf"), ValueError),
                                     ("x", TypeError)])
def test_bad_schedule_value_names_the_step(bad: object, exc: type) -> None:
    p, g = _model()
    opt = fastadagrad.AdaGrad(lr=lambda step: 0.1 if step < 3 else bad)
    opt.update(p, g)
    opt.update(p, g)
    before = {k: v.copy() for k, v in p.items()}
    with pytest.raises(exc, match="schedule at step 3"):
        opt.update(p, g)
    assert opt.step == 2
    for k in p:
        assert_bits_equal(p[k], before[k], k)


# --- random sequences ----------------------------------------------------------------

class CopyPickleLoadMachine(RuleBasedStateMachine):
    """Random copies, pickles, save/load round trips, key reorderings and in-place
    dtype changes between steps: the live model always matches a plain-NumPy shadow
    bit for bit, and no array that was not passed to ``update`` ever changes."""

    def __init__(self) -> None:
        super().__init__()
        rng = np.random.default_rng(0)
        shapes = {"a": (5,), "b": (2, 3), "c": (7,), "d": (1,)}
        dtypes = {"a": F32, "b": np.float64, "c": F32, "d": F32}
        self.params = {k: rng.standard_normal(s).astype(dtypes[k]) for k, s in
                       shapes.items()}
        self.opt = fastadagrad.AdaGrad(lr=0.05)
        self.shadow = {k: v.copy() for k, v in self.params.items()}
        self.shadow_h = {k: np.zeros_like(v) for k, v in self.params.items()}
        self.bystanders: list[tuple[np.ndarray, np.ndarray]] = []
        self.rng = rng
        self.tmp = Path(os.environ.get("TMPDIR", "/tmp"))
        self.hyper = fastadagrad._hyper.Hyper.make(lr=0.05)

    def _retire(self, params: dict, opt: fastadagrad.AdaGrad) -> None:
        arrays = list(params.values()) + (list(opt.h.values()) if opt.h else [])
        self.bystanders += [(a, a.copy()) for a in arrays]

    @rule()
    def step(self) -> None:
        grads = {k: self.rng.standard_normal(v.shape).astype(v.dtype)
                 for k, v in self.params.items()}
        self.opt.update(self.params, grads)
        for k in self.shadow:
            reference_step(self.shadow[k], grads[k], self.shadow_h[k], self.hyper)

    @rule(keep_original=st.booleans())
    def deepcopy(self, keep_original: bool) -> None:
        params2, opt2 = copy.deepcopy((self.params, self.opt))
        if keep_original:
            self._retire(params2, opt2)
        else:
            self._retire(self.params, self.opt)
            self.params, self.opt = params2, opt2

    @rule()
    def pickle_round_trip(self) -> None:
        d = pickle.loads(pickle.dumps({"p": self.params, "o": self.opt}))
        self._retire(self.params, self.opt)
        self.params, self.opt = d["p"], d["o"]

    @rule()
    def reorder_keys(self) -> None:
        keys = list(self.params)
        self.rng.shuffle(keys)
        self.params = {k: self.params[k] for k in keys}

    @precondition(lambda self: self.opt.h is not None)
    @rule()
    def save_and_load_reordered(self) -> None:
        path = self.tmp / f"fastadagrad-machine-{os.getpid()}.npz"
        self.opt.save(path)
        keys = list(self.params)
        self.rng.shuffle(keys)
        params = {k: self.params[k] for k in keys}
        new = fastadagrad.AdaGrad(lr=0.05)
        new.load(path, params=params)
        path.unlink()
        self._retire({}, self.opt)
        self.params, self.opt = params, new

    @precondition(lambda self: self.opt.h is not None)
    @rule(key=st.sampled_from(["a", "b", "c", "d"]))
    def dtype_change_is_refused(self, key: str) -> None:
        a = self.params[key]
        old = a.dtype
        a.dtype = np.int32 if old.itemsize == 4 else np.int64
        try:
            with pytest.raises(TypeError, match=f"params\\['{key}'\\]"):
                self.opt.update(self.params, {k: np.zeros(v.shape, v.dtype) for k, v
                                              in self.params.items()})
        finally:
            a.dtype = old

    @invariant()
    def live_model_matches_the_shadow(self) -> None:
        for k, v in self.params.items():
            assert_bits_equal(v, self.shadow[k], k)
            if self.opt.h is not None:
                assert_bits_equal(self.opt.h[k], self.shadow_h[k], k)

    @invariant()
    def bystanders_never_change(self) -> None:
        for a, snap in self.bystanders:
            assert np.array_equal(a.view(np.uint8), snap.view(np.uint8))


CopyPickleLoadMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
test_copy_pickle_load_sequences = CopyPickleLoadMachine.TestCase


# --- checkpoint fuzzing ----------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    p = {"W": np.arange(6, dtype=F32).reshape(2, 3), "b": np.ones(3, np.float64)}
    g = {"W": np.full((2, 3), 0.5, F32), "b": np.full(3, 0.25, np.float64)}
    opt = fastadagrad.AdaGrad(lr=0.1)
    opt.update(p, g)
    path = tmp_path_factory.mktemp("ck") / "good.npz"
    opt.save(path)
    return path.read_bytes()


def _load_outcome(data: bytes, path: Path) -> dict | None:
    path.write_bytes(data)
    opt = fastadagrad.AdaGrad()
    try:
        opt.load(path)
    except CheckpointError:
        return None
    return {k: v.copy() for k, v in opt.h.items()} if opt.h else {}


def test_truncation_at_every_length_raises_checkpoint_error(good_checkpoint: bytes,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "t.npz"
    for n in range(len(good_checkpoint)):
        assert _load_outcome(good_checkpoint[:n], path) is None, n


def test_byte_flips_raise_checkpoint_error_or_load_the_same_data(
        good_checkpoint: bytes, tmp_path: Path) -> None:
    """Every single-byte flip either fails with CheckpointError or (a byte the zip
    format does not check, e.g. a timestamp) loads exactly the saved sums."""
    path = tmp_path / "f.npz"
    expected = _load_outcome(good_checkpoint, path)
    assert expected
    rng = np.random.default_rng(1)
    positions = range(len(good_checkpoint)) if len(good_checkpoint) < 3000 else \
        rng.choice(len(good_checkpoint), 3000, replace=False)
    for i in positions:
        data = bytearray(good_checkpoint)
        data[i] ^= 0xFF
        got = _load_outcome(bytes(data), path)
        if got is not None:
            assert list(got) == list(expected), i
            for k in got:
                assert_bits_equal(got[k], expected[k], f"flip at {i}: {k}")


def test_checkpoint_reads_torch_dtypes() -> None:
    """Loading onto torch tensors compares their dtypes with the saved sums' (the GPU
    run found ``np.dtype(torch.float32)`` raising there)."""
    torch = pytest.importorskip("torch")
    from fastadagrad.checkpoint import _dtype_of

    assert _dtype_of(torch.zeros(2)) == np.float32
    assert _dtype_of(torch.zeros(2, dtype=torch.float64)) == np.float64
    assert _dtype_of(np.zeros(2, np.float32)) == np.float32
    assert _dtype_of(object()) is None


def test_overlap_search_agrees_with_brute_force() -> None:
    """The aliasing check finds an overlap exactly when two non-empty byte ranges, one
    of them written, intersect; the pair it names does intersect."""
    from fastadagrad._arrays import _find_overlap

    rng = np.random.default_rng(0)
    for _ in range(3000):
        n = int(rng.integers(0, 9))
        start = rng.integers(1, 80, n).astype(np.int64)
        end = start + rng.integers(0, 15, n)
        writable = rng.random(n) < 0.5
        pairs = [(i, j) for i in range(n) for j in range(i + 1, n)
                 if end[i] > start[i] and end[j] > start[j] and start[i] < end[j]
                 and start[j] < end[i] and (writable[i] or writable[j])]
        i, j = _find_overlap(start, end, writable)
        assert (i >= 0) == bool(pairs), (start, end, writable)
        if i >= 0:
            assert start[i] < end[j] and start[j] < end[i] and (writable[i] or writable[j])
