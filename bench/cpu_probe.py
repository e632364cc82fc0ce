"""Probe a CPU: fastadagrad's kernels against the plain fused loop and the roofline kernel.

Standalone (numpy and numba only; no pytest, no torch), run from a repository checkout::

    python bench/cpu_probe.py --json bench/results/cpu-probe-<cpu>.json

It measures, with every candidate of a case interleaved in shuffled order within each
block and the median of the block medians reported:

1. ``flat``: fastadagrad's parallel kernel (``cpu.kernels(0).flat_parallel``, the
   NumPy-class formula), the plain fused loop (``bench/plain.py``, same math and bits)
   and the roofline kernel (``bench/roofline.py``, same memory traffic, trivial math),
   float32 and float64, every size 2^10..2^26, all Numba threads;
2. ``serial``: fastadagrad's serial kernel (``checked_span``, what ``adagrad_update``
   runs below the threshold) against the plain serial loop, 2^10..2^18; also the
   unchecked ``span`` loop with NumPy-scalar coefficients;
3. ``threshold``: around the serial/parallel threshold (2^12..2^20, float32 and
   float64): the public ``adagrad_update`` as shipped (default dispatch), the same call
   forced serial and forced parallel (``config.PARALLEL_THRESHOLD`` patched), and the
   bare serial and parallel kernels, so that a threshold can be chosen per machine;
4. ``roofline_2_24``: 2^24 float32, kernel vs plain vs roofline, more rounds;
5. ``options``: every other formula variant of ``bench/plain.py``'s ``OPTION_SETS``
   (torch with every option, Keras with weight decay, optax, loss scaling): that flag
   set's kernels against its plain loop (same bits), float32 and float64, the parallel
   ones at 2^10, 2^16, 2^20 and 2^24, the serial ones at 2^10 and 2^14;
6. ``bound``: at 2^16 and 2^20 (in cache on most CPUs), the parallel kernel and the
   plain loop against the plain loop without its square root, without its division
   (``bench/roofline.py``) and the roofline kernel: what the time is made of where
   memory does not bound it.

All arrays start on a page boundary (``bench/memory.py``).

``--only options`` (repeatable: ``--only flat --only serial``...) runs some sections.

It records the CPU model, vector width, CPUs, Numba's threads and threading layer, the
last-level cache (sysfs) and the load average at the start and the end. Kernels are
compiled (or loaded from Numba's cache) before anything is timed. Takes about 1-2
minutes on 16 cores, 2-3 on 2 (the "options" section alone ~20 s on 2). Other
processes on the cores disturb parallel kernels badly (one busy core stalls every
barrier): check the load averages in the output.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numba  # noqa: E402
import numpy as np  # noqa: E402

import fastadagrad  # noqa: E402
from bench import machine  # noqa: E402
from bench.memory import page_aligned  # noqa: E402
from bench.plain import OPTION_SETS, plain_parallel, plain_serial  # noqa: E402
from bench.roofline import roofline, without_division, without_sqrt  # noqa: E402
from fastadagrad import _hyper, config, cpu  # noqa: E402

LR, EPS = 0.01, 1e-7


#: A block stops after this long even if it has not made its ``reps`` calls (at least 5):
#: under load a parallel call can take 8-20 ms instead of microseconds, and the probe must
#: still finish in minutes.
BLOCK_BUDGET_S = 0.05


def time_block(f: Callable[[], Any], reps: int) -> float:
    """Median seconds of up to ``reps`` back-to-back calls of ``f``."""
    ts = []
    clock = time.perf_counter
    end = clock() + BLOCK_BUDGET_S
    for i in range(reps):
        t0 = clock()
        f()
        t1 = clock()
        ts.append(t1 - t0)
        if t1 > end and i >= 4:
            break
    return statistics.median(ts)


def interleaved(cands: dict[str, Callable[[], Any]], reps: int, blocks: int,
                rng: random.Random, best: dict[str, float] | None = None
                ) -> dict[str, float]:
    """Median over ``blocks`` of each candidate's block median; order shuffled per block.

    ``best``, if given, receives each candidate's fastest block median: when the load
    average says other processes shared the cores, it shows what an undisturbed block
    measured (a disturbed parallel call takes milliseconds, not microseconds).
    """
    for f in cands.values():  # warm: compile or load, fault pages in
        f()
        f()
    res: dict[str, list[float]] = {k: [] for k in cands}
    names = list(cands)
    for _ in range(blocks):
        rng.shuffle(names)
        for k in names:
            res[k].append(time_block(cands[k], reps))
    if best is not None:
        best.update({k: min(v) for k, v in res.items()})
    return {k: statistics.median(v) for k, v in res.items()}


QUICK = False


def reps_for(n: int) -> tuple[int, int]:
    """(calls per block, blocks): ~2^24 elements per block, at least 5 calls; 31 blocks
    up to 2^16 elements, where a call takes microseconds and one disturbed block moves
    a median by 5% (a block costs ~3 ms a candidate there; with 15 blocks the worst of
    the 14 parallel cases still came out at 1.05-1.06 in three runs of two identical
    loops), 9 above, 5 from 2^24 (with 5 and 3, one stretch of another tenant's memory
    traffic moved the medians of 2^23 and 2^26 by 4-7% while their fastest blocks
    agreed within 1-5%)."""
    if QUICK:
        return 5, 2
    blocks = 31 if n <= 1 << 16 else 5 if n >= 1 << 24 else 9
    return max(5, min(1000, (1 << 24) // n)), blocks


def arrays(n: int, dtype: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """p, g and h, each starting on a page boundary (as the benchmark suite's flat
    cases): where malloc puts arrays below its mmap threshold decides how the three
    streams alias in the low address bits, which moved kernel ÷ plain loop for one
    serial case (optax's formula, f32 2^14) between 1.03 and 1.20 from one process to
    the next (2-core AMD EPYC, four processes); page-aligned, 0.95 in each of three."""
    rng = np.random.default_rng(n)
    p = page_aligned((rng.random(n, dtype=np.float32) - 0.5).astype(dtype))
    g = page_aligned(((rng.random(n, dtype=np.float32) - 0.5) * 0.1).astype(dtype))
    return p, g, page_aligned(n, dtype)


def coefficients(dtype: Any, floats: bool = True) -> tuple[Any, ...]:
    """The default formula's kernel coefficients (flags 0, a compile-time constant).

    As Python floats by default: the kernels round them to the array dtype inside (the
    same bits), and the dispatcher unboxes a float in ~5 ns against ~50 ns for a NumPy
    scalar; ``floats=False`` gives the NumPy scalars ``Hyper.coefficients`` returns.
    """
    c = _hyper.Hyper.make(lr=LR, eps=EPS).coefficients(np.dtype(dtype))
    return tuple(float(x) for x in c[:-1]) if floats else tuple(c[:-1])


def us(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v * 1e6, 3) for k, v in d.items()}


def kernel_calls(p: np.ndarray, g: np.ndarray, h: np.ndarray
                 ) -> dict[str, Callable[[], Any]]:
    """Zero-argument calls of every candidate on ``p, g, h`` (the AdaGrad ones share
    the arrays); the roofline kernel and the loops without a square root or a division,
    whose results are not AdaGrad's (``h`` goes negative: NaN in the next update), work
    on a copy of their own, at the same page offsets."""
    k = cpu.kernels(0)
    q = (page_aligned(p), page_aligned(g), page_aligned(h.size, h.dtype))
    t = p.dtype.type
    lr, eps = t(LR), t(EPS)
    a, b, ei, eo, wd, lw, gs = coefficients(p.dtype)
    a_, b_, ei_, eo_, wd_, lw_, gs_ = coefficients(p.dtype, floats=False)
    table = np.array([a, b, ei, eo, wd, lw, gs], np.float64)
    lr_ = lw  # the learning rate, as the checked kernel takes it (a float)
    never = np.iinfo(np.int64).max
    shipped = config.PARALLEL_THRESHOLD

    def public(threshold: int) -> Callable[[], Any]:
        def f() -> Any:
            config.PARALLEL_THRESHOLD = threshold
            try:
                return fastadagrad.adagrad_update(p, g, h, lr=LR, eps=EPS)
            finally:
                config.PARALLEL_THRESHOLD = shipped
        return f

    return {
        "fastadagrad kernel": lambda: k.flat_parallel(p, g, h, table),
        "plain numba": lambda: plain_parallel(p, g, h, lr, eps),
        "roofline": lambda: roofline(*q),
        "plain numba without sqrt": lambda: without_sqrt(*q, lr, eps),
        "plain numba without division": lambda: without_division(*q, lr, eps),
        # the serial kernel adagrad_update runs (checked_span: the compiled checks, then
        # the loop), here with the parallel hand-off switched off
        "fastadagrad serial kernel": lambda: k.checked_span(p, g, h, table, lr_, never),
        "fastadagrad serial kernel, NumPy-scalar coefficients":
            lambda: k.span(p, g, h, a_, b_, ei_, eo_, wd_, lw_, gs_),
        "plain numba serial": lambda: plain_serial(p, g, h, lr, eps),
        "adagrad_update (default dispatch)": public(shipped),
        "adagrad_update forced serial": public(sys.maxsize),
        "adagrad_update forced parallel": public(0),
    }


FLAT = ("fastadagrad kernel", "plain numba", "roofline")
BOUND = ("fastadagrad kernel", "plain numba", "plain numba without sqrt",
         "plain numba without division", "roofline")
SERIAL = ("fastadagrad serial kernel", "fastadagrad serial kernel, NumPy-scalar coefficients",
          "plain numba serial")
THRESHOLD = ("adagrad_update (default dispatch)", "adagrad_update forced serial",
             "adagrad_update forced parallel", "fastadagrad serial kernel",
             "fastadagrad kernel")


def measure(n: int, dtype: str, names: tuple[str, ...], rng: random.Random,
            reps_blocks: tuple[int, int] | None = None) -> dict[str, Any]:
    p, g, h = arrays(n, dtype)
    calls = kernel_calls(p, g, h)
    reps, blocks = reps_blocks or reps_for(n)
    best: dict[str, float] = {}
    m = interleaved({k: calls[k] for k in names}, reps, blocks, rng, best)
    return {"dtype": dtype, "n": n, "reps": reps, "blocks": blocks, "median_us": us(m),
            "fastest_block_us": us(best)}


def flat_section(exps: range, dtypes: tuple[str, ...], rng: random.Random,
                 log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for dt in dtypes:
        for e in exps:
            row = measure(1 << e, dt, FLAT, rng)
            m = row["median_us"]
            row["kernel/plain"] = m["fastadagrad kernel"] / m["plain numba"]
            row["kernel/roofline"] = m["fastadagrad kernel"] / m["roofline"]
            row["plain/roofline"] = m["plain numba"] / m["roofline"]
            out.append(row)
            log(f"flat {dt} 2^{e}: kernel {m['fastadagrad kernel']:,.1f} us, plain "
                f"{m['plain numba']:,.1f} us, roofline {m['roofline']:,.1f} us"
                f" | kernel/plain {row['kernel/plain']:.3f}")
    return out


def serial_section(exps: range, dtypes: tuple[str, ...], rng: random.Random,
                   log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for dt in dtypes:
        for e in exps:
            row = measure(1 << e, dt, SERIAL, rng)
            m = row["median_us"]
            row["kernel/plain"] = m[SERIAL[0]] / m[SERIAL[2]]
            row["kernel with NumPy-scalar coefficients/plain"] = m[SERIAL[1]] / m[SERIAL[2]]
            out.append(row)
            log(f"serial {dt} 2^{e}: kernel {m[SERIAL[0]]:,.2f} us (NumPy-scalar "
                f"coefficients {m[SERIAL[1]]:,.2f} us), plain {m[SERIAL[2]]:,.2f} us | "
                f"kernel/plain {row['kernel/plain']:.3f}")
    return out


def bound_section(exps: tuple[int, ...], dtypes: tuple[str, ...], rng: random.Random,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Where the arrays fit in a cache, what the time is made of: the plain loop with
    its square root or its division taken out, against the roofline kernel."""
    out = []
    for dt in dtypes:
        for e in exps:
            row = measure(1 << e, dt, BOUND, rng)
            m = row["median_us"]
            row["per_roofline"] = {k: m[k] / m["roofline"] for k in BOUND}
            out.append(row)
            log(f"bound {dt} 2^{e}: " + ", ".join(
                f"{k} {m[k]:,.1f} us" for k in BOUND))
    return out


def threshold_section(sizes: list[int], dtypes: tuple[str, ...], rng: random.Random,
                      log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    for dt in dtypes:
        for n in sizes:
            row = measure(n, dt, THRESHOLD, rng)
            m = row["median_us"]
            row["parallel/serial kernel"] = m["fastadagrad kernel"] / m[SERIAL[0]]
            out.append(row)
            log(f"threshold {dt} n={n:,}: serial kernel {m[SERIAL[0]]:,.2f} us, parallel "
                f"kernel {m['fastadagrad kernel']:,.2f} us; adagrad_update default "
                f"{m[THRESHOLD[0]]:,.2f}, forced serial {m[THRESHOLD[1]]:,.2f}, forced "
                f"parallel {m[THRESHOLD[2]]:,.2f} us")
    return out


#: The "options" section's sizes (exponents of 2): parallel kernel vs plain parallel loop,
#: serial kernel vs plain serial loop.
OPTIONS_PARALLEL = (10, 16, 20, 24)
OPTIONS_SERIAL = (10, 14)
OPTION_PAIR = ("fastadagrad kernel", "plain numba")
#: Blocks per case in the "options" section (unless QUICK): its ratios sit within a few
#: percent of 1, and with the other sections' 5 (3 at 2^24) its 48 cases took 7.5 s on
#: the 2-core EPYC with 2^24 f32 ratios between 0.95 and 1.03 from set to set.
OPTIONS_BLOCKS = 15


def option_calls(name: str, p: np.ndarray, g: np.ndarray, h: np.ndarray, serial: bool
                 ) -> dict[str, Callable[[], Any]]:
    """The kernel of option set ``name``'s flag set (``flat_parallel``, or
    ``checked_span`` with the parallel hand-off off) and the set's plain loop."""
    opt = OPTION_SETS[name]
    c = opt.hyper().coefficients(p.dtype, opt.options.get("step", 1))
    k = cpu.kernels(c[7])
    table = np.array([float(x) for x in c[:7]], np.float64)
    s = opt.scalars(p.dtype)
    if serial:
        never = np.iinfo(np.int64).max
        plain = opt.serial
        lr = float(table[5])  # the learning rate, as the checked kernel takes it
        return {OPTION_PAIR[0]: lambda: k.checked_span(p, g, h, table, lr, never),
                OPTION_PAIR[1]: lambda: plain(p, g, h, *s)}
    par = opt.parallel
    return {OPTION_PAIR[0]: lambda: k.flat_parallel(p, g, h, table),
            OPTION_PAIR[1]: lambda: par(p, g, h, *s)}


def options_section(top: int, dtypes: tuple[str, ...], rng: random.Random,
                    log: Callable[[str], None]) -> list[dict[str, Any]]:
    out = []
    cases = [(m, e) for m, exps in (("parallel", OPTIONS_PARALLEL),
                                    ("serial", OPTIONS_SERIAL)) for e in exps if e <= top]
    for dt in dtypes:
        for mode, e in cases:
            for name in OPTION_SETS:
                n = 1 << e
                p, g, h = arrays(n, dt)
                calls = option_calls(name, p, g, h, mode == "serial")
                reps, blocks = reps_for(n)
                blocks = blocks if QUICK else OPTIONS_BLOCKS
                best: dict[str, float] = {}
                m = us(interleaved(calls, reps, blocks, rng, best))
                row = {"option_set": name, "mode": mode, "dtype": dt, "n": n, "reps": reps,
                       "blocks": blocks, "median_us": m, "fastest_block_us": us(best),
                       "kernel/plain": m[OPTION_PAIR[0]] / m[OPTION_PAIR[1]]}
                out.append(row)
                log(f"options {name!r} {mode} {dt} 2^{e}: kernel {m[OPTION_PAIR[0]]:,.2f} us, "
                    f"plain {m[OPTION_PAIR[1]]:,.2f} us | kernel/plain "
                    f"{row['kernel/plain']:.3f}")
    return out


def suggest_threshold(rows: list[dict[str, Any]], dtype: str) -> int | None:
    """Smallest measured size from which the public call forced parallel beats forced
    serial at that size and every larger one (None if parallel never wins)."""
    pts = sorted((r["n"], r["median_us"]["adagrad_update forced parallel"]
                  < r["median_us"]["adagrad_update forced serial"])
                 for r in rows if r["dtype"] == dtype)
    best = None
    for n, par_wins in reversed(pts):
        if not par_wins:
            break
        best = n
    return best


def _size(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"


def markdown(r: dict[str, Any]) -> str:
    """The probe's JSON as markdown tables (written next to it): nothing typed by hand."""
    m = r["machine"]
    la, lb = r["loadavg_start"], r["loadavg_end"]
    out = [f"# CPU probe: {m['cpu_model']}", "",
           f"{m['cpu_model']}, {m['vector_isa']}, {m['usable_cpus']} usable CPUs "
           f"({m['os_cpu_count']} online), last-level cache {machine.fmt_llc(m['llc_bytes'])}; "
           f"numba {r['numba_threads']} threads ({r.get('numba_threading_layer', '?')}); "
           f"{', '.join(f'{k} {v}' for k, v in r['versions'].items())}. Started "
           f"{r['started_utc']}, {r['duration_s']} s. 1-minute load average {la[0]:.2f} at "
           f"the start, {lb[0]:.2f} at the end: above ~0.5 on few cores, other processes "
           "disturbed the parallel kernels (a disturbed call takes milliseconds), so compare "
           "the fastest blocks too. Medians of interleaved blocks "
           "(`python bench/cpu_probe.py`)."]
    if "flat" in r:
        out += ["", "## Parallel kernel vs the plain fused loop vs the roofline kernel", "",
                "| dtype | n | kernel | plain numba | roofline | kernel ÷ plain | kernel ÷ "
                "roofline | fastest blocks: kernel ÷ plain |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r.get("flat", []):
        t, b = x["median_us"], x["fastest_block_us"]
        out.append(f"| {x['dtype']} | {_size(x['n'])} | {t['fastadagrad kernel']:,.1f} µs | "
                   f"{t['plain numba']:,.1f} µs | {t['roofline']:,.1f} µs | "
                   f"{x['kernel/plain']:.3f} | {x['kernel/roofline']:.3f} | "
                   f"{b['fastadagrad kernel'] / b['plain numba']:.3f} |")
    if "serial" in r:
        out += ["", "## Serial kernel vs the plain serial loop", "",
                "| dtype | n | kernel | kernel, NumPy-scalar coefficients | plain numba serial | "
                "kernel ÷ plain | NumPy-scalar kernel ÷ plain |",
                "|---|---|---:|---:|---:|---:|---:|"]
    for x in r.get("serial", []):
        t = x["median_us"]
        out.append(f"| {x['dtype']} | {_size(x['n'])} | {t[SERIAL[0]]:,.2f} µs | "
                   f"{t[SERIAL[1]]:,.2f} µs | {t[SERIAL[2]]:,.2f} µs | {x['kernel/plain']:.3f} | "
                   f"{x['kernel with NumPy-scalar coefficients/plain']:.3f} |")
    if "threshold" in r:
        out += ["", "## Serial/parallel threshold (shipped: "
                f"{r['parallel_threshold_shipped']:,})", "",
                "| dtype | n | serial kernel | parallel kernel | adagrad_update default | "
                "forced serial | forced parallel |", "|---|---|---:|---:|---:|---:|---:|"]
        for x in r["threshold"]:
            t = x["median_us"]
            out.append(f"| {x['dtype']} | {x['n']:,} | {t[THRESHOLD[3]]:,.2f} µs | "
                       f"{t[THRESHOLD[4]]:,.2f} µs | {t[THRESHOLD[0]]:,.2f} µs | "
                       f"{t[THRESHOLD[1]]:,.2f} µs | {t[THRESHOLD[2]]:,.2f} µs |")
        sug = ", ".join(f"{k}: {'never' if v is None else f'{v:,}'}"
                        for k, v in r["threshold_suggested"].items())
        out += ["", f"Smallest size from which the forced-parallel call beats the "
                f"forced-serial one at every larger measured size: {sug}."]
    if "roofline_2_24" in r:
        x = r["roofline_2_24"]
        out += ["", f"2^24 float32, {r['numba_threads']} threads, 15 calls x 5 blocks: kernel "
                f"÷ roofline {x['kernel/roofline']:.3f}, plain ÷ roofline "
                f"{x['plain/roofline']:.3f}."]
    if r.get("bound"):
        out += ["", "## What bounds the update in cache: the plain loop without its square "
                "root or its division", "",
                "Time ÷ the roofline kernel's (same arrays, same reads and writes). Where "
                "the loop with both operations is well above the loop with either one "
                "alone, the square root and the division share the CPU's divider and its "
                "throughput sets the time, not memory.", "",
                "| dtype | n | " + " | ".join(BOUND) + " |",
                "|---|---|" + "---:|" * len(BOUND)]
        for x in r["bound"]:
            t = x["median_us"]
            out.append(f"| {x['dtype']} | {_size(x['n'])} | " + " | ".join(
                f"{t[k]:,.1f} µs ({x['per_roofline'][k]:.2f})" for k in BOUND) + " |")
    if r.get("options"):
        k, p = OPTION_PAIR
        out += ["", "## Every option set: kernel vs the plain loop with the same bits", "",
                "Each set's flag-set kernel (`flat_parallel`; serial: `checked_span`) against "
                "its plain loop in `bench/plain.py` (`OPTION_SETS`), same arrays.", "",
                "| option set | mode | dtype | n | kernel | plain numba | kernel ÷ plain | "
                "fastest blocks: kernel ÷ plain |", "|---|---|---|---|---:|---:|---:|---:|"]
        for x in r["options"]:
            t, b = x["median_us"], x["fastest_block_us"]
            out.append(f"| {x['option_set']} | {x['mode']} | {x['dtype']} | {_size(x['n'])} | "
                       f"{t[k]:,.2f} µs | {t[p]:,.2f} µs | {x['kernel/plain']:.3f} | "
                       f"{b[k] / b[p]:.3f} |")
        worst = max(r["options"], key=lambda x: x["kernel/plain"])
        out += ["", f"Worst kernel ÷ plain: {worst['kernel/plain']:.3f} "
                f"({worst['option_set']}, {worst['mode']}, {worst['dtype']} "
                f"{_size(worst['n'])})."]
    return "\n".join(out) + "\n"


SECTIONS = ("flat", "serial", "threshold", "options", "bound", "roofline")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--max-exponent", type=int, default=26,
                    help="largest flat size 2^k (default 26; 2^26 f64 needs 1.5 GiB)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 2^10..2^11, two threshold sizes, few calls (tests)")
    ap.add_argument("--only", action="append", choices=SECTIONS, metavar="SECTION",
                    help=f"run only this section (repeatable; one of {', '.join(SECTIONS)}); "
                    "default: all")
    args = ap.parse_args(argv)
    only = set(args.only or SECTIONS)
    global QUICK
    QUICK = args.quick
    if QUICK:
        args.max_exponent = 11
    rng = random.Random(args.seed)
    t_start = time.time()
    load_start = list(os.getloadavg())

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)

    facts = machine.facts()
    log(f"{facts['cpu_model']}, {facts['vector_isa']}, {facts['usable_cpus']} usable CPUs, "
        f"LLC {machine.fmt_llc(facts['llc_bytes'])}, numba {numba.get_num_threads()} "
        f"threads, load average {load_start[0]:.2f}")
    top = max(10, args.max_exponent)
    result: dict[str, Any] = {
        "probe": "bench/cpu_probe.py",
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "machine": facts,
        "node": platform.node(),
        "numba_threads": numba.get_num_threads(),
        "versions": {"fastadagrad": fastadagrad.__version__, "numba": numba.__version__,
                     "numpy": np.__version__, "python": platform.python_version()},
        "parallel_threshold_shipped": config.PARALLEL_THRESHOLD,
        "loadavg_start": load_start,
        "quick": QUICK,
    }
    both = ("float32", "float64")
    if "flat" in only:
        result["flat"] = flat_section(range(10, top + 1), both, rng, log)
    if "serial" in only:
        result["serial"] = serial_section(range(10, min(top, 18) + 1), both, rng, log)
    if "threshold" in only:
        sizes = [1 << 12, 1 << 13] if QUICK else sorted(
            {int(1 << e) for e in range(12, 21)} | {int(1.5 * (1 << e)) for e in range(12, 20)})
        result["threshold"] = threshold_section(sizes, both, rng, log)
        result["threshold_suggested"] = {dt: suggest_threshold(result["threshold"], dt)
                                         for dt in both}
    if "options" in only:
        result["options"] = options_section(top, both, rng, log)
    if "bound" in only:
        result["bound"] = bound_section((10, 11) if QUICK else (16, 20), both, rng, log)
    if "roofline" in only and top >= 24:
        row = measure(1 << 24, "float32", FLAT, rng, (15, 5))
        m = row["median_us"]
        row["kernel/roofline"] = m["fastadagrad kernel"] / m["roofline"]
        row["plain/roofline"] = m["plain numba"] / m["roofline"]
        result["roofline_2_24"] = row
        log(f"2^24 f32, {numba.get_num_threads()} threads: kernel/roofline "
            f"{row['kernel/roofline']:.3f}, plain/roofline {row['plain/roofline']:.3f}")
    try:  # known once a parallel kernel has run
        result["numba_threading_layer"] = str(numba.threading_layer())
    except ValueError:  # only serial sections ran
        result["numba_threading_layer"] = "not started"
    result["loadavg_end"] = list(os.getloadavg())
    result["duration_s"] = round(time.time() - t_start, 1)
    summary = []
    for sec, what in (("flat", "parallel"), ("serial", "serial"), ("options", "options")):
        if result.get(sec):
            w = max(result[sec], key=lambda r: r["kernel/plain"])
            summary.append(f"{what} {w['kernel/plain']:.3f} ({w.get('option_set', '')}"
                           f"{' ' if 'option_set' in w else ''}{w['dtype']} n={w['n']:,})")
    if "threshold_suggested" in result:
        summary.append(f"threshold where parallel wins: {result['threshold_suggested']}")
    log(f"done in {result['duration_s']} s; load average {result['loadavg_end'][0]:.2f}; "
        f"worst kernel/plain: {'; '.join(summary) or 'nothing measured'}")
    if args.json:
        machine.write_results(args.json, result, markdown)
        log(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
