"""The public API: the functional update and the drop-in ``AdaGrad`` class."""

from __future__ import annotations

import functools
import inspect
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import _dispatch as D
from . import _half_dispatch as _half
from . import config
from ._hyper import (
    NONFINITE_MODES,
    Hyper,
    NonFinite,
    Rule,
    check_hyper,
    check_in_dtype,
    check_nonfinite,
    check_step,
    negative_zero,
)
from ._rounding import is_half
from .flat import FlatBuffer, layout_of
from .presets import get_preset

_ZERO = 0.0  # the default of lr_decay and weight_decay (the fast path tests identity)


def adagrad_update(param: Any, grad: Any, state_sum: Any, *, lr: float = 0.01,
                   eps: float = 1e-7, **options: Any) -> bool:
    # The signature and docstring shown by help() and inspect are those of
    # _adagrad_update below (``__signature__``, ``__doc__``). The options travel as
    # **options so that the common call (lr and eps only) is recognised by one test
    # (13 keyword-only parameters with defaults cost ~0.1 us per call to fill in, and
    # their identity tests ~0.1 us more); with the last (lr, eps, dtype) seen, the
    # compiled checked kernel is called straight away: 2^10 f32, 1.47 -> 1.01 us
    # against 0.70 us for the bare kernel (2-core AMD EPYC, interleaved; `make bench`:
    # 1.43x, bench/results/cpu.md).
    # A new float lr (a schedule) with that eps takes the same call: the kernel takes
    # the learning rate as an argument (checked here as check_hyper would, and below
    # float32's overflow threshold for float32: last[8]); 5.8 -> ~1 us a call.
    last = _LAST
    if (not options and eps is last[1] and type(param) is _ND and param.dtype is last[2]
            and type(grad) is _ND and type(state_sum) is _ND
            and (lr is last[0] or (type(lr) is float and 0.0 <= lr < last[8]))):
        try:
            code = last[3](param, grad, state_sum, last[4], lr, config.PARALLEL_THRESHOLD)
        except Exception:  # Numba cannot type an argument: the full path says why
            code = 1
        if code == 0:
            return True
        if code == 4:  # checked; large enough for all threads
            D.run_parallel_checked(param, grad, state_sum, last[5],
                                   last[4] if lr is last[0] else D.table_at(last[3:], lr))
            return True
    elif options and not options.keys() <= _OPTIONS:
        bad = min(options.keys() - _OPTIONS)
        raise TypeError(f"adagrad_update() got an unexpected keyword argument {bad!r}")
    return _adagrad_update(param, grad, state_sum, lr=lr, eps=eps, **options)


