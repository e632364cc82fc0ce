"""GPU training resumes from a checkpoint: the state is loaded onto the device of the
params (separate device arrays or a device FlatBuffer), and the next update runs there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(f"no GPU and the CUDA simulator is off ({fcuda.unavailable_reason()})",
                allow_module_level=True)

import fastadagrad as fa  # noqa: E402
from fastadagrad._dispatch import is_cuda_array  # noqa: E402


def _host() -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(7)
    p = {"W": rng.standard_normal((3, 5)).astype(np.float32),
         "b": rng.standard_normal(5).astype(np.float32)}
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in p.items()}
             for _ in range(4)]
    return p, grads


def _dev(d: dict) -> dict:
    return {k: cuda.to_device(v) for k, v in d.items()}


@pytest.mark.parametrize("via", ["load", "load_state_dict"])
def test_resume_separate_device_arrays(tmp_path: Path, via: str) -> None:
    p, grads = _host()
    straight, sp = fa.AdaGrad(lr=0.1), _dev(p)
    for g in grads:
        straight.update(sp, _dev(g))
    first, fp = fa.AdaGrad(lr=0.1), _dev(p)
    for g in grads[:2]:
        first.update(fp, _dev(g))
    resumed = fa.AdaGrad(lr=0.1)
    # the checkpoint is keyed by name; pass the params in another order
    rp = {"b": fp["b"], "W": fp["W"]}
    if via == "load":
        first.save(tmp_path / "ck")
        resumed.load(tmp_path / "ck", params=rp)
    else:
        resumed.load_state_dict(first.state_dict(), params=rp)
    assert all(is_cuda_array(v) for v in resumed.h.values())
    for g in grads[2:]:
        resumed.update(rp, _dev(g))
    for k in p:
        np.testing.assert_array_equal(rp[k].copy_to_host(), sp[k].copy_to_host())
        np.testing.assert_array_equal(resumed.h[k].copy_to_host(),
                                      straight.h[k].copy_to_host())


def test_resume_device_flat_buffer(tmp_path: Path) -> None:
    p, grads = _host()
    gbufs = [fa.FlatBuffer(g).to_device() for g in grads]
    straight, sp = fa.AdaGrad(lr=0.1), fa.FlatBuffer(p).to_device()
    for gb in gbufs:
        straight.update(sp, gb)
    params = fa.FlatBuffer(p).to_device()
    first = fa.AdaGrad(lr=0.1)
    for gb in gbufs[:2]:
        first.update(params, gb)
    first.save(tmp_path / "ck.npz")
    resumed = fa.AdaGrad(lr=0.1)
    resumed.load(tmp_path / "ck.npz", params=params)
    # the state shares the params' layout, on the device: one launch over the buffer
    assert len(resumed._flat) == 1 and resumed._flat[0].same_layout(params)
    assert is_cuda_array(resumed._flat[0].data)
    for gb in gbufs[2:]:
        resumed.update(params, gb)
    np.testing.assert_array_equal(params.to_host().data, sp.to_host().data)
    np.testing.assert_array_equal(resumed._flat[0].to_host().data,
                                  straight._flat[0].to_host().data)


def test_master_copies_resume_on_the_device(tmp_path: Path) -> None:
    # float16 params trained on the host with float32 master copies, resumed on the
    # device: the masters go where the state goes (they stayed host arrays, and every
    # later update refused them)
    rng = np.random.default_rng(3)
    p = {"w": rng.standard_normal(40).astype(np.float16)}
    grads = [{"w": rng.standard_normal(40).astype(np.float16)} for _ in range(4)]
    straight, sp = fa.AdaGrad(lr=0.1, master_weights=True), {"w": p["w"].copy()}
    for g in grads:
        straight.update(sp, g)
    first, fp = fa.AdaGrad(lr=0.1, master_weights=True), {"w": p["w"].copy()}
    for g in grads[:2]:
        first.update(fp, g)
    resumed, rp = fa.AdaGrad(lr=0.1), _dev(fp)
    resumed.load(first.save(tmp_path / "ck"), params=rp)
    assert resumed.master_weights and is_cuda_array(resumed.master["w"])
    for g in grads[2:]:
        resumed.update(rp, _dev(g))
    np.testing.assert_array_equal(rp["w"].copy_to_host(), sp["w"])
    np.testing.assert_array_equal(resumed.master["w"].copy_to_host(), straight.master["w"])
    # and saved again from the device, the copies come back to the host
    assert isinstance(resumed.state_dict()["state"][0]["master"], np.ndarray)
