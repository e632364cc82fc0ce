"""``fastadagrad.torch.Adagrad`` against ``torch.optim.Adagrad`` itself, bit for bit.

Every test trains the same model twice, once with torch's class and once with ours,
from the same parameters and the same gradients, and compares every parameter and
accumulator bit for bit. Where a test asserts the compiled path ran, torch's
implementation is patched to fail if it is called.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import re
import subprocess
import sys
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fastadagrad.torch as FT  # noqa: E402
from fastadagrad import _tensorguard, _tensorplan, config  # noqa: E402

TORCH_OPT = torch.optim.Adagrad
MODES = {"single": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DTYPES = [torch.float32, torch.float64]
# torch's own test inputs for Adagrad (common_optimizers.optim_inputs_func_adagrad) and
# every combination of the options that change the bits
OPTIONS = [
    {},
    {"lr": 0.1},
    {"weight_decay": 0.1},
    {"weight_decay": 0.1, "maximize": True},
    {"lr_decay": 0.5},
    {"initial_accumulator_value": 0.1},
    {"eps": 1e-3},
    {"lr": 0.3, "lr_decay": 0.1, "weight_decay": 0.2, "initial_accumulator_value": 0.5,
     "eps": 1e-4, "maximize": True},
] + [dict(zip(("lr_decay", "weight_decay", "maximize"), combo))
     for combo in itertools.product((0.0, 0.25), (0.0, 0.05), (False, True))]
SIZES = [(5, 7), (17,), (1,), (0,), (3, 16), (2**12 + 3,), (64, 33)]


@pytest.fixture
def no_torch_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if the adapter hands any step to torch's implementation."""
    def fail(*a: object, **k: object) -> None:
        raise AssertionError("torch's implementation was called")

    monkeypatch.setattr(FT, "_torch_step", fail)


def _params(dtype: torch.dtype, sizes: list[tuple[int, ...]] = SIZES, seed: int = 0
            ) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g) for s in sizes]


def _grads(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    # magnitudes from 1e-3 to 30 so that FMA and non-FMA accumulations differ
    scale = torch.tensor([1e-3, 1.0, 30.0], dtype=torch.float64)
    return [(torch.randn(p.shape, dtype=p.dtype, generator=g)
             * scale[torch.randint(0, 3, p.shape, generator=g)].to(p.dtype))
            for p in params]


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], what: str = "") -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.shape == y.shape and x.dtype == y.dtype, f"{what} {i}"
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        bad = int((_bits(x) != _bits(y)).sum())
        assert bad == 0, f"{what} tensor {i}: {bad} of {x.numel()} elements differ"


def _train(cls: type, params: list[torch.Tensor], steps: int, kw: dict,
           grads: list | None = None) -> tuple[list[torch.Tensor], object]:
    ps = [p.clone().requires_grad_() for p in params]
    opt = cls(ps, **kw)
    for s in range(steps):
        for p, g in zip(ps, grads[s] if grads else _grads(params, s)):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def _compare(params: list[torch.Tensor], steps: int, kw: dict) -> None:
    ref, ropt = _train(TORCH_OPT, params, steps, kw)
    out, opt = _train(FT.Adagrad, params, steps, kw)
    assert_same(out, ref, "param")
    assert_same([opt.state[p]["sum"] for p in out], [ropt.state[p]["sum"] for p in ref],
                "sum")
    assert [float(opt.state[p]["step"]) for p in out] == \
        [float(ropt.state[p]["step"]) for p in ref]


# ------------------------------------------------------------------- exact bits

def test_every_path_compiled_here() -> None:
    # x86-64 torch with MKL (the project's machines): every path runs compiled
    paths = FT.compiled_paths()
    if not all(paths.values()):
        pytest.skip(f"this torch build rounds differently: {paths}")
    assert set(paths) == {"single-tensor/foreach float32", "single-tensor/foreach float64",
                          "fused float32", "fused float64", "sparse float32",
                          "sparse float64"}


@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_failed_self_check_hands_the_step_to_torch(mode: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # a torch build that rounds differently: the path goes to torch, still exact
    formula = "fused" if mode == "fused" else "vsqrt"
    monkeypatch.setitem(FT._CHECKED, (formula, torch.float32), False)
    calls = []
    real = FT._torch_step

    def counting(*a: object, **k: object) -> None:
        calls.append(1)
        real(*a, **k)

    monkeypatch.setattr(FT, "_torch_step", counting)
    _compare(_params(torch.float32, [(5, 3), (17,)]), 3, {**MODES[mode], "lr_decay": 0.1})
    assert calls and not FT.compiled_paths()[
        ("fused" if mode == "fused" else "single-tensor/foreach") + " float32"]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("opts", OPTIONS, ids=str)
def test_matches_torch_bit_for_bit(dtype: torch.dtype, mode: str, opts: dict,
                                   no_torch_step: None) -> None:
    _compare(_params(dtype), 6, {**MODES[mode], **opts})


@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_many_steps_large_parallel(mode: str, no_torch_step: None) -> None:
    # above the parallel threshold, mixed dtypes in one group, 30 steps
    sizes = [(2**16 + 5,), (300, 301), (7,)]
    params = _params(torch.float32, sizes) + _params(torch.float64, sizes[:2], seed=1)
    _compare(params, 30, {**MODES[mode], "lr_decay": 0.1, "weight_decay": 0.01})


@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_tensor_lr(mode: str, no_torch_step: None) -> None:
    for lr in (torch.tensor(0.05), torch.tensor([0.05], dtype=torch.float64)):
        for extra in ({}, {"lr_decay": 0.3}):
            _compare(_params(torch.float32, [(33,), (4, 5)]), 5,
                     {**MODES[mode], "lr": lr, **extra})
            _compare(_params(torch.float64, [(33,)]), 5, {**MODES[mode], "lr": lr, **extra})


def test_hard_coded_values() -> None:
    # guards against torch and the adapter drifting together: two steps by hand
    p = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = FT.Adagrad([p], lr=0.5)
    for g in ([0.5, 1.0], [1.0, -2.0]):
        p.grad = torch.tensor(g)
        opt.step()
    h = np.array([0.5**2 + 1.0, 1.0 + 4.0], np.float32)
    expect = np.array([1.0 - 0.5, -2.0 - 0.5], np.float32)
    expect = expect - np.float32(0.5) * np.array([1.0, -2.0], np.float32) / (
        np.sqrt(h) + np.float32(1e-10))
    np.testing.assert_allclose(p.detach().numpy(), expect, rtol=1e-6)
    np.testing.assert_array_equal(opt.state[p]["sum"].numpy(), h)


# ------------------------------------------------- the emulated MKL square roots

NO_EMULATION = "no emulation of MKL's square root is expected to pass here"


def _counting(monkeypatch: pytest.MonkeyPatch, table: dict, name: Any,
              record: Callable[[tuple], Any] = lambda a: 1) -> list:
    """Replace the kernel pair ``table[name]`` with kernels that append ``record(args)``
    to the returned list, then run."""
    calls: list = []

    def counting(kernel: Any) -> Any:
        return lambda *a: (calls.append(record(a)), kernel(*a))

    monkeypatch.setitem(table, name, tuple(map(counting, table[name])))
    return calls


def _emulation_used() -> str | None:
    """The emulation of MKL's square root that must pass here: "vsqrt-emu" where MKL
    runs its generic kernels (AMD CPUs), "vsqrt-z0" where it runs its AVX-512 ones
    (Intel CPUs with AVX-512): the project's machines. None elsewhere (another MKL or
    CPU: the emulations may not pass there, and the routine is called)."""
    from fastadagrad import cpu_vsqrt_z0

    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(4096)
    except OSError:
        return None
    if not FT._formula_ok("vsqrt", torch.float32):
        return None
    if "AuthenticAMD" in info:
        name = "vsqrt-emu"
    elif "GenuineIntel" in info and cpu_vsqrt_z0.available():
        name = "vsqrt-z0"
    else:
        return None
    assert FT._formula_ok(name, torch.float32)
    assert FT._eager_kernels()[np.dtype(np.float32)] == name
    return name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("foreach", [False, True])
def test_emulated_path_gives_torchs_nan_with_maximize(dtype: torch.dtype, foreach: bool
                                                      ) -> None:
    # maximize negates the gradient, which flips a NaN's sign; the emulated kernel keeps
    # that negation (as a run-time choice: a constant one lets LLVM fold (-g)*(-g) into
    # g*g), so a NaN gradient gives torch's NaN, sign included, in the vector steps and
    # the element-by-element tail, with and without weight decay
    if _emulation_used() is None:
        pytest.skip(NO_EMULATION)
    ints = torch.int32 if dtype == torch.float32 else torch.int64
    for n in (5, 4099):
        for wd in (0.0, 0.25):
            out = []
            for cls in (torch.optim.Adagrad, FT.Adagrad):
                p = torch.full((n,), 0.5, dtype=dtype, requires_grad=True)
                opt = cls([p], lr=0.03, maximize=True, weight_decay=wd, foreach=foreach)
                g = torch.full((n,), 0.25, dtype=dtype)
                g[3] = float("nan")
                g[n - 2] = -float("nan")
                p.grad = g
                opt.step()
                out.append((p.detach().view(ints).clone(), opt.state[p]["sum"].view(ints)))
            assert torch.equal(out[0][0], out[1][0]), (n, wd, "param")
            assert torch.equal(out[0][1], out[1][1]), (n, wd, "sum")


def test_emulated_sqrt_is_the_routine_exhaustively() -> None:
    # every mantissa/exponent-parity pattern (of the normal range; for the AVX-512
    # kernels' emulation, of [1, 4): vrsqrt14 and the arithmetic scale by 4^k), against
    # vmsSqrt itself
    name = _emulation_used()
    if name is None:
        pytest.skip(NO_EMULATION)
    assert (FT._emulation_ok if name == "vsqrt-emu" else FT._z0_ok)(exhaustive=True)


def test_emulated_float64_sqrt_is_the_routine() -> None:
    # every exponent of MKL's vector path with random and edge mantissas, +0, and 2^24
    # random inputs, against vmdSqrt itself (float64 cannot be exhaustive)
    name = _emulation_used()
    if name is None:
        pytest.skip(NO_EMULATION)
    assert FT._formula_ok(name, torch.float64)
    assert FT._eager_kernels()[np.dtype(np.float64)] == name
    check = FT._emulation_ok if name == "vsqrt-emu" else FT._z0_ok
    assert check(exhaustive=True, dtype=torch.float64)


def test_emulated_sqrt_is_used_and_differs_from_ieee(no_torch_step: None,
                                                     monkeypatch: pytest.MonkeyPatch
                                                     ) -> None:
    name = _emulation_used()
    if name is None:
        pytest.skip(NO_EMULATION)
    calls = _counting(monkeypatch, _tensorplan.KERNELS, name)
    _compare(_params(torch.float32, [(2**12 + 3,)]), 3, {})
    assert calls
    # the emulation is not an IEEE square root in disguise: torch's bits are not
    x = torch.rand(2**16) * 100 + 1
    assert not torch.equal(torch.sqrt(x), torch.from_numpy(np.sqrt(x.numpy())))


@pytest.mark.parametrize("mode", ["single", "foreach"])
def test_accumulators_outside_mkls_normal_range(mode: str, no_torch_step: None) -> None:
    # zeros (gradients that stay 0), subnormals, the largest floats, inf, NaN and
    # negative sums (a loaded state) take MKL's scalar path: the kernel hands those
    # blocks to the routine; the other blocks of the same tensor stay emulated
    tiny, big = float(np.finfo(np.float32).smallest_subnormal), 3.4e38
    params = _params(torch.float32, [(3000,), (600,), (9,)])
    grads = _grads(params, 0)
    grads[0][:700] = 0.0
    grads[0][1100:1110] = tiny
    grads[0][1500] = float("inf")
    grads[0][2100] = float("nan")
    grads[1][:] = 0.0
    grads[2][3] = 1.8e19  # g*g near the largest float
    for cls in (TORCH_OPT, FT.Adagrad):
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, **MODES[mode])
        for p, g in zip(ps, grads):
            p.grad = g.clone()
        opt.step()
        for p in ps:
            opt.state[p]["sum"][5:9] = torch.tensor([-1.0, -0.0, big, tiny])
        for s in range(3):
            for p, g in zip(ps, _grads(params, s + 1) if s else grads):
                p.grad = g.clone()
            opt.step()
        if cls is TORCH_OPT:
            ref = [ps, [opt.state[p]["sum"] for p in ps]]
        else:
            assert_same(ps, ref[0], "param")
            assert_same([opt.state[p]["sum"] for p in ps], ref[1], "sum")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("flags", [0, 1, 2, 3])
def test_emulated_kernel_is_the_routine_kernel(flags: int, dtype: type) -> None:
    # the one-pass kernel (LANES at a time, element by element after the last whole
    # step and where an accumulator is negative) against the kernel that calls vmsSqrt
    # on every block, bit for bit: every length around a step, maximize and coupled
    # weight decay, accumulators at zero, subnormal, huge, inf, NaN and negative
    name = _emulation_used()
    if name is None:
        pytest.skip(NO_EMULATION)
    from fastadagrad import _hyper as H
    from fastadagrad import cpu_vsqrt as V
    from fastadagrad import cpu_vsqrt_z0 as Z

    span = V.adagrad_span_emu if name == "vsqrt-emu" else Z.Z0.span

    fl = (H.MAXIMIZE if flags & 1 else 0) | (H.WD_COUPLED if flags & 2 else 0)
    t = dtype
    fn = FT._VSQRT[torch.float32 if t == np.float32 else torch.float64]
    coefs = (fn, t(-0.03), t(1e-7), t(0.25), fl)
    rng = np.random.default_rng(flags)
    # (1e-24/2e-23, 1e-280/1e-270: either side of the AVX-512 emulation's lower bound)
    special = np.array([0.0, 1e-42, 3.4e38, np.inf, np.nan, -1.0, -0.0, 2.0, 1e-24, 2e-23]
                       if t == np.float32 else [0.0, 1e-310, 1e308, np.inf, np.nan, -1.0,
                                                -0.0, 2.0, 1e-280, 1e-270], t)
    lanes = V.LANES if t == np.float32 else V.LANES64
    ints = np.int32 if t == np.float32 else np.int64
    for n in (1, lanes - 1, lanes, lanes + 1, 3 * lanes + 5, 1031):
        p0 = rng.standard_normal(n).astype(t)
        h0 = rng.random(n).astype(t)
        gs = [(rng.standard_normal(n) * 0.1).astype(t) for _ in range(3)]
        where = rng.integers(0, n, 4)
        h0[where] = special[rng.integers(0, special.size, 4)]
        gs[0][where[:2]] = 0.0
        emu, ref = [p0.copy(), h0.copy()], [p0.copy(), h0.copy()]
        for g in gs:
            span(emu[0], g, emu[1], np.empty(1, t), *coefs)
            V.adagrad_span_vsqrt(ref[0], g, ref[1], np.empty(V.BLOCK, t), *coefs)
        for a, b in zip(emu, ref):
            np.testing.assert_array_equal(a.view(ints), b.view(ints), err_msg=str(n))


def test_failed_emulation_check_keeps_the_routine(no_torch_step: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    for name in FT._EMULATIONS:
        for dt in (torch.float32, torch.float64):
            monkeypatch.setitem(FT._CHECKED, (name, dt), False)
        monkeypatch.delitem(_tensorplan.KERNELS, name)  # would raise KeyError if used
    for dt in (torch.float32, torch.float64):
        _compare(_params(dt, [(2**12 + 3,), (5,)]), 3, {"lr_decay": 0.1})


@pytest.fixture
def mkl_dynamic_off() -> Any:
    """MKL's C service functions in libtorch_cpu, with MKL's dynamic threading off (as
    ``torch.set_num_threads`` leaves it) and a thread-local count of 2 on this thread;
    everything put back after the test."""
    import ctypes
    import glob
    import os

    if not FT._VSQRT or not FT._VSQRT[torch.float32][1]:
        pytest.skip("this torch build exports no MKL_Set_Num_Threads_Local")
    path = glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib",
                                  "libtorch_cpu.*"))[0]
    lib = ctypes.CDLL(path)
    setter, getter, dynamic = (lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Max_Threads,
                               lib.MKL_Set_Dynamic)
    setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
    getter.restype, getter.argtypes = ctypes.c_int, []
    dynamic.restype, dynamic.argtypes = None, [ctypes.c_int]
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # (MKL's dynamic threading off)
    prev = setter(2)
    try:
        yield getter
    finally:
        setter(prev)
        torch.set_num_threads(before)
        dynamic(1)


