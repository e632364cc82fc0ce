"""Launch-configuration sweep for the CUDA kernel (run by hand on a GPU machine).

``python bench/gpu_sweep.py``: times the multi-tensor update kernel (numpy rule, through
``fastadagrad.adagrad_update``) for several threads-per-block / chunk-size settings at
2^26 float32 and float64, next to a device-to-device copy moving the same bytes.
It also times an experimental 4-way unrolled variant (same math) to see whether more
loads in flight per thread help, and the library's own one-tensor grid-stride variant
(``config.GPU_GRID_STRIDE``, off by default) at several grid sizes next to the default,
and its chunked kernel with 4 elements per thread per pass (``config.GPU_UNROLL_CHUNKS``)
on the 2^26 array and on the 100-tensor model.
This is how ``config.THREADS_PER_BLOCK`` and ``config.GPU_CHUNK`` are chosen (and
whether ``config.GPU_GRID_STRIDE`` should be on); numbers are printed, never stored by
hand.
"""

# ruff: noqa: B023, F821  (timed lambdas are called inside the loop iteration that made them)
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from numba import cuda
from numba.cuda import libdevice as L

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere

import fastadagrad as fa  # noqa: E402
from fastadagrad import config  # noqa: E402
from fastadagrad import cuda as fc  # noqa: E402
from fastadagrad import cuda_kernels as K  # noqa: E402
from fastadagrad._hyper import Hyper  # noqa: E402


def gpu_time(fn, reps=30):
    fn()
    cuda.synchronize()
    s, e = cuda.event(), cuda.event()
    best = float("inf")
    for _ in range(3):
        s.record()
        for _ in range(reps):
            fn()
        e.record()
        e.synchronize()
        best = min(best, cuda.event_elapsed_time(s, e) / 1e3 / reps)
    return best


@cuda.jit
def unrolled4(p, g, h, lr, eps):
    n = np.uint64(p.size)
    i = np.uint64(cuda.grid(1))
    s = np.uint64(cuda.gridsize(1))
    s2 = s + s
    s3 = s2 + s
    s4 = s2 + s2
    while i + s3 < n:
        g0, g1, g2, g3 = g[i], g[i + s], g[i + s2], g[i + s3]
        h0, h1, h2, h3 = h[i], h[i + s], h[i + s2], h[i + s3]
        p0, p1, p2, p3 = p[i], p[i + s], p[i + s2], p[i + s3]
        h0 = L.fadd_rn(h0, L.fmul_rn(g0, g0))
        h1 = L.fadd_rn(h1, L.fmul_rn(g1, g1))
        h2 = L.fadd_rn(h2, L.fmul_rn(g2, g2))
        h3 = L.fadd_rn(h3, L.fmul_rn(g3, g3))
        h[i], h[i + s], h[i + s2], h[i + s3] = h0, h1, h2, h3
        p[i] = L.fadd_rn(p0, -L.fdiv_rn(L.fmul_rn(lr, g0), L.fadd_rn(L.fsqrt_rn(h0), eps)))
        p[i + s] = L.fadd_rn(p1, -L.fdiv_rn(L.fmul_rn(lr, g1), L.fadd_rn(L.fsqrt_rn(h1), eps)))
        p[i + s2] = L.fadd_rn(p2, -L.fdiv_rn(L.fmul_rn(lr, g2),
                                                L.fadd_rn(L.fsqrt_rn(h2), eps)))
        p[i + s3] = L.fadd_rn(p3, -L.fdiv_rn(L.fmul_rn(lr, g3),
                                                L.fadd_rn(L.fsqrt_rn(h3), eps)))
        i += s4
    while i < n:
        gi = g[i]
        hi = L.fadd_rn(h[i], L.fmul_rn(gi, gi))
        h[i] = hi
        p[i] = L.fadd_rn(p[i], -L.fdiv_rn(L.fmul_rn(lr, gi), L.fadd_rn(L.fsqrt_rn(hi), eps)))
        i += s


def library_line(what: str, t: float, nbytes: int, tc: float, ran: str = "") -> str:
    """One timed library case: ``t`` seconds for ``nbytes`` moved, a copy of the same
    bytes taking ``tc``, and what :func:`ran` says was launched (bench/gpu_report.py
    reads these lines, and counts a variant's figure only where ``ran`` names it)."""
    return (f"  library {what:32}: {t * 1e6:8.1f} us {nbytes / t / 1e9:7.0f} GB/s "
            f"{100 * tc / t:5.1f}% of copy" + (f" [ran: {ran}]" if ran else ""))


def ran(p, h) -> str:
    """The kernel that the last functional call on ``p`` and ``h`` launched, read from
    its packed launches: "grid-stride", "4 per pass" or "1 per pass", and its grid."""
    call = fc._CALLS.get((id(p), id(h)))
    launches = call.tables.launches if call is not None else None
    if not launches or not launches[3]:
        return "unknown"
    k, blocks = launches[3][0][:2]
    kind = ("grid-stride" if k.flags & K.GRID_STRIDE else
            "4 per pass" if k.flags & K.UNROLL_CHUNKS else "1 per pass")
    return f"{kind}, {blocks} blocks"


