"""Calls from several Python threads (issue 6, item 4).

Numba's workqueue threading layer aborts the whole process when two Python threads run
parallel kernels at once; fastadagrad serializes its parallel kernels with
``cpu.PARALLEL_LOCK`` (serial kernels need no lock). Here 4 threads x 1000 updates on
separate optimizers, some models above ``config.PARALLEL_THRESHOLD`` (parallel
kernels), some below (serial), must give results bit-identical to running the same
work serially, under the threading layer Numba picked, and, in a subprocess (an abort
must fail the test, not kill the run), under the workqueue layer.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numba
import numpy as np
import pytest

from fastadagrad import AdaGrad, FlatBuffer, adagrad_update, config
from fastadagrad.testing import assert_bits_equal

STEPS = 1000
BANK = 4  # gradient sets cycled through (fresh copies each step)


def _workload(kind: str, seed: int) -> tuple[Any, list[Any], Any]:
    """(params, gradient bank, step function) for one thread."""
    rng = np.random.default_rng(seed)
    big = config.PARALLEL_THRESHOLD + 1000

    def arr(n: int) -> np.ndarray:
        return rng.standard_normal(n).astype(np.float32)

    if kind == "dict-parallel":  # many-array path, parallel kernel
        params: Any = {"w": arr(big), "b": arr(300), "v": arr(5000)}
    elif kind == "list-serial":  # many-array path, serial kernel
        params = [arr(1000), arr(10), arr(2000)]
    elif kind == "flat-parallel":  # one call over one flat buffer, parallel, with check
        params = FlatBuffer({"a": arr(big), "b": arr(77)})
    else:  # "functional-parallel": one array, parallel kernel, with grad_scale + check
        params = [arr(big)]
    keys = list(params.keys()) if isinstance(params, (dict, FlatBuffer)) else range(
        len(params))
    bank = [[arr(params[k].size) for k in keys] for _ in range(BANK)]

    if kind == "functional-parallel":
        state = np.zeros_like(params[0])

        def step(i: int) -> None:
            g = bank[i % BANK][0] * np.float32(4)
            assert adagrad_update(params[0], g, state, lr=0.01, grad_scale=4.0,
                                  nonfinite="raise", step=i + 1)

        return params, [state], step

    opt = AdaGrad(lr=0.01, nonfinite="skip" if kind == "flat-parallel" else "ignore")

    def step(i: int) -> None:
        gs = [g.copy() for g in bank[i % BANK]]  # fresh arrays, like a backward pass
        if kind == "flat-parallel":
            grads: Any = FlatBuffer(dict(zip(keys, gs, strict=True)))
        elif isinstance(params, dict):
            grads = dict(zip(keys, gs, strict=True))
        else:
            grads = gs
        assert opt.update(params, grads)

    return params, opt, step


KINDS = ["dict-parallel", "list-serial", "flat-parallel", "functional-parallel"]


def _arrays(params: Any, state: Any) -> list[np.ndarray]:
    def flat(x: Any) -> list[np.ndarray]:
        if isinstance(x, AdaGrad):
            return flat(x.h)
        if isinstance(x, (dict, FlatBuffer)):
            return [x[k] for k in x]
        return list(x)

    return [a.copy() for a in flat(params) + flat(state)]


def _run(threaded: bool) -> list[list[np.ndarray]]:
    work = [_workload(kind, seed) for seed, kind in enumerate(KINDS)]
    errors: list[BaseException] = []
    if threaded:
        barrier = threading.Barrier(len(work))

        def body(step: Any) -> None:
            try:
                barrier.wait()
                for i in range(STEPS):
                    step(i)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)

        threads = [threading.Thread(target=body, args=(s,)) for _, _, s in work]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for _, _, step in work:
            for i in range(STEPS):
                step(i)
    assert not errors, errors
    return [_arrays(p, s) for p, s, _ in work]


def test_four_threads_match_serial() -> None:
    serial = _run(threaded=False)
    threaded = _run(threaded=True)
    for kind, a, b in zip(KINDS, threaded, serial, strict=True):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bits_equal(x, y, f"{kind} array {i}")
    # the layer Numba picked for the parallel kernels above (documented in
    # docs/guarantees.md): omp on the project's machines, tbb or workqueue elsewhere
    assert numba.threading_layer() in ("omp", "tbb", "workqueue")


_SUBPROCESS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import numba
    import test_threads as t
    serial = t._run(threaded=False)
    threaded = t._run(threaded=True)
    for a, b in zip(threaded, serial):
        for x, y in zip(a, b):
            assert x.tobytes() == y.tobytes()
    print("layer", numba.threading_layer())
""")


