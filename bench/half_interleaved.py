"""Interleaved CPU timing of one AdaGrad step on 16-bit vs float32 params (no pytest).

    python -m bench.half_interleaved [EXPONENT=24] [REPS=20]     (from the repository root)

Each repetition runs every case once, in turn, so that load from other processes hits
all of them alike; prints the median and the minimum per case and float32's time over
each (ratios within one run). Cases: fastadagrad float32, bfloat16 (nearest and
stochastic), float16, and torch.optim.Adagrad(fused=True) on bfloat16 CPU tensors.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import ml_dtypes
import numba
import numpy as np
import torch

import fastadagrad as fa


def main() -> None:
    n = 1 << (int(sys.argv[1]) if len(sys.argv) > 1 else 24)
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    bf = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    p32 = rng.random(n, dtype=np.float32) - 0.5
    g32 = (rng.random(n, dtype=np.float32) - 0.5) * 0.1
    h32 = np.zeros(n, np.float32)
    pb, gb, hb = p32.astype(bf), g32.astype(bf), np.zeros(n, np.float32)
    pf, gf, hf = p32.astype(np.float16), g32.astype(np.float16), np.zeros(n, np.float32)
    tp = torch.from_numpy(pb.copy().view(np.int16)).view(torch.bfloat16).requires_grad_(True)
    tp.grad = torch.from_numpy(gb.view(np.int16)).view(torch.bfloat16)
    opt = torch.optim.Adagrad([tp], lr=0.01, eps=1e-7, fused=True)
    count = {"step": 0}

    def stochastic() -> None:
        count["step"] += 1
        fa.adagrad_update(pb, gb, hb, lr=0.01, step=count["step"], rounding="stochastic",
                          seed=1)

    cases = {"float32": lambda: fa.adagrad_update(p32, g32, h32, lr=0.01),
             "bfloat16": lambda: fa.adagrad_update(pb, gb, hb, lr=0.01),
             "bfloat16 stochastic": stochastic,
             "float16": lambda: fa.adagrad_update(pf, gf, hf, lr=0.01),
             "torch fused bfloat16": opt.step}
    for f in cases.values():
        for _ in range(3):
            f()
    res: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(reps):
        for k, f in cases.items():
            t = time.perf_counter()
            f()
            res[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in res.items():
        print(f"2^{n.bit_length() - 1} {k:22s} median {med[k] * 1e3:8.3f} ms  min "
              f"{min(v) * 1e3:8.3f} ms  float32/this: median {med['float32'] / med[k]:5.2f}x"
              f"  min {min(res['float32']) / min(v):5.2f}x")
    print(f"numba threads {numba.get_num_threads()}, load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
