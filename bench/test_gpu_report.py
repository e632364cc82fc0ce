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

    results = gpu_report.ROOT / "bench" / "results"
    val = json.loads((results / "gpu-h100" / "h100-validate.json").read_text())
    val["environment"]["launch_path"] = ["cuda.core", "why"]
    (tmp_path / "validate.json").write_text(json.dumps(val))
    (tmp_path / "overhead.txt").write_text(
        (results / "gpu-h200" / "h200-overhead.txt").read_text().rstrip("\n")
        + "\nmodel100 graph replay us 12.345\n")  # the line gpu_overhead prints last
    (tmp_path / "checks.log").write_text(
        "numba 0.68.0 numba-cuda 0.30.4 numpy 2.4.6 torch 2.13.0+cu130 cuda.core 1.2.0\n"
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
    assert ", numpy 2.4.6, torch 2.13.0+cu130; launch path" in text
    assert "107 passed, 1 skipped" in text
    assert "| 2^26 | 600 µs | 1,430 µs | 460 µs |" in text  # columns with figures only
    assert "| 100 tensors, 2.95M parameters | 250 µs | — | 1,600 µs | — |" in text
    assert "135 µs for `AdaGrad.update`" in text  # h200-overhead.txt: 134.785
    assert "`AdaGrad(capturable=True).update` over the torch tensors: 12 µs." in text
    # the footnote names the files read, not a sweep.txt this run did not write
    assert "there (validate.json, checks.log, overhead.txt, bench.json).</sub>" in text


def test_variant_lines_read_the_sweep_and_the_second_validate(tmp_path, monkeypatch):
    """The kernel variants' figures come from sweep.txt (in the format gpu_sweep prints)
    and validate-variants.json."""
    import json

    import pytest

    sweep = pytest.importorskip("bench.gpu_sweep", reason="numba-cuda is not installed")
    nbytes, tc = 10**9, 1e-3  # a copy of these bytes takes 1 ms

    def lib(what, pct, ran=""):  # gpu_sweep's line for a case at ``pct`` of copy bandwidth
        return sweep.library_line(what, tc * 100 / pct, nbytes, tc, ran)

    def chunked(k, pct):
        return lib(f"chunked, {k} per pass", pct, f"{k} per pass, 264 blocks")

    def model(k, t):
        return sweep.model_line(k, t, 0.8)

    f32 = ["float32: copy 4176 GB/s",
           lib("chunked (default config)", 67.8),
           lib("grid-stride x4 blocks/SM=4", 92.0, "grid-stride, 528 blocks"),
           lib("chunked (default config)", 67.0),
           lib("grid-stride x4 blocks/SM=8", 87.0, "grid-stride, 1056 blocks"),
           # the default kernel relaunched under a variant's name: not the variant's
           lib("grid-stride x4 blocks/SM=2", 99.0, "1 per pass, 8192 blocks"),
           chunked(1, 68.0), chunked(4, 90.0),
           chunked(1, 68.0), chunked(4, 91.0),
           model(1, 150e-6), model(4, 120e-6), model(1, 152e-6), model(4, 118e-6)]
    f64 = ["float64: copy 4200 GB/s", lib("grid-stride x4 blocks/SM=16", 99.0)]
    (tmp_path / "sweep.txt").write_text("\n".join(["NVIDIA H200 SMs=132", *f32, *f64]))
    (tmp_path / "validate-variants.json").write_text(json.dumps(
        {"summary": {"cases": 42, "mismatches": 0, "min_frac_copy_f32_ge_2_26": 0.912}}))
    text = " ".join(gpu_report.variant_lines(tmp_path))
    assert "42 cases, **0 mismatches**; float32 at 2^26 and above at least 91.2%" in text
    assert "chunked kernel 67.4%" in text
    assert "four per pass in chunks 90.5%" in text
    assert "one-tensor grid-stride 92.0% (4 blocks per SM)" in text  # float32 only
    assert "100-tensor model 151 µs with one per pass, 119 µs with four" in text
    monkeypatch.setattr(gpu_report, "ROOT", tmp_path.parent)
    assert ("there (validate-variants.json: the kernel variants, sweep.txt: launch "
            "configurations).</sub>") in gpu_report.check_block(tmp_path)


def test_variant_figures_need_the_sweep_to_say_the_variant_ran(tmp_path):
    """A sweep whose library lines do not say which kernel ran (an older gpu_sweep,
    which relaunched the default kernel under the variants' names) gives no variant
    figure, and says so; the default kernel's figure is still reported."""
    pct = "    380.0 us    3528 GB/s  {}% of copy"
    f32 = ["float32: copy 4134 GB/s",
           "  library chunked (default config)        : " + pct.format(85.3),
           "  library grid-stride x4 blocks/SM=4      : " + pct.format(85.4),
           "  library chunked, 4 per pass             : " + pct.format(85.6)]
    (tmp_path / "sweep.txt").write_text("\n".join(["NVIDIA H200 SMs=132", *f32]))
    text = " ".join(gpu_report.variant_lines(tmp_path))
    assert "chunked kernel 85.3%" in text
    assert "grid-stride 85" not in text and "four per pass in chunks" not in text
    assert "the one-tensor variants were not measured" in text