def _adagrad_update(param: Any, grad: Any, state_sum: Any, *, lr: float = 0.01,
                    eps: float = 1e-7, lr_decay: float = _ZERO, weight_decay: float = _ZERO,
                    maximize: bool = False, step: int = 1,
                    grad_scale: float | None = None, nonfinite: NonFinite = "ignore",
                    rule: Rule | None = None, rounding: str = "nearest",
                    seed: int | None = None, master: Any = None) -> bool:
    """One fused AdaGrad step, in place, in a single pass over memory.

    With the default rule (the NumPy class the project started from)::

        h <- h + g * g
        p <- p - lr * g / (sqrt(h) + eps)

    where ``p`` is ``param``, ``g`` is ``grad`` and ``h`` is ``state_sum``, the running
    sum of squared gradients (start it at zeros, or at ``initial_accumulator_value``).
    ``eps`` sits outside the square root. Each operation rounds once in the array dtype,
    exactly as NumPy evaluates ``(lr*g) / (sqrt(h) + eps)``: results are bit-identical.

    Args:
        param, grad, state_sum: C-contiguous arrays of one shape and dtype (float32 or
            float64); N-d arrays are processed as flat. NumPy arrays run on the CPU,
            CUDA arrays (Numba, CuPy, torch) on the GPU. ``param`` and ``state_sum``
            are updated in place.
        lr: learning rate (>= 0). eps: added to the denominator (>= 0).
        lr_decay: ``clr = lr / (1 + (step - 1) * lr_decay)`` (torch's rule).
        weight_decay: L2 coefficient; coupled (``g += wd*p``) or decoupled
            (``p -= lr*wd*p``) as ``rule.weight_decay_mode`` says.
        maximize: ascend instead of descend (``g = -g``).
        step: the step number, counted from 1 (``lr_decay`` uses it, and stochastic
            rounding's random stream).
        grad_scale: divide the gradient by this inside the same pass (loss scaling).
        nonfinite: ``"ignore"`` (default: no check, like every framework), ``"skip"``
            (if any gradient is NaN/inf, change nothing and return False) or
            ``"raise"`` (change nothing, raise FloatingPointError).
        rule: formula choices (eps placement, FMA, ...); see :mod:`fastadagrad.presets`.
        rounding, seed, master: for bfloat16 (``ml_dtypes.bfloat16``) or float16
            ``param``/``grad`` with a float32 ``state_sum``: the update runs in float32
            and ``param`` is written back rounded, ``"nearest"`` (even) or
            ``"stochastic"`` (random bits from ``(seed, step, element)``: pass a new
            ``step`` at every call). ``master``: an optional float32 copy of ``param``
            that the update starts from and keeps; ``param`` is then its rounding.

    Returns:
        True if the step was applied; False only when ``nonfinite="skip"`` skipped it.

    Raises:
        TypeError / ValueError naming the offending array, before anything is written.

    Example:
        >>> import numpy as np, fastadagrad
        >>> p, g, h = np.ones(4, np.float32), np.full(4, 0.5, np.float32), np.zeros(4, np.float32)
        >>> fastadagrad.adagrad_update(p, g, h, lr=0.1)
        True
        >>> p  # 1 - 0.1 * 0.5 / (0.5 + 1e-7), each step rounded to float32
        array([0.90000004, 0.90000004, 0.90000004, 0.90000004], dtype=float32)

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization", JMLR 12 (2011).
    """
    global _LAST
    if (type(param) is np.ndarray and nonfinite == "ignore" and type(step) is int
            and step >= 1 and rounding == "nearest" and seed is None and master is None):
        # small float arrays: checked and applied in one compiled call
        plain = (lr_decay is _ZERO and weight_decay is _ZERO and maximize is False
                 and grad_scale is None and rule is None and type(lr) is float
                 and type(eps) is float and (lr or math.copysign(1.0, lr) > 0))
        if plain:  # the common call: ~0.1 us less than the lru
            fast = _PLAIN.get((lr, eps))  # floats here: a bool or an int never looks up
            if fast is None:
                fast = _plain_fast(lr, eps)
        elif negative_zero(lr, weight_decay):  # the caches would take it for +0.0
            fast = None
        else:
            try:
                fast = _cached_fast(lr, eps, lr_decay, weight_decay, maximize, grad_scale,
                                    rule, step if lr_decay else 1)
            except (TypeError, ValueError):  # unhashable or invalid: the full path says
                fast = None
        if fast is not None:
            dt = param.dtype
            # (by identity first: an equal dtype object, from pickle, is compared)
            i = (0 if dt is _F32 else 1 if dt is _F64 else 0 if dt == _F32
                 else 1 if dt == _F64 else 2)
            f = fast[i]
            if f is _TODO:  # first use of these hyperparameters with this dtype
                f = fast[i] = _fast_for(fast[3], dt, fast[4])
            if f is not None and D.update_one_fast(param, grad, state_sum, f):
                if plain:  # remembered for adagrad_update's first test
                    _LAST = (lr, eps, dt, *f)
                return True
    try:  # validated once per distinct set of hyperparameters
        if negative_zero(lr, weight_decay):
            raise TypeError  # not from the cache: -0.0 == 0.0 (the same key), other bits
        hyper = _cached_hyper(lr, eps, lr_decay, weight_decay, maximize, grad_scale, rule)
    except TypeError:  # unhashable argument: let Hyper.make name what is wrong with it
        hyper = Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                           maximize=maximize, grad_scale=grad_scale, rule=rule)
    if rounding == "nearest" and seed is None and master is None \
            and not is_half(getattr(param, "dtype", None)):
        return D.update([param], [grad], [state_sum], [D.FUNCTIONAL_LABELS], hyper,
                        check_step(step), check_nonfinite(nonfinite))
    # half precision (or its options): its own path
    return _half.update_functional(param, grad, state_sum, master, hyper, check_step(step),
                                   check_nonfinite(nonfinite), rounding, seed)


@functools.lru_cache(maxsize=256, typed=True)
def _cached_fast(lr: float, eps: float, lr_decay: float, weight_decay: float,
                 maximize: bool, grad_scale: float | None, rule: Rule | None,
                 step: int) -> list:
    """``[float32 entry, float64 entry, None, hyper, step]`` for one set of
    functional-call arguments: an entry is :func:`_dispatch.checked_kernel`'s tuple,
    filled in at its dtype's first use (``_TODO`` until then), or None where the
    coefficients do not fit the dtype (the full path then raises the error); index 2
    (any other dtype) stays None. One cache lookup per call, the dtype left out of the
    key: hashing a NumPy dtype costs ~0.12 us, hashing a Hyper ~0.4 us more."""
    hyper = _cached_hyper(lr, eps, lr_decay, weight_decay, maximize, grad_scale, rule)
    return [_TODO, _TODO, None, hyper, step]


_TODO = object()
_ND = np.ndarray
#: (lr, eps, dtype, then D.checked_kernel's tuple: checked kernel, coefficient table,
#: parallel kernel, coefficients, learning rate, learning-rate bound) of the last
#: plain call that took the fast path; the float objects themselves are
#: kept, so ``lr is _LAST[0]`` means the same value (and -0.0 is not 0.0)
_LAST: tuple = (_TODO,) * 9
_OPTIONS = frozenset(("lr_decay", "weight_decay", "maximize", "step", "grad_scale",
                      "nonfinite", "rule", "rounding", "seed", "master"))
