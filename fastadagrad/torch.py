"""``fastadagrad.torch.Adagrad``: a drop-in ``torch.optim.Adagrad`` with torch's exact bits.

Swap one class::

    opt = torch.optim.Adagrad(model.parameters(), lr=0.01)        # before
    opt = fastadagrad.torch.Adagrad(model.parameters(), lr=0.01)  # after

Everything else stays: param groups, ``add_param_group``, ``zero_grad``, ``step(closure)``,
step hooks, LR schedulers, a tensor ``lr``, ``state_dict``/``load_state_dict`` (the same
``"sum"`` and ``"step"`` tensors as ``torch.optim.Adagrad``, loadable by either class),
``torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=...)``. The class
subclasses ``torch.optim.Adagrad``, so its constructor, argument checks, defaults and
state layout are torch's own; only ``step`` differs.

What ``step`` does with each parameter that has a gradient:

- CPU float32/float64 dense tensors (the common case): the whole param group goes
  through one compiled Numba call per dtype, in place through the tensors' memory
  (``data_ptr()``), with the per-model work cached across steps. Contiguous tensors,
  and dense ones laid out otherwise (``channels_last`` convolution weights, any order
  of the dimensions in memory) whose gradient and sum have the parameter's strides, as
  autograd and torch's state initialisation give them. The bits are those of
  the torch implementation the same flags select, after any number of steps:

  * default and ``foreach=True`` (torch's single-tensor and multi-tensor paths)::

        g = -g if maximize;  g = fma(p, wd, g) if wd != 0;  h = fma(g, g, h)
        p = p + (-clr * g) / (torch.sqrt(h) + eps)

    with ``torch.sqrt`` the MKL routine torch itself calls (it is not correctly
    rounded; see :mod:`fastadagrad.cpu_vsqrt`): in float32 and float64 its arithmetic
    reproduced inline (MKL's generic kernels, the ones it runs on AMD CPUs, and its
    AVX-512 kernels, the ones it runs on Intel CPUs with AVX-512: see
    :mod:`fastadagrad.cpu_vsqrt_z0`; each dtype checked against the routine once per
    process), and where those checks fail the routine itself called on blocks;
    ``clr = lr / (1 + (step-1)*lr_decay)`` in double;
  * ``fused=True`` (ATen's fused kernel): the ``"torch"`` preset of
    :mod:`fastadagrad.presets` (FMAs, IEEE square root).

  A one-time self-check per formula and dtype compares the kernel with torch's own
  implementation on a probe; if this torch build rounds differently (another BLAS,
  another CPU architecture), that path is handed to torch's implementation instead
  (:func:`compiled_paths` says which are compiled). The step counters are incremented
  by one more compiled call.
- CPU float32/float64 parameters with a sparse COO gradient of one sparse dimension
  (``nn.Embedding(sparse=True)``, default flags or ``foreach=True``): torch coalesces
  the gradient (its order of summing duplicates), then one compiled call updates the
  touched rows with torch's sparse branch, bit for bit::

        h[r] = h[r] + g*g;  p[r] = fma(g / (torch.sqrt(h[r]) + eps), -clr, p[r])

  (the FMA is MKL's ``axpy`` inside ``param.add_(sparse, alpha=-clr)``; self-checked
  per dtype like the dense formulas). Weight decay with sparse gradients raises, as
  in torch.
- CUDA tensors with ``foreach=True`` (torch's default on CUDA) or ``fused=True``:
  fastadagrad's GPU kernels, one launch per dtype for the whole param group, with the
  validated tensors and the device tables cached across steps. With
  ``foreach=False``, torch's own single-tensor step (its CUDA ``addcdiv_`` rounds in an
  order the kernels do not reproduce).
- Anything the kernels cannot update in place (tensors with gaps or overlaps, a
  parameter, gradient and sum laid out in different orders,
  float16/bfloat16/complex, tensors sharing memory, other sparse layouts, a tensor
  ``lr`` with sparse gradients, ``differentiable=True``, AMP's
  ``grad_scale``/``found_inf``, tensors with the negative bit, inference tensors,
  ZeroTensors and wrapper subclasses without data of their own, step counters other
  than one-element float32/float64 CPU tensors, hyperparameters float32 cannot hold):
  torch's own implementation, with the same flags, so the result is still torch's, bit
  for bit, or torch's error. Nothing is ever skipped. A tensor whose storage was freed
  or shrunk (FSDP's ``untyped_storage().resize_(0)``) raises RuntimeError naming it,
  before anything is written (torch's default step reads and writes past it).
  With ``fused=True``, CPU tensors that torch's fused kernel would mishandle (it walks
  each tensor as flat memory: a parameter with gaps, an expanded gradient, a gradient
  or sum of another number of elements, dtype or memory order) raise RuntimeError
  naming the tensor, before anything is written, instead of being handed to it
  (contiguous tensors of as many elements in another shape get torch's flat update).
- Autograd: the version counters of the tensors written are incremented, and
  ``torch.compile`` runs the step as a graph break (eagerly, torch's eager bits).

Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization", JMLR 12 (2011).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import math
import operator
import os
import warnings
from collections.abc import Callable
from itertools import compress
from operator import attrgetter, itemgetter
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version
from torch.optim import adagrad as _torch_adagrad
from torch.optim import optimizer as _torch_optimizer

from . import _dispatch as D
from . import _hyper as H
from . import _tensorplan as T
from . import cpu_vsqrt, cpu_vsqrt_z0
from ._plan import Plan
from .presets import PRESETS

__all__ = ["Adagrad", "compiled_paths"]

#: torch's implementation, for the tensors the kernels cannot take (a module global so
#: that tests can check it is not called)
_torch_step = _torch_adagrad.adagrad
_FUSED_RULE = PRESETS["torch"].rule
#: torch's eager formula on a device with an IEEE square root (the GPU path)
_EAGER_RULE = H.Rule(fma_accumulate=True, fma_weight_decay=True)
_get_sum = itemgetter("sum")
_get_step = itemgetter("step")
_get_dtype = attrgetter("dtype")
_get_grad = attrgetter("grad")
_not_none = functools.partial(operator.is_not, None)
_get_layout = attrgetter("layout")
_is_cpu = attrgetter("is_cpu")
_ONE = torch.tensor(1.0)
#: marks a memo (see ``Adagrad._repeat_step``) of a step that took the GPU kernels
_ON_GPU = object()


def _vml_sqrt_addresses() -> dict[Any, tuple[int, int]]:
    """MKL's vmsSqrt/vmdSqrt inside the loaded libtorch_cpu, if exported, as the pairs
    ``(routine, threads)`` the kernels take (:func:`cpu_vsqrt._vsqrt`): ``threads`` is
    the address of ``MKL_Set_Num_Threads_Local`` where it behaves as documented, else
    0."""
    libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(libdir, "libtorch_cpu.*"))):
        try:
            lib = ctypes.CDLL(path)
            threads = _mkl_threads_local(lib)
            return {torch.float32: (ctypes.cast(lib.vmsSqrt, ctypes.c_void_p).value,
                                    threads),
                    torch.float64: (ctypes.cast(lib.vmdSqrt, ctypes.c_void_p).value,
                                    threads)}
        except (OSError, AttributeError):
            continue
    return {}


def _mkl_threads_local(lib: ctypes.CDLL) -> int:
    """Address of MKL's C function ``int MKL_Set_Num_Threads_Local(int)`` in ``lib``,
    checked once: setting 1 must make ``MKL_Get_Max_Threads()`` 1 on this thread, and
    putting the previous value back must restore it. 0 where it is missing or does
    not (the kernels then call the square root without it: the same bits, slower
    after ``torch.set_num_threads``). The mixed-case names are MKL's C interface (an
    ``int`` by value); the lower-case ones may be its Fortran interface (a pointer), as
    in torch 2.13's build, so they are not used."""
    try:
        setter, getter = lib.MKL_Set_Num_Threads_Local, lib.MKL_Get_Max_Threads
    except AttributeError:
        return 0
    setter.restype, setter.argtypes = ctypes.c_int, [ctypes.c_int]
    getter.restype, getter.argtypes = ctypes.c_int, []
    before = getter()
    prev = setter(1)
    one = getter()
    setter(prev)
    if one != 1 or getter() != before:
        return 0
    return ctypes.cast(setter, ctypes.c_void_p).value or 0


