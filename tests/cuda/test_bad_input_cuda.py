"""Bad input on the GPU path changes nothing (issue 6, item 1, device side).

Numba device arrays (``numba.cuda.to_device``) through the public API only:
``adagrad_update`` and ``AdaGrad``. Each error case checks the exception type, that
the message names the offending tensor, and that every array is bit-unchanged
afterwards (copied back to the host before and after). Non-finite gradients with
``skip``/``raise`` and 0-d/empty arrays that must work are checked too. Runs under
the CUDA simulator in CI (``make test-sim``) or on a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

if importlib.util.find_spec("fastadagrad.cuda") is None:
    pytest.skip("fastadagrad.cuda does not exist (GPU backend not built)",
                allow_module_level=True)

from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

from fastadagrad import AdaGrad, adagrad_update  # noqa: E402
from fastadagrad._hyper import Hyper  # noqa: E402
from fastadagrad.reference import reference_step  # noqa: E402

SHAPE = (2, 3)


def _host(rng: np.random.Generator, shape: tuple[int, ...] = SHAPE,
          dtype: Any = np.float32) -> np.ndarray:
    return rng.standard_normal(shape).astype(dtype)


def _dev(a: np.ndarray) -> Any:
    return cuda.to_device(a)


def _sums(*objs: Any) -> list[str]:
    out = []
    for x in objs:
        if x is None or isinstance(x, (float, int, list)):
            continue
        a = x if isinstance(x, np.ndarray) else x.copy_to_host()
        out.append(f"{a.dtype.str}{a.shape}" + hashlib.sha256(a.tobytes()).hexdigest())
    return out


Triple = tuple[Any, Any, Any]


def _overlap(rng: np.random.Generator) -> tuple[Any, Any]:
    buf = _dev(_host(rng, (9,)))
    return buf[:6].reshape(SHAPE), buf[3:].reshape(SHAPE)


class _NullArray:
    """A CUDA array with elements and a null data pointer: what a torch CUDA tensor
    whose storage was freed (``untyped_storage().resize_(0)``) exposes."""

    __cuda_array_interface__ = {"shape": SHAPE, "typestr": "<f4", "data": (0, False),
                                "strides": None, "version": 3}

    def copy_to_host(self) -> np.ndarray:  # (for _sums: no memory to read)
        return np.zeros(SHAPE, np.float32)


CASES: dict[str, tuple[Callable[..., Triple], type, str]] = {
    "grad-null-pointer": (lambda r, p, g, h: (p, _NullArray(), h), ValueError,
                          r"\bgrad\b has 6 elements but no memory"),
    "state-null-pointer": (lambda r, p, g, h: (p, g, _NullArray()), ValueError,
                           r"\bstate_sum\b has 6 elements but no memory"),
    "grad-wrong-shape": (lambda r, p, g, h: (p, _dev(_host(r, (7,))), h), ValueError,
                         r"\bgrad\b"),
    "grad-float64": (lambda r, p, g, h: (p, _dev(_host(r, SHAPE, np.float64)), h),
                     TypeError, r"\bgrad\b"),
    "state-float64": (lambda r, p, g, h: (p, g, _dev(_host(r, SHAPE, np.float64))),
                      TypeError, r"\bstate_sum\b"),
    "all-int32": (lambda r, p, g, h: tuple(_dev(np.ones(SHAPE, np.int32))
                                           for _ in range(3)), TypeError, r"\bparam\b"),
    "all-float16": (lambda r, p, g, h: tuple(_dev(np.ones(SHAPE, np.float16))
                                             for _ in range(3)), TypeError, r"\bparam\b"),
    "param-strided": (lambda r, p, g, h: (_dev(_host(r, (2, 6)))[:, ::2], g, h),
                      ValueError, r"\bparam\b"),
    "grad-is-param": (lambda r, p, g, h: (p, p, h), ValueError, r"\bparam\b.*\bgrad\b"),
    "state-is-param": (lambda r, p, g, h: (p, g, p), ValueError,
                       r"\bparam\b.*\bstate_sum\b"),
    "grad-overlaps-param": (lambda r, p, g, h: (*_overlap(r), h), ValueError,
                            r"\bparam\b.*\bgrad\b"),
    "grad-on-host": (lambda r, p, g, h: (p, g.copy_to_host(), h), TypeError, r"\bgrad\b"),
    "state-on-host": (lambda r, p, g, h: (p, g, h.copy_to_host()), TypeError,
                      r"\bstate_sum\b"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_functional_bad_device_input(name: str) -> None:
    rng = np.random.default_rng(11)
    fn, exc, pattern = CASES[name]
    p, g, h = fn(rng, _dev(_host(rng)), _dev(_host(rng)), _dev(np.abs(_host(rng))))
    before = _sums(p, g, h)
    with pytest.raises(exc, match=pattern):
        adagrad_update(p, g, h, lr=0.1)
    assert _sums(p, g, h) == before


@pytest.mark.parametrize("warm", [False, True], ids=["first-call", "later-call"])
@pytest.mark.parametrize("name", ["grad-wrong-shape", "grad-float64", "grad-is-param",
                                  "grad-on-host", "two-params-overlap", "nan-lr"])
def test_class_bad_device_input(name: str, warm: bool) -> None:
    rng = np.random.default_rng(12)
    P = [_dev(_host(rng)) for _ in range(3)]
    G = [_dev(_host(rng)) for _ in range(3)]
    opt = AdaGrad(lr=0.1)
    if warm:
        assert opt.update(P, G)
    h0, state_before, step0 = opt.h, _sums(*(opt.h or [])), opt.step
    P2, G2 = list(P), list(G)
    kw: dict[str, Any] = {}
    exc: type = ValueError
    pattern = r"grads\[1\]"
    if name == "grad-wrong-shape":
        G2[1] = _dev(_host(rng, (7,)))
    elif name == "grad-float64":
        G2[1], exc = _dev(_host(rng, SHAPE, np.float64)), TypeError
    elif name == "grad-is-param":
        G2[1], pattern = P2[1], r"params\[1\].*grads\[1\]"
    elif name == "grad-on-host":
        G2[1], exc = G2[1].copy_to_host(), TypeError
    elif name == "two-params-overlap":
        P2[0], P2[1] = _overlap(rng)
        pattern = r"params\[0\].*params\[1\]"
    else:
        kw, pattern = {"grad_scale": float("nan")}, r"grad_scale"
    before = _sums(*P2, *G2, *P)
    with pytest.raises(exc, match=pattern):
        opt.update(P2, G2, **kw)
    assert _sums(*P2, *G2, *P) == before
    assert opt.step == step0
    if warm:
        assert opt.h is h0 and _sums(*opt.h) == state_before
    else:
        assert opt.h is None


# The simulator computes with NumPy scalars and warns where a GPU silently gives inf.
@pytest.mark.filterwarnings("ignore:.*overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_nonfinite_on_device_changes_nothing(mode: str) -> None:
    rng = np.random.default_rng(13)
    P = [_dev(_host(rng, (50,))) for _ in range(3)]
    opt = AdaGrad(lr=0.1, nonfinite=mode)
    assert opt.update(P, [_dev(_host(rng, (50,))) for _ in range(3)])
    before = _sums(*P, *opt.h)
    bad = [_host(rng, (50,)) for _ in range(3)]
    bad[1][49] = np.nan
    bad[2][0] = np.inf
    G = [_dev(b) for b in bad]
    if mode == "skip":
        assert opt.update(P, G) is False
        assert opt.skipped_steps == 1
    else:
        with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
            opt.update(P, G)
    assert opt.step == 1
    assert _sums(*P, *opt.h) == before
    # a finite gradient overflowing once divided by grad_scale counts as non-finite
    big = _host(rng, (50,))
    big[3] = np.float32(3e38)
    G = [_dev(_host(rng, (50,))), _dev(big), _dev(_host(rng, (50,)))]
    if mode == "skip":
        assert opt.update(P, G, grad_scale=1e-3) is False
    else:
        with pytest.raises(FloatingPointError, match=r"grads\[1\]"):
            opt.update(P, G, grad_scale=1e-3)
    assert _sums(*P, *opt.h) == before


@pytest.mark.parametrize("shape", [(), (0,), (0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_device_0d_and_empty_work(shape: tuple[int, ...], dtype: Any) -> None:
    rng = np.random.default_rng(14)
    p, g = _host(rng, shape, dtype), _host(rng, shape, dtype)
    h = np.zeros(shape, dtype)
    dp, dg, dh = _dev(p), _dev(g), _dev(h)
    for step in (1, 2):
        assert adagrad_update(dp, dg, dh, lr=0.1, step=step, nonfinite="raise") is True
        reference_step(p, g, h, Hyper.make(lr=0.1), step)
    # the simulator checks logic, not GPU rounding: compare to a tolerance there
    np.testing.assert_allclose(dp.copy_to_host(), p, rtol=1e-6)
    np.testing.assert_allclose(dh.copy_to_host(), h, rtol=1e-6)
    assert dp.copy_to_host().shape == shape


def _on(host: np.ndarray, device: int) -> Any:
    """A device array that says it is on CUDA device ``device`` (as torch and CuPy
    arrays carry ``.device``): the simulator has one device, so it is labelled."""
    import types

    d = cuda.to_device(host)
    d.__class__ = type("OnDevice", (type(d),), {})
    d.device = types.SimpleNamespace(id=device)
    return d


@pytest.mark.parametrize("path", ["float32", "float16", "rows"])
def test_arrays_on_two_devices_are_refused(path: str) -> None:
    """Every GPU path (dense, 16-bit, rows) names two arrays on different devices and
    launches nothing: a kernel on one device cannot address the other's memory."""
    from fastadagrad.rows import adagrad_update_rows

    if path == "rows":
        t, s, g = (_on(np.ones((5, 3), np.float32), 0), _on(np.zeros((5, 3), np.float32), 0),
                   _on(np.ones((2, 3), np.float32), 1))
        arrays = (t, s, g)
        call = lambda: adagrad_update_rows(t, s, np.array([0, 3]), g, lr=0.1)  # noqa: E731
        names = "table is on CUDA device 0 but grad_rows is on CUDA device 1"
    else:
        dt = np.float32 if path == "float32" else np.float16
        p, g = _on(np.ones(4, dt), 0), _on(np.full(4, 0.5, dt), 1)
        h = _on(np.zeros(4, np.float32), 0)
        arrays = (p, g, h)
        call = lambda: adagrad_update(p, g, h, lr=0.1)  # noqa: E731
        names = "param is on CUDA device 0 but grad is on CUDA device 1"
    before = [a.copy_to_host() for a in arrays]
    with pytest.raises(ValueError, match=names):
        call()
    for a, b in zip(arrays, before):
        assert a.copy_to_host().tobytes() == b.tobytes()