adagrad_update.__doc__ = _adagrad_update.__doc__
adagrad_update.__signature__ = inspect.signature(_adagrad_update)  # type: ignore[attr-defined]
_PLAIN: dict[tuple[float, float], list] = {}


def _plain_fast(lr: float, eps: float) -> list | None:
    """:func:`_cached_fast` for float ``lr`` and ``eps`` and every other argument at its
    default, kept in ``_PLAIN`` (at most 256 pairs, then started again). A new ``lr``
    with an ``eps`` seen before (a learning-rate schedule) is made from the last entry
    of that ``eps``: :meth:`Hyper.with_lr` and the lr entries of its scalars only
    (18 -> a few us a call)."""
    key = (eps, math.copysign(1.0, eps))
    last = _PLAIN_LAST.get(key)
    try:
        if last is None:
            fast = _cached_fast(lr, eps, _ZERO, _ZERO, False, None, None, 1)
        else:
            hyper = last[3].with_lr(check_hyper("lr", lr))
            fast = [_relr_entry(last[0], hyper, _F32), _relr_entry(last[1], hyper, _F64),
                    None, hyper, 1]
    except (TypeError, ValueError):
        return None
    if len(_PLAIN) >= 256:
        _PLAIN.clear()
    if len(_PLAIN_LAST) >= 64:  # (an eps of its own at every call: bounded too)
        _PLAIN_LAST.clear()
    _PLAIN[(lr, eps)] = _PLAIN_LAST[key] = fast
    return fast


def _relr_entry(entry: Any, hyper: Hyper, dtype: np.dtype) -> Any:
    """A :func:`_cached_fast` entry for ``hyper`` from ``entry``, made for a Hyper of
    its family for ``dtype`` (see :func:`_dispatch.checked_kernel_relr`)."""
    if entry is _TODO or entry is None:  # not made yet, or lr did not fit the dtype
        return _TODO
    try:
        return D.checked_kernel_relr(entry, hyper, dtype, 1)
    except ValueError:  # this lr overflows float32: the full path says so
        return None


_PLAIN_LAST: dict[tuple[float, float], list] = {}  # (eps, its sign) -> newest entry
_F32, _F64 = np.dtype(np.float32), np.dtype(np.float64)


def _fast_for(hyper: Hyper, dtype: np.dtype, step: int) -> tuple | None:
    try:
        return D.checked_kernel(hyper, dtype, step)
    except ValueError:  # e.g. lr overflows float32
        return None


_FLAT_LABELS = [D.Labels("params (flat buffer)", "grads (flat buffer)",
                         "state (flat buffer)")]


@functools.lru_cache(maxsize=256, typed=True)
def _cached_hyper(lr: float, eps: float, lr_decay: float, weight_decay: float,
                  maximize: bool, grad_scale: float | None, rule: Rule | None) -> Hyper:
    return Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                      maximize=maximize, grad_scale=grad_scale, rule=rule)


