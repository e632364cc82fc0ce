"""Turn a pytest-benchmark ``--benchmark-json`` file into the benchmark report.

Usage::

    python bench/report.py bench/results/cpu.json [--readme README.md] [--no-readme]

Writes, next to the JSON (``cpu.json`` -> ``cpu.md``, ``cpu.png``):

* a markdown report: ratio table (fastadagrad vs torch fused, vs the NumPy class, vs
  the plain fused loop, the roofline kernel), the speed targets with pass/fail, every
  implementation's median, the option benchmarks, the startup times (from
  ``startup.json`` in the same folder, written by ``bench/startup.py``) and a footnote
  naming machine, CPU, threads, date, versions and the exact command;
* a PNG plot: effective GB/s against buffer size (log-log), one line per
  implementation, float32 and float64 side by side. Effective bytes per step are
  5 arrays-worth per element (p, g, h read; p, h written): 20 B in float32, 40 B in
  float64, whatever an implementation actually moves.

rewrites the block between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in
the README with the headline tables, the plot and the footnote. Every number comes
from the JSON: nothing here is typed by hand. Times are medians.

It also drops the per-round timings (``stats.data``, up to millions of numbers per case,
~150 MB for the full suite) from the JSON in place, keeping every statistic, so that the
file can be committed next to the report (``--keep-data`` leaves it alone).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench import machine  # noqa: E402  (the script runs as bench/report.py)

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

FAST, FAST_FLAT, NUMPY = "fastadagrad", "fastadagrad FlatBuffer", "NumPy class"
TORCH_FUSED, ROOFLINE = "torch fused", "roofline"
FAST_SERIAL, PLAIN, PLAIN_SERIAL = "fastadagrad serial", "plain numba", "plain numba serial"
FAST_KERNEL, FAST_KERNEL_SERIAL = "fastadagrad kernel", "fastadagrad kernel serial"
DEEPSPEED = "DeepSpeed CPU"
#: the options group's kernel-vs-plain pair (bench/benchlib.py OPTIONS_KERNEL/_PLAIN)
OPTIONS_SET = "torch, all options"
OPTIONS_KERNEL, OPTIONS_PLAIN = f"{FAST_KERNEL} ({OPTIONS_SET})", f"{PLAIN} ({OPTIONS_SET})"
IMPL_ORDER = ("fastadagrad", "fastadagrad serial", "fastadagrad FlatBuffer", "NumPy class",
              "torch for-loop", "torch foreach", "torch fused", FAST_KERNEL,
              FAST_KERNEL_SERIAL, "plain numba", "plain numba serial", "roofline",
              "DeepSpeed CPU")
#: fastadagrad may take at most this multiple of the plain fused loop's time.
PLAIN_BOUND = 1.05
SCENARIO_LABEL = {"flat": "flat buffer", "model100": "100-tensor model",
                  "mlp784-50-10": "784-50-10 net",
                  "rows-zipf": "table 1M × 64, 65,536 Zipf lookups: update",
                  "rows-uniform": "table 1M × 64, 65,536 uniform lookups: update",
                  "rows-train-zipf": "table 1M × 64, 65,536 Zipf lookups: training step",
                  "rows-train-uniform": "table 1M × 64, 65,536 uniform lookups: training step",
                  "torch-model100": "torch 100-tensor model (2.95M)",
                  "torch-model100-flushed": "torch 100-tensor model (2.95M), caches flushed "
                                            "before each step",
                  "torch-mlp784-1024-512-10": "torch MLP 784-1024-512-10 (1.33M)",
                  "torch-mlp784-1024-512-10-f64": "torch MLP 784-1024-512-10 (1.33M)",
                  "torch-net784-50-10": "torch net 784-50-10 (39,760, 4 tensors)",
                  "torch-1x1024": "torch, one tensor of 1,024",
                  "torch-resnet18-channels-last": "torch ResNet-18, channels_last (11.69M, "
                                                  "62 tensors)",
                  "torch-embedding-sparse": "torch sparse nn.Embedding 100k × 64"}
DT = {"float32": "f32", "float64": "f64"}
#: A median this many times the fastest round marks a case as disturbed: on 2 cores a
#: process that takes one core for a while stalls every parallel kernel at its barrier.
NOISY = 1.5
NOISY_NOTE = (f"†: median more than {NOISY}× the fastest round of the case — another "
              "process shared the cores while it ran; rerun before trusting that number.")


# --- loading ------------------------------------------------------------------------

class Run:
    """The benchmarks of one JSON file, indexed by case and implementation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.raw = json.loads(path.read_text())
        self.times: dict[tuple[str, str, int], dict[str, float]] = defaultdict(dict)
        self.info: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.rounds: list[int] = []
        self.noisy: set[tuple[tuple[str, str, int], str]] = set()
        for b in self.raw["benchmarks"]:
            x = b.get("extra_info", {})
            if "impl" not in x:  # not one of ours (e.g. the GPU file's)
                continue
            key = (x["scenario"], x["dtype"], int(x["n"]))
            st = b["stats"]
            self.times[key][x["impl"]] = float(st["median"])
            if "min" in st and st["median"] > NOISY * st["min"]:
                self.noisy.add((key, x["impl"]))
            self.info[key] = x
            self.rounds.append(int(b["stats"]["rounds"]))

    def cases(self, scenarios: tuple[str, ...]) -> list[tuple[str, str, int]]:
        order = {s: i for i, s in enumerate(scenarios)}
        keys = [k for k in self.times if k[0] in order]
        return sorted(keys, key=lambda k: (order[k[0]], k[1], k[2]))

    def mark(self, key: tuple[str, str, int], *impls: str) -> str:
        """"†" if any of these implementations' medians in this case is disturbed."""
        return "†" if any((key, i) in self.noisy for i in impls) else ""

    def t(self, key: tuple[str, str, int], impl: str) -> float | None:
        return self.times.get(key, {}).get(impl)


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:,.3g} µs" if s * 1e6 < 100 else f"{s * 1e6:,.0f} µs"
    if s < 1:
        return f"{s * 1e3:,.3g} ms" if s * 1e3 < 100 else f"{s * 1e3:,.0f} ms"
    return f"{s:,.3g} s"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def fmt_ratio(r: float | None, suffix: str = "×") -> str:
    return "—" if r is None else f"{r:,.2f}{suffix}" if r < 10 else f"{r:,.1f}{suffix}"


