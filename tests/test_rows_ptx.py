"""The row update's CUDA kernels compiled to PTX with the real NVVM (no GPU needed), as
``tests/test_cuda_ptx.py`` does for the dense kernels: IEEE ``sqrt.rn``/``div.rn``, no
``approx``/``ftz``, every multiply and add rounded on its own, an ``fma`` only where the
CPU row kernel has one (the rowwise update always has one: ``fma(c, p, -(g*m))``), and
64-bit indexing. Not run under the simulator.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real NVVM, not the CUDA simulator", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from numba import float32, float64, int64, uint64  # noqa: E402

from fastadagrad import _hyper as H  # noqa: E402
from fastadagrad import cuda_rows  # noqa: E402

try:
    cuda.compile_ptx(lambda a: None, (float32[::1],), cc=(8, 0))
except Exception as exc:  # pragma: no cover - depends on the installation
    pytest.skip(f"NVVM is not available to compile PTX ({exc}); install "
                "numba-cuda[cu13]", allow_module_level=True)

FLAG_SETS = {
    "numpy": 0,
    "torch": H.FMA_ACCUMULATE | H.WD_COUPLED,
    "fbgemm-l2": H.WD_COUPLED | H.FMA_WEIGHT_DECAY,
    "decoupled": H.WD_DECOUPLED,
    "optax": H.ZERO_WHERE_H0,
    "maximize+scale": H.MAXIMIZE | H.GRAD_SCALE,
}
DTYPES = {"f32": (np.float32, float32), "f64": (np.float64, float64)}
_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.M)


def instructions(ptx: str) -> list[str]:
    body = ptx[ptx.index("{"):]
    return [m for m in _INSTR.findall(body) if not m.startswith(".")]


def _ptx(rowwise: bool, dtype: str, flags: int) -> str:
    np_dt, nb = DTYPES[dtype]
    kern = cuda_rows.kernels(np.dtype(np_dt), flags)[1 if rowwise else 0]
    ints = int64[::1]
    if rowwise:
        sig = (nb[::1], nb[::1], nb[::1], uint64, nb, nb, ints, ints, ints) + (nb,) * 5
    else:
        sig = (nb[::1], nb[::1], nb[::1], uint64, ints, ints, ints) + (nb,) * 7
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    return ptx


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("rowwise", [False, True], ids=["full", "rowwise"])
@pytest.mark.parametrize("rule", list(FLAG_SETS))
def test_row_kernel_ptx(rule, rowwise, dtype):
    flags = FLAG_SETS[rule]
    ptx = _ptx(rowwise, dtype, flags)
    ins = instructions(ptx)
    t = dtype
    assert f"sqrt.rn.{t}" in ins and f"div.rn.{t}" in ins
    assert not [i for i in ins if "approx" in i or "ftz" in i or "rcp" in i or "rsqrt" in i]
    assert not [i for i in ins if re.fullmatch(rf"(mul|add)\.{t}", i)]
    body = ptx[ptx.index("{"):]
    for a, b in re.findall(rf"sub\.{t}\s+%\w+,\s*(%\w+),\s*(%\w+);", body):
        assert a == b, f"plain sub.{t} of two different values"
    fmas = [i for i in ins if i.startswith("fma")]
    fma_wd = flags & H.WD_COUPLED and (flags & H.FMA_WEIGHT_DECAY or rowwise)
    if rowwise or flags & H.FMA_ACCUMULATE or fma_wd:
        assert fmas and all(i == f"fma.rn.{t}" for i in fmas)
    else:
        assert fmas == [], f"unexpected FMA in the {rule} rule: {fmas}"
    assert any(re.fullmatch(r"setp\.\w+\.u64", i) for i in ins)


def test_full_numpy_rule_sums_duplicates_with_add_rn():
    """The duplicate sum is a chain of add.rn (no contraction, no reassociation)."""
    ins = instructions(_ptx(False, "f32", 0))
    assert ins.count("add.rn.f32") >= 3  # duplicate sum, h + g*g, sqrt + eps, p - q
