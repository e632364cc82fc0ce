"""Every CUDA kernel compiled to PTX with the real NVVM (no GPU needed), for sm_80 and
sm_90, float32 and float64, for each formula variant the launcher can build.

Asserts what makes the GPU bit-identical to the CPU: IEEE ``sqrt.rn``/``div.rn`` (no
``approx``), no flush-to-zero (``ftz``), and an ``fma`` only where the rule asks for one
(the "numpy" rule's kernel contains none: ``h + g*g`` is ``mul.rn`` then ``add.rn``).
Also that the loop index is 64-bit. Not run under the simulator (it has no NVVM).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real NVVM, not the CUDA simulator", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from numba import float32, float64, int32, int64  # noqa: E402

from fastadagrad import _hyper as H  # noqa: E402
from fastadagrad import cuda as fcuda  # noqa: E402

try:
    cuda.compile_ptx(lambda a: None, (float32[::1],), cc=(8, 0))
except Exception as exc:  # pragma: no cover - depends on the installation
    pytest.skip(f"NVVM is not available to compile PTX ({exc}); install "
                "numba-cuda[cu13]", allow_module_level=True)

FLAG_SETS = {
    "numpy": 0,
    "torch": H.FMA_ACCUMULATE | H.WD_COUPLED,
    "torch-fma-wd": H.FMA_ACCUMULATE | H.WD_COUPLED | H.FMA_WEIGHT_DECAY,
    "keras": H.WD_DECOUPLED,
    "optax": H.ZERO_WHERE_H0,
    "maximize+scale": H.MAXIMIZE | H.GRAD_SCALE,
    "everything": (H.MAXIMIZE | H.WD_COUPLED | H.FMA_ACCUMULATE | H.FMA_WEIGHT_DECAY
                   | H.ZERO_WHERE_H0 | H.GRAD_SCALE),
}
CCS = [(8, 0), (9, 0)]
DTYPES = {"f32": (np.float32, float32), "f64": (np.float64, float64)}

_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.M)


def instructions(ptx: str) -> list[str]:
    """The instruction mnemonics of a PTX listing (directives and labels dropped)."""
    body = ptx[ptx.index("{"):]
    return [m for m in _INSTR.findall(body) if not m.startswith(".")]


def _ptx(kernel_index: int, dtype: str, flags: int, cc: tuple[int, int]) -> str:
    np_dt, nb_dt = DTYPES[dtype]
    kern = fcuda.kernels(np.dtype(np_dt), flags)[kernel_index]
    arr = nb_dt[::1]
    if kernel_index == 0:
        sig = (arr, arr, arr) + (nb_dt,) * 7
    else:
        sig = (arr, nb_dt, int32[::1], int64)
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=cc)
    return ptx


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rule", list(FLAG_SETS))
def test_update_kernel_ptx(rule, dtype, cc):
    flags = FLAG_SETS[rule]
    ptx = _ptx(0, dtype, flags, cc)
    ins = instructions(ptx)
    t = dtype
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    assert f"sqrt.rn.{t}" in ins
    assert f"div.rn.{t}" in ins
    assert not [i for i in ins if "approx" in i or "ftz" in i or "rcp" in i or "rsqrt" in i]
    # every multiply and add rounds on its own: no plain mul/add left to contract. The
    # one plain sub allowed is ``zero = eps_in - eps_in`` (x - x: nothing to contract).
    assert not [i for i in ins if re.fullmatch(rf"(mul|add)\.{t}", i)]
    body = ptx[ptx.index("{"):]
    for a, b in re.findall(rf"sub\.{t}\s+%\w+,\s*(%\w+),\s*(%\w+);", body):
        assert a == b, f"plain sub.{t} of two different values"
    fmas = [i for i in ins if i.startswith("fma")]
    uses_fma = bool(flags & (H.FMA_ACCUMULATE | (H.FMA_WEIGHT_DECAY if flags & H.WD_COUPLED
                                                 else 0)))
    if uses_fma:
        assert fmas and all(i == f"fma.rn.{t}" for i in fmas)
    else:
        assert fmas == [], f"unexpected FMA in the {rule} rule: {fmas}"
    # 64-bit loop: the index is compared and advanced as a 64-bit integer
    assert any(re.fullmatch(r"setp\.\w+\.u64", i) for i in ins)
    assert not any(re.fullmatch(r"setp\.\w+\.[su]32", i) for i in ins)


def test_numpy_rule_accumulates_with_mul_then_add():
    """h + g*g in the numpy rule: the product is rounded (mul.rn) and then added."""
    ptx = _ptx(0, "f32", 0, (9, 0))
    body = ptx[ptx.index("{"):]
    mul = re.search(r"mul\.rn\.f32\s+(%f\d+),\s*(%f\d+),\s*\2;", body)
    assert mul, "g*g is not a separate mul.rn.f32"
    assert re.search(rf"add\.rn\.f32\s+%f\d+,\s*%f\d+,\s*{re.escape(mul.group(1))};", body)


@pytest.mark.parametrize("cc", CCS, ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scaled", [False, True])
def test_nonfinite_kernel_ptx(scaled, dtype, cc):
    ptx = _ptx(1, dtype, H.GRAD_SCALE if scaled else 0, cc)
    ins = instructions(ptx)
    assert not [i for i in ins if "approx" in i or "ftz" in i]
    assert (f"div.rn.{dtype}" in ins) == scaled
    assert not [i for i in ins if i.startswith("st.global.f")]  # never writes g
    assert any(re.fullmatch(r"setp\.\w+\.u64", i) for i in ins)