def case_label(key: tuple[str, str, int], info: dict[str, Any]) -> str:
    scenario, dtype, n = key
    if scenario == "flat":
        return f"flat {DT[dtype]} 2^{n.bit_length() - 1}"
    label = SCENARIO_LABEL.get(scenario, scenario)
    extra = f", {info['tensors']} tensors" if "tensors" in info else ""
    return f"{label} {DT[dtype]} ({n / 1e6:.2f}M{extra})" if n >= 100_000 else \
        f"{label} {DT[dtype]} ({n:,}{extra})"


# --- tables -------------------------------------------------------------------------

def ratio_table(run: Run) -> str:
    """fastadagrad (and its FlatBuffer variant on models), the plain fused loop and
    DeepSpeed against the anchors: torch fused, the NumPy class, the roofline kernel."""
    lines = [
        "| case | implementation | median | speed-up vs torch fused | speed-up vs NumPy "
        "class | time ÷ plain numba | time ÷ roofline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    marked = False
    for key in run.cases(("flat", "model100", "mlp784-50-10")):
        for impl in (FAST, FAST_FLAT, FAST_KERNEL, PLAIN, DEEPSPEED):
            t = run.t(key, impl)
            if t is None:
                continue
            m = run.mark(key, impl, TORCH_FUSED, NUMPY, PLAIN, ROOFLINE)
            marked = marked or bool(m)
            lines.append(
                f"| {case_label(key, run.info[key])} | {impl} | {fmt_time(t)}{m} | "
                f"{fmt_ratio(ratio(run.t(key, TORCH_FUSED), t))} | "
                f"{fmt_ratio(ratio(run.t(key, NUMPY), t))} | "
                f"{fmt_ratio(ratio(t, run.t(key, PLAIN)), '')} | "
                f"{fmt_ratio(ratio(t, run.t(key, ROOFLINE)), '')} |")
    if marked:
        lines += ["", NOISY_NOTE]
    return "\n".join(lines)


def medians_table(run: Run) -> str:
    keys = run.cases(("flat", "model100", "mlp784-50-10"))
    impls = [i for i in IMPL_ORDER if any(i in run.times[k] for k in keys)]
    lines = ["| case | " + " | ".join(impls) + " |", "|---|" + "---:|" * len(impls)]
    for key in keys:
        row = run.times[key]
        best = min(v for i, v in row.items() if i != ROOFLINE) if row else None
        cells = []
        for i in impls:
            v = row.get(i)
            s = fmt_time(v)
            s = f"**{s}**" if v is not None and v == best else s
            cells.append(s + run.mark(key, i))
        lines.append(f"| {case_label(key, run.info[key])} | " + " | ".join(cells) + " |")
    if any(k in keys for k, _ in run.noisy):
        lines += ["", NOISY_NOTE]
    return "\n".join(lines)


def targets(run: Run) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, ceiling, met) for the project's speed targets.

    The ceiling is the same ratio for the roofline kernel: what any kernel making the
    update's reads and writes could reach here if it cost nothing but memory traffic.
    """
    f32 = "float32"
    out: list[tuple[str, str, str, bool | None]] = []

    def add(name: str, value: float | None, bound: float | None, ok: bool | None,
            unit: str) -> None:
        out.append((name, fmt_ratio(value, unit), fmt_ratio(bound, unit),
                    None if value is None else ok))

    k24, k16, k20 = ("flat", f32, 1 << 24), ("flat", f32, 1 << 16), ("flat", f32, 1 << 20)
    r = ratio(run.t(k24, FAST), run.t(k24, ROOFLINE))
    add("2^24 f32: time within 10% of the roofline kernel (≤ 1.10)", r,
        1.0 if r is not None else None, r is not None and r <= 1.10, "")
    r = ratio(run.t(k16, TORCH_FUSED), run.t(k16, FAST))
    add("2^16 f32: ≥ 2.5× faster than torch fused", r,
        ratio(run.t(k16, TORCH_FUSED), run.t(k16, ROOFLINE)), r is not None and r >= 2.5, "×")
    model = next((k for k in run.times if k[0] == "model100" and k[1] == f32), None)
    r = ratio(run.t(model, TORCH_FUSED), run.t(model, FAST)) if model else None
    add("100-tensor model f32 (dict API, separate grads): ≥ 2× faster than torch fused",
        r, ratio(run.t(model, TORCH_FUSED), run.t(model, ROOFLINE)) if model else None,
        r is not None and r >= 2.0, "×")
    r = ratio(run.t(k20, NUMPY), run.t(k20, FAST))
    ceiling = ratio(run.t(k20, NUMPY), run.t(k20, ROOFLINE))
    add("2^20 f32: speed-up over the NumPy class ≥ 90% of the roofline kernel's", r,
        ceiling, r is not None and ceiling is not None and r >= 0.9 * ceiling, "×")
    # the kernels themselves against the plain loops (the public call's own overhead is
    # the per-row "time ÷ plain numba" column and the call-overhead targets)
    def worst_of(scenario: str, fast: str, plain: str
                 ) -> tuple[float | None, tuple[str, str, int] | None]:
        """The largest time ratio fast ÷ plain over the scenario's cases, and its case."""
        found = [(q, key) for key in run.cases((scenario,))
                 if (q := ratio(run.t(key, fast), run.t(key, plain))) is not None]
        return max(found, key=lambda x: x[0]) if found else (None, None)

    for fast, plain in ((FAST_KERNEL, PLAIN), (FAST_KERNEL_SERIAL, PLAIN_SERIAL)):
        worst, wkey = worst_of("flat", fast, plain)
        where = f" (worst: {case_label(wkey, run.info[wkey])})" if wkey else ""
        add(f"every flat size: {fast} ≤ {PLAIN_BOUND:.2f}× the time of {plain}{where}",
            worst, 1.0 if worst is not None else None,
            worst is not None and worst <= PLAIN_BOUND, "")
    # the same for another flag set's kernel: torch's formula with every option
    worst, wkey = worst_of("options", OPTIONS_KERNEL, OPTIONS_PLAIN)
    where = f", {DT[wkey[1]]} 2^{wkey[2].bit_length() - 1}" if wkey else ""
    add(f"kernel ÷ plain numba, all options (torch's formula{where}) ≤ {PLAIN_BOUND:.2f}",
        worst, 1.0 if worst is not None else None,
        worst is not None and worst <= PLAIN_BOUND, "")
    return out


