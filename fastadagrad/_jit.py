"""``njit`` with Numba's on-disk cache when it can be used, without it when it cannot.

Numba raises ``RuntimeError`` at decoration time when ``cache=True`` finds no writable
cache directory (read-only site-packages, no writable ``$HOME``, bad
``NUMBA_CACHE_DIR``). A library must still import there: compile in memory instead.
"""

from __future__ import annotations

from typing import Any, Callable

from numba import njit

from . import config


def jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    def decorate(fn: Callable[..., Any]) -> Any:
        if config.CACHE:
            try:
                return njit(cache=True, **options)(fn)
            except RuntimeError:
                pass  # no writable cache location: fall through to an uncached build
        return njit(cache=False, **options)(fn)

    return decorate