def test_mkl_square_root_runs_on_one_thread(mkl_dynamic_off: Any) -> None:
    # with MKL's dynamic threading off, each routine call would start a team of all the
    # threads (~2 us a call: 8x the kernel's time at 2^16 float32, blocks of 512). The
    # kernels call it with MKL's thread-local count set to 1 and put the caller's back.
    # A stand-in for the routine records the count it runs under.
    import ctypes

    from fastadagrad import cpu_vsqrt as V

    getter = mkl_dynamic_off
    seen = []

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                      ctypes.c_int64)
    def routine(n: int, src: int, dst: int, mode: int) -> None:
        seen.append(getter())
        ctypes.memmove(dst, src, 4 * n)

    fake = ctypes.cast(routine, ctypes.c_void_p).value
    threads = FT._VSQRT[torch.float32][1]
    x = np.arange(1, 40, dtype=np.float32)
    out = np.zeros_like(x)
    assert getter() == 2
    V.mkl_sqrt_routine(fake, x, out)  # the bare address: no change of the count
    V.mkl_sqrt_routine((fake, threads), x, out)
    V.mkl_sqrt_routine((fake, 0), x, out)  # no setter: as the bare address
    assert seen == [2, 1, 2]
    assert getter() == 2  # the caller's count, put back
    np.testing.assert_array_equal(out, x)


@pytest.mark.parametrize("size", [(2**12 + 3,), (2**16,)], ids=str)
@pytest.mark.parametrize("mode", ["single", "foreach"])
def test_eager_formula_after_set_num_threads(mode: str, size: tuple[int, ...],
                                             mkl_dynamic_off: Any, no_torch_step: None
                                             ) -> None:
    # torch's bits and the caller's MKL thread count, serial and parallel kernels
    for dt in DTYPES:
        _compare(_params(dt, [size, (5,)]), 3, {"lr_decay": 0.1, **MODES[mode]})
    assert mkl_dynamic_off() == 2


# ------------------------------------------------------------- the Optimizer API

def test_signature_and_defaults_are_torchs() -> None:
    assert inspect.signature(FT.Adagrad.__init__) == inspect.signature(TORCH_OPT.__init__)
    p = [torch.zeros(2, requires_grad=True)]
    assert FT.Adagrad(p).defaults == TORCH_OPT(p).defaults
    assert issubclass(FT.Adagrad, torch.optim.Optimizer)


BAD_ARGS = [
    {"lr": -1.0}, {"lr_decay": -0.1}, {"weight_decay": -1e-3},
    {"initial_accumulator_value": -1.0}, {"eps": -1e-8},
    {"lr": torch.tensor([0.1, 0.2])}, {"fused": True, "foreach": True},
    {"fused": True, "differentiable": True}, {"lr": "0.1"},
]


@pytest.mark.parametrize("kw", BAD_ARGS, ids=str)
def test_bad_arguments_raise_as_torch(kw: dict) -> None:
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(Exception) as ref:
        TORCH_OPT(p, **kw)
    with pytest.raises(type(ref.value)):
        FT.Adagrad(p, **kw)


@pytest.mark.parametrize("params", [[], torch.zeros(3), [torch.zeros(2)] * 2],
                         ids=["empty", "a tensor", "a parameter twice"])
def test_bad_params_raise_as_torch(params: object) -> None:
    with pytest.raises(Exception) as ref:
        TORCH_OPT(params)
    with pytest.raises(type(ref.value)):
        FT.Adagrad(params)


@pytest.mark.parametrize("kw", [{"fused": True}, {}], ids=str)
def test_int_param_raises_as_torch_at_step(kw: dict) -> None:
    for cls in (TORCH_OPT, FT.Adagrad):
        p = torch.zeros(2, dtype=torch.int64)
        p.grad = torch.ones(2, dtype=torch.int64)
        with pytest.raises(RuntimeError):
            cls([p], **kw).step()
        assert not p.any()


def test_param_groups_add_param_group_none_grads_closure_hooks(no_torch_step: None
                                                                ) -> None:
    def build(cls: type) -> tuple[list[torch.Tensor], object, list[str]]:
        ps = _params(torch.float32, [(5, 3), (3,), (4,), (2, 2)])
        ps = [p.requires_grad_() for p in ps]
        opt = cls([{"params": ps[:2], "lr_decay": 0.3},  # ps[1] skips steps: 2 counts
                   {"params": [ps[2]], "lr": 0.5, "maximize": True}],
                  lr=0.1, weight_decay=0.01)
        opt.add_param_group({"params": [ps[3]], "lr_decay": 0.2, "eps": 1e-2})
        calls: list[str] = []
        opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
        opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
        return ps, opt, calls

    (ref, ropt, rcalls), (out, opt, calls) = build(TORCH_OPT), build(FT.Adagrad)
    for s in range(4):
        grads = _grads(ref, s)
        for ps in (ref, out):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 1 and s % 2) else g.clone()
        assert ropt.step(lambda: 1.5) == 1.5
        assert opt.step(lambda: 1.5) == 1.5
    assert calls == rcalls == ["pre", "post"] * 4
    assert_same(out, ref, "param")
    assert float(opt.state[out[1]]["step"]) == 2.0  # None grads are skipped
    opt.zero_grad()
    assert all(p.grad is None for p in out)


def test_step_hooks_and_profiler_range_as_torchs() -> None:
    # step hooks and the profiler range come from torch's own step wrapper, as for its Adagrad
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    def run(cls: type) -> tuple[list[str], list[str], list[torch.Tensor]]:
        p = torch.ones(4, requires_grad=True)
        opt = cls([p], lr=0.1)
        calls: list[str] = []

        def pre(o: object, a: tuple, k: dict) -> tuple:
            calls.append("pre")
            return a, {**k, "closure": lambda: calls.append("closure") or 2.0}

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(lambda o, a, k: calls.append(f"post {sorted(k)}"))
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("gpre")),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("gpost"))]
        try:
            p.grad = torch.full((4,), 0.5)
            assert opt.step() == 2.0
            with torch.profiler.profile() as prof:
                opt.step()
        finally:
            for h in handles:
                h.remove()
        names = [e.key for e in prof.key_averages() if e.key.startswith("Optimizer.step")]
        return calls, names, [p]

    calls, names, out = run(FT.Adagrad)
    rcalls, rnames, ref = run(TORCH_OPT)
    assert calls == rcalls == ["gpre", "pre", "closure", "post ['closure']", "gpost"] * 2
    assert names == rnames == ["Optimizer.step#Adagrad.step"]
    assert_same(out, ref)


def test_closure_runs_with_grad_enabled(no_torch_step: None) -> None:
    w = torch.ones(3, requires_grad=True)
    opt = FT.Adagrad([w], lr=0.1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * w).sum()
        loss.backward()
        return loss

    assert float(opt.step(closure).detach()) == 3.0
    assert torch.all(w < 1)


@pytest.mark.parametrize("sched", ["step", "lambda", "exp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_lr_schedulers(sched: str, mode: str, dtype: torch.dtype, no_torch_step: None
                       ) -> None:
    def run(cls: type) -> list[torch.Tensor]:
        ps = [p.requires_grad_() for p in _params(dtype, [(10,), (3, 4)])]
        opt = cls(ps, lr=0.2, weight_decay=0.1, **MODES[mode])
        s = {"step": lambda: torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.3),
             "lambda": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 1 / (e + 1)),
             "exp": lambda: torch.optim.lr_scheduler.ExponentialLR(opt, 0.7)}[sched]()
        for step in range(6):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            opt.step()
            s.step()
        return ps

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


def _count_full_analyses(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each full analysis of an all-CPU group."""
    full: list[int] = []
    real = FT.Adagrad._prepare_cpu

    def counting(self: object, *a: object, **k: object) -> object:
        full.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(FT.Adagrad, "_prepare_cpu", counting)
    return full


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_lr_decay_steps_repeat(mode: str, dtype: torch.dtype, no_torch_step: None,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``lr_decay`` the learning rate depends on the step: where every counter of
    the group holds one value, the repeated step reads it after checking the tensors
    (no full analysis from the third step on); where they differ (a parameter without
    a gradient at one step lags behind from then on), the full analysis splits the
    group by step. torch's bits and counters either way, with a scheduler too."""
    full = _count_full_analyses(monkeypatch)

    def run(cls: type, lag: bool) -> tuple[list[torch.Tensor], list[float], int]:
        ps = [p.requires_grad_() for p in _params(dtype, [(10,), (3, 4), (5,)])]
        opt = cls(ps, lr=0.3, lr_decay=0.25, weight_decay=0.1, **MODES[mode])
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, 0.9)
        for step in range(7):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = None if lag and step == 3 and p is ps[1] else g
            if step == 2:
                full.clear()
            opt.step()
            sched.step()
        return ps + [opt.state[p]["sum"] for p in ps], [float(opt.state[p]["step"])
                                                         for p in ps], len(full)

    for lag in (False, True):
        out, steps, analysed = run(FT.Adagrad, lag)
        ref, rsteps, _ = run(TORCH_OPT, lag)
        assert_same(out, ref, f"lag={lag}")
        assert steps == rsteps
        assert analysed == (4 if lag else 0), (lag, analysed)


@pytest.mark.parametrize("lr_decay", [0.0, 0.25])
@pytest.mark.parametrize("mode", list(MODES))
def test_parameters_without_gradients_repeat(mode: str, lr_decay: float,
                                             no_torch_step: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Parameters whose ``.grad`` is None (a frozen layer still in the optimizer) are
    skipped as torch skips them; while the same ones have none, the repeated step takes
    the others without the full analysis. A change of which have one goes through the
    full analysis again. torch's bits and counters throughout."""
    full = _count_full_analyses(monkeypatch)
    none_at = {0: {0}, 1: {0}, 2: {0}, 3: {0}, 4: {0, 2}, 5: {0, 2}, 6: set(), 7: {0},
               8: {0}}

    def run(cls: type) -> tuple[list[torch.Tensor], list[float], list[int]]:
        ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (3, 4), (5,),
                                                                   (7,)])]
        opt = cls(ps, lr=0.3, lr_decay=lr_decay, **MODES[mode])
        analysed = []
        for step in range(9):
            for k, (p, g) in enumerate(zip(ps, _grads(ps, step))):
                p.grad = None if k in none_at[step] else g
            full.clear()
            opt.step()
            analysed.append(len(full))
        return (ps + [opt.state[p]["sum"] for p in ps if p in opt.state],
                [float(opt.state[p]["step"]) for p in ps if p in opt.state], analysed)

    out, steps, analysed = run(FT.Adagrad)
    ref, rsteps, _ = run(TORCH_OPT)
    assert_same(out, ref)
    assert steps == rsteps
    # the first step, and each step after a change of which parameters have gradients;
    # with lr_decay, also a step whose counters differ (the last: one skipped two steps)
    want = [1, 0, 0, 0, 1, 0, 1, 1, 0 if lr_decay == 0 else 1]
    assert analysed == want


def test_groups_repeat_beside_one_that_cannot(no_torch_step: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A group that cannot take the repeated step (a frozen layer's group: no gradient)
    does not make the others' validated steps be prepared again: one validation per
    group per step, torch's bits."""
    def run(cls: type, calls: list[int] | None) -> list[torch.Tensor]:
        ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (3, 4), (5,)])]
        frozen = torch.ones(4, requires_grad=True)
        opt = cls([{"params": ps}, {"params": [frozen], "lr": 0.5}], lr=0.1)
        for step in range(5):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            if calls is not None:
                calls.clear()
            opt.step()
        return ps + [frozen]

    real = _tensorplan.prepare
    calls: list[int] = []
    monkeypatch.setattr(_tensorplan, "prepare",
                        lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    out = run(FT.Adagrad, calls)
    assert calls == [3], calls
    assert_same(out, run(TORCH_OPT, None))


@pytest.mark.parametrize("pdtype", DTYPES)
def test_fused_reads_a_float64_counter_as_float(pdtype: torch.dtype,
                                                no_torch_step: None) -> None:
    """torch's fused CPU kernel reads the step counter as a float32 (``item<float>``)
    whatever its dtype: a float64 count above 2^24, set by hand, is rounded first."""
    for k in range(6):
        out = []
        for cls in (TORCH_OPT, FT.Adagrad):
            p = torch.tensor([1.0, -2.0, 3.0], dtype=pdtype, requires_grad=True)
            opt = cls([p], lr=0.3, lr_decay=0.7, fused=True)
            opt.state[p]["step"] = torch.tensor(float(2**24 + 2 * k), dtype=torch.float64)
            opt.state[p]["sum"] = torch.zeros_like(p)
            for s in range(3):
                p.grad = torch.full_like(p, 0.5 + s)
                opt.step()
            out.append([p.detach(), opt.state[p]["sum"], opt.state[p]["step"]])
        assert_same(out[1], out[0], f"count 2^24 + {2 * k}")


@pytest.mark.parametrize("value, decay", [(float("inf"), 0.5), (-1.0, 1.0),
                                          (float("nan"), 0.5)])
@pytest.mark.parametrize("mode", list(MODES))
def test_counter_beyond_a_finite_learning_rate_is_torchs(value: float, decay: float,
                                                         mode: str) -> None:
    """A counter of inf or NaN, or one that makes ``1 + (step - 1) * lr_decay`` zero:
    torch's outcome (its fused kernel computes lr / 0 or lr / inf in C++; its other
    paths raise ZeroDivisionError where Python divides by 0), nothing else."""
    def run(cls: type) -> object:
        p = torch.tensor([1.0, 2.0], requires_grad=True)
        opt = cls([p], lr=0.5, lr_decay=decay, **MODES[mode])
        for s in range(3):
            p.grad = torch.full_like(p, 1.0 + s)
            if s == 1:
                opt.state[p]["step"].fill_(value)
            try:
                opt.step()
            except ZeroDivisionError as e:
                return type(e), p.detach().clone()
        return None, p.detach().clone(), opt.state[p]["step"].clone()

    out, ref = run(FT.Adagrad), run(TORCH_OPT)
    assert out[0] is ref[0]
    assert_same(list(out[1:]), list(ref[1:]))


SWAP_DURING_STEP = """
import os, sys, torch, fastadagrad.torch as FT
N = 1 << 16
arm = {"on": False, "victim": None}
p0 = torch.randn(N, requires_grad=True)

class Swapper(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if arm["on"] and getattr(func, "__name__", "") == sys.argv[2]:
            arm["on"] = False
            with torch.no_grad():
                p0.data = torch.zeros(N)  # p0's checked storage freed here
            arm["victim"] = torch.zeros(N)  # (likely reuses the freed block)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

e = torch.randn(8).as_subclass(Swapper).requires_grad_()
groups = [{"params": [p0, e]}] if sys.argv[1] == "one" else [{"params": [p0]},
                                                             {"params": [e]}]
opt = FT.Adagrad(groups, lr=0.1)
for s in range(4):
    p0.grad, e.grad = torch.ones(N), torch.ones(8)
    arm["on"] = s == 3
    opt.step()
print(int((arm["victim"] != 0).sum()))
"""


@pytest.mark.parametrize("groups, hook, optimize", [
    ("two", "__get__", False), ("two", "data_ptr", False), ("one", "data_ptr", False),
    ("two", "__get__", True)])  # (python -O: the run must still hold the storages)
def test_subclass_swapping_a_storage_during_the_step(groups: str, hook: str,
                                                    optimize: bool) -> None:
    """A parameter of a tensor subclass whose ``__torch_function__`` (run when the step
    reads its ``.grad`` or its address) swaps another parameter's storage after that
    one was checked: the checked storages are held until the compiled run has written
    them, and the subclass's own group is torch's step. Was a write into freed memory
    (SIGSEGV, heap corruption, or a freed block's new owner overwritten)."""
    r = subprocess.run([sys.executable, *(["-O"] if optimize else []), "-c",
                        SWAP_DURING_STEP, groups, hook],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.split()[-1] == "0"  # nothing written into the freed block


def test_subclass_with_torch_function_takes_torchs_step() -> None:
    """A parameter subclass that overrides ``__torch_function__`` sees the in-place
    operations of torch's step (its group is torch's), with torch's bits; a subclass
    that does not override it stays compiled."""
    seen: list[str] = []

    class Watched(torch.nn.Parameter):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore
            seen.append(getattr(func, "__name__", ""))
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))

    class Plain(torch.nn.Parameter):
        pass

    assert _tensorplan.hookless([Plain(torch.ones(2)), torch.ones(1)])
    assert not _tensorplan.hookless([torch.ones(1), Watched(torch.ones(2))])
    out = []
    for cls in (FT.Adagrad, TORCH_OPT):
        seen.clear()
        ps = [Watched(t) for t in _params(torch.float32, [(10,), (3, 4)])]
        opt = cls(ps, lr=0.1)
        for step in range(3):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            opt.step()
        out.append(([p.detach().as_subclass(torch.Tensor) for p in ps], sorted(set(seen))))
    assert_same(out[0][0], out[1][0])
    assert "addcdiv_" in out[0][1], out[0][1]