#: (scenario prefix, baseline implementation, what the table compares)
PEER_FAMILIES = (
    ("rows-train-", "FBGEMM fused fwd+bwd+rowwise",
     "embedding table, whole training step (forward, backward, update)"),
    ("rows-", "torch sparse Adagrad", "embedding table, optimizer step only"),
    ("torch-embedding-sparse", "torch for-loop",
     "`fastadagrad.torch.Adagrad` on a sparse nn.Embedding gradient"),
    ("torch-", "torch fused", "`fastadagrad.torch.Adagrad` (drop-in torch optimizer), CPU"),
)


def _family(scenario: str) -> tuple[str, str, str] | None:
    return next((f for f in PEER_FAMILIES if scenario.startswith(f[0])), None)


def peer_table(run: Run) -> str:
    """The embedding-table and torch-adapter cases: every implementation against the
    case's baseline (torch's sparse Adagrad, FBGEMM's fused step, torch fused)."""
    lines = ["| case | implementation | median | speed-up vs baseline | baseline | "
             "time ÷ roofline |", "|---|---|---:|---:|---|---:|"]
    keys = sorted((k for k in run.times if _family(k[0])),
                  key=lambda k: (PEER_FAMILIES.index(_family(k[0])), k[0]))
    marked = False
    for key in keys:
        _, base, _ = _family(key[0])
        label = f"{SCENARIO_LABEL.get(key[0], key[0])} {DT[key[1]]}"
        for impl, t in sorted(run.times[key].items(), key=lambda it: it[1]):
            if impl == ROOFLINE:
                continue
            m = run.mark(key, impl, base)
            marked = marked or bool(m)
            # (the rows roofline moves a full accumulator's bytes: not a rowwise one's)
            roof = None if "rowwise" in impl else ratio(t, run.t(key, ROOFLINE))
            lines.append(f"| {label} | {impl} | {fmt_time(t)}{m} | "
                         f"{fmt_ratio(ratio(run.t(key, base), t))} | {base} | "
                         f"{fmt_ratio(roof, '')} |")
    if len(lines) == 2:
        return ""
    if marked:
        lines += ["", NOISY_NOTE]
    return "\n".join(lines)


#: the 16-bit step at 2^24, at least this much faster than the float32 one (20 bytes
#: an element against 14: 1.43x from the bytes alone; bench/test_bench_half.py)
HALF_GOAL = 1.3


def _half_cases(run: Run) -> list[tuple[tuple[str, str, int], str, float, float | None,
                                        float | None]]:
    """(case, impl, time, float32 time ÷ it, torch fused bf16 time ÷ it) of every 16-bit
    implementation (not torch's), by size then dtype."""
    out = []
    for key in sorted((k for k in run.times if k[0] == "half" and k[1] != "float32"),
                      key=lambda k: (k[2], k[1])):
        f32 = run.t(("half", "float32", key[2]), "fastadagrad float32")
        torch_bf16 = run.t(("half", "bfloat16", key[2]), "torch fused bfloat16")
        for impl, t in sorted(run.times[key].items()):
            if impl.startswith("fastadagrad"):
                out.append((key, impl, t, ratio(f32, t), ratio(torch_bf16, t)))
    return out


def half_table(run: Run) -> str:
    rows = _half_cases(run)
    if not rows:
        return ""
    lines = ["| size | implementation | median | speed-up vs the float32 step | speed-up "
             "vs torch fused bfloat16 |", "|---|---|---:|---:|---:|"]
    for key, impl, t, vs32, vst in rows:
        m = run.mark(key, impl, "torch fused bfloat16")
        lines.append(f"| 2^{key[2].bit_length() - 1} | {impl} | {fmt_time(t)}{m} | "
                     f"{fmt_ratio(vs32)} | {fmt_ratio(vst)} |")
    return "\n".join(lines)


