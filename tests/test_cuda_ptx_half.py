"""The half-precision CUDA kernels (cuda_half.py) compiled to PTX with the real NVVM.

What makes them bit-identical to the CPU kernels: IEEE ``sqrt.rn``/``div.rn`` with no
``approx``/``ftz``, no FMA unless the rule asks for one, float16 conversions
``cvt.f32.f16`` and ``cvt.rn.f16.f32`` (round to nearest even), bfloat16 through
integer shifts (no ``cvt`` to or from ``bf16``, whose NaN handling differs), and the
random stream as 32-bit multiplies (the CPU's ``rand32``). Not run under the simulator.
"""

from __future__ import annotations

import os
import re

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real NVVM, not the CUDA simulator", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from numba import float32, int16, uint16, uint32  # noqa: E402

from fastadagrad import _hyper as H  # noqa: E402
from fastadagrad import cuda_half  # noqa: E402

try:
    cuda.compile_ptx(lambda a: None, (float32[::1],), cc=(8, 0))
except Exception as exc:  # pragma: no cover - depends on the installation
    pytest.skip(f"NVVM is not available to compile PTX ({exc}); install "
                "numba-cuda[cu13]", allow_module_level=True)

_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.M)


def _ptx(fmt: str, flags: int, stochastic: bool, master: bool) -> list[str]:
    kern, _ = cuda_half.kernels(fmt, flags, stochastic, master)
    bits = int16[::1] if fmt == "bfloat16" else uint16[::1]
    sig = (bits, bits, float32[::1], float32[::1], uint32, uint32) + (float32,) * 7
    ptx, _ = cuda.compile_ptx(kern.py_func, sig, cc=(9, 0))
    body = ptx[ptx.index("{"):]
    return [m for m in _INSTR.findall(body) if not m.startswith(".")]


@pytest.mark.parametrize("master", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("flags", [0, H.FMA_ACCUMULATE | H.WD_COUPLED],
                         ids=["numpy", "torch"])
@pytest.mark.parametrize("fmt", ["bfloat16", "float16"])
def test_half_kernel_ptx(fmt, flags, stochastic, master):
    ins = _ptx(fmt, flags, stochastic, master)
    assert "sqrt.rn.f32" in ins and "div.rn.f32" in ins
    assert not [i for i in ins if "approx" in i or "ftz" in i or "rsqrt" in i]
    # every multiply and add of the update rounds on its own (nothing to contract); the
    # one plain mul allowed is float16 stochastic rounding's u = r * 2^-24 (exact, and
    # only compared afterwards: no add to fuse it with, as the fma count below shows)
    plain = [i for i in ins if re.fullmatch(r"(mul|add)\.f32", i)]
    assert plain == (["mul.f32"] if fmt == "float16" and stochastic else [])
    fmas = [i for i in ins if i.startswith("fma")]
    assert (fmas != []) == bool(flags & H.FMA_ACCUMULATE)
    assert all(i == "fma.rn.f32" for i in fmas)
    cvts = {i for i in ins if i.startswith("cvt") and ("f16" in i or "bf16" in i)}
    if fmt == "float16":
        assert "cvt.f32.f16" in cvts and "cvt.rn.f16.f32" in cvts
    else:
        assert cvts == set()
    hashes = [i for i in ins if i == "mul.lo.s32"]
    assert len(hashes) >= (4 if stochastic else 0)
    assert (len(hashes) >= 4) == stochastic
