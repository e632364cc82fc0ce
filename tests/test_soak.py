"""Soak (issue 6, item 6): 10^4 steps, no memory growth, thread-count independent.

A small model whose total size is above ``config.PARALLEL_THRESHOLD`` (so the parallel
many-array kernel and the parallel non-finite pre-pass run every step, chunked across
threads) trains for 10^4 steps with fresh gradient arrays each step. Python-level
allocations (tracemalloc, which also sees NumPy's buffers) and the process RSS must
not grow after warm-up, and the final params and state must be bit-identical with
``numba.set_num_threads(1)`` and ``(2)``.
"""

from __future__ import annotations

import tracemalloc

import numba
import numpy as np

from fastadagrad import AdaGrad, config
from fastadagrad.testing import assert_bits_equal

STEPS = 10_000
WARMUP = 500
BANK = 8


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _soak(threads: int, steps: int) -> tuple[list[np.ndarray], int, int]:
    """Train; return final arrays, tracemalloc growth and RSS growth after warm-up."""
    rng = np.random.default_rng(5)
    shapes = {"W1": (80, 400), "b1": (400,), "W2": (400, 16), "b2": (16,)}
    assert sum(int(np.prod(s)) for s in shapes.values()) > config.PARALLEL_THRESHOLD
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    bank = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(BANK)]
    opt = AdaGrad(lr=1e-3, nonfinite="skip")
    old = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        def step(i: int) -> None:
            grads = {k: g.copy() for k, g in bank[i % BANK].items()}  # fresh arrays
            assert opt.update(params, grads, grad_scale=2.0 if i % 2 else None)

        for i in range(WARMUP):
            step(i)
        tracemalloc.start()
        traced0 = tracemalloc.get_traced_memory()[0]
        rss0 = _rss_bytes()
        for i in range(WARMUP, steps):
            step(i)
        traced = tracemalloc.get_traced_memory()[0] - traced0
        rss = _rss_bytes() - rss0
        tracemalloc.stop()
    finally:
        numba.set_num_threads(old)
    assert opt.step == steps
    return [*params.values(), *opt.h.values()], traced, rss


def test_soak_no_growth_and_thread_count_independent() -> None:
    two, traced2, rss2 = _soak(min(2, numba.config.NUMBA_NUM_THREADS), STEPS)
    one, traced1, rss1 = _soak(1, STEPS)
    for i, (a, b) in enumerate(zip(one, two, strict=True)):
        assert_bits_equal(a, b, f"array {i}: 1 thread vs 2")
    # A leak of even one 8-byte object per step would show as 76 KB here.
    for traced, rss in ((traced1, rss1), (traced2, rss2)):
        assert traced < 32 * 1024, f"tracemalloc grew by {traced} bytes"
        assert rss < 4 * 1024 * 1024, f"RSS grew by {rss} bytes"