def peer_targets(run: Run) -> list[tuple[str, str, str, bool | None]]:
    """The embedding-table, torch-adapter and per-call-overhead targets."""
    out: list[tuple[str, str, str, bool | None]] = []

    def key_of(scenario: str) -> tuple[str, str, int] | None:
        return next((k for k in run.times if k[0] == scenario), None)

    def add(name: str, value: float | None, bound: float | None, ok: bool, unit: str
            ) -> None:
        out.append((name, fmt_ratio(value, unit), fmt_ratio(bound, unit),
                    None if value is None else ok))

    z = key_of("rows-zipf")
    if z:
        full, sparse, roof = (run.t(z, "fastadagrad full"), run.t(z, "torch sparse Adagrad"),
                              run.t(z, ROOFLINE))
        r = ratio(full, roof)
        add("embedding rows, Zipf: full-accumulator update ≤ 2× the touched-rows roofline",
            r, 1.0 if r else None, r is not None and r <= 2.0, "")
        r = ratio(sparse, full)
        add("embedding rows, Zipf: ≥ 30× faster than torch's sparse Adagrad step", r,
            ratio(sparse, roof), r is not None and r >= 30, "×")
    for dist in ("zipf", "uniform"):
        k = key_of(f"rows-train-{dist}")
        if k:
            r = ratio(run.t(k, "FBGEMM fused fwd+bwd+rowwise"),
                      run.t(k, "nn.Embedding fwd+bwd + fastadagrad rowwise"))
            add(f"embedding rows, {dist}: rowwise training step ≥ 10× faster than FBGEMM's "
                "fused step", r, None, r is not None and r >= 10, "×")
    for scenario in sorted({k[0] for k in run.times
                            if k[0].startswith("torch-") and "sparse" not in k[0]
                            and not k[0].endswith("-flushed")}):  # flushed: no target
        k = key_of(scenario)
        for impl in sorted(i for i in run.times[k] if i.startswith("fastadagrad.torch")):
            r = ratio(run.t(k, TORCH_FUSED), run.t(k, impl))
            goal = 1.5 if "model100" in scenario else 1.0
            add(f"{scenario}: {impl} ≥ {goal:g}× faster than torch fused", r,
                ratio(run.t(k, TORCH_FUSED), run.t(k, ROOFLINE)), r is not None and r >= goal,
                "×")
    for key, impl, _, vs32, _ in _half_cases(run):
        # (master weights move 20 bytes an element, as float32: no target by the bytes)
        if key[2] == 1 << 24 and "master" not in impl:
            add(f"16-bit params, {impl.removeprefix('fastadagrad ')} at 2^24: ≥ "
                f"{HALF_GOAL:g}× faster than the float32 step", vs32, None,
                vs32 is not None and vs32 >= HALF_GOAL, "×")
    k = key_of("overhead functional")
    if k:
        r = ratio(run.t(k, "adagrad_update"), run.t(k, "kernel call"))
        add("adagrad_update at 2^10 f32: ≤ 1.5× the bare compiled kernel call", r, 1.0,
            r is not None and r <= 1.5, "")
    ks = sorted(k for k in run.times if k[0] == "overhead")
    if ks:
        # (a case or its baseline missing: not measured, rather than a 0 that passes)
        rs = [ratio(run.t(k, i), run.t(k, "numpy class"))
              for k in ks for i in ("AdaGrad.update list", "AdaGrad.update dict")]
        worst = None if None in rs else max(rs)
        add("AdaGrad.update (list and dict, 4-1000 arrays of 16): time ÷ the NumPy class's "
            "(≤ 1)", worst, None, worst is not None and worst <= 1.0, "")
        # growth of (update - kernel call) per added array, between successive model
        # sizes (k = 4 -> 100 -> 1000 arrays)
        by_k = sorted((int(run.info[k].get("tensors", 0)), k) for k in ks)
        per: list[float | None] = []
        for (k0, a), (k1, b) in zip(by_k, by_k[1:]):
            for i in ("AdaGrad.update list", "AdaGrad.update dict"):
                ts = [(run.t(x, i), run.t(x, "kernel call")) for x in (a, b)]
                if k1 > k0:
                    per.append(None if any(t is None for pair in ts for t in pair) else
                               ((ts[1][0] - ts[1][1]) - (ts[0][0] - ts[0][1])) / (k1 - k0))
        worst_per = max(per) * 1e6 if per and None not in per else None
        add("AdaGrad.update: growth of the time above the multi-tensor kernel call, per "
            "added array, k = 4, 100, 1000 (≤ 0.2 µs)", worst_per, None,
            worst_per is not None and worst_per <= 0.2, " µs")
    return out


def _sizes_of(rows: list[dict[str, Any]]) -> str:
    """The sizes and dtypes a probe section measured, e.g. ``2^10-2^26 f32/f64``."""
    ns = sorted({int(r["n"]) for r in rows})
    dts = sorted({r["dtype"] for r in rows}, key=lambda d: ("32" not in d, d))

    def pow2(n: int) -> str:
        return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"

    span = pow2(ns[0]) if len(ns) == 1 else f"{pow2(ns[0])}-{pow2(ns[-1])}"
    return f"{span} {'/'.join(d.replace('float', 'f') for d in dts)}"