def test_four_threads_under_workqueue_layer() -> None:
    """The layer that aborts on concurrent parallel calls must not crash either."""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    tests = str(Path(__file__).parent)
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS.format(tests=tests)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert "layer workqueue" in proc.stdout


_FORKED = """
import os, sys
import numba, numpy as np
import fastadagrad
from fastadagrad import config
from fastadagrad.rows import adagrad_update_rows

numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
n = 4 * config.PARALLEL_THRESHOLD  # the parallel kernels
rng = np.random.default_rng(0)
p0 = rng.standard_normal(n).astype(np.float32)
g = rng.standard_normal(n).astype(np.float32)
table0 = rng.standard_normal((4096, 64)).astype(np.float32)
idx = rng.integers(0, 4096, 2048)
rows = rng.standard_normal((2048, 64)).astype(np.float32)


def train():
    p, opt = {"w": p0.copy()}, fastadagrad.AdaGrad(lr=0.1)
    for _ in range(3):
        opt.update(p, {"w": g})
    table, state = table0.copy(), np.zeros_like(table0)
    adagrad_update_rows(table, state, idx, rows, lr=0.1)
    return p["w"], table


want = train()  # the parent's parallel kernels start the thread pool
print("layer", numba.threading_layer(), flush=True)
pid = os.fork()
if pid == 0:
    got = train()
    ok = all(np.array_equal(a.view(np.int32), b.view(np.int32)) for a, b in zip(got, want))
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_forked_child_after_parallel_kernels_updates_serially() -> None:
    # GNU OpenMP cannot start a parallel region in a child forked after the parent used
    # it (Numba terminates the child); the child runs the serial kernels, same bits
    proc = subprocess.run([sys.executable, "-c", _FORKED], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "child 0" in proc.stdout, (proc.stdout, proc.stderr[-3000:])


_SAME_OPTIMIZER = """
import sys, threading
import numpy as np
from fastadagrad import AdaGrad
sys.setswitchinterval(1e-6)
N = 1 << 20  # 4 MiB gradients: mapped by malloc, unmapped when freed
P = {"w": np.zeros(N, np.float32), "b": np.zeros(N, np.float32)}
opt = AdaGrad(lr=0.01)
def body(k):
    pad = []
    for i in range(600):
        g = {key: np.ones(N, np.float32) for key in P}
        opt.update(P, g)
        del g
        if k and i % 3 == 0:  # shift later allocations: freed ranges stay unmapped
            pad.append(np.empty((i % 7 + 1) * 4096 * 64, np.uint8)); pad = pad[-3:]
