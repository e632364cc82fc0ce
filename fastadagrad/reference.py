"""Plain-NumPy reference implementations: the oracle every fast path is tested against.

``NumpyAdaGrad`` is the class the project started from, kept verbatim (a Python-number
lr and the 1e-7 constant are rounded to the array dtype by NumPy, every operation
rounds once; a NumPy float64 scalar lr would instead keep ``lr * g`` in float64 on
float32 arrays, under NumPy 2's promotion rules, which fastadagrad does not follow).
``reference_step`` writes the whole family of formulas out with NumPy element-wise
operations in the array dtype, one operation at a time, so that its rounding is the
documented rounding of each formula; the kernels must agree with it bit for bit.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import numpy as np

from ._hyper import Hyper


class NumpyAdaGrad:
    """The original NumPy AdaGrad class (``h += g*g; p -= lr*g / (sqrt(h) + 1e-7)``
    on a dict of arrays), unchanged in behaviour."""

    def __init__(self, lr: float = 0.01) -> None:
        self.lr = lr
        self.h: dict[Any, np.ndarray] | None = None

    def update(self, params: dict[Any, np.ndarray], grads: dict[Any, np.ndarray]) -> None:
        if self.h is None:
            self.h = {}
            for key, val in params.items():
                self.h[key] = np.zeros_like(val)

        for key in params.keys():
            self.h[key] += grads[key] * grads[key]
            params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)


def _round_exact(x: Fraction, dtype: np.dtype) -> np.floating:
    """Round an exact rational to the nearest ``dtype`` value, ties to even."""
    with np.errstate(over="ignore"):  # (inf is a possible answer)
        t = np.dtype(dtype).type
        try:
            c = t(float(x))  # within one ulp of the answer (double rounding at most)
        except OverflowError:  # beyond float64's range
            c = t(np.inf) if x > 0 else t(-np.inf)
        if np.isinf(c):  # beyond the largest finite value: it, or inf past its half ulp
            big = np.nextafter(c, -c)  # (a tie goes to inf: the largest is odd)
            half = (Fraction(float(big)) - Fraction(float(np.nextafter(big, t(0))))) / 2
            return big if abs(x) < abs(Fraction(float(big))) + abs(half) else c
        best = c
        for cand in (np.nextafter(c, t(-np.inf)), np.nextafter(c, t(np.inf))):
            if not np.isfinite(cand):
                continue
            d_best, d_cand = abs(Fraction(float(best)) - x), abs(Fraction(float(cand)) - x)
            if d_cand < d_best or (d_cand == d_best and
                                   int(cand.view(np.uint64 if t is np.float64 else np.uint32))
                                   % 2 == 0):
                best = cand
        return best


def exact_fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a*b + c`` with a single correct rounding, element by element (slow, exact)."""
    a, b, c = np.broadcast_arrays(a, b, c)
    out = np.empty(a.shape, a.dtype)
    fa, fb, fc, fo = a.reshape(-1), b.reshape(-1), c.reshape(-1), out.reshape(-1)
    for i in range(fo.size):
        x, y, z = float(fa[i]), float(fb[i]), float(fc[i])
        if np.isfinite(x) and np.isfinite(y) and not np.isfinite(z):
            fo[i] = a.dtype.type(z)  # the exact product is finite: z (x*y may overflow)
            continue
        if not (np.isfinite(x) and np.isfinite(y) and np.isfinite(z)):
            fo[i] = a.dtype.type(x * y + z)
            continue
        exact = Fraction(x) * Fraction(y) + Fraction(z)
        # a zero result takes its sign from IEEE rules, which float arithmetic follows
        # exactly here (x*y is then 0 or exactly -z); Fractions have no signed zero
        fo[i] = a.dtype.type(x * y + z) if exact == 0 else _round_exact(exact, a.dtype)
    return out


def reference_step(p: np.ndarray, g: np.ndarray, h: np.ndarray, hyper: Hyper,
                   step: int = 1) -> None:
    """One AdaGrad step in plain NumPy, in place, following ``hyper.rule`` exactly."""
    t = p.dtype.type
    r = hyper.rule
    clr = t(hyper.clr(step))
    g = g.copy()
    if hyper.grad_scale is not None:
        g = g / t(hyper.grad_scale)
    if hyper.maximize:
        g = -g
    wd = t(hyper.weight_decay)
    pn = p.copy()
    if hyper.weight_decay != 0.0:
        if r.weight_decay_mode == "coupled":
            g = exact_fma(pn, np.full_like(pn, wd), g) if r.fma_weight_decay else g + pn * wd
        else:
            pn = pn - (pn * wd) * clr
    if r.fma_accumulate:
        h[...] = exact_fma(g, g, h)
    else:
        h += g * g
    eps = t(hyper.eps)
    denom = np.sqrt(h + eps) if r.eps_placement == "inside" else np.sqrt(h) + eps
    if r.lr_placement == "after":
        q = (g / denom) * clr
    else:
        q = (clr * g) / denom
    if r.zero_where_h0:
        q = np.where(h == 0, t(0), q)
    p[...] = pn - q


