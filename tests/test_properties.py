"""Property tests (hypothesis): any shape, values, hyperparameters and formula choice
give exactly the plain-NumPy reference's bits, on the serial and the parallel kernel."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastadagrad
from fastadagrad import config
from fastadagrad._hyper import Hyper, Rule
from fastadagrad.reference import reference_step
from fastadagrad.testing import assert_bits_equal

finite = dict(allow_nan=False, allow_infinity=False, allow_subnormal=True)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9))
    width = 32 if dtype == np.float32 else 64
    elems = st.floats(-1e3, 1e3, width=width, **finite)
    p = draw(hnp.arrays(dtype, shape, elements=elems))
    grads = [draw(hnp.arrays(dtype, shape, elements=elems))
             for _ in range(draw(st.integers(1, 4)))]
    h0 = draw(hnp.arrays(dtype, shape, elements=st.floats(0, 10, width=width, **finite)))
    rule = Rule(
        eps_placement=draw(st.sampled_from(["outside", "inside"])),
        fma_accumulate=draw(st.booleans()),
        lr_placement=draw(st.sampled_from(["numerator", "after"])),
        zero_where_h0=draw(st.booleans()),
        weight_decay_mode=draw(st.sampled_from(["coupled", "decoupled"])),
        fma_weight_decay=draw(st.booleans()),
    )
    hyper = Hyper.make(
        lr=draw(st.floats(0, 1, **finite)),
        eps=draw(st.sampled_from([0.0, 1e-10, 1e-8, 1e-7, 0.1])),
        lr_decay=draw(st.sampled_from([0.0, 0.01, 0.5])),
        weight_decay=draw(st.sampled_from([0.0, 1e-4, 0.1])),
        maximize=draw(st.booleans()),
        grad_scale=draw(st.sampled_from([None, 0.5, 1024.0])),
        rule=rule,
    )
    return p, grads, h0, hyper, draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(problems())
def test_any_input_matches_reference(problem):
    p0, grads, h0, hy, parallel = problem
    old = config.PARALLEL_THRESHOLD, config.CHUNK
    config.PARALLEL_THRESHOLD, config.CHUNK = (0, 4) if parallel else (1 << 62, old[1])
    try:
        p, h = p0.copy(), h0.copy()
        pr, hr = p0.copy(), h0.copy()
        for step, g in enumerate(grads, start=1):
            fastadagrad.adagrad_update(
                p, g, h, lr=hy.lr, eps=hy.eps, lr_decay=hy.lr_decay,
                weight_decay=hy.weight_decay, maximize=hy.maximize, step=step,
                grad_scale=hy.grad_scale, rule=hy.rule)
            with np.errstate(all="ignore"):
                reference_step(pr, g, hr, hy, step)
    finally:
        config.PARALLEL_THRESHOLD, config.CHUNK = old
    assert_bits_equal(h, hr, "state")
    assert_bits_equal(p, pr, "param")
