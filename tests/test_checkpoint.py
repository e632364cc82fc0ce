"""State dicts in torch's layout and crash-safe checkpoints (issue 5 item 5, issue 6 item 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

import fastadagrad
from fastadagrad.checkpoint import CheckpointError
from fastadagrad.presets import PRESETS
from fastadagrad.testing import assert_bits_equal

torch = pytest.importorskip("torch")

DTYPES = [np.float32, np.float64]
SHAPES = [(1037,), (7,), (3, 5), (1,)]
TORCH_KW = dict(lr=0.05, lr_decay=0.1, weight_decay=0.1, eps=1e-3,
                initial_accumulator_value=0.1, maximize=True)
ROOT = Path(__file__).resolve().parent.parent


def _grads(dtype: type, steps: int, shapes: list = SHAPES, seed: int = 1) -> list:
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(dtype) for s in shapes] for _ in range(steps)]


def _params(dtype: type, shapes: list = SHAPES) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def _torch_step(topt, tparams, grads) -> None:  # type: ignore[no-untyped-def]
    for t, g in zip(tparams, grads):
        t.grad = torch.from_numpy(g.copy())
    topt.step()


def _snapshot(opt: fastadagrad.AdaGrad) -> tuple:
    h = None if opt.h is None else [np.array(opt.h[k]) for k in
                                    (opt.h.keys() if isinstance(opt.h, dict)
                                     else range(len(opt.h)))]
    return (opt.hyper, opt.step, opt.skipped_steps, opt.initial_accumulator_value, h)


def _same(a: tuple, b: tuple) -> bool:
    if a[:4] != b[:4] or (a[4] is None) != (b[4] is None):
        return False
    return a[4] is None or all(np.array_equal(x, y) for x, y in zip(a[4], b[4]))


# ----------------------------------------------------------------- torch interchange

def test_state_dict_has_torchs_layout() -> None:
    params = _params(np.float32)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = torch.optim.Adagrad(tparams, fused=True)
    _torch_step(topt, tparams, _grads(np.float32, 1)[0])
    opt = fastadagrad.AdaGrad.from_preset("torch")
    opt.update(params, _grads(np.float32, 1)[0])
    ours, theirs = opt.state_dict(), topt.state_dict()
    assert set(ours) == set(theirs) == {"state", "param_groups"}
    assert set(theirs["param_groups"][0]) <= set(ours["param_groups"][0])
    assert ours["param_groups"][0]["params"] == theirs["param_groups"][0]["params"]
    for i in theirs["state"]:
        assert set(ours["state"][i]) == set(theirs["state"][i]) == {"step", "sum"}
        assert isinstance(ours["state"][i]["sum"], np.ndarray)
        assert float(ours["state"][i]["step"]) == float(theirs["state"][i]["step"]) == 1.0
    # a snapshot: later updates do not change it
    before = ours["state"][0]["sum"].copy()
    opt.update(params, _grads(np.float32, 1, seed=7)[0])
    assert_bits_equal(ours["state"][0]["sum"], before)


@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_state_dict_loads_and_continues_bit_identically(dtype: type,
                                                              tensor_lr: bool) -> None:
    grads = _grads(dtype, 20)
    tparams = [torch.tensor(p, requires_grad=True) for p in _params(dtype)]
    kw = {**TORCH_KW, "lr": torch.tensor(TORCH_KW["lr"])} if tensor_lr else TORCH_KW
    topt = torch.optim.Adagrad(tparams, fused=True, **kw)
    for g in grads[:10]:
        _torch_step(topt, tparams, g)
    sd = topt.state_dict()
    # (every tensor converted with .numpy(): the sums, the steps, a tensor lr)
    npsd = {"state": {i: {k: v.numpy() for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": [{k: v.numpy() if isinstance(v, torch.Tensor) else v
                              for k, v in g.items()} for g in sd["param_groups"]]}
    opt = fastadagrad.AdaGrad.from_preset("torch")  # torch's defaults; the dict sets the rest
    names = ["w1", "b1", "w2", "b2"]
    params = {k: t.detach().numpy().copy() for k, t in zip(names, tparams)}
    opt.load_state_dict(npsd, params)
    assert opt.step == 10 and opt.hyper.lr_decay == 0.1 and opt.hyper.maximize
    for g in grads[10:]:
        _torch_step(topt, tparams, g)
        opt.update(params, dict(zip(names, g)))
        for k, t in zip(names, tparams):
            assert_bits_equal(params[k], t.detach().numpy(), k)
            assert_bits_equal(opt.h[k], topt.state[t]["sum"].numpy(), k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fastadagrad_state_dict_loads_into_torch(dtype: type) -> None:
    grads = _grads(dtype, 20)
    params = _params(dtype)
    opt = fastadagrad.AdaGrad.from_preset("torch", **TORCH_KW)
    for g in grads[:10]:
        opt.update(params, g)
    sd = opt.state_dict()
    tsd = {"state": {i: {k: torch.from_numpy(np.asarray(v)) for k, v in s.items()}
                     for i, s in sd["state"].items()},
           "param_groups": sd["param_groups"]}
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    topt = torch.optim.Adagrad(tparams, fused=True)  # defaults: the state dict sets them
    topt.load_state_dict(tsd)
    assert topt.param_groups[0]["fused"] is True
    for g in grads[10:]:
        _torch_step(topt, tparams, g)
        opt.update(params, g)
        for p, t in zip(params, tparams):
            assert_bits_equal(p, t.detach().numpy())


# ----------------------------------------------------------------------- files

def _train(opt: fastadagrad.AdaGrad, params: dict, grads: list) -> None:
    for g in grads:
        opt.update(params, dict(zip(params, g)))


MIXED = {"emb": ((300, 8), np.float32), "w": ((8, 7), np.float64), "b": ((7,), np.float32)}


def _mixed_params() -> dict:
    rng = np.random.default_rng(3)
    return {k: rng.standard_normal(s).astype(dt) for k, (s, dt) in MIXED.items()}


def _mixed_grads(steps: int, seed: int = 4) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        out.append([rng.standard_normal(s).astype(dt) for s, dt in MIXED.values()])
    if steps > 3:
        out[3][1][0, 0] = np.nan  # one step skipped by nonfinite="skip": counted, not applied
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_resume_from_checkpoint_is_bit_identical(tmp_path: Path, preset: str) -> None:
    grads = _mixed_grads(30)
    kw = dict(lr=0.05, lr_decay=0.01, weight_decay=0.01, nonfinite="skip")
    straight = _mixed_params()
    ref = fastadagrad.AdaGrad.from_preset(preset, **kw)
    _train(ref, straight, grads)

    params = _mixed_params()
    first = fastadagrad.AdaGrad.from_preset(preset, **kw)
    _train(first, params, grads[:12])
    first.save(tmp_path / "ck.npz")
    del first
    resumed = fastadagrad.AdaGrad()  # defaults: formula and all come from the file
    resumed.load(tmp_path / "ck.npz")
    assert isinstance(resumed.h, dict) and list(resumed.h) == list(MIXED)
    assert (resumed.step, resumed.skipped_steps) == (11, 1)
    _train(resumed, params, grads[12:])
    assert resumed.hyper == ref.hyper and (resumed.step, resumed.skipped_steps) == (
        ref.step, ref.skipped_steps)
    for k in MIXED:
        assert_bits_equal(params[k], straight[k], k)
        assert_bits_equal(resumed.h[k], ref.h[k], k)


@pytest.mark.parametrize("master", [False, True])
def test_zero_d_parameter_round_trips(tmp_path: Path, master: bool) -> None:
    # a scalar parameter (a temperature, a bias) keeps its 0-d accumulator and master
    # copy through save and load, and training resumes bit-identically
    if master:
        import ml_dtypes

        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(np.float64)
    def params() -> dict:
        return {"w": np.ones(3, dt), "t": np.ones((), dt)}

    grads = [{"w": np.full(3, 0.5 + s, dt), "t": np.full((), 0.25 * s + 0.5, dt)}
             for s in range(4)]
    kw = dict(lr=0.1, master_weights=True) if master else dict(lr=0.1)
    straight, ref = params(), fastadagrad.AdaGrad(**kw)
    for g in grads:
        ref.update(straight, g)
    p, first = params(), fastadagrad.AdaGrad(**kw)
    for g in grads[:2]:
        first.update(p, g)
    path = first.save(tmp_path / "ck")
    with np.load(path) as z:
        assert z["sum_1"].shape == ()
        assert not master or z["master_1"].shape == ()
    for resumed in (fastadagrad.AdaGrad(**kw), first):
        resumed.load(path)
        assert resumed.h["t"].shape == ()
        q = {k: v.copy() for k, v in p.items()}
        for g in grads[2:]:
            resumed.update(q, g)
        for k in q:
            assert_bits_equal(q[k], straight[k], k)
            assert_bits_equal(resumed.h[k], ref.h[k], k)


def test_load_into_a_running_optimizer_copies_in_place(tmp_path: Path) -> None:
    params = _mixed_params()
    opt = fastadagrad.AdaGrad(lr=0.1)
    _train(opt, params, _mixed_grads(5))
    opt.save(tmp_path / "a.npz")
    saved = {k: v.copy() for k, v in opt.h.items()}
    held = dict(opt.h)
    _train(opt, params, _mixed_grads(5, seed=9))
    opt.load(tmp_path / "a.npz")
    assert opt.step == 5  # nonfinite="ignore": the NaN step counts (and its NaNs stay)
    for k in MIXED:
        assert opt.h[k] is held[k]  # same arrays (views of the flat buffers)
        assert_bits_equal(opt.h[k], saved[k], k)


def test_save_leaves_no_temporary_and_replaces(tmp_path: Path) -> None:
    params = _mixed_params()
    opt = fastadagrad.AdaGrad()
    path = tmp_path / "ck.npz"
    for _ in range(3):
        _train(opt, params, _mixed_grads(1, seed=opt.step))
        opt.save(path)
    assert sorted(os.listdir(tmp_path)) == ["ck.npz"]
    with np.load(path, allow_pickle=False) as z:
        assert json.loads(str(z["meta"][()]))["step"] == 3
    # a fresh optimizer (no update yet) saves and loads too: hyperparameters only
    empty = fastadagrad.AdaGrad.from_preset("keras", lr=0.3)
    empty.save(tmp_path / "e.npz")
    other = fastadagrad.AdaGrad()
    other.load(tmp_path / "e.npz")
    assert other.h is None and other.hyper == empty.hyper and other.step == 0


# The child saves ~32 MB checkpoints in a loop; the state of save number k is all k.
_CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, %(root)r)
    import numpy as np, fastadagrad
    path = sys.argv[1]
    opt = fastadagrad.AdaGrad()
    params = [np.zeros(1 << 22, np.float64)]
    opt.update(params, [np.zeros_like(params[0])])
    k = 0
    while True:
        k += 1
        opt.h[0][...] = k
        opt.step = k
        print("saving", k, flush=True)
        opt.save(path)
        print("saved", k, flush=True)
""")


