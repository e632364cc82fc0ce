"""Hyperparameters and formula choices, resolved into the scalars the kernels take.

Every backend (CPU serial, CPU parallel, CUDA) runs the same per-element update; it
is parametrised by a handful of scalars cast to the parameter dtype and a bit mask of
flags. This module is the single place that turns user-facing options into those.
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

# Flag bits understood by every kernel (cpu.py, cuda.py). Loop-invariant, so LLVM
# hoists the tests out of the vectorised loop (measured: no slowdown vs a kernel
# without them, 2^16..2^24 f32).
MAXIMIZE = 1
WD_COUPLED = 2
WD_DECOUPLED = 4
FMA_ACCUMULATE = 8
FMA_WEIGHT_DECAY = 16
ZERO_WHERE_H0 = 32
GRAD_SCALE = 64
# Where eps and lr sit (Rule.eps_placement == "inside", Rule.lr_placement == "after"):
# the coefficients already encode them (eps_in/eps_out, lr_num/lr_after), so a kernel
# may ignore these bits (cuda.py does); the CPU kernels, compiled per flag set, use them
# to leave out the exact no-ops ``h + 0`` and ``q * 1`` of the other placement.
EPS_INSIDE = 128
LR_AFTER = 256

EpsPlacement = Literal["outside", "inside"]
WeightDecayMode = Literal["coupled", "decoupled"]
LrPlacement = Literal["numerator", "after"]
NonFinite = Literal["ignore", "skip", "raise"]


@dataclass(frozen=True)
class Rule:
    """How a framework writes the AdaGrad formula (the choices that change bits).

    Attributes:
        eps_placement: ``"outside"``: ``g / (sqrt(h) + eps)``; ``"inside"``:
            ``g / sqrt(h + eps)``.
        fma_accumulate: accumulate with one fused multiply-add, ``h = fma(g, g, h)``
            (torch's CPU fused kernel) instead of ``h + g*g`` rounded twice.
        lr_placement: ``"numerator"``: ``p - (lr*g) / d`` (NumPy class, torch,
            TensorFlow, Keras); ``"after"``: ``p - (g / d) * lr`` (optax).
        zero_where_h0: give a zero update where the accumulator is exactly 0 (optax).
        weight_decay_mode: ``"coupled"``: L2 added to the gradient, ``g += wd * p``
            (torch/apex); ``"decoupled"``: ``p -= lr * wd * p`` before the step (Keras 3).
        fma_weight_decay: coupled weight decay as ``g = fma(p, wd, g)``.
        fma_lr_decay: ``clr = lr / fma(step - 1, lr_decay, 1)``: the denominator rounded
            once (torch's C++ computes it in double and the compiler contracts it);
            otherwise ``1 + (step - 1) * lr_decay`` rounds twice. Host-side only: the
            kernels just receive ``clr``.
    """

    eps_placement: EpsPlacement = "outside"
    fma_accumulate: bool = False
    lr_placement: LrPlacement = "numerator"
    zero_where_h0: bool = False
    weight_decay_mode: WeightDecayMode = "coupled"
    fma_weight_decay: bool = False
    fma_lr_decay: bool = False

    def __post_init__(self) -> None:
        _choice("eps_placement", self.eps_placement, ("outside", "inside"))
        _choice("lr_placement", self.lr_placement, ("numerator", "after"))
        _choice("weight_decay_mode", self.weight_decay_mode, ("coupled", "decoupled"))
        for name in ("fma_accumulate", "zero_where_h0", "fma_weight_decay", "fma_lr_decay"):
            v = getattr(self, name)  # ("False" is a true value: the other formula)
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
            object.__setattr__(self, name, bool(v))


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _decimal(name: str) -> tuple[type, ...]:
    """``(decimal.<name>,)`` if the ``decimal`` module is loaded, else ``()``: a Decimal
    value implies it is, and importing it (with ``fractions``) cost ~1.5 ms of
    ``import fastadagrad``."""
    mod = sys.modules.get("decimal")
    return (getattr(mod, name),) if mod is not None else ()


def check_hyper(name: str, value: object, *, positive: bool = False) -> float:
    """Return ``value`` as a float; raise a ValueError naming it unless finite and >= 0.

    Any real number is accepted (int, float, NumPy scalars, ``fractions.Fraction``,
    ``decimal.Decimal``...), bools are not.
    """
    if type(value) is float:  # the common case, without the ABC check (~1 us)
        if value >= 0.0 and value != math.inf and (value or not positive):
            return value
    elif isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (numbers.Real, np.integer, np.floating, *_decimal("Decimal"))
    ):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        v = float(value)
    except (OverflowError, ValueError, *_decimal("InvalidOperation")) as e:
        r = repr(value)
        r = r if len(r) <= 40 else f"{r[:20]}...({len(r)} characters)"
        raise ValueError(f"{name}={r} is not representable as a float ({e})") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if v < 0 or (positive and v == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {v}")
    return v


@dataclass(frozen=True)
class Hyper:
    """Validated hyperparameters of one update call (dtype-independent)."""

    lr: float = 0.01
    eps: float = 1e-7
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    maximize: bool = False
    grad_scale: float | None = None
    rule: Rule = Rule()
    #: bit 0: lr is -0.0, bit 1: weight_decay is -0.0. -0.0 == 0.0, so without this
    #: field two Hypers differing only there would be equal (and share every cache
    #: keyed on them), yet the sign reaches the bits of a zero parameter.
    signed_zeros: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signed_zeros",
                           int(math.copysign(1.0, self.lr) < 0)
                           | 2 * int(math.copysign(1.0, self.weight_decay) < 0))

    @classmethod
    def make(
        cls,
        *,
        lr: float = 0.01,
        eps: float = 1e-7,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        grad_scale: float | None = None,
        rule: Rule | None = None,
    ) -> Hyper:
        if not isinstance(maximize, (bool, np.bool_)):
            raise TypeError(f"maximize must be a bool, got {type(maximize).__name__}")
        if rule is not None and not isinstance(rule, Rule):
            raise TypeError(f"rule must be a fastadagrad.Rule (see fastadagrad.presets), "
                            f"got {type(rule).__name__}")
        return cls(
            lr=check_hyper("lr", lr),
            eps=check_hyper("eps", eps),
            lr_decay=check_hyper("lr_decay", lr_decay),
            weight_decay=check_hyper("weight_decay", weight_decay),
            maximize=bool(maximize),
            grad_scale=None if grad_scale is None
            else check_hyper("grad_scale", grad_scale, positive=True),
            rule=Rule() if rule is None else rule,
        )

    def with_lr(self, lr: float) -> Hyper:
        """A copy with learning rate ``lr`` (validated by the caller, as by
        :func:`check_hyper`): a learning-rate schedule's per-step Hyper, ~0.5 us where
        ``dataclasses.replace`` took ~2.5. The copy knows the Hyper it came from
        (:meth:`family`): scalars cached for that one need only their lr entries
        replaced (:meth:`relr`)."""
        new = object.__new__(Hyper)
        d = new.__dict__
        d.update(self.__dict__)
        d["lr"] = lr
        d["signed_zeros"] = (self.signed_zeros & 2) | int(math.copysign(1.0, lr) < 0)
        d["_family"] = self.family()
        return new

    def family(self) -> Hyper:
        """The Hyper this one was made from by :meth:`with_lr` (itself if none): two
        Hypers of one family differ at most in ``lr``."""
        return self.__dict__.get("_family", self)

    def relr(self, coefs: tuple, dtype: np.dtype, step: int = 1) -> tuple:
        """:meth:`coefficients` for ``dtype`` at ``step``, from ``coefs``, those of a
        Hyper of the same :meth:`family` for the same dtype: only the entries that hold
        the learning rate are made again (the same bits: each is ``clr`` rounded to the
        dtype once, as there)."""
        t = np.dtype(dtype).type
        clr = self.clr(step)
        if t is np.float32 and clr >= F32_INF_FROM:
            return self.coefficients(dtype, step)  # (raises, naming the step's lr)
        r = t(clr)
        if coefs[7] & LR_AFTER:
            return (coefs[0], r, coefs[2], coefs[3], coefs[4], r, coefs[6], coefs[7])
        return (r, coefs[1], coefs[2], coefs[3], coefs[4], r, coefs[6], coefs[7])

    def clr(self, step: int) -> float:
        """Learning rate at ``step`` (counted from 1), torch's ``lr_decay`` rule, in double."""
        if self.lr_decay == 0.0:
            return self.lr
        try:
            if self.rule.fma_lr_decay:  # exact rational, rounded once (math.fma is 3.13+)
                # (a/b) * (n/d) + 1 as integers: Python's int / int is correctly
                # rounded, as float(Fraction(...)) is (~5 us a step with Fraction)
                k = step - 1  # (an integer as itself: a float would round above 2^53)
                a, b = ((int(k), 1) if isinstance(k, (int, np.integer))
                        else float(k).as_integer_ratio())
                n, d = float(self.lr_decay).as_integer_ratio()
                return self.lr / ((a * n + b * d) / (b * d))
            return self.lr / (1.0 + (step - 1) * self.lr_decay)
        except OverflowError:  # a denominator beyond double range (a huge step or decay)
            return self.lr / math.inf  # rounds to inf in IEEE double: torch's clr, 0

    def coefficients(self, dtype: np.dtype, step: int = 1) -> tuple:
        """The kernels' scalar arguments for ``dtype`` at ``step``.

        Returns ``(lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags)``,
        the floats as ``dtype`` scalars: the NumPy class computes ``lr * g`` with ``lr``
        rounded to the array dtype first, and so does every kernel.
        """
        t = np.dtype(dtype).type
        r = self.rule
        clr = self.clr(step)
        gs = self.grad_scale
        if t is np.float32 and (  # plain float compares: cheap on the per-step path
                max(clr, self.eps, self.weight_decay, gs or 0.0) >= F32_INF_FROM
                or (gs is not None and gs <= _F32_ZERO_TO)):
            # (the step is named only where it matters: callers pass 1 without lr_decay)
            _raise_float32(clr, self.eps, self.weight_decay, gs,
                           step if self.lr_decay else None)
        flags = 0
        if self.maximize:
            flags |= MAXIMIZE
        if self.weight_decay != 0.0:
            flags |= WD_DECOUPLED if r.weight_decay_mode == "decoupled" else WD_COUPLED
        if r.fma_accumulate:
            flags |= FMA_ACCUMULATE
        if r.fma_weight_decay:
            flags |= FMA_WEIGHT_DECAY
        if r.zero_where_h0:
            flags |= ZERO_WHERE_H0
        if self.grad_scale is not None:
            flags |= GRAD_SCALE
        after = r.lr_placement == "after"
        inside = r.eps_placement == "inside"
        if inside:
            flags |= EPS_INSIDE
        if after:
            flags |= LR_AFTER
        return (
            t(1.0 if after else clr),
            t(clr if after else 1.0),
            t(self.eps if inside else 0.0),
            t(0.0 if inside else self.eps),
            t(self.weight_decay),
            t(clr),
            t(1.0 if self.grad_scale is None else self.grad_scale),
            flags,
        )


# A finite double at or above this rounds to inf in float32 (the midpoint between the
# largest float32 and 2**128 rounds up, to even); at or below 2**-150 it rounds to 0.
F32_INF_FROM = 2.0**128 - 2.0**103
_F32_ZERO_TO = 2.0**-150


def _raise_float32(clr: float, eps: float, weight_decay: float,
                   grad_scale: float | None, step: int | None) -> None:
    """Name the hyperparameter that is finite in double but inf (or 0) in float32.

    Kernels take every coefficient rounded to the array dtype: lr=1e39 would silently
    become inf, grad_scale=1e-50 a division by 0.
    """
    for name, v in (("lr", clr), ("eps", eps), ("weight_decay", weight_decay),
                    ("grad_scale", grad_scale)):
        if v is not None and v >= F32_INF_FROM:
            what = (f"lr at step {step} is {v}" if name == "lr" and step is not None
                    else f"{name}={v}")
            raise ValueError(f"{what}, which overflows to inf in float32; nothing was "
                             "updated")
    raise ValueError(f"grad_scale={grad_scale} rounds to 0 in float32; nothing was "
                     "updated")


def check_in_dtype(name: str, value: float, dtype: np.dtype) -> None:
    """Raise a ValueError naming ``name`` if ``value`` overflows to inf in ``dtype``."""
    if np.dtype(dtype) == np.float32 and abs(value) >= F32_INF_FROM:
        raise ValueError(f"{name}={value} overflows to inf in float32; nothing was "
                         "changed")


def check_step(step: object) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"step must be an int, got {type(step).__name__}")
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    return int(step)


#: the ``nonfinite`` modes
NONFINITE_MODES = ("ignore", "skip", "raise")


def check_nonfinite(mode: object) -> NonFinite:
    _choice("nonfinite", mode, NONFINITE_MODES)
    return mode  # type: ignore[return-value]


def negative_zero(*values: Any) -> bool:
    """Whether a value is -0.0. It equals 0.0 and hashes alike, so a cache keyed on it
    would hand back 0.0's coefficients, and the sign of a zero learning rate or weight
    decay reaches the bits of a zero parameter (``-0.0 - (+0.0)`` is -0.0,
    ``-0.0 - (-0.0)`` is +0.0)."""
    for x in values:
        try:
            if x == 0 and math.copysign(1.0, x) < 0:
                return True
        except (TypeError, ValueError):  # not a real number: the validator says so
            pass
    return False