@pytest.mark.parametrize("shape", [(), (1,), (3,)])
@pytest.mark.parametrize("mode", list(MODES))
def test_zero_dim_param_with_a_wider_tensor_lr(mode: str, shape: tuple) -> None:
    """A 0-dim float32 parameter (a learned scale) with a float64 tensor ``lr``: with
    ``foreach=True`` torch multiplies two 0-dim tensors, so type promotion computes
    ``g * -clr`` in float64 and rounds once; torch's bits with every flag set."""
    def run(cls: type, seed: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        p = torch.randn(shape, generator=g).requires_grad_()
        opt = cls([p], lr=torch.tensor(0.05, dtype=torch.float64), **MODES[mode])
        for _ in range(4):
            p.grad = torch.randn(shape, generator=g)
            opt.step()
        return [p.detach(), opt.state[p]["sum"]]

    for seed in range(40):
        assert_same(run(FT.Adagrad, seed), run(TORCH_OPT, seed), f"seed {seed}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_scheduler_makes_no_new_hyper(dtype: torch.dtype, no_torch_step: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """fused=True with a learning rate changed at every step: the repeated step makes
    the new scalars from the last ones (``_NewLr``), not a new Hyper, with torch's bits
    at every step."""
    made = []
    real = FT._fused_hyper

    def counting(*a: object) -> object:
        made.append(a[0])
        return real(*a)

    counting.__wrapped__ = real.__wrapped__  # type: ignore[attr-defined]
    monkeypatch.setattr(FT, "_fused_hyper", counting)
    lrs = [0.2, 0.15, 0.15, 3e-3, 0.0, 1e-30, 0.07, 0.5]

    def run(cls: type) -> list[torch.Tensor]:
        ps = [p.requires_grad_() for p in _params(dtype, [(10,), (3, 4)])]
        opt = cls(ps, lr=lrs[0], fused=True, eps=1e-3)
        for step, lr in enumerate(lrs):
            opt.param_groups[0]["lr"] = lr
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            opt.step()
            if cls is FT.Adagrad and step:
                assert made == [lrs[0]], (step, made)
        return ps

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_step_counters_replaced_between_steps(mode: str) -> None:
    # the counters are incremented in one compiled call through their addresses: a
    # counter replaced (another tensor, another dtype, an integer one, one shared by
    # two parameters) is read again, and torch's increment takes what the call cannot
    def swaps(opt: torch.optim.Optimizer, ps: list[torch.Tensor], s: int) -> None:
        st = [opt.state[p] for p in ps]
        if s == 2:
            st[0]["step"] = torch.tensor(float(st[0]["step"]) + 3.0)
        if s == 3:
            st[1]["step"] = st[1]["step"].to(torch.float64)
        if s == 4 and mode == "single":  # torch's other paths refuse integer counters
            st[2]["step"] = torch.tensor(int(st[2]["step"]))  # int64: torch adds
        if s == 5:
            st[3]["step"] = st[0]["step"]  # one counter for two parameters
        if s == 6:
            st[0]["step"].data = torch.tensor(11.0)  # storage swapped in place

    def run(cls: type) -> tuple[list[torch.Tensor], list[float]]:
        ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (3, 4), (5,),
                                                                   (7,)])]
        opt = cls(ps, lr=0.2, lr_decay=0.0, **MODES[mode])
        for s in range(8):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            opt.step()
            swaps(opt, ps, s)
        return ps, [float(opt.state[p]["step"]) for p in ps]

    out, steps = run(FT.Adagrad)
    ref, ref_steps = run(TORCH_OPT)
    assert_same(out, ref)
    assert steps == ref_steps


COMPILED_STEP = """
import sys, torch, fastadagrad.torch as FT
flags = {"single": {}, "fused": {"fused": True}}[sys.argv[1]]
out = []
for cls, compiled in ((torch.optim.Adagrad, False), (FT.Adagrad, True)):
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(100)) for _ in range(2)]
    opt = cls(ps, lr=0.1, **flags)
    step = torch.compile(opt.step, backend="eager") if compiled else opt.step
    for k in range(3):
        g = torch.Generator().manual_seed(k)
        for p in ps:
            p.grad = torch.randn(100, generator=g)
        step()
    out.append(torch.cat([p.detach().view(torch.int32) for p in ps]))
print("same" if torch.equal(*out) else "differ")
"""


@pytest.mark.parametrize("mode", ["single", "fused"])
def test_torch_compiled_step_runs_eagerly(mode: str) -> None:
    # a fresh process: the first step compiles (or loads) the kernels, where dynamo used
    # to trace into Numba's dispatcher and fail; the step is a graph break and gives
    # eager torch's bits
    r = subprocess.run([sys.executable, "-c", COMPILED_STEP, mode], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "same", r.stdout


TORCH_THREADS = """
import sys
import numpy as np, torch
import fastadagrad, fastadagrad.torch as FT
torch.set_num_threads(1)
n = 1 << 17  # above the parallel threshold
if sys.argv[1] == "adapter":
    ps = [torch.randn(n, requires_grad=True), torch.randn(8, requires_grad=True)]
    opt = FT.Adagrad(ps)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
elif sys.argv[1] == "adagrad_update":
    fastadagrad.adagrad_update(np.ones(n, np.float32), np.ones(n, np.float32),
                               np.zeros(n, np.float32), lr=0.1)
elif sys.argv[1] == "AdaGrad.update":
    fastadagrad.AdaGrad().update({"a": np.ones(n), "b": np.ones(5)},
                                 {"a": np.ones(n), "b": np.ones(5)})
else:
    fastadagrad.adagrad_update_rows(np.ones((4096, 64), np.float32),
                                    np.zeros((4096, 64), np.float32),
                                    np.arange(2048), np.ones((2048, 64), np.float32))
print("torch threads", torch.get_num_threads())
"""


@pytest.mark.parametrize("entry", ["adapter", "adagrad_update", "AdaGrad.update", "rows"])
def test_first_parallel_step_leaves_torchs_thread_count_alone(entry: str) -> None:
    # a fresh process: the first parallel step starts Numba's threading layer, whose omp
    # pool shares torch's OpenMP runtime and used to set its thread count to Numba's
    r = subprocess.run([sys.executable, "-c", TORCH_THREADS, entry], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "torch threads 1", r.stdout


def test_import_fastadagrad_does_not_import_torch() -> None:
    code = "import sys, fastadagrad; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------- plans and stale addresses

def test_swapped_storage_between_steps_is_followed(no_torch_step: None) -> None:
    # p.data replaced (new address, then an address reused with another size) and the
    # state replaced by load_state_dict: the cached plan must not write through the old
    ps = {cls: [p.requires_grad_() for p in _params(torch.float32, [(100,), (40,)])]
          for cls in (TORCH_OPT, FT.Adagrad)}
    opts = {cls: cls(ps[cls], lr=0.1) for cls in ps}
    for step in range(6):
        grads = _grads(ps[TORCH_OPT], step)
        for cls in ps:
            if step == 2:
                ps[cls][0].data = ps[cls][0].data.clone()
            if step == 3:
                sd = copy.deepcopy(opts[cls].state_dict())
                opts[cls].load_state_dict(sd)
            if step == 4:  # a smaller tensor, and the state to match it
                ps[cls][1].data = ps[cls][1].data[:20].clone()
                opts[cls].state[ps[cls][1]]["sum"] = opts[cls].state[ps[cls][1]]["sum"][
                    :20].clone()
            shaped = [g[:p.numel()].reshape(p.shape) for g, p in zip(grads, ps[cls])]
            for p, g in zip(ps[cls], shaped):
                p.grad = g.clone()
            opts[cls].step()
        assert_same(ps[FT.Adagrad], ps[TORCH_OPT], f"step {step}")


def test_transposed_square_param_keeps_address_and_shape() -> None:
    # p.data = p.data.t(): same address, same shape, no longer contiguous
    def run(cls: type) -> list[torch.Tensor]:
        ps = [p.requires_grad_() for p in _params(torch.float32, [(6, 6), (5,)])]
        opt = cls(ps, lr=0.1)
        for step in range(4):
            if step == 2:
                ps[0].data = ps[0].data.t()
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            opt.step()
        return ps

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


def test_plan_is_reused_across_steps(no_torch_step: None, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    builds = []
    real = _tensorplan.TensorPlan.build

    def counting(self: object, *a: object, **k: object) -> None:
        builds.append(1)
        real(self, *a, **k)

    FT.compiled_paths()  # the one-time self-checks build probe plans: run them first
    monkeypatch.setattr(_tensorplan.TensorPlan, "build", counting)
    ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (4, 4)])]
    opt = FT.Adagrad(ps)
    for step in range(5):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        opt.step()
    assert len(builds) == 1



def test_repeated_step_checks_in_one_pass(no_torch_step: None,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """From the third step on, a model whose tensors did not change takes the one-pass
    check of every tensor (``_tensorplan._unchanged``), not the list-by-list one, and
    gives torch's bits."""
    slow = []
    real = _tensorplan._step_calls

    def counting(*a: object, **k: object) -> object:
        slow.append(1)
        return real(*a, **k)

    monkeypatch.setattr(_tensorplan, "_step_calls", counting)
    ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (4, 4), (3,)])]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt, ropt = FT.Adagrad(ps, lr=0.1, weight_decay=0.1), TORCH_OPT(ref, lr=0.1,
                                                                   weight_decay=0.1)
    for step in range(6):
        for p, q, g in zip(ps, ref, _grads(ps, step)):
            p.grad, q.grad = g, g.clone()
        if step == 2:
            slow.clear()
        opt.step()
        ropt.step()
    assert slow == []
    assert_same(ps, ref)


# ------------------------------------------ the repeated step's C++ metadata check

def _set_inference(t: torch.Tensor) -> torch.Tensor:
    """An inference tensor on ``t``'s storage, at its address, of its shape."""
    with torch.inference_mode():
        return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(),
                                                  t.shape, t.stride())


