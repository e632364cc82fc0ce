"""The cuda.core launcher without a GPU: the kernel is really compiled to PTX (real
NVVM), cuda.core's loader and launch are stood in for, so that what the launcher does
with them is checked in CI: the argument layout check at load (a mismatch raises), the
C types packed for each slot, the cached LaunchConfig, errors of a launch propagating
(never retried on another path), and the choice of launch path. Hardware runs the real
thing (tests/cuda on a GPU, ``python -m fastadagrad validate``)."""

from __future__ import annotations

import ctypes
import os
from collections import namedtuple

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real NVVM, not the CUDA simulator", allow_module_level=True)
pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
core = pytest.importorskip("cuda.core", reason="cuda.core is not installed")

from fastadagrad import cuda_kernels as K  # noqa: E402
from fastadagrad import cuda_launch as L  # noqa: E402

try:
    K.compile_ptx("finish", np.float64, 0, (8, 0))
except Exception as exc:  # pragma: no cover - depends on the installation
    pytest.skip(f"NVVM is not available ({exc})", allow_module_level=True)

ParamInfo = namedtuple("ParamInfo", "offset size")


class FakeKernel:
    def __init__(self, sizes):
        self.num_arguments = len(sizes)
        offs = np.concatenate(([0], np.cumsum(sizes)[:-1])).tolist()
        self.arguments_info = [ParamInfo(o, s) for o, s in zip(offs, sizes)]


def fake_core(monkeypatch, sizes_for=None, launch_error=None):
    """Stand-ins for cuda.core's Device, ObjectCode and launch; returns the launches."""
    seen = {"launches": [], "ptx": []}

    class Device:
        def __init__(self, i=0):
            self.compute_capability = (9, 0)

        def set_current(self):
            return None

    class ObjectCode:
        @staticmethod
        def from_ptx(ptx):
            seen["ptx"].append(ptx)
            return ObjectCode()

        def get_kernel(self, name):
            assert name in seen["ptx"][-1]
            params = [p for p in seen["ptx"][-1].split(name + "(", 1)[1].split(")")[0]
                      .split(",")]
            sizes = [8 if (".u64" in p or ".f64" in p) else 4 for p in params]
            return FakeKernel(sizes_for(sizes) if sizes_for else sizes)

    def launch(stream, config, kernel, *args):
        if launch_error is not None:
            raise launch_error
        seen["launches"].append((stream, config, kernel, args))

    class Program:  # links to a "cubin": here, the same fake object code
        def __init__(self, code, code_type, options):
            assert code_type == "ptx" and options.arch == "sm_90"
            self.code = code

        def compile(self, target):
            assert target == "cubin"
            seen["linked"] = True
            return ObjectCode.from_ptx(self.code)

    monkeypatch.setattr(core, "Program", Program)
    monkeypatch.setattr(core, "Device", Device)
    monkeypatch.setattr(core, "ObjectCode", ObjectCode)
    monkeypatch.setattr(core, "launch", launch)
    L._reset_path_for_tests()
    monkeypatch.setattr(L, "_PATH", ("cuda.core", "test"))
    return seen


class FakeStream:
    core = "the-core-stream"


def test_update_kernel_packs_the_checked_layout(monkeypatch):
    seen = fake_core(monkeypatch)
    k = L.kernel("update", np.float32, 0, 0)
    assert isinstance(k, L.CoreKernel) and seen["linked"]
    coefs = tuple(np.float32(x) for x in (0.1, 1, 0, 1e-7, 0, 0.1, 1))
    k.launch(FakeStream(), 7, 256, (1234, 3, 9, 8192, *coefs, 5678))
    (stream, config, kernel, args), = seen["launches"]
    assert stream == "the-core-stream"
    assert (config.grid, config.block) == ((7, 1, 1), (256, 1, 1))
    assert [type(a) for a in args] == [ctypes.c_uint64] + [ctypes.c_int64] * 3 + \
        [ctypes.c_float] * 7 + [ctypes.c_uint64]
    assert [ctypes.sizeof(a) for a in args] == K.arg_sizes("update", np.float32)
    assert args[0].value == 1234 and args[-1].value == 5678
    assert args[4].value == np.float32(0.1)
    k.launch(FakeStream(), 7, 256, (1234, 3, 9, 8192, *coefs, 5678))
    assert seen["launches"][1][1] is config  # LaunchConfig cached
    assert L.kernel("update", np.float32, 0, 0) is k  # loaded once


