"""Smoke test of examples/bf16_demo.py (bfloat16 training, nearest/stochastic/float32)
on a tiny network: it runs, every curve is finite, and the plot is written."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ml_dtypes")
pytest.importorskip("matplotlib")


def test_bf16_demo_smoke(tmp_path):
    path = Path(__file__).resolve().parents[1] / "examples" / "bf16_demo.py"
    spec = importlib.util.spec_from_file_location("bf16_demo", path)
    assert spec is not None and spec.loader is not None
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    plot = tmp_path / "curves.png"
    curves = demo.main(["--steps", "4", "--batch", "8", "--samples", "64", "--hidden",
                        "16", "--smooth", "2", "--plot", str(plot)])
    assert list(curves) == ["float32", "bfloat16, nearest", "bfloat16, stochastic",
                            "bfloat16, master weights"]
    for v in curves.values():
        assert v.shape == (4,) and np.isfinite(v).all()
    assert plot.stat().st_size > 1000