def probe_targets(probe: dict[str, Any] | None) -> list[tuple[str, str, str, bool | None]]:
    """The kernel-vs-plain-loop targets again from ``bench/cpu_probe.py``'s JSON: the
    same ratios, with the two candidates interleaved block by block (a disturbance on
    the shared cores then hits both), every size and every option set."""
    if not probe:
        return []
    out: list[tuple[str, str, str, bool | None]] = []
    for section, what in (("flat", "parallel kernel ÷ plain loop, {sizes}"),
                          ("serial", "serial kernel ÷ plain serial loop, {sizes}"),
                          ("options", "every option set (torch with every option, Keras, "
                                      "optax, loss scaling): kernel ÷ its plain loop")):
        rows = probe.get(section) or []
        if not rows:
            continue
        what = what.format(sizes=_sizes_of(rows))
        w = max(rows, key=lambda x: x["kernel/plain"])
        n = int(w["n"])
        size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else f"{n:,}"
        where = " ".join(str(x) for x in (w.get("option_set"), w.get("mode"), w["dtype"],
                                          size) if x)
        out.append((f"{what}, interleaved probe, worst ({where}) ≤ {PLAIN_BOUND}",
                    fmt_ratio(w["kernel/plain"], ""), "1.00", w["kernel/plain"] <= PLAIN_BOUND))
    # the two roofline targets with the kernel and the roofline kernel interleaved (the
    # sequential rows at 2^24 move with the machine's memory bandwidth from case to case)
    x = probe.get("roofline_2_24")
    if x:
        q = x["kernel/roofline"]
        out.append(("2^24 f32: kernel time within 10% of the roofline kernel's, interleaved "
                    "probe (≤ 1.10)", fmt_ratio(q, ""), "1.00", q <= 1.10))
    x = next((r for r in probe.get("flat") or [] if r["dtype"] == "float32"
              and int(r["n"]) == 1 << 20 and "kernel/roofline" in r), None)
    if x:  # the speed-up over any baseline, as a fraction of the roofline kernel's
        q = 1 / x["kernel/roofline"]
        out.append(("2^20 f32: speed-up ≥ 90% of the roofline kernel's (roofline time ÷ "
                    "kernel time ≥ 0.90), interleaved probe", fmt_ratio(q, ""), "1.00",
                    q >= 0.90))
    return out


def torch_probe_targets(tprobe: dict[str, Any] | None
                        ) -> list[tuple[str, str, str, bool | None]]:
    """The torch-adapter targets again from ``bench/torch_probe.py``'s JSON (every
    implementation interleaved): per model, the three flag sets' speed-ups over torch
    fused, met when all three reach the model's goal."""
    if not tprobe:
        return []
    out: list[tuple[str, str, str, bool | None]] = []
    for row in tprobe.get("models", []):
        goal = 1.5 if "model100" in row["model"] else 1.0
        fast = sorted((k, v) for k, v in row["torch_fused_over"].items()
                      if k.startswith("fastadagrad.torch"))
        names = " / ".join(k.removeprefix("fastadagrad.torch").strip() or "default flags"
                           for k, _ in fast)
        out.append((f"{row['model']}: {names} ≥ {goal:g}× faster than torch fused, "
                    "interleaved probe", " / ".join(fmt_ratio(v, "×") for _, v in fast),
                    "—", all(v >= goal for _, v in fast)))
    for row in tprobe.get("flat", []):
        r = row["torch_fused_over_fast"]
        out.append((f"2^{row['n'].bit_length() - 1} f32: ≥ 2.5× faster than torch fused, "
                    "interleaved probe", fmt_ratio(r, "×"), "—", r >= 2.5))
    return out


def _probe_note(r: dict[str, Any], rows: str, script: str, tables: str, tail: str,
                threads: str = "") -> str:
    """Where a probe's rows come from: its start, machine, load and markdown file."""
    return (f"{rows} are from `bench/{script}.py` (started {r.get('started_utc', '?')} on "
            f"{r.get('machine', {}).get('cpu_model', '?')}, {threads}load average "
            f"{r.get('loadavg_start', [0])[0]:.2f} → {r.get('loadavg_end', [0])[0]:.2f}; "
            f"{tables}: `{r.get('_md', f'bench/results/{script}.md')}`{tail}")


def targets_table(run: Run, probe: dict[str, Any] | None = None,
                  tprobe: dict[str, Any] | None = None) -> str:
    lines = ["| speed target | measured | same ratio for the roofline "
             "kernel (for plain numba: 1) | met |", "|---|---:|---:|:---:|"]
    for name, value, bound, ok in [*targets(run), *probe_targets(probe), *peer_targets(run),
                                   *torch_probe_targets(tprobe)]:
        mark = "not measured" if ok is None else "yes" if ok else "**no**"
        lines.append(f"| {name} | {value} | {bound} | {mark} |")
    if tprobe:
        lines += ["", _probe_note(tprobe, "The torch \"interleaved probe\" rows", "torch_probe",
                                  "its table", "): every implementation's steps interleaved "
                                  "with the others' in each block, where the sequential rows "
                                  "above time each one on its own, back to back.")]
    if probe:
        lines += ["", _probe_note(probe, "The \"interleaved probe\" rows", "cpu_probe",
                                  "its full tables", ").",
                                  f"{probe.get('numba_threads', '?')} threads, ")]
    lines += ["", "The roofline column is the ceiling for a kernel that makes the update's "
              "reads and writes and costs nothing else: a speed-up target above it cannot be "
              "met on this machine by any such kernel. Where the measured ratio is below the "
              "ceiling, the difference is the arithmetic (IEEE `sqrt` and `/`) and call "
              "overhead."]
    return "\n".join(lines)


