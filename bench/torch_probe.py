"""Probe the torch adapter: ``fastadagrad.torch.Adagrad`` against ``torch.optim.Adagrad``,
interleaved.

Run from a repository checkout (needs torch)::

    python bench/torch_probe.py --json bench/results/torch-probe.json

The models and implementations of ``bench/test_bench_torch.py`` (the 100-tensor model,
the 784-1024-512-10 MLP, the 784-50-10 net, one tensor of 1,024; torch's default,
``foreach=True`` and ``fused=True`` steps and the adapter with the same three flag
sets), each with its own parameters, gradients and state. In every block the
implementations take turns in shuffled order, each making ``reps`` steps timed one by
one; a block's median is that of its second half of steps (after a switch, another
implementation's steps have pushed this one's state out of the cache, and a model about
the size of the cache takes many steps to get it back: the 100-tensor model on the
2-core AMD EPYC, 30 steps of fastadagrad.torch fused=True after torch fused's, medians
over 15 blocks, took 1,738 us at the first step, 1,025 us at the sixth and 820-865 us
from the twelfth on), and the result is the median of the block medians: the steady
state pytest-benchmark measures case by case, with a disturbance on the shared cores
hitting every implementation alike instead of one case. Last, the same blocks for one
flat float32 array of 2^16 elements: ``adagrad_update`` against torch fused's step.
Then the 100-tensor model again after ``torch.set_num_threads`` (with the count it
already had), which turns MKL's dynamic threading off for the rest of the process: the
case of a training script that sets torch's thread count, where each call of MKL's
square root the eager formula makes would otherwise start a team of threads. It
records the CPU, the thread counts and the load average at the start and the end.
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
import torch  # noqa: E402

import fastadagrad  # noqa: E402
from bench import benchlib as B  # noqa: E402
from bench import machine  # noqa: E402
from bench.test_bench_torch import (  # noqa: E402
    CHANNELS_LAST,
    FAST_TORCH,
    IMPLS,
    MODELS,
    make_step,
)

#: at least 1.5x torch fused on the 100-tensor model, never slower elsewhere
GOALS = {"torch-model100": 1.5}
#: one flat float32 array, fastadagrad's functional update (the flat benchmarks'
#: "fastadagrad" row) against torch fused on the same values: at least 2.5x
FLAT_N, FLAT_GOAL = 1 << 16, 2.5


def goal(model: str) -> float:
    return GOALS.get(model, 1.0)


def probe_model(shapes: list[tuple[int, ...]], reps: int, blocks: int,
                rng: random.Random, channels_last: bool = False) -> dict[str, float]:
    """Median over blocks of each implementation's median step time, in seconds."""
    return interleaved({impl: make_step(impl, shapes, channels_last=channels_last)
                        for impl in IMPLS}, reps, blocks, rng)