def test_sigkill_during_save_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ck.npz"
    rng = np.random.default_rng(0)
    torn = 0  # kills that landed inside a save (its temporary was left behind)
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, "-c", _CHILD % {"root": str(ROOT)},
                                  str(path)], stdout=subprocess.PIPE, text=True)
        try:
            saved = 0
            target = 2 + attempt  # let a few saves complete, then kill inside the next
            assert child.stdout is not None
            for line in child.stdout:
                what, k = line.split()
                if what == "saved":
                    saved = int(k)
                elif int(k) > target:
                    time.sleep(rng.uniform(0, 0.03))  # somewhere inside the write
                    break
            os.kill(child.pid, signal.SIGKILL)
            child.wait(timeout=60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            assert child.stdout is not None
            child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        opt = fastadagrad.AdaGrad()
        opt.load(path)  # never torn: the last completed save, or the one being made
        assert opt.step in (saved, saved + 1), (opt.step, saved)
        assert np.all(opt.h[0] == opt.step)
        os.unlink(path)
        for f in os.listdir(tmp_path):  # temporaries a kill left behind
            assert f.startswith(".ck.npz.") and f.endswith(".tmp"), f
            torn += 1
            os.unlink(tmp_path / f)
    # a save of 32 MB takes 60-140 ms here: the kills must have hit some of them
    assert torn >= 1


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    params = _mixed_params()
    opt = fastadagrad.AdaGrad(lr=0.05)
    _train(opt, params, _mixed_grads(3, seed=11))
    path = tmp_path / "ck.npz"
    opt.save(path)
    return path


@pytest.mark.parametrize("keep", [0, 1, 21, 0.5, -1])
def test_truncated_file_is_a_clear_error(checkpoint: Path, keep: float) -> None:
    data = checkpoint.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (
        len(data) + keep if keep < 0 else keep)
    checkpoint.write_bytes(data[:n])
    opt = fastadagrad.AdaGrad()
    before = _snapshot(opt)
    with pytest.raises(CheckpointError, match="ck.npz"):
        opt.load(checkpoint)
    assert _same(_snapshot(opt), before)


@pytest.mark.parametrize("member", ["sum_0.npy", "meta.npy"])
def test_corrupted_file_is_a_clear_error(checkpoint: Path, member: str) -> None:
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as z:
        info = z.getinfo(member)
    # local header (30 bytes + name + extra), then the stored member; flip a byte
    # in the middle of the member's bytes
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0x10
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        fastadagrad.AdaGrad().load(checkpoint)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros(3))
    np.savez(tmp_path / "b.npz", x=np.zeros(3))
    (tmp_path / "c.npz").write_text("hello")
    for name, msg in [("a.npy", "single .npy"), ("b.npz", "no 'meta'"),
                      ("c.npz", "truncated or corrupted")]:
        with pytest.raises(CheckpointError, match=msg):
            fastadagrad.AdaGrad().load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        fastadagrad.AdaGrad().load(tmp_path / "missing.npz")


