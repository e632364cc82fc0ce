"""Embedding rows: AdaGrad on the touched rows of a 1,000,000 x 64 float32 table.

65,536 lookups per step, drawn Zipf(1.05) (``zipf % R``: about 63% distinct rows, the
first rows repeated thousands of times) or uniformly (about 97% distinct). Two groups:

* the optimizer step alone, on the same sparse gradient every time: fastadagrad full
  and rowwise accumulators, ``torch.optim.Adagrad`` with a sparse COO gradient (what
  ``nn.Embedding(sparse=True)`` produces; its step coalesces, as ours groups, every
  time), and the roofline: a kernel that reads every gradient row once and reads and
  writes each touched row of the table and of a full accumulator once, with no math;
* a whole training step of the table: ``nn.Embedding(sparse=True)`` forward and
  backward plus the fastadagrad rowwise update, against FBGEMM's CPU
  ``SplitTableBatchedEmbeddingBagsCodegen`` with ``EXACT_ROWWISE_ADAGRAD`` (forward,
  backward and update fused in one module; ``fbgemm-gpu-cpu``, skipped when missing).

With ``--benchmark-disable`` the table is 1,024 x 64 with 1,024 lookups.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from numba import njit, prange

from bench import benchlib as B

R, D, K = 1_000_000, 64, 65_536
R_CI, K_CI = 1_024, 1_024  # --benchmark-disable: 2^16 table elements

FAST_FULL = "fastadagrad full"
FAST_ROWWISE = "fastadagrad rowwise"
TORCH_SPARSE = "torch sparse Adagrad"
TRAIN_FAST = "nn.Embedding fwd+bwd + fastadagrad rowwise"
TRAIN_TORCH = "nn.Embedding fwd+bwd + torch sparse Adagrad"
TRAIN_FBGEMM = "FBGEMM fused fwd+bwd+rowwise"


@njit(parallel=True, error_model="numpy", cache=True)
def rows_roofline(p, h, g, rows):
    """The row update's memory traffic with no math: every gradient row read once, each
    touched row of ``p`` and ``h`` (``rows``, distinct) read and written once."""
    u = rows.size
    k, d = g.shape
    total = 0.0
    for i in prange(k):
        if i < u:
            r = rows[i]
            for j in range(d):
                x = g[i, j]
                h[r, j] = h[r, j] + x
                p[r, j] = p[r, j] - x
        else:
            s = g.dtype.type(0)
            for j in range(d):
                s = max(s, g[i, j])  # a read the compiler cannot drop
            total += s
    return total


def source(disabled: bool, dist: str) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    r, k = (R_CI, K_CI) if disabled else (R, K)
    rng = np.random.default_rng(2026)
    idx = (rng.zipf(1.05, k) % r) if dist == "zipf" else rng.integers(0, r, k)
    p = (rng.standard_normal((r, D)) * 0.1).astype(np.float32)
    g = (rng.standard_normal((k, D)) * 1e-2).astype(np.float32)
    return r, idx.astype(np.int64), p, g


def update_step(impl: str, r: int, idx: np.ndarray, p: np.ndarray, g: np.ndarray) -> Any:
    import fastadagrad as fa

    if impl == FAST_FULL:
        h = np.zeros_like(p)
        return lambda: fa.adagrad_update_rows(p, h, idx, g, lr=B.LR, eps=B.EPS)
    if impl == FAST_ROWWISE:
        hr = np.zeros(r, np.float32)
        return lambda: fa.adagrad_update_rows(p, hr, idx, g, lr=B.LR, eps=B.EPS,
                                              rowwise=True)
    if impl == TORCH_SPARSE:
        B.require_torch()
        import torch

        w = torch.nn.Parameter(torch.from_numpy(p))
        grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(g),
                                       (r, D), check_invariants=True)
        opt = torch.optim.Adagrad([w], lr=B.LR, eps=B.EPS)

        def step() -> None:
            w.grad = grad  # uncoalesced, as nn.Embedding(sparse=True) leaves it
            opt.step()

        return step
    if impl == B.ROOFLINE:
        h = np.zeros_like(p)
        rows = np.unique(idx)
        return lambda: rows_roofline(p, h, g, rows)
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", [FAST_FULL, FAST_ROWWISE, TORCH_SPARSE, B.ROOFLINE])
@pytest.mark.parametrize("dist", ["zipf", "uniform"])
def test_rows_update(run: Any, disabled: bool, impl: str, dist: str) -> None:
    import warnings

    r, idx, p, g = source(disabled, dist)
    step = update_step(impl, r, idx, p, g)
    with warnings.catch_warnings():  # torch's Adagrad rebuilds sparse tensors unchecked
        warnings.filterwarnings("ignore", "Sparse invariant checks")
        run(step, scenario=f"rows-{dist}", impl=impl, dtype=np.float32, n=idx.size * D,
            group=f"g. rows update {dist} {r:,} x {D} f32, {idx.size:,} lookups",
            rows=r, lookups=idx.size, distinct=int(np.unique(idx).size))


def _fbgemm_module(r: int) -> Any:
    import warnings

    try:
        with warnings.catch_warnings():  # its import warns about optional SSD modules
            warnings.simplefilter("ignore")
            from fbgemm_gpu.split_embedding_configs import EmbOptimType
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import PoolingMode
            from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
                ComputeDevice,
                EmbeddingLocation,
                SplitTableBatchedEmbeddingBagsCodegen,
            )
    except Exception as exc:
        pytest.skip(f"fbgemm-gpu-cpu is not usable here ({exc})")
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(r, D, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=B.LR, eps=B.EPS,
        pooling_mode=PoolingMode.NONE)


def train_step(impl: str, r: int, idx: np.ndarray, p: np.ndarray, g: np.ndarray) -> Any:
    B.require_torch()
    import torch

    import fastadagrad as fa

    ti, tg = torch.from_numpy(idx), torch.from_numpy(g)
    if impl == TRAIN_FBGEMM:
        emb = _fbgemm_module(r)
        with torch.no_grad():
            emb.split_embedding_weights()[0].copy_(torch.from_numpy(p))
        offsets = torch.arange(idx.size + 1)
        return lambda: emb(ti, offsets).backward(tg)
    layer = torch.nn.Embedding(r, D, sparse=True, _weight=torch.from_numpy(p))
    if impl == TRAIN_FAST:
        table = layer.weight.detach().numpy()  # shares memory with the layer
        opt = fa.RowAdaGrad(table, lr=B.LR, eps=B.EPS, rowwise=True)

        def step() -> None:
            layer(ti).backward(tg)
            grad = layer.weight.grad
            layer.weight.grad = None
            opt.update(grad._indices()[0].numpy(), grad._values().numpy())

        return step
    if impl == TRAIN_TORCH:
        topt = torch.optim.Adagrad(layer.parameters(), lr=B.LR, eps=B.EPS)

        def tstep() -> None:
            topt.zero_grad(set_to_none=True)
            layer(ti).backward(tg)
            topt.step()

        return tstep
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", [TRAIN_FAST, TRAIN_TORCH, TRAIN_FBGEMM])
@pytest.mark.parametrize("dist", ["zipf", "uniform"])
def test_rows_training_step(run: Any, disabled: bool, impl: str, dist: str) -> None:
    import warnings

    r, idx, p, g = source(disabled, dist)
    step = train_step(impl, r, idx, p, g)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse invariant checks")
        run(step, scenario=f"rows-train-{dist}", impl=impl, dtype=np.float32,
            n=idx.size * D,
            group=f"h. rows training step {dist} {r:,} x {D} f32, {idx.size:,} lookups",
            rows=r, lookups=idx.size, distinct=int(np.unique(idx).size))
