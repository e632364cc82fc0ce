"""The README's GPU block is generated from the committed GPU results (never rots)."""

from __future__ import annotations

from bench import gpu_report


def test_gpu_block_from_committed_results():
    text = gpu_report.block(gpu_report.ROOT / "bench" / "results" / "gpu-h100")
    assert "mismatches" in text and "| 2^26 |" in text
    assert "µs" in text


def test_check_block_reads_a_gpu_check_run(tmp_path, monkeypatch):
    """The block for a bench/gpu_check.sh directory: every figure comes from its files."""
    import json
    import shutil

    results = gpu_report.ROOT / "bench" / "results"
    val = json.loads((results / "gpu-h100" / "h100-validate.json").read_text())
    val["environment"]["launch_path"] = ["cuda.core", "why"]
    (tmp_path / "validate.json").write_text(json.dumps(val))
    shutil.copy(results / "gpu-h200" / "h200-overhead.txt", tmp_path / "overhead.txt")
    (tmp_path / "checks.log").write_text(
        "=== pytest-gpu (timeout 120s): python3 -m pytest tests/cuda\n"
        "....\n107 passed, 1 skipped in 51.2s\n=== pytest-gpu rc=0 seconds=60\n")
    bench = {"benchmarks": [
        {"name": name, "stats": {"median": us * 1e-6}} for name, us in [
            ("test_fastadagrad[67108864]", 600.0), ("test_copy[67108864]", 460.0),
            ("test_torch_adagrad[67108864-foreach]", 1430.0),
            ("test_model_fastadagrad[cnn100]", 250.0),
            ("test_model_torch[cnn100-foreach]", 1600.0)]]}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    monkeypatch.setattr(gpu_report, "ROOT", tmp_path.parent)
    text = gpu_report.check_block(tmp_path)
    assert f"{val['summary']['cases']} cases" in text and "launch path: cuda.core" in text
    assert "107 passed, 1 skipped" in text
    assert "| 2^26 | 600 µs | 1,430 µs | 460 µs |" in text  # columns with figures only
    assert "| 100 tensors, 2.95M parameters | 250 µs | — | 1,600 µs | — |" in text
    assert "135 µs for `AdaGrad.update`" in text  # h200-overhead.txt: 134.785