def _sd(**change: object) -> dict:
    params = _params(np.float32)
    opt = fastadagrad.AdaGrad(lr=0.05)
    opt.update(params, _grads(np.float32, 1)[0])
    sd = opt.state_dict()
    for path, value in change.items():
        *outer, last = path.split("__")
        d = sd
        for k in outer:
            d = d[int(k) if k.isdigit() else k]
        key = int(last) if last.isdigit() else last
        if value is KeyError:
            del d[key]
        else:
            d[key] = value
    return sd


BAD_STATE_DICTS = [
    ("missing sum", dict(state__0__sum=KeyError), r"state\[0\] must have keys"),
    ("missing state entry", dict(state__2=KeyError), "no state for parameter 2"),
    ("extra state entry", dict(state__9={"sum": np.zeros(1, np.float32), "step": 1.0}),
     r"entries \[9\]"),
    ("wrong shape", dict(state__1__sum=np.zeros(8, np.float32)), r"state\[1\]\['sum'\]"),
    ("wrong dtype", dict(state__0__sum=np.zeros(1037, np.float16)), "float16"),
    ("not an array", dict(state__0__sum=[0.0] * 1037), "must be a NumPy array"),
    ("steps differ", dict(state__3__step=np.float32(2)), "different steps"),
    ("fractional step", dict(state__0__step=1.5), "whole number"),
    ("negative lr", dict(param_groups__0__lr=-1.0), "lr must be >= 0"),
    ("no lr", dict(param_groups__0__lr=KeyError), "no 'lr'"),
    ("two groups", dict(param_groups=[{}, {}]), "list of one group"),
    ("master_weights not a bool", dict(param_groups__0__fastadagrad__master_weights="yes"),
     "'master_weights' must be a bool"),
]


