"""What a process pays before its first step: lazy imports, light cache loads.

``import fastadagrad`` imports only what the dense optimizer needs; a warm process
loads its kernels from Numba's cache without Numba's full context refresh (see
``fastadagrad/_jit.py``) and gets the same bits as the process that compiled them; a
small model does not start Numba's thread pool. The timings themselves are measured by
``bench/startup.py``, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fastadagrad
from fastadagrad import _plan
from fastadagrad._arrays import Labels

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str, cache: Path, **env: str) -> dict:
    e = dict(os.environ, NUMBA_CACHE_DIR=str(cache), **env)
    e.pop("FASTADAGRAD_NO_CACHE", None)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), e.get("PYTHONPATH")]))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True,
                       text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_leaves_the_row_optimizer_and_decimal_out(tmp_path: Path) -> None:
    got = _child("import json, sys, fastadagrad\n"
                 "before = sorted(m for m in sys.modules if m.startswith("
                 "('fastadagrad.', 'decimal', 'fractions')))\n"
                 "fastadagrad.checkpoint.save  # a submodule, imported when asked for\n"
                 "print(json.dumps(before))", tmp_path)
    assert "fastadagrad.rows" not in got and "fastadagrad.cpu_rows" not in got, got
    assert "decimal" not in got and "fractions" not in got, got
    assert "fastadagrad.checkpoint" not in got, got
    assert "fastadagrad.optim" in got  # the module list is real


def test_lazy_names_resolve_to_the_row_module() -> None:
    from fastadagrad import adagrad_update_rows, rows

    assert fastadagrad.RowAdaGrad is rows.RowAdaGrad
    assert adagrad_update_rows is rows.adagrad_update_rows
    assert {"RowAdaGrad", "adagrad_update_rows", "AdaGrad"} <= set(dir(fastadagrad))
    assert fastadagrad.checkpoint.__name__ == "fastadagrad.checkpoint"  # a submodule
    with pytest.raises(AttributeError, match="no_such_name"):
        fastadagrad.no_such_name  # noqa: B018


def test_scan_overlap_search_agrees_with_brute_force() -> None:
    """The per-step scan reports the first grad whose bytes intersect a param's or a
    state's (its hand-written binary search), and -1 when none does."""
    rng = np.random.default_rng(7)
    buf = np.zeros(256, np.float32)
    isz = buf.itemsize
    for _ in range(400):
        n = int(rng.integers(1, 5))
        lens = rng.integers(0, 12, n)
        # params then states at increasing, non-overlapping offsets of one buffer
        cuts = np.sort(rng.choice(np.arange(0, 200), 2 * n, replace=False))
        starts = [int(c) for c in cuts]
        arrays = [buf[s:s + int(lens[k % n])] for k, s in enumerate(starts)]
        if any(a.size and b.size and a.__array_interface__["data"][0]
               < b.__array_interface__["data"][0] + b.nbytes and
               b.__array_interface__["data"][0] < a.__array_interface__["data"][0] + a.nbytes
               for i, a in enumerate(arrays) for b in arrays[i + 1:]):
            continue  # params and states must not overlap each other (build checks it)
        params, states = arrays[:n], arrays[n:]
        grads = []
        for i in range(n):
            if rng.random() < 0.5:
                grads.append(np.ones(int(lens[i]), np.float32))
            else:
                o = int(rng.integers(0, 256 - int(lens[i]) + 1))
                grads.append(buf[o:o + int(lens[i])])
        plan = _plan.Plan()
        plan.build(params, states, [Labels("p", "g", "h")] * n)
        assert plan.fast
        code, _ = plan.check(params, states, grads)

        def hits(g: np.ndarray, arrays: list[np.ndarray] = arrays) -> bool:
            gs = g.__array_interface__["data"][0]
            return g.size > 0 and any(
                a.size and gs < a.__array_interface__["data"][0] + a.nbytes
                and a.__array_interface__["data"][0] < gs + g.size * isz
                for a in arrays)

        first = next((i for i, g in enumerate(grads) if hits(g)), None)
        assert code == (-1 if first is None else 3 * n + first), (starts, lens, code)