_VSQRT = _vml_sqrt_addresses()
_CHECKED: dict[tuple[str, Any], bool] = {}
#: the eager formula's kernels per dtype (float32's, float64's), each "vsqrt-emu" (MKL's
#: generic square root emulated), "vsqrt-z0" (its AVX-512 one emulated) or "vsqrt" (the
#: routine called): one dict per choice, so that a plan's cached choice compares equal
_EAGER: dict[tuple[str, str], dict[np.dtype, str]] = {}
#: the emulations of MKL's square root, in the order they are tried
_EMULATIONS = ("vsqrt-emu", "vsqrt-z0")


def compiled_paths() -> dict[str, bool]:
    """Which torch implementations run compiled on the CPU in this process.

    ``{"single-tensor/foreach float32": True, ..., "fused float64": True, "sparse
    float32": True, "sparse float64": True}`` ("sparse": the sparse-gradient branch):
    True once the one-time self-check passed (it runs on first use), False where this
    torch build rounds differently and the adapter hands the step to torch's own
    implementation.
    """
    out = {}
    for formula, name in (("vsqrt", "single-tensor/foreach"), ("fused", "fused"),
                          ("sparse", "sparse")):
        for dt in (torch.float32, torch.float64):
            out[f"{name} {str(dt).removeprefix('torch.')}"] = _formula_ok(formula, dt)
    return out


def _formula_ok(formula: str, dtype: Any) -> bool:
    """Whether the kernel for ``formula`` reproduces this torch's bits (checked once)."""
    key = (formula, dtype)
    ok = _CHECKED.get(key)
    if ok is None:
        ok = _CHECKED[key] = _self_check(formula, dtype)
    return ok


def _eager_kernels() -> dict[np.dtype, str]:
    """The kernels of torch's eager formula per dtype (after their self-checks): through
    an emulation of MKL's square root where it reproduces the routine (MKL's generic
    kernels, then its AVX-512 ones), else the routine."""
    key = tuple(_emulation(dt) or "vsqrt" for dt in (torch.float32, torch.float64))
    kernels = _EAGER.get(key)
    if kernels is None:
        kernels = _EAGER.setdefault(key, {np.dtype(np.float32): key[0],
                                          np.dtype(np.float64): key[1]})
    return kernels


def _emulation(dtype: Any) -> str | None:
    """The emulation of MKL's square root the kernels use in ``dtype`` (the first of
    :data:`_EMULATIONS` whose check passed), None where they call the routine."""
    return next((e for e in _EMULATIONS if _formula_ok(e, dtype)), None)


def _emulation_ok(exhaustive: bool = False, dtype: Any = torch.float32) -> bool:
    """Whether the emulated square root (:func:`cpu_vsqrt.mkl_sqrt_emulated`) gives the
    routine's bits, both in steps (the kernels' body) and element by element (their
    tails). float32 (the arithmetic of :func:`cpu_vsqrt.mkl_ex_sqrt_normal` in MKL's
    normal range, the IEEE square root outside it, inputs whose sign bit is clear):
    every 61st of the 2^24 mantissa/exponent-parity patterns of [0.5, 2) and of the
    patterns outside the normal range (zero, subnormals, the largest floats, inf, NaN),
    all of them if ``exhaustive`` (the tests do that), then 1024 random mantissas of
    every exponent (the square root of ``x * 4^k`` is ``2^k`` times that of ``x`` in
    both). ~10 ms, once per process (the exhaustive check: ~1 s). float64: see
    :func:`_emulation_ok_f64`.
    """
    if dtype == torch.float64:
        return _emulation_ok_f64(exhaustive)
    fn = _VSQRT[torch.float32]
    rng = np.random.default_rng(0)
    exps = np.arange(1, 255, dtype=np.int32)
    every = 1 if exhaustive else 61
    lo, hi = cpu_vsqrt.NORMAL_LO, cpu_vsqrt.NORMAL_HI
    xs = [np.arange(0x7E << 23, 0x80 << 23, every, dtype=np.int32),
          ((exps[:, None] << 23) | rng.integers(0, 1 << 23, (exps.size, 1024),
                                                dtype=np.int32)).ravel(),
          # outside the normal range, every sign-clear pattern: an odd count, so that
          # the element-by-element tail runs too
          np.concatenate((np.arange(0, lo, every, dtype=np.int32),
                          np.arange(0x7FFFFFFF, hi, -every, dtype=np.int32),
                          np.array([0, lo - 1, hi + 1, 0x7F800000, 0x7FC00000],
                                   np.int32)))]
    return _same_as_routine(fn, [bits.view(np.float32) for bits in xs])


def _emulation_ok_f64(exhaustive: bool = False) -> bool:
    """:func:`_emulation_ok` for float64 (:func:`cpu_vsqrt.mkl_ex_dsqrt_normal` in MKL's
    vector path, and +0): for every exponent of that path, 64 random mantissas and the
    mantissas at the edges of the bits it splits off (the top 23 that make its float32
    seed, the top 26 of its Dekker split), and +0; 2^24 more random inputs if
    ``exhaustive`` (the tests). ~5 ms once per process."""
    fn = _VSQRT[torch.float64]
    rng = np.random.default_rng(0)
    exps = np.arange(1, (cpu_vsqrt.D_NORMAL_HI >> 20) + 1, dtype=np.uint64)
    edges = np.array([0, 1, (1 << 29) - 1, 1 << 29, (1 << 26) - 1, 1 << 26,
                      (1 << 52) - (1 << 29), (1 << 52) - 1], np.uint64)
    mant = np.concatenate((rng.integers(0, 1 << 52, (exps.size, 64), dtype=np.uint64),
                           np.broadcast_to(edges, (exps.size, edges.size))), axis=1)
    xs = [((exps[:, None] << np.uint64(52)) | mant).ravel(), np.zeros(3, np.uint64)]
    if exhaustive:
        e = rng.integers(1, exps[-1] + 1, 1 << 24, dtype=np.uint64)
        xs.append((e << np.uint64(52)) | rng.integers(0, 1 << 52, 1 << 24, dtype=np.uint64))
    return _same_as_routine(fn, [bits.view(np.float64) for bits in xs])


def _z0_ok(exhaustive: bool = False, dtype: Any = torch.float32) -> bool:
    """Whether :mod:`cpu_vsqrt_z0`'s emulation gives the routine's bits, in steps and
    element by element, on inputs of its range. float32: every 61st of the 2^24
    mantissa/exponent-parity patterns of [1, 4) (all of them if ``exhaustive``: the
    tests), then 1024 random mantissas of every exponent of the range (the table of
    ``vrsqrt14`` and the arithmetic scale by 4^k). float64: 64 random mantissas and the
    edge mantissas of every exponent of the range, 2^24 more random inputs if
    ``exhaustive``. ~10 ms once per process."""
    z = cpu_vsqrt_z0
    rng = np.random.default_rng(0)
    if dtype == torch.float32:
        exps = np.arange(z.LO >> 23, (z.HI >> 23) + 1, dtype=np.int32)
        xs = [np.arange(0x7F << 23, 0x81 << 23, 1 if exhaustive else 61, dtype=np.int32),
              ((exps[:, None] << 23) | rng.integers(0, 1 << 23, (exps.size, 1024),
                                                    dtype=np.int32)).ravel(),
              np.array([z.LO, z.LO + 1, z.HI - 1, z.HI], np.int32)]
        xs = [bits.view(np.float32) for bits in xs]
    else:
        exps = np.arange(z.D_LO >> 52, (z.D_HI >> 52) + 1, dtype=np.uint64)
        edges = np.array([0, 1, (1 << 26) - 1, 1 << 26, (1 << 52) - 1], np.uint64)
        mant = np.concatenate((rng.integers(0, 1 << 52, (exps.size, 64), dtype=np.uint64),
                               np.broadcast_to(edges, (exps.size, edges.size))), axis=1)
        xs = [((exps[:, None] << np.uint64(52)) | mant).ravel()]
        if exhaustive:
            e = rng.integers(exps[0], exps[-1] + 1, 1 << 24, dtype=np.uint64)
            xs.append((e << np.uint64(52)) | rng.integers(0, 1 << 52, 1 << 24,
                                                          dtype=np.uint64))
        xs = [bits.view(np.float64) for bits in xs]
    return _same_as_routine(_VSQRT[dtype], xs, z.Z0.sqrt_emulated)