def options_table(run: Run) -> str:
    """Every formula option on vs the defaults, and the non-finite check, at 2^24 f32."""
    lines = ["| benchmark | variant | median | ÷ baseline | ÷ roofline |",
             "|---|---|---:|---:|---:|"]
    spec = (("options", "defaults", "every option on vs defaults"),
            ("nonfinite", "nonfinite='ignore'", "gradient check vs none"))
    any_row = marked = False
    for scenario, base, title in spec:
        for key in run.cases((scenario,)):
            row = run.times[key]
            for impl in sorted(row, key=lambda i: (i == ROOFLINE, i != base, i)):
                if impl == ROOFLINE:
                    continue
                any_row = True
                m = run.mark(key, impl, base, ROOFLINE)
                marked = marked or bool(m)
                lines.append(
                    f"| {title} ({DT[key[1]]} 2^{key[2].bit_length() - 1}) | {impl} | "
                    f"{fmt_time(row[impl])}{m} | "
                    f"{fmt_ratio(ratio(row[impl], row.get(base)), '')}"
                    f" | {fmt_ratio(ratio(row[impl], row.get(ROOFLINE)), '')} |")
    if marked:
        lines += ["", NOISY_NOTE]
    return "\n".join(lines) if any_row else ""


def startup_table(path: Path) -> str:
    if not path.exists():
        return ""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from startup import table  # the same formatting as the script prints

    data = json.loads(path.read_text())
    return table({k: v for k, v in data.items() if k != "repeat"}, data["repeat"])


def _num(x: object) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def llc_note(run: Run) -> str:
    """Which flat sizes fit in the last-level cache the CPU reports (p, g, h resident).

    The size is the level-3 cache sysfs reported when the benchmarks ran
    (``bench/machine.py``); where there was none, the note says it is unknown.
    """
    l3 = run.raw["machine_info"].get("fastadagrad", {}).get("llc_bytes")
    if not isinstance(l3, int) or l3 <= 0:
        return (" The last-level cache size is unknown (the OS reported no level-3 cache "
                "when this ran), so which sizes fit in it is not stated.")
    fits = {}
    for dtype, size in (("float32", 4), ("float64", 8)):
        ns = [k[2] for k in run.cases(("flat",)) if k[1] == dtype and 3 * size * k[2] <= l3]
        if ns:
            fits[dtype] = f"2^{max(ns).bit_length() - 1} {DT[dtype]}"
    if not fits:
        return ""
    return (f" The CPU reports a {l3 / 2**20:,.0f} MiB last-level cache: the flat buffers up "
            f"to {' / '.join(fits.values())} (p, g and h together) fit in it, so only larger "
            "ones are bound by DRAM bandwidth.")


