"""Per-call overhead: what the Python API adds on top of the compiled kernel call.

Tiny tensors (16 float32 elements each), so the kernel's own work is small and the
difference between a public call and the bare compiled call is the API's overhead:

* ``overhead k=4/100/1000``: ``AdaGrad.update`` on a list and on a dict of k arrays,
  against the bare multi-tensor kernel call on the same arrays (addresses and chunk
  table precomputed, as a plan holds them), the plan's per-step safety scan alone, and
  the NumPy class. (update - kernel) / k is the per-array overhead.
* ``overhead functional 2^10``: ``adagrad_update`` on one 1024-element array against
  the bare serial kernel call on the same arrays.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fastadagrad
from fastadagrad import _dispatch as D
from fastadagrad import cpu
from fastadagrad.reference import NumpyAdaGrad

SIZE = 16


def _model(k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(k)
    params = [rng.standard_normal(SIZE).astype(np.float32) for _ in range(k)]
    grads = [(0.1 * rng.standard_normal(SIZE)).astype(np.float32) for _ in range(k)]
    return params, grads


def _kernel_call(params: list[np.ndarray], grads: list[np.ndarray]) -> Any:
    """The multi-tensor kernel alone, on addresses a plan would hold."""
    opt = fastadagrad.AdaGrad(lr=1e-3)
    opt.update(params, grads)  # builds the state and the plan
    plan = opt._plan
    proto, _, (ct, cs, cl), _ = plan.groups[0]
    coefs = D.coefficients(opt.hyper, proto.dtype, 1)
    kernel = cpu.kernels(coefs[7]).many_serial  # the compiled kernel itself, floats in
    fcoefs = tuple(float(c) for c in coefs[:7])
    gaddr = np.array([g.__array_interface__["data"][0] for g in grads], np.int64)
    pa, ha = plan.paddr, plan.haddr

    def step() -> None:
        # ``opt`` is referenced here so that the state arrays behind ``ha`` stay alive
        kernel(proto, pa, gaddr, ha, ct, cs, cl, *fcoefs)
        assert opt.h is not None

    return step


IMPLS = ("AdaGrad.update list", "AdaGrad.update dict", "kernel call", "plan scan",
         "numpy class")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", [4, 100, 1000])
def test_overhead_per_array(run: Any, impl: str, k: int) -> None:
    params, grads = _model(k)
    if impl == "AdaGrad.update list":
        opt = fastadagrad.AdaGrad(lr=1e-3)
        step = lambda: opt.update(params, grads)  # noqa: E731
    elif impl == "AdaGrad.update dict":
        opt = fastadagrad.AdaGrad(lr=1e-3)
        pd = {f"t{i}": p for i, p in enumerate(params)}
        gd = {f"t{i}": g for i, g in enumerate(grads)}
        step = lambda: opt.update(pd, gd)  # noqa: E731
    elif impl == "kernel call":
        step = _kernel_call(params, grads)
    elif impl == "plan scan":
        opt = fastadagrad.AdaGrad(lr=1e-3)
        opt.update(params, grads)
        step = lambda: opt._plan.check(params, list(opt.h), grads)  # noqa: E731
    else:
        ref = NumpyAdaGrad(lr=1e-3)
        pd = {f"t{i}": p for i, p in enumerate(params)}
        gd = {f"t{i}": g for i, g in enumerate(grads)}
        step = lambda: ref.update(pd, gd)  # noqa: E731
    run(step, scenario="overhead", impl=impl, dtype="float32", n=k * SIZE, tensors=k,
        group=f"overhead k={k} x {SIZE} f32", warmup=20)


@pytest.mark.parametrize("impl", ["adagrad_update", "kernel call"])
def test_overhead_functional(run: Any, impl: str) -> None:
    rng = np.random.default_rng(0)
    p = rng.standard_normal(1024).astype(np.float32)
    g = (0.1 * rng.standard_normal(1024)).astype(np.float32)
    h = np.zeros(1024, np.float32)
    if impl == "adagrad_update":
        step = lambda: fastadagrad.adagrad_update(p, g, h, lr=1e-3)  # noqa: E731
    else:
        coefs = D.coefficients(fastadagrad._hyper.Hyper.make(lr=1e-3), p.dtype, 1)
        kernel = cpu.kernels(coefs[7]).span  # the compiled kernel itself, floats in
        fcoefs = tuple(float(c) for c in coefs[:7])
        step = lambda: kernel(p, g, h, *fcoefs)  # noqa: E731
    run(step, scenario="overhead functional", impl=impl, dtype="float32", n=1024,
        group="overhead functional 2^10 f32", warmup=20)