def _mutate_param(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def apply(opt: Any, ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        ps[0].data = f(ps[0].data)
    return apply


def _mutate_state(key: str, f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def apply(opt: Any, ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        st = opt.state[ps[0]]
        st[key] = f(st[key])
    return apply


def _mutate_grad(f: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., None]:
    def apply(opt: Any, ps: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
        grads[0] = f(grads[0])
    return apply


#: changes made after the repeated step's guard was built, each at the tensor's address
#: or with its shape: what the guard must see (or the addresses, read in Python)
GUARD_CHANGES = {
    "param transposed": _mutate_param(lambda t: t.t()),
    "param negative view": _mutate_param(torch._neg_view),
    "param reshaped": _mutate_param(lambda t: t.view(-1)),
    "param inference": _mutate_param(_set_inference),
    "param float64 view": _mutate_param(lambda t: t.view(torch.float64)),
    "param moved": _mutate_param(lambda t: t.clone()),
    "param no grad": _mutate_param(lambda t: t.detach().requires_grad_(False)),
    "sum transposed": _mutate_state("sum", lambda t: t.t()),
    "sum negative view": _mutate_state("sum", torch._neg_view),
    "sum inference": _mutate_state("sum", _set_inference),
    "sum reshaped": _mutate_state("sum", lambda t: t.view(-1)),
    "step negative view": _mutate_state("step", torch._neg_view),
    "step inference": _mutate_state("step", _set_inference),
    "step float64": _mutate_state("step", lambda t: t.double()),
    "grad negative view": _mutate_grad(lambda g: torch._neg_view(g.neg())),
    "grad transposed": _mutate_grad(lambda g: g.t().contiguous().t()),
    "grad sparse": _mutate_grad(lambda g: g.to_sparse()),
    "grad requires grad": _mutate_grad(lambda g: g.clone().requires_grad_()),
    "grad inference": _mutate_grad(_set_inference),
}


def _guard_of(opt: Any) -> Any:
    plan = opt.__dict__.get("_fastadagrad_plans", {}).get(id(opt.param_groups[0]))
    return None if plan is None else plan[1].guard


def _changed_run(cls: type, ps: list[torch.Tensor], mode: str, guards: bool,
                 grads_of: Callable[[list[torch.Tensor], int], list[torch.Tensor]],
                 change: Callable[..., None]) -> tuple:
    """Five steps of ``cls`` on ``ps``, ``change(opt, ps, grads)`` before the fourth
    (for the adapter, once it keeps a guard, where ``guards``): the error type (or
    None) and the params and sums."""
    opt = cls(ps, lr=0.1, **MODES[mode])
    try:
        for step in range(5):
            grads = grads_of(ps, step)
            if step == 3:
                if cls is FT.Adagrad:  # (the test means something: the check ran)
                    assert (_guard_of(opt) is not None) is (
                        guards and _tensorguard._guards_class() is not None)
                change(opt, ps, grads)
            for p, g in zip(ps, grads):
                p.grad = g
            opt.step()
        err = None
    except RuntimeError as e:
        err = type(e)
    sums = [opt.state[p]["sum"] for p in ps if "sum" in opt.state[p]]
    return err, [t.detach().resolve_neg().clone() for t in [*ps, *sums]]


def _assert_torchs_outcome(mine: tuple, torchs: tuple, what: str,
                           refused: bool = False) -> None:
    """The same error type, or none and the same bits; ``refused``: the adapter's
    RuntimeError where torch's fused kernel pairs the wrong elements of tensors whose
    strides differ (test_fused_refuses_what_torchs_fused_kernel_mishandles)."""
    (err, out), (ref_err, ref) = mine, torchs
    if refused:
        assert (err, ref_err) == (RuntimeError, None)
        return
    assert err is ref_err
    if err is None:  # (torch's implementation raises part-way through its writes)
        assert_same(out, ref, what)


@pytest.mark.parametrize("guards", [True, False], ids=["guards", "python"])
@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("change", list(GUARD_CHANGES))
def test_change_after_the_guard_was_built_is_torchs_outcome(
        change: str, mode: str, guards: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parameter, sum, counter or gradient changed in place (at its address, or with
    its shape and dtype) after three steps, when the repeated step checks the tensors'
    metadata with the C++ guard (``guards``) or in Python: the outcome is torch's, the
    same error or the same bits."""
    monkeypatch.setattr(config, "TORCH_GUARDS", guards)
    mine, torchs = (_changed_run(cls, [p.requires_grad_() for p in _params(
        torch.float32, [(6, 6), (5,)])], mode, guards, _grads, GUARD_CHANGES[change])
        for cls in (FT.Adagrad, TORCH_OPT))
    _assert_torchs_outcome(mine, torchs, change,
                           refused=mode == "fused" and "transposed" in change)


def _other_order(t: torch.Tensor) -> torch.Tensor:
    """``t``'s memory at its address, read in the contiguous order: another layout."""
    return t.as_strided(t.shape, torch.empty(t.shape).stride())


def _channels_last_grads(ps: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    return [torch.randn(p.shape).to(memory_format=torch.channels_last) for p in ps]


@pytest.mark.parametrize("guards", [True, False], ids=["guards", "python"])
@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("which", ["param", "sum", "grad"])
def test_dense_layout_changed_after_the_guard_was_built_is_torchs_outcome(
        which: str, mode: str, guards: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """channels_last tensors: after three steps (the guard is kept from the second),
    one of them read at its address in another order. The outcome is torch's (or, with
    fused=True, the adapter's refusal of tensors whose strides differ)."""
    monkeypatch.setattr(config, "TORCH_GUARDS", guards)
    change = {"param": _mutate_param(_other_order),
              "sum": _mutate_state("sum", _other_order),
              "grad": _mutate_grad(_other_order)}[which]

    def run(cls: type) -> tuple:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s).to(memory_format=torch.channels_last))
              for s in ((6, 5, 3, 3), (4, 3, 2, 2))]
        return _changed_run(cls, ps, mode, guards, _channels_last_grads, change)

    _assert_torchs_outcome(run(FT.Adagrad), run(TORCH_OPT), which,
                           refused=mode == "fused")


@pytest.mark.parametrize("context", ["plain", "float64 default", "inference mode",
                                     "autocast"])
def test_torch_guards_pass_their_self_check(context: str) -> None:
    """torch's C++ tensor guards are there and see every change the repeated step
    relies on them for (this torch: where a new torch fails it, the Python checks run
    and this test says which change it missed), whatever the context of the first
    step that runs the self-check (a caller's default dtype, inference mode and
    autocast would otherwise make its tensors alike)."""
    import contextlib

    from torch._C._dynamo.guards import TensorGuards

    if context == "float64 default":
        torch.set_default_dtype(torch.float64)
    ctx = {"inference mode": torch.inference_mode(), "autocast": torch.autocast("cpu")
           }.get(context, contextlib.nullcontext())
    try:
        with ctx:
            assert _tensorguard._self_check(TensorGuards) is None
    finally:
        torch.set_default_dtype(torch.float32)
    assert _tensorguard._guards_class() is TensorGuards


def test_no_torch_guards_environment_variable() -> None:
    """``FASTADAGRAD_NO_TORCH_GUARDS=1`` turns the C++ guards off: the repeated steps
    keep no guard and check every tensor in Python."""
    code = """
import torch, fastadagrad.torch as FT
from fastadagrad import config
assert config.TORCH_GUARDS is False
ps = [torch.nn.Parameter(torch.ones(5)) for _ in range(2)]
opt = FT.Adagrad(ps, lr=0.1)
for _ in range(4):
    for p in ps:
        p.grad = torch.ones(5)
    opt.step()
plan = opt._fastadagrad_plans[id(opt.param_groups[0])][1]
assert plan.key is not None and plan.guard is None
"""
    import os

    env = {**os.environ, "FASTADAGRAD_NO_TORCH_GUARDS": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_guards_that_miss_a_change_are_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A guard class that accepts anything (a torch whose guards changed) fails the
    self-check: a warning names it and the steps check the tensors in Python."""
    class Blind:
        def __init__(self, *tensors: Any, **kw: Any) -> None:
            self.n = len(tensors)

        def check(self, *tensors: Any) -> bool:
            if len(tensors) != self.n:
                raise TypeError("wrong length")
            return True

    why = _tensorguard._self_check(Blind)
    assert why is not None and "did not see" in why
    import torch._C._dynamo.guards as G

    monkeypatch.setattr(G, "TensorGuards", Blind)
    _tensorguard._guards_class.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="TensorGuards.*did not see"):
            assert _tensorguard._guards_class() is None
        ps = [p.requires_grad_() for p in _params(torch.float32, [(6, 6), (5,)])]
        opt = FT.Adagrad(ps, lr=0.1)
        for step in range(4):
            for p, g in zip(ps, _grads(ps, step)):
                p.grad = g
            opt.step()
        assert _guard_of(opt) is None
    finally:
        monkeypatch.undo()
        _tensorguard._guards_class.cache_clear()


@pytest.mark.parametrize("enabled", [True, False])
def test_step_keeps_the_callers_grad_mode(enabled: bool) -> None:
    """The repeated step runs without switching the grad mode, the others with torch's
    (off): either way the caller's mode is back after the step, and the update leaves
    no autograd history on the parameters."""
    ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (4, 4)])]
    opt = FT.Adagrad(ps, lr=0.1)
    for step in range(4):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        with torch.set_grad_enabled(enabled):
            opt.step()
            assert torch.is_grad_enabled() is enabled
        assert all(p.grad_fn is None and p.is_leaf for p in ps)


# ------------------------------------------ dense tensors that are not contiguous

def _conv_net(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)
    ).to(dtype).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("opts", [{}, {"weight_decay": 0.1, "maximize": True},
                                  {"lr_decay": 0.5, "initial_accumulator_value": 0.1}])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", list(MODES))
def test_channels_last_model_compiled_bit_for_bit(mode: str, dtype: torch.dtype, opts: dict,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A convolution net after ``.to(memory_format=torch.channels_last)``: its 4-d
    weights, their gradients (autograd gives them the weights' strides) and sums are
    dense but not contiguous; the kernels take them (torch's implementation is not
    called) and the bits are torch's."""
    nets = [_conv_net(dtype) for _ in range(2)]
    assert not next(nets[0].parameters()).is_contiguous()
    opts = {"lr": 0.1, **MODES[mode], **opts}
    opts_ = [TORCH_OPT(nets[0].parameters(), **opts), FT.Adagrad(nets[1].parameters(), **opts)]
    torch.manual_seed(1)
    for _ in range(4):
        x = torch.randn(2, 3, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last)
        for net, opt in zip(nets, opts_):
            opt.zero_grad()
            (net(x) ** 2).sum().backward()
            if opt is opts_[1]:
                with monkeypatch.context() as m:
                    m.setattr(FT, "_torch_step", _fail)
                    opt.step()
            else:
                opt.step()
    ps = [list(net.parameters()) for net in nets]
    assert_same(ps[1], ps[0], "param")
    assert_same([opts_[1].state[p]["sum"] for p in ps[1]],
                [opts_[0].state[p]["sum"] for p in ps[0]], "sum")
    w = ps[1][0]
    assert opts_[1].state[w]["sum"].stride() == w.stride() != w.contiguous().stride()


def _fail(*a: object, **k: object) -> None:
    raise AssertionError("torch's implementation was called")


def _permuted(shape: tuple[int, ...], perm: tuple[int, ...], seed: int) -> torch.Tensor:
    """A dense tensor of ``shape`` whose dimensions lie in memory in order ``perm``."""
    inv = sorted(range(len(perm)), key=perm.__getitem__)
    return _randn(tuple(shape[d] for d in perm), seed).permute(*inv)


def test_dense_strides() -> None:
    cl = torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    assert _tensorplan.dense_strides(cl) == (60, 1, 15, 3)
    assert _tensorplan.dense_strides(torch.empty(3, 4).t()) == (1, 4)
    assert _tensorplan.dense_strides(torch.empty(5)) == (1,)
    assert _tensorplan.dense_strides(torch.empty(())) == ()
    # size-1 dimensions: their stride moves no element
    a = torch.empty(4, 1, 5).as_strided((4, 1, 5), (1, 99, 4))
    b = torch.empty(4, 1, 5).as_strided((4, 1, 5), (1, 7, 4))
    assert _tensorplan.dense_strides(a) == _tensorplan.dense_strides(b) == (1, 0, 4)
    # gaps, overlaps
    assert _tensorplan.dense_strides(torch.empty(10)[::2]) is None
    assert _tensorplan.dense_strides(torch.empty(6, 4)[:, :3]) is None
    assert _tensorplan.dense_strides(torch.empty(3, 1).expand(3, 4)) is None
    assert _tensorplan.dense_strides(torch.empty(8).as_strided((3, 3), (2, 1))) is None
    assert _tensorplan.dense_strides(torch.empty(8).as_strided((2, 2), (1, 1))) is None


@pytest.mark.parametrize("mode", list(MODES))
def test_permuted_dense_tensors_compiled_bit_for_bit(mode: str, no_torch_step: None
                                                     ) -> None:
    """Any order of the dimensions in memory, size-1 dimensions with strides of their
    own, beside contiguous tensors: compiled when gradient and sum share the
    parameter's order, with torch's bits."""
    shapes = [((4, 5, 6), (2, 0, 1)), ((3, 1, 7), (2, 1, 0)), ((5, 4), (1, 0)),
              ((9,), (0,)), ((2, 3, 4, 5), (0, 2, 3, 1))]
    params = [_permuted(sh, perm, k) for k, (sh, perm) in enumerate(shapes)]
    odd = torch.empty(3, 1, 7).as_strided((3, 1, 7), (1, 1000, 3))  # dim 1: any stride
    params.append(odd.copy_(_randn((3, 1, 7), 9)))
    grads = [[torch.empty_like(p).copy_(g) for p, g in zip(params, _grads(params, s))]
             for s in range(4)]
    grads[2][-1] = torch.empty(21).as_strided((3, 1, 7), (1, 5, 3)).copy_(grads[2][-1])
    assert not any(p.is_contiguous() for p in params[:3])
    kw = {"lr": 0.1, "weight_decay": 0.1, **MODES[mode]}
    ref, ropt = _train(TORCH_OPT, params, 4, kw, grads)
    out, opt = _train(FT.Adagrad, params, 4, kw, grads)
    assert [p.stride() for p in out] == [p.stride() for p in params]
    assert_same(out, ref, "param")
    assert_same([opt.state[p]["sum"] for p in out], [ropt.state[p]["sum"] for p in ref])


@pytest.mark.parametrize("case", ["grad contiguous", "grad other order", "sum contiguous",
                                  "param reordered in place", "grad reordered later"])
@pytest.mark.parametrize("mode", ["single", "foreach"])  # fused: see the next test
def test_dense_tensors_in_different_orders_are_torchs_outcome(case: str, mode: str) -> None:
    """Parameter, gradient and sum dense but with their dimensions in different orders
    in memory: the same element lies at different offsets, so a flat update would mix
    elements; torch's implementation takes them (or the plan is rebuilt), the bits are
    torch's. ``param reordered in place``: a cube's ``.data`` set to another
    permutation of its own storage (same address, same shape)."""
    def make() -> tuple:
        p = _permuted((4, 4, 4), (2, 0, 1), 0).requires_grad_()
        q = _randn((6,), 1).requires_grad_()

        def grad_of(t: torch.Tensor, s: int) -> torch.Tensor:
            g = _randn(tuple(t.shape), 10 + s)
            if t is q or case == "grad contiguous" or (case == "grad reordered later"
                                                       and s == 2):
                return g if t is q or case == "grad contiguous" else \
                    _permuted((4, 4, 4), (1, 2, 0), 10 + s)
            if case == "grad other order":
                return _permuted((4, 4, 4), (1, 2, 0), 10 + s)
            return torch.empty_like(t).copy_(g)

        def setup(opt: Any) -> None:
            if case == "sum contiguous":
                opt.step = _step_after(opt, lambda: opt.state[p].__setitem__(
                    "sum", opt.state[p]["sum"].contiguous()))
            if case == "param reordered in place":
                opt.step = _step_after(opt, lambda: setattr(
                    p, "data", p.data.permute(1, 2, 0)))
        return [p, q], grad_of, setup

    mine, ref = (_outcome(cls, MODES[mode], make) for cls in (FT.Adagrad, TORCH_OPT))
    assert mine[0] is ref[0]
    assert_same(mine[1], ref[1])


def _fused_case(case: str) -> tuple[list[torch.Tensor], Callable[[Any], None]]:
    """Two params and a change that makes torch's fused CPU kernel mishandle the first."""
    buf = torch.zeros(40)
    p = buf[::2] if case == "param with gaps" else _permuted((4, 5), (1, 0), 0)[:, :]
    p = p.requires_grad_() if p.is_leaf else p
    q = _randn((6,), 1).requires_grad_()
    n = p.numel()

    def change(opt: Any) -> None:
        if case == "grad expanded":
            p.grad = torch.tensor([0.5]).expand(p.shape)
        elif case == "grad float64":
            p.grad_dtype = None  # torch refuses the assignment otherwise
            p.grad = torch.ones(p.shape, dtype=torch.float64)
        elif case == "grad other order":
            p.grad = torch.ones(p.shape)  # contiguous; p is transposed
        elif case == "sum smaller":
            opt.state[p]["sum"] = torch.zeros(n - 2).reshape(-1)[: n - 2]
        elif case == "param resized":  # the sum and grad keep the old shape
            p.data = torch.zeros(p.shape[0] + 1, p.shape[1])
    return [p, q], change


@pytest.mark.parametrize("case", ["param with gaps", "grad expanded", "grad float64",
                                  "grad other order", "sum smaller", "param resized"])
def test_fused_refuses_what_torchs_fused_kernel_mishandles(case: str) -> None:
    """``fused=True`` hands what the kernels cannot take to torch's fused CPU kernel,
    which walks every tensor as ``numel`` elements of flat memory: gaps written,
    expanded or smaller tensors read or written past their storage (heap corruption),
    different orders or dtypes paired wrongly. Those raise, naming the tensor, with
    nothing written (torch's other implementations handle or refuse them)."""
    params, change = _fused_case(case)
    opt = FT.Adagrad(params, lr=0.1, fused=True)
    for t in params:
        t.grad = torch.ones_like(t)  # (the parameter's strides)
    if case != "param with gaps":
        opt.step()
    for t in params:
        t.grad = torch.ones_like(t)
    change(opt)
    tensors = [x for t in params for x in (t, t.grad, *opt.state[t].values())
               if isinstance(x, torch.Tensor)]
    before = [x.detach().clone() for x in tensors]
    with pytest.raises(RuntimeError, match=r"params'\]\[0\].*torch's fused CPU kernel"):
        opt.step()
    assert_same([x.detach() for x in tensors], before)


def _step_after(opt: Any, change: Callable[[], None]) -> Callable[..., Any]:
    """``opt.step`` that makes ``change`` once, after its first step."""
    step, done = opt.step, []

    def wrapped(*a: Any, **k: Any) -> Any:
        out = step(*a, **k)
        if not done:
            done.append(change())
        return out

    return wrapped


# --------------------------------------------- tensors the kernels cannot take

def _odd_params() -> list[torch.Tensor]:
    base = _params(torch.float32, [(6, 5)])[0]
    return [base.t(),  # non-contiguous
            _params(torch.bfloat16, [(9,)])[0], _params(torch.float16, [(9,)])[0],
            torch.randn(4, dtype=torch.complex64), _params(torch.float32, [(7,)])[0]]


@pytest.mark.parametrize("mode", ["single", "foreach"])
def test_odd_tensors_take_torchs_path(mode: str) -> None:
    params = _odd_params()
    ref, ropt = _train(TORCH_OPT, params, 4, {**MODES[mode], "weight_decay": 0.1})
    out, opt = _train(FT.Adagrad, params, 4, {**MODES[mode], "weight_decay": 0.1})
    assert_same(out, ref)


def _outcome(cls: type, kw: dict, make: Callable[[], tuple]) -> tuple:
    """Three steps of ``make()``'s (params, grad function, optimizer setup): the final
    bits, or the exception type and the tensors' bits when it was raised."""
    params, grad_of, setup = make()
    opt = cls(params, lr=0.1, **kw)
    if setup is not None:
        setup(opt)
    try:
        for s in range(3):
            for p in params:
                p.grad = grad_of(p, s)
            opt.step()
        raised = None
    except RuntimeError as e:
        raised = type(e)
    tensors = [t for p in params for t in (p, opt.state[p].get("sum"))
               if t is not None]
    return raised, [_bits(t.detach().resolve_neg()).clone() for t in tensors]


def _randn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _neg_grad(p: torch.Tensor, s: int) -> torch.Tensor:
    return torch._neg_view(_randn(p.shape, s))


def _conj_imag_grad(p: torch.Tensor, s: int) -> torch.Tensor:
    z = torch.complex(_randn(p.shape, s), _randn(p.shape, s + 50))
    return z.conj().imag  # the negative bit on, contiguous for one element


def _inference_sum(opt: Any) -> None:
    p = opt.param_groups[0]["params"][0]
    opt.state[p]["step"] = torch.tensor(0.0)
    with torch.inference_mode():
        opt.state[p]["sum"] = torch.zeros_like(p)


def _inference_param() -> torch.Tensor:
    with torch.inference_mode():
        return _randn((40,), 1)


ODD = {  # name: () -> (params, grad of (param, step), setup of the optimizer)
    "zero tensor grad": lambda: ([torch.nn.Parameter(_randn((40,), 1))],
                                 lambda p, s: torch._efficientzerotensor(p.shape), None),
    "negative-bit grad": lambda: ([torch.nn.Parameter(_randn((40,), 1))], _neg_grad,
                                  None),
    "conj().imag grad": lambda: ([torch.nn.Parameter(_randn((1,), 1))], _conj_imag_grad,
                                 None),
    "negative-bit param": lambda: ([torch._neg_view(_randn((40,), 1))],
                                   lambda p, s: _randn(p.shape, s), None),
    "inference param": lambda: ([_inference_param()], lambda p, s: _randn(p.shape, s),
                                None),
    "inference sum": lambda: ([_randn((40,), 1)], lambda p, s: _randn(p.shape, s),
                              _inference_sum),
}


@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("case", list(ODD))
def test_odd_tensors_give_torchs_outcome(case: str, mode: str) -> None:
    # memory that does not hold the values (a lazy negation, a ZeroTensor's null
    # pointer) or that torch will not let anyone write (inference tensors): torch's
    # own implementation, so the same bits or the same error
    ref = _outcome(TORCH_OPT, MODES[mode], ODD[case])
    out = _outcome(FT.Adagrad, MODES[mode], ODD[case])
    assert out[0] is ref[0]
    assert_same(out[1], ref[1], case)


@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("shape", [(6, 4), (24,), (2, 12)])
def test_sum_replaced_by_a_view_of_another_shape_is_torchs_outcome(shape: tuple,
                                                                   mode: str) -> None:
    # the same address and size as the sum the plan was built on: torch's default and
    # foreach steps raise (the shapes do not broadcast), its fused one updates
    def run(cls: type) -> tuple:
        p = torch.nn.Parameter(_randn((4, 6), 1))
        opt = cls([p], lr=0.1, **MODES[mode])
        p.grad = _randn(p.shape, 2)
        opt.step()
        opt.state[p]["sum"] = opt.state[p]["sum"].view(shape)
        p.grad = _randn(p.shape, 3)
        try:
            opt.step()
            raised = None
        except RuntimeError as e:
            raised = type(e)
        return raised, [_bits(p.detach()).clone(), _bits(opt.state[p]["sum"]).clone()]

    ref, out = run(TORCH_OPT), run(FT.Adagrad)
    assert out[0] is ref[0]
    assert_same(out[1], ref[1])


def _step_variant(kind: str, st: list[dict], ps: list[torch.Tensor]) -> None:
    if kind == "python int":
        st[0]["step"] = 5
    elif kind == "2 elements":
        st[0]["step"] = torch.tensor([1.0, 7.0])
    elif kind == "shared":  # torch increments it twice, between the two updates
        st[1]["step"] = st[0]["step"]
    elif kind == "fractional":
        st[0]["step"] = torch.tensor(2.5, dtype=st[0]["step"].dtype)
    elif kind in ("int64", "float64", "float16"):
        st[0]["step"] = torch.tensor(3, dtype=getattr(torch, kind))
    elif kind == "float32 at 2^24 - 1":  # torch's float32 counter stops at 2^24
        for x in st:
            x["step"] = torch.tensor(2.0**24 - 1, dtype=torch.float32)


def _step_outcome(cls: type, kind: str, kw: dict, sparse: bool, dtype: torch.dtype
                  ) -> tuple:
    g = torch.Generator().manual_seed(7)
    ps = [torch.nn.Parameter(torch.randn(30, 4, generator=g, dtype=dtype))
          for _ in range(2)]
    if kind == "param twice":
        ps = [ps[0], ps[0]]  # torch warns about the duplicate
    opt = cls(ps, lr=0.1, **kw)

    def grads() -> None:
        for p in ps:
            if sparse:
                p.grad = _sparse_grad((30, 4), 12, int(torch.randint(0, 99, (1,),
                                                                     generator=g)),
                                      dtype)
            else:
                p.grad = torch.randn(30, 4, generator=g, dtype=dtype)

    grads()
    opt.step()
    _step_variant(kind, [opt.state[p] for p in ps], ps)
    raised = None
    try:
        for _ in range(2):
            grads()
            opt.step()
    except (RuntimeError, TypeError) as e:
        raised = type(e)
    out = [t.detach().clone() for p in ps for t in (p, opt.state[p]["sum"])]
    steps = [torch.as_tensor(opt.state[p]["step"]).double().reshape(-1) for p in ps]
    return raised, out, steps


STEP_KINDS = [("python int", False, torch.float32), ("2 elements", False, torch.float32),
              ("shared", False, torch.float32), ("fractional", False, torch.float32),
              ("int64", False, torch.float32), ("float64", False, torch.float32),
              ("float16", False, torch.float32), ("shared", True, torch.float32),
              ("param twice", True, torch.float32),
              ("float32 at 2^24 - 1", True, torch.float64),
              ("float32 at 2^24 - 1", False, torch.float64)]


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")
@pytest.mark.parametrize("lr_decay", [0.0, 0.1])
@pytest.mark.parametrize("kind, sparse, dtype, mode", [
    (*k, mode) for k in STEP_KINDS for mode in MODES
    if not (k[1] and mode == "fused")])  # (torch's fused step refuses sparse gradients)
def test_step_counters_of_every_kind_give_torchs_outcome(kind: str, sparse: bool,
                                                         dtype: torch.dtype, mode: str,
                                                         lr_decay: float) -> None:
    # counters the compiled paths do not take go to torch's implementation, which reads,
    # converts or refuses each its own way; counters they take are read as torch does
    kw = {**MODES[mode], "lr_decay": lr_decay}
    ref = _step_outcome(TORCH_OPT, kind, kw, sparse, dtype)
    out = _step_outcome(FT.Adagrad, kind, kw, sparse, dtype)
    assert out[0] is ref[0]
    assert_same(out[1], ref[1], kind)
    assert all(torch.equal(a, b) for a, b in zip(out[2], ref[2])), (out[2], ref[2])


@pytest.mark.parametrize("mode", list(MODES), ids=str)
@pytest.mark.parametrize("kw", [{"lr": 1e39}, {"weight_decay": 1e39}, {"maximize": 1},
                                {"lr_decay": 0.1, "eps": 1e39},
                                # (step - 1) * lr_decay beyond double range: clr = 0
                                {"lr_decay": 1e308}], ids=str)
def test_odd_hyperparameters_give_torchs_outcome(kw: dict, mode: str) -> None:
    # a value float32 cannot hold (torch refuses it), an int maximize (torch's fused
    # step refuses it): torch's outcome, whatever it is
    def run(cls: type) -> tuple:
        p = torch.nn.Parameter(_randn((40,), 1))
        opt = cls([p], **MODES[mode])
        opt.param_groups[0].update(kw)  # (torch checks some of them when constructed)
        p.grad = _randn(p.shape, 2)
        try:
            opt.step()
            raised = None
        except (RuntimeError, TypeError) as e:
            raised = type(e)
        return raised, [_bits(p.detach()).clone(), _bits(opt.state[p]["sum"]).clone()]

    ref, out = run(TORCH_OPT), run(FT.Adagrad)
    assert out[0] is ref[0]
    assert_same(out[1], ref[1])


def _alias_case(case: str, first: str, mode: str = "single"
                ) -> tuple[list, Callable[[int], None]]:
    """Parameters on two paths (compiled and torch's, or compiled sparse rows) that
    share memory, and the function setting their gradients at each step."""
    g = torch.Generator().manual_seed(0)
    if case == "overlapping params" and mode == "fused":
        # (a transposed param with a contiguous grad is refused with fused=True: torch's
        # fused kernel would pair the wrong elements) a bfloat16 view: torch's path
        base = torch.randn(8, 8, generator=g)
        pc, pt = torch.nn.Parameter(base), torch.nn.Parameter(base.view(torch.bfloat16))

        def grads(k: int) -> None:
            pc.grad = torch.randn(8, 8, generator=g)
            pt.grad = torch.randn(8, 16, generator=g).to(torch.bfloat16)
    elif case == "overlapping params":
        base = torch.randn(8, 8, generator=g)
        pc, pt = torch.nn.Parameter(base), torch.nn.Parameter(base.t())  # transposed

        def grads(k: int) -> None:
            pc.grad, pt.grad = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    elif case == "compiled grad is a bfloat16 param":
        pc = torch.nn.Parameter(torch.randn(64, generator=g))
        pt = torch.nn.Parameter(torch.randn(128, generator=g).to(torch.bfloat16))

        def grads(k: int) -> None:
            pt.grad = torch.randn(128, generator=g).to(torch.bfloat16)
            pc.grad = pt.data.view(torch.float32)
    elif case == "torch-path grad is a compiled param":
        pc = torch.nn.Parameter(torch.randn(8, 8, generator=g))
        pt = torch.nn.Parameter(torch.randn(8, 8, generator=g).t())

        def grads(k: int) -> None:
            pc.grad, pt.grad = torch.randn(8, 8, generator=g), pc.data.t()
    else:  # a dense gradient that is a parameter updated by the sparse rows' path
        pt = torch.nn.Parameter(torch.randn(10, 4, generator=g))  # (sparse)
        pc = torch.nn.Parameter(torch.randn(10, 4, generator=g))

        def grads(k: int) -> None:
            pt.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 3, 7]]),
                                              torch.randn(4, 4, generator=g), (10, 4))
            pc.grad = pt.data
    return ([pc, pt] if first == "compiled" else [pt, pc]), grads


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("first", ["compiled", "other"])
@pytest.mark.parametrize("case, mode", [
    (c, m) for c in ("overlapping params", "compiled grad is a bfloat16 param",
                     "torch-path grad is a compiled param", "sparse param is a grad")
    for m in MODES if not (c == "sparse param is a grad" and m == "fused")])
def test_paths_sharing_memory_keep_torchs_order(case: str, mode: str, first: str) -> None:
    # the compiled, sparse and torch paths run one after the other; where one writes
    # memory another reads, the group takes torch's implementation, in its order
    def run(cls: type) -> list[torch.Tensor]:
        ps, grads = _alias_case(case, first, mode)
        opt = cls(ps, lr=0.1, **MODES[mode])
        for k in range(2):
            grads(k)
            opt.step()
        return [t.detach().clone() for p in ps for t in (p, opt.state[p]["sum"])]

    assert_same(run(FT.Adagrad), run(TORCH_OPT), case)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("mode", ["single", "foreach"])
def test_disjoint_views_of_one_buffer_stay_compiled(mode: str, no_torch_step: None) -> None:
    # a sparse embedding and dense layers whose parameters are disjoint slices of one
    # flat buffer (the "contiguous parameters" pattern): nothing overlaps, so each path
    # keeps its compiled kernels
    def run(cls: type) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(5)
        flat = torch.randn(50 * 8 + 8 * 4 + 4, generator=g)
        emb = torch.nn.Parameter(flat[:400].view(50, 8))
        w = torch.nn.Parameter(flat[400:432].view(8, 4))
        b = torch.nn.Parameter(flat[432:])
        opt = cls([emb, w, b], lr=0.1, **MODES[mode])
        for k in range(3):
            emb.grad = _sparse_grad((50, 8), 12, k, torch.float32, hot=2)
            w.grad, b.grad = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
            opt.step()
        return [t.detach().clone() for p in (emb, w, b) for t in (p, opt.state[p]["sum"])]

    ref = run(TORCH_OPT)
    assert_same(run(FT.Adagrad), ref)


def _free(t: torch.Tensor, how: str) -> None:
    t.untyped_storage().resize_(0 if how == "freed" else 16)


@pytest.mark.parametrize("mode", ["single", "fused"])
@pytest.mark.parametrize("which, how", [("param", "freed"), ("param", "shrunk"),
                                        ("grad", "freed"), ("grad", "shrunk"),
                                        ("sum", "freed"), ("sum", "shrunk")])
def test_storage_freed_or_shrunk_raises_before_writing(which: str, how: str,
                                                      mode: str) -> None:
    # FSDP frees a parameter's storage with untyped_storage().resize_(0): torch's default
    # step then reads and writes address 0 (a crash), its fused one raises
    ps = [torch.nn.Parameter(_randn((64,), k)) for k in (1, 2)]
    opt = FT.Adagrad(ps, **MODES[mode])
    for p in ps:
        p.grad = _randn(p.shape, 3)
    opt.step()
    for p in ps:
        p.grad = _randn(p.shape, 4)
    victim = {"param": ps[1], "grad": ps[1].grad, "sum": opt.state[ps[1]]["sum"]}[which]
    _free(victim, how)
    # every tensor but the freed one, including the other tensors of its parameter
    others = [t for p in ps for t in (p, p.grad, opt.state[p]["sum"], opt.state[p]["step"])
              if t is not victim]
    kept = [t.detach().clone() for t in others]
    name = {"param": r"\['params'\]\[1\] has", "grad": r"\[1\]\.grad has",
            "sum": r"\[1\]\]\['sum'\] has"}[which]
    with pytest.raises(RuntimeError, match=name + r" 64 elements but its storage holds"):
        opt.step()
    assert_same([t.detach() for t in others], kept)


@pytest.mark.parametrize("mode", list(MODES))
def test_grads_as_views_of_one_buffer_stay_compiled(mode: str, no_torch_step: None,
                                                    monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """Gradients that are views into one flat buffer (DDP's ``gradient_as_bucket_view``,
    flat-gradient trainers): storage offsets and storages larger than the view pass the
    per-step storage check, with torch's bits; from the third step on through the
    one-pass check (views at the offsets and in storages of the sizes accepted at the
    last step). A buffer shrunk in place under them is refused, nothing written."""
    slow = []
    real = _tensorplan._step_calls
    monkeypatch.setattr(_tensorplan, "_step_calls",
                        lambda *a, **k: slow.append(1) or real(*a, **k))
    params = _params(torch.float32, [(5, 7), (17,), (3, 16)])
    runs = []
    for cls in (TORCH_OPT, FT.Adagrad):
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, lr=0.1, **MODES[mode])
        flat = torch.zeros(sum(p.numel() for p in ps) + 5)
        for s in range(5):
            off = 5
            for p, g in zip(ps, _grads(params, s)):
                p.grad = flat[off:off + p.numel()].view(p.shape).copy_(g)
                off += p.numel()
            assert ps[1].grad.storage_offset() > 0
            if s == 2:
                slow.clear()
            opt.step()
        if cls is FT.Adagrad:
            assert slow == []
        runs.append([t.detach() for p in ps for t in (p, opt.state[p]["sum"])])
    assert_same(runs[1], runs[0])
    before = [t.clone() for t in runs[1]]
    flat.untyped_storage().resize_(4 * (flat.numel() - 10))  # the last view: past its end
    with pytest.raises(RuntimeError, match="storage"):
        opt.step()
    assert_same(runs[1], before)


@pytest.mark.parametrize("route", ["grad_scale", "differentiable", "shared step",
                                   "fused grad_scale"])
def test_storage_shrunk_raises_on_every_route_to_torch(route: str) -> None:
    """Groups handed whole to torch's implementation (AMP's grad_scale/found_inf,
    differentiable=True, a step counter shared with lr_decay) check every tensor's
    storage too: torch's step would write past a shrunk one (heap corruption)."""
    kw = {"lr": 0.1, "fused": route == "fused grad_scale",
          "differentiable": route == "differentiable",
          "lr_decay": 0.1 if route == "shared step" else 0.0}
    ps = [_randn((64,), k) if route == "differentiable" else
          torch.nn.Parameter(_randn((64,), k)) for k in (1, 2)]
    opt = FT.Adagrad(ps, **kw)
    for p in ps:
        p.grad = _randn(p.shape, 3)
    opt.step()
    if route == "shared step":
        opt.state[ps[1]]["step"] = opt.state[ps[0]]["step"]
    if "grad_scale" in route:
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(0.0)
    for p in ps:
        p.grad = _randn(p.shape, 4)
    _free(ps[1], "shrunk")
    others = [t for p in ps for t in (p, p.grad, opt.state[p]["sum"], opt.state[p]["step"])
              if t is not ps[1]]
    kept = [t.detach().clone() for t in others]
    with pytest.raises(RuntimeError, match=r"\['params'\]\[1\] has 64 elements but its "
                                           "storage holds"):
        opt.step()
    assert_same([t.detach() for t in others], kept)


#: the scripts' way to shrink a storage in place until it keeps its address (glibc
#: hands a freed block back to the next smaller request that best fits it): first the
#: free blocks of about its size are taken, so that the victim's old block is the one
#: left; where the allocator still never gives it back, the script says SKIP
KEEP_ADDRESS = """
def shrink_at_address(victim, st, nbytes):
    address = victim.data_ptr()
    soak = [torch.empty(nbytes // 4) for _ in range(64)]
    for k in range(4000):
        st.resize_(nbytes - 64 * (k % 500 + 1))
        if victim.data_ptr() == address:
            return soak
        if k % 500 == 499:  # (another free-list state for the next round)
            soak.append(torch.empty(nbytes // 4))
    print("SKIP the allocator never kept the address")
    sys.exit(0)
"""


def _skip_if_allocator_refused(stdout: str) -> None:
    if "SKIP the allocator never kept the address" in stdout:
        pytest.skip("the allocator never gave the shrunk storage its address back")


SHRUNK_IN_PLACE = """
import sys
import torch
import fastadagrad.torch as FT
""" + KEEP_ADDRESS + """which, mode = sys.argv[1], sys.argv[2]
n = 1 << 14  # 64 KiB: below glibc's mmap threshold, where a shrink can stay in place
p = torch.nn.Parameter(torch.zeros(n))
opt = FT.Adagrad([p], lr=0.1, **({"fused": True} if mode == "fused" else {}))
p.grad = torch.ones(n)
opt.step()  # the plan holds the addresses
p.grad = torch.ones(n)
victim = p if which == "param" else (p.grad if which == "grad" else opt.state[p]["sum"])
kept = shrink_at_address(victim, victim.untyped_storage(), 4 * n)
others = [t.detach().clone() for t in (p, p.grad, opt.state[p]["sum"]) if t is not victim]
try:
    opt.step()
except RuntimeError as e:
    print("raised", e)
after = [t.detach() for t in (p, p.grad, opt.state[p]["sum"]) if t is not victim]
print("unchanged", all(torch.equal(a, b) for a, b in zip(others, after)))
"""


@pytest.mark.parametrize("mode", ["single", "fused"])
@pytest.mark.parametrize("which", ["param", "grad", "sum"])
def test_storage_shrunk_in_place_at_its_address_raises(which: str, mode: str) -> None:
    """A storage shrunk in place that keeps its address (glibc's allocator does that
    after a few shrinks), after a step cached the tensors' addresses: the next step
    raises instead of writing (or reading) past the storage. A fresh process: a
    regression corrupts the heap."""
    r = subprocess.run([sys.executable, "-c", SHRUNK_IN_PLACE, which, mode],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _skip_if_allocator_refused(r.stdout)
    out = r.stdout.strip().splitlines()
    assert out[-2].startswith("raised ") and "but its storage holds" in out[-2], r.stdout
    assert out[-1] == "unchanged True", r.stdout


COUNTER_SHORT = """
import sys
import torch
import fastadagrad.torch as FT
""" + KEEP_ADDRESS + """how, mode = sys.argv[1], sys.argv[2]
flags = {"single": {}, "foreach": {"foreach": True}, "decay": {"lr_decay": 0.5}}[mode]
ps = [torch.nn.Parameter(torch.zeros(64)) for _ in range(2)]
opt = FT.Adagrad(ps, lr=0.1, **flags)
for p in ps:
    p.grad = torch.ones(64)
opt.step()
n = 1 << 14 if how == "inplace" else 1 << 24
if how != "freed":  # a counter at the end of a buffer (a view), which then shrinks
    buf = torch.zeros(n)
    buf[-1] = float(opt.state[ps[1]]["step"])
    opt.state[ps[1]]["step"] = buf[-1]
for p in ps:
    p.grad = torch.ones(64)
opt.step()  # the plan holds the counters' addresses
for p in ps:
    p.grad = torch.ones(64)
victim = opt.state[ps[1]]["step"]
st = victim.untyped_storage()
if how == "freed":
    st.resize_(0)
elif how == "moved":  # the storage moves: the counter's address changes
    st.resize_(8)
else:  # shrink until the allocator keeps the address
    kept = shrink_at_address(victim, st, 4 * n)
before = [t.detach().clone() for p in ps for t in (p, opt.state[p]["sum"])]
try:
    opt.step()
except RuntimeError as e:
    print("raised", e)
after = [t.detach() for p in ps for t in (p, opt.state[p]["sum"])]
print("unchanged", all(torch.equal(a, b) for a, b in zip(before, after)),
      float(opt.state[ps[0]]["step"]))
"""


@pytest.mark.parametrize("mode", ["single", "foreach", "decay"])
@pytest.mark.parametrize("how", ["freed", "moved", "inplace"])
def test_step_counter_outside_its_storage_raises(how: str, mode: str) -> None:
    """A step counter whose storage was freed or shrunk (a view at the end of a buffer
    that shrinks, at its address or not) after a cached step: the next step raises,
    naming the counter, and writes nothing; the compiled increment wrote 4 bytes past
    the storage (a crash) and torch's step does the same. A fresh process: a
    regression corrupts the heap."""
    r = subprocess.run([sys.executable, "-c", COUNTER_SHORT, how, mode],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    _skip_if_allocator_refused(r.stdout)
    out = r.stdout.strip().splitlines()
    assert out[-2].startswith("raised state[param_groups[0]['params'][1]]['step'] has 1 "
                              "elements but its storage holds "), r.stdout
    assert out[-1] == "unchanged True 2.0", r.stdout


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"fused": True},
                                   {"lr_decay": 0.1}], ids=str)
@pytest.mark.parametrize("which", ["sum", "step", "step-neg"])
def test_state_swapped_at_its_address_after_a_cached_step(which: str, flags: dict
                                                          ) -> None:
    """A sum or counter replaced, after a cached step, by a tensor at the same address
    that torch treats otherwise: an inference tensor on the same storage (torch refuses
    to update it outside inference mode) or a counter's negative view (torch counts
    -memory). The outcome is torch's: its error, or its bits."""
    def run(cls: type) -> tuple:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(10)) for _ in range(2)]
        opt = cls(ps, lr=0.1, **flags)
        for p in ps:
            p.grad = torch.randn(10)
        opt.step()
        st = opt.state[ps[1]]
        t = st[which[:4]]
        if which == "step-neg":
            st["step"] = torch._neg_view(t)
        else:
            with torch.inference_mode():
                st[which] = torch.empty(0, dtype=t.dtype).set_(
                    t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
        assert st[which[:4]].data_ptr() == t.data_ptr()
        for p in ps:
            p.grad = torch.randn(10)
        try:
            opt.step()
            err = None
        except RuntimeError as e:
            err = str(e)
        return err, [float(opt.state[p]["step"]) for p in ps], [p.detach() for p in ps]

    (err, steps, out), (ref_err, ref_steps, ref) = run(FT.Adagrad), run(TORCH_OPT)
    assert err == ref_err
    if err is None:
        assert steps == ref_steps
        assert_same(out, ref)


def test_noncontiguous_grad_and_overlapping_params() -> None:
    base = torch.zeros(50)
    for mode in MODES.values():
        def run(cls: type, mode: dict = mode) -> torch.Tensor:
            buf = base.clone()
            a, b = buf[0:30], buf[20:50]  # two params sharing 10 elements
            opt = cls([a, b], lr=0.1, **mode)
            for s in range(3):
                a.grad = torch.arange(60, dtype=torch.float32)[::2] + s  # strided grad
                b.grad = torch.ones(30)
                opt.step()
            return buf

        assert_same([run(FT.Adagrad)], [run(TORCH_OPT)])


def test_fused_rejects_complex_before_writing() -> None:
    p = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    q0 = q.detach().clone()
    for cls in (TORCH_OPT, FT.Adagrad):
        with pytest.raises(RuntimeError):
            opt = cls([q, p], fused=True)
            q.grad, p.grad = torch.ones(3), torch.ones(3, dtype=torch.complex64)
            opt.step()
    assert torch.equal(q.detach(), q0)


def test_differentiable_is_torchs() -> None:
    def run(cls: type) -> list[torch.Tensor]:
        ps = _params(torch.float32, [(5,), (2, 3)])  # not leaves that require grad
        opt = cls(ps, differentiable=True, weight_decay=0.1)
        for s in range(3):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            opt.step()
        return ps

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


def _versions(opt: object, params: list[torch.Tensor]) -> list[int]:
    return [t._version for p in params
            for t in (p, opt.state[p]["sum"], opt.state[p]["step"])]  # type: ignore


@pytest.mark.parametrize("lr_decay", [0.0, 0.1])  # one learning rate; one per step
@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_in_place_writes_increment_autograd_versions(mode: str, lr_decay: float,
                                                     no_torch_step: None) -> None:
    # the kernels write through data_ptr(), which autograd does not see: without the
    # increments a backward through a graph that saved a parameter before the step
    # would silently use the updated values
    ps = [p.requires_grad_() for p in _params(torch.float32, [(5, 7), (40,)])]
    opt = FT.Adagrad(ps, lr_decay=lr_decay, **MODES[mode])
    before = [0] * (3 * len(ps))
    for s in range(3):  # the first step builds the plan, the next ones reuse it
        for p, g in zip(ps, _grads(ps, s)):
            p.grad = g
        opt.step()
        after = _versions(opt, ps)
        assert all(a > b for a, b in zip(after, before)), (s, before, after)
        before = after


@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_backward_through_a_parameter_the_step_changed_raises(mode: str,
                                                              no_torch_step: None) -> None:
    w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.ones(4, requires_grad=True)
    loss = (w @ x).square().sum()  # matmul saves w for x's gradient
    loss.backward(retain_graph=True)
    FT.Adagrad([w], **MODES[mode]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torchs_default_step_raises_there_too() -> None:
    # the behaviour the test above reproduces (torch's fused CPU kernel leaves the
    # versions as they were; the adapter increments them with every flag set)
    w = torch.nn.Parameter(torch.randn(4, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.ones(4, requires_grad=True)
    loss = (w @ x).square().sum()
    loss.backward(retain_graph=True)
    TORCH_OPT([w]).step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ------------------------------------------------------------------ sparse grads

# torch's own sparse step warns about its sparse invariant checks
SPARSE_WARNING = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


@SPARSE_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_embedding_matches_torch(dtype: torch.dtype) -> None:
    def run(cls: type, **kw: object) -> list[torch.Tensor]:
        torch.manual_seed(0)
        emb = torch.nn.Embedding(50, 8, sparse=True).to(dtype)
        lin = torch.nn.Linear(8, 1).to(dtype)
        opt = cls(list(emb.parameters()) + list(lin.parameters()), lr=0.1, **kw)
        g = torch.Generator().manual_seed(3)
        for _ in range(5):
            idx = torch.randint(0, 50, (40,), generator=g)  # repeats: summed by coalesce
            opt.zero_grad()
            lin(emb(idx)).pow(2).sum().backward()
            opt.step()
        return [emb.weight, lin.weight, lin.bias]

    for kw in ({}, {"lr_decay": 0.1, "maximize": True, "initial_accumulator_value": 0.1},
               {"foreach": True}):
        assert_same(run(FT.Adagrad, **kw), run(TORCH_OPT, **kw))


def _sparse_grad(shape: tuple[int, ...], k: int, seed: int, dtype: torch.dtype,
                 hot: int = 0) -> torch.Tensor:
    """``k`` lookups of ``shape[0]`` rows, magnitudes 1e-6..1e6; ``hot`` more lookups
    of row 0 (many repeats of one index: summed in torch's coalesce order)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([torch.randint(0, shape[0], (k,), generator=g),
                     torch.zeros(hot, dtype=torch.int64)])
    idx = idx[torch.randperm(idx.numel(), generator=g)]
    scale = torch.tensor([1e-6, 1.0, 1e6], dtype=torch.float64)
    vshape = (idx.numel(), *shape[1:])
    vals = (torch.randn(vshape, dtype=dtype, generator=g)
            * scale[torch.randint(0, 3, vshape, generator=g)].to(dtype))
    return torch.sparse_coo_tensor(idx[None], vals, shape, check_invariants=False)


SPARSE_OPTIONS = [{}, {"lr_decay": 0.3}, {"maximize": True},
                  {"initial_accumulator_value": 0.25}, {"eps": 1e-3},
                  {"lr": 0.7, "lr_decay": 0.1, "maximize": True,
                   "initial_accumulator_value": 0.1, "eps": 1e-4}, {"foreach": True}]
SPARSE_SHAPES = [(50, 8), (30, 1), (40,), (7, 600), (20, 3, 5)]


def _compare_sparse(shapes: list[tuple[int, ...]], dtype: torch.dtype, kw: dict,
                    steps: int = 4, k: int = 60, hot: int = 0) -> None:
    params = _params(dtype, shapes)

    def run(cls: type) -> tuple[list[torch.Tensor], object]:
        ps = [p.clone().requires_grad_() for p in params]
        opt = cls(ps, **kw)
        for s in range(steps):
            for i, p in enumerate(ps):
                p.grad = _sparse_grad(p.shape, k, 10 * s + i, dtype, hot)
            opt.step()
        return ps, opt

    out, opt = run(FT.Adagrad)
    ref, ropt = run(TORCH_OPT)
    assert_same(out, ref, "param")
    assert_same([opt.state[p]["sum"] for p in out], [ropt.state[p]["sum"] for p in ref],
                "sum")
    assert [float(opt.state[p]["step"]) for p in out] == \
        [float(ropt.state[p]["step"]) for p in ref]


@SPARSE_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opts", SPARSE_OPTIONS, ids=str)
def test_sparse_grads_compiled_bit_for_bit(dtype: torch.dtype, opts: dict,
                                           no_torch_step: None) -> None:
    _compare_sparse(SPARSE_SHAPES, dtype, opts)


@SPARSE_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_duplicates_summed_in_torchs_order(dtype: torch.dtype,
                                                  no_torch_step: None) -> None:
    # 500 repeats of row 0, magnitudes 1e-6..1e6: the sum depends on the order, and
    # torch's coalesce order is not the order of appearance (checked here, so that the
    # comparison below is a real one)
    grad = _sparse_grad((10, 4), 20, 0, dtype, hot=500)
    idx, vals = grad._indices()[0], grad._values()
    left_to_right = vals[idx == 0][0].clone()
    for v in vals[idx == 0][1:]:
        left_to_right = left_to_right + v
    coalesced = grad.coalesce()
    assert not torch.equal(coalesced._values()[0], left_to_right)
    _compare_sparse([(10, 4), (25, 16)], dtype, {"lr": 0.5}, steps=3, k=20, hot=500)


@SPARSE_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_large_parallel(dtype: torch.dtype, no_torch_step: None) -> None:
    # nnz * D above the parallel threshold: the rows split across threads
    _compare_sparse([(3000, 64)], dtype, {"lr_decay": 0.05, "maximize": True}, steps=3,
                    k=2500, hot=300)


@SPARSE_WARNING
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_rows_use_the_emulated_square_root(dtype: torch.dtype, no_torch_step: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # the row kernels of the emulation the CPU's MKL needs, told to emulate, serial and
    # parallel, with accumulators outside the emulated range (zeros: rows whose values
    # are 0; tiny sums), bit for bit against torch
    name = _emulation_used()
    if name is None:
        pytest.skip(NO_EMULATION)
    calls = _counting(monkeypatch, _tensorplan.SPARSE_KERNELS, name,
                      lambda a: a[-1])  # (its emulate argument)
    _compare_sparse([(3000, 64), (40, 7)], dtype, {"lr_decay": 0.05}, steps=3, k=2500,
                    hot=300)
    assert calls and all(calls)  # every call emulates
    tiny = 1e-30 if dtype == torch.float32 else 1e-300
    params = _params(dtype, [(50, 8)])
    for cls in (TORCH_OPT, FT.Adagrad):
        p = params[0].clone().requires_grad_()
        opt = cls([p], initial_accumulator_value=tiny)
        g = _sparse_grad((50, 8), 30, 0, dtype, 3)
        g = torch.sparse_coo_tensor(g._indices(), g._values() * (g._values() > 0), g.shape)
        p.grad = g
        opt.step()
        if cls is TORCH_OPT:
            ref = (p.detach().clone(), opt.state[p]["sum"].clone())
        else:
            assert_same([p, opt.state[p]["sum"]], list(ref), "tiny")


@pytest.mark.parametrize("mode", ["single", "foreach"])
def test_sparse_and_dense_steps_increment_autograd_versions(mode: str,
                                                            no_torch_step: None) -> None:
    emb = torch.nn.Parameter(_params(torch.float32, [(30, 4)])[0])
    dense = torch.nn.Parameter(_params(torch.float32, [(6,)], seed=2)[0])
    opt = FT.Adagrad([emb, dense], **MODES[mode])
    before = [0] * 6
    for s in range(2):
        emb.grad = _sparse_grad((30, 4), 10, s, torch.float32, hot=3)
        dense.grad = _grads([dense], s)[0]
        opt.step()
        after = _versions(opt, [emb, dense])
        assert all(a > b for a, b in zip(after, before)), (s, before, after)
        before = after


@SPARSE_WARNING
def test_sparse_grads_torch_takes_what_the_kernel_cannot(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    calls = []
    real = FT._torch_step

    def counting(params: list, *a: object, **k: object) -> None:
        calls.append(len(params))
        real(params, *a, **k)

    monkeypatch.setattr(FT, "_torch_step", counting)
    # a tensor lr
    _compare_sparse([(20, 4)], torch.float32, {"lr": torch.tensor(0.1)}, steps=2)
    assert calls == [1, 1]
    calls.clear()
    # indices flagged as coalesced but repeated (torch trusts the flag; the kernel
    # does not) and a gradient with two sparse dimensions

    def odd(cls: type) -> list[torch.Tensor]:
        p = _params(torch.float32, [(6, 3), (5, 4)])
        ps = [x.clone().requires_grad_() for x in p]
        opt = cls(ps)
        ps[0].grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 4]]), torch.ones(3, 3),
                                             (6, 3), is_coalesced=True)
        ps[1].grad = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 3]]),
                                             torch.tensor([1.0, 2.0]), (5, 4))
        opt.step()
        return ps

    assert_same(odd(FT.Adagrad), odd(TORCH_OPT))
    assert calls == [2]
    calls.clear()
    # a failed self-check: torch's implementation
    monkeypatch.setitem(FT._CHECKED, ("sparse", torch.float64), False)
    _compare_sparse([(20, 4)], torch.float64, {}, steps=2)
    assert calls == [1, 1]


def test_sparse_with_weight_decay_raises_before_writing() -> None:
    emb = torch.nn.Embedding(10, 3, sparse=True)
    lin = torch.nn.Linear(3, 1)
    opt = FT.Adagrad(list(lin.parameters()) + list(emb.parameters()), weight_decay=0.1)
    lin(emb(torch.tensor([1, 2, 2]))).sum().backward()
    before = [p.detach().clone() for p in (lin.weight, lin.bias, emb.weight)]
    with pytest.raises(RuntimeError, match="weight_decay"):
        opt.step()
    assert_same([lin.weight, lin.bias, emb.weight], before)
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    ropt = TORCH_OPT(list(emb.parameters()), weight_decay=0.1)
    with pytest.raises(RuntimeError):
        ropt.step()


@pytest.mark.parametrize("how", ["pop", "reassign", "replaced"])
def test_removed_param_group_is_not_kept_alive(how: str) -> None:
    """A param group removed from ``param_groups`` (and its state deleted): its
    parameters are freed as with torch's optimizer (the plan cache held the group)."""
    import gc
    import weakref

    keep, head = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(1000))
    opt = FT.Adagrad([{"params": [keep]}, {"params": [head]}], lr=0.1)
    keep.grad, head.grad = torch.ones_like(keep), torch.ones_like(head)
    opt.step()
    if how == "pop":
        opt.param_groups.pop(1)
    elif how == "reassign":
        opt.param_groups = opt.param_groups[:1]
    else:  # another group in its place, without gradients yet: as many groups as plans
        opt.param_groups.pop(1)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    del opt.state[head]
    ref = weakref.ref(head)
    del head
    keep.grad = torch.ones_like(keep)
    opt.step()
    gc.collect()
    assert ref() is None


@SPARSE_WARNING
@pytest.mark.parametrize("part", ["indices", "values"])
def test_sparse_grad_with_a_freed_part_raises_naming_it(part: str) -> None:
    """A sparse gradient whose indices or values storage was freed: RuntimeError naming
    the gradient (as torch's own step raises a RuntimeError), nothing written; NumPy's
    'data is NULL' ValueError came out before."""
    emb = torch.nn.Embedding(50, 4, sparse=True)
    opt = FT.Adagrad(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2, 3])).sum().backward()
    opt.step()
    opt.zero_grad()
    emb(torch.tensor([4, 5, 4])).sum().backward()
    g = emb.weight.grad
    (g._values() if part == "values" else g._indices()).untyped_storage().resize_(0)
    before = [emb.weight.detach().clone(), opt.state[emb.weight]["sum"].clone()]
    with pytest.raises(RuntimeError, match=re.escape(
            f"the {part} tensor of param_groups[0]['params'][0].grad has ")):
        opt.step()
    assert_same([emb.weight, opt.state[emb.weight]["sum"]], before)
    assert float(opt.state[emb.weight]["step"]) == 1


@SPARSE_WARNING
@pytest.mark.parametrize("flags", [{"fused": True}, {}, {"foreach": True}], ids=str)
def test_sparse_with_weight_decay_is_torchs_message(flags: dict) -> None:
    """Sparse gradients with weight decay: torch's message, and with ``fused=True`` its
    fused refusal, which torch raises first."""
    def message(cls: type) -> str:
        emb = torch.nn.Embedding(10, 3, sparse=True)
        opt = cls(emb.parameters(), lr=0.1, weight_decay=0.1, **flags)
        emb(torch.tensor([1, 2])).sum().backward()
        with pytest.raises(RuntimeError) as e:
            opt.step()
        return str(e.value)

    assert message(FT.Adagrad) == message(TORCH_OPT)


@pytest.mark.parametrize("where", ["in the other sum", "in the other param"])
@pytest.mark.parametrize("lr_decay", [0.0, 0.1])
@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_step_counter_inside_another_tensor_is_torchs_outcome(mode: str, lr_decay: float,
                                                              where: str) -> None:
    """A loaded state whose second step counter is an element of the first parameter's
    sum (or of the first parameter): torch's single-tensor step increments it just
    before the second update, after the first one changed it; the compiled path
    incremented every counter first. Such a step is torch's."""
    import copy

    def run(cls: type) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.randn(12).requires_grad_() for _ in range(2)]
        opt = cls(ps, lr=0.1, lr_decay=lr_decay, **MODES[mode])
        sums = [torch.rand(12) + 1 for _ in ps]
        inner = sums[0] if where == "in the other sum" else ps[0].detach()
        steps = [torch.tensor(1.0), inner[3]]
        group = {k: copy.deepcopy(v) for k, v in opt.param_groups[0].items() if k != "params"}
        opt.load_state_dict({"state": {i: {"sum": sums[i], "step": steps[i]} for i in (0, 1)},
                             "param_groups": [{**group, "params": [0, 1]}]})
        for s in range(3):
            g = torch.Generator().manual_seed(s)
            for p in ps:
                p.grad = torch.randn(12, generator=g)
            opt.step()
        return [*ps, *(opt.state[p]["sum"] for p in ps)]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@SPARSE_WARNING
