"""``python -m fastadagrad validate``: check the GPU kernels against the CPU kernels.

What a user runs on a GPU machine to trust the library. For every case it runs the
same update on the CPU (NumPy arrays) and on the GPU (device arrays), from identical
inputs, for ``--steps`` steps through the public API, then compares the parameters
and accumulators bit for bit (max difference in units in the last place, expected 0).
Cases: sizes with awkward tails up to 2^26 elements (2^31+17 with ``--large``),
float32 and float64, several formulas (the NumPy class, torch's FMA accumulation with
coupled weight decay and lr_decay, FMA weight decay, Keras' eps-inside + decoupled
weight decay, optax's lr-after + zero-where-h0, maximize + grad_scale), whole-model
flat buffers (one launch per step) and separate tensors with the non-finite check, and
embedding-row updates (``adagrad_update_rows``, full and rowwise accumulators, Zipf and
uniform lookups with duplicates, several formulas).

It also times the GPU step (CUDA events around back-to-back steps through the public
API, so Python overhead counts where it is not hidden) and a device-to-device copy
moving the same number of bytes, measured in the same run, and reports GB/s and the
fraction of the copy's bandwidth (the kernel reads p, g, h and writes p, h: 5 arrays).

Exit status: 0 all bit-identical; 1 a mismatch; 2 bad arguments; 3 no usable GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE, EXIT_NO_GPU = 0, 1, 2, 3

SIZES = [1, 17, 1000, (1 << 16) + 1, (1 << 20) + 3, (1 << 24) - 5, 1 << 26, (1 << 26) + 17]
LARGE = (1 << 31) + 17


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    rule: dict[str, Any] = field(default_factory=dict)  # Rule overrides of the preset's
    hyper: dict[str, Any] = field(default_factory=dict)
    h0: float = 0.0


CASES = [
    Case("numpy", "numpy", hyper=dict(lr=0.01, eps=1e-7)),
    Case("torch(fma,wd,decay)", "torch",
         hyper=dict(lr=0.01, eps=1e-10, lr_decay=0.01, weight_decay=0.01)),
    Case("fma-wd", "torch", rule=dict(fma_weight_decay=True),
         hyper=dict(lr=0.01, eps=1e-10, weight_decay=0.05), h0=0.1),
    Case("keras(eps-in,dwd)", "keras", hyper=dict(lr=0.001, eps=1e-7, weight_decay=0.004),
         h0=0.1),
    Case("optax(lr-after,h0)", "optax", hyper=dict(lr=0.01, eps=1e-7)),
    Case("maximize+scale", "numpy", hyper=dict(lr=0.01, eps=1e-7, maximize=True,
                                               grad_scale=1024.0)),
]


def _rule(case: Case) -> Any:
    from dataclasses import replace

    from .presets import get_preset

    return replace(get_preset(case.preset).rule, **case.rule)


# --- comparing bits --------------------------------------------------------------------

def ulp_diff(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """``(max ulp distance, number of elements whose bits differ)``; NaN == NaN."""
    worst, nbits = 0, 0
    ai = np.int32 if a.dtype == np.float32 else np.int64
    step = 1 << 24
    for s in range(0, a.size, step):  # in chunks: --large buffers are 8 GiB
        x, y = a[s:s + step], b[s:s + step]
        bx, by = x.view(ai), y.view(ai)
        both_nan = np.isnan(x) & np.isnan(y)
        diff = (bx != by) & ~both_nan
        k = int(np.count_nonzero(diff))
        if not k:
            continue
        nbits += k
        for u, v in zip(bx[diff].tolist()[:100000], by[diff].tolist()[:100000]):
            worst = max(worst, abs(_ordered(u, ai) - _ordered(v, ai)))
    return worst, nbits


def _ordered(bits: int, ai: Any) -> int:
    """Sign-magnitude float bits to an integer line where neighbours differ by 1."""
    width = 32 if ai is np.int32 else 64
    mag = bits & ((1 << (width - 1)) - 1)
    return -mag if bits < 0 else mag


# --- inputs ----------------------------------------------------------------------------

def make_grads(n: int, dtype: Any, k: int, seed: int, tiled: bool = False) -> list[np.ndarray]:
    """``k`` gradient arrays: log-uniform magnitudes over 8 decades, both signs, with
    exact zeros and subnormals (flush-to-zero would show) sprinkled in."""
    rng = np.random.default_rng(seed)
    m = min(n, 1 << 22) if tiled else n
    out = []
    tiny = np.finfo(dtype).tiny
    for _ in range(k):
        g = (rng.standard_normal(m) * 10.0 ** rng.uniform(-6, 2, m)).astype(dtype)
        sel = rng.random(m)
        g[sel < 0.01] = 0
        g[(sel >= 0.01) & (sel < 0.015)] *= tiny  # subnormal or zero
        out.append(np.resize(g, n) if tiled else g)
    return out


def make_params(n: int, dtype: Any, seed: int, tiled: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = min(n, 1 << 22) if tiled else n
    p = rng.standard_normal(m).astype(dtype)
    return np.resize(p, n) if tiled else p


# --- timing ----------------------------------------------------------------------------

def _time_gpu(fn: Any, nbytes: int, cuda: Any, budget_s: float = 0.05) -> float:
    """Seconds per call of ``fn`` (GPU time between events, after a warm-up)."""
    fn()
    cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    cuda.synchronize()
    once = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(200, max(3, budget_s / once)))
    start, end = cuda.event(), cuda.event()
    best = float("inf")
    for _ in range(3):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        best = min(best, cuda.event_elapsed_time(start, end) / 1e3 / reps)
    return best


def copy_seconds(nbytes: int, cuda: Any) -> float:
    """Seconds for a device-to-device copy of a ``nbytes / 2`` byte buffer (reads and
    writes ``nbytes`` in all), cuMemcpyDtoD through Numba."""
    half = max(1, nbytes // 2)
    src = cuda.device_array(half, np.uint8)
    dst = cuda.device_array(half, np.uint8)
    return _time_gpu(lambda: dst.copy_to_device(src), nbytes, cuda)


# --- the run ---------------------------------------------------------------------------

def run_array_case(case: Case, n: int, dtype: Any, steps: int, grads: list[np.ndarray],
                   p0: np.ndarray, cuda: Any, timing: bool, copy_cache: dict[int, float]
                   ) -> dict[str, Any]:
    import fastadagrad as fa

    rule = _rule(case)
    p = p0.copy()
    h = np.full(n, case.h0, dtype)
    dp, dh = cuda.to_device(p), cuda.to_device(h)
    dgs = [cuda.to_device(g) for g in grads]
    for s in range(1, steps + 1):
        g, dg = grads[(s - 1) % len(grads)], dgs[(s - 1) % len(dgs)]
        fa.adagrad_update(p, g, h, step=s, rule=rule, **case.hyper)
        fa.adagrad_update(dp, dg, dh, step=s, rule=rule, **case.hyper)
    cuda.synchronize()
    up, np_ = ulp_diff(p, dp.copy_to_host())
    uh, nh = ulp_diff(h, dh.copy_to_host())
    row: dict[str, Any] = dict(kind="array", case=case.name, dtype=np.dtype(dtype).name, n=n,
                               steps=steps, max_ulp_param=up, max_ulp_state=uh,
                               bits_differ=np_ + nh, ok=(np_ + nh) == 0)
    if timing:
        _add_timing(row, lambda: fa.adagrad_update(dp, dgs[0], dh, step=steps, rule=rule,
                                                   **case.hyper),
                    5 * n * np.dtype(dtype).itemsize, cuda, copy_cache)
    return row


def _add_timing(row: dict[str, Any], step: Any, nbytes: int, cuda: Any,
                copy_cache: dict[int, float]) -> None:
    """Time ``step`` and a device-to-device copy of ``nbytes`` (once per size) into ``row``."""
    t = _time_gpu(step, nbytes, cuda)
    if nbytes not in copy_cache:
        copy_cache[nbytes] = copy_seconds(nbytes, cuda)
    tc = copy_cache[nbytes]
    row.update(gpu_us=t * 1e6, gbps=nbytes / t / 1e9, copy_gbps=nbytes / tc / 1e9,
               frac_copy=tc / t)


def model_layout(seed: int, max_dim: int = 700) -> list[tuple[int, ...]]:
    """A ~100-tensor model of awkward shapes (~6M parameters with max_dim=700)."""
    rng = np.random.default_rng(seed)
    shapes: list[tuple[int, ...]] = []
    while len(shapes) < 100:
        a, b = (int(x) for x in rng.integers(1, max_dim, 2))
        shapes += [(a, b), (b,)]
    shapes.append((3, 5, 7, 11))
    return shapes


def run_flat_case(case: Case, dtype: Any, steps: int, cuda: Any, seed: int, timing: bool,
                  copy_cache: dict[int, float], max_dim: int = 700) -> dict[str, Any]:
    """A whole model in one FlatBuffer: AdaGrad on the host vs on the device."""
    import fastadagrad as fa

    rng = np.random.default_rng(seed)
    shapes = model_layout(seed, max_dim)
    params = fa.FlatBuffer({f"t{i}": rng.standard_normal(s).astype(dtype)
                            for i, s in enumerate(shapes)})
    n = params.data.size
    gl = make_grads(n, dtype, 3, seed + 1)
    dparams = params.to_device()
    hyper = {k: v for k, v in case.hyper.items() if k != "grad_scale"}
    opt_c = fa.AdaGrad(rule=_rule(case), initial_accumulator_value=case.h0, **hyper)
    opt_g = fa.AdaGrad(rule=_rule(case), initial_accumulator_value=case.h0, **hyper)
    gbufs = []
    for g in gl:
        gb = params.zeros_like()
        gb.data[:] = g
        gbufs.append((gb, gb.to_device()))
    scale = case.hyper.get("grad_scale")
    for s in range(steps):
        gb, dgb = gbufs[s % len(gbufs)]
        opt_c.update(params, gb, grad_scale=scale)
        opt_g.update(dparams, dgb, grad_scale=scale)
    cuda.synchronize()
    up, np_ = ulp_diff(params.data, dparams.data.copy_to_host())
    hc = np.concatenate([np.ravel(opt_c.h[k]) for k in params])
    hg = np.concatenate([np.ravel(opt_g.h[k].copy_to_host()) for k in params])
    uh, nh = ulp_diff(hc, hg)
    row: dict[str, Any] = dict(kind=f"flat model ({len(shapes)} tensors)", case=case.name,
                               dtype=np.dtype(dtype).name, n=n, steps=steps,
                               max_ulp_param=up, max_ulp_state=uh, bits_differ=np_ + nh,
                               ok=(np_ + nh) == 0)
    if timing:
        _add_timing(row, lambda: opt_g.update(dparams, gbufs[0][1], grad_scale=scale),
                    5 * n * np.dtype(dtype).itemsize, cuda, copy_cache)
    return row


def run_separate_case(dtype: Any, steps: int, cuda: Any, seed: int, max_dim: int = 700
                      ) -> dict[str, Any]:
    """Separate device arrays (one launch per tensor), nonfinite='skip', with a NaN
    gradient on one step: both devices must skip that step and stay identical."""
    import fastadagrad as fa

    rng = np.random.default_rng(seed)
    shapes = model_layout(seed, max_dim)[:40]
    params = {f"t{i}": rng.standard_normal(s).astype(dtype) for i, s in enumerate(shapes)}
    dparams = {k: cuda.to_device(v) for k, v in params.items()}
    opt_c = fa.AdaGrad.from_preset("torch", weight_decay=0.01, nonfinite="skip")
    opt_g = fa.AdaGrad.from_preset("torch", weight_decay=0.01, nonfinite="skip")
    applied = []
    for s in range(steps):
        grads = {k: (rng.standard_normal(v.shape) * 0.1).astype(dtype)
                 for k, v in params.items()}
        if s == steps // 2:
            grads["t7"].reshape(-1)[-1] = np.nan
        a = opt_c.update(params, grads)
        b = opt_g.update(dparams, {k: cuda.to_device(v) for k, v in grads.items()})
        applied.append((a, b))
    cuda.synchronize()
    up = uh = nb = 0
    for k in params:
        u, c = ulp_diff(params[k], dparams[k].copy_to_host())
        hc = opt_c.h[k]
        hg = opt_g.h[k]
        v, d = ulp_diff(hc, hg.copy_to_host() if hasattr(hg, "copy_to_host") else
                        np.asarray(hg))
        up, uh, nb = max(up, u), max(uh, v), nb + c + d
    same_skips = all(a == b for a, b in applied) and not applied[steps // 2][0]
    n = sum(int(np.prod(s)) for s in shapes)
    return dict(kind=f"separate ({len(shapes)} tensors, skip)", case="torch(wd)",
                dtype=np.dtype(dtype).name, n=n, steps=steps, max_ulp_param=up,
                max_ulp_state=uh, bits_differ=nb, skipped_alike=same_skips,
                ok=nb == 0 and same_skips)


#: Row-update cases (embedding tables): (name, preset, Rule overrides, hyperparameters,
#: rowwise, rows, columns, lookups, distribution). Zipf lookups repeat the first rows
#: thousands of times: the duplicate sums must match too.
ROW_CASES = [
    ("numpy", "numpy", {}, dict(lr=0.01, eps=1e-7), False, 100_003, 64, 65_536, "zipf"),
    ("fbgemm(l2)", "numpy", dict(fma_weight_decay=True),
     dict(lr=0.01, eps=1e-7, weight_decay=0.01), True, 100_003, 64, 65_536, "zipf"),
    ("torch(fma,wd,decay)", "torch", {}, dict(lr=0.01, eps=1e-10, lr_decay=0.01,
                                             weight_decay=0.01), False, 1_000, 17, 5_000,
     "uniform"),
    ("keras(eps-in,dwd)", "keras", {}, dict(lr=0.001, eps=1e-7, weight_decay=0.004), True,
     1_000, 17, 5_000, "uniform"),
    ("optax+maximize", "optax", {}, dict(lr=0.01, eps=1e-7, maximize=True), False, 1_000,
     1, 3_000, "zipf"),
]


def run_rows_case(spec: tuple, dtype: Any, steps: int, cuda: Any, seed: int,
                  timing: bool = True) -> dict[str, Any]:
    """``adagrad_update_rows`` on host arrays vs device arrays, same inputs, ``steps`` steps."""
    from dataclasses import replace

    import fastadagrad as fa

    from .presets import get_preset

    name, preset, rule_kw, hyper, rowwise, r, d, k, dist = spec
    rule = replace(get_preset(preset).rule, **rule_kw)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal((r, d)).astype(dtype)
    h = np.full((r,) if rowwise else (r, d), 0.1 if preset == "keras" else 0.0, dtype)
    dp, dh = cuda.to_device(p), cuda.to_device(h)
    batches = []
    for _ in range(3):
        idx = (rng.zipf(1.05, k) % r) if dist == "zipf" else rng.integers(0, r, k)
        g = make_grads(k * d, dtype, 1, int(rng.integers(1 << 30)))[0].reshape(k, d)
        batches.append((idx, g, cuda.to_device(g)))
    for s in range(1, steps + 1):
        idx, g, dg = batches[(s - 1) % len(batches)]
        fa.adagrad_update_rows(p, h, idx, g, step=s, rowwise=rowwise, rule=rule, **hyper)
        fa.adagrad_update_rows(dp, dh, idx, dg, step=s, rowwise=rowwise, rule=rule, **hyper)
    cuda.synchronize()
    up, np_ = ulp_diff(p.reshape(-1), dp.copy_to_host().reshape(-1))
    uh, nh = ulp_diff(h.reshape(-1), dh.copy_to_host().reshape(-1))
    row: dict[str, Any] = dict(
        kind=f"rows {'rowwise' if rowwise else 'full'} {r}x{d} {dist} K={k}", case=name,
        dtype=np.dtype(dtype).name, n=r * d, steps=steps, max_ulp_param=up,
        max_ulp_state=uh, bits_differ=np_ + nh, ok=(np_ + nh) == 0)
    if timing:  # host grouping, transfers and the launch, per step (events around it)
        idx, _, dg = batches[0]
        row["gpu_us_rows"] = 1e6 * _time_gpu(
            lambda: fa.adagrad_update_rows(dp, dh, idx, dg, step=steps, rowwise=rowwise,
                                           rule=rule, **hyper), 0, cuda)
    return row


def environment(cuda: Any) -> dict[str, Any]:
    import numba

    env: dict[str, Any] = dict(python=platform.python_version(), numpy=np.__version__,
                               numba=numba.__version__, machine=platform.machine())
    try:
        import numba_cuda

        env["numba_cuda"] = numba_cuda.__version__
    except Exception:
        pass
    try:
        dev = cuda.get_current_device()
        name = dev.name
        env["gpu"] = name.decode() if isinstance(name, bytes) else str(name)
        env["compute_capability"] = list(dev.compute_capability)
        env["sms"] = int(dev.MULTIPROCESSOR_COUNT)
    except Exception as exc:
        env["gpu"] = f"unknown ({exc})"
    from . import config

    env["threads_per_block"] = config.THREADS_PER_BLOCK
    env["blocks_per_sm"] = config.BLOCKS_PER_SM
    env["gpu_chunk"] = config.GPU_CHUNK
    env["gpu_grid_stride"] = config.GPU_GRID_STRIDE  # the kernel variants in use
    env["gpu_unroll_chunks"] = config.GPU_UNROLL_CHUNKS
    try:
        import cuda.core

        env["cuda_core"] = cuda.core.__version__
    except Exception as exc:
        env["cuda_core"] = f"not importable ({exc})"
    return env


def launch_path_ran() -> list[str]:
    """Which launch path ran (``[path, reason]``), asked after the cases launched."""
    from . import cuda_launch

    path, why = cuda_launch.launch_path()
    if path == "cuda.core":
        why = f"{why}; {cuda_launch.LOADED_AS}"
    return [path, why]


def _fmt(row: dict[str, Any]) -> str:
    bw = (f"{row['gpu_us']:10.1f} {row['gbps']:8.1f} {row['copy_gbps']:8.1f} "
          f"{100 * row['frac_copy']:5.1f}%") if "gbps" in row else " " * 40
    return (f"{row['kind'][:28]:28} {row['case'][:20]:20} {row['dtype']:7} {row['n']:>11} "
            f"{row['steps']:>5} {row['max_ulp_param']:>5} {row['max_ulp_state']:>5} "
            f"{bw} {'ok' if row['ok'] else 'MISMATCH'}")


HEADER = (f"{'kind':28} {'case':20} {'dtype':7} {'elements':>11} {'steps':>5} "
          f"{'ulp p':>5} {'ulp h':>5} {'GPU us':>10} {'GB/s':>8} {'copy':>8} {'%copy':>6}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastadagrad validate",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON")
    ap.add_argument("--large", action="store_true",
                    help=f"also run {LARGE} float32 elements (about 26 GB on the GPU)")
    ap.add_argument("--steps", type=int, default=20, help="steps per case (default 20)")
    ap.add_argument("--max-size", type=int, default=SIZES[-1],
                    help="skip array sizes above this (default: all)")
    ap.add_argument("--quick", action="store_true", help="numpy and torch cases only")
    try:
        args = ap.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) and EXIT_USAGE
    if args.steps < 1:
        print("--steps must be >= 1", file=sys.stderr)
        return EXIT_USAGE

    from . import cuda as fcuda

    reason = fcuda.unavailable_reason()
    if reason is None and fcuda.simulator():
        reason = "the CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); it does not model GPU rounding"
    if reason is not None:
        print(f"fastadagrad validate: no usable GPU, nothing was checked: {reason}",
              file=sys.stderr)
        return EXIT_NO_GPU
    cuda = fcuda.require_gpu()

    env = environment(cuda)
    print(f"fastadagrad validate: {env.get('gpu')} (cc {env.get('compute_capability')}), "
          f"numba {env['numba']}, numba-cuda {env.get('numba_cuda')}, {args.steps} steps per case")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    copy_cache: dict[int, float] = {}
    cases = CASES[:2] if args.quick else CASES
    t_start = time.perf_counter()

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(_fmt(row), flush=True)

    sizes = [n for n in SIZES if n <= args.max_size]
    for dtype in (np.float32, np.float64):
        for n in sizes:
            grads = make_grads(n, dtype, 3, seed=n)
            p0 = make_params(n, dtype, seed=n + 1)
            for case in cases:
                timing = case is CASES[0] or n >= (1 << 24)
                emit(run_array_case(case, n, dtype, args.steps, grads, p0, cuda,
                                    timing=timing, copy_cache=copy_cache))
            del grads, p0
        for case in cases:
            emit(run_flat_case(case, dtype, args.steps, cuda, seed=7, timing=True,
                               copy_cache=copy_cache))
        emit(run_separate_case(dtype, min(args.steps, 10), cuda, seed=11))
        for i, spec in enumerate(ROW_CASES[:2] if args.quick else ROW_CASES):
            emit(run_rows_case(spec, dtype, args.steps, cuda, seed=21 + i))
    if args.large:
        n = LARGE
        grads = make_grads(n, np.float32, 1, seed=5, tiled=True)
        p0 = make_params(n, np.float32, seed=6, tiled=True)
        emit(run_array_case(CASES[0], n, np.float32, 2, grads, p0, cuda, timing=True,
                            copy_cache=copy_cache))
        del grads, p0

    ok = all(r["ok"] for r in rows)
    env["launch_path"] = launch_path_ran()
    print(f"launch path: {env['launch_path'][0]} ({env['launch_path'][1]})")
    big32 = [r for r in rows if r["kind"] == "array" and r["dtype"] == "float32"
             and r["n"] >= (1 << 26) and "frac_copy" in r]
    summary = dict(ok=ok, cases=len(rows), mismatches=sum(not r["ok"] for r in rows),
                   min_frac_copy_f32_ge_2_26=min((r["frac_copy"] for r in big32),
                                                 default=None),
                   seconds=time.perf_counter() - t_start)
    print(f"\n{len(rows)} cases, {summary['mismatches']} mismatches; "
          + (f"float32 >= 2^26: at least {100 * summary['min_frac_copy_f32_ge_2_26']:.1f}% "
             "of device-to-device copy bandwidth" if big32 else ""))
    print("all bit-identical to the CPU" if ok else "MISMATCH: the GPU and CPU results differ")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(environment=env, command=["python", "-m", "fastadagrad", "validate",
                                                      *(argv or sys.argv[2:])],
                           summary=summary, rows=rows), f, indent=1)
    return EXIT_OK if ok else EXIT_MISMATCH
