"""CPU kernels for the row update: AdaGrad on the touched rows of an embedding table.

A step gets ``K`` lookups (``indices``, ``grad_rows``) into a table of ``R`` rows of
``D`` elements. Rows that repeat are summed first, then each touched row is updated
once. The work is split in three bare loops, all compiled with Numba:

1. :func:`group_by_row`: a stable LSD radix sort of the ``K`` lookups, each packed
   with its position into one integer (digits of at most 11 bits; a 1,000,000-row
   table takes two passes): ``order`` (lookup positions, grouped by row, ascending
   inside a group), ``starts`` (where each group begins), and the order in which the
   kernels visit the groups, that of their rows' first appearance (``perm``, with
   ``first``, the lookups before each). Memory: a few arrays of ``K`` integers and one
   histogram of 2^11 counts, never anything proportional to the table. The duplicates
   of a row are thus summed in the order they appear in ``indices``.
2. The duplicate gradient rows of a group are summed in that order, left to right
   (``((g_a + g_b) + g_c) + ...``, starting from ``g_a`` itself, so a lone ``-0.0``
   stays ``-0.0``), into a per-block scratch row.
3. The update of that row, one pass over its ``D`` elements of ``table`` (and
   ``state``): :func:`_update_row` (full accumulator, the per-element formula of the
   dense kernel in ``cpu.py``) or :func:`_update_row_rowwise` (one accumulator per row;
   the sums of squares of :data:`ROWWISE_BATCH` rows are taken together first, by
   :func:`_sums_of_squares`).

The parallel kernels split the groups into contiguous blocks of about the same work each
(lookups plus a weight per distinct row: a Zipf-distributed batch puts thousands of
lookups on its first rows, and few rows) and give each thread whole blocks: every row
is written by exactly one thread, so there are no atomics, and the bits do not depend
on the number of threads.

Validation, the CPU/GPU choice and the serial/parallel choice live in
``_rows_dispatch.py``; the coefficients come from ``_hyper.Hyper.coefficients``.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic

from . import _hyper as H
from ._intrinsics import fma
from ._jit import jit
from .cpu import _update_at


@intrinsic
def _prefetch(typingctx, arr, idx):  # type: ignore[no-untyped-def]
    """Hint the cache to fetch ``arr.ravel()[idx]`` (``llvm.prefetch``, write, keep)."""
    if not (isinstance(arr, types.Array) and isinstance(idx, types.Integer)):
        return None

    def codegen(context, builder, sig, args):  # type: ignore[no-untyped-def]
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = builder.module.globals.get("llvm.prefetch.p0")
        if fn is None:
            fn = ir.Function(builder.module, fnty, "llvm.prefetch.p0")
        addr = builder.bitcast(builder.gep(ary.data, [args[1]]), i8p)
        builder.call(fn, [addr, ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, idx), codegen


@jit(inline="always")
def _prefetch_row(a, r):
    """Prefetch every 64-byte line of row ``r`` of the C-contiguous 2-D array ``a``."""
    d = a.shape[1]
    line = max(1, 64 // a.itemsize)
    for j in range(0, d, line):
        _prefetch(a, r * d + j)
    _prefetch(a, r * d + d - 1)


#: Groups ahead whose table/state rows are prefetched, and gradient rows prefetched
#: ahead counted in lookups (a group of duplicates has many). Touched rows are scattered,
#: so the hardware prefetcher cannot guess them. 1M x 64 f32, 65,536 Zipf lookups, one
#: thread: the row loop took 19.6 ms without prefetch (rows in table order), 7.5 ms with
#: (8, 16) and rows in first-appearance order. Distances from (4, 32) to (32, 96) gave
#: the same time within the noise (about 10%, load average 2-5 on the shared machine).
PREFETCH_GROUPS = 4
PREFETCH_LOOKUPS = 32

#: Radix digit width of :func:`group_by_row`: 2^11 counters (16 KiB) stay in L1, and a
#: table of up to 2^22 rows needs two passes over the ``K`` indices.
RADIX_BITS = 11


@jit()
def first_bad_index(indices, nrows):
    """Position of the first index outside ``[0, nrows)``, or -1. Read-only."""
    for i in range(indices.size):
        r = indices[i]
        if r < 0 or r >= nrows:
            return i
    return -1


def workspace_size(k: int) -> int:
    """int64 elements of scratch :func:`group_by_row` needs for ``k`` lookups."""
    return 6 * k + 2


@jit()
def _bit_length(x):
    """Bits needed to write ``x >= 0`` (0 for 0)."""
    n = 0
    while n < 63 and (x >> n) > 0:
        n += 1
    return n


@jit()
def _radix_passes(bits):
    """``(passes, width)``: digits of at most ``RADIX_BITS`` bits covering ``bits`` bits,
    all of one width (20 bits: two passes of 10)."""
    passes = max(1, (bits + RADIX_BITS - 1) // RADIX_BITS)
    return passes, max(1, (bits + passes - 1) // passes)


@jit(inline="always")
def _digit_starts(keys, k, shift, mask, count):
    """``count[d]`` = where digit ``d`` (``(key >> shift) & mask``) of ``keys[:k]``
    starts in a stable counting-sort pass: one LSD radix pass's histogram, prefix
    summed."""
    count[:] = 0
    for i in range(k):
        count[((keys[i] >> shift) & mask) + 1] += 1
    for d in range(1, mask + 2):
        count[d] += count[d - 1]


@jit()
def group_by_row(indices, nrows, work):
    """``(order, starts, perm, first, pos)``: the lookups grouped by row.

    ``order[starts[v]:starts[v + 1]]`` are the positions in ``indices`` of the lookups of
    the ``v``-th distinct row in ascending row order, ascending (the order they appear in
    ``indices``). ``perm`` lists the groups in the order their rows first appear in
    ``indices``, ``pos[w]`` is where group ``perm[w]`` first appears, and ``first[w]``
    counts the lookups of groups ``perm[:w]`` (``first[-1] == K``). The kernels visit
    the groups in ``perm`` order, reading a group's row and first gradient row at
    ``pos[w]`` (``perm`` and ``starts`` only for a row with repeats), so they read
    the gradient rows of rows seen once (most of them) front to back: in row order
    instead, the serial full-accumulator kernel took 7.8 ms instead of 6.9 (Zipf) and
    10.6 instead of 8.4 (uniform; 65,536 rows of 256 bytes, one thread, interleaved,
    load 1.7). Every index must be in ``[0, nrows)`` (checked by the caller).

    Each lookup is sorted as one integer, ``row << P | position`` (``P`` bits hold a
    position), so a radix pass moves one array instead of keys and positions apart.
    Where ``row`` and ``position`` do not fit in 62 bits together, the keys and the
    positions are sorted side by side (:func:`_sort_pairs`). Copying the groups into
    first-appearance order took more than the sort (0.36 ms against 0.27 for 65,536
    Zipf lookups into 1,000,000 rows, one thread); handing the kernels ``perm`` instead
    brought the whole grouping from 0.78 ms to 0.40 (uniform: 0.75 to 0.38; load 2.7).

    ``work``: int64 scratch of at least :func:`workspace_size` elements; the five arrays
    are views into it. Fresh arrays cost more than the sort itself: six new 512 KiB
    arrays, first touched, took 1.07 ms, the same writes into reused ones 0.04 ms
    (65,536 lookups, page faults), so the dispatcher keeps one per thread.
    """
    k = indices.size
    bits = _bit_length(nrows - 1)
    pb = _bit_length(k - 1) if k > 1 else 0
    order = work[2 * k:3 * k]
    slot = work[k:2 * k]
    rows = work[0:k]  # the sorted rows
    if bits + pb > 62:
        _sort_pairs(indices, bits, rows, slot, order, work[3 * k:4 * k])
    else:
        passes, width = _radix_passes(bits)
        mask = (1 << width) - 1
        keys = work[0:k]
        keys2 = slot
        for i in range(k):
            keys[i] = (np.int64(indices[i]) << pb) | i
        count = np.empty(mask + 2, np.int64)
        shift = pb
        for _ in range(passes if bits else 0):
            _digit_starts(keys, k, shift, mask, count)
            for i in range(k):  # stable scatter: equal digits keep their order
                x = keys[i]
                d = (x >> shift) & mask
                j = count[d]
                count[d] = j + 1
                keys2[j] = x
            keys, keys2 = keys2, keys
            shift += width
        pmask = (1 << pb) - 1
        for i in range(k):  # keys may be ``slot`` (an odd number of passes)
            x = keys[i]
            order[i] = x & pmask
            rows[i] = x >> pb
    # groups in row order; slot[position] = group of the lookup if it is its group's
    # first, else -1 (every position is written once: no initialising pass, no branch)
    starts = work[4 * k:5 * k + 1]
    u = 0
    prev = -1
    for i in range(k):
        new = rows[i] != prev
        prev = rows[i]
        starts[u] = i  # overwritten until the next group begins
        slot[order[i]] = u if new else -1
        u += new
    starts[u] = k
    # slot read front to back: the groups by first appearance (perm overwrites slot
    # behind the reading position)
    perm = slot
    pos = work[3 * k:4 * k]
    first = work[5 * k + 1:6 * k + 2]
    w = 0
    j = 0
    for i in range(k):  # no branch: 0.12 ms less than one on v >= 0 (Zipf, 65,536)
        v = slot[i]
        is_first = v >= 0
        vv = max(v, 0)
        perm[w] = v
        pos[w] = i
        first[w] = j
        j += (starts[vv + 1] - starts[vv]) * is_first
        w += is_first
    first[u] = k
    return order, starts[:u + 1], perm[:u], first[:u + 1], pos[:u]


@jit()
def _sort_pairs(indices, bits, keys, keys2, order, order2):
    """Stable LSD radix sort of ``indices`` (``bits`` wide) with their positions side by
    side, into ``keys`` and ``order`` (``keys2``, ``order2``: scratch). For rows and
    positions too wide to share one int64."""
    k = indices.size
    passes, width = _radix_passes(bits)
    mask = (1 << width) - 1
    for i in range(k):
        keys[i] = indices[i]
        order[i] = i
    count = np.empty(mask + 2, np.int64)
    shift = 0
    swapped = False
    for _ in range(passes if bits else 0):
        _digit_starts(keys, k, shift, mask, count)
        for i in range(k):  # stable scatter: equal digits keep their order
            d = (keys[i] >> shift) & mask
            j = count[d]
            count[d] = j + 1
            keys2[j] = keys[i]
            order2[j] = order[i]
        keys, keys2 = keys2, keys
        order, order2 = order2, order
        swapped = not swapped
        shift += width
    if swapped:  # the results must end in the caller's ``keys`` and ``order``
        for i in range(k):
            keys2[i] = keys[i]
            order2[i] = order[i]


@jit(error_model="numpy")
def has_nonfinite(g):
    """True if any element of the 2-D array ``g`` is NaN or inf. Read-only; an integer
    OR-reduction so that the loop vectorises."""
    flat = g.reshape(g.size)
    bad = np.int32(0)
    for i in range(flat.size):
        bad |= np.int32(not math.isfinite(flat[i]))
    return bad != 0


@jit(parallel=True, error_model="numpy")
def has_nonfinite_parallel(g, nblocks):
    """:func:`has_nonfinite` over ``nblocks`` blocks of rows on all threads."""
    k = g.shape[0]
    bad = 0
    for b in prange(nblocks):
        bad += has_nonfinite(g[b * k // nblocks:(b + 1) * k // nblocks])
    return bad != 0


@jit(error_model="numpy", inline="always")
def _sum_group(g, i, order, s, e, acc):
    """``acc = ((g[i] + g[order[s+1]]) + g[order[s+2]]) + ...``, left to right: the
    group's gradient rows from its first lookup ``i`` (``order[s]`` when ``e - s >= 2``)."""
    first = g[i]
    for d in range(acc.size):
        acc[d] = first[d]
    for k in range(s + 1, e):
        if k + PREFETCH_LOOKUPS < e:
            _prefetch_row(g, order[k + PREFETCH_LOOKUPS])
        row = g[order[k]]
        for d in range(acc.size):
            acc[d] = acc[d] + row[d]