@pytest.mark.parametrize("how", ["same", "view", "listed-twice"])
@pytest.mark.parametrize("sparse", [False, True])
def test_step_counter_shared_across_groups_with_lr_decay(sparse: bool, how: str) -> None:
    """One counter in two param groups (``opt.state[p2]["step"] = opt.state[p1]
    ["step"]``, or a view of it, or ``p1`` also listed in the second group by editing
    ``param_groups``): torch increments it in the first group and reads it again for
    the second's learning rate; the second group is torch's step then."""
    def run(cls: type) -> list[torch.Tensor]:
        p1, p2 = torch.nn.Parameter(torch.ones(4, 2)), torch.nn.Parameter(torch.ones(4, 2))
        opt = cls([{"params": [p1]}, {"params": [p2]}], lr=0.5, lr_decay=0.7)
        if how == "listed-twice":
            opt.param_groups[1]["params"].append(p1)

        def grads() -> None:
            for p in (p1, p2):
                p.grad = (torch.sparse_coo_tensor(torch.tensor([[1, 3]]),
                                                  torch.full((2, 2), 0.5), (4, 2))
                          if sparse else torch.full((4, 2), 0.5))

        grads()
        opt.step()
        if how != "listed-twice":
            step = opt.state[p1]["step"]
            opt.state[p2]["step"] = step if how == "same" else step.view(())
        for _ in range(2):
            grads()
            opt.step()
        return [p1, p2, opt.state[p1]["step"]]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@pytest.mark.parametrize("n", [2, 20])  # (the bisect and the NumPy search)