def _same_as_routine(fn: tuple[int, int], xs: list[np.ndarray],
                     emulated: Any = cpu_vsqrt.mkl_sqrt_emulated) -> bool:
    """Whether the emulation ``emulated`` (a :class:`cpu_vsqrt.Family`'s
    ``sqrt_emulated``) gives routine ``fn``'s bits on every array of ``xs``, both in
    steps and element by element, every element emulated."""
    for x in xs:
        theirs = np.empty_like(x)
        cpu_vsqrt.mkl_sqrt_routine(fn, x, theirs)
        ints = np.int32 if x.dtype == np.float32 else np.int64
        for lanes in (True, False):
            mine = np.empty_like(x)
            if emulated(x, mine, lanes) != 0 or not np.array_equal(
                    mine.view(ints), theirs.view(ints)):
                return False
    return True


def _sparse_self_check(dtype: Any) -> bool:
    """Two steps of torch's sparse branch on probe tables (rows of 1, 19 and 600
    elements, repeated indices, every option sparse gradients allow) vs the kernel."""
    gen = torch.Generator().manual_seed(1)
    kw = dict(lr=0.3, lr_decay=0.1, eps=1e-3, maximize=True)
    emulation = _emulation(dtype)
    for shape in ((41,), (37, 19), (9, 600)):
        p0 = torch.randn(shape, dtype=dtype, generator=gen)
        h0 = torch.rand(shape, dtype=dtype, generator=gen)
        grads = []
        for _ in range(2):
            idx = torch.randint(0, shape[0], (3 * shape[0],), generator=gen)
            vals = torch.randn((idx.numel(), *shape[1:]), dtype=dtype, generator=gen)
            grads.append(torch.sparse_coo_tensor(idx[None], vals * 10, shape,
                                                 check_invariants=False))
        ref_p, ref_h, steps = p0.clone(), h0.clone(), [torch.tensor(0.0)]
        with warnings.catch_warnings():  # torch's "Sparse invariant checks" notice
            warnings.simplefilter("ignore", UserWarning)
            for g in grads:
                _torch_adagrad.adagrad([ref_p], [g], [ref_h], steps, has_sparse_grad=True,
                                       weight_decay=0.0, foreach=False, **kw)
        p, h = p0.clone(), h0.clone()
        for step, g in enumerate(grads, 1):
            run = T.prepare_sparse(p, g, h, _neg_clr(kw["lr"], kw["lr_decay"], step),
                                   kw["eps"], kw["maximize"], _VSQRT[dtype], emulation)
            if run is None:
                return False
            run()
        if not (_same_bits(p, ref_p) and _same_bits(h, ref_h)):
            return False
    return True


def _self_check(formula: str, dtype: Any) -> bool:
    """Two steps on a probe, every option on, kernel vs torch's own implementation."""
    if formula == "sparse":
        return dtype in _VSQRT and _sparse_self_check(dtype)
    if formula.startswith("vsqrt") and dtype not in _VSQRT:
        return False
    if formula == "vsqrt-emu":
        try:
            if not _emulation_ok(dtype=dtype):
                return False
        except Exception:  # noqa: BLE001 - not x86 (no rsqrtps to compile): not this path
            return False
    if formula == "vsqrt-z0" and not (cpu_vsqrt_z0.available() and _z0_ok(dtype=dtype)):
        return False
    gen = torch.Generator().manual_seed(0)
    n = 1031  # a vector body and a scalar tail, several kernel blocks
    p0 = torch.randn(n, dtype=dtype, generator=gen)
    grads = [torch.randn(n, dtype=dtype, generator=gen) * 10 for _ in range(2)]
    h0 = torch.rand(n, dtype=dtype, generator=gen)
    kw = dict(lr=0.3, lr_decay=0.1, weight_decay=0.25, eps=1e-3, maximize=True)
    ref_p, ref_h, steps = p0.clone(), h0.clone(), [torch.tensor(0.0)]
    if formula == "fused":
        steps = [torch.zeros((), dtype=torch.float32)]
    for g in grads:
        _torch_adagrad.adagrad([ref_p], [g], [ref_h], steps, fused=formula == "fused",
                               foreach=False, **kw)
    p, h = p0.clone(), h0.clone()
    labels = [D.Labels("probe", "probe grad", "probe sum")]
    for step, g in enumerate(grads, 1):
        run = T.prepare(T.TensorPlan(), [p], [g], [h], labels, formula,
                        _coefficients(formula, kw["lr"], kw["eps"], kw["lr_decay"],
                                      kw["weight_decay"], kw["maximize"], float(step)))
        if run is None:
            return False
        run()
    return _same_bits(p, ref_p) and _same_bits(h, ref_h)


def _same_bits(a: Any, b: Any) -> bool:
    ints = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return bool(torch.equal(a.view(ints), b.view(ints)))


def _neg_clr(lr: Any, lr_decay: float, step: float, foreach: bool = False) -> float:
    """``-clr`` exactly as torch's eager paths compute it (a tensor lr in its dtype):
    ``-(lr / d)`` (single-tensor), ``(-lr) / d`` (foreach: the sign of a NaN differs)."""
    d = 1 + (step - 1) * lr_decay
    if isinstance(lr, torch.Tensor):
        lr = lr.squeeze()
        return float(-lr / d if foreach else -(lr / d))
    return -lr / d if foreach else -(lr / d)


#: torch refuses a finite value above it where it converts a double to float32
_F32_MAX = float(np.finfo(np.float32).max)


def _beyond_f32(x: Any) -> bool:
    """Whether torch refuses ``x`` as a float32 scalar (finite, above its largest)."""
    return _F32_MAX < abs(float(x)) < math.inf


def _plain(x: Any) -> bool:
    """Whether hyperparameter ``x`` is a number the compiled paths take as torch does:
    float, bool, an int of int64's range, a NumPy float32/float64. Anything else
    (Fraction, Decimal, None, a huge int) goes to torch's step, which refuses it its
    own way."""
    t = type(x)
    return (t is float or t is bool or t is np.float64 or t is np.float32
            or (t is int and -(1 << 63) <= x < 1 << 63))


def _coefficients(formula: str, lr: Any, eps: float, lr_decay: float,
                  weight_decay: float, maximize: bool, step: float, foreach: bool = False
                  ) -> Callable[[np.dtype], tuple]:
    """The kernel's scalar arguments, per dtype; raises (before any write) if invalid."""
    if formula == "fused":
        if type(maximize) is not bool:  # torch's fused kernel takes a bool only
            raise TypeError("maximize must be a bool for the fused step")
        # torch's CPU kernel reads the counter as a float (``item<float>()``) whatever
        # its dtype: a float64 count above 2^24 is rounded to float32 first
        step = float(np.float32(step))
        if not math.isfinite(step) or step != int(step):  # torch's kernel uses it as it
            raise ValueError(f"step {step} is not a whole number")  # is: torch's step
        args = (float(lr), float(eps), float(lr_decay), float(weight_decay), bool(maximize))
        # -0.0 == 0.0 and hashes alike: the cache would hand a zero lr or weight decay
        # the other sign, which reaches the bits of a zero parameter
        hyper = (_fused_hyper.__wrapped__ if H.negative_zero(args[0], args[3])
                 else _fused_hyper)(*args)
        try:
            hyper.clr(int(step))
        except ZeroDivisionError:  # (step - 1) * lr_decay == -1: C++'s lr / 0 in
            raise ValueError("the learning rate's denominator is 0") from None  # torch's
        return functools.partial(D.coefficients, hyper, step=int(step))
    neg_clr = _neg_clr(lr, lr_decay, step, foreach)
    flags = (H.MAXIMIZE if maximize else 0) | (H.WD_COUPLED if weight_decay != 0 else 0)

    def coefs(dt: np.dtype) -> tuple:
        t = dt.type
        fn = _VSQRT[torch.float32 if dt == np.float32 else torch.float64]
        scalars = []
        for x in (neg_clr, eps, weight_decay):  # torch refuses a finite value its
            if dt == np.float32 and _beyond_f32(x):  # dtype
                raise ValueError(f"{x} overflows float32")  # cannot hold
            scalars.append(t(x))
        return (fn, *scalars, flags)

    return coefs


