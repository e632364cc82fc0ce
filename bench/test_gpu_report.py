"""The README's GPU block is generated from the committed GPU results (never rots)."""

from __future__ import annotations

from bench import gpu_report


def test_gpu_block_from_committed_results():
    text = gpu_report.block(gpu_report.ROOT / "bench" / "results" / "gpu-h100")
    assert "mismatches" in text and "| 2^26 |" in text
    assert "µs" in text