def reference_step_half(p: np.ndarray, g: np.ndarray, h: np.ndarray, hyper: Hyper,
                        step: int = 1, *, master: np.ndarray | None = None,
                        rounding: str = "nearest", seed: int | None = None,
                        tensor: int = 0) -> None:
    """One AdaGrad step on bfloat16/float16 ``p``/``g`` with a float32 ``h``, in place.

    ``p`` (or the float32 ``master`` copy when given) and ``g`` are converted to float32,
    :func:`reference_step` runs in float32, ``h`` (and ``master``) keep the float32
    results and ``p`` gets them rounded to its dtype: ``astype`` (round to nearest even)
    or stochastic rounding with the random stream of (``seed``, ``step``, ``tensor``)
    (:func:`fastadagrad._rounding.round_to`).
    """
    from . import _rounding as R

    x = master.copy() if master is not None else p.astype(np.float32)
    with np.errstate(all="ignore"):  # 0/0, inf-inf: NaN bits are compared, not warned
        reference_step(x, g.astype(np.float32), h, hyper, step)
    if master is not None:
        master[...] = x
    bits = None
    if rounding == "stochastic":
        assert seed is not None
        k0, k1 = R.stream_key(seed, step, tensor)
        bits = R.rand32(k0, k1, np.arange(x.size)).reshape(x.shape)
    p[...] = R.round_to(x, p.dtype, rounding, bits)  # type: ignore[arg-type]


def reference_sum_rows(indices: np.ndarray, grad_rows: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, sums)``: the distinct rows of ``indices`` (ascending) and, for each, the sum
    of its gradient rows in the order they appear in ``indices``, left to right, starting
    from the first row itself (``((g_a + g_b) + g_c) + ...``)."""
    idx = np.asarray(indices).astype(np.int64)
    order = np.argsort(idx, kind="stable")
    rows, first, counts = np.unique(idx[order], return_index=True, return_counts=True)
    sums = grad_rows[order[first]].copy()
    for j in range(1, int(counts.max(initial=1))):
        sel = counts > j
        sums[sel] = sums[sel] + grad_rows[order[first[sel] + j]]
    return rows, sums


def reference_rows_step(table: np.ndarray, state: np.ndarray, indices: np.ndarray,
                        grad_rows: np.ndarray, hyper: Hyper, step: int = 1, *,
                        rowwise: bool = False) -> None:
    """One row update in plain NumPy, in place (the oracle of ``adagrad_update_rows``).

    Duplicates are summed by :func:`reference_sum_rows`; then the full accumulator takes
    :func:`reference_step` on the touched rows, and the rowwise one FBGEMM's
    ``EXACT_ROWWISE_ADAGRAD`` order (see ``fastadagrad.cpu_rows._update_row_rowwise``).
    """
    if len(indices) == 0 or table.shape[1] == 0:
        return
    rows, g = reference_sum_rows(indices, grad_rows)
    if not rowwise:
        p, h = table[rows], state[rows]
        reference_step(p, g, h, hyper, step)
        table[rows], state[rows] = p, h
        return
    t = table.dtype.type
    r = hyper.rule
    lr = t(hyper.clr(step))
    if hyper.grad_scale is not None:
        g = g / t(hyper.grad_scale)
    if hyper.maximize:
        g = -g
    p = table[rows]
    wd = t(hyper.weight_decay)
    coupled = hyper.weight_decay != 0.0 and r.weight_decay_mode == "coupled"
    decoupled = hyper.weight_decay != 0.0 and r.weight_decay_mode == "decoupled"
    a = g
    if coupled:
        a = exact_fma(p, np.full_like(p, wd), g) if r.fma_weight_decay else g + p * wd
    s = np.zeros(len(rows), table.dtype)
    for d in range(table.shape[1]):  # left to right over the row, like the kernels
        s = exact_fma(a[:, d], a[:, d], s) if r.fma_accumulate else s + a[:, d] * a[:, d]
    h = state[rows] + s / t(table.shape[1])
    eps = t(hyper.eps)
    denom = np.sqrt(h + eps) if r.eps_placement == "inside" else np.sqrt(h) + eps
    m = lr / denom
    if r.zero_where_h0:
        m = np.where(h == 0, t(0), m)
    c = np.ones_like(m)
    if coupled:
        c = exact_fma(-m, np.full_like(m, wd), np.ones_like(m))
    elif decoupled:
        c = np.full_like(m, t(1) - lr * wd)
    state[rows] = h
    gm = g * m[:, None]
    if coupled or decoupled:
        table[rows] = exact_fma(np.broadcast_to(c[:, None], p.shape), p, -gm)
    else:  # fma(1, p, -gm) is p - gm rounded once
        table[rows] = p - gm