class _StepsDiffer(ValueError):
    """The step counters of a group hold different values: one ``lr_decay`` learning
    rate each, which the full analysis splits by step."""


class _AtCommonStep:
    """``coefficients(dtype)`` at the step all of a group's counters reach with this
    step's increment (``lr_decay``: the learning rate depends on it), read through the
    plan's counter addresses when first called: by :func:`_tensorplan.prepare`, after it
    checked every tensor of the step. Raises :class:`_StepsDiffer` (nothing written) if
    the counters differ. The full analysis read every counter with ``float(s + 1)``:
    2-3x torch fused's step time on small models."""

    __slots__ = ("plan", "formula", "lr", "group", "fn")

    def __init__(self, plan: T.TensorPlan, formula: str, lr: Any, group: dict[str, Any]
                 ) -> None:
        self.plan, self.formula, self.lr, self.group, self.fn = plan, formula, lr, group, None

    def __call__(self, dtype: np.dtype) -> tuple:
        if self.fn is None:
            step = T.next_common_step(self.plan)
            if step is None:
                raise _StepsDiffer("the step counters differ")
            g = self.group
            self.fn = _coefficients(self.formula, self.lr, g["eps"], g["lr_decay"],
                                    g["weight_decay"], g["maximize"], step,
                                    bool(g["foreach"]))
        return self.fn(dtype)


class _NewLr:
    """The fused formula's ``coefficients(dtype)`` for a scheduler's new learning rate
    (``lr_decay`` 0, step 1): those of the Hyper the last full analysis made (its
    :meth:`~fastadagrad._hyper.Hyper.family`, kept per dtype in ``base`` from one new lr
    to the next) with only the learning-rate entries made again
    (:meth:`~fastadagrad._hyper.Hyper.relr`, the same bits). A new Hyper through
    ``_fused_hyper`` and its hashed cache cost ~13 us a step with a scheduler: a
    one-tensor model stepped 1.4x slower than torch fused."""

    __slots__ = ("hyper", "base")

    def __init__(self, hyper: H.Hyper, base: dict[np.dtype, tuple]) -> None:
        self.hyper, self.base = hyper, base

    @classmethod
    def of(cls, last: Any, lr: float) -> _NewLr:
        """From the last step's coefficients (a :func:`_coefficients` partial or a
        ``_NewLr``); ``lr`` a float or int (the group's facts), checked as
        ``Hyper.make`` checks it (ValueError)."""
        if isinstance(last, cls):
            family, base = last.hyper.family(), last.base
        else:  # functools.partial(D.coefficients, hyper, step=1)
            family, base = last.args[0], {}
        return cls(family.with_lr(H.check_hyper("lr", float(lr))), base)

    def __call__(self, dtype: np.dtype) -> tuple:
        coefs = self.base.get(dtype)
        if coefs is None:
            coefs = self.base[dtype] = D.coefficients(self.hyper.family(), dtype, 1)
        return self.hyper.relr(coefs, dtype)


@functools.lru_cache(maxsize=256)
def _fused_hyper(lr: float, eps: float, lr_decay: float, weight_decay: float,
                 maximize: bool) -> H.Hyper:
    return H.Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                        maximize=maximize, rule=_FUSED_RULE)


class _GroupLabels:
    """Error names for the tensors of one param group, built only when needed."""

    __slots__ = ("group", "index")

    def __init__(self, group: int, index: list[int]) -> None:
        self.group, self.index = group, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> D.Labels:
        k = self.index[i]
        where = f"param_groups[{self.group}]['params'][{k}]"
        return D.Labels(where, f"{where}.grad", f"state[{where}]['sum']")


