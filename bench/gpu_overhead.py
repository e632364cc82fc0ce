"""Host time of one GPU update call (run on a GPU machine).

Prints "<name> us <median>" lines (the format bench/gpu_report.py reads). Medians of
300 calls, the device synchronized only after the timed calls, so this is the time
the host spends per step, not the GPU's:

* ``model100 torch update us``: ``AdaGrad.update`` over the 100-tensor, 2.95M-parameter
  model (bench/benchlib.model_shapes) as separate torch CUDA tensors;
* ``model100 torch foreach us`` / ``single us``: ``torch.optim.Adagrad.step()`` on it;
* ``full update us`` / ``torch full update us``: the functional ``adagrad_update`` on
  one 1000-element Numba array / torch tensor (what bench/gpu_report.py reads).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from numba import cuda

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fastadagrad as fa  # noqa: E402
from fastadagrad.cuda_launch import launch_path  # noqa: E402


def median_us(f, sync, reps: int = 300) -> float:
    f()
    sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    sync()
    return float(np.median(ts) * 1e6)


def main() -> None:
    n = 1000
    p, g = cuda.to_device(np.ones(n, np.float32)), cuda.to_device(np.ones(n, np.float32))
    h = cuda.to_device(np.zeros(n, np.float32))
    print("full update us", median_us(lambda: fa.adagrad_update(p, g, h), cuda.synchronize))
    try:
        import torch
    except ImportError:
        return
    from bench.benchlib import model_shapes

    tp, tg = torch.ones(n, device="cuda"), torch.ones(n, device="cuda")
    th = torch.zeros(n, device="cuda")
    print("torch full update us", median_us(lambda: fa.adagrad_update(tp, tg, th),
                                           torch.cuda.synchronize))

    shapes = model_shapes()
    ps = [torch.randn(s, device="cuda") for s in shapes]
    gs = [torch.randn(s, device="cuda") * 1e-2 for s in shapes]
    sync = torch.cuda.synchronize
    opt = fa.AdaGrad.from_preset("torch", lr=0.01)
    print("model100 torch update us", median_us(lambda: opt.update(ps, gs), sync))
    params = [torch.nn.Parameter(x.clone()) for x in ps]
    for q, gr in zip(params, gs):
        q.grad = gr
    for impl in ("foreach", "single"):
        topt = torch.optim.Adagrad(params, lr=0.01, foreach=impl == "foreach")
        print(f"model100 torch {impl} us", median_us(topt.step, sync))
    print("launch path", *launch_path())


if __name__ == "__main__":
    main()
