"""``python -m fastadagrad warmup``: compile the CPU kernels ahead of time.

Numba compiles each kernel the first time a process calls it with new argument types
and keeps the machine code in its on-disk cache, from which later processes load it in
milliseconds. Without a warm-up the first ``AdaGrad.update`` of the first run pays the
whole compile (several seconds on a small machine). This command makes the calls a
typical training run makes, on small arrays, so that every kernel they need is
compiled and written to the cache:

* one array below and one above the serial/parallel threshold (the functional
  ``adagrad_update`` and ``AdaGrad.update`` with one array: serial and parallel
  kernels);
* a small and a large model given as a dict of separate arrays (the many-tensor
  kernels, serial and parallel, and the overlap check);
* one array of each other number of dimensions a model has: 0-d (a scalar), 2-d (a
  weight matrix), 3-d and 4-d (convolution weights). A one-array update hands the
  array itself to the compiled check, which Numba compiles once per number of
  dimensions (three functions, ~0.7 s each time on a 2-core machine); the kernels
  that do the work take flat arrays and are compiled once;

for each ``--dtype`` and each ``--preset`` (a preset's formula is compiled separately
from the others'; options such as ``weight_decay``, ``maximize`` or
``nonfinite="skip"`` may need their own compile on first use). With ``--rows``, the
embedding-table updates too (:class:`~fastadagrad.RowAdaGrad`, full and rowwise,
serial and parallel); with ``--torch``, the steps of :class:`fastadagrad.torch.Adagrad`
(default, ``foreach`` and ``fused`` flags, serial and parallel, and a sparse
``nn.Embedding`` gradient; imports torch). It prints one line per call (compiled, or
loaded from the cache) and the total time.

Numba's cache lives next to the package (``__pycache__``) or in ``NUMBA_CACHE_DIR``;
run the warm-up with the same settings as the training job. With the cache off
(``FASTADAGRAD_NO_CACHE=1``, or no writable cache directory) it only compiles into
this process and says so.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import _compile_notice, cpu
from .optim import AdaGrad, adagrad_update
from .presets import PRESETS

DTYPES = ("float32", "float64")

#: Element counts of the calls. SMALL stays below any serial/parallel threshold and
#: LARGE (2^20 elements, 4 MiB in float32) above it; the models are a 4-array MLP
#: (442 elements) and a 4-array MLP of about 2^20 elements (1024-1024-10).
SMALL = 1000
LARGE = 1 << 20
SMALL_MODEL = {"W1": (16, 16), "b1": (16,), "W2": (16, 10), "b2": (10,)}
LARGE_MODEL = {"W1": (1024, 1024), "b1": (1024,), "W2": (1024, 10), "b2": (10,)}
#: One small array per other number of dimensions (a one-array call compiles its check
#: per ndim): a scalar, a weight matrix, conv1d and conv2d weights.
ND_SHAPES = ((), (16, 16), (8, 4, 3), (8, 4, 3, 3))


def _calls(dtype: np.dtype, preset: str) -> list[tuple[str, Callable[[], Any]]]:
    """(description, call) for one dtype and preset, on fresh arrays."""

    def arrays(n: int | tuple[int, ...]) -> list[np.ndarray]:
        return [np.full(n, v, dtype) for v in (1.0, 0.5, 0.0)]

    def model(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, dict]:
        return ({k: np.ones(s, dtype) for k, s in shapes.items()},
                {k: np.full(s, 0.5, dtype) for k, s in shapes.items()})

    def opt() -> AdaGrad:
        return AdaGrad.from_preset(preset)

    def size(shapes: dict[str, tuple[int, ...]]) -> int:
        return sum(int(np.prod(s)) for s in shapes.values())

    out: list[tuple[str, Callable[[], Any]]] = []
    if preset == "numpy":  # the functional API's defaults are the NumPy class's
        out += [(f"adagrad_update, {SMALL:,} elements (serial)",
                 lambda: adagrad_update(*arrays(SMALL))),
                (f"adagrad_update, {LARGE:,} elements (parallel)",
                 lambda: adagrad_update(*arrays(LARGE)))]
    else:
        out += [(f"AdaGrad.update, 1 array of {n:,} elements ({kind})",
                 lambda n=n: opt().update([arrays(n)[0]], [arrays(n)[1]]))
                for n, kind in ((SMALL, "serial"), (LARGE, "parallel"))]
    out += [(f"AdaGrad.update, dict of {len(m)} arrays, {size(m):,} elements ({kind})",
             lambda m=m: opt().update(*model(m)))
            for m, kind in ((SMALL_MODEL, "serial"), (LARGE_MODEL, "parallel"))]
    # the one-array calls again, one per other ndim; serial and parallel share the
    # check, and the parallel kernel takes the flat array, so small ones are enough
    if preset == "numpy":
        out += [(f"adagrad_update, {len(s)}-d array {s}",
                 lambda s=s: adagrad_update(*arrays(s))) for s in ND_SHAPES]
    else:
        out += [(f"AdaGrad.update, 1 {len(s)}-d array {s}",
                 lambda s=s: opt().update([arrays(s)[0]], [arrays(s)[1]]))
                for s in ND_SHAPES]
    return out


def _row_calls(dtype: np.dtype) -> list[tuple[str, Callable[[], Any]]]:
    """(description, call) for the embedding-row updates in ``dtype``."""
    from .rows import RowAdaGrad

    def step(rows: int, dim: int, k: int, rowwise: bool) -> None:
        idx = np.arange(k, dtype=np.int64) % rows
        RowAdaGrad(np.ones((rows, dim), dtype), rowwise=rowwise).update(
            idx, np.full((k, dim), 0.5, dtype))

    return [(f"RowAdaGrad.update, {'rowwise' if rw else 'full'} state, {k:,} rows of "
             f"{dim} ({kind})", functools.partial(step, rows, dim, k, rw))
            for rw in (False, True)
            for rows, dim, k, kind in ((100, 8, 16, "serial"), (1 << 14, 64, 1 << 14,
                                                               "parallel"))]


def _torch_calls(dtype: np.dtype) -> list[tuple[str, Callable[[], Any]]]:
    """(description, call) for :class:`fastadagrad.torch.Adagrad` steps in ``dtype``."""
    import torch

    from . import torch as fat

    tdt = getattr(torch, dtype.name)

    def step(shapes: dict[str, tuple[int, ...]], flags: dict[str, Any], n: int = 1
             ) -> None:
        ps = [torch.nn.Parameter(torch.ones(s, dtype=tdt)) for s in shapes.values()]
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
        opt = fat.Adagrad(ps, lr=0.01, **flags)
        for _ in range(n):
            opt.step()

    def sparse() -> None:
        emb = torch.nn.Embedding(100, 8, sparse=True, dtype=tdt)
        emb(torch.tensor([1, 2, 2])).sum().backward()
        fat.Adagrad(emb.parameters(), lr=0.01).step()

    out = [(f"fastadagrad.torch.Adagrad{name}, {len(m)} tensors ({kind})",
            functools.partial(step, m, flags))
           for name, flags in (("", {}), ("(foreach=True)", {"foreach": True}),
                               ("(fused=True)", {"fused": True}))
           for m, kind in ((SMALL_MODEL, "serial"), (LARGE_MODEL, "parallel"))]
    # (lr_decay's repeated step reads the step counters with its own compiled call)
    out.append((f"fastadagrad.torch.Adagrad(lr_decay=0.1), {len(SMALL_MODEL)} tensors, "
                "3 steps", functools.partial(step, SMALL_MODEL, {"lr_decay": 0.1}, 3)))
    return [*out, ("fastadagrad.torch.Adagrad, sparse nn.Embedding gradient", sparse)]


def cache_dir() -> str | None:
    """Where Numba keeps fastadagrad's compiled kernels, or None if the cache is off."""
    for obj in vars(cpu).values():
        impl = getattr(getattr(obj, "_cache", None), "_impl", None)
        locator = getattr(impl, "locator", None)
        if locator is not None:
            return str(locator.get_cache_path())
    return None


