"""Distributed: DDP + ZeroRedundancyOptimizer(optimizer_class=fastadagrad.torch.Adagrad).

Runs ``examples/ddp_zero.py`` as a user would (2 processes spawned over 127.0.0.1,
gloo): each rank keeps only its shard of the accumulators, and the parameters after
the run are bit-identical, on every rank, to the same run with
``optimizer_class=torch.optim.Adagrad``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_zero_ddp_two_processes_bit_identical() -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "ddp_zero.py"),
                           "--steps", "6"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    lines = re.findall(r"rank (\d)/2: accumulators for (\d+) of (\d+) parameter tensors; "
                       r"every tensor trained: True; bit-identical to "
                       r"torch.optim.Adagrad: True", out)
    assert sorted(int(r) for r, _, _ in lines) == [0, 1], out
    held = [int(h) for _, h, _ in lines]
    total = int(lines[0][2])
    assert sum(held) == total and all(0 < h < total for h in held), out  # sharded
