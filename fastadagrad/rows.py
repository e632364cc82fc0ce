"""AdaGrad on the rows of an embedding table: only the rows a batch touched are updated.

An embedding table has millions of rows; a training step looks up a few thousand to a
few hundred thousand of them, with repeats. :func:`adagrad_update_rows` takes the
lookups (``indices``) and the gradient of each lookup (``grad_rows``), sums the
gradients of rows that repeat, and updates each touched row once, in one pass over it.
:class:`RowAdaGrad` keeps the accumulator and the step count for one table.

Two accumulators:

* full (``rowwise=False``, state of shape (R, D)): per element, the formula of
  :func:`fastadagrad.adagrad_update` with the same ``rule`` choices;
* rowwise (``rowwise=True``, state of shape (R,)): one float per row holding the sum of
  the mean squared gradient of that row, FBGEMM's ``EXACT_ROWWISE_ADAGRAD``: D times
  less optimizer memory.

Against other libraries (``tests/test_rows.py``):

* FBGEMM's CPU ``EXACT_ROWWISE_ADAGRAD`` (fbgemm-gpu-cpu 1.8.0): bit-identical with
  ``rowwise=True, rule=FBGEMM_ROWWISE``, in every weight decay mode, duplicates included.
* ``torch.optim.Adagrad`` with sparse gradients (torch 2.13.0 CPU): after ``coalesce()``
  it computes ``std = sqrt(h[rows]) + eps; p[rows] += -clr * (g / std)``. Passing the
  coalesced gradient with ``rule=Rule(lr_placement="after")`` gives its accumulator bit
  for bit; the parameters agree within a few ulp of ``max(|p|, 1)``, not exactly,
  because torch's CPU ``sqrt`` is not correctly rounded (1 ulp off for ~17% of random
  float32 inputs) and MKL's ``axpy`` rounds ``p + (-clr) * q`` once (an FMA). torch sums
  duplicates in the order of its (unstable) sort, so pass its coalesced gradient.

Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization", JMLR 12 (2011).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from . import _rows_dispatch as RD
from ._hyper import Hyper, NonFinite, Rule, check_hyper, check_nonfinite, check_step, negative_zero
from .presets import get_preset

#: The rule under which ``rowwise=True`` reproduces FBGEMM's CPU
#: ``EXACT_ROWWISE_ADAGRAD`` bit for bit: its L2 weight decay is compiled to one FMA
#: (``g + wd * w``). Without weight decay the default rule gives the same bits.
FBGEMM_ROWWISE = Rule(fma_weight_decay=True)


@functools.lru_cache(maxsize=256, typed=True)
def _cached_hyper(lr: float, eps: float, lr_decay: float, weight_decay: float,
                  maximize: bool, rule: Rule | None) -> Hyper:
    return Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                      maximize=maximize, rule=rule)


def _hyper(lr: Any, eps: Any, lr_decay: Any, weight_decay: Any, maximize: Any,
           rule: Any) -> Hyper:
    if negative_zero(lr, weight_decay):  # -0.0 == 0.0: the cache would give +0.0's
        return Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                          maximize=maximize, rule=rule)
    try:  # validated once per distinct set of hyperparameters
        return _cached_hyper(lr, eps, lr_decay, weight_decay, maximize, rule)
    except TypeError:  # unhashable argument: let Hyper.make name what is wrong with it
        return Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay, weight_decay=weight_decay,
                          maximize=maximize, rule=rule)


def _check_rowwise(rowwise: object) -> bool:
    if not isinstance(rowwise, (bool, np.bool_)):
        raise TypeError(f"rowwise must be a bool, got {type(rowwise).__name__}")
    return bool(rowwise)


def adagrad_update_rows(table: Any, state: Any, indices: Any, grad_rows: Any, *,
                        lr: float = 0.01, eps: float = 1e-7, lr_decay: float = 0.0,
                        weight_decay: float = 0.0, maximize: bool = False, step: int = 1,
                        nonfinite: NonFinite = "ignore", rowwise: bool = False,
                        rule: Rule | None = None) -> bool:
    """One AdaGrad step on the rows of ``table`` named by ``indices``, in place.

    Let ``p = table`` (R rows of D elements), ``h = state``, and for every distinct row
    ``r`` in ``indices`` let ``g_r`` be the sum of the rows of ``grad_rows`` whose index is
    ``r``, added in the order they appear in ``indices``, left to right
    (``((g_a + g_b) + g_c) + ...``). Each touched row is then updated once; rows not in
    ``indices`` are not read or written. With the default rule, ``clr`` the step's
    learning rate (``lr / (1 + (step - 1) * lr_decay)``):

    * full accumulator (``rowwise=False``, ``state`` (R, D), starts at zeros or at
      ``initial_accumulator_value``)::

          h[r] <- h[r] + g_r * g_r
          p[r] <- p[r] - clr * g_r / (sqrt(h[r]) + eps)

      element by element, with every formula choice of ``rule`` exactly as
      :func:`fastadagrad.adagrad_update` applies it (bit-identical to that function
      called on the touched rows with the summed gradients);
    * rowwise accumulator (``rowwise=True``, ``state`` (R,)), FBGEMM's
      ``EXACT_ROWWISE_ADAGRAD``::

          h[r] <- h[r] + (sum_d g_r[d]^2) / D        (the sum taken left to right over d)
          m    <- clr / (sqrt(h[r]) + eps)
          p[r] <- c * p[r] - g_r * m                 (one FMA: fma(c, p, -(g_r * m)))

      with ``c = 1``; coupled weight decay (FBGEMM's L2 mode) adds ``wd * p[r]`` to the
      gradient inside the sum of squares (not in the last line) and sets
      ``c = 1 - m * wd`` (rounded once); decoupled weight decay (FBGEMM's DECOUPLE mode)
      sets ``c = 1 - clr * wd``. ``rule.eps_placement``, ``fma_accumulate``,
      ``fma_weight_decay`` and ``zero_where_h0`` apply to ``h[r]`` and ``m``;
      ``lr_placement`` does not (``m`` is computed once per row). With
      ``rule=FBGEMM_ROWWISE`` the results are bit-identical to FBGEMM's CPU
      ``EXACT_ROWWISE_ADAGRAD`` (float32, every weight decay mode, duplicates included;
      ``tests/test_rows.py``).

    ``eps`` is outside the square root unless ``rule.eps_placement == "inside"``. Every
    operation rounds once in the table's dtype. The result does not depend on the order
    of distinct rows in ``indices`` nor on the number of threads.

    Args:
        table: (R, D) C-contiguous float32/float64 array, updated in place. NumPy arrays
            run on the CPU; CUDA arrays (Numba, CuPy, torch) on the GPU.
        state: the accumulator, same dtype: (R, D), or (R,) with ``rowwise=True``.
        indices: (K,) int32 or int64, any order, repeats allowed, each in ``[0, R)``.
            A NumPy array (on the GPU path a device array is copied to the host to group
            the rows).
        grad_rows: (K, D), same dtype as ``table``: the gradient of each lookup.
        lr, eps, lr_decay, weight_decay, maximize, step, rule: as in
            :func:`fastadagrad.adagrad_update`.
        nonfinite: ``"ignore"`` (no check), ``"skip"`` (if any element of ``grad_rows``
            is NaN/inf, change nothing and return False) or ``"raise"`` (change nothing,
            raise FloatingPointError). The check reads ``grad_rows`` as given; a sum of
            duplicates that overflows is not checked.
        rowwise: one accumulator per row instead of per element.

    Returns:
        True if the step was applied; False only when ``nonfinite="skip"`` skipped it.

    Raises:
        TypeError / ValueError / IndexError naming the offending argument (for
        ``indices``, the first bad position and its value), before anything is written.

    Example:
        >>> import numpy as np, fastadagrad
        >>> table = np.ones((5, 2), np.float32)
        >>> state = np.zeros_like(table)
        >>> idx = np.array([3, 1, 3])
        >>> g = np.full((3, 2), 0.5, np.float32)
        >>> fastadagrad.adagrad_update_rows(table, state, idx, g, lr=0.1, eps=0.0)
        True
        >>> table[:, 0]
        array([1. , 0.9, 1. , 0.9, 1. ], dtype=float32)

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization", JMLR 12 (2011).
    """
    hyper = _hyper(lr, eps, lr_decay, weight_decay, maximize, rule)
    return RD.update_rows(table, state, indices, grad_rows, hyper, check_step(step),
                          check_nonfinite(nonfinite), _check_rowwise(rowwise))


class RowAdaGrad:
    """AdaGrad state for one embedding table, updated from (indices, grad_rows) pairs.

    ``opt = RowAdaGrad(table, lr=0.01); opt.update(indices, grad_rows)`` runs
    :func:`adagrad_update_rows` on ``table`` (kept by reference and updated in place)
    with the accumulator this object owns, counting steps from 1.

    Design: the table is the model's array (NumPy or a CUDA array); the optimizer holds
    a reference to it, its accumulator ``h`` (allocated like the table, (R, D) or (R,)
    with ``rowwise=True``, filled with ``initial_accumulator_value``), the hyperparameters
    and ``step``. It is deliberately separate from :class:`fastadagrad.AdaGrad`, whose
    state is keyed by parameter and updated densely: a model with one embedding table
    and dense layers uses one of each, this one fed the table's (indices, grad_rows)
    and an :class:`AdaGrad` the dense layers' gradients (:class:`AdaGrad` does not
    take sparse gradients itself). In PyTorch, :class:`fastadagrad.torch.Adagrad`
    updates ``nn.Embedding(sparse=True)`` weights from their sparse gradients.

    Attributes:
        table: the table. h: the accumulator. step: steps applied. skipped_steps: steps
        skipped by ``nonfinite="skip"``. rowwise: which accumulator.

    Example:
        >>> import numpy as np, fastadagrad
        >>> table = np.zeros((1000, 8), np.float32)
        >>> opt = fastadagrad.RowAdaGrad(table, lr=0.1, rowwise=True)
        >>> opt.h.shape
        (1000,)
        >>> opt.update(np.array([7, 7, 42]), np.ones((3, 8), np.float32))
        True
        >>> float(opt.h[7]), opt.step
        (4.0, 1)

    Reference: Duchi, Hazan & Singer, JMLR 12 (2011); rowwise: FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD``.
    """

    def __init__(self, table: Any, lr: float = 0.01, eps: float = 1e-7, *,
                 lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, maximize: bool = False,
                 nonfinite: NonFinite = "ignore", rowwise: bool = False,
                 rule: Rule | None = None) -> None:
        self.hyper = Hyper.make(lr=lr, eps=eps, lr_decay=lr_decay,
                                weight_decay=weight_decay, maximize=maximize, rule=rule)
        self.initial_accumulator_value = check_hyper("initial_accumulator_value",
                                                     initial_accumulator_value)
        self.nonfinite: NonFinite = check_nonfinite(nonfinite)
        self.rowwise = _check_rowwise(rowwise)
        self.table = table
        self.h = self._new_state(table)
        self.step = 0
        self.skipped_steps = 0

    @classmethod
    def from_preset(cls, table: Any, name: str = "numpy", **overrides: Any) -> RowAdaGrad:
        """An optimizer with framework ``name``'s formula and defaults (see presets)."""
        preset = get_preset(name)
        return cls(table, rule=preset.rule, **{**preset.defaults, **overrides})

    def _new_state(self, table: Any) -> Any:
        fill = self.initial_accumulator_value
        if RD.is_cuda_array(table):
            from . import cuda

            shape = tuple(table.shape)
            n = shape[0] if self.rowwise else int(np.prod(shape))
            dtype = np.dtype(str(table.dtype).replace("torch.", ""))
            h = cuda.full(n, dtype, fill)
            return h if self.rowwise else h.reshape(shape)
        t = RD.check_float_array(table, "table", writable=True, ndim=2)
        return np.full(t.shape[:1] if self.rowwise else t.shape, fill, t.dtype)

    def update(self, indices: Any, grad_rows: Any) -> bool:
        """One step on the rows named by ``indices``; False if ``nonfinite="skip"``
        skipped it (then ``step`` does not advance)."""
        applied = RD.update_rows(self.table, self.h, indices, grad_rows, self.hyper,
                                 self.step + 1, self.nonfinite, self.rowwise)
        if applied:
            self.step += 1
        else:
            self.skipped_steps += 1
        return applied

    def state_dict(self) -> dict[str, Any]:
        """``{"sum": copy of h, "step": int, "rowwise": bool, "lr", "eps", "lr_decay",
        "weight_decay", "initial_accumulator_value", "maximize", "rule": {its fields},
        "skipped_steps": int}`` (host arrays)."""
        h = self.h
        host = h.copy_to_host() if hasattr(h, "copy_to_host") else np.array(h, copy=True)
        hy = self.hyper
        return {"sum": host, "step": self.step, "rowwise": self.rowwise, "lr": hy.lr,
                "eps": hy.eps, "lr_decay": hy.lr_decay, "weight_decay": hy.weight_decay,
                "initial_accumulator_value": self.initial_accumulator_value,
                "maximize": hy.maximize, "rule": dataclasses.asdict(hy.rule),
                "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: Any) -> None:
        """Load ``step``, the accumulator, the hyperparameters and the rule (each kept as
        it is where the state dict lacks it); everything is checked (accumulator shape
        and dtype, ``rowwise``) before anything changes."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = [k for k in ("sum", "step", "rowwise") if k not in state_dict]
        if missing:
            raise KeyError(f"state_dict lacks {missing}")
        if bool(state_dict["rowwise"]) != self.rowwise:
            raise ValueError(f"state_dict has rowwise={state_dict['rowwise']} but this "
                             f"optimizer has rowwise={self.rowwise}")
        step = state_dict["step"]
        if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)) \
                or step < 0:
            raise ValueError(f"state_dict['step'] must be an int >= 0, got {step!r}")
        h = np.asarray(state_dict["sum"])
        shape = tuple(self.h.shape)
        if h.shape != shape or h.dtype != np.dtype(str(self.h.dtype).replace("torch.", "")):
            raise ValueError(f"state_dict['sum'] has shape {h.shape} and dtype {h.dtype}; "
                             f"this table's accumulator is {shape} {self.h.dtype}")
        hy = self.hyper
        rule = state_dict.get("rule", hy.rule)
        if isinstance(rule, dict):
            try:
                rule = Rule(**rule)
            except (TypeError, ValueError) as e:  # an unknown field, a bad value
                raise ValueError(f"state_dict['rule'] is not a Rule's fields: {e}") from e
        elif not isinstance(rule, Rule):  # (None would be the default rule)
            raise ValueError("state_dict['rule'] must be a dict of a Rule's fields, got "
                             f"{type(rule).__name__}")
        skipped = state_dict.get("skipped_steps", self.skipped_steps)
        if isinstance(skipped, (bool, np.bool_)) or not isinstance(
                skipped, (int, np.integer)) or skipped < 0:
            raise ValueError("state_dict['skipped_steps'] must be an int >= 0, got "
                             f"{skipped!r}")
        hyper = Hyper.make(
            lr=state_dict.get("lr", hy.lr), eps=state_dict.get("eps", hy.eps),
            lr_decay=state_dict.get("lr_decay", hy.lr_decay),
            weight_decay=state_dict.get("weight_decay", hy.weight_decay),
            maximize=state_dict.get("maximize", hy.maximize), rule=rule)
        iav = check_hyper("initial_accumulator_value",
                          state_dict.get("initial_accumulator_value",
                                         self.initial_accumulator_value))
        if hasattr(self.h, "copy_to_device"):
            self.h.copy_to_device(np.ascontiguousarray(h))
        else:
            self.h[...] = h
        self.hyper, self.initial_accumulator_value, self.step = hyper, iav, int(step)
        self.skipped_steps = int(skipped)