@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"lr_decay": 0.1}], ids=str)
def test_gradient_holding_a_later_step_counter(flags: dict, n: int) -> None:
    """A gradient that is a view holding a later parameter's step counter: torch's
    single-tensor step reads it before that counter's increment (the compiled path
    would count every step first): torch's bits."""
    def run(cls: type) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(n)]
        opt = cls(ps, lr=0.1, **flags)
        buf = torch.randn(9)
        for p in ps:
            p.grad = torch.randn(8)
        ps[0].grad = buf[:8]
        opt.step()
        opt.state[ps[-1]]["step"] = buf[7]  # the last counter inside the first gradient
        for _ in range(3):
            opt.step()
        return [*ps, opt.state[ps[0]]["sum"], buf]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@SPARSE_WARNING
@pytest.mark.parametrize("groups", [1, 2])
def test_sparse_values_in_a_tensor_updated_before_are_read_after_it(groups: int) -> None:
    """An uncoalesced sparse gradient whose values are a view of a parameter updated
    earlier in the step (same group or an earlier one): torch coalesces it when it
    reaches its parameter, after that update; so does the compiled path (it coalesced
    every gradient while validating, before anything was written)."""
    def run(cls: type) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        p1 = torch.nn.Parameter(torch.randn(10, 3, generator=g))
        p2 = torch.nn.Parameter(torch.randn(10, 3, generator=g))
        opt = cls([p1, p2] if groups == 1 else [{"params": [p1]}, {"params": [p2]}],
                  lr=0.5)
        p1.grad = torch.sparse_coo_tensor(torch.tensor([[0, 2, 5]]),
                                          torch.randn(3, 3, generator=g), (10, 3))
        p2.grad = torch.sparse_coo_tensor(torch.tensor([[1, 1, 4]]), p1.data[:3], (10, 3))
        opt.step()
        return [p1, p2, opt.state[p2]["sum"]]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


