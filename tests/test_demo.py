"""`make demo`'s job on a tiny network: identical loss curves, timings, a PNG plot."""

from __future__ import annotations

import pytest

from fastadagrad.demo import main


def test_demo_small(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot = tmp_path / "demo.png"
    rc = main(["--steps", "12", "--batch", "16", "--samples", "256", "--hidden", "32", "16",
               "--plot", str(plot)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "loss curves identical (bit for bit): True" in out
    assert "final parameters identical: True" in out
    assert "speedup" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
