"""bench/torch_probe.py runs end to end (a smoke run: tiny models, few steps) and its
rows reach the report's targets table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import benchlib as B

pytest.importorskip("torch")

from bench import report, torch_probe  # noqa: E402
from bench.test_bench_torch import IMPLS, MODELS  # noqa: E402


def test_torch_probe_smoke_run(tmp_path: Path) -> None:
    out = tmp_path / "tp.json"
    assert torch_probe.main(["--quick", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["quick"] is True and len(r["loadavg_end"]) == 3
    assert [row["model"] for row in r["models"]] == list(MODELS)
    for row in r["models"]:
        assert set(row["median_us"]) == set(IMPLS)
        assert all(v > 0 for v in row["median_us"].values())
        assert row["torch_fused_over"][B.TORCH_FUSED] == 1.0
    (flat,) = r["flat"]
    assert flat["n"] == 256 and set(flat["median_us"]) == {B.FAST, B.TORCH_FUSED}
    med = flat["median_us"]  # (rounded to 0.001 us: the ratio is from the unrounded)
    assert flat["torch_fused_over_fast"] == pytest.approx(
        med[B.TORCH_FUSED] / med[B.FAST], rel=1e-3)
    (after,) = r["after_set_num_threads"]
    assert after["model"] == "torch-model100" and set(after["median_us"]) == set(IMPLS)
    md = out.with_suffix(".md").read_text()
    assert "One flat float32 array of 256 elements" in md
    assert f"After `torch.set_num_threads({r['torch_threads']})`" in md
    assert "| torch-model100 (2,953,450" not in md  # quick: the shrunken model
    assert "fastadagrad.torch fused=True" in md and "≥ 1.5×" in md


def test_report_adds_the_torch_probe_rows() -> None:
    tprobe = {"models": [
        {"model": "torch-model100", "torch_fused_over": {
            "fastadagrad.torch": 1.6, "fastadagrad.torch fused=True": 1.7,
            "fastadagrad.torch foreach=True": 1.4, B.TORCH_FUSED: 1.0}},
        {"model": "torch-1x1024", "torch_fused_over": {
            "fastadagrad.torch": 1.2, "fastadagrad.torch fused=True": 1.3,
            "fastadagrad.torch foreach=True": 1.1, B.TORCH_FUSED: 1.0}}],
        "flat": [{"dtype": "float32", "n": 65536, "torch_fused_over_fast": 2.4}]}
    rows = report.torch_probe_targets(tprobe)
    assert rows[2:] == [("2^16 f32: ≥ 2.5× faster than torch fused, interleaved probe",
                         "2.40×", "—", False)]
    assert rows[:2] == [
        ("torch-model100: default flags / foreach=True / fused=True ≥ 1.5× faster than "
         "torch fused, interleaved probe", "1.60× / 1.40× / 1.70×", "—", False),
        ("torch-1x1024: default flags / foreach=True / fused=True ≥ 1× faster than torch "
         "fused, interleaved probe", "1.20× / 1.10× / 1.30×", "—", True)]
    assert report.torch_probe_targets(None) == []