def test_device_of_each_array_kind() -> None:
    """How the device of an array is read: torch (``.device.index``), CuPy
    (``.device.id``) and Numba device arrays (their memory's context's device), faked
    here as the simulator has no second device; unknown: None."""
    import types

    ns = types.SimpleNamespace
    assert fcuda._device_id(ns(device=ns(index=1))) == 1
    assert fcuda._device_id(ns(device=ns(id=2))) == 2
    assert fcuda._device_id(ns(gpu_data=ns(context=ns(device=ns(id=3))))) == 3
    assert fcuda._device_id(ns()) is None
    assert fcuda._device_id(cuda.to_device(np.ones(2))) in (None, 0)


def test_kernels_load_and_state_is_made_under_the_arrays_device_guard(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading a kernel makes its device current (cuda.core's ``set_current``) and new
    state is allocated on the current device: both happen inside the guard of the
    arrays' device, which restores the caller's device afterwards (the guard is a
    recorder here: the simulator has one device)."""
    import contextlib

    from fastadagrad import cuda_launch as L

    depth, events = [0], []

    @contextlib.contextmanager
    def guard(device: int) -> Any:
        depth[0] += 1
        events.append(("enter", device))
        try:
            yield
        finally:
            depth[0] -= 1

    real = L.kernel

    def kernel(kind: str, dtype: Any, flags: int, device: int) -> Any:
        events.append(("load", kind, depth[0] > 0))
        return real(kind, dtype, flags, device)

    monkeypatch.setattr(fcuda, "_on_device", guard)
    monkeypatch.setattr(L, "kernel", kernel)
    L._KERNELS.clear()  # loaded again, through the wrapper
    ps = [cuda.to_device(np.ones(10, np.float32)), cuda.to_device(np.ones(3, np.float64))]
    gs = [cuda.to_device(np.ones(10, np.float32)), cuda.to_device(np.ones(3, np.float64))]
    AdaGrad(lr=0.1, nonfinite="skip").update(ps, gs)
    loads = [e for e in events if e[0] == "load"]
    assert loads and all(inside for _, _, inside in loads), events
    # new state beside an array of device 1: that device's guard (the simulator's arrays
    # carry no device, so the guard's choice is checked on its own)
    events.clear()
    monkeypatch.setattr(fcuda, "simulator", lambda: False)
    with fcuda.on_device_of(_on(np.ones(2, np.float32), 1)):
        pass
    assert events == [("enter", 1)]