TYPICAL = r"""
import hashlib, json, sys
import numpy as np, fastadagrad
from fastadagrad import _compile_notice
out = []
for dt in (np.float32, np.float64):
    for n in (1000, 1 << 16):  # the checked serial kernel, then the parallel one
        p, g, h = (np.linspace(-1, 1, n).astype(dt), np.linspace(2, -3, n).astype(dt),
                   np.zeros(n, dt))
        fastadagrad.adagrad_update(p, g, h, lr=0.1)
        out += [p, h]
for shapes in ({"W1": (16, 16), "b1": (16,)},  # the serial many-tensor kernel
               {"W1": (784, 50), "b1": (50,), "W2": (50, 10), "b2": (10,)}):  # parallel
    params = {k: np.linspace(-1, 1, int(np.prod(s))).reshape(s).astype(np.float32)
              for k, s in shapes.items()}
    grads = {k: np.cos(v) for k, v in params.items()}
    opt = fastadagrad.AdaGrad(lr=0.01)
    for _ in range(2):
        opt.update(params, grads)
    out += list(params.values()) + list(opt.h.values())
loaded = _compile_notice.compile_count()
refreshed = "numba.np.arraymath" in sys.modules  # imported by Numba's context refresh
masked = "numpy.ma" in sys.modules  # imported by Numba's own typing of an ndarray
# a formula variant not in the cache: a real compile after the light loads
p, g, h = np.ones(8, np.float32), np.full(8, 0.5, np.float32), np.zeros(8, np.float32)
fastadagrad.adagrad_update(p, g, h, lr=0.1, maximize=True)
out += [p, h]
digest = hashlib.sha256(b"".join(a.tobytes() for a in out)).hexdigest()
print(json.dumps({"compiled": loaded, "refreshed": refreshed, "masked": masked,
                  "digest": digest,
                  "p": p.tolist()}))
"""


@pytest.mark.parametrize("full", [False, True], ids=["light", "numba-default"])
def test_warm_process_loads_without_refresh_and_gets_the_same_bits(
        tmp_path: Path, full: bool) -> None:
    """Cold process: compiles. Warm process: loads the same kernels (none compiled),
    without Numba's context refresh unless FASTADAGRAD_FULL_NUMBA_START=1, gives the
    same bits, and can still compile a new variant afterwards."""
    env = {"FASTADAGRAD_FULL_NUMBA_START": "1"} if full else {}
    cold = _child(TYPICAL, tmp_path, **env)
    warm = _child(TYPICAL, tmp_path, **env)
    assert cold["compiled"] > 0 and cold["refreshed"]
    assert warm["compiled"] == 0, warm
    assert warm["refreshed"] == full and warm["masked"] == full, warm
    assert warm["digest"] == cold["digest"]
    ref = np.float32(1) + np.float32(0.1) * np.float32(0.5) / (
        np.sqrt(np.float32(0.25)) + np.float32(1e-7))  # maximize: p + lr*g/(sqrt(h)+eps)
    assert warm["p"] == [float(ref)] * 8


def test_light_typing_gives_numbas_types() -> None:
    """A fastadagrad dispatcher types every array exactly as Numba's own
    ``Dispatcher.typeof_pyval`` does (a type, or the same error)."""
    base = np.arange(24.0).reshape(2, 3, 4)
    ro = np.ones(5, np.float32)
    ro.flags.writeable = False
    cases = [np.ones(3, dt) for dt in (np.float32, np.float64, np.int64, np.int8,
                                       np.bool_, np.complex64, "M8[s]", "U3", object)]
    cases += [base, base.T, base[:, ::2], np.asfortranarray(base), np.zeros(()), ro,
              np.zeros((0, 3)), np.zeros(3, [("a", np.int32), ("b", np.float64)]),
              np.ones(4, ">f4"), np.ma.masked_array([1.0, 2.0]), np.ones(3).view(_plan._Sub),
              3, 2.5, None]
    disp = _plan.scan
    numba_own = type(disp).typeof_pyval

    def outcome(f: Any, a: Any) -> Any:
        try:
            return f(a)
        except Exception as e:  # noqa: BLE001  (the same error is the expected outcome)
            return type(e)

    assert "typeof_pyval" in vars(disp)  # the light path is installed on the dispatcher
    for a in cases:
        assert outcome(disp.typeof_pyval, a) == outcome(lambda x: numba_own(disp, x), a), a


def test_small_model_does_not_start_the_thread_pool(tmp_path: Path) -> None:
    code = ("import json, numpy as np, fastadagrad\n"
            "import numba.np.ufunc.parallel as P\n"
            # (10,000 float32 elements: below the threshold, above the float64 one)
            "params = {'W': np.ones((100, 100), np.float32), 'b': np.ones(16, np.float32)}\n"
            "grads = {k: np.full(v.shape, 0.5, np.float32) for k, v in params.items()}\n"
            "fastadagrad.AdaGrad(lr=0.01).update(params, grads)\n"
            # an embedding table's small row updates too, both kinds of state
            "for rowwise in (False, True):\n"
            "    fastadagrad.RowAdaGrad(np.ones((100, 8), np.float32), rowwise=rowwise)"
            ".update(np.array([1, 2]), np.ones((2, 8), np.float32))\n"
            "small = getattr(P, '_is_initialized', None)\n"
            "big = {'W': np.ones(1 << 16, np.float32)}\n"
            "opt = fastadagrad.AdaGrad(lr=0.01)\n"
            "opt.update({**big, 'b': np.ones(3, np.float32)},"
            " {'W': np.ones(1 << 16, np.float32), 'b': np.ones(3, np.float32)})\n"
            "print(json.dumps([small, getattr(P, '_is_initialized', None)]))")
    small, big = _child(code, tmp_path)
    if small is None:
        pytest.skip("this Numba does not expose numba.np.ufunc.parallel._is_initialized")
    assert small is False and big is True