def warmup(dtypes: Sequence[str] = DTYPES, presets: Sequence[str] = ("numpy",),
           echo: Callable[[str], Any] | None = print, rows: bool = False,
           torch: bool = False) -> dict[str, Any]:
    """Compile (or load from the cache) the kernels of a typical run.

    Args:
        dtypes: ``"float32"`` and/or ``"float64"``.
        presets: preset names (:data:`fastadagrad.PRESETS`); the default ``"numpy"`` is
            the formula of ``AdaGrad()`` and ``adagrad_update``.
        echo: called with one line per step; ``None`` prints nothing.
        rows: also the embedding-row updates (:class:`~fastadagrad.RowAdaGrad`).
        torch: also :class:`fastadagrad.torch.Adagrad`'s steps (imports torch; raises
            ImportError, before compiling anything, where torch is not installed).

    Returns:
        ``{"seconds": wall time, "compiled": functions compiled, "cache_dir": path or
        None}``.

    Example:
        >>> from fastadagrad.warmup import warmup
        >>> warmup(["float32"], echo=None)["seconds"] >= 0
        True
    """
    say = echo or (lambda _line: None)
    for p in presets:
        if p not in PRESETS:
            raise ValueError(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    dts = [np.dtype(d) for d in dtypes]
    if any(d not in (np.float32, np.float64) for d in dts):
        raise ValueError(f"dtypes must be float32 or float64, got {list(dtypes)}")
    if torch:
        import torch as _torch  # noqa: F401  (missing: the error before any compile)
    where = cache_dir()
    say("fastadagrad warmup: compiling the CPU kernels into Numba's on-disk cache"
        + (f" ({where})" if where else " -- the cache is OFF here (FASTADAGRAD_NO_CACHE, "
           "or no writable cache directory): kernels compile into this process only"))
    n0, t_start = _compile_notice.compile_count(), time.perf_counter()
    with _compile_notice.suppressed():  # this command reports compiles itself
        steps = [(preset, dt, what, call) for preset in presets for dt in dts
                 for what, call in _calls(dt, preset)]
        steps += [("rows", dt, what, call) for dt in dts if rows
                  for what, call in _row_calls(dt)]
        steps += [("torch", dt, what, call) for dt in dts if torch
                  for what, call in _torch_calls(dt)]
        for preset, dt, what, call in steps:
            c0, t0 = _compile_notice.compile_count(), time.perf_counter()
            call()
            dt_s = time.perf_counter() - t0
            c = _compile_notice.compile_count() - c0
            how = (f"compiled {c} function{'s' * (c != 1)}" if c
                   else "no compile needed (cached)")
            say(f"  {preset:<6} {dt.name:<7} {what:<66} {dt_s:7.2f} s  {how}")
    total = time.perf_counter() - t_start
    compiled = _compile_notice.compile_count() - n0
    if not where:
        tail = f"{compiled} function{'s' * (compiled != 1)} compiled, into this process only"
    elif compiled:
        tail = (f"{compiled} function{'s' * (compiled != 1)} compiled and written to the "
                "cache; later processes load them from it")
    else:
        tail = "every kernel was already in the cache"
    say(f"done in {total:.1f} s: {tail}")
    return {"seconds": total, "compiled": compiled, "cache_dir": where}


def _csv(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give a comma-separated list of {', '.join(choices)}")
        return items

    return parse


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastadagrad warmup", description=__doc__.splitlines()[0]
        .split(": ", 1)[1],
        epilog="Compiled kernels are kept in Numba's on-disk cache (next to the package, "
               "or in NUMBA_CACHE_DIR); run this with the same settings as the training "
               "job.")
    ap.add_argument("--dtype", type=_csv(DTYPES), default=list(DTYPES), metavar="LIST",
                    help="comma-separated dtypes to compile for (default: "
                         "float32,float64)")
    ap.add_argument("--preset", type=_csv(tuple(PRESETS)), default=["numpy"],
                    metavar="LIST",
                    help="comma-separated formulas to compile, by preset name: "
                         f"{', '.join(PRESETS)} (default: numpy, the formula of "
                         "AdaGrad() and adagrad_update)")
    ap.add_argument("--rows", action="store_true",
                    help="also the embedding-table updates (RowAdaGrad)")
    ap.add_argument("--torch", action="store_true",
                    help="also fastadagrad.torch.Adagrad's steps (needs torch)")
    ap.add_argument("--quiet", action="store_true", help="print nothing")
    args = ap.parse_args(argv)
    if args.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            ap.error("--torch: torch is not installed (pip install \".[torch]\")")
    warmup(args.dtype, args.preset, echo=None if args.quiet else print, rows=args.rows,
           torch=args.torch)
    return 0
