"""The report script runs on a pytest-benchmark JSON (a synthetic one here), writes the
markdown and the plot, and rewrites only the README block between its markers."""

from __future__ import annotations

import json
from pathlib import Path

from bench import benchlib as B
from bench import report


def fake_run(path: Path) -> None:
    benchmarks = []
    speed = {B.FAST: 1.0, B.FAST_SERIAL: 1.3, B.NUMPY: 25.0, B.TORCH_FUSED: 3.0,
             B.ROOFLINE: 0.95}
    cases = [("flat", dt, 1 << k) for dt in ("float32", "float64") for k in (16, 20, 24)]
    cases += [("model100", "float32", 2953450), ("options", "float32", 1 << 24),
              ("nonfinite", "float32", 1 << 24)]
    for scenario, dtype, n in cases:
        impls = {"options": ["defaults", "all options", B.ROOFLINE],
                 "nonfinite": ["nonfinite='ignore'", "nonfinite='skip'", B.ROOFLINE]
                 }.get(scenario, list(speed))
        for i, impl in enumerate(impls):
            t = n * 1e-9 * speed.get(impl, 1.0 + i)
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
                                         "versions": {"numba": "0"},
                                         "command": "python -m pytest bench"}},
        "commit_info": {"id": "0123456789abcdef", "dirty": False},
        "datetime": "2026-01-01T00:00:00+00:00", "version": "5", "benchmarks": benchmarks}))


def test_report_writes_markdown_plot_and_readme_block(tmp_path: Path) -> None:
    data = tmp_path / "results" / "run.json"
    data.parent.mkdir()
    fake_run(data)
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n\n<!-- bench:start -->\nold\n<!-- bench:end -->\n"
                      "\nafter\n")
    assert report.main([str(data), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nbefore\n") and text.endswith("\nafter\n")
    assert "old" not in text and text.count("<!-- bench:start -->") == 1
    assert "| flat f32 2^24 | fastadagrad | 16.8 ms | 3.00× | 25.0× | 1.05 |" in text
    assert "](results/run.png)" in text
    assert (data.with_suffix(".png")).stat().st_size > 1000
    assert all("data" not in b["stats"] and b["stats"]["median"] > 0
               for b in json.loads(data.read_text())["benchmarks"])
    md = data.with_suffix(".md").read_text()
    assert "all options" in md and "nonfinite='skip'" in md
    # a median twice the fastest round is flagged as disturbed, and only that one
    assert md.count("†") == 2 and "| all options | 33.6 ms† |" in md
    # 2^24 f32 at 1.05x the roofline, 3x torch fused at 2^16, 25x NumPy: all four met.
    assert md.count("| yes |") == 4
    # the ceilings: torch fused / roofline = 3 / 0.95, NumPy / roofline = 25 / 0.95
    assert "| 3.00× | 3.16× | yes |" in md and "| 25.0× | 26.3× | yes |" in md


def test_report_creates_readme_when_missing(tmp_path: Path) -> None:
    data = tmp_path / "run.json"
    fake_run(data)
    readme = tmp_path / "README.md"
    assert report.main([str(data), "--readme", str(readme)]) == 0
    assert "<!-- bench:end -->" in readme.read_text()
