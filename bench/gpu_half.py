"""Half-precision params on a GPU: CPU/GPU bit identity and timings (run on a GPU box).

    python -m bench.gpu_half [--n-exp 24]     (from the repository root)

1. Bits: 2^20 + 3 bfloat16 and float16 elements, 3 steps, nearest and stochastic
   rounding, with and without master weights: fastadagrad on torch CUDA tensors
   against fastadagrad on the CPU (NumPy + ml_dtypes). Prints the number of differing
   elements (0 expected everywhere).
2. Time per step at 2^n (CUDA events, median of 50 after 5 warm-ups): fastadagrad
   bfloat16 (nearest, stochastic), float32, and torch.optim.Adagrad foreach (and
   fused, if torch has it on CUDA) on bfloat16 tensors.
"""

from __future__ import annotations

import argparse
import statistics

import ml_dtypes
import numpy as np
import torch

import fastadagrad as fa

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_torch(a: np.ndarray) -> torch.Tensor:
    if a.dtype == BF16:
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(a.copy()).cuda()


def bits(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy().view(np.uint32)


def check_bits() -> int:
    bad = 0
    n = (1 << 20) + 3
    rng = np.random.default_rng(0)
    for dt in (BF16, np.dtype(np.float16)):
        for rounding, seed in (("nearest", None), ("stochastic", 123)):
            for master in (False, True):
                p = rng.standard_normal(n).astype(dt)
                pc, hc = p.copy(), np.zeros(n, np.float32)
                mc = p.astype(np.float32) if master else None
                pg, hg = to_torch(p), torch.zeros(n, device="cuda")
                mg = to_torch(mc) if master else None
                for step in (1, 2, 3):
                    g = (rng.standard_normal(n) * 0.3).astype(dt)
                    kw = dict(lr=0.05, step=step, rounding=rounding, seed=seed)
                    fa.adagrad_update(pc, g, hc, master=mc, **kw)
                    fa.adagrad_update(pg, to_torch(g), hg, master=mg, **kw)
                torch.cuda.synchronize()
                d = int((bits(pg) != pc.view(np.uint16)).sum())
                d += int((bits(hg) != hc.view(np.uint32)).sum())
                if master:
                    d += int((bits(mg) != mc.view(np.uint32)).sum())
                print(f"bits {dt.name:8s} {rounding:10s} master={master!s:5s}: "
                      f"{d} differing elements")
                bad += d
    return bad


def check_class_bits() -> int:
    """``AdaGrad`` on torch CUDA tensors (bfloat16 and float16 params, one float32 one)
    against ``AdaGrad`` on NumPy arrays, master weights and stochastic rounding on."""
    rng = np.random.default_rng(1)
    host = {"emb": rng.standard_normal((1000, 33)).astype(BF16),
            "w": rng.standard_normal((33, 7)).astype(np.float32),
            "b": rng.standard_normal(7).astype(np.float16)}
    dev = {k: to_torch(v) for k, v in host.items()}
    cpu = {k: v.copy() for k, v in host.items()}
    kw = dict(lr=0.05, rounding="stochastic", seed=5, master_weights=True)
    o_dev, o_cpu = fa.AdaGrad(**kw), fa.AdaGrad(**kw)
    for _ in range(3):
        g = {k: (rng.standard_normal(v.shape) * 0.3).astype(v.dtype) for k, v in host.items()}
        o_dev.update(dev, {k: to_torch(v) for k, v in g.items()})
        o_cpu.update(cpu, g)
    torch.cuda.synchronize()
    bad = 0
    for k in host:
        view = np.uint16 if host[k].dtype.itemsize == 2 else np.uint32
        bad += int((bits(dev[k]) != cpu[k].view(view)).sum())
        bad += int((bits(o_dev.h[k]) != o_cpu.h[k].view(np.uint32)).sum())
    for k in o_cpu.master:
        bad += int((bits(o_dev.master[k]) != o_cpu.master[k].view(np.uint32)).sum())
    print(f"bits AdaGrad class (bfloat16+float16+float32 model, stochastic, master): "
          f"{bad} differing elements")
    return bad


def time_ms(step, reps: int = 50) -> float:
    for _ in range(5):
        step()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def timings(n: int) -> None:
    p32 = torch.randn(n, device="cuda")
    g32 = torch.randn(n, device="cuda") * 0.1
    h32 = torch.zeros(n, device="cuda")
    pb, gb = p32.bfloat16(), g32.bfloat16()
    hb = torch.zeros(n, device="cuda")
    mb = p32.clone()
    count = {"s": 0}

    def stoch():
        count["s"] += 1
        fa.adagrad_update(pb, gb, hb, lr=0.01, step=count["s"], rounding="stochastic",
                          seed=1)

    cases = {
        "fastadagrad float32": lambda: fa.adagrad_update(p32, g32, h32, lr=0.01),
        "fastadagrad bfloat16": lambda: fa.adagrad_update(pb, gb, hb, lr=0.01),
        "fastadagrad bfloat16 stochastic": stoch,
        "fastadagrad bfloat16 master": lambda: fa.adagrad_update(pb, gb, hb, lr=0.01,
                                                                 master=mb),
    }
    for mode in ("foreach", "fused"):
        t = p32.bfloat16().requires_grad_(True)
        t.grad = gb.clone()
        try:
            opt = torch.optim.Adagrad([t], lr=0.01, **{mode: True})
            opt.step()
            cases[f"torch {mode} bfloat16"] = opt.step
        except Exception as e:  # fused Adagrad may be CPU-only in this torch
            print(f"torch {mode} bfloat16: unavailable ({type(e).__name__}: {e})")
    res = {}
    for _ in range(2):  # two interleaved passes; report the better median of each
        for name, f in cases.items():
            res[name] = min(res.get(name, 1e9), time_ms(f))
    base = res["fastadagrad float32"]
    for name, ms in res.items():
        print(f"time 2^{n.bit_length() - 1} {name:34s} {ms * 1e3:9.1f} us   "
              f"float32/this = {base / ms:5.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-exp", type=int, default=24)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "numpy", np.__version__)
    bad = check_bits()
    bad += check_class_bits()
    timings(1 << args.n_exp)
    raise SystemExit(1 if bad else 0)