def model_line(per_pass: int, t: float, frac_copy: float) -> str:
    """The 100-tensor model's step (bench/gpu_report.py reads these lines)."""
    return (f"  100-tensor model, {per_pass} per pass{'':12}: {t * 1e6:8.1f} us "
            f"{100 * frac_copy:5.1f}% of copy (per byte, from the 2^26 copy; launch included)")


def model(dt, copy_s_per_byte: float) -> None:
    """The 100-tensor model (bench/benchlib.model_shapes) as Numba arrays through
    ``AdaGrad.update``: the chunked kernel with 1 and with 4 elements per pass."""
    from bench.benchlib import model_shapes

    rng = np.random.default_rng(2)
    shapes = model_shapes()
    ps = [cuda.to_device(rng.standard_normal(s).astype(dt)) for s in shapes]
    gs = [cuda.to_device((rng.standard_normal(s) * 1e-2).astype(dt)) for s in shapes]
    nbytes = 5 * sum(int(np.prod(s)) for s in shapes) * np.dtype(dt).itemsize
    for on in (False, True, False, True):
        config.GPU_UNROLL_CHUNKS = on
        opt = fa.AdaGrad(lr=0.01)  # a new one: the launches are planned per optimizer
        t = gpu_time(lambda: opt.update(ps, gs))
        print(model_line(K.UNROLL if on else 1, t, copy_s_per_byte * nbytes / t))
    config.GPU_UNROLL_CHUNKS = False


def main() -> int:
    n = 1 << 26
    sms = fc._sm_count()
    tpb0, chunk0 = config.THREADS_PER_BLOCK, config.GPU_CHUNK
    print(f"{cuda.get_current_device().name} SMs={sms}")
    for dt in (np.float32, np.float64):
        isz = np.dtype(dt).itemsize
        nbytes = 5 * n * isz
        p = cuda.to_device(np.random.default_rng(0).standard_normal(n).astype(dt))
        g = cuda.to_device(np.random.default_rng(1).standard_normal(n).astype(dt) * 1e-2)
        h = cuda.to_device(np.zeros(n, dt))
        coefs = Hyper.make().coefficients(dt, 1)
        src = cuda.device_array(nbytes // 2, np.uint8)
        dst = cuda.device_array(nbytes // 2, np.uint8)
        tc = gpu_time(lambda: dst.copy_to_device(src))
        print(f"{np.dtype(dt).name}: copy {nbytes / tc / 1e9:.0f} GB/s")
        for tpb in (128, 256, 512, 1024):
            for chunk in (1 << 12, 1 << 13, 1 << 14, 1 << 16):
                if chunk < tpb:
                    continue
                config.THREADS_PER_BLOCK, config.GPU_CHUNK = tpb, chunk
                t = gpu_time(lambda: fa.adagrad_update(p, g, h))
                print(f"  tpb={tpb:5} chunk={chunk:6}: {t * 1e6:8.1f} us "
                      f"{nbytes / t / 1e9:7.0f} GB/s {100 * tc / t:5.1f}% of copy")
        config.THREADS_PER_BLOCK, config.GPU_CHUNK = tpb0, chunk0
        # the library's grid-stride variant for one tensor (config.GPU_GRID_STRIDE),
        # interleaved with the shipped default so that both see the same GPU state
        gs0, bps0 = config.GPU_GRID_STRIDE, config.GRID_STRIDE_BLOCKS_PER_SM
        for bps in (2, 4, 8, 16):
            config.GRID_STRIDE_BLOCKS_PER_SM = bps
            for on in (False, True):
                config.GPU_GRID_STRIDE = on
                t = gpu_time(lambda: fa.adagrad_update(p, g, h))
                what = f"grid-stride x{K.UNROLL} blocks/SM={bps}" if on else \
                    "chunked (default config)"
                print(library_line(what, t, nbytes, tc, ran(p, h)))
        config.GPU_GRID_STRIDE, config.GRID_STRIDE_BLOCKS_PER_SM = gs0, bps0
        for on in (False, True, False, True):  # the chunked kernel, 1 or 4 per pass
            config.GPU_UNROLL_CHUNKS = on
            t = gpu_time(lambda: fa.adagrad_update(p, g, h))
            print(library_line(f"chunked, {K.UNROLL if on else 1} per pass", t, nbytes, tc,
                               ran(p, h)))
        config.GPU_UNROLL_CHUNKS = False
        model(dt, tc / nbytes)
        if dt == np.float32:
            for bps in (4, 8):
                t = gpu_time(lambda: unrolled4[sms * bps, 256](p, g, h, coefs[0], coefs[3]))
                print(f"  unrolled x4 tpb=256 blocks/SM={bps}: {t * 1e6:8.1f} us "
                      f"{100 * tc / t:5.1f}% of copy")
        del p, g, h, src, dst
    print(f"config: THREADS_PER_BLOCK={config.THREADS_PER_BLOCK} "
          f"GPU_CHUNK={config.GPU_CHUNK}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