ts = [threading.Thread(target=body, args=(k,)) for k in range(2)]
[t.start() for t in ts]; [t.join() for t in ts]
print("distinct", np.unique(opt.h["w"]).size)
"""


def test_one_optimizer_from_two_threads_reads_only_its_own_gradients() -> None:
    """A misuse (docs/guarantees.md), but never a read of freed memory: each update's
    kernel gets the gradient addresses its own check read (the plan's one shared array
    was overwritten by the other thread's check: a SIGSEGV, or a non-uniform h from
    gradients that were not the call's). The kernels hold the GIL, so each update runs
    whole and all-ones gradients keep h uniform. A fresh process: a crash fails it."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, "-c", _SAME_OPTIMIZER], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.split()[-1] == "1", proc.stdout


_LAYER_FAILS = """
import numpy as np
import fastadagrad
from fastadagrad import config
n = 2 * config.PARALLEL_THRESHOLD
for model in ({"big": np.ones(n, np.float32)},
              {"small32": np.ones(10, np.float32), "big16": np.ones(n, np.float16)}):
    opt = fastadagrad.AdaGrad(lr=0.1)
    for attempt in (1, 2):  # the second call raised? (it hung: the lock stayed held)
        g = {k: np.full(v.shape, 0.5, v.dtype) for k, v in model.items()}
        try:
            opt.update(model, g)
            print("stepped")
        except ValueError as e:
            print("raised", str(e).split(".")[0])
    print("unchanged", all(bool((v == 1).all()) for v in model.values()), opt.step)
"""


def test_threading_layer_that_fails_to_start_raises_each_time_writing_nothing() -> None:
    """NUMBA_THREADING_LAYER naming a layer that cannot load: every parallel update
    raises Numba's error with nothing written (the first one left the parallel lock
    held, and every later one hung; a float32 group was written before a 16-bit
    group's parallel kernel started the layer)."""
    try:
        import tbb  # noqa: F401
        pytest.skip("tbb is installed: the layer would start")
    except ImportError:
        pass
    env = {**os.environ, "NUMBA_THREADING_LAYER": "tbb"}
    proc = subprocess.run([sys.executable, "-c", _LAYER_FAILS], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    one_model = ["raised No threading layer could be loaded"] * 2 + ["unchanged True 0"]
    assert proc.stdout.strip().splitlines() == one_model * 2, proc.stdout


_FORK_AFTER_TORCH = """
import os
import numpy as np, torch
import fastadagrad
from fastadagrad import config
x = torch.randn(1 << 22)
for _ in range(5):
    (x * 2).exp_().sum()  # torch's OpenMP pool ran; fastadagrad's never did
n = 4 * config.PARALLEL_THRESHOLD
from fastadagrad._hyper import Hyper
from fastadagrad.reference import reference_step
want = np.ones(n, np.float32)  # (NumPy: fastadagrad's own pool must not start here)
reference_step(want, np.ones(n, np.float32), np.zeros(n, np.float32), Hyper.make(lr=0.1))
pid = os.fork()
if pid == 0:
    import faulthandler
    faulthandler.dump_traceback_later(60, exit=True)
    p = np.ones(n, np.float32)
    fastadagrad.adagrad_update(p, np.ones(n, np.float32), np.zeros(n, np.float32), lr=0.1)
    os._exit(0 if np.array_equal(p, want) else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork")
def test_forked_child_after_torchs_openmp_work_updates() -> None:
    """A child forked after torch ran OpenMP work (Numba's pool never started): its
    first large update hung in Numba's omp layer, which shares that runtime; it now
    runs the serial kernels, the same bits."""
    pytest.importorskip("torch")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    proc = subprocess.run([sys.executable, "-c", _FORK_AFTER_TORCH], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-3000:])
    assert proc.stdout.split()[-1] == "0", (proc.stdout, proc.stderr[-3000:])


_COUNT = """
import threading, numba
from fastadagrad import cpu
n = cpu.numba_threads()
print(cpu._count is cpu._compiled_count, n, numba.get_num_threads())
numba.set_num_threads(1)
one = cpu.numba_threads()
numba.set_num_threads(n)
seen = []
def other():  # the count is per thread: set in another, it stays here
    numba.set_num_threads(1)
    seen.append(cpu.numba_threads())
t = threading.Thread(target=other)
t.start()
t.join()
print(one, seen[0], cpu.numba_threads())
"""


@pytest.mark.parametrize("layer", ["default", "workqueue"])
def test_compiled_thread_count_follows_set_num_threads(layer: str) -> None:
    """Once the threading layer runs, ``cpu.numba_threads()`` is the compiled call of
    the layer's count (not Numba's Python function), and it follows
    ``numba.set_num_threads`` in the calling thread only, under the default layer and
    under workqueue (each registers its own ``get_num_threads``)."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "3"}
    if layer != "default":
        env["NUMBA_THREADING_LAYER"] = layer
    proc = subprocess.run([sys.executable, "-c", _COUNT], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["True", "3", "3", "1", "1", "3"], proc.stdout


@pytest.mark.parametrize("answer", ["wrong", "raises"])
def test_thread_count_keeps_numbas_function_where_the_compiled_one_differs(
        monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    """A compiled count that gives another number than Numba's (or cannot be built
    or linked) is not used: ``numba.get_num_threads`` stays."""
    from fastadagrad import cpu

    def compiled() -> int:
        if answer == "raises":
            raise RuntimeError("no symbol get_num_threads")
        return 7

    monkeypatch.setattr(cpu, "_count", numba.get_num_threads)
    monkeypatch.setattr(cpu, "_compiled_count", compiled)
    cpu._use_compiled_count(numba.get_num_threads())
    assert cpu._count is numba.get_num_threads
