"""The report script runs on a pytest-benchmark JSON (a synthetic one here), writes the
markdown and the plot, and rewrites only the README block between its markers."""

from __future__ import annotations

import json
from pathlib import Path

from bench import benchlib as B
from bench import machine, report


def fake_run(path: Path, llc: int | None = 32 << 20) -> None:
    benchmarks = []
    speed = {B.FAST: 1.0, B.FAST_SERIAL: 1.3, B.NUMPY: 25.0, B.TORCH_FUSED: 3.0,
             B.FAST_KERNEL: 1.0, B.FAST_KERNEL_SERIAL: 1.3, B.PLAIN: 1.05,
             B.PLAIN_SERIAL: 1.2, B.ROOFLINE: 0.95}
    cases = [("flat", dt, 1 << k) for dt in ("float32", "float64") for k in (16, 20, 24)]
    cases += [("model100", "float32", 2953450), ("options", "float32", 1 << 24),
              ("nonfinite", "float32", 1 << 24)]
    # the options group's kernel and plain loop of one flag set: 1.03x, within 1.05
    options_speed = {B.OPTIONS_KERNEL: 1.03 * 1.2, B.OPTIONS_PLAIN: 1.2}
    for scenario, dtype, n in cases:
        impls = {"options": ["defaults", "all options", B.ROOFLINE, B.OPTIONS_KERNEL,
                             B.OPTIONS_PLAIN],
                 "nonfinite": ["nonfinite='ignore'", "nonfinite='skip'", B.ROOFLINE]
                 }.get(scenario, list(speed))
        for i, impl in enumerate(impls):
            t = n * 1e-9 * speed.get(impl, options_speed.get(impl, 1.0 + i))
            benchmarks.append({
                "group": f"{scenario} {dtype} {n}", "name": impl,
                "extra_info": {"scenario": scenario, "impl": impl, "dtype": dtype, "n": n,
                               "bytes": 5 * (4 if dtype == "float32" else 8) * n,
                               **({"tensors": 100} if scenario == "model100" else {})},
                "stats": {"median": t, "min": t / (2 if impl == "all options" else 1),
                          "rounds": 15, "data": [t] * 15}})
    path.write_text(json.dumps({
        "machine_info": {"node": "ci", "system": "Linux", "release": "x", "machine": "x86_64",
                         "cpu": {"brand_raw": "Some CPU"},
                         "fastadagrad": {"cpu_model": "Some CPU", "threads": {"numba": 2},
                                         "vector_isa": "AVX-512 (512-bit)",
                                         "llc_bytes": llc,
                                         "loadavg_start": [0.25, 0.1, 0.1],
                                         "loadavg_end": [1.5, 0.5, 0.2],
                                         "versions": {"numba": "0"},
                                         "command": "python -m pytest bench"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "datetime": "2026-01-01T00:00:00+00:00", "version": "5", "benchmarks": benchmarks}))


def test_report_writes_markdown_plot_and_readme_block(tmp_path: Path) -> None:
    data = tmp_path / "results" / "run.json"
    data.parent.mkdir()
    fake_run(data)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n\n<!-- bench:start -->\nOLD-BLOCK\n<!-- bench:end -->\n"
                      "\nafter\n")
    assert report.main([str(data), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "OLD-BLOCK" not in text and text.count("<!-- bench:start -->") == 1
    # fastadagrad 1.0, plain numba 1.05, roofline 0.95 (time per element, fake)
    assert "| flat f32 2^24 | fastadagrad | 16.8 ms | 3.00× | 25.0× | 0.95 | 1.05 |" in text
    assert "| flat f32 2^24 | plain numba | 17.6 ms | 2.86× | 23.8× | 1.00 | 1.11 |" in text
    # the footnote: CPU, vector width, last-level cache (sysfs), load at start and end
    assert "Some CPU, vector width AVX-512 (512-bit)" in text
    assert "last-level cache 32 MiB" in text
    assert "load average 0.25 at the start, 1.50 at the end" in text
    assert "a 32 MiB last-level cache: the flat buffers up to 2^20 f32 / 2^20 f64" in text
    assert "](results/run.png)" in text
    assert (data.with_suffix(".png")).stat().st_size > 1000
    assert all("data" not in b["stats"] and b["stats"]["median"] > 0
               for b in json.loads(data.read_text())["benchmarks"])
    md = data.with_suffix(".md").read_text()
    assert "all options" in md and "nonfinite='skip'" in md
    # a median twice the fastest round is flagged as disturbed, and only that one
    assert md.count("†") == 2 and "| all options | 33.6 ms† |" in md
    # 2^24 f32 at 1.05x the roofline, 3x torch fused at 2^16 and on the model, 25x NumPy
    # (>= 90% of the roofline's 26.3x), the kernel at 0.95x plain numba: met; the serial
    # kernel at 1.3 / 1.2 = 1.08x the plain serial loop: not met.
    # and the torch-formula kernel at 1.03x its plain loop (options group): met
    assert md.count("| yes |") == 6 and md.count("| **no** |") == 1
    assert ("| kernel ÷ plain numba, all options (torch's formula, f32 2^24) ≤ 1.05 | 1.03 "
            "| 1.00 | yes |") in md
    assert f"| {B.OPTIONS_KERNEL} | 20.7 ms | 1.24 | 1.30 |" in md
    assert "fastadagrad kernel serial ≤ 1.05× the time of plain numba serial" in md
    assert "| 1.08 | 1.00 | **no** |" in md
    # the ceilings: torch fused / roofline = 3 / 0.95, NumPy / roofline = 25 / 0.95
    assert "| 3.00× | 3.16× | yes |" in md and "| 25.0× | 26.3× | yes |" in md


def test_report_creates_readme_when_missing(tmp_path: Path) -> None:
    data = tmp_path / "run.json"
    fake_run(data)
    readme = tmp_path / "README.md"
    assert report.main([str(data), "--readme", str(readme)]) == 0
    assert "<!-- bench:end -->" in readme.read_text()


def test_report_says_unknown_without_a_level3_cache(tmp_path: Path) -> None:
    data = tmp_path / "run.json"
    fake_run(data, llc=None)
    assert report.main([str(data), "--no-readme"]) == 0
    md = data.with_suffix(".md").read_text()
    assert "last-level cache unknown" in md and "cache size is unknown" in md
    assert "MiB last-level cache" not in md


def test_machine_facts_from_sysfs_and_cpuinfo(tmp_path: Path) -> None:
    for i, (level, size) in enumerate((("1", "32K"), ("2", "1024K"), ("3", "32768K"))):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(level + "\n")
        (d / "size").write_text(size + "\n")
    assert machine.llc_bytes(tmp_path) == 32 << 20
    (tmp_path / "index2" / "level").write_text("2\n")  # no level 3 left: unknown
    assert machine.llc_bytes(tmp_path) is None
    assert machine.llc_bytes(tmp_path / "missing") is None
    assert machine.fmt_llc(None) == "unknown" and machine.fmt_llc(32 << 20) == "32 MiB"
    assert machine.vector_isa({"flags": "fpu sse2 avx avx2 fma"}) == "AVX2 (256-bit)"
    assert machine.vector_isa({"flags": "sse2 avx2 avx512f"}) == "AVX-512 (512-bit)"
    assert machine.vector_isa({}) == "unknown"


def test_report_adds_the_probe_rows(tmp_path: Path) -> None:
    """With ``--probe``, the interleaved probe's worst kernel ÷ plain ratio of each
    section joins the targets table, with where it was worst and the probe's machine."""
    data = tmp_path / "run.json"
    fake_run(data)
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({
        "started_utc": "2026-01-01T00:00:00Z", "machine": {"cpu_model": "Probe CPU"},
        "numba_threads": 2, "loadavg_start": [0.5, 0, 0], "loadavg_end": [0.75, 0, 0],
        "flat": [{"dtype": "float32", "n": 1024, "kernel/plain": 0.98},
                 {"dtype": "float64", "n": 1 << 16, "kernel/plain": 1.02},
                 {"dtype": "float32", "n": 1 << 20, "kernel/plain": 0.95,
                  "kernel/roofline": 1.6}],
        "roofline_2_24": {"kernel/roofline": 0.99},
        "serial": [{"dtype": "float32", "n": 1 << 14, "kernel/plain": 1.07}],
        "options": [{"option_set": "optax", "mode": "serial", "dtype": "float32",
                     "n": 1 << 14, "kernel/plain": 1.01}]}))
    assert report.main([str(data), "--no-readme", "--probe", str(probe)]) == 0
    md = data.with_suffix(".md").read_text()
    # (the sizes and dtypes named are those the probe measured)
    assert ("parallel kernel ÷ plain loop, 2^10-2^20 f32/f64, interleaved probe, worst "
            "(float64 2^16) ≤ 1.05 | 1.02 | 1.00 | yes |") in md
    assert ("serial kernel ÷ plain serial loop, 2^14 f32, interleaved probe, worst "
            "(float32 2^14) ≤ 1.05 | 1.07 | 1.00 | **no** |") in md
    assert "kernel ÷ its plain loop, interleaved probe, worst (optax serial float32 2^14)" in md
    assert "on Probe CPU, 2 threads, load average 0.50 → 0.75" in md
    assert "kernel time within 10% of the roofline kernel's, interleaved probe (≤ 1.10) " \
        "| 0.99 | 1.00 | yes |" in md
    assert "(roofline time ÷ kernel time ≥ 0.90), interleaved probe | 0.62 | 1.00 | **no** |" \
        in md
    assert "`" + str(probe.with_suffix(".md")) + "`" in md
    assert f"`python bench/cpu_probe.py --json {probe}`, then `python bench/report.py " \
        f"{data} --probe {probe}`" in md


def test_report_command_lists_startup_when_its_table_is_in(tmp_path: Path) -> None:
    """The footnote's command list names every script whose figures the report shows:
    bench/startup.py when startup.json (read from the JSON's folder) is there."""
    data = tmp_path / "run.json"
    fake_run(data)
    run = report.Run(data)
    without = report.report_command(run, data)
    assert "startup.py" not in without
    with_startup = report.report_command(run, data, startup_path=tmp_path / "startup.json")
    assert (f"`python -m pytest bench`, `python bench/startup.py --json "
            f"{tmp_path / 'startup.json'}`, then `python bench/report.py {data}`"
            in with_startup)


def _bench(scenario: str, dtype: str, n: int, impl: str, t: float) -> dict:
    return {"group": f"{scenario} {dtype} {n}", "name": impl,
            "extra_info": {"scenario": scenario, "impl": impl, "dtype": dtype, "n": n},
            "stats": {"median": t, "min": t, "rounds": 15}}


def _with(path: Path, extra: list[dict], threads: dict | None = None) -> report.Run:
    raw = json.loads(path.read_text())
    raw["benchmarks"] += extra
    if threads:
        raw["machine_info"]["fastadagrad"]["threads"].update(threads)
        raw["machine_info"]["fastadagrad"]["parallel_threshold"] = 1 << 15
    path.write_text(json.dumps(raw))
    return report.Run(path)


def test_report_half_targets_rowwise_roofline_and_missing_baselines(tmp_path: Path) -> None:
    """The 16-bit cases get their table and their 2^24 targets (master weights, which
    move as many bytes as float32, none); the rows roofline (a full accumulator's
    traffic) is not divided into a rowwise time; an overhead target whose baseline case
    is missing is not measured (it read 0.00 and passed); the footnote gives both
    dtypes' thresholds and the CPUs the run could use."""
    data = tmp_path / "run.json"
    fake_run(data)
    n = 1 << 24
    run = _with(data, [
        _bench("half", "float32", n, "fastadagrad float32", 20e-3),
        _bench("half", "bfloat16", n, "fastadagrad bfloat16", 14e-3),
        _bench("half", "bfloat16", n, "fastadagrad bfloat16 master", 20e-3),
        _bench("half", "bfloat16", n, "fastadagrad bfloat16 stochastic", 25e-3),
        _bench("half", "bfloat16", n, "torch fused bfloat16", 15e-3),
        _bench("rows-zipf", "float32", 1000, "torch sparse Adagrad", 2e-3),
        _bench("rows-zipf", "float32", 1000, "fastadagrad rowwise", 1e-3),
        _bench("rows-zipf", "float32", 1000, B.ROOFLINE, 0.5e-3),
        _bench("overhead", "float32", 64, "AdaGrad.update dict", 5e-6),
        _bench("overhead", "float32", 64, "AdaGrad.update list", 5e-6),
    ], threads={"os_cpu_count": 16, "usable_cpus": 2})
    targets = {t[0]: t[1:] for t in report.peer_targets(run)}
    assert targets["16-bit params, bfloat16 at 2^24: ≥ 1.3× faster than the float32 step"
                   ] == ("1.43×", "—", True)
    assert targets["16-bit params, bfloat16 stochastic at 2^24: ≥ 1.3× faster than the "
                   "float32 step"][2] is False
    assert not any("master" in t for t in targets)
    over = next(v for k, v in targets.items() if k.startswith("AdaGrad.update (list"))
    assert over == ("—", "—", None)
    assert "| 2^24 | fastadagrad bfloat16 | 14 ms | 1.43× | 1.07× |" in report.half_table(run)
    rowwise = next(line for line in report.peer_table(run).splitlines()
                   if "fastadagrad rowwise" in line)
    assert rowwise.endswith("| — |"), rowwise
    note = report.footnote(run, "cmd")
    assert "2 usable CPUs of 16 online" in note
    assert "serial below 32,768 float32 / 8,192 float64 elements" in note