class AdaGrad:
    """Drop-in, compiled replacement for the NumPy ``AdaGrad`` class.

    ``opt = AdaGrad(lr=0.01); opt.update(params, grads)`` updates every array of
    ``params`` in place (their identity is kept, so layers holding them see the new
    values) with the rule of :func:`adagrad_update`::

        h <- h + g * g                          (h starts at initial_accumulator_value)
        p <- p - lr * g / (sqrt(h) + eps)

    ``params``/``grads``: dicts (any hashable keys, the same keys in both) or
    lists/tuples of arrays, or :class:`FlatBuffer` objects. The whole model goes
    through one compiled call per dtype per step (16-bit params: one per array, each
    checked at every step); params and grads held in flat buffers of one layout take a
    single call over one buffer.

    bfloat16 (``ml_dtypes.bfloat16``) and float16 params get float32 accumulators;
    each step runs in float32 and writes the params back rounded: ``rounding=
    "nearest"`` (even) or ``"stochastic"`` (random bits from ``(seed, step, tensor
    position, element)``: reproducible, independent of the thread count).
    ``master_weights=True`` keeps a float32 copy of each 16-bit param (:attr:`master`)
    that the update starts from; the param is its rounding. Both travel in
    ``state_dict`` and checkpoints.

    ``capturable=True`` (CUDA arrays only: host arrays raise TypeError) keeps the step
    count, the learning rate (with ``lr_decay``) and the non-finite flag in device
    memory, so that ``torch.cuda.graph`` can capture ``update`` and replays give the
    same bits as eager steps. ``update`` then returns True once the step is queued (with
    ``nonfinite="skip"`` the device decides, with no host round trip), and ``step`` /
    ``skipped_steps`` are read back by :meth:`sync_steps` (which waits for the GPU;
    ``state_dict``, ``save`` and pickling call it). A numeric ``lr`` only, and
    ``nonfinite`` "ignore" or "skip". Without it, ``nonfinite="skip"`` on the GPU still
    decides on the device but ``update`` reads 16 bytes back to return the bool (a
    wait for the stream); ``"raise"`` always waits.

    Attributes:
        h: the accumulators, in the same container type as ``params`` (views into one
            flat buffer per dtype), ``None`` before the first update.
        step: number of steps applied. skipped_steps: steps skipped by
            ``nonfinite="skip"``.

    Example:
        >>> import numpy as np, fastadagrad
        >>> params = {"W": np.ones((2, 2), np.float32)}
        >>> opt = fastadagrad.AdaGrad(lr=0.1)
        >>> opt.update(params, {"W": np.full((2, 2), 0.5, np.float32)})
        True
        >>> params["W"][0, 0]  # the float32 rounding of 1 - 0.1 * 0.5 / (0.5 + 1e-7)
        np.float32(0.90000004)

    Reference: Duchi, Hazan & Singer, JMLR 12 (2011).
    """

    def __init__(self, lr: float | Callable[[int], float] = 0.01, eps: float = 1e-7, *,
                 lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, maximize: bool = False,
                 nonfinite: NonFinite = "ignore", rule: Rule | None = None,
                 capturable: bool = False, rounding: str = "nearest", seed: int = 0,
                 master_weights: bool = False) -> None:
        self._schedule: Callable[[int], float] | None = lr if callable(lr) else None
        self.hyper = Hyper.make(lr=0.0 if callable(lr) else lr, eps=eps, lr_decay=lr_decay,
                                weight_decay=weight_decay, maximize=maximize, rule=rule)
        self.initial_accumulator_value = check_hyper("initial_accumulator_value",
                                                     initial_accumulator_value)
        self.nonfinite: NonFinite = check_nonfinite(nonfinite)
        # capturable (GPU only): step, lr and the skip flag live in device memory, so a
        # CUDA graph can capture update(); see fastadagrad.cuda.update
        if not isinstance(capturable, (bool, np.bool_)):
            raise TypeError(f"capturable must be a bool, got {type(capturable).__name__}")
        self.capturable = bool(capturable)
        if self.capturable and (self._schedule is not None or nonfinite == "raise"):
            raise ValueError("capturable=True takes a numeric lr (a schedule runs on the "
                             "host) and nonfinite 'ignore' or 'skip' ('raise' reads the "
                             "device back every step)")
        self.h: Any = None
        self.step = 0
        self.skipped_steps = 0
        self._flat: list[FlatBuffer] = []  # the buffers that own the state arrays
        self._plan = D.Plan()  # per-model work cached across steps
        self._keys_seen: tuple[Any, list[Any], int] | None = None
        # state loaded from a dict whose keys were not saved (keys other than str/int):
        # the first update's dict names it, by position, as torch matches unnamed state
        self._positional = False
        self._one: tuple[Any, ...] | None = None  # (hyper, step, dtype, checked kernel)
        self._scaled: tuple[Any, ...] | None = None  # (hyper, grad_scale, scaled hyper)
        # bfloat16/float16 params (see _half_dispatch): rounding, random stream, masters
        self.rounding, self.seed = _half.check_options(rounding, seed)
        if not isinstance(master_weights, (bool, np.bool_)):
            raise TypeError("master_weights must be a bool, got "
                            f"{type(master_weights).__name__}")
        self.master_weights = bool(master_weights)
        self.master: Any = None  # {key: float32 copy} of the 16-bit params, if kept
        self._half: tuple[Any, list[int]] | None = None  # (state, 16-bit positions)

    # -- copy and pickle ---------------------------------------------------------------
    # The accumulators are views into the flat buffers in ``_flat``: a default deep copy
    # or pickle would copy each view on its own, so the copy would update its buffers
    # while ``h`` (and state_dict/save) kept reading frozen copies. Record where each
    # view sits instead and rebuild the views over the copied buffers. The per-model
    # plan (cached addresses) is never carried over.

    def __getstate__(self) -> dict[str, Any]:
        self.sync_steps()
        state = self.__dict__.copy()
        state["_plan"] = None
        state["_keys_seen"] = None
        state["_one"] = None
        state["_scaled"] = None
        state["_half"] = None
        h = self.h
        if h is not None and self._flat:
            where = {id(v): (j, lk) for j, fb in enumerate(self._flat)
                     for lk, v in fb.items()}
            items = list(h.items()) if isinstance(h, Mapping) else list(enumerate(h))
            if all(id(v) in where for _, v in items):
                state["h"] = None
                state["_h_views"] = (isinstance(h, Mapping),
                                     [(k, where[id(v)]) for k, v in items])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        views = state.pop("_h_views", None)
        self.__dict__.update(state)
        self._plan = D.Plan()
        if views is not None:
            is_map, located = views
            pairs = [(k, self._flat[j][lk]) for k, (j, lk) in located]
            self.h = dict(pairs) if is_map else [v for _, v in pairs]

    @classmethod
    def from_preset(cls, name: str = "numpy", **overrides: Any) -> AdaGrad:
        """An optimizer with framework ``name``'s formula and defaults (see presets)."""
        preset = get_preset(name)
        kwargs = {**preset.defaults, **overrides}
        return cls(rule=preset.rule, **kwargs)

    # -- learning rate -----------------------------------------------------------------

    @property
    def lr(self) -> float:
        """The learning rate the next step uses (before ``lr_decay``).

        Settable between steps: a number (validated like the constructor's), or a
        schedule, a callable ``step -> lr`` called with the number of the step about to
        be applied (counted from 1; skipped steps do not count), optax-style. With a
        schedule the value is validated at every step, before anything is written.
        ``lr_decay`` is one such rule built in, ``lr / (1 + (step - 1) * lr_decay)``,
        applied on top of a schedule if both are given.
        """
        if self._schedule is None:
            return self.hyper.lr
        return self._hyper_at(self.step + 1).lr

    @lr.setter
    def lr(self, value: float | Callable[[int], float]) -> None:
        if callable(value):
            if getattr(self, "capturable", False):  # as the constructor says
                raise ValueError("capturable=True takes a numeric lr (a schedule runs on "
                                 "the host; lr_decay is applied on the device)")
            self._schedule = value
        else:
            self.hyper = self.hyper.with_lr(check_hyper("lr", value))
            self._schedule = None

    @property
    def schedule(self) -> Callable[[int], float] | None:
        """The learning-rate schedule, or None when ``lr`` is a number."""
        return self._schedule

    def _hyper_at(self, step: int) -> Hyper:
        """The hyperparameters of step ``step``: the schedule's lr, validated."""
        if self._schedule is None:
            return self.hyper
        try:
            value = self._schedule(step)
            lr = check_hyper("lr", value)
        except (TypeError, ValueError) as e:
            raise type(e)(f"the learning-rate schedule at step {step}: {e} (nothing was "
                          "updated)") from e
        if lr != self.hyper.lr or negative_zero(lr) != negative_zero(self.hyper.lr):
            self.hyper = self.hyper.with_lr(lr)  # (-0.0 == 0.0)
        return self.hyper

    def update(self, params: Any, grads: Any, *, grad_scale: float | None = None) -> bool:
        """Apply one step to every array of ``params``; returns False if it was skipped."""
        step = self.step
        if type(step) is not int or step < 0 or self.nonfinite not in NONFINITE_MODES:
            self._check_attributes()  # set by hand: refused as the constructor would
        if getattr(self, "_positional", False):
            return self._update_naming_state(params, grads, grad_scale)
        hyper = self.hyper if self._schedule is None else self._hyper_at(self.step + 1)
        if grad_scale is not None:
            scaled = self._scaled  # the last scaled Hyper: a loss scale rarely changes
            if (scaled is None or scaled[0] is not hyper or scaled[1] != grad_scale
                    or type(scaled[1]) is not type(grad_scale)):  # (True == 1.0)
                scaled = self._scaled = (hyper, grad_scale, Hyper.make(
                    lr=hyper.lr, eps=hyper.eps, lr_decay=hyper.lr_decay,
                    weight_decay=hyper.weight_decay, maximize=hyper.maximize,
                    grad_scale=grad_scale, rule=hyper.rule))
            hyper = scaled[2]
        flat_state = self._flat[0] if len(self._flat) == 1 else None
        is_dict = type(params) is dict  # not a FlatBuffer: skip the ABC isinstance checks
        if (not is_dict and self.h is not None and isinstance(params, FlatBuffer)
                and isinstance(self.h, Mapping) and params.same_layout(grads)
                and params.same_layout(flat_state) and _views_of(self.h, flat_state)):
            # The whole model in buffers of one layout, state included: one call over
            # one buffer, and no per-tensor Python work at all (a 101-tensor model
            # spent more time pairing keys than the GPU spent updating it).
            h, flat = self.h, self._flat
            plist, glist, hlist = [params.data], [grads.data], [flat_state.data]
            labels: Any = _FLAT_LABELS
        else:
            keys, plist, glist, labels = _pair_up(params, grads)
            if not plist:
                raise ValueError("params is empty: there is nothing to update")
            if self.h is None:
                h, flat = self._new_state(params, keys, plist)
            else:
                h, flat = self.h, self._flat
                seen = self._keys_seen  # the keys already matched against this state
                # (its length too: the same state edited in place, a key added or
                # deleted, is matched again)
                if seen is None or seen[0] is not h or seen[1] != keys or seen[2] != len(h):
                    _check_same_keys(h, keys, params)
                    self._keys_seen = (h, keys, len(h))
            hlist = [h[k] for k in keys] if (type(h) is dict or isinstance(h, Mapping)) \
                else list(h)
            # One layout for params, grads and state: one call over the whole buffer.
            if (not is_dict and isinstance(params, FlatBuffer) and len(flat) == 1 and
                    params.same_layout(grads) and params.same_layout(flat[0])
                    and _views_of(h, flat[0])):
                plist, glist, hlist = [params.data], [grads.data], [flat[0].data]
                labels = _FLAT_LABELS
        half = self._half[1] if self._half is not None and self._half[0] is h else [
            i for i, p in enumerate(plist) if is_half(getattr(p, "dtype", None))]
        if getattr(self, "capturable", False) and plist and not D.is_cuda_array(plist[0]):
            raise TypeError(f"capturable=True takes CUDA arrays, but {labels[0].param} is "
                            f"in host memory ({type(plist[0]).__name__}); nothing was "
                            "updated")
        if getattr(self, "capturable", False) and self._plan.gpu is None:
            from . import cuda as _cuda

            self._plan.gpu = _cuda.GpuCache(capturable=True, skipped=self.skipped_steps)
        try:
            if half:  # 16-bit params: their own path (float32 state, rounding, masters)
                return self._update_half(plist, glist, hlist, labels, hyper, h, flat,
                                         keys, half)
            if len(plist) == 1 and self.nonfinite == "ignore" and \
                    self._update_one(plist[0], glist[0], hlist[0], hyper):
                applied = True  # one small array: checked and applied in one call
            else:
                applied = D.update(plist, glist, hlist, labels, hyper, self.step + 1,
                                   self.nonfinite, self._plan)
        except FloatingPointError:
            if plist and plist[0] is getattr(params, "data", None):
                _raise_nonfinite_key(grads, hyper)  # one flat call: name the tensor
            raise
        except TypeError:
            cached = self._half
            if cached is None or cached[0] is not h or cached[1] == [
                    i for i, p in enumerate(plist) if is_half(getattr(p, "dtype", None))]:
                raise
            # a param changed between float32/64 and 16 bits since the list of 16-bit
            # params was cached: nothing was written (every check comes before the first
            # write); the step again, with this step's list
            self._half = None
            return self.update(params, grads, grad_scale=grad_scale)
        if self.h is None:  # commit new state only once the first step went through
            self.h, self._flat = h, flat
            self._half = (h, [])  # a float model: a 16-bit param later is a mismatch
        elif self._half is None:
            self._half = (h, [])
        if self.master is not None:  # every param is float now: no 16-bit copies left
            self.master = None
        if applied is None:  # capturable: counted on the device, see sync_steps()
            return True
        if applied:
            self.step += 1
        else:
            self.skipped_steps += 1
        return applied

    def _check_attributes(self, done: str = "nothing was updated") -> None:
        """Raise, naming it, for an ``opt.step`` or ``opt.nonfinite`` set by hand to
        what the constructor and ``load`` refuse (a negative step made the learning
        rate negative: the update went uphill); a NumPy integer step becomes an int."""
        step = self.step
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"opt.step must be a whole number of steps (an int), got "
                            f"{type(step).__name__}; {done}")
        if step < 0:
            raise ValueError(f"opt.step must be >= 0, got {step}; {done}")
        self.step = int(step)
        try:
            check_nonfinite(self.nonfinite)
        except ValueError as e:
            raise ValueError(f"opt.{e}; {done}") from None

    def _update_naming_state(self, params: Any, grads: Any, grad_scale: float | None
                             ) -> bool:
        """:meth:`update` on unnamed state from a dict (loaded without ``params=``: its
        keys were not saved): it takes the keys of ``params`` in order, if this step
        goes through (else it stays as it was)."""
        old, old_master = self.h, self.master
        self._positional = False
        if (isinstance(params, Mapping) and type(old) is dict and len(old) == len(params)
                and list(old) != list(params)):
            self.h = dict(zip(params.keys(), old.values()))
            if old_master:  # the float32 copies of 16-bit params, keyed as their state
                name = dict(zip(old.keys(), params.keys()))
                self.master = {name[k]: m for k, m in old_master.items()}
        try:
            return self.update(params, grads, grad_scale=grad_scale)
        except BaseException:
            self.h, self.master, self._positional = old, old_master, True
            raise

    def _update_half(self, plist: list[Any], glist: list[Any], hlist: list[Any],
                     labels: Any, hyper: Hyper, h: Any, flat: list[FlatBuffer],
                     keys: list[Any], half: list[int]) -> bool:
        """:meth:`update` for a model with bfloat16/float16 params (``half``)."""
        if getattr(self, "capturable", False):
            raise ValueError("capturable=True does not support bfloat16/float16 params "
                             "(nothing was updated)")
        master = self.master
        if self.master_weights:  # float32 copies of the 16-bit params, once validated
            missing = [i for i in half if master is None or keys[i] not in master]
            if missing or len(master) != len(half):  # (a param changed dtype)
                if not any(D.is_cuda_array(plist[i]) for i in missing):  # (device: below)
                    for i in missing:
                        _half.check_half_triple(plist[i], glist[i], hlist[i], None,
                                                labels[i])
                # a param now float32 drops its copy: its own value is the exact one
                master = {**{keys[i]: master[keys[i]] for i in half if i not in missing},
                          **{keys[i]: _half.new_master(plist[i]) for i in missing}}
        masters = None if master is None else [master[keys[i]] for i in half]
        applied = _half.update_model(plist, glist, hlist, labels, hyper, self.step + 1,
                                     self.nonfinite, self._plan, half, masters,
                                     self.rounding, self.seed if self.seed is not None
                                     else 0)
        if self.h is None:  # commit new state only once the first step went through
            self.h, self._flat = h, flat
        self.master = master
        self._half = (self.h, half)
        if applied:
            self.step += 1
        else:
            self.skipped_steps += 1
        return applied

    def sync_steps(self) -> None:
        """capturable=True: read ``step`` and ``skipped_steps`` back from the device.

        In capturable mode :meth:`update` only queues the step (it returns True; a
        replayed CUDA graph does not even run Python), and the device counts applied
        and skipped steps. This reads them (it waits for the last step's stream);
        :meth:`state_dict`, :meth:`save` and pickling call it. A no-op otherwise.
        """
        gc = getattr(self._plan, "gpu", None) if self._plan is not None else None
        counts = gc.counters() if gc is not None else None
        if counts is not None:
            self.step, self.skipped_steps = counts

    def _update_one(self, p: Any, g: Any, h: Any, hyper: Hyper) -> bool:
        """A one-array model through the functional call's checked kernel: for small
        arrays, one compiled call instead of the plan's scan and the many-array kernel
        (5.3 -> ~3 us per step at 16 elements). False: nothing written, take the plan."""
        step = self.step + 1 if hyper.lr_decay else 1
        dt = getattr(p, "dtype", None)
        cached = self._one
        lr = None
        if cached is None or cached[0] is not hyper or cached[1] != step or cached[2] != dt:
            if (cached is not None and cached[3] is not None and cached[2] == dt
                    and cached[0].family() is hyper.family()):
                # only the learning rate differs (a schedule, lr_decay's next step): the
                # same kernel and table, the rate as the kernel's argument
                lr = float(hyper.clr(step))
                if not lr < cached[3][5]:
                    return False  # (overflows float32: the full path raises, naming it)
            else:
                try:
                    fast = D.checked_kernel(hyper, dt, step) if isinstance(
                        dt, np.dtype) else None
                except ValueError:  # e.g. lr overflows float32: the full path says so
                    fast = None
                cached = self._one = (hyper, step, dt, fast)
        return cached[3] is not None and D.update_one_fast(p, g, h, cached[3], lr)

    def _new_state(self, params: Any, keys: list[Any], plist: list[Any]
                   ) -> tuple[Any, list[FlatBuffer]]:
        """Accumulators for ``params``: one flat buffer per dtype, views per key."""
        fill = self.initial_accumulator_value
        for p in plist:
            dt = getattr(p, "dtype", None)
            if isinstance(dt, np.dtype) and (dt in D._FLOATS or is_half(dt)):
                check_in_dtype("initial_accumulator_value", fill,
                               np.dtype(np.float32) if is_half(dt) else dt)
        if isinstance(params, FlatBuffer):
            flat = [params.full_like(fill)]
            views = [flat[0][k] for k in keys]
        elif plist and all(D.is_cuda_array(p) for p in plist):
            from . import cuda

            views = [_half.new_state(p, fill) if is_half(getattr(p, "dtype", None))
                     else cuda.full_like(p, fill) for p in plist]
            flat = []
        else:
            flat, views = [], [None] * len(plist)
            by_dtype: dict[Any, list[int]] = {}
            for i, p in enumerate(plist):
                dt = getattr(p, "dtype", None)
                ok = (dt in D._FLOATS or is_half(dt)) and not D.is_cuda_array(p)
                by_dtype.setdefault(dt if ok else None, []).append(i)
            for dt, idx in by_dtype.items():
                if dt is None:  # let validation name the offending array
                    for i in idx:
                        views[i] = np.zeros(np.shape(plist[i]), np.float32)
                    continue
                buf = FlatBuffer._from(  # 16-bit params: float32 state
                    np.full(sum(int(np.size(plist[i])) for i in idx), fill,
                            np.float32 if is_half(dt) else dt),
                    tuple(layout_of([(keys[i], plist[i]) for i in idx])))
                flat.append(buf)
                for i in idx:
                    views[i] = buf[keys[i]]
        if isinstance(params, Mapping):
            return dict(zip(keys, views)), flat
        return list(views), flat

    # -- state and checkpoints (the logic lives in checkpoint.py) ----------------------

    def state_dict(self) -> dict[str, Any]:
        """The state in ``torch.optim.Adagrad.state_dict()``'s layout, as NumPy arrays.

        ``{"state": {i: {"sum": array, "step": 0-d array}}, "param_groups": [{"lr",
        "lr_decay", "eps", "weight_decay", "initial_accumulator_value", "maximize", ...,
        "params": [0..n-1]}]}``, ``i`` the parameter's position (dict order). The
        arrays are copies. See :mod:`fastadagrad.checkpoint`.
        """
        from . import checkpoint

        self.sync_steps()
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: Any, params: Any = None) -> None:
        """Load hyperparameters, step and accumulators, e.g. from a torch Adagrad state
        dict converted with ``.numpy()``; validated before anything changes.

        Before the first update the state is created from ``state_dict``, keyed like
        ``params`` if given (else by its ``param_names``, else as a list; a dict whose
        keys were not saved, such as tuples, takes the keys of the first update's dict,
        by position).
        """
        from . import checkpoint

        checkpoint.load_state_dict(self, state_dict, params)

    def save(self, path: Any) -> str:
        """Write the state to one ``.npz`` at ``path``, atomically (temp file, fsync,
        rename, directory fsync): a crash leaves the previous file intact.

        ``.npz`` is appended unless ``path`` ends with it (as ``np.savez`` does); a
        symbolic link is written through. Returns the path written. A learning-rate
        schedule is not saved (its current value is); see
        :func:`fastadagrad.checkpoint.load_state_dict` for what a checkpoint carries.
        """
        from . import checkpoint

        self.sync_steps()
        return checkpoint.save(self, path)

    def load(self, path: Any, params: Any = None) -> None:
        """Load a checkpoint written by :meth:`save`; a truncated, corrupted or
        mismatched file raises :class:`fastadagrad.checkpoint.CheckpointError`."""
        from . import checkpoint

        checkpoint.load(self, path, params)


