"""Import time and first-update time of fastadagrad, with a cold and a warm Numba cache.

Each measurement runs in a fresh Python subprocess with ``NUMBA_CACHE_DIR`` pointing at
a private temporary directory: "cold" starts from an empty directory (every kernel is
compiled), "warm" reuses the directory a previous process filled (kernels are loaded
from the on-disk cache). The child times, from the moment it starts:

* ``import numpy`` and ``import fastadagrad`` (which imports numba);
* the first ``adagrad_update`` on 1,000 float32 elements (serial kernel);
* the first ``adagrad_update`` on 2^20 float32 elements (parallel kernel);
* the first ``AdaGrad().update(params, grads)`` on the 784-50-10 network's dict
  (the multi-tensor kernel), the second one, and the median of the next 100 (the
  steady state, for comparison).

Usage::

    python bench/startup.py [--repeat 3] [--json bench/results/startup.json]

Prints a markdown table of medians over ``--repeat`` runs; ``bench/report.py`` puts
the JSON into the generated report when it finds it next to the benchmark JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import fastadagrad
t2 = time.perf_counter()
small = [np.full(1000, v, np.float32) for v in (1.0, 0.5, 0.0)]
big = [np.full(1 << 20, v, np.float32) for v in (1.0, 0.5, 0.0)]
shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
grads = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
t3 = time.perf_counter()
fastadagrad.adagrad_update(*small)
t4 = time.perf_counter()
fastadagrad.adagrad_update(*big)
t5 = time.perf_counter()
opt = fastadagrad.AdaGrad(lr=0.01)
opt.update(params, grads)
t6 = time.perf_counter()
opt.update(params, grads)
t7 = time.perf_counter()
steady = []
for _ in range(100):
    a = time.perf_counter()
    opt.update(params, grads)
    steady.append(time.perf_counter() - a)
steady.sort()
print(json.dumps({
    "import numpy": t1 - t0,
    "import fastadagrad": t2 - t1,
    "first adagrad_update, 1000 f32 (serial kernel)": t4 - t3,
    "first adagrad_update, 2^20 f32 (parallel kernel)": t5 - t4,
    "first AdaGrad.update, 784-50-10 dict (multi-tensor kernel)": t6 - t5,
    "second AdaGrad.update, 784-50-10 dict": t7 - t6,
    "steady state AdaGrad.update (median of next 100)": steady[50],
}))
"""


def run_child(cache_dir: str) -> dict[str, float]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("FASTADAGRAD_NO_CACHE", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(repeat: int) -> dict[str, dict[str, float]]:
    """Median seconds per row for the cold and the warm cache."""
    cold: list[dict[str, float]] = []
    warm: list[dict[str, float]] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="fastadagrad-numba-cache-") as d:
            cold.append(run_child(d))   # empty cache: compiles and writes it
            warm.append(run_child(d))   # same directory: loads from it
    rows = list(cold[0])
    return {
        "cold": {r: statistics.median(x[r] for x in cold) for r in rows},
        "warm": {r: statistics.median(x[r] for x in warm) for r in rows},
    }


def table(result: dict[str, dict[str, float]], repeat: int) -> str:
    def ms(s: float) -> str:
        return f"{s * 1e3:,.1f} ms" if s >= 1e-3 else f"{s * 1e6:,.0f} µs"

    lines = ["| step (fresh process) | cold Numba cache | warm Numba cache |",
             "|---|---:|---:|"]
    for row in result["cold"]:
        lines.append(f"| {row} | {ms(result['cold'][row])} | {ms(result['warm'][row])} |")
    total = ("import fastadagrad", "first adagrad_update, 1000 f32 (serial kernel)")
    lines.append("| **import + first update (serial)** | "
                 f"**{ms(sum(result['cold'][r] for r in total))}** | "
                 f"**{ms(sum(result['warm'][r] for r in total))}** |")
    lines.append("")
    lines.append(f"Medians of {repeat} runs; each row is timed inside a new Python process "
                 "with `NUMBA_CACHE_DIR` set to a private temporary directory (empty for "
                 "cold, filled by the previous process for warm).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the medians here")
    args = ap.parse_args(argv)
    result = measure(args.repeat)
    print(table(result, args.repeat))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeat": args.repeat, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