class Adagrad(torch.optim.Adagrad):
    r"""``torch.optim.Adagrad``, with the step compiled: the same class, the same bits.

    For every parameter ``p`` with a gradient ``g``, at step ``t`` (counted from 1 per
    parameter, ``state["step"]``)::

        clr = lr / (1 + (t - 1) * lr_decay)
        g   = -g                       if maximize
        g   = g + weight_decay * p     if weight_decay != 0
        sum = sum + g * g              (sum starts at initial_accumulator_value)
        p   = p - clr * g / (sqrt(sum) + eps)

    ``eps`` is outside the square root. Each operation rounds exactly as the torch
    implementation selected by ``foreach``/``fused`` does on this machine (see the
    module docstring), so a run with this class is bit-identical to the same run with
    ``torch.optim.Adagrad`` on the CPU in float32 and float64, after any number of
    steps, for all three implementations.

    The parameters, ``sum`` and ``step`` tensors are written in place through their
    memory; their autograd version counters are then incremented, as torch's default
    and foreach steps do, so a backward through a graph that saved a parameter before
    the step raises torch's "modified by an inplace operation" error instead of using
    the new values (torch's fused CPU kernel leaves the parameters' and sums' counters
    as they were; this class increments them with every flag set).

    Args:
        params: an iterable of tensors or of dicts defining parameter groups.
        lr (float or Tensor): learning rate (default 1e-2); read from the group at
            every step, so LR schedulers work.
        lr_decay (float): learning rate decay (default 0).
        weight_decay (float): L2 penalty added to the gradient (default 0).
        initial_accumulator_value (float): initial value of ``sum`` (default 0).
        eps (float): added to the denominator, outside the square root (default 1e-10).
        foreach (bool, optional): reproduce torch's multi-tensor implementation.
        maximize (bool): ascend instead of descend (default False).
        differentiable (bool): handed to torch's implementation (autograd through the
            step needs torch's own operations).
        fused (bool, optional): reproduce torch's fused implementation (FMAs).

    Raises:
        The same exception types as ``torch.optim.Adagrad`` for the same arguments
        (ValueError for a negative lr, ..., RuntimeError for ``fused`` with
        ``foreach``, ``differentiable``, sparse or complex tensors), and RuntimeError
        for ``weight_decay`` with sparse gradients, before anything is updated.

    Example:
        >>> import torch, fastadagrad.torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastadagrad.torch.Adagrad(model.parameters(), lr=0.1)
        >>> model(torch.ones(3, 4)).sum().backward()
        >>> opt.step()
        >>> opt.zero_grad()

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization", JMLR 12 (2011).
    """

    # torch.compile: a graph break, the step runs as it does eagerly (dynamo would trace
    # into Numba's dispatcher and fail on its first call in a process); ~0.4 us a call
    @torch.compiler.disable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Perform one optimization step; returns ``closure()``'s loss if given.

        Every param group is validated before anything is written; then each group is
        updated (torch's implementation for the tensors the kernels cannot take, then
        one compiled call per dtype for the rest).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        T.check_settings()  # (before anything is written)
        plans = self.__dict__.setdefault("_fastadagrad_plans", {})
        groups = self.param_groups
        if len(plans) > len(groups) or any(  # a group removed or replaced (a plan holds
                id(g) not in plans for g in groups):  # its group dict, so its params)
            _drop_stale_plans(plans, groups)
        shared = (self._reads_earlier_counters() if len(groups) > 1
                  and any(g["lr_decay"] != 0 for g in groups[1:]) else set())
        if any(isinstance(g["lr"], torch.Tensor) for g in groups):
            shared |= self._lr_in_updated_memory()
        runs = [None if i in shared else self._repeated(i, group, plans)
                for i, group in enumerate(groups)]
        if None in runs:
            # torch's grad mode for its steps (and for what the analysis creates): off,
            # on with differentiable=True, as torch.optim.Adagrad.step sets it. The
            # repeated steps run no torch operation that records autograd history, so
            # where every group repeats they skip the switch (two calls of ~1.3 us)
            with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
                runs = [run if run is not None else
                        self._prepare_group(i, group, plans, i in shared, tried=True)
                        for i, (group, run) in enumerate(zip(groups, runs))]
                for run in runs:
                    if run is not None:
                        run()
            return loss
        for run in runs:
            run()
        return loss

    def _repeated(self, gi: int, group: dict[str, Any], plans: dict[int, Any]
                  ) -> Callable[[], None] | None:
        """Group ``gi``'s :meth:`_repeat_step`, validated, or None where it cannot
        repeat (then :meth:`_prepare_group` takes it, and the others' runs are kept)."""
        plan = plans.get(id(group))
        if plan is None or plan[0] is not group:
            return None
        return self._repeat_step(gi, group, plan)

    # -- one param group ------------------------------------------------------------

    def _facts(self, gi: int, group: dict[str, Any]) -> tuple | None:
        """Everything besides the tensors themselves that :meth:`_prepare_group`'s
        choices depend on (None when the learning rate is not a plain number)."""
        lr, wd = group["lr"], group["weight_decay"]
        if type(lr) is not float and type(lr) is not int:
            return None
        eps, decay, maximize = group["eps"], group["lr_decay"], group["maximize"]
        # -0.0 == 0.0, but the sign of a zero lr or weight decay reaches the bits (a
        # float weight decay, the usual case, tested here without the call)
        nz = ((lr == 0 and math.copysign(1.0, lr) < 0)
              or (wd == 0.0 and math.copysign(1.0, wd) < 0)) if type(wd) is float else \
            H.negative_zero(lr, wd)
        # (with their types: 0.1 == np.float32(0.1) == tensor(0.1) and True == 1, but
        # torch's steps take each differently; lr's value is not one: a scheduler's new
        # value only needs new scalars, see _repeat_step)
        return (gi, len(group["params"]), type(lr), eps, wd, decay, maximize, type(eps),
                type(wd), type(decay), type(maximize), group["fused"], group["foreach"],
                group["differentiable"], getattr(self, "grad_scale", None) is None,
                getattr(self, "found_inf", None) is None,
                getattr(self, "_need_device_dtype_check_for_fused", True), nz)

    def _repeat_step(self, gi: int, group: dict[str, Any], plan: tuple
                     ) -> Callable[[], None] | None:
        """The last step again, if it took the all-CPU or the all-CUDA compiled path
        and nothing it decided on changed: the same hyperparameters and flags, every
        parameter with a gradient, the parameters and states as the plan describes them
        (addresses, shapes, dtypes, devices, layouts). The tensors are then checked in
        :func:`_tensorplan.prepare` (CPU) or against the device cache
        (:func:`fastadagrad._dispatch.prepared_update`, CUDA) as on every step; None
        sends the step through :meth:`_prepare_group`'s full analysis. (On the CPU the
        analysis costs ~5 us a step: most of a one-tensor model's overhead, where torch
        fused's whole step is ~25 us; on CUDA tensors it reads a dozen attributes per
        parameter to sort it to a path.)"""
        memo = plan[4]
        if memo[0] is None or memo[0] != self._facts(gi, group):
            return None
        lr = group["lr"]
        coefs = memo[3]
        if group["lr_decay"] != 0:
            if memo[2] is _ON_GPU:
                return None  # (not memoised there: the device path's full analysis)
            # the scalars of the counters' common step, read once the step's tensors
            # are checked (a step where they differ: the full analysis splits it)
            coefs = _AtCommonStep(plan[1], "fused" if memo[2] == "fused" else "vsqrt",
                                  lr, group)
        elif lr != memo[4]:  # (a zero's sign is in the facts) a scheduler's new value
            if memo[2] is _ON_GPU:
                return None  # (the device path's scalars: the full analysis)
            try:  # the kernels' scalars again, checked as the full analysis does
                memo[3] = (_NewLr.of(memo[3], lr) if memo[2] == "fused" else
                           _coefficients("vsqrt", lr, group["eps"], group["lr_decay"],
                                         group["weight_decay"], group["maximize"], 1.0,
                                         bool(group["foreach"])))
            except (TypeError, ValueError):  # a value only torch's step takes
                return None
            coefs, memo[4] = memo[3], lr
        params = group["params"]
        grads = list(map(_get_grad, params))
        present = list(map(_not_none, grads))
        if memo[5] is None:  # every parameter had a gradient at the last step
            if not all(present):
                return None
        elif present != memo[5]:  # the same parameters without one as at the last step
            return None
        else:  # (those are skipped, as torch skips them: the plan holds the others)
            params, grads = list(compress(params, present)), list(compress(grads, present))
        states = list(map(self.state.__getitem__, params))
        try:
            sums, steps = list(map(_get_sum, states)), list(map(_get_step, states))
        except KeyError:  # a state was cleared: the full analysis creates it
            return None
        if memo[2] is _ON_GPU:
            # a sparse gradient has no data pointer to compare: the analysis sorts it
            if list(map(_get_layout, grads)).count(torch.strided) != len(grads):
                return None
            run = D.prepared_update(params, grads, sums, memo[1], memo[3], 1, "ignore",
                                    plan[3])
            if run is None:
                return None
            count = T.counter(plan[1], steps)
            if count is None:  # a counter torch's step refuses or counts its own way
                return None
            return functools.partial(_run_then_count, run, count, [*params, *sums])
        # rebuild=False: a parameter or state that changed (its dtype, say, for which the
        # kernel's formula was not checked) takes the full analysis
        try:
            return T.prepare(plan[1], params, grads, sums, memo[1], memo[2], coefs,
                             steps=steps, rebuild=False)
        except (TypeError, ValueError):  # a new lr's scalars that the dtype cannot hold:
            return None  # the full analysis (torch's step, as without a scheduler)

    def _reads_earlier_counters(self) -> set[int]:
        """The param groups with ``lr_decay`` that share a step counter with an earlier
        group (a state edited by hand): torch increments it in the earlier group and
        reads it again in the later one, whose learning rate the compiled path would
        compute before either runs. Counters are compared by address, group by group
        (a counter that is a view of another, one parameter listed in two groups)."""
        # first, the addresses of all counters at once: all different (the common
        # case) is the answer (~15 us per 100 counters; the loop below ~45 us)
        ptrs = [c.data_ptr() if isinstance(c, torch.Tensor) else id(c)
                for c in (st.get("step") for st in self.state.values())]
        if len(set(ptrs)) == len(ptrs) and 0 not in ptrs:
            listed = [id(p) for g in self.param_groups for p in g["params"]]
            if len(set(listed)) == len(listed):  # (and no parameter in two groups)
                return set()
        seen: set[int] = set()
        out = set()
        for gi, group in enumerate(self.param_groups):
            mine = {_address(st["step"]) for st in map(self.state.get, group["params"])
                    if st and "step" in st}
            if group["lr_decay"] != 0 and not seen.isdisjoint(mine):
                out.add(gi)
            seen |= mine
        return out

    def _lr_in_updated_memory(self) -> set[int]:
        """The param groups whose tensor ``lr`` lies in the storage of a parameter or
        a sum of this group or an earlier one (a learnable learning rate): torch reads
        it when the group runs (and again for each parameter of its single-tensor
        step), after those updates; the compiled path would read it before."""
        written: list[tuple[int, int]] = []
        out = set()
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                st = self.state.get(p)
                for t in (p, st.get("sum") if st else None):
                    if isinstance(t, torch.Tensor) and t.layout is torch.strided:
                        written.append(_storage_span(t))
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.layout is torch.strided:
                a, b = _storage_span(lr)
                if any(a < e and s < b for s, e in written):
                    out.add(gi)
        return out

    def _prepare_group(self, gi: int, group: dict[str, Any], plans: dict[int, Any],
                       to_torch: bool = False, tried: bool = False
                       ) -> Callable[[], None] | None:
        """Validate group ``gi`` and return the function that updates it (or None);
        ``to_torch``: with torch's implementation (checked as on every route to it);
        ``tried``: :meth:`_repeat_step` returned None for it in this step."""
        plan = plans.get(id(group))
        if plan is not None and plan[0] is group and not to_torch:
            run = None if tried else self._repeat_step(gi, group, plan)
            if run is not None:
                return run
            plan[4][:] = [None]  # set again below if this step takes the same path
        params = group["params"]
        grads = list(map(_get_grad, params))
        index: Any = range(len(params))
        present = list(map(_not_none, grads))
        if not all(present):  # parameters without a gradient are skipped
            index = [k for k, g in enumerate(grads) if g is not None]
            params, grads = [params[k] for k in index], [grads[k] for k in index]
        if not params:
            return None
        fused, foreach = group["fused"], group["foreach"]
        if fused and getattr(self, "_need_device_dtype_check_for_fused", True):
            # torch checks the first parameter with a gradient, once
            _torch_optimizer._device_dtype_check_for_fused(params[0])
            self._need_device_dtype_check_for_fused = False
        states = self._states(group, params)
        sums, steps = list(map(_get_sum, states)), list(map(_get_step, states))
        layouts = list(map(_get_layout, grads))
        grads_strided = layouts.count(torch.strided) == len(layouts)
        has_sparse = not grads_strided and torch.sparse_coo in layouts
        dtypes = list(map(_get_dtype, params))
        has_complex = any(d.is_complex for d in set(dtypes))
        if fused and (has_sparse or has_complex):  # (torch's first refusal: _fused_adagrad)
            raise RuntimeError("`fused` does not support sparse grad or complex param")
        if has_sparse and group["weight_decay"] != 0:  # (then its per-parameter one)
            raise RuntimeError("weight_decay option is not compatible with sparse "
                               "gradients")
        all_cpu = all(map(_is_cpu, params))
        if fused is None and foreach is None:  # torch's default choice, per group:
            # never foreach when a parameter is on the CPU (the common case, decided here
            # without torch's per-tensor checks)
            foreach = False if all_cpu else _torch_adagrad._default_to_fused_or_foreach(
                params, group["differentiable"], use_fused=False)[1]
        fused, foreach = bool(fused), bool(foreach)
        labels = _GroupLabels(gi, index)

        def torch_update(idx: list[int]) -> Callable[[], None]:
            sub = (([params[i] for i in idx], [grads[i] for i in idx],
                    [sums[i] for i in idx], [steps[i] for i in idx]))
            for i in idx:  # every path to torch's implementation: a crash otherwise
                _refuse_short(params[i], grads[i], sums[i], labels[i], steps[i])
            if fused:  # its CPU kernel walks each tensor as flat memory: refuse what
                for i in idx:  # that would take out of a tensor's elements
                    why = _fused_unsafe(params[i], grads[i], sums[i], labels[i])
                    if why:
                        raise RuntimeError(
                            f"{why}: torch's fused CPU kernel (fused=True) reads and "
                            "writes each tensor as flat memory, so it would touch memory "
                            "outside its elements or pair the wrong elements; nothing was "
                            "updated (fused=False takes it)")
            sparse = has_sparse and any(g.is_sparse for g in sub[1])
            cplx = has_complex and any(map(torch.is_complex, sub[0]))
            return functools.partial(
                _torch_step, *sub, lr=group["lr"],
                weight_decay=group["weight_decay"], lr_decay=group["lr_decay"],
                eps=group["eps"], has_sparse_grad=sparse, foreach=foreach,
                maximize=group["maximize"], differentiable=group["differentiable"],
                has_complex=cplx, fused=fused, grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None))

        lr = group["lr"]
        if (to_torch or group["differentiable"] or getattr(self, "grad_scale", None)
                is not None or getattr(self, "found_inf", None) is not None
                or not all(map(_plain, (group["eps"], group["weight_decay"],
                                        group["lr_decay"])))
                or not (_plain(lr) or isinstance(lr, torch.Tensor))):
            return torch_update(list(range(len(params))))

        formula = "fused" if fused else "vsqrt"  # the formula each tensor is checked for
        plan = plans.get(id(group))
        if plan is None or plan[0] is not group:
            # load_state_dict replaces the group dicts: drop the plans of old ones
            _drop_stale_plans(plans, self.param_groups)
            # (group, plan of the whole group, plan of its CPU tensors in a mixed group,
            # plan of its CUDA tensors, memo of the last all-CPU step for _repeat_step)
            plan = plans[id(group)] = (group, T.TensorPlan(), T.TensorPlan(), Plan(),
                                       [None])
        tplan = plan[1]

        fast = None
        if not has_sparse and all_cpu:
            memo = plan[4]
            fast = self._prepare_cpu(tplan, params, grads, sums, steps, labels, formula,
                                     group, dtypes,
                                     memo)
            if fast is not None:
                if len(memo) > 1:  # the next step may skip the decisions above
                    memo[0] = self._facts(gi, group)
                    # which parameters had a gradient (None: all of them)
                    memo[5:] = [None if isinstance(index, range) else present]
                return fast
        # a mix: sort every tensor to the path that can take it. With lr_decay, a step
        # counter shared by two parameters (one listed twice) is incremented between
        # their updates by torch, which the paths below (clr read when validating)
        # would not see: torch's implementation for the whole group
        if group["lr_decay"] != 0 and len({_address(s) for s in steps}) != len(steps):
            return torch_update(list(range(len(params))))
        cpu, cuda, slow, sparse = [], [], [], []
        sparse_runs: list[Callable[[], None]] = []
        for i, (p, g, h) in enumerate(zip(params, grads, sums)):
            if (p.is_cuda and g.is_cuda and h.is_cuda and not g.is_sparse
                    and p.dtype in T.NP_DTYPES and g.dtype == h.dtype == p.dtype
                    and g.shape == h.shape == p.shape and p.is_contiguous()
                    and g.is_contiguous() and h.is_contiguous()
                    and T.counter_ok(steps[i])):  # (counted after the update: others
                # are torch's, which refuses or counts them before writing)
                _refuse_short(p, g, h, labels[i])  # (the kernels' tables: analysis only)
                cuda.append(i)
            elif T.eligible(p, g, h) and _formula_ok(formula, p.dtype):
                cpu.append(i)
            elif g.is_sparse and not fused and self._sparse_run(
                    p, g, h, steps[i], group, sparse_runs, _GroupLabels(gi, [index[i]])[0]):
                sparse.append(i)  # validated; runs with the others
            else:  # (checked in torch_update, as every tensor handed to torch)
                slow.append(i)
        if ((len(cpu) > 0) + (len(sparse) > 0) + (len(slow) > 0) > 1
                and _paths_share_memory((cpu, sparse, slow), (params, grads, sums))):
            # the paths run one after the other, not in torch's order of the
            # parameters, so one that writes what another reads would change the bits
            return torch_update(list(range(len(params))))
        runs = sparse_runs
        if slow:
            runs.append(torch_update(slow))
        if cpu:  # e.g. the dense layers beside a sparse embedding: cached as well
            run = self._prepare_cpu(plan[2], [params[i] for i in cpu], [grads[i] for i in cpu],
                                    [sums[i] for i in cpu], [steps[i] for i in cpu],
                                    _GroupLabels(gi, [index[i] for i in cpu]), formula,
                                    group, [dtypes[i] for i in cpu])
            runs.append(run if run is not None else torch_update(cpu))
        if cuda and not (fused or foreach):
            # torch's single-tensor step ends in addcdiv_, which its CUDA kernel contracts
            # into fma(-clr, g / std, p): a rounding the kernels do not reproduce, so the
            # bits come from torch's own implementation (foreach, the CUDA default, is
            # p + (-clr * g) / std: the kernels' formula)
            runs.append(torch_update(cuda))
        elif cuda:
            whole = len(cuda) == len(params) and isinstance(index, range)
            try:
                runs.append(self._prepare_cuda([params[i] for i in cuda],
                                               [grads[i] for i in cuda],
                                               [sums[i] for i in cuda],
                                               [steps[i] for i in cuda],
                                               _GroupLabels(gi, [index[i] for i in cuda]),
                                               fused, group, plan[3],
                                               plan[4] if whole else None))
            except (TypeError, ValueError):  # a hyperparameter the kernels do not take
                runs.append(torch_update(cuda))
            if len(plan[4]) > 1:  # the next step may skip the decisions above
                plan[4][0] = self._facts(gi, group)
                plan[4][5:] = [None]  # (whole: every parameter had a gradient)

        def run_all() -> None:
            for r in runs:
                r()

        return run_all

    def _sparse_run(self, p: Any, g: Any, h: Any, step: Any, group: dict[str, Any],
                    runs: list[Callable[[], None]], lab: D.Labels) -> bool:
        """Append the compiled step of a parameter with a sparse gradient to ``runs``
        (validated now: see :func:`_tensorplan.prepare_sparse`); False if torch's
        implementation should take it (nothing was written either way). A gradient
        with an index outside the parameter raises IndexError, naming it."""
        _refuse_bad_indices(g, lab)
        lr = group["lr"]
        if (isinstance(lr, torch.Tensor) or p.dtype not in _VSQRT
                or not _formula_ok("sparse", p.dtype)):
            return False
        if not T.steps_ok(step):  # (one in its storage: torch's path refuses others)
            return False
        # torch: step_t += 1 (in the counter's dtype: a float32 one stops at 2^24);
        # clr = lr / (1 + (step - 1) * lr_decay), in Python floats
        neg_clr = _neg_clr(lr, group["lr_decay"], float(step + 1))
        if p.dtype == torch.float32 and (_beyond_f32(neg_clr) or _beyond_f32(group["eps"])):
            return False  # torch refuses a finite value float32 cannot hold
        run = T.prepare_sparse(p, g, h, neg_clr, group["eps"], group["maximize"],
                               _VSQRT[p.dtype], _emulation(p.dtype))
        if run is None:
            return False
        runs.append(functools.partial(_count_then, step, run))
        return True

    def _states(self, group: dict[str, Any], params: list[Any]) -> list[dict[str, Any]]:
        """Each parameter's state, created as torch's ``_init_group`` does if missing."""
        state = self.state
        states = [state[p] for p in params]
        if not all(states):
            fused = group["fused"]
            init = self.defaults["initial_accumulator_value"]
            for p, st in zip(params, states):
                if len(st) == 0:
                    if fused:
                        _torch_optimizer._device_dtype_check_for_fused(p)
                    st["step"] = (
                        torch.zeros((), dtype=_torch_optimizer._get_scalar_dtype(
                            is_fused=fused), device=p.device)
                        if fused else torch.tensor(
                            0.0, dtype=_torch_optimizer._get_scalar_dtype()))
                    value = complex(init, init) if torch.is_complex(p) else init
                    st["sum"] = torch.full_like(p, value,
                                                memory_format=torch.preserve_format)
        return states

    def _prepare_cpu(self, plan: T.TensorPlan, params: list[Any], grads: list[Any],
                     sums: list[Any], steps: list[Any], labels: Any, formula: str,
                     group: dict[str, Any], dtypes: list[Any], memo: list[Any] | None = None
                     ) -> Callable[[], None] | None:
        """The compiled CPU step for these tensors, validated; None if it cannot run.

        The caller checked in this call that the parameters are CPU tensors and read
        their dtypes (``dtypes``). ``memo``: filled with what the next step's
        :meth:`_repeat_step` reuses, when the step's scalars do not depend on the step.
        """
        if not all(d in T.NP_DTYPES and _formula_ok(formula, d) for d in set(dtypes)):
            return None
        kernels = _eager_kernels() if formula == "vsqrt" else formula
        lr, lr_decay = group["lr"], group["lr_decay"]
        args = (group["eps"], lr_decay, group["weight_decay"], group["maximize"])
        if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
            return None  # torch reads it on the device; leave that to torch
        foreach = bool(group["foreach"])  # (None on CPU tensors: the single-tensor step)
        if foreach and isinstance(lr, torch.Tensor) and any(
                p.dim() == 0 and torch.promote_types(p.dtype, lr.dtype) != p.dtype
                for p in params):
            # torch's _foreach_mul(grads, -clr) multiplies two 0-dim tensors there: type
            # promotion computes g * -clr in the lr's wider dtype, rounded once (the
            # kernels round -clr to the parameter's dtype first): torch's step
            return None
        try:
            if lr_decay == 0:  # clr does not depend on the step
                coefs = _coefficients(formula, lr, args[0], *args[1:], 1.0, foreach)
                run = T.prepare(plan, params, grads, sums, labels, kernels, coefs,
                                steps=steps)
                if run is not None and memo is not None:
                    memo[1:] = [labels, kernels, coefs, lr]
                return run
            # clr depends on each parameter's step: the steps after this increment, in
            # the counters' dtype; each counter once (one shared by two parameters is
            # incremented twice by torch, between their updates: torch's path)
            # (each one-element, in its storage: read with the counters' cached key,
            # whatever ranges a stale plan describes)
            if (not T.counters_ok(plan, steps, cpu_only=True)
                    or len(set(map(T._ptr, steps))) != len(steps)):
                return None
            by_step: dict[float, list[int]] = {}
            for i, s in enumerate(steps):
                by_step.setdefault(float(s + 1), []).append(i)
            runs = []
            for step, idx in by_step.items():
                coefs = _coefficients(formula, lr, args[0], *args[1:], step, foreach)
                sub_plan = plan if len(by_step) == 1 else T.TensorPlan()
                # (every counter checked against these tensors: none may lie inside
                # one, which torch's step would update between two increments)
                run = T.prepare(sub_plan, [params[i] for i in idx], [grads[i] for i in idx],
                                [sums[i] for i in idx], labels if len(by_step) == 1 else
                                _SubLabels(labels, idx), kernels, coefs, steps=steps,
                                count=False)
                if run is None:
                    return None
                runs.append(run)
            if len(by_step) == 1 and memo is not None:  # one step for all: repeatable
                memo[1:] = [labels, kernels, None, lr]  # (_AtCommonStep's scalars)
            return functools.partial(_increment_then, steps, runs)
        except (TypeError, ValueError):  # a hyperparameter the kernels do not take
            return None

    def _prepare_cuda(self, params: list[Any], grads: list[Any], sums: list[Any],
                      steps: list[Any], labels: Any, fused: bool,
                      group: dict[str, Any], plan: Plan, memo: list[Any] | None = None
                      ) -> Callable[[], None]:
        """fastadagrad's GPU kernels on CUDA tensors, validated when they run.

        ``plan`` is kept across steps for this group: its GPU cache holds the validated
        description and the device tables, so a step whose tensors (parameters, sums and
        gradients) are unchanged validates nothing again (one launch per dtype).
        ``memo`` (these are all of the group's tensors): filled with what the next
        step's :meth:`_repeat_step` reuses, when the step's scalars do not depend on the
        step.
        """
        lr_decay = group["lr_decay"]
        args = (float(group["lr"]), group["eps"], lr_decay, group["weight_decay"],
                group["maximize"], fused)
        # -0.0 == 0.0 and hashes alike: the cache would give a zero lr the other sign
        hyper = (_cuda_hyper.__wrapped__ if H.negative_zero(args[0], args[3])
                 else _cuda_hyper)(*args)
        if memo is not None and not lr_decay:
            memo[1:] = [labels, _ON_GPU, hyper, args[0]]

        def run() -> None:
            if not lr_decay:  # one learning rate for every parameter
                D.update(params, grads, sums, labels, hyper, 1, "ignore", plan)
            else:
                by_step: dict[int, list[int]] = {}
                for i, s in enumerate(steps):  # the step after this one's increment
                    by_step.setdefault(int(s) + 1, []).append(i)
                if len(by_step) > 1:  # every subset, and one against another, checked
                    # before the first launch (the largest learning rate: the first step)
                    D.validate(params, grads, sums, labels, hyper, min(by_step))
                for step, idx in by_step.items():
                    sub = len(by_step) == 1
                    D.update(params if sub else [params[i] for i in idx],
                             grads if sub else [grads[i] for i in idx],
                             sums if sub else [sums[i] for i in idx],
                             labels if sub else [labels[i] for i in idx], hyper, step,
                             "ignore", plan if sub else None)
            increment_version([*params, *sums])  # written through their addresses
            # a tensor scalar: ~40 us per 100 steps where a Python 1 took ~200 us (H200
            # host, cProfile); the same integers
            torch._foreach_add_(steps, _ONE, alpha=1.0)

        return run


