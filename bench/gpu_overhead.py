"""Host time of one GPU update call (run on a GPU machine).

Prints "<name> us <median>" lines (the format bench/gpu_report.py reads). Medians of
300 calls, the device synchronized only after the timed calls, so this is the time
the host spends per step, not the GPU's:

* ``model100 torch update us``: ``AdaGrad.update`` over the 100-tensor, 2.95M-parameter
  model (bench/benchlib.model_shapes) as separate torch CUDA tensors;
* ``model100 numba update us``: the same over Numba device arrays (whose address, shape
  and dtype cannot change in place, so the per-step check is one identity per array);
* ``model100 torch foreach us`` / ``single us``: ``torch.optim.Adagrad.step()`` on it;
* ``full update us`` / ``torch full update us``: the functional ``adagrad_update`` on
  one 1000-element Numba array / torch tensor (what bench/gpu_report.py reads);
* ``model100 fastadagrad.torch us``: ``fastadagrad.torch.Adagrad.step()`` on it;
* ``model100 graph replay us``: ``CUDAGraph.replay()`` of ``AdaGrad(capturable=True)
  .update`` over it, captured once with ``torch.cuda.graph`` (the host's work per step
  when the optimizer step is part of a captured graph). Last, after the launch path.

``--profile FILE``: also write a cProfile of each fastadagrad case (top functions by
own time) to FILE, to see where the host time goes.
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

PROFILE: list[str] = []  # cProfile reports, written by main() when --profile is given


def profile(name: str, f, reps: int = 300) -> None:
    import cProfile
    import io
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(reps):
        f()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25)
    PROFILE.append(f"=== {name}: {reps} calls\n{out.getvalue()}")


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
    profile("adagrad_update, Numba arrays", lambda: fa.adagrad_update(p, g, h))
    from bench.benchlib import model_shapes

    rng = np.random.default_rng(0)
    shapes = model_shapes()
    nps = [cuda.to_device(rng.standard_normal(s, np.float32)) for s in shapes]
    ngs = [cuda.to_device(rng.standard_normal(s, np.float32) * 1e-2) for s in shapes]
    nopt = fa.AdaGrad.from_preset("torch", lr=0.01)
    print("model100 numba update us", median_us(lambda: nopt.update(nps, ngs),
                                                cuda.synchronize))
    profile("AdaGrad.update, 100 Numba arrays", lambda: nopt.update(nps, ngs))
    try:
        import torch
    except ImportError:
        return
    tp, tg = torch.ones(n, device="cuda"), torch.ones(n, device="cuda")
    th = torch.zeros(n, device="cuda")
    print("torch full update us", median_us(lambda: fa.adagrad_update(tp, tg, th),
                                           torch.cuda.synchronize))

    ps = [torch.randn(s, device="cuda") for s in shapes]
    gs = [torch.randn(s, device="cuda") * 1e-2 for s in shapes]
    sync = torch.cuda.synchronize
    opt = fa.AdaGrad.from_preset("torch", lr=0.01)
    print("model100 torch update us", median_us(lambda: opt.update(ps, gs), sync))
    profile("AdaGrad.update, 100 torch tensors", lambda: opt.update(ps, gs))
    params = [torch.nn.Parameter(x.clone()) for x in ps]
    for q, gr in zip(params, gs):
        q.grad = gr
    from fastadagrad.torch import Adagrad

    fopt = Adagrad(params, lr=0.01)
    print("model100 fastadagrad.torch us", median_us(fopt.step, sync))
    profile("fastadagrad.torch.Adagrad.step, 100 parameters", fopt.step)
    for impl in ("foreach", "single"):
        topt = torch.optim.Adagrad(params, lr=0.01, foreach=impl == "foreach")
        print(f"model100 torch {impl} us", median_us(topt.step, sync))
    print("launch path", *launch_path())
    gopt = fa.AdaGrad.from_preset("torch", lr=0.01, capturable=True)
    gps = [x.clone() for x in ps]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graph requires: compiles, tables
        gopt.update(gps, gs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gopt.update(gps, gs)
    print("model100 graph replay us", median_us(graph.replay, sync))


if __name__ == "__main__":
    main()
    if "--profile" in sys.argv:
        Path(sys.argv[sys.argv.index("--profile") + 1]).write_text("\n".join(PROFILE))