def _result_or_error(run: Callable[[], list[torch.Tensor]]) -> Any:
    """The tensors a run leaves, or the type of the error it raised."""
    try:
        return run()
    except Exception as e:  # noqa: BLE001 (the same error type is the expected outcome)
        return type(e)


def _same_outcome(a: Any, b: Any) -> None:
    if isinstance(a, type) or isinstance(b, type):
        assert a is b, (a, b)
    else:
        assert_same(a, b)


@pytest.mark.parametrize("change,kw", [
    ({"weight_decay": np.float32(0.1)}, {"weight_decay": 0.1}),
    ({"weight_decay": torch.tensor(0.1)}, {"weight_decay": 0.1}),
    ({"lr_decay": torch.tensor(0.0)}, {}),
    ({"maximize": 1}, {"maximize": True, "fused": True}),
], ids=["wd f32", "wd tensor", "lr_decay tensor", "maximize int"])
def test_hyperparameter_of_another_type_that_compares_equal(change: dict, kw: dict
                                                            ) -> None:
    """A hyperparameter replaced between steps by an equal value of another type
    (0.1 == np.float32(0.1) == tensor(0.1), True == 1): torch's steps take each
    differently, so the last step's coefficients are not reused."""
    def run(cls: type) -> Callable[[], list[torch.Tensor]]:
        def go() -> list[torch.Tensor]:
            p = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
            opt = cls([p], lr=0.1, **kw)
            for k in range(2):
                if k == 1:
                    opt.param_groups[0].update(change)
                p.grad = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)
                opt.step()
            return [p]
        return go

    _same_outcome(_result_or_error(run(FT.Adagrad)), _result_or_error(run(TORCH_OPT)))


