"""Host time of one GPU update call, and of its parts (run on a GPU machine).

Prints "<name> us <median>" lines, the format bench/gpu_report.py reads from
bench/results/gpu-h100/h100-overhead.txt: ``python bench/gpu_overhead.py > ...``.
Medians of 300 calls on 1000 float32 elements (so the kernel itself is negligible),
the device synchronized only after the timed calls.
"""

from __future__ import annotations

import time

import numpy as np
from numba import cuda

import fastadagrad as fa
from fastadagrad import cuda as fc


def median_us(f, reps: int = 300) -> float:
    f()
    cuda.synchronize()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    cuda.synchronize()
    return float(np.median(ts) * 1e6)


def main() -> None:
    n = 1000
    p, g = cuda.to_device(np.ones(n, np.float32)), cuda.to_device(np.ones(n, np.float32))
    h = cuda.to_device(np.zeros(n, np.float32))
    print("full update us", median_us(lambda: fa.adagrad_update(p, g, h)))
    print("_describe us", median_us(lambda: fc._describe(p, "p")))
    print("cai us", median_us(lambda: p.__cuda_array_interface__))
    try:
        import torch
    except ImportError:
        return
    tp, tg = torch.ones(n, device="cuda"), torch.ones(n, device="cuda")
    th = torch.zeros(n, device="cuda")
    print("torch full update us", median_us(lambda: fa.adagrad_update(tp, tg, th)))
    print("stream_for torch us", median_us(lambda: fc._stream_for(tp, fc._describe(tp, "p"))))


if __name__ == "__main__":
    main()
