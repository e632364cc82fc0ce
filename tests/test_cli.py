"""``python -m fastadagrad``: help for every command and option, exit codes, the warm-up
command and the one-time compile notice."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from numba import njit

from fastadagrad import _compile_notice
from fastadagrad.__main__ import COMMANDS, main
from fastadagrad.warmup import warmup

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "validate", "warmup"):
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 20, line  # the command's one-line help
    assert "COMMAND --help" in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["--bogus"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "usage: python -m fastadagrad" in err
    if argv == ["bogus"]:
        assert "unknown command 'bogus'" in err


def test_unknown_command_exit_code_from_the_shell():
    r = subprocess.run([sys.executable, "-m", "fastadagrad", "bogus"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command 'bogus'" in r.stderr


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_every_option_has_help(cmd, monkeypatch, capsys):
    """Catch the parser each command builds and check every option's help text."""
    seen: list[argparse.ArgumentParser] = []

    def capture(self, args=None, namespace=None):  # noqa: ANN001
        seen.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    assert main([cmd]) == 0
    parser = seen[-1]
    assert parser.prog == f"python -m fastadagrad {cmd}"
    options = [a for a in parser._actions if a.option_strings]
    assert len(options) >= 2
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings


def test_command_help_exits_0(capsys):
    assert main(["warmup", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--dtype" in out and "--quiet" in out


def test_warmup_float32(capsys):
    assert main(["warmup", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("fastadagrad warmup:")
    steps = [ln for ln in lines if ln.startswith("  numpy  float32 ")]
    # serial, parallel, many-tensor serial and parallel, then 0-d, 2-d, 3-d and 4-d
    assert len(steps) == 8, out
    assert [ln.split(",")[1].split()[0] for ln in steps[4:]] == ["0-d", "2-d", "3-d", "4-d"]
    assert all(" s  " in ln for ln in steps)
    assert "float64" not in out
    assert lines[-1].startswith("done in ")


def test_warmup_quiet_and_bad_arguments(capsys):
    assert main(["warmup", "--dtype", "float32", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["warmup", "--dtype", "float16"]) == 2
    assert "float16" in capsys.readouterr().err
    assert main(["warmup", "--preset", "nope"]) == 2
    with pytest.raises(ValueError, match="unknown preset"):
        warmup(["float32"], ["nope"], echo=None)
    with pytest.raises(ValueError, match="float32 or float64"):
        warmup(["int32"], echo=None)


# --- the compile notice -----------------------------------------------------------------

def _fresh_function(name: str):  # noqa: ANN202
    """A new function that Numba will compile, posing as a fastadagrad module's."""

    def f(x):  # noqa: ANN001, ANN202
        return x + 1

    f.__module__ = "fastadagrad._notice_probe"
    f.__name__ = f.__qualname__ = name
    return njit(f)


@pytest.fixture
def notice_state():
    _compile_notice.reset()
    yield
    _compile_notice.reset()


def test_compile_notice_once_per_process(caplog, notice_state):
    n0 = _compile_notice.compile_count()
    with caplog.at_level(logging.WARNING, logger="fastadagrad"):
        _fresh_function("probe_a")(np.float32(1))
        _fresh_function("probe_b")(np.float32(1))
    notes = [r for r in caplog.records if r.name == "fastadagrad"]
    assert len(notes) == 1, notes
    assert "compiling probe_a" in notes[0].getMessage()
    assert "logging.getLogger('fastadagrad').setLevel(logging.ERROR)" in notes[0].getMessage()
    assert _compile_notice.compile_count() == n0 + 2


def test_compile_notice_silenced_by_the_logger_level(caplog, notice_state):
    logger = logging.getLogger("fastadagrad")
    old = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with caplog.at_level(logging.DEBUG):
            _fresh_function("probe_c")(np.float32(1))
    finally:
        logger.setLevel(old)
    assert not [r for r in caplog.records if r.name == "fastadagrad"]


def test_compile_notice_names_the_callers_dtypes_only():
    """The float arrays a kernel writes are named; the read-only float64 coefficient
    table and integer tables are not (a float32 call said "(float32, float64)")."""
    from numba import types

    def event(*args):  # noqa: ANN202
        return SimpleNamespace(data={"args": args})

    f32 = types.Array(types.float32, 2, "C")
    table = types.Array(types.float64, 1, "C", readonly=True)
    addr = types.Array(types.int64, 1, "C")
    ro_grad = types.Array(types.float32, 2, "C", readonly=True)
    assert _compile_notice._user_dtypes(event(f32, ro_grad, f32, table, types.int64)) \
        == ["float32"]
    assert _compile_notice._user_dtypes(event(addr, addr, types.float64)) == []
    f16bits, h32 = types.Array(types.uint16, 1, "C"), types.Array(types.float32, 1, "C")
    assert _compile_notice._user_dtypes(event(f16bits, h32, table)) == ["float32"]
    f64 = types.Array(types.float64, 1, "C")
    assert _compile_notice._user_dtypes(event(f64, table, addr, f32)) \
        == ["float32", "float64"]


def test_no_notice_for_other_packages(caplog, notice_state):
    def g(x):  # noqa: ANN001, ANN202
        return x * 2

    with caplog.at_level(logging.WARNING):
        njit(g)(np.float32(1))
    assert not [r for r in caplog.records if r.name == "fastadagrad"]


CHILD = """
import sys, numpy as np, fastadagrad
from fastadagrad import _compile_notice
shapes = {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}
params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
grads = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
fastadagrad.adagrad_update(*[np.full(100, v, np.float32) for v in (1.0, 0.5, 0.0)])
fastadagrad.AdaGrad(lr=0.01).update(params, grads)
# one N-d array: the one-array paths hand it to a check compiled per ndim
for shape in [(300, 30), (16, 8, 3, 3), (), (5, 6, 7)]:
    arrays = [np.full(shape, v, np.float32) for v in (1.0, 0.5, 0.0)]
    fastadagrad.AdaGrad().update({"W": arrays[0]}, {"W": arrays[1]})
    fastadagrad.adagrad_update(*arrays)
print(_compile_notice.compile_count())
"""


def test_cold_process_notice_then_warmup_covers_a_typical_run(tmp_path):
    """Empty cache: the first update says it compiles, once; after `warmup` a new
    process makes a typical run's calls (1-d, and 0-d to 4-d single arrays) without
    compiling anything and says nothing."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("FASTADAGRAD_NO_CACHE", None)

    def child(code: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                              capture_output=True, text=True, check=True)

    # one process: the first call compiles (one notice), then the warm-up fills the cache
    r = child("import numpy as np, fastadagrad\n"
              "fastadagrad.adagrad_update(*[np.full(100, v, np.float32) for v in (1, .5, 0)])\n"
              "from fastadagrad.warmup import main\n"
              "main(['--dtype', 'float32'])")
    assert r.stderr.count("fastadagrad: compiling") == 1, r.stderr
    # the words README quotes: the user's dtype only, not the coefficient table's
    assert "fastadagrad: compiling checked_span (float32) and the kernels" in r.stderr
    assert "python -m fastadagrad warmup" in r.stderr
    assert "compiled" in r.stdout, r.stdout
    # a new process making a typical run's first calls compiles nothing, says nothing
    r = child(CHILD)
    assert r.stdout.strip() == "0" and "compiling" not in r.stderr, (r.stdout, r.stderr)


ROWS_TORCH_CHILD = """
import numpy as np, torch, fastadagrad, fastadagrad.torch as fat
from fastadagrad import _compile_notice
table = np.ones((500, 16), np.float32)
for rowwise in (False, True):
    fastadagrad.RowAdaGrad(table.copy(), rowwise=rowwise).update(
        np.array([3, 7, 3]), np.full((3, 16), 0.5, np.float32))
for flags in ({}, {"foreach": True}, {"fused": True}, {"lr_decay": 0.5}):
    ps = [torch.nn.Parameter(torch.ones(s)) for s in ((32, 16), (16,), (16, 4), (4,))]
    for p in ps:
        p.grad = torch.full_like(p, 0.5)
    opt = fat.Adagrad(ps, lr=0.1, **flags)
    for _ in range(3):  # (the repeated steps' own compiled checks)
        opt.step()
emb = torch.nn.Embedding(40, 4, sparse=True)
emb(torch.tensor([5, 1, 5])).sum().backward()
fat.Adagrad(emb.parameters()).step()
print(_compile_notice.compile_count())
"""


def test_warmup_rows_and_torch_cover_their_first_steps(tmp_path):
    """`warmup --rows --torch`: a new process's first row updates and torch adapter
    steps (three flag sets and lr_decay, repeated; a sparse embedding) compile nothing
    (after the plain warm-up they compiled 6 and 17 functions, seconds each)."""
    pytest.importorskip("torch")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    env.pop("FASTADAGRAD_NO_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "fastadagrad", "warmup", "--dtype", "float32",
                        "--rows", "--torch"], cwd=ROOT, env=env, capture_output=True,
                       text=True, check=True)
    lines = r.stdout.splitlines()
    assert sum(ln.startswith("  rows   float32 RowAdaGrad.update") for ln in lines) == 4
    assert sum(ln.startswith("  torch  float32 fastadagrad.torch.Adagrad") for ln in lines) == 8
    r = subprocess.run([sys.executable, "-c", ROWS_TORCH_CHILD], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "0" and "compiling" not in r.stderr, (r.stdout, r.stderr)


def test_warmup_torch_without_torch(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch: ImportError
    assert main(["warmup", "--dtype", "float32", "--torch", "--quiet"]) == 2
    assert "--torch: torch is not installed" in capsys.readouterr().err