def interleaved(steps: dict[str, Callable[[], Any]], reps: int, blocks: int,
                rng: random.Random) -> dict[str, float]:
    """Three warm-up steps each (compiles, creates the state, faults the pages in),
    then ``blocks`` blocks in which the steps take turns in shuffled order, ``reps``
    timed steps each: the median over blocks of each one's block median, taken over
    the block's second half of steps (module docstring)."""
    for step in steps.values():
        for _ in range(3):
            step()
    per_block: dict[str, list[float]] = {impl: [] for impl in steps}
    order = list(steps)
    for _ in range(blocks):
        rng.shuffle(order)
        for impl in order:
            step, times = steps[impl], []
            for _ in range(reps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            per_block[impl].append(statistics.median(times[reps // 2:]))
    return {impl: statistics.median(v) for impl, v in per_block.items()}


def probe_flat(n: int, reps: int, blocks: int, rng: random.Random) -> dict[str, float]:
    """:func:`interleaved` blocks for one flat float32 array of ``n`` elements:
    ``adagrad_update`` (the flat benchmarks' fastadagrad row) and torch fused's step,
    each on its own copy of the flat benchmarks' values and its own state."""
    import numpy as np

    p0, g0 = B.flat_source(n, np.float32)
    fp, fh = p0.copy(), np.zeros(n, np.float32)
    return interleaved({B.FAST: B.fast_functional(fp, g0.copy(), fh),
                        B.TORCH_FUSED: B.torch_step([p0.copy()], [g0.copy()],
                                                    B.TORCH_FUSED)}, reps, blocks, rng)


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    out = [f"# torch adapter probe: {m['cpu_model']}", "",
           f"{m['cpu_model']}, {m['vector_isa']}, {m['usable_cpus']} usable CPUs; numba "
           f"{r['numba_threads']} threads, torch {r['torch_threads']} threads; "
           f"{', '.join(f'{k} {v}' for k, v in r['versions'].items())}. Started "
           f"{r['started_utc']}, {r['duration_s']} s; 1-minute load average "
           f"{r['loadavg_start'][0]:.2f} at the start, {r['loadavg_end'][0]:.2f} at the "
           f"end. {r['reps']} steps per implementation per block, {r['blocks']} blocks, "
           "order shuffled in each block; medians of the block medians (each block's "
           "median over its second half of steps: the state another implementation "
           "evicted takes many steps to come back into the cache). Command: "
           "`python bench/torch_probe.py`.", "",
           "| model | implementation | step | torch fused ÷ this | target |",
           "|---|---|---:|---:|---:|"]
    for row in r["models"]:
        med = row["median_us"]
        base = med[B.TORCH_FUSED]
        for impl in sorted(med, key=med.get):
            is_fast = impl.startswith("fastadagrad")
            target = f"≥ {goal(row['model']):g}×" if is_fast else ""
            out.append(f"| {row['model']} ({row['parameters']:,}, {row['tensors']} "
                       f"tensors) | {impl} | {med[impl]:,.1f} µs | {base / med[impl]:.2f}× "
                       f"| {target} |")
    for row in r.get("after_set_num_threads", []):
        med = row["median_us"]
        base = med[B.TORCH_FUSED]
        out += ["", f"After `torch.set_num_threads({r['torch_threads']})` (MKL's dynamic "
                f"threading off), {row['model']}, the same blocks: " + ", ".join(
                    f"{impl} {med[impl]:,.1f} µs ({base / med[impl]:.2f}×)"
                    for impl in sorted(med, key=med.get)) + " (torch fused ÷ each)."]
    for row in r.get("flat", []):
        med = row["median_us"]
        out += ["", f"One flat {row['dtype']} array of {row['n']:,} elements, the same "
                "blocks: `adagrad_update` "
                f"{med[B.FAST]:,.1f} µs, torch fused {med[B.TORCH_FUSED]:,.1f} µs: "
                f"{row['torch_fused_over_fast']:.2f}× (target ≥ {FLAT_GOAL:g}×)."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="write the results here (and .md beside)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled order")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: every dimension capped at 8, few steps (tests)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    t0 = time.time()
    load0 = list(os.getloadavg())
    reps, blocks = (3, 2) if args.quick else (30, 15)
    rows = []
    for model, shapes_of in MODELS.items():
        shapes = shapes_of()
        if args.quick:
            shapes = [tuple(min(d, 8) for d in s) for s in shapes]
        med = probe_model(shapes, reps, blocks, rng, model in CHANNELS_LAST)
        row = {"model": model, "tensors": len(shapes), "parameters": B.numel(shapes),
               "median_us": {k: round(v * 1e6, 3) for k, v in med.items()}}
        row["torch_fused_over"] = {k: med[B.TORCH_FUSED] / v for k, v in med.items()}
        rows.append(row)
        best = {k: v for k, v in row["torch_fused_over"].items() if k.startswith("fast")}
        print(f"[{time.time() - t0:6.1f} s] {model}: torch fused ÷ adapter " + ", ".join(
            f"{k.removeprefix('fastadagrad.torch').strip() or 'default'} {v:.2f}"
            for k, v in best.items()), flush=True)
    n = 256 if args.quick else FLAT_N
    med = probe_flat(n, reps, blocks, rng)
    flat = [{"dtype": "float32", "n": n, "median_us": {k: round(v * 1e6, 3)
                                                         for k, v in med.items()},
             "torch_fused_over_fast": med[B.TORCH_FUSED] / med[B.FAST]}]
    print(f"[{time.time() - t0:6.1f} s] flat float32 {n}: torch fused ÷ adagrad_update "
          f"{flat[0]['torch_fused_over_fast']:.2f}", flush=True)
    # last: torch.set_num_threads turns MKL's dynamic threading off for good
    torch.set_num_threads(torch.get_num_threads())
    model = "torch-model100"
    shapes = MODELS[model]()
    if args.quick:
        shapes = [tuple(min(d, 8) for d in s) for s in shapes]
    med = probe_model(shapes, reps, blocks, rng, model in CHANNELS_LAST)
    after = [{"model": model, "tensors": len(shapes), "parameters": B.numel(shapes),
              "median_us": {k: round(v * 1e6, 3) for k, v in med.items()}}]
    print(f"[{time.time() - t0:6.1f} s] {model} after torch.set_num_threads: torch fused "
          f"÷ adapter default {med[B.TORCH_FUSED] / med[FAST_TORCH]:.2f}", flush=True)
    result = {
        "probe": "bench/torch_probe.py", "quick": args.quick,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
        "machine": machine.facts(), "node": platform.node(),
        "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads(),
        "versions": {"fastadagrad": fastadagrad.__version__, "torch": torch.__version__,
                     "numba": numba.__version__, "python": platform.python_version()},
        "reps": reps, "blocks": blocks, "loadavg_start": load0,
        "loadavg_end": list(os.getloadavg()), "duration_s": round(time.time() - t0, 1),
        "models": rows, "flat": flat, "after_set_num_threads": after,
    }
    if args.json:
        machine.write_results(args.json, result, markdown)
        print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