def _raise_nonfinite_key(grads: FlatBuffer, hyper: Hyper) -> None:
    """Name the first tensor of a flat buffer whose gradient is NaN/inf (a device
    buffer's tensors are copied to the host one by one: this is the error path)."""
    on_device = D.is_cuda_array(grads.data)
    for key in grads:
        g = grads[key]
        if on_device:
            from . import cuda as _cuda

            g = _cuda.to_host(g)
        with np.errstate(all="ignore"):
            if hyper.grad_scale is not None:
                g = g / g.dtype.type(hyper.grad_scale)
            if not np.isfinite(g).all():
                raise FloatingPointError(f"grads[{key!r}] (in a flat buffer) contains NaN "
                                         "or inf; nothing was updated") from None


def _views_of(h: Any, state: FlatBuffer) -> bool:
    """Whether state ``h`` (a mapping) still holds exactly the views of ``state``, each
    under its own key: an accumulator replaced by the user (``opt.h[k] = ...``, or
    ``opt.h = ...``, as with the NumPy class; two swapped) must be the one updated, not
    the buffer behind the old one. (~6 us for 101 arrays.)"""
    views = state._views
    return len(h) == len(views) and all(map(operator.is_, map(h.get, views),
                                            views.values()))


def _pair_up(params: Any, grads: Any) -> tuple[list[Any], list[Any], list[Any],
                                               D.KeyedLabels]:
    """Keys, parallel lists and error labels for a params/grads pair of containers."""
    if type(params) is dict or isinstance(params, Mapping):
        if type(grads) is not dict and not isinstance(grads, Mapping):
            raise TypeError(f"params is a mapping but grads is {type(grads).__name__}")
        keys = list(params)
        try:
            glist = [grads[k] for k in keys]
        except KeyError:
            glist = None
        if glist is None or len(grads) != len(keys):
            missing = [k for k in keys if k not in grads]
            extra = [k for k in grads if k not in params]
            raise KeyError(f"grads keys do not match params keys: missing {missing}, "
                           f"extra {extra}")
        return keys, list(params.values()), glist, D.KeyedLabels(keys)
    if isinstance(params, (list, tuple)):
        if type(grads) is not list and not isinstance(grads, (list, tuple)):
            raise TypeError(f"params is a {type(params).__name__} but grads is "
                            f"{type(grads).__name__}")
        if len(grads) != len(params):
            raise ValueError(f"params has {len(params)} arrays but grads has {len(grads)}")
        keys = list(range(len(params)))
        return keys, list(params), list(grads), D.KeyedLabels(keys)
    raise TypeError("params must be a dict (or other mapping), a list/tuple of arrays or "
                    f"a FlatBuffer, got {type(params).__name__}")


def _check_same_keys(h: Any, keys: list[Any], params: Any) -> None:
    hkeys = list(h.keys()) if isinstance(h, Mapping) else list(range(len(h)))
    if isinstance(h, Mapping) != isinstance(params, Mapping):
        raise KeyError("params do not match the optimizer state: the state is a "
                       f"{'mapping' if isinstance(h, Mapping) else 'list'} and params "
                       f"{'a mapping' if isinstance(params, Mapping) else 'a list'}")
    if set(hkeys) != set(keys) or len(hkeys) != len(keys):
        raise KeyError(f"params do not match the optimizer state: state has keys "
                       f"{hkeys}, params have {keys}")