@functools.lru_cache(maxsize=64)
def _cuda_hyper(lr: float, eps: float, lr_decay: float, weight_decay: float,
                maximize: bool, fused: bool) -> H.Hyper:
    """One Hyper object per set of group hyperparameters: the GPU path keeps a step's
    packed launch arguments while the same object comes back."""
    return H.Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                        maximize=maximize, rule=_FUSED_RULE if fused else _EAGER_RULE)


class _SubLabels:
    __slots__ = ("labels", "idx")

    def __init__(self, labels: Any, idx: list[int]) -> None:
        self.labels, self.idx = labels, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, i: int) -> Any:
        return self.labels[self.idx[i]]


def _paths_share_memory(paths: tuple[list[int], ...], tensors: tuple[list[Any], ...]
                        ) -> bool:
    """Whether a tensor of one path (lists of parameter indices) shares memory with a
    tensor of another, one of them written (parameters and sums are written, gradients
    read). A contiguous tensor's own bytes (disjoint views of one flat buffer do not
    overlap), another's whole storage (conservative)."""
    ranges = []
    for side, idx in enumerate(paths):
        for i in idx:
            for role, t in enumerate(x[i] for x in tensors):
                if t.layout is torch.sparse_coo:
                    parts = (t._values(), t._indices())
                elif t.layout is torch.strided:
                    parts = (t,)
                else:  # another layout: its buffers are not read here
                    return True
                for x in parts:
                    if x.numel() and x.data_ptr():
                        if x.is_contiguous():
                            a, n = x.data_ptr(), x.numel() * x.element_size()
                        else:
                            st = x.untyped_storage()
                            a, n = st.data_ptr(), st.nbytes()
                        ranges.append((a, a + n, side, role != 1, None))
    return D.cross_overlap(ranges) is not None