def footnote(run: Run, command: str) -> str:
    m = run.raw["machine_info"]
    f = m.get("fastadagrad", {})
    th = f.get("threads", {})
    v = f.get("versions", {})
    c = run.raw.get("commit_info", {})
    date = datetime.fromisoformat(run.raw["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    cpu = f.get("cpu_model") or m.get("cpu", {}).get("brand_raw", "?")
    if f.get("loadavg_start") and f.get("loadavg_end"):
        load = (f" 1-minute load average {f['loadavg_start'][0]:.2f} at the start, "
                f"{f['loadavg_end'][0]:.2f} at the end (other processes on the cores are "
                "noise).")
    else:
        load = " Load average: not recorded."
    rounds = f"at least {min(run.rounds)}" if run.rounds else "?"
    commit = c.get("id", "?")[:10] + (" + uncommitted changes" if c.get("dirty") else "")
    versions = ", ".join(f"{k} {val}" for k, val in v.items())
    return (
        f"Measured {date} on `{m.get('node', '?')}` ({m.get('system', '')} "
        f"{m.get('release', '')}, {m.get('machine', '')}): {cpu}, "
        f"vector width {f.get('vector_isa', 'unknown')}, "
        f"{_cpus(th)}, last-level cache "
        f"{machine.fmt_llc(f.get('llc_bytes'))}"
        f"; numba {th.get('numba', '?')} threads ({th.get('numba_threading_layer', '?')}),"
        f" torch {th.get('torch', '?')} threads. {versions}; fastadagrad commit {commit};"
        f" serial below {_threshold(f.get('parallel_threshold'))}, chunk "
        f"{_num(f.get('chunk'))}. Medians of {rounds} rounds per case (pytest-benchmark "
        f"{run.raw.get('version', '?')}), after warm-up calls that compile the kernels "
        f"and fault in every page.{load} Command: {command}."
    )


def _cpus(th: dict[str, Any]) -> str:
    """The CPUs the run could use (its affinity), and the online count where it differs."""
    online, usable = th.get("os_cpu_count"), th.get("usable_cpus")
    if usable is None or usable == online:
        return f"{online if online is not None else '?'} CPUs"
    return f"{usable} usable CPUs of {online if online is not None else '?'} online"


def _threshold(t: Any) -> str:
    """The serial/parallel switch for both dtypes (float64 switches at a quarter)."""
    if not isinstance(t, int):
        return f"{_num(t)} elements"
    from fastadagrad import config

    return (f"{_num(config.parallel_from(4, t))} float32 / "
            f"{_num(config.parallel_from(8, t))} float64 elements")


def _rel(path: Path) -> Path:
    try:
        return path.resolve().relative_to(REPO)
    except ValueError:
        return path.resolve()


def report_command(run: Run, json_path: Path, probe_path: Path | None = None,
                   tprobe_path: Path | None = None, startup_path: Path | None = None) -> str:
    """The commands that produced the report, and whether they are ``make bench``'s;
    ``startup_path``: the ``bench/startup.py`` JSON whose table the report includes."""
    pytest_cmd = run.raw["machine_info"].get("fastadagrad", {}).get("command", "pytest ...")
    steps, opts = [f"`{pytest_cmd}`"], ""
    if startup_path is not None:  # read from the JSON's folder: no option of report.py
        steps.append(f"`python bench/startup.py --json {_rel(startup_path)}`")
    for script, flag, path in (("cpu_probe", "--probe", probe_path),
                               ("torch_probe", "--torch-probe", tprobe_path)):
        if path is not None:
            steps.append(f"`python bench/{script}.py --json {_rel(path)}`")
            opts += f" {flag} {_rel(path)}"
    cmd = f"{', '.join(steps)}, then `python bench/report.py {_rel(json_path)}{opts}`"
    makefile = REPO / "Makefile"
    args = pytest_cmd.removeprefix("python -m pytest ")
    if makefile.exists() and f"pytest {args}" in makefile.read_text():
        return f"`make bench`, which runs {cmd}"
    return cmd


# --- plot ---------------------------------------------------------------------------

def plot(run: Run, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = [d for d in ("float32", "float64") if any(k[0] == "flat" and k[1] == d
                                                        for k in run.times)]
    fig, axes = plt.subplots(1, max(len(dtypes), 1), figsize=(6.4 * len(dtypes), 4.8),
                             sharey=True, squeeze=False)
    styles: dict[str, dict[str, Any]] = {
        FAST: dict(color="tab:red", linewidth=2.5), "fastadagrad serial": dict(color="tab:orange"),
        FAST_FLAT: dict(color="tab:pink"), NUMPY: dict(color="tab:gray"),
        "torch for-loop": dict(color="tab:green"), "torch foreach": dict(color="tab:olive"),
        TORCH_FUSED: dict(color="tab:blue", linewidth=2), "DeepSpeed CPU": dict(color="tab:purple"),
        PLAIN: dict(color="tab:brown", linestyle=":"),
        PLAIN_SERIAL: dict(color="tab:brown", linestyle=":", alpha=0.5),
        FAST_KERNEL: dict(color="tab:red", linestyle=":", linewidth=1),
        FAST_KERNEL_SERIAL: dict(color="tab:orange", linestyle=":", linewidth=1),
        ROOFLINE: dict(color="black", linestyle="--")}
    for ax, dtype in zip(axes[0], dtypes, strict=False):
        keys = [k for k in run.cases(("flat",)) if k[1] == dtype]
        for impl in IMPL_ORDER:
            pts = [(k[2], run.info[k]["bytes"] / run.times[k][impl] / 1e9) for k in keys
                   if impl in run.times[k]]
            if pts:
                x, y = zip(*pts, strict=True)
                ax.plot(x, y, marker="o", markersize=4, label=impl, **styles.get(impl, {}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("elements in the buffer")
        ax.set_title(f"one flat buffer, {dtype} ({20 if dtype == 'float32' else 40} B/element)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("effective GB/s = 5 × itemsize × n / median time")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    date = datetime.fromisoformat(run.raw["datetime"]).strftime("%Y-%m-%d")
    cpu = run.raw["machine_info"].get("fastadagrad", {}).get("cpu_model", "")
    fig.suptitle(f"AdaGrad step throughput, {cpu}, {date} (higher is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- output -------------------------------------------------------------------------

WORKFLOW = """\
#### Checking a change against a saved baseline

```sh
# 1. on the baseline commit: time the cases you care about and save them
#    (stored under .benchmarks/, which is git-ignored)
.venv/bin/pytest bench --benchmark-only -k "flat and float32" --benchmark-save=baseline
# 2. make the change, then rerun the same cases against the latest saved run
#    (or --benchmark-compare=0001 for a specific one); fail if a median is >10% slower
.venv/bin/pytest bench --benchmark-only -k "flat and float32" \\
    --benchmark-compare --benchmark-compare-fail=median:10%
# 3. or compare saved runs side by side, without running anything
.venv/bin/pytest-benchmark compare 0001 0002 --group-by=group --columns=median,iqr
```

Medians on a shared 2-core machine move by 5-20% between runs; compare
interleaved runs of the same cases, not numbers from different days. `make test` runs
every benchmark once with timing disabled (`--benchmark-disable`, at most 2^16
elements), so a broken benchmark fails CI.
"""


def render(run: Run, json_path: Path, png: Path, md: Path, base: Path,
           probe: dict[str, Any] | None = None, tprobe: dict[str, Any] | None = None
           ) -> tuple[str, str]:
    """(full markdown report, README block body); links are relative to ``base``;
    ``probe``: ``bench/cpu_probe.py``'s JSON, for its interleaved target rows."""
    startup_path = json_path.parent / "startup.json"
    startup = startup_table(startup_path)
    command = report_command(run, json_path,
                             *(Path(x["_path"]) if x and "_path" in x else None
                               for x in (probe, tprobe)),
                             startup_path=startup_path if startup else None)
    opts = options_table(run)

    def rel(p: Path, to: Path) -> str:
        try:
            return str(p.resolve().relative_to(to.resolve()))
        except ValueError:
            return str(p.resolve())

    head = [
        "fastadagrad against torch.optim.Adagrad (CPU) fused, the NumPy AdaGrad class it "
        "replaces, DeepSpeed's CPU Adagrad where it is installed, \"plain numba\" "
        "(`bench/plain.py`: the update written as one plain `prange` loop, same math and "
        "bits, no validation), \"fastadagrad kernel\" (the library's own compiled kernel "
        "called directly, without the public call's checks and dispatch) and the roofline "
        "kernel (`bench/roofline.py`: the same reads "
        "and writes, trivial math). Speed-ups are ratios of medians from one run; "
        "\"time ÷ roofline\" of 1.00 is the memory-bandwidth limit, \"time ÷ plain "
        "numba\" above 1 is what the library's checks and dispatch cost over a bare loop "
        "(\"plain numba\" and \"fastadagrad kernel\" are the parallel loops at every "
        "size, while the public call runs its serial kernel below the threshold in the "
        "footnote: there the column compares serial with parallel)."
        + llc_note(run),
        "",
        ratio_table(run),
        "",
        targets_table(run, probe, tprobe),
    ]
    peers = peer_table(run)
    if peers:
        head += ["", "Embedding tables and the torch adapter (CPU), each against its "
                 "baseline: torch's sparse Adagrad step, FBGEMM's fused CPU step "
                 "(`fbgemm-gpu-cpu`), torch fused:", "", peers]
    half = half_table(run)
    if half:
        head += ["", "16-bit params with a float32 accumulator (`bench/test_bench_half.py`),"
                 " one flat array, against the float32 step of the same size and torch "
                 "fused on bfloat16 tensors (whose accumulator is bfloat16):", "", half]
    full = ["# Benchmark report", "", *head, "",
            f"![effective GB/s vs size]({rel(png, md.parent)})", "",
            "## Median time per step, every implementation", "",
            "Bold: the fastest implementation of the case (the roofline excluded).", "",
            medians_table(run), ""]
    if opts:
        full += ["## Options", "", opts, ""]
    if startup:
        full += ["## Import and first-update time (`bench/startup.py`)", "", startup, ""]
    full += ["---", "", footnote(run, command), ""]
    readme = [*head, "",
              f"![effective GB/s vs size]({rel(png, base)})", "",
              f"Every implementation's median, the option benchmarks and more: "
              f"[{rel(md, base)}]({rel(md, base)})."]
    if startup:
        readme += ["", "#### Import and first update", "", startup]
    readme += ["", "<sub>" + footnote(run, command) + "</sub>", "", WORKFLOW]
    return "\n".join(full), "\n".join(readme)


def write_readme_block(readme: Path, body: str) -> None:
    block = f"{START}\n<!-- generated by bench/report.py from the benchmark JSON; edits "\
            f"here are overwritten -->\n{body.rstrip()}\n{END}"
    if not readme.exists():
        readme.write_text(f"# fastadagrad\n\n{block}\n")
        return
    text = readme.read_text()
    if START in text and END in text and text.index(START) < text.index(END):
        pre, rest = text.split(START, 1)
        post = rest.split(END, 1)[1]
        readme.write_text(pre + block + post)
    else:
        readme.write_text(text.rstrip() + "\n\n" + block + "\n")


def strip_round_data(path: Path) -> None:
    raw = json.loads(path.read_text())
    if any("data" in b.get("stats", {}) for b in raw.get("benchmarks", [])):
        for b in raw["benchmarks"]:
            b.get("stats", {}).pop("data", None)
        path.write_text(json.dumps(raw, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", type=Path, help="pytest-benchmark --benchmark-json output")
    ap.add_argument("--readme", type=Path, default=REPO / "README.md")
    ap.add_argument("--no-readme", action="store_true", help="leave the README alone")
    ap.add_argument("--probe", type=Path,
                    help="bench/cpu_probe.py's JSON: its interleaved kernel-vs-plain-loop "
                    "ratios join the targets table")
    ap.add_argument("--torch-probe", type=Path,
                    help="bench/torch_probe.py's JSON: its interleaved torch-adapter ratios "
                    "join the targets table")
    ap.add_argument("--keep-data", action="store_true",
                    help="keep the per-round timings in the JSON (default: strip them)")
    args = ap.parse_args(argv)
    if not args.keep_data:
        strip_round_data(args.json)

    run = Run(args.json)
    if not run.times:
        print(f"{args.json}: no fastadagrad benchmarks in this file", file=sys.stderr)
        return 1
    png, md = args.json.with_suffix(".png"), args.json.with_suffix(".md")
    plot(run, png)
    probe = None
    if args.probe:
        probe = json.loads(args.probe.read_text())
        probe["_md"] = str(_rel(args.probe.with_suffix(".md")))
        probe["_path"] = str(args.probe)
    tprobe = None
    if args.torch_probe:
        tprobe = json.loads(args.torch_probe.read_text())
        tprobe["_md"] = str(_rel(args.torch_probe.with_suffix(".md")))
        tprobe["_path"] = str(args.torch_probe)
    full, block = render(run, args.json, png, md, args.readme.resolve().parent, probe,
                         tprobe)
    md.write_text(full)
    if not args.no_readme:
        write_readme_block(args.readme, block)
    print(ratio_table(run))
    print()
    print(targets_table(run, probe, tprobe))
    print(f"\nwrote {md}, {png}" + ("" if args.no_readme else f" and the block in {args.readme}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
