"""Shared pieces of the benchmark suite: sizes, model layouts, and one ``step()``
closure per implementation.

Every factory returns a zero-argument function that performs ONE optimizer step on
arrays it owns; the test warms it up (JIT compilation, first-touch page faults, lazy
optimizer state) before handing it to pytest-benchmark. All implementations start
from the same parameters, gradients and zero accumulators, with ``lr=0.01`` and
``eps=1e-7`` (the NumPy class's constants).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bench.memory import page_aligned

LR = 0.01
EPS = 1e-7

#: Scenario (a): one flat buffer of 2^k elements. Step 2 in the exponent: enough
#: points for the GB/s curve to show the L1/L2/LLC/DRAM regimes, and `make bench`
#: still finishes in minutes on the 2-core machine.
FLAT_EXPONENTS = (10, 12, 14, 16, 18, 20, 22, 24, 26)

#: With ``--benchmark-disable`` (``make test``) every benchmark still runs once, but on
#: at most 2^16 elements: large enough to take the parallel path (the threshold is
#: 2^15), small enough that CI allocates kilobytes instead of the 1.5 GB of 2^26 f64.
CI_MAX_EXPONENT = 16

Step = Callable[[], Any]

# Implementation names, as they appear in the report (in this order).
FAST = "fastadagrad"
FAST_SERIAL = "fastadagrad serial"
FAST_FLAT = "fastadagrad FlatBuffer"
NUMPY = "NumPy class"
TORCH_FORLOOP = "torch for-loop"
TORCH_FOREACH = "torch foreach"
TORCH_FUSED = "torch fused"
ROOFLINE = "roofline"
DEEPSPEED = "DeepSpeed CPU"
#: bench/plain.py: ``for i in prange(n)`` (or ``range(n)``) with the same math and bits,
#: the comparator that shows whether the library's kernels earn their complexity.
PLAIN = "plain numba"
PLAIN_SERIAL = "plain numba serial"
#: the compiled kernels the public call runs (``cpu.kernels(flags).flat_parallel`` and
#: ``.checked_span``), called directly: no checks, no dispatch. Against the plain loops they
#: show what the kernels themselves cost, apart from the API's per-call work.
FAST_KERNEL = "fastadagrad kernel"
FAST_KERNEL_SERIAL = "fastadagrad kernel serial"
#: The options group's kernel-vs-plain pair (bench/test_bench_flat.py ``test_options``):
#: the kernel of bench/plain.py's "torch, all options" flag set, called as
#: :data:`FAST_KERNEL` is, and that set's plain loop (same bits).
OPTIONS_SET = "torch, all options"
OPTIONS_KERNEL = f"{FAST_KERNEL} ({OPTIONS_SET})"
OPTIONS_PLAIN = f"{PLAIN} ({OPTIONS_SET})"
IMPLS_ORDER = (FAST, FAST_SERIAL, FAST_FLAT, NUMPY, TORCH_FORLOOP, TORCH_FOREACH,
               TORCH_FUSED, FAST_KERNEL, FAST_KERNEL_SERIAL, PLAIN, PLAIN_SERIAL, ROOFLINE,
               DEEPSPEED)
TORCH_MODES = {TORCH_FORLOOP: {"foreach": False}, TORCH_FOREACH: {"foreach": True},
               TORCH_FUSED: {"fused": True}}


def model_shapes() -> list[tuple[int, ...]]:
    """Scenario (b): 100 tensors, 2.95M parameters, shaped like a small CNN.

    47 3x3 conv layers (32, 64 then 128 channels) and 3 linear layers, each a weight
    and a bias: sizes from 10 to 147,456 elements, the mix a real model has.
    """
    shapes: list[tuple[int, ...]] = []

    def layer(*w: int) -> None:
        shapes.append(w)
        shapes.append((w[0],))

    layer(32, 3, 3, 3)
    for _ in range(15):
        layer(32, 32, 3, 3)
    layer(64, 32, 3, 3)
    for _ in range(15):
        layer(64, 64, 3, 3)
    layer(128, 64, 3, 3)
    for _ in range(14):
        layer(128, 128, 3, 3)
    layer(256, 128)
    layer(256, 256)
    layer(10, 256)
    assert len(shapes) == 100
    return shapes


def two_layer_shapes() -> dict[str, tuple[int, ...]]:
    """Scenario (c): the 784-50-10 network the NumPy class was written for."""
    return {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}


def numel(shapes: Any) -> int:
    vals = shapes.values() if isinstance(shapes, dict) else shapes
    return sum(math.prod(s) for s in vals)


# --- optional competitors ------------------------------------------------------------

def require_torch() -> Any:
    return pytest.importorskip("torch", reason="torch is not installed (pip install "
                               "'fastadagrad[bench]')")


def require_deepspeed(dtype: Any) -> None:
    """Skip unless DeepSpeed's CPU Adagrad op can be imported and built."""
    require_torch()
    try:
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad  # noqa: F401
    except Exception as exc:  # ImportError, or the op failing to build
        pytest.skip(f"DeepSpeed CPU Adagrad unavailable: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
    if np.dtype(dtype) != np.float32:
        pytest.skip("DeepSpeed CPU Adagrad is benchmarked in float32 only")


# --- data ---------------------------------------------------------------------------

_SOURCE: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}