@pytest.mark.parametrize("name,change,msg", BAD_STATE_DICTS, ids=[b[0] for b in BAD_STATE_DICTS])
def test_bad_state_dict_changes_nothing(name: str, change: dict, msg: str) -> None:
    params = _params(np.float32)
    opt = fastadagrad.AdaGrad(lr=0.2)
    opt.update(params, _grads(np.float32, 1, seed=5)[0])
    before = _snapshot(opt)
    with pytest.raises(CheckpointError, match=msg):
        opt.load_state_dict(_sd(**change))
    assert _same(_snapshot(opt), before)


def test_read_only_accumulator_changes_nothing() -> None:
    """A running optimizer whose accumulator for one parameter is read-only: the load
    raises naming it before any accumulator, lr or step is changed (the first was
    overwritten, then NumPy raised without a name)."""
    params = _params(np.float32)
    opt = fastadagrad.AdaGrad(lr=0.2)
    opt.update(params, _grads(np.float32, 1, seed=5)[0])
    sd = _sd(param_groups__0__lr=0.5)
    for st in sd["state"].values():
        st["sum"] = st["sum"] + 1
    key = list(opt.h)[-1] if isinstance(opt.h, dict) else len(opt.h) - 1
    ro = opt.h[key].copy()
    ro.flags.writeable = False
    opt.h[key] = ro
    before = _snapshot(opt)
    with pytest.raises(CheckpointError, match=f"parameter {key!r} is read-only"):
        opt.load_state_dict(sd)
    assert _same(_snapshot(opt), before)


# ---- the 16-bit options travel with the state

def _bf16_run(opt: fastadagrad.AdaGrad, p: dict, seeds: range) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    for s in seeds:
        g = np.random.default_rng(s).standard_normal(64).astype(ml_dtypes.bfloat16)
        opt.update(p, {"w": g})


