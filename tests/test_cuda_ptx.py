"""Every CUDA kernel compiled to PTX with the real NVVM (no GPU needed), for sm_90 (and
a few for sm_80), float32 and float64, for each formula variant and mode the launcher
can build,
through the very function the launcher uses (:func:`fastadagrad.cuda_kernels.compile_ptx`
with :data:`~fastadagrad.cuda_kernels.COMPILE_OPTIONS`).

Asserts what makes the GPU bit-identical to the CPU: IEEE ``sqrt.rn``/``div.rn`` (no
``approx``), no flush-to-zero (``ftz``), and an ``fma`` only where the rule asks for one
(the "numpy" rule's kernel contains none: ``h + g*g`` is ``mul.rn`` then ``add.rn``);
and the argument layout the launcher packs (checked again against the loaded kernel on
hardware). Not run under the simulator (it has no NVVM).
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("PTX needs the real NVVM, not the CUDA simulator", allow_module_level=True)
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")

from fastadagrad import _hyper as H  # noqa: E402
from fastadagrad import cuda_kernels as K  # noqa: E402

try:
    K.compile_ptx("finish", np.float64, 0, (8, 0))
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
    "numpy-checked-capturable": K.CHECKED | K.CAPTURABLE,
    "optax-capturable-after": H.ZERO_WHERE_H0 | K.CAPTURABLE | K.LR_AFTER,
    "numpy-grid-stride": K.GRID_STRIDE,
    "torch-checked-capturable-grid-stride": (H.FMA_ACCUMULATE | H.WD_COUPLED | K.CHECKED
                                             | K.CAPTURABLE | K.GRID_STRIDE),
    "keras-unrolled-chunks": H.WD_DECOUPLED | K.UNROLL_CHUNKS,
}
DTYPES = {"f32": np.float32, "f64": np.float64}
PTX_TYPES = {4: "f32", 8: "f64"}

_INSTR = re.compile(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.]*)", re.M)


def instructions(ptx: str) -> list[str]:
    """The instruction mnemonics of a PTX listing (directives and labels dropped)."""
    body = ptx[ptx.index("{"):]
    return [m for m in _INSTR.findall(body) if not m.startswith(".")]


def params(ptx: str) -> list[str]:
    return re.findall(r"\.param\s+\.(\w+)\s+\S+?_param_\d+", ptx)


def _ptx(kind: str, dtype: str, flags: int, cc: tuple[int, int]) -> str:
    ptx, name = K.compile_ptx(kind, DTYPES[dtype], flags, cc)
    assert f".entry {name}(" in ptx
    return ptx


# every rule and mode for sm_90 (H100/H200), two for sm_80: ~0.3 s of NVVM each
UPDATE_CASES = [(r, d, (9, 0)) for r in FLAG_SETS for d in DTYPES] + \
    [(r, d, (8, 0)) for r in ("numpy", "everything") for d in DTYPES]


@pytest.mark.parametrize("rule,dtype,cc", UPDATE_CASES,
                         ids=[f"{r}-{d}-sm_{c[0]}{c[1]}" for r, d, c in UPDATE_CASES])
def test_update_kernel_ptx(rule, dtype, cc):
    flags = FLAG_SETS[rule]
    ptx = _ptx("update", dtype, flags, cc)
    ins = instructions(ptx)
    t = dtype
    assert f".target sm_{cc[0]}{cc[1]}" in ptx
    # the argument layout the launcher packs: u64 table, 3 x 64-bit counts, 7 scalars
    # of the dtype, u64 control block
    assert params(ptx) == ["u64"] * 4 + [t] * 7 + ["u64"]
    assert [{"u64": 8, "f32": 4, "f64": 8}[p] for p in params(ptx)] == \
        K.arg_sizes("update", DTYPES[dtype])
    assert f"sqrt.rn.{t}" in ins
    assert f"div.rn.{t}" in ins
    assert not [i for i in ins if "approx" in i or "ftz" in i or "rcp" in i or "rsqrt" in i]
    # every multiply and add rounds on its own: no plain mul/add left to contract. The
    # one plain sub allowed is ``zero = eps_in - eps_in`` (x - x: nothing to contract).
    assert not [i for i in ins if re.fullmatch(r"(mul|add)\.f(32|64)", i)]
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
    # capturable: lr / (1 + (step-1)*lr_decay) on the device in double, rounded each time
    assert ("div.rn.f64" in ins) == bool(flags & K.CAPTURABLE) or t == "f64"
    # reads and writes go to global memory through the table's addresses
    assert any(i.startswith(f"ld.global.{t}") or i.startswith(f"ld.global.b{t[1:]}")
               or i.startswith("ld.global") for i in ins)
    # 64-bit loops: chunk and element indices compared as 64-bit integers
    assert any(re.fullmatch(r"setp\.\w+\.[su]64", i) for i in ins)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("variant", ["GRID_STRIDE", "UNROLL_CHUNKS"])
def test_unrolled_pass_loads_before_it_stores(variant, dtype):
    """The unrolled pass (one-tensor grid-stride variant, chunked variant): the
    gradient, parameter and accumulator of all UNROLL elements are loaded before the
    first store and the first square root (the loads in flight per thread that the
    variants exist for), and the thread-local arrays stay in registers (no local
    memory)."""
    ptx = _ptx("update", dtype, getattr(K, variant), (9, 0))
    assert ".local" not in ptx
    ops = [i.split(".")[0] if i.startswith(("ld.global", "st.global")) else i
           for i in instructions(ptx) if i.startswith(("ld.global", "st.global", "sqrt"))]
    runs = [len(r) for r in "".join("l" if o == "ld" else "x" for o in ops).split("x")]
    # 4 table reads, then 3 loads per element of the pass, with nothing in between
    assert max(runs) >= 4 + 3 * K.UNROLL
    assert sum(o.startswith("sqrt") for o in ops) >= K.UNROLL + 1  # the pass + remainder


def test_numpy_rule_accumulates_with_mul_then_add():
    """h + g*g in the numpy rule: the product is rounded (mul.rn) and then added."""
    ptx = _ptx("update", "f32", 0, (9, 0))
    body = ptx[ptx.index("{"):]
    mul = re.search(r"mul\.rn\.f32\s+(%f\d+),\s*(%f\d+),\s*\2;", body)
    assert mul, "g*g is not a separate mul.rn.f32"
    assert re.search(rf"add\.rn\.f32\s+%f\d+,\s*%f\d+,\s*{re.escape(mul.group(1))};", body)


@pytest.mark.parametrize("cc", [(9, 0)], ids=lambda c: f"sm_{c[0]}{c[1]}")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("scaled", [False, True])
def test_nonfinite_kernel_ptx(scaled, dtype, cc):
    ptx = _ptx("check", dtype, H.GRAD_SCALE if scaled else 0, cc)
    ins = instructions(ptx)
    assert params(ptx) == ["u64"] * 4 + [dtype, "u64"]
    assert not [i for i in ins if "approx" in i or "ftz" in i]
    assert (f"div.rn.{dtype}" in ins) == scaled
    assert not [i for i in ins if re.match(r"st\.global\.(f|b32)", i)]  # never writes g
    assert any(re.fullmatch(r"setp\.\w+\.[su]64", i) for i in ins)


def test_finish_kernel_ptx():
    ptx = _ptx("finish", "f64", 0, (9, 0))
    assert params(ptx) == ["u64"]


def test_compile_options_are_the_launchers():
    """The launcher compiles with exactly these options: no fastmath, the Numba ABI
    (the only one numba-cuda has for kernels), PTX."""
    assert K.COMPILE_OPTIONS["fastmath"] is False
    assert K.COMPILE_OPTIONS["device"] is False
    assert K.COMPILE_OPTIONS["abi"] == "numba" and K.COMPILE_OPTIONS["output"] == "ptx"