def _refuse_short(p: Any, g: Any, h: Any, lab: Any, step: Any = None) -> None:
    """Raise, naming it, if a strided tensor of (param, grad, sum, step counter)
    reaches beyond its storage (freed or shrunk in place): torch's own steps, and the
    GPU kernels, would read and write past it (a crash, or an illegal address that ends
    the CUDA context)."""
    for x, what in ((p, lab.param), (g, lab.grad), (h, lab.state), (step, None)):
        short = (isinstance(x, torch.Tensor) and x.layout is torch.strided
                 and T.storage_short(x))
        if short:
            if what is None:  # the counter beside the sum
                what = (lab.state[:-len("['sum']")] + "['step']"
                        if lab.state.endswith("['sum']") else f"the step of {lab.param}")
            raise RuntimeError(f"{what} {short}; nothing was updated")
    _refuse_bad_indices(g, lab)


def _storage_span(t: Any) -> tuple[int, int]:
    """The byte range of tensor ``t``'s whole storage."""
    st = t.untyped_storage()
    return st.data_ptr(), st.data_ptr() + st.nbytes()


def _refuse_bad_indices(g: Any, lab: Any) -> None:
    """Raise IndexError, naming it, if sparse gradient ``g`` has an index outside its
    shape (torch's ``coalesce()``, in its step and in the compiled path's, would write
    out of bounds for a negative one); RuntimeError if its indices or values reach
    beyond their storage (freed or shrunk)."""
    if g.layout is torch.sparse_coo:
        for part, name in ((g._indices(), "indices"), (g._values(), "values")):
            short = T.storage_short(part)  # (freed: read as NumPy arrays, then by torch)
            if short:
                raise RuntimeError(f"the {name} tensor of {lab.grad} {short}; nothing "
                                   "was updated")
        bad = T.sparse_index_error(g)
        if bad:
            raise IndexError(f"{lab.grad} {bad}; nothing was updated")


