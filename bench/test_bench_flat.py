"""Scenario (a): one flat buffer of 2^k elements, float32 and float64.

Also the option benchmarks of issues 5 and 6 at 2^24 float32: every option on vs the
defaults, the kernel of torch's formula with every option vs its plain loop (same bits),
and ``nonfinite='skip'`` (a read-only check pass first) vs ``'ignore'``.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
import pytest

from bench import benchlib as B
from fastadagrad import config

FLAT_IMPLS = (B.FAST, B.FAST_SERIAL, B.NUMPY, B.TORCH_FORLOOP, B.TORCH_FOREACH,
              B.TORCH_FUSED, B.FAST_KERNEL, B.FAST_KERNEL_SERIAL, B.PLAIN, B.PLAIN_SERIAL,
              B.ROOFLINE, B.DEEPSPEED)


def make_flat_step(impl: str, n: int, dtype: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    p0, g = B.flat_source(n, dtype)
    p, h = B.flat_state(n, dtype)  # the same memory for every implementation of a size
    if impl == B.FAST:
        return B.fast_functional(p, g, h)
    if impl == B.FAST_SERIAL:  # the same public call with the parallel path switched off
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", sys.maxsize)
        return B.fast_functional(p, g, h)
    if impl == B.NUMPY:
        return B.numpy_dict({"w": p}, [{"w": g}])
    if impl in B.TORCH_MODES:
        B.require_torch()
        return B.torch_step([p], [g], impl)
    if impl in (B.FAST_KERNEL, B.FAST_KERNEL_SERIAL):
        return B.fast_kernel(p, g, h, serial=impl == B.FAST_KERNEL_SERIAL)
    if impl in (B.PLAIN, B.PLAIN_SERIAL):
        return B.plain_flat(p, g, h, serial=impl == B.PLAIN_SERIAL)
    if impl == B.ROOFLINE:
        return B.roofline_step(n, dtype, p0, g, state=(p, h))
    if impl == B.DEEPSPEED:
        B.require_deepspeed(dtype)
        return B.deepspeed_step([p], [g])
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", FLAT_IMPLS)
@pytest.mark.parametrize("exponent", B.FLAT_EXPONENTS, ids=lambda k: f"2_{k}")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_flat(run: Any, elements: Any, monkeypatch: pytest.MonkeyPatch, impl: str,
              exponent: int, dtype: str) -> None:
    n = elements(exponent)
    step = make_flat_step(impl, n, dtype, monkeypatch)
    run(step, scenario="flat", impl=impl, dtype=dtype, n=n,
        group=f"a. flat {dtype} 2^{exponent:02d}")


#: Issue 5: every option of that issue on at once (a different formula, so this measures
#: the cost of the extra flag tests and operations in the fused loop, not a like-for-like
#: update). Loss scaling (issue 6) adds an IEEE division per element: its own variant.
ALL_OPTIONS = {"lr_decay": 0.01, "weight_decay": 1e-4, "maximize": True, "step": 10}


@pytest.mark.parametrize("variant", ["defaults", "all options", "all options + grad_scale",
                                     "roofline", B.OPTIONS_KERNEL, B.OPTIONS_PLAIN])
def test_options(run: Any, elements: Any, variant: str) -> None:
    from bench.plain import OPTION_SETS
    from fastadagrad import Rule

    n = elements(24)
    p0, g = B.flat_source(n, np.float32)
    p, h = p0.copy(), np.zeros(n, np.float32)
    if variant in (B.OPTIONS_KERNEL, B.OPTIONS_PLAIN):
        # torch's formula with every option (bench/plain.py): the flag-set kernel against
        # the plain loop with the same bits, on the same page-aligned memory (as the flat
        # cases: where an array lands moved one loop alone by 6-7%, see benchlib)
        p, h = B.flat_state(n, np.float32)
        opt = OPTION_SETS[B.OPTIONS_SET]
        step = (B.fast_kernel(p, g, h, hyper=opt.hyper(), step=opt.options["step"])
                if variant == B.OPTIONS_KERNEL else B.plain_option_set(p, g, h, opt.name))
    elif variant == "defaults":
        step = B.fast_functional(p, g, h)
    elif variant.startswith("all options"):
        extra = {"grad_scale": 1024.0} if variant.endswith("grad_scale") else {}
        step = B.fast_functional(p, g, h, rule=Rule(eps_placement="inside",
                                                    fma_accumulate=True,
                                                    fma_weight_decay=True),
                                 **ALL_OPTIONS, **extra)
    else:
        step = B.roofline_step(n, np.float32, p0, g)
    run(step, scenario="options", impl=variant, dtype=np.float32, n=n,
        group="e. options float32 2^24")


@pytest.mark.parametrize("variant", ["ignore", "skip", "roofline"])
def test_nonfinite_check(run: Any, elements: Any, variant: str) -> None:
    """Issue 6: the checked mode reads the gradient once more (4 B/elem extra in f32)."""
    n = elements(24)
    p0, g = B.flat_source(n, np.float32)
    p, h = p0.copy(), np.zeros(n, np.float32)
    if variant == "roofline":
        step = B.roofline_step(n, np.float32, p0, g)
    else:
        step = B.fast_functional(p, g, h, nonfinite=variant)
    run(step, scenario="nonfinite", impl=f"nonfinite={variant!r}" if variant != "roofline"
        else variant, dtype=np.float32, n=n, group="f. nonfinite float32 2^24")