def _bf16_params() -> dict:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    return {"w": np.ones(64, ml_dtypes.bfloat16)}


@pytest.mark.parametrize("saved,loader", [
    (dict(master_weights=True), dict()),  # saved before its first step: no master yet
    (dict(), dict(lr=0.5, rounding="stochastic", seed=1)),  # nearest, the default
    (dict(rounding="stochastic", seed=3), dict()),
    (dict(rounding="stochastic", seed=3, master_weights=True), dict(seed=9)),
])
def test_resume_rounds_as_the_saved_run(saved: dict, loader: dict) -> None:
    # rounding, seed and master weights come from the state dict, whatever the loading
    # optimizer was built with: the resumed bfloat16 run is the uninterrupted one
    ref_p = _bf16_params()
    _bf16_run(fastadagrad.AdaGrad(lr=0.01, **saved), ref_p, range(12))
    for at in (0, 5):
        p = _bf16_params()
        first = fastadagrad.AdaGrad(lr=0.01, **saved)
        _bf16_run(first, p, range(at))
        opt = fastadagrad.AdaGrad(**loader)
        opt.load_state_dict(first.state_dict())
        assert (opt.rounding, opt.master_weights) == (first.rounding, first.master_weights)
        _bf16_run(opt, p, range(at, 12))
        assert_bits_equal(p["w"], ref_p["w"], f"params resumed at step {at}")


def test_options_absent_from_a_state_dict() -> None:
    # a fastadagrad state dict without them (written before they were always recorded)
    # meant the defaults; a torch state dict has none: the loader's own stay
    first = fastadagrad.AdaGrad(lr=0.01)
    first.update(_bf16_params(), {"w": _bf16_params()["w"]})
    sd = first.state_dict()
    for k in ("rounding", "seed", "master_weights"):
        del sd["param_groups"][0]["fastadagrad"][k]
    opt = fastadagrad.AdaGrad(rounding="stochastic", seed=2, master_weights=True)
    opt.load_state_dict(sd)
    assert (opt.rounding, opt.master_weights) == ("nearest", False)
    del sd["param_groups"][0]["fastadagrad"]
    opt = fastadagrad.AdaGrad(rounding="stochastic", seed=2, master_weights=True)
    opt.load_state_dict(sd)
    assert (opt.rounding, opt.seed, opt.master_weights) == ("stochastic", 2, True)


def test_unnamed_state_names_its_master_copies(tmp_path: Path) -> None:
    # tuple keys are not saved: loaded without params=, the state and the float32
    # master copies are keyed 0..n-1 until the first update names both by position
    ml_dtypes = pytest.importorskip("ml_dtypes")
    keys = [("fc1", "W"), ("fc1", "b")]

    def grads(s: int) -> dict:
        r = np.random.default_rng(s)
        return {k: r.standard_normal(8).astype(ml_dtypes.bfloat16) for k in keys}

    ref = {k: np.ones(8, ml_dtypes.bfloat16) for k in keys}
    ref_opt = fastadagrad.AdaGrad(lr=0.01, master_weights=True)
    for s in range(8):
        ref_opt.update(ref, grads(s))
    p = {k: np.ones(8, ml_dtypes.bfloat16) for k in keys}
    first = fastadagrad.AdaGrad(lr=0.01, master_weights=True)
    for s in range(4):
        first.update(p, grads(s))
    opt = fastadagrad.AdaGrad()
    opt.load(first.save(tmp_path / "ck"))
    for s in range(4, 8):
        opt.update(p, grads(s))
    for k in keys:
        assert_bits_equal(p[k], ref[k], f"params{k}")
        assert_bits_equal(opt.master[k], ref_opt.master[k], f"master{k}")


def test_seed_none_round_trips(tmp_path: Path) -> None:
    """``seed=None`` (allowed with nearest rounding) is saved and loaded as it is
    (state_dict() raised a TypeError once the 16-bit options were always written)."""
    p = {"w": np.ones(4, np.float32)}
    opt = fastadagrad.AdaGrad(lr=0.1, seed=None)
    opt.update(p, {"w": np.full(4, 0.5, np.float32)})
    assert opt.state_dict()["param_groups"][0]["fastadagrad"]["seed"] is None
    loaded = fastadagrad.AdaGrad(seed=5)
    loaded.load(opt.save(tmp_path / "ck"))
    assert (loaded.seed, loaded.rounding) == (None, "nearest")