def _fused_unsafe(p: Any, g: Any, h: Any, lab: Any) -> str | None:
    """What in (param, grad, sum) torch's fused CPU kernel would mishandle, or None.

    ``_fused_adagrad_`` on the CPU (torch 2.13) takes each tensor as ``numel`` elements
    from its data pointer, whatever its strides, sizes or dtype: a parameter with gaps
    (``buf[::2]``) has the elements between its own written, an expanded gradient is
    read past its storage, a sum smaller than its parameter is written past its end
    (heap corruption), tensors laid out in different orders are paired by memory offset.
    Contiguous tensors of as many elements in other shapes pass (a flat update in
    order: torch's outcome), as do tensors on other devices and sparse or complex ones
    (refused by torch)."""
    if not (p.is_cpu and p.layout is torch.strided and g.layout is torch.strided
            and h.layout is torch.strided) or p.is_complex():
        return None
    for x, what in ((g, lab.grad), (h, lab.state)):
        if x.numel() != p.numel() or x.dtype != p.dtype:
            return (f"{what} has shape {tuple(x.shape)} and dtype {x.dtype} but "
                    f"{lab.param} has shape {tuple(p.shape)} and dtype {p.dtype}")
    for x, what in ((p, lab.param), (g, lab.grad), (h, lab.state)):
        if not x.is_contiguous() and T.dense_strides(x) is None:
            return f"{what} is neither contiguous nor dense (its elements leave gaps or overlap)"
    if p.is_contiguous() and g.is_contiguous() and h.is_contiguous():
        return None  # (other shapes of as many elements: torch's flat update, in order)
    if not (g.shape == h.shape == p.shape and T.dense_key(p) == T.dense_key(g)
            == T.dense_key(h)):
        return (f"{lab.param}, its grad and its sum have different strides "
                f"({p.stride()}, {g.stride()}, {h.stride()})")
    return None


def _drop_stale_plans(plans: dict[int, Any], groups: list[dict[str, Any]]) -> None:
    """Drop the plans of param groups no longer in ``groups`` (removed, or replaced by
    ``load_state_dict``): each holds its group dict, and so its parameters, alive."""
    live = {id(g) for g in groups}
    for k in [k for k in plans if k not in live]:
        del plans[k]


def _address(t: Any) -> int:
    """A tensor's data address (its id where it has none, or for other objects)."""
    if isinstance(t, torch.Tensor) and t.layout is torch.strided and t.data_ptr():
        return t.data_ptr()
    return id(t)


def _count_then(step: Any, run: Callable[[], None]) -> None:
    step.add_(1)  # torch's step_t += 1, before the update
    run()


def _run_then_count(run: Callable[[], Any], count: Callable[[], None],
                    written: list[Any]) -> None:
    run()  # the GPU path's order (its learning rate does not depend on the step)
    increment_version(written)
    count()  # torch's step_t += 1: one compiled call for CPU counters (foreach=True)


def _increment_then(steps: list[Any], runs: list[Callable[[], None]]) -> None:
    # torch counts the step before it updates. A CPU tensor as the scalar: 38 us for 100
    # steps where a Python 1 takes 151 us (wrapped into a tensor per step; torch's own
    # multi-tensor path does the same); bit-identical (integers + 1.0).
    torch._foreach_add_(steps, _ONE, alpha=1.0)
    for run in runs:
        run()