@pytest.mark.parametrize("hyper", [
    {"weight_decay": Fraction(1, 3)}, {"eps": Fraction(1, 3), "foreach": True},
    {"weight_decay": 10**40}, {"eps": None}, {"lr": 3.4028235e38},
    {"weight_decay": 3.4028235e38}, {"weight_decay": 3.4028235e38, "foreach": True},
    {"lr": np.float32(0.1)}, {"lr_decay": float("inf"), "foreach": True},
], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unusual_hyperparameters_are_torchs_outcome(hyper: dict, dtype: torch.dtype
                                                    ) -> None:
    """Types torch's step refuses (a Fraction, None, an int beyond int64), float32
    values above its largest finite one (torch refuses them; only those that round to
    inf were), a NumPy float32 lr (no overflow warning: warnings are errors here), and
    foreach's -lr / d whose NaN keeps its sign: torch's error or bits."""
    def run(cls: type) -> Callable[[], list[torch.Tensor]]:
        def go() -> list[torch.Tensor]:
            p = torch.tensor([1.0, -2.0, 3.0], dtype=dtype, requires_grad=True)
            opt = cls([p])
            opt.param_groups[0].update(hyper)  # (some pass no constructor check)
            p.grad = torch.tensor([0.5, 0.25, -1.0], dtype=dtype)
            opt.step()
            return [p]
        return go

    _same_outcome(_result_or_error(run(FT.Adagrad)), _result_or_error(run(TORCH_OPT)))


def test_negative_bit_swapped_in_at_the_same_address() -> None:
    """``p.data = z.conj().imag`` keeps the address, shape and dtype but sets the
    negative bit (the memory holds -values): torch's step then, not the cached plan."""
    def run(cls: type) -> list[torch.Tensor]:
        z = torch.complex(torch.zeros(1), torch.tensor([2.0]))
        p = torch.nn.Parameter(z.imag)
        opt = cls([p], lr=0.1)
        p.grad = torch.ones_like(p)
        opt.step()
        p.data = z.conj().imag
        assert p.is_neg()
        p.grad = torch.ones_like(p)
        opt.step()
        return [p.detach().resolve_neg()]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@pytest.mark.parametrize("same_group", [False, True])
@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_learnable_lr_updated_in_the_same_step(mode: str, same_group: bool) -> None:
    """A tensor lr that is a parameter of the same optimizer: torch reads it after
    the updates before it (and for each parameter, in its single-tensor step)."""
    def run(cls: type) -> list[torch.Tensor]:
        lr = torch.tensor(0.5, requires_grad=True)
        w = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        groups = ([{"params": [lr, w]}] if same_group else
                  [{"params": [lr], "lr": 0.1}, {"params": [w]}])
        opt = cls(groups, lr=lr, **MODES[mode])
        lr.grad, w.grad = torch.tensor(1.0), torch.tensor([0.5, 0.25, -1.0])
        opt.step()
        return [lr, w]

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


BAD_SPARSE_INDEX = r"""
import sys
import torch
import fastadagrad.torch as FT
mode, which = sys.argv[1], int(sys.argv[2])
dense = torch.nn.Parameter(torch.ones(3))
emb = torch.nn.Parameter(torch.ones(4, 3))
dense.grad = torch.ones(3)
# torch builds it unchecked (check_invariants is off by default)
emb.grad = torch.sparse_coo_tensor([[1, which]], torch.ones(2, 3), (4, 3))
kw = {"single": {}, "foreach": {"foreach": True}, "torch-path": {"lr": torch.tensor(0.1)}}[mode]
opt = FT.Adagrad([dense, emb], **kw)
try:
    opt.step()
    print("stepped")
except IndexError as e:
    print("raised", e)
print("unchanged", bool((dense == 1).all() and (emb == 1).all())
      and all(float(s["step"]) == 0 for s in opt.state.values()))
"""


@pytest.mark.parametrize("which", [-1, 9])
@pytest.mark.parametrize("mode", ["single", "foreach", "torch-path"])
def test_sparse_grad_with_an_index_outside_raises_before_writing(mode: str, which: int
                                                                 ) -> None:
    """A hand-built sparse gradient with a row outside the parameter: IndexError naming
    it, nothing written (torch's coalesce() writes out of bounds for a negative index,
    and torch's step raised for a large one after the dense parameter was updated). A
    fresh process: a regression corrupts the heap."""
    r = subprocess.run([sys.executable, "-c", BAD_SPARSE_INDEX, mode, str(which)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.strip().splitlines()
    assert out[-2].startswith("raised param_groups[0]['params'][1].grad has index "
                              f"{which} "), r.stdout
    assert out[-1] == "unchanged True", r.stdout


@SPARSE_WARNING
def test_sparse_lr_float32_cannot_hold_is_torchs_error() -> None:
    def run(cls: type) -> tuple[str, torch.Tensor]:
        p = torch.nn.Parameter(torch.ones(4, 2))
        p.grad = torch.sparse_coo_tensor([[1]], torch.ones(1, 2), (4, 2))
        with pytest.raises(RuntimeError) as e:
            cls([p], lr=3.5e38).step()
        return str(e.value), p.detach().clone()

    (msg, out), (ref_msg, ref) = run(FT.Adagrad), run(TORCH_OPT)
    assert msg == ref_msg and "overflow" in msg
    assert_same([out], [ref])


@SPARSE_WARNING
@pytest.mark.parametrize("shape,rows", [((0, 4), []), ((5, 3), []), ((5, 3), [2, 2])])
def test_sparse_edge_cases_are_torchs_step(shape: tuple[int, int], rows: list[int]
                                           ) -> None:
    """A table of no rows, an empty gradient: stepped as torch does (the step counted,
    the autograd versions moved); and after any sparse step the parameter's and the
    sum's storages stay resizable, as after torch's (``Tensor.numpy()`` made them
    non-resizable for good)."""
    def run(cls: type) -> tuple:
        p = torch.nn.Parameter(torch.ones(shape))
        p.grad = torch.sparse_coo_tensor([rows], torch.ones(len(rows), shape[1]), shape)
        opt = cls([p])
        v = p._version
        opt.step()
        h = opt.state[p]["sum"]
        return (float(opt.state[p]["step"]), p._version - v, h._version,
                p.untyped_storage().resizable(), h.untyped_storage().resizable(),
                p.detach().clone(), h.clone())

    out, ref = run(FT.Adagrad), run(TORCH_OPT)
    assert out[:5] == ref[:5] == (1.0, ref[1], ref[2], True, True)
    assert_same(list(out[5:]), list(ref[5:]))


# ------------------------------------------------------------------- state dicts

@pytest.mark.parametrize("mode", list(MODES), ids=str)
def test_state_dict_both_ways(mode: str) -> None:
    kw = {**MODES[mode], "lr_decay": 0.1}
    params = _params(torch.float32, [(12,), (3, 4)])
    grads = [_grads(params, s) for s in range(8)]
    ref, _ = _train(TORCH_OPT, params, 8, kw, grads)
    for first, second in ((TORCH_OPT, FT.Adagrad), (FT.Adagrad, TORCH_OPT)):
        ps, opt = _train(first, params, 4, kw, grads)
        sd = copy.deepcopy(opt.state_dict())
        opt2 = second(ps, **kw)
        opt2.load_state_dict(sd)
        assert sd["param_groups"][0].keys() == opt2.state_dict()["param_groups"][0].keys()
        for s in range(4, 8):
            for p, g in zip(ps, grads[s]):
                p.grad = g.clone()
            opt2.step()
        assert_same(ps, ref, f"{first.__name__} -> {second.__name__}")


def test_fastadagrad_class_loads_the_adapters_state_dict() -> None:
    import fastadagrad

    params = _params(torch.float32, [(12,), (3, 4)])
    grads = [_grads(params, s) for s in range(6)]
    ps, opt = _train(FT.Adagrad, params, 3, {"fused": True}, grads)
    sd = opt.state_dict()
    npsd = {"state": {i: {k: v.numpy() for k, v in s.items()} for i, s in sd["state"].items()},
            "param_groups": sd["param_groups"]}
    arrays = [p.detach().numpy().copy() for p in ps]
    fopt = fastadagrad.AdaGrad.from_preset("torch")
    fopt.load_state_dict(npsd, arrays)
    for s in range(3, 6):
        fopt.update(arrays, [g.numpy() for g in grads[s]])
        for p, g in zip(ps, grads[s]):
            p.grad = g.clone()
        opt.step()
    assert_same([torch.from_numpy(a) for a in arrays], [p.detach() for p in ps])


# ------------------------------------------------------------------ aliasing

@pytest.mark.parametrize("n", [3, 20])  # the bisect branch and the NumPy branch
def test_grad_sharing_a_params_memory_takes_torchs_path(n: int) -> None:
    def run(cls: type) -> list[torch.Tensor]:
        ps = _params(torch.float32, [(7,)] * n)
        opt = cls(ps, lr=0.1)
        for s in range(3):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            ps[1].grad = ps[0].detach()  # reads memory that the step writes
            opt.step()
        return ps

    assert_same(run(FT.Adagrad), run(TORCH_OPT))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
def test_grads_overlap_matches_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    for _ in range(200):
        nbytes = rng.integers(0, 5, n) * 4
        # params and states: disjoint ranges at random places in a 1000-byte space
        slots = rng.permutation(2 * n)
        paddr = 16 * slots[:n].astype(np.int64) + 1000
        haddr = 16 * slots[n:].astype(np.int64) + 1000
        plan = _tensorplan.TensorPlan()
        plan.paddr, plan.haddr, plan.nbytes = paddr, haddr, nbytes.astype(np.int64)
        start = np.concatenate((paddr, haddr))
        end = start + np.concatenate((nbytes, nbytes))
        keep = end > start
        order = np.argsort(start[keep], kind="stable")
        plan.wstart, plan.wend = start[keep][order], end[keep][order]
        plan.wlists = (plan.wstart.tolist(), plan.wend.tolist(), nbytes.tolist())
        gaddr = rng.integers(990, 1000 + 32 * n, n).astype(np.int64)
        brute = any(g < e and s < g + b
                    for g, b in zip(gaddr.tolist(), nbytes.tolist()) if b
                    for s, e in zip(start.tolist(), end.tolist()) if e > s)
        assert _tensorplan._grads_overlap(plan, gaddr) == brute
        # step counters: one inside a gradient, or up to 7 bytes before it, is held
        counters = sorted(rng.integers(980, 1010 + 32 * n, rng.integers(0, 4)).tolist())
        plan.caddr = (counters, np.array(counters, np.int64))
        held = any(g - 7 <= c < g + b for g, b in zip(gaddr.tolist(), nbytes.tolist())
                   if b for c in counters)
        assert _tensorplan._grads_hold_counters(plan, gaddr) == held


def test_thread_count_change_between_steps(no_torch_step: None) -> None:
    import numba

    before = numba.get_num_threads()
    sizes = [(2**15 + 3,), (40_000,), (9,)]  # the parallel kernels
    try:
        def run(cls: type) -> list[torch.Tensor]:
            ps = [p.requires_grad_() for p in _params(torch.float32, sizes)]
            opt = cls(ps, lr=0.1, fused=True)
            for s in range(4):
                numba.set_num_threads(1 if s % 2 else before)
                for p, g in zip(ps, _grads(ps, s)):
                    p.grad = g
                opt.step()
            return ps

        assert_same(run(FT.Adagrad), run(TORCH_OPT))
    finally:
        numba.set_num_threads(before)


def test_chunk_setting_changed_between_steps(no_torch_step: None,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # config.CHUNK read again by a cached plan: its spans follow a new setting
    from fastadagrad import config

    sizes = [(2**15 + 3,), (40_000,), (9,)]  # the parallel kernels

    def run(cls: type, chunks: list[int]) -> list[torch.Tensor]:
        ps = [p.requires_grad_() for p in _params(torch.float32, sizes)]
        opt = cls(ps, lr=0.1, fused=True)
        for s, chunk in enumerate(chunks):
            monkeypatch.setattr(config, "CHUNK", chunk)
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g
            opt.step()
            if cls is FT.Adagrad:
                plan = next(iter(opt._fastadagrad_plans.values()))[1]
                lengths = plan.groups[0][2][2]
                assert lengths.max() == min(chunk, 40_000), chunk
        return ps

    assert_same(run(FT.Adagrad, [1 << 14, 1000, 1 << 14]), run(TORCH_OPT, [1 << 14, 1000, 1 << 14]))


@pytest.mark.parametrize("how", ["freed", "inference", "negative"])
def test_gpu_repeat_step_checks_the_counters_first(how: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA repeat-step route counts after its launch: a counter freed (the
    fallback add wrote into freed memory: SIGSEGV), made an inference tensor or a
    negative view after cached steps is refused, or handed to torch, before the launch.
    No GPU here: the cached launch is replaced by one that records it ran, as the step
    caches it for CUDA tensors (foreach=True: CPU counters)."""
    ps = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    opt = FT.Adagrad(ps, lr=0.1, foreach=True)
    for p in ps:
        p.grad = torch.ones(4)
    opt.step()
    plan = next(iter(opt._fastadagrad_plans.values()))
    # (facts, labels, the device path's mark, its Hyper, lr, every parameter with a grad)
    plan[4][:] = [opt._facts(0, opt.param_groups[0]), plan[4][1], FT._ON_GPU, None, 0.1,
                  None]
    launched: list[int] = []
    monkeypatch.setattr(FT.D, "prepared_update",
                        lambda *a, **k: (lambda: launched.append(1)))
    opt.step()
    assert launched == [1] and [float(opt.state[p]["step"]) for p in ps] == [2.0, 2.0]
    launched.clear()
    st = opt.state[ps[1]]
    t = st["step"]
    if how == "freed":
        t.untyped_storage().resize_(0)
    elif how == "negative":
        st["step"] = torch._neg_view(t)
    else:
        with torch.inference_mode():
            st["step"] = torch.empty(0, dtype=t.dtype).set_(
                t.untyped_storage(), t.storage_offset(), t.shape, t.stride())
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError):  # (ours naming it, or torch's before it writes)
        opt.step()
    assert not launched
    assert_same(ps, before)


def test_dense_layouts_checked_by_strides_each_step() -> None:
    """channels_last params (the plan compares their strides as torch gives them, and
    densely where those differ): a gradient whose size-1 dimension has another stride
    is the same layout (compiled); a gradient laid out in another order, swapped in
    after cached steps, is not (torch's step, torch's bits)."""
    def run(cls: type, swap: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(s).to(memory_format=torch.channels_last))
              for s in ((6, 5, 3, 3), (8, 4, 1, 1))]
        opt = cls(ps, lr=0.1)
        for step in range(4):
            for p in ps:
                p.grad = torch.randn(p.shape).to(memory_format=torch.channels_last)
            ps[1].grad = torch.randn(ps[1].shape)  # contiguous: strides differ, size 1
            assert ps[1].grad.stride() != ps[1].stride()
            if swap and step == 3:
                ps[0].grad = torch.randn(ps[0].shape)  # NCHW order: another layout
            opt.step()
        return [*ps, *(opt.state[p]["sum"] for p in ps)]

    assert_same(run(FT.Adagrad, True), run(TORCH_OPT, True))
    assert_same(run(FT.Adagrad, False), run(TORCH_OPT, False))
    real, FT._torch_step = FT._torch_step, None  # (the same layouts: never torch's)
    try:
        run(FT.Adagrad, False)
    finally:
        FT._torch_step = real


@pytest.mark.parametrize("flags", [{}, {"fused": True}], ids=str)
def test_bad_chunk_setting_before_the_first_step_raises(flags: dict,
                                                        monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """config.CHUNK < 1 set before the first step: the error naming it, nothing
    written (the plan could not be built, and every step went to torch's
    implementation without a word)."""
    from fastadagrad import config

    monkeypatch.setattr(config, "CHUNK", -5)
    ps = [torch.nn.Parameter(torch.ones(1 << 17)) for _ in range(2)]
    opt = FT.Adagrad(ps, lr=0.1, **flags)
    for p in ps:
        p.grad = torch.full_like(p, 0.5)
    with pytest.raises(ValueError, match=r"config\.CHUNK must be an int >= 1"):
        opt.step()
    assert all(bool((p == 1).all()) for p in ps)


def test_float64_default_dtype_step_counters(no_torch_step: None) -> None:
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        _compare(_params(torch.float32, [(5,), (3, 3)]), 4, {"lr_decay": 0.2})
    finally:
        torch.set_default_dtype(old)


@SPARSE_WARNING
def test_dense_beside_sparse_is_compiled_and_cached(monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    FT.compiled_paths()  # the one-time self-checks build probe plans: run them first
    builds, torch_calls = [], []
    real_build, real_step = _tensorplan.TensorPlan.build, FT._torch_step

    def counting_build(self: object, *a: object, **k: object) -> None:
        builds.append(1)
        real_build(self, *a, **k)

    def counting_step(params: list, *a: object, **k: object) -> None:
        torch_calls.append(len(params))
        real_step(params, *a, **k)

    monkeypatch.setattr(_tensorplan.TensorPlan, "build", counting_build)
    monkeypatch.setattr(FT, "_torch_step", counting_step)
    emb = torch.nn.Embedding(20, 4, sparse=True)
    lin = torch.nn.Linear(4, 3)
    opt = FT.Adagrad(list(emb.parameters()) + list(lin.parameters()), lr=0.1)
    for s in range(5):
        opt.zero_grad()
        lin(emb(torch.tensor([s, 1, 1, 7]))).sum().backward()
        opt.step()
    assert len(builds) == 1  # the two dense tensors: one plan, kept across steps
    assert torch_calls == []  # the embedding's sparse gradient is compiled too
    opt.load_state_dict(opt.state_dict())  # new group dicts: old plans are dropped
    opt.step()
    assert list(opt._fastadagrad_plans) == [id(opt.param_groups[0])]


def test_gpu_cache_takes_parameters_beside_tensors():
    """The GPU path's per-step check (device-independent readers: run here on CPU
    tensors) caches a model of nn.Parameters with plain-tensor sums and gradients, and
    notices a parameter swapped in place (``.data =``) or new gradient tensors."""
    from fastadagrad.cuda import GpuCache

    ps = [torch.nn.Parameter(torch.ones(3)) for _ in range(2)]
    hs = [torch.zeros(3) for _ in range(2)]
    gs = [torch.ones(3) for _ in range(2)]
    gc = GpuCache()
    gc.remember(ps, hs, gs)
    assert gc.getters and gc.holds(ps, hs, gs)
    assert not gc.holds(ps, hs, [g.clone() for g in gs])
    ps[0].data = torch.ones(4)
    assert not gc.holds(ps, hs, gs)
    mixed = GpuCache()
    mixed.remember(ps, hs, [np.ones(3, np.float32)] * 2)  # not one family: every step
    assert not mixed.getters and not mixed.holds(ps, hs, gs)


@pytest.mark.parametrize("mode", ["single", "fused"])
def test_repeated_steps_follow_every_change(mode: str) -> None:
    """From the second step on, a step that changes nothing the adapter decided on skips
    the analysis (``Adagrad._repeat_step``); each change below must be seen, and the bits
    stay torch's: lr to -0.0 and back, weight decay on, a gradient left None, a state
    cleared, a parameter turned float64 in place, maximize, a parameter added."""
    def change(opt: torch.optim.Optimizer, ps: list[torch.Tensor], s: int) -> None:
        group = opt.param_groups[0]
        if s == 2:
            group["lr"] = 0.0
        if s == 3:
            group["lr"] = -0.0  # equal to 0.0; the sign reaches zero parameters' bits
            ps[0].data[:8] = torch.tensor([0.0, -0.0] * 4)
        if s == 4:
            group["lr"] = 0.05
            group["weight_decay"] = 0.1
        if s == 5:
            ps[1].grad = None  # skipped by both
        if s == 6:
            opt.state[ps[2]].clear()  # started again from the initial accumulator
        if s == 7 and mode == "single":  # torch's fused kernel refuses it: a float32 step
            ps[3].data = ps[3].data.double()
            opt.state[ps[3]]["sum"] = opt.state[ps[3]]["sum"].double()
        if s == 8:
            group["maximize"] = True
        if s == 9:
            extra = torch.zeros(6, requires_grad=True)
            extra.data[::2] = -0.0
            opt.add_param_group({"params": [extra]})
            ps.append(extra)

    def run(cls: type) -> list[list[torch.Tensor]]:
        ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (3, 4), (5,),
                                                                   (7,)])]
        opt = cls(ps, lr=0.2, **MODES[mode])
        after = []  # every step's result: a later step can wash a sign of zero out
        for s in range(12):
            for p, g in zip(ps, _grads(ps, s)):
                p.grad = g.to(p.dtype)
            change(opt, ps, s)
            opt.step()
            after.append([p.detach().clone() for p in ps])
        return after

    for s, (mine, ref) in enumerate(zip(run(FT.Adagrad), run(TORCH_OPT))):
        assert_same(mine, ref, f"step {s}")


@pytest.mark.parametrize("flags", [{"fused": True}, {}], ids=str)
def test_repeated_steps_skip_the_analysis(monkeypatch: pytest.MonkeyPatch,
                                          flags: dict) -> None:
    """The second step of an unchanged model does not run the full analysis, nor does
    a new learning rate (a scheduler's: only the kernels' scalars are made again, the
    bits stay torch's); a change of another hyperparameter does."""
    ps = [p.requires_grad_() for p in _params(torch.float32, [(10,), (3, 4)])]
    ref = [p.detach().clone().requires_grad_() for p in ps]
    opt, ropt = FT.Adagrad(ps, lr=0.1, **flags), TORCH_OPT(ref, lr=0.1, **flags)

    seeds = iter(range(100))

    def step() -> None:
        seed = next(seeds)
        for o, qs in ((opt, ps), (ropt, ref)):
            for q, g in zip(qs, _grads(qs, seed)):
                q.grad = g
            o.step()

    calls: list[int] = []
    step()
    full = FT.Adagrad._prepare_cpu
    monkeypatch.setattr(FT.Adagrad, "_prepare_cpu",
                        lambda self, *a, **k: calls.append(1) or full(self, *a, **k))
    step()
    assert calls == []
    for lr in (0.2, 0.05, 0.05, 1e-3):
        opt.param_groups[0]["lr"] = ropt.param_groups[0]["lr"] = lr
        step()
        assert calls == []
        assert_same(ps, ref)
    opt.param_groups[0]["weight_decay"] = ropt.param_groups[0]["weight_decay"] = 0.1
    step()
    assert calls == [1]
    step()
    assert calls == [1]
    assert_same(ps, ref)
    opt.param_groups[0]["lr"] = ropt.param_groups[0]["lr"] = 3.5e38  # beyond float32:
    outcomes = []  # torch's outcome (its error, or its bits) with the new scalars
    for o in (opt, ropt):
        try:
            o.step()
            outcomes.append(None)
        except RuntimeError as e:
            outcomes.append(str(e))
    assert outcomes[0] == outcomes[1]
    assert_same(ps, ref)


class _SeenAsCuda(torch.Tensor):
    """A CPU tensor that the adapter's sorting takes for a CUDA tensor (only its Python
    attributes say so): lets the tests below follow the CUDA path's decisions on a
    machine without a GPU, with the device layer replaced by recorders."""

    is_cuda = property(lambda self: True)
    is_cpu = property(lambda self: False)


# the device cache reads torch tensors with torch's getters (cuda._getters): a torch type
_SeenAsCuda.__module__ = "torch"


def test_repeated_cuda_steps_skip_the_analysis(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA tensors, a step whose tensors the device cache still holds as validated
    skips the group analysis and goes straight to the launch; a changed learning rate,
    a changed gradient or a cleared state takes the analysis again."""
    from fastadagrad import cuda as fcuda

    calls: list[str] = []

    def validate(params, grads, states, labels, hyper, step, nonfinite, plan):
        # what cuda.update leaves after validating: the cache of what it checked
        calls.append("validate")
        plan.gpu = plan.gpu or fcuda.GpuCache()
        plan.gpu.remember(params, states, grads)
        plan.gpu.tables = "tables"
        return True

    monkeypatch.setattr(FT.D, "update", validate)
    monkeypatch.setattr(fcuda, "_stream_ref", lambda x, d: "stream")
    monkeypatch.setattr(fcuda, "_run", lambda *a: calls.append("launch") or True)
    analysed = FT.Adagrad._prepare_cuda
    monkeypatch.setattr(FT.Adagrad, "_prepare_cuda",
                        lambda self, *a, **k: calls.append("analyse") or
                        analysed(self, *a, **k))
    torch_step = FT._torch_step
    monkeypatch.setattr(FT, "_torch_step",
                        lambda *a, **k: calls.append("torch") or torch_step(*a, **k))

    ps = [p.as_subclass(_SeenAsCuda).requires_grad_()
          for p in _params(torch.float32, [(10,), (3, 4)])]
    opt = FT.Adagrad(ps, lr=0.1, foreach=True)
    for p, g in zip(ps, _grads(ps, 0)):
        p.grad = g.as_subclass(_SeenAsCuda)

    def step() -> list[str]:
        calls.clear()
        opt.step()
        return list(calls)

    assert step() == ["analyse", "validate"]
    assert step() == ["launch"]  # the same tensors: no analysis, no validation
    assert step() == ["launch"]
    opt.param_groups[0]["lr"] = 0.2
    assert step() == ["analyse", "validate"]
    assert step() == ["launch"]
    ps[1].grad = ps[1].grad.clone()  # a new address: validated again
    assert step() == ["analyse", "validate"]
    assert step() == ["launch"]
    # a gradient the kernels cannot take: its parameter sorted to torch's implementation
    ps[1].grad = torch.randn(4, 3).t().as_subclass(_SeenAsCuda)
    assert step() == ["analyse", "torch", "validate"]
    assert step() == ["analyse", "torch", "validate"]  # not the whole group: no memo
    ps[1].grad = ps[1].grad.contiguous()
    assert step() == ["analyse", "validate"]
    opt.state[ps[0]].clear()  # the analysis creates the state again
    assert step() == ["analyse", "validate"]
    assert step() == ["launch"]
    # a sparse gradient has no data pointer to compare: the repeat declines (without
    # raising), leaving it to the analysis (not run here: torch's own step cannot take
    # a sparse gradient beside this subclass)
    dense = ps[0].grad
    ps[0].grad = dense.as_subclass(torch.Tensor).to_sparse()
    group = opt.param_groups[0]
    assert opt._repeat_step(0, group, opt._fastadagrad_plans[id(group)]) is None
    ps[0].grad = dense
    assert step() == ["launch"]
    ps[0].grad = None  # a parameter without a gradient: the analysis skips it
    assert step() == ["analyse", "validate"]
    assert step() == ["analyse", "validate"]
    # every step counted once, on each path
    # (the state of ps[0] was cleared before step 11, and it has no gradient from 14)
    assert [int(opt.state[p]["step"]) for p in ps] == [3, 15]
    # lr_decay: the learning rate depends on the step, which the memo does not carry
    opt = FT.Adagrad(ps, lr=0.1, lr_decay=0.01, foreach=True)
    ps[0].grad = ps[1].grad.new_ones(10)
    assert step() == ["analyse", "validate"]
    assert step() == ["analyse", "validate"]