def flat_state(n: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """(p, h) for a flat case, reset to the shared start values (``p`` from
    :func:`flat_source`, ``h`` zeros): one page-aligned pair per size, which every
    implementation of that size updates in turn.

    The same memory for all of them, because at the sizes that spill out of the cache
    where an allocation lands decides the time as much as the code does: NumPy asks for
    transparent huge pages on large arrays, and whether a 2 MiB stretch gets one depends
    on its alignment and on what else the kernel has free at that moment (2^24 f64: the
    plain loop 7.9 ms on its fresh arrays and the identical loop of the library 11.2 ms
    on its own, in one run; 13.6 and 13.9 ms in another).
    """
    key = (n, np.dtype(dtype).str)
    if key not in _STATE:
        _STATE.clear()
        _STATE[key] = (page_aligned(n, dtype), page_aligned(n, dtype))
    p, h = _STATE[key]
    p[:] = flat_source(n, dtype)[0]
    h[:] = 0
    return p, h


_STATE: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}


def flat_source(n: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Shared (param, grad) values for ``n`` elements of ``dtype``; never written
    (copy ``p`` before updating it).

    Only the latest size is kept: a parametrized run visits every implementation of one
    size in a row, and 2^26 float64 arrays are 512 MB each.
    """
    key = (n, np.dtype(dtype).str)
    if key not in _SOURCE:
        _SOURCE.clear()
        rng = np.random.default_rng(n)
        p = rng.random(n, dtype=np.float32).astype(dtype) - 0.5
        g = page_aligned((rng.random(n, dtype=np.float32).astype(dtype) - 0.5) * 0.1)
        _SOURCE[key] = (p, g)
    return _SOURCE[key]


def tensors(shapes: Any, dtype: Any, seed: int) -> dict[Any, np.ndarray]:
    """A dict of separately allocated arrays (keys as given, or 0..n-1)."""
    rng = np.random.default_rng(seed)
    items = shapes.items() if isinstance(shapes, dict) else enumerate(shapes)
    return {k: (rng.standard_normal(s) * 0.1).astype(dtype) for k, s in items}


# --- implementations --------------------------------------------------------------

def fast_functional(p: np.ndarray, g: np.ndarray, h: np.ndarray, **kw: Any) -> Step:
    import fastadagrad

    return lambda: fastadagrad.adagrad_update(p, g, h, lr=LR, eps=EPS, **kw)


def fast_dict(params: Any, grad_sets: list[Any], **kw: Any) -> Step:
    """``AdaGrad.update(params, grads)``, cycling through ``grad_sets`` (the model
    benchmarks pass one set: the peers' steps read ``p.grad`` and cannot switch)."""
    import fastadagrad

    opt = fastadagrad.AdaGrad(lr=LR, eps=EPS, **kw)
    state = {"i": 0}

    def step() -> Any:
        state["i"] ^= 1
        return opt.update(params, grad_sets[state["i"] % len(grad_sets)])

    return step


def numpy_dict(params: dict[Any, np.ndarray], grad_sets: list[Any]) -> Step:
    from fastadagrad.reference import NumpyAdaGrad

    opt = NumpyAdaGrad(lr=LR)
    state = {"i": 0}

    def step() -> None:
        state["i"] ^= 1
        opt.update(params, grad_sets[state["i"] % len(grad_sets)])

    return step


def torch_step(params: list[np.ndarray], grads: list[np.ndarray], mode: str) -> Step:
    """``torch.optim.Adagrad(...).step()`` on CPU tensors sharing the NumPy arrays."""
    import torch

    tp = []
    for p, g in zip(params, grads, strict=True):
        t = torch.from_numpy(p).requires_grad_(True)
        t.grad = torch.from_numpy(g)
        tp.append(t)
    opt = torch.optim.Adagrad(tp, lr=LR, eps=EPS, **TORCH_MODES[mode])
    return opt.step


def deepspeed_step(params: list[np.ndarray], grads: list[np.ndarray]) -> Step:
    """DeepSpeed's AVX CPU Adagrad (``DeepSpeedCPUAdagrad``); imported by the caller."""
    import torch
    from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

    tp = []
    for p, g in zip(params, grads, strict=True):
        t = torch.nn.Parameter(torch.from_numpy(p))
        t.grad = torch.from_numpy(g)
        tp.append(t)
    try:  # the first construction builds the C++ op with the system compiler (minutes)
        opt = DeepSpeedCPUAdagrad(tp, lr=LR, eps=EPS)
    except Exception as exc:  # no compiler, no ninja, a build error: skip, saying why
        pytest.skip(f"DeepSpeed CPU Adagrad op could not be built: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "))
    return opt.step


def fast_kernel(p: np.ndarray, g: np.ndarray, h: np.ndarray, serial: bool = False,
                hyper: Any = None, step: int = 1) -> Step:
    """The library's own compiled kernel on one flat buffer, called directly, with the
    coefficients as ``adagrad_update`` passes them (one float64 array, rounded to the
    array dtype in the kernel): the parallel one (``flat_parallel``, what
    ``adagrad_update`` runs from ``config.PARALLEL_THRESHOLD`` elements up) or the
    serial one below that (``checked_span``: the loop behind the compiled shape and
    overlap checks, here with the parallel hand-off switched off). ``hyper`` (a
    ``fastadagrad._hyper.Hyper``, default ``lr=LR, eps=EPS``) and ``step`` pick the
    formula variant, e.g. ``bench.plain.OPTION_SETS[name].hyper()``."""
    from fastadagrad import _dispatch as D
    from fastadagrad import cpu
    from fastadagrad._hyper import Hyper

    if hyper is None:
        hyper = Hyper.make(lr=LR, eps=EPS)
    coefs = D.coefficients(hyper, p.dtype, step)
    k = cpu.kernels(coefs[7])
    table = np.array([float(x) for x in coefs[:7]], np.float64)
    if serial:
        never = np.iinfo(np.int64).max
        lr = float(table[5])  # the step's learning rate: the kernel's own argument
        return lambda: k.checked_span(p, g, h, table, lr, never)
    return lambda: k.flat_parallel(p, g, h, table)


def plain_flat(p: np.ndarray, g: np.ndarray, h: np.ndarray, serial: bool = False) -> Step:
    """The plain fused loop (``bench/plain.py``) on one flat buffer."""
    from bench.plain import plain_parallel, plain_serial

    t = p.dtype.type
    lr, eps = t(LR), t(EPS)
    kernel = plain_serial if serial else plain_parallel
    return lambda: kernel(p, g, h, lr, eps)


def plain_option_set(p: np.ndarray, g: np.ndarray, h: np.ndarray, name: str,
                     serial: bool = False) -> Step:
    """The plain loop of ``bench.plain.OPTION_SETS[name]`` on one flat buffer (its
    scalars rounded to the array dtype once, outside the timed call)."""
    from bench.plain import OPTION_SETS

    opt = OPTION_SETS[name]
    s = opt.scalars(p.dtype)
    kernel = opt.serial if serial else opt.parallel
    return lambda: kernel(p, g, h, *s)


def plain_dict(params: dict[Any, np.ndarray], grad_sets: list[Any]) -> Step:
    """The plain fused loop called once per array of a dict, as a user would write it.

    The states start at zero and live beside the parameters; gradients cycle through
    the sets like :func:`fast_dict`.
    """
    from bench.plain import plain_parallel

    keys = list(params)
    states = {k: np.zeros_like(params[k]) for k in keys}
    t = params[keys[0]].dtype.type
    lr, eps = t(LR), t(EPS)
    state = {"i": 0}

    def step() -> None:
        state["i"] ^= 1
        grads = grad_sets[state["i"] % len(grad_sets)]
        for k in keys:
            plain_parallel(params[k].reshape(-1), grads[k].reshape(-1),
                           states[k].reshape(-1), lr, eps)

    return step


def roofline_step(n: int, dtype: Any, p0: np.ndarray | None = None,
                  g0: np.ndarray | None = None,
                  state: tuple[np.ndarray, np.ndarray] | None = None) -> Step:
    """The roofline kernel on ``p0``'s values (copied) and ``g0``, or on the given
    ``(p, h)`` (the flat cases' shared arrays, :func:`flat_state`)."""
    from bench.roofline import roofline

    if state is not None:
        p, h = state
    else:
        p = page_aligned(n, dtype) if p0 is None else page_aligned(p0)
        h = page_aligned(n, dtype)
    g = np.full(n, 1e-3, dtype) if g0 is None else g0
    return lambda: roofline(p, g, h)
