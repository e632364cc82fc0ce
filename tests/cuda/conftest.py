"""CUDA tests: run under the simulator in CI (``NUMBA_ENABLE_CUDASIM=1``, set before
numba is imported: ``make test-sim``), or on a real GPU. The test modules skip
themselves, with the reason, when numba-cuda is missing or neither a GPU nor the
simulator is available (``make test-cpu`` collects this folder without the simulator).

Threads per block and the grid are patched down so that every launch here runs several
blocks and the grid-stride loop wraps around with a partial tail.
"""

from __future__ import annotations

import pytest

from fastadagrad import config


@pytest.fixture(autouse=True)
def small_grid(monkeypatch):
    """32 threads per block, at most 2 blocks per SM (the simulator reports one SM):
    64 threads, so a 100-element buffer takes two trips round the grid-stride loop."""
    monkeypatch.setattr(config, "THREADS_PER_BLOCK", 32)
    monkeypatch.setattr(config, "BLOCKS_PER_SM", 2)
    # the multi-tensor kernel: 48-element chunks (a block of 32 threads walks each
    # twice, with a partial tail) on a grid of 2 blocks (each walks several chunks),
    # on the simulator and on a real GPU alike
    monkeypatch.setattr(config, "GPU_CHUNK", 48)
    monkeypatch.setattr(config, "GPU_MAX_BLOCKS", 2)