def test_float64_and_check_and_finish_layouts(monkeypatch):
    seen = fake_core(monkeypatch)
    L.kernel("check", np.float64, 0, 0).launch(FakeStream(), 1, 32,
                                               (1, 2, 3, 4, np.float64(1.0), 5))
    L.kernel("finish", np.float64, 0, 0).launch(FakeStream(), 1, 1, (99,))
    (_, _, _, a), (_, _, _, b) = seen["launches"]
    assert [ctypes.sizeof(x) for x in a] == K.arg_sizes("check", np.float64)
    assert type(a[4]) is ctypes.c_double
    assert [type(x) for x in b] == [ctypes.c_uint64] and b[0].value == 99


def test_argument_layout_mismatch_raises_at_load(monkeypatch):
    fake_core(monkeypatch, sizes_for=lambda s: s[:-1] + [4])
    with pytest.raises(RuntimeError, match="refusing to launch"):
        L.kernel("update", np.float32, 0, 0)
    fake_core(monkeypatch, sizes_for=lambda s: s + [8])
    with pytest.raises(RuntimeError, match="13 arguments"):
        L.kernel("update", np.float32, 0, 0)


def test_launch_error_propagates_and_is_not_retried(monkeypatch):
    seen = fake_core(monkeypatch, launch_error=RuntimeError("CUDA_ERROR_ILLEGAL_ADDRESS"))
    k = L.kernel("update", np.float32, 0, 0)
    coefs = (np.float32(1),) * 7
    with pytest.raises(RuntimeError, match="ILLEGAL_ADDRESS"):
        k.launch(FakeStream(), 1, 32, (1, 1, 1, 1, *coefs, 1))
    assert seen["launches"] == []
    assert L.launch_path()[0] == "cuda.core"  # still the same path: nothing fell back


@pytest.mark.parametrize("env,path", [("dispatcher", "dispatcher"), ("auto", "cuda.core"),
                                      ("core", "cuda.core")])
def test_launch_path_choice(monkeypatch, env, path):
    monkeypatch.setenv("FASTADAGRAD_CUDA_LAUNCHER", env)
    monkeypatch.setattr(K, "simulator", lambda: False)
    L._reset_path_for_tests()
    try:
        assert L.launch_path()[0] == path
    finally:
        L._reset_path_for_tests()


def test_launch_path_bad_setting(monkeypatch):
    monkeypatch.setenv("FASTADAGRAD_CUDA_LAUNCHER", "fast")
    L._reset_path_for_tests()
    with pytest.raises(ValueError, match="FASTADAGRAD_CUDA_LAUNCHER"):
        L.launch_path()
    L._reset_path_for_tests()


def test_no_private_numba_or_cuda_core_names():
    """The launcher and kernels use public numba-cuda and cuda.core names only."""
    import inspect
    import re

    for mod in (K, L):
        src = inspect.getsource(mod)
        assert not re.search(r"(numba|cuda)[\w.]*\._[a-z]", src), mod.__name__
        assert "_codelibrary" not in src and "_compat" not in src


def test_ptx_links_to_a_cubin_without_a_gpu():
    """The real cuda.core.Program links the launcher's PTX to an sm_90 cubin (nvJitLink),
    which is what lets an older driver load PTX from a newer NVVM."""
    ptx, name = K.compile_ptx("update", np.float32, 0, (9, 0))
    try:
        obj = L.load(ptx, (9, 0))
    except Exception as exc:  # pragma: no cover - a machine without nvJitLink
        pytest.skip(f"cannot link here: {exc}")
    if not L.LOADED_AS.startswith("cubin"):
        pytest.skip(L.LOADED_AS)
    assert obj.code_type == "cubin" and obj.code[:4] == b"\x7fELF"
