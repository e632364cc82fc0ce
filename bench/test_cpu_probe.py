"""bench/cpu_probe.py runs end to end (a smoke run: tiny sizes, few calls) and writes
the JSON the lead reads on another machine."""

from __future__ import annotations

import json
from pathlib import Path

from bench import cpu_probe
from bench.plain import OPTION_SETS


def test_probe_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    assert cpu_probe.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["quick"] is True and r["numba_threads"] >= 1
    assert {"cpu_model", "vector_isa", "usable_cpus", "llc_bytes"} <= set(r["machine"])
    assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3
    assert [(x["dtype"], x["n"]) for x in r["flat"]] == [
        (dt, n) for dt in ("float32", "float64") for n in (1024, 2048)]
    for row in r["flat"]:
        assert set(row["median_us"]) == set(cpu_probe.FLAT)
        assert all(v > 0 for v in row["median_us"].values()) and row["kernel/plain"] > 0
    assert {x["n"] for x in r["serial"]} == {1024, 2048}
    assert {x["n"] for x in r["threshold"]} == {4096, 8192}
    assert set(r["threshold"][0]["median_us"]) == set(cpu_probe.THRESHOLD)
    assert set(r["threshold_suggested"]) == {"float32", "float64"}
    # every option set, both dtypes, the parallel and the serial kernel (2^10 when quick)
    assert sorted((x["option_set"], x["mode"], x["dtype"], x["n"]) for x in r["options"]) == \
        sorted((name, mode, dt, 1024) for name in OPTION_SETS
               for mode in ("parallel", "serial") for dt in ("float32", "float64"))
    for row in r["options"]:
        assert set(row["median_us"]) == set(cpu_probe.OPTION_PAIR)
        assert all(v > 0 for v in row["median_us"].values()) and row["kernel/plain"] > 0
    # the square-root/division ablation, 2^10 and 2^11 when quick
    assert [(x["dtype"], x["n"]) for x in r["bound"]] == [
        (dt, n) for dt in ("float32", "float64") for n in (1024, 2048)]
    for row in r["bound"]:
        assert set(row["median_us"]) == set(cpu_probe.BOUND)
        assert row["per_roofline"]["roofline"] == 1.0
    md = out.with_suffix(".md").read_text()
    lines = md.splitlines()
    # flat, serial and bound
    assert sum(x.startswith("| float32 | 2^10 |") for x in lines) == 3
    assert "## What bounds the update in cache" in md
    assert "| float64 | 4,096 |" in md
    assert "| torch, all options | serial | float64 | 2^10 |" in md
    assert "Worst kernel ÷ plain:" in md


def test_probe_only_one_section(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    assert cpu_probe.main(["--quick", "--only", "options", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["options"]) == 4 * 2 * 2
    assert not {"flat", "serial", "threshold", "threshold_suggested", "bound"} & set(r)
    md = out.with_suffix(".md").read_text()
    assert "## Every option set" in md and "## Serial kernel" not in md


def test_suggest_threshold() -> None:
    def row(n: int, par: float, ser: float) -> dict:
        return {"dtype": "float32", "n": n,
                "median_us": {"adagrad_update forced parallel": par,
                              "adagrad_update forced serial": ser}}

    rows = [row(1 << 12, 5, 2), row(1 << 13, 3, 4), row(1 << 14, 6, 5), row(1 << 15, 7, 9),
            row(1 << 16, 8, 20)]
    # parallel wins at 2^13 but loses again at 2^14: the threshold is 2^15
    assert cpu_probe.suggest_threshold(rows, "float32") == 1 << 15
    assert cpu_probe.suggest_threshold([row(1 << 12, 5, 2)], "float32") is None
