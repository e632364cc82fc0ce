"""Import time and first-update time of fastadagrad: cold cache, warm cache, after warm-up.

Each measurement runs in a fresh Python subprocess with ``NUMBA_CACHE_DIR`` pointing at
a private temporary directory: "cold" starts from an empty directory (every kernel is
compiled), "warm" reuses the directory a previous process filled (kernels are loaded
from the on-disk cache), "after warmup" starts from a directory that only
``python -m fastadagrad warmup --dtype float32`` filled (so it shows whether the
warm-up compiled everything a typical first run needs). The child times, from the
moment it starts:

* ``import numpy`` and ``import fastadagrad`` (which imports numba);
* the first ``adagrad_update`` on 1,000 float32 elements (serial kernel);
* the first ``adagrad_update`` on 2^20 float32 elements (parallel kernel);
* the first ``AdaGrad().update(params, grads)`` on the 784-50-10 network's dict
  (the multi-tensor kernel), the second one, and the median of the next 100 (the
  steady state, for comparison).

A second child, in its own cache directory, does only ``import numpy, fastadagrad``
and the first ``AdaGrad.update`` on the 784-50-10 dict: what a training script pays
before its first step.

Before timing, the package's modules are byte-compiled (``compileall``, as ``pip
install`` does), so that every child reads ``__pycache__`` instead of compiling
fastadagrad's source (~20 ms per process on the 2-core AMD EPYC when
``PYTHONDONTWRITEBYTECODE`` is set and no ``.pyc`` exists); ``--no-compileall`` skips
it.

Usage::

    python bench/startup.py [--repeat 3] [--json bench/results/startup.json]

Prints a markdown table of medians over ``--repeat`` runs; ``bench/report.py`` puts
the JSON into the generated report when it finds it next to the benchmark JSON.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
t1 = time.perf_counter()
import fastadagrad
t2 = time.perf_counter()
from fastadagrad import _compile_notice
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
    "compiled": _compile_notice.compile_count(),
}))
"""

#: import + the first dict update and nothing else, in its own process and cache
ALONE = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import fastadagrad
from fastadagrad import _compile_notice
shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
grads = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
fastadagrad.AdaGrad(lr=0.01).update(params, grads)
t1 = time.perf_counter()
print(json.dumps({ALONE_ROW: t1 - t0, "compiled (alone)": _compile_notice.compile_count()}))
"""
ALONE_ROW = "import numpy + fastadagrad + first AdaGrad.update, 784-50-10 dict, nothing before"
ALONE = ALONE.replace("ALONE_ROW", repr(ALONE_ROW))
COUNTS = ("compiled", "compiled (alone)")


def _env(cache_dir: str) -> dict[str, str]:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("FASTADAGRAD_NO_CACHE", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(cache_dir: str, code: str = CHILD) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", code], env=_env(cache_dir), check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_warmup(cache_dir: str) -> float:
    """Seconds taken by ``python -m fastadagrad warmup --dtype float32`` (whole process)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastadagrad", "warmup", "--dtype", "float32",
                    "--quiet"], env=_env(cache_dir), check=True)
    return time.perf_counter() - t0


def measure(repeat: int) -> dict[str, dict[str, float]]:
    """Median per row (seconds; counts for the ``compiled`` rows) for each column."""
    runs: dict[str, list[dict[str, float]]] = {"cold": [], "warm": [], "after warmup": []}
    warmups: list[float] = []

    def tmp() -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="fastadagrad-numba-cache-")

    for _ in range(repeat):
        with tmp() as d, tmp() as e:
            cold, warm = run_child(d), run_child(d)  # empty cache, then the filled one
            cold.update(run_child(e, ALONE))
            warm.update(run_child(e, ALONE))
        with tmp() as d, tmp() as e:  # separate: one child must not fill the other's
            warmups += [run_warmup(d), run_warmup(e)]
            after = run_child(d)
            after.update(run_child(e, ALONE))
        runs["cold"].append(cold)
        runs["warm"].append(warm)
        runs["after warmup"].append(after)
    result = {col: {r: statistics.median(x[r] for x in xs) for r in xs[0]}
              for col, xs in runs.items()}
    # the headline row's range over the runs: the machine may be shared
    result["spread"] = {col: [min(x[ALONE_ROW] for x in xs), max(x[ALONE_ROW] for x in xs)]
                        for col, xs in runs.items()}
    result["warmup command"] = {"seconds": statistics.median(warmups)}
    return result


def table(result: dict[str, dict[str, float]], repeat: int) -> str:
    def ms(s: float) -> str:
        return f"{s * 1e3:,.1f} ms" if s >= 1e-3 else f"{s * 1e6:,.0f} µs"

    cols = [c for c in ("cold", "warm", "after warmup") if c in result]
    heads = {"cold": "cold Numba cache", "warm": "warm Numba cache",
             "after warmup": "after `warmup`"}
    lines = ["| step (fresh process) | " + " | ".join(heads[c] for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    rows = [r for r in result["cold"] if r not in COUNTS and r != ALONE_ROW]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(ms(result[c][row]) for c in cols) + " |")
    total = ("import fastadagrad", "first adagrad_update, 1000 f32 (serial kernel)")
    lines.append("| **import + first update (serial)** | " + " | ".join(
        f"**{ms(sum(result[c][r] for r in total))}**" for c in cols) + " |")
    if ALONE_ROW in result["cold"]:
        lines.append(f"| **{ALONE_ROW}** | " + " | ".join(
            f"**{ms(result[c][ALONE_ROW])}**" for c in cols) + " |")
    lines.append("")
    lines.append(f"Medians of {repeat} runs; each row is timed inside a new Python process "
                 "with `NUMBA_CACHE_DIR` set to a private temporary directory (empty for "
                 "cold, filled by the previous process for warm).")
    if "after warmup" in cols:
        w = result.get("warmup command", {}).get("seconds")
        lines[-1] += (" \"after `warmup`\": a directory filled only by `python -m "
                      "fastadagrad warmup --dtype float32`"
                      + (f", which took {w:.1f} s with an empty cache" if w else "") + ".")
    if result.get("settings", {}).get("compileall"):
        lines[-1] += (" fastadagrad's modules were byte-compiled beforehand, as an installed "
                      "package's are.")
    spread = result.get("spread")
    if spread:
        lines.append("Range of the last row over the runs: " + ", ".join(
            f"{c} {ms(spread[c][0])}-{ms(spread[c][1])}" for c in cols if c in spread)
            + ".")
    if "compiled" in result["cold"]:
        counts = ", ".join(f"{c} {result[c]['compiled']:.0f}" for c in cols)
        lines.append(f"Functions Numba compiled in the process timed in the rows above: {counts}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the medians here")
    ap.add_argument("--no-compileall", action="store_true",
                    help="do not byte-compile fastadagrad first (children compile its "
                    "source if no .pyc exists and PYTHONDONTWRITEBYTECODE is set)")
    args = ap.parse_args(argv)
    if not args.no_compileall:
        compileall.compile_dir(ROOT / "fastadagrad", quiet=1)
    result = measure(args.repeat)
    result["settings"] = {"compileall": not args.no_compileall}
    print(table(result, args.repeat))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"repeat": args.repeat, **result}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