@jit(error_model="numpy", inline="always")
def _update_row(p, g, h, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """Full accumulator: the dense kernel's per-element update over one row (the
    formula of :func:`fastadagrad.cpu.kernels`, in the dtype of the arrays)."""
    for i in range(p.size):  # the dense kernel's element function: one formula, one place
        _update_at(p, g, h, i, lr_num, lr_after, eps_in, eps_out, wd, lr_wd, grad_scale,
                   flags)


#: Rows whose rowwise sums of squares are taken together by :func:`_sums_of_squares`.
#: Each sum is a chain of ``D`` dependent additions (its order is fixed: reassociating
#: would change its bits), 64 x 3-4 cycles of latency per row; interleaving the chains
#: of 16 rows hides it. 1M x 64 f32, 65,536 lookups, one thread, interleaved runs: the
#: rowwise kernel took 12.5 ms one row at a time and 7.1 ms (Zipf; uniform 14.5 -> 7.4)
#: in batches of 16, as fast as the full accumulator's 7.3 ms.
ROWWISE_BATCH = 16


@jit(error_model="numpy", inline="always")
def _scaled_group(g, i, order, s, e, out, grad_scale, flags):
    """``out = g'``: the group's gradient rows summed left to right (``((g_a + g_b) +
    g_c) + ...`` from ``g_a = g[i]`` itself, ``i == order[s]``), then divided by
    ``grad_scale`` if GRAD_SCALE and negated if MAXIMIZE, element by element."""
    _sum_group(g, i, order, s, e, out)
    if flags & H.GRAD_SCALE:
        for d in range(out.size):
            out[d] = out[d] / grad_scale
    if flags & H.MAXIMIZE:
        for d in range(out.size):
            out[d] = -out[d]


@jit(error_model="numpy", inline="always")
def _sums_of_squares(gs, p, rows, nb, sums, wd, flags):
    """``sums[j] = (((0 + a_0*a_0) + a_1*a_1) + ...)`` over ``d`` for ``j < nb``, with
    ``a_d = gs[j, d]`` (+ ``p[rows[j], d] * wd`` if WD_COUPLED): every row's sum in its
    own order, the ``nb`` rows' chains interleaved (:data:`ROWWISE_BATCH`)."""
    coupled = (flags & H.WD_COUPLED) != 0
    fma_h = (flags & H.FMA_ACCUMULATE) != 0
    fma_wd = (flags & H.FMA_WEIGHT_DECAY) != 0
    for j in range(nb):
        sums[j] = wd - wd
    for d in range(gs.shape[1]):
        for j in range(nb):
            a = gs[j, d]
            if coupled:
                if fma_wd:
                    a = fma(p[rows[j], d], wd, a)
                else:
                    a = a + p[rows[j], d] * wd
            if fma_h:
                sums[j] = fma(a, a, sums[j])
            else:
                sums[j] = sums[j] + a * a


@jit(error_model="numpy", inline="always")
def _update_row_rowwise(p, gs, h, r, s, dn, one, lr_wd, eps_in, eps_out, wd, flags):
    """Rowwise accumulator (FBGEMM's ``EXACT_ROWWISE_ADAGRAD``, CPU operation order).

    In the dtype of the arrays, ``D = p.size``, ``g`` the group's summed gradient::

        g'_d = g_d / grad_scale, negated if MAXIMIZE        (gs, by _scaled_group)
        a_d  = g'_d + p_d * wd  if WD_COUPLED (fma(p_d, wd, g'_d) if FMA_WEIGHT_DECAY),
               else g'_d
        s    = (((0 + a_0*a_0) + a_1*a_1) + ...) + a_{D-1}*a_{D-1}
                                           (each term fma(a_d, a_d, s) if FMA_ACCUMULATE;
                                            s by _sums_of_squares)
        h[r] = h[r] + s / D
        m    = lr / (sqrt(h[r] + eps_in) + eps_out)         (0 if ZERO_WHERE_H0, h[r] == 0)
        c    = fma(-m, wd, 1) if WD_COUPLED;  1 - lr*wd if WD_DECOUPLED;  else 1
        p_d  = fma(c, p_d, -(g'_d * m))

    ``lr`` is the step's learning rate (``lr_wd``); ``dn`` and ``one`` are ``D`` and 1 in
    the dtype (Numba would promote ``float32 / int`` to float64). The sum over ``d`` runs
    left to right (not vectorised: reassociating it would change its bits). ``c`` and
    the last line round as FBGEMM's compiled CPU kernel does (its ``1.0 - m * wd`` is
    evaluated in double, its ``c * w - g * m`` contracted to one FMA); with ``c = 1`` the
    last line is ``p_d - g'_d * m`` rounded twice, exactly.
    """
    zero = eps_in - eps_in
    hr = h[r] + s / dn
    m = lr_wd / (math.sqrt(hr + eps_in) + eps_out)
    if (flags & H.ZERO_WHERE_H0) and hr == zero:
        m = zero
    c = one
    if flags & H.WD_COUPLED:
        c = fma(-m, wd, one)
    elif flags & H.WD_DECOUPLED:
        c = one - lr_wd * wd
    h[r] = hr
    for i in range(p.size):
        p[i] = fma(c, p[i], -(gs[i] * m))


@jit(error_model="numpy", inline="always")
def _prefetch_ahead(p, g, indices, order, starts, perm, first, pos, w, whi):
    """Prefetch the table row of the group ``PREFETCH_GROUPS`` ahead of the ``w``-th
    (in ``perm`` order) and its first ``PREFETCH_LOOKUPS`` gradient rows (the others are
    prefetched while the group is summed); return that table row (-1 if none), for the
    caller to prefetch its state row too. Touched rows are scattered: the hardware
    prefetcher cannot guess them."""
    ra = -1
    wa = w + PREFETCH_GROUPS
    if wa < whi:
        i = pos[wa]
        ra = indices[i]
        _prefetch_row(p, ra)
        _prefetch_row(g, i)
        n = first[wa + 1] - first[wa]
        if n > 1:
            s = starts[perm[wa]]
            for j in range(s + 1, s + min(n, PREFETCH_LOOKUPS)):
                _prefetch_row(g, order[j])
    return ra


@jit(error_model="numpy")
def rows_span_full(p, g, h, indices, order, starts, perm, first, pos, wlo, whi, lr_num,
                   lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """Update the rows of groups ``perm[wlo:whi]``, full accumulator ``h`` (R, D)."""
    acc = np.empty(p.shape[1], p.dtype)  # one scratch row per block, not per row
    for w in range(wlo, whi):
        ra = _prefetch_ahead(p, g, indices, order, starts, perm, first, pos, w, whi)
        if ra >= 0:
            _prefetch_row(h, ra)
        i = pos[w]
        r = indices[i]
        n = first[w + 1] - first[w]
        if n == 1:
            _update_row(p[r], g[i], h[r], lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                        grad_scale, flags)
        else:
            s = starts[perm[w]]
            _sum_group(g, order[s], order, s, s + n, acc)
            _update_row(p[r], acc, h[r], lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                        grad_scale, flags)


@jit(error_model="numpy")
def rows_span_rowwise(p, g, h, indices, order, starts, perm, first, pos, wlo, whi, lr_num,
                      lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """Update the rows of groups ``perm[wlo:whi]``, rowwise accumulator ``h`` (R,), in
    batches of :data:`ROWWISE_BATCH` groups: their scaled gradients gathered into a
    scratch block, their sums of squares taken together, then each row updated."""
    nbatch = ROWWISE_BATCH
    gs = np.empty((nbatch, p.shape[1]), p.dtype)  # scratch per block, not per row
    sums = np.empty(nbatch, p.dtype)
    rows = np.empty(nbatch, np.int64)
    sums[0] = p.shape[1]  # D and 1 in the dtype (at least one column: the caller checks)
    dn = sums[0]
    sums[0] = 1
    one = sums[0]
    for w0 in range(wlo, whi, nbatch):
        nb = min(nbatch, whi - w0)
        for j in range(nb):
            w = w0 + j
            ra = _prefetch_ahead(p, g, indices, order, starts, perm, first, pos, w, whi)
            if ra >= 0:
                _prefetch(h, ra)
            i = pos[w]
            rows[j] = indices[i]
            n = first[w + 1] - first[w]
            s = starts[perm[w]] if n > 1 else 0
            _scaled_group(g, i, order, s, s + n, gs[j], grad_scale, flags)
        _sums_of_squares(gs, p, rows, nb, sums, wd, flags)
        for j in range(nb):
            _update_row_rowwise(p[rows[j]], gs[j], h, rows[j], sums[j], dn, one, lr_wd,
                                eps_in, eps_out, wd, flags)


#: The work of a group (a distinct row) against one more lookup of a row, for
#: :func:`block_bounds`: a group reads and writes its table row (and full accumulator
#: row), scattered; a repeated lookup only reads one more gradient row. Fitted to serial
#: times of 1M x 64 f32, 65,536 lookups (Zipf: 41,080 groups; uniform: 63,425): about
#: 150 ns per group and 21 ns per repeat with the full accumulator, 130 and 44 ns
#: rowwise. Balanced by lookups alone, a Zipf batch gave one of 2 threads 10,490 rows
#: and the other 30,590 (its first rows hold most repeats; by the fit, 2.0 ms of work
#: against 4.6); with weight 6 they get 18,920 and 22,160 rows (3.3 ms each). On 2
#: threads (interleaved, load 2.2) the full kernel went from 13.2 to 8.0 ms with
#: weight 4.
GROUP_WEIGHT_FULL = 6
GROUP_WEIGHT_ROWWISE = 3


@jit()
def block_bounds(first, k, nblocks, weight):
    """Bounds, in ``perm`` order, of ``nblocks`` blocks of groups of about equal work.

    ``first``: :func:`group_by_row`'s lookups before each group in ``perm`` order. The
    work of the first ``w`` groups is ``first[w] + weight * w`` (lookups, plus
    ``weight`` per group: :data:`GROUP_WEIGHT_FULL`); block ``b`` starts at the first
    group whose work before it reaches ``b/nblocks`` of the total, so a group is never
    split and every row belongs to one block (one thread).
    """
    ngroups = first.size - 1
    total = k + weight * ngroups
    bounds = np.empty(nblocks + 1, np.int64)
    bounds[0] = 0
    for b in range(1, nblocks):
        target = b * total // nblocks
        lo = bounds[b - 1]
        hi = ngroups
        while lo < hi:  # the first w with first[w] + weight * w >= target
            mid = (lo + hi) // 2
            if first[mid] + weight * mid < target:
                lo = mid + 1
            else:
                hi = mid
        bounds[b] = lo
    bounds[nblocks] = ngroups
    return bounds


@jit(parallel=True)
def rows_full_parallel(p, g, h, indices, order, starts, perm, first, pos, bounds, lr_num,
                       lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """:func:`rows_span_full` over the blocks of :func:`block_bounds`, one per task."""
    for b in prange(bounds.size - 1):
        rows_span_full(p, g, h, indices, order, starts, perm, first, pos, bounds[b],
                       bounds[b + 1], lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                       grad_scale, flags)


@jit(parallel=True)
def rows_rowwise_parallel(p, g, h, indices, order, starts, perm, first, pos, bounds, lr_num,
                          lr_after, eps_in, eps_out, wd, lr_wd, grad_scale, flags):
    """:func:`rows_span_rowwise` over the blocks of :func:`block_bounds`."""
    for b in prange(bounds.size - 1):
        rows_span_rowwise(p, g, h, indices, order, starts, perm, first, pos, bounds[b],
                          bounds[b + 1], lr_num, lr_after, eps_in, eps_out, wd, lr_wd,
                          grad_scale, flags)
