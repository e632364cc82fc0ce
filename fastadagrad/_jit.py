"""``njit`` with Numba's on-disk cache when it can be used, without it when it cannot.

A library must import and run where no cache directory is writable (read-only
site-packages, no writable ``$HOME``, a bad ``NUMBA_CACHE_DIR``). Numba fails there in
two ways: ``cache=True`` raises ``RuntimeError`` at decoration when it finds no cache
locator, and some locators (e.g. the one for packages imported from a zip file) are
accepted at decoration but raise ``OSError`` at the first compile, when the cache is
written. Both are caught here, before any kernel is used: the cache path is probed
at decoration and the function is compiled in memory if it cannot be created.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from numba import njit

from . import _compile_notice, config

# one notice on stderr before the first real compile of a process (not on cache loads)
_compile_notice.install()


def _cache_usable(dispatcher: Any) -> bool:
    try:
        locator = dispatcher._cache._impl.locator
    except AttributeError:  # a Numba without this internal layout: trust its cache
        return True
    try:
        locator.ensure_cache_path()  # makedirs + a temporary file: raises if unusable
    except OSError:
        return False
    return True


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    def decorate(fn: Callable[..., Any]) -> Any:
        if config.CACHE:
            try:
                dispatcher = njit(cache=True, **options)(fn)
            except RuntimeError:  # no cache locator at all
                pass
            else:
                if _cache_usable(dispatcher):
                    return dispatcher
        return njit(cache=False, **options)(fn)

    return decorate
