"""``njit`` with Numba's on-disk cache when it can be used, without it when it cannot.

A library must import and run where no cache directory is writable (read-only
site-packages, no writable ``$HOME``, a bad ``NUMBA_CACHE_DIR``). Numba fails there in
two ways: ``cache=True`` raises ``RuntimeError`` at decoration when it finds no cache
locator, and some locators (e.g. the one for packages imported from a zip file) are
accepted at decoration but raise ``OSError`` at the first compile, when the cache is
written. Both are caught here, before any kernel is used: the cache path is probed
at decoration and the function is compiled in memory if it cannot be created.

Loading from the cache: before its first load Numba refreshes its whole target
context, which imports and registers every lowering it has (``numba.np.arraymath``,
``linalg``, ``unicode``, the typed containers...: ~90 ms of a 0.41 s warm
import-and-first-update on a 2-core AMD EPYC), although the machine code it loads
needs none of it: only the runtime's C symbols (NRT), the helper symbols registered
when the context was created, and the threading layer (the cached parallel kernels
start it themselves). So a fastadagrad kernel's cache load initialises the runtime
and loads, and leaves the refresh to the first real compile, which always does it
(``numba.core.compiler.CompilerBase``). A library overload compiled into a kernel
(``carray``, ``np.searchsorted``...) is still found: loading rebuilds its environment,
which imports its Numba module (and whatever symbols that module registers), though
that costs the import (CONTRIBUTING rule 5). ``tests/test_startup.py`` loads the
typical first-step kernels this way in a fresh process and checks their bits.

Typing the arguments of a first call: Numba types an ndarray argument in Python the
first time it sees its (dtype, rank, layout), and that code starts by checking
``isinstance(val, np.ma.MaskedArray)``, which imports ``numpy.ma`` (~15-30 ms, most of
it building docstrings). A fastadagrad dispatcher types an exact ``np.ndarray`` itself,
with the same calls Numba makes after that check (an exact ndarray is never a masked
array) and hands everything else to Numba.

``config.LIGHT_START = False`` (or ``FASTADAGRAD_FULL_NUMBA_START=1``) restores Numba's
own load and typing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from . import _compile_notice, config

# one notice on stderr before the first real compile of a process (not on cache loads)
_compile_notice.install()


#: cache directory -> usable: one probe per directory, not per function (the module's
#: ~25 kernels share two or three directories)
_USABLE: dict[str, bool] = {}


def _cache_usable(dispatcher: Any) -> bool:
    try:
        locator = dispatcher._cache._impl.locator
        path = str(locator.get_cache_path())
    except AttributeError:  # a Numba without this internal layout: trust its cache
        return True
    usable = _USABLE.get(path)
    if usable is None:
        try:
            locator.ensure_cache_path()  # makedirs + a temporary file: raises if unusable
        except OSError:
            usable = False
        else:
            usable = True
        _USABLE[path] = usable
    return usable


def _light_loads(dispatcher: Any) -> None:
    """Make ``dispatcher``'s cache loads skip Numba's context refresh (module doc).

    Replaces the bound ``load_overload`` of this dispatcher's own cache object with
    Numba's body minus ``target_context.refresh()``: the runtime is initialised (it
    registers the NRT symbols the loaded code links against), then the usual guarded
    load. Left alone if Numba's cache does not have this layout.
    """
    cache = getattr(dispatcher, "_cache", None)
    load = getattr(cache, "_load_overload", None)
    guard = getattr(cache, "_guard_against_spurious_io_errors", None)
    if load is None or guard is None or not callable(getattr(cache, "load_overload", None)):
        return
    full = cache.load_overload

    def load_overload(sig: Any, target_context: Any) -> Any:
        if not config.LIGHT_START:
            return full(sig, target_context)
        from numba.core.runtime import nrt

        nrt.rtsys.initialize(target_context)
        with guard():
            return load(sig, target_context)
        return None  # the guard swallowed an I/O error: compile instead, as Numba does

    cache.load_overload = load_overload


def _light_typeof(dispatcher: Any) -> None:
    """Type exact ndarrays without Numba's ``numpy.ma`` check (module doc).

    The result is Numba's own ``_typeof_ndarray`` result: ``types.Array(from_dtype(
    dtype), ndim, map_layout(val), readonly=not writeable)``; any other value, or a
    dtype Numba does not take, goes to Numba's ``typeof_pyval``. Left alone if the
    dispatcher does not have this layout.
    """
    full = getattr(dispatcher, "typeof_pyval", None)
    active = getattr(dispatcher, "_types_active_call", None)
    if full is None or active is None:
        return
    from numba.core import types
    from numba.np import numpy_support

    def typeof_pyval(val: Any) -> Any:
        if type(val) is not np.ndarray or not config.LIGHT_START:
            return full(val)
        try:
            tp = types.Array(numpy_support.from_dtype(val.dtype), val.ndim,
                             numpy_support.map_layout(val), readonly=not val.flags.writeable)
        except Exception:  # a dtype Numba does not take: its own error path
            return full(val)
        dispatcher._types_active_call.add(tp)
        return tp

    dispatcher.typeof_pyval = typeof_pyval


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    def decorate(fn: Callable[..., Any]) -> Any:
        if config.CACHE:
            try:
                dispatcher = njit(cache=True, **options)(fn)
            except RuntimeError:  # no cache locator at all
                pass
            else:
                if _cache_usable(dispatcher):
                    _light_loads(dispatcher)
                    _light_typeof(dispatcher)
                    return dispatcher
        dispatcher = njit(cache=False, **options)(fn)
        _light_typeof(dispatcher)
        return dispatcher

    return decorate
