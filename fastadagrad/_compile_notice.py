"""Say once, on stderr, that fastadagrad's kernels are being compiled.

Numba compiles a kernel the first time it is called with new argument types unless its
on-disk cache already holds it. On a fresh 2-core machine the first ``AdaGrad.update``
of a process with an empty cache took 7.5 s and 10.9 s (two runs), with nothing on the
screen. So the first real compile of a fastadagrad kernel in a process logs one message
(logger ``"fastadagrad"``, level WARNING: Python's last-resort handler prints it on
stderr when the application has configured no logging). Loads from the cache are
silent. Silence the message with::

    logging.getLogger("fastadagrad").setLevel(logging.ERROR)

The hook is Numba's event API: a dispatcher fires ``"numba:compile"`` only around a
real compile (after its cache lookup missed), so a warm call costs nothing extra.
:func:`install` registers the listener (``_jit.py`` does it at import, for every CPU
kernel); pass it ``numba.cuda.core.event`` to hear numba-cuda's compiles as well (it
keeps its own event registry). :func:`compile_count` and :func:`compile_seconds` let
``python -m fastadagrad warmup`` say what it compiled.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

LOGGER = logging.getLogger("fastadagrad")

_lock = threading.Lock()
_installed: set[str] = set()
_state = {"noticed": False, "suppressed": 0, "count": 0, "depth": 0, "seconds": 0.0,
          "t0": 0.0}


def _ours(event: Any) -> Any:
    """The dispatcher behind ``event`` if it compiles a fastadagrad function, else None."""
    data = event.data if isinstance(event.data, dict) else {}
    disp = data.get("dispatcher")
    module = getattr(getattr(disp, "py_func", None), "__module__", "") or ""
    return disp if module.split(".")[0] == "fastadagrad" else None


def _user_dtypes(event: Any) -> list[str]:
    """The dtypes the notice names: those of the floating-point array arguments the
    kernel may write, which are the caller's params and states (or the prototype array
    that carries their dtype to the many-array kernels). Read-only arrays (the float64
    coefficient table of every call) and integer arrays (address and chunk tables,
    16-bit patterns) are fastadagrad's own: naming them said ``(float32, float64)`` for
    a float32 call."""
    return sorted({str(a.dtype) for a in event.data.get("args", ())
                   if hasattr(a, "ndim") and getattr(a, "mutable", True)
                   and str(getattr(a, "dtype", "")).startswith("float")})


def _message(disp: Any, event: Any) -> str:
    name = getattr(disp.py_func, "__name__", "a kernel")
    dtypes = _user_dtypes(event)
    what = f"{name} ({', '.join(dtypes)})" if dtypes else name
    cached = type(getattr(disp, "_cache", None)).__name__ != "NullCache"
    later = ("Numba caches the result on disk, so later processes load it in well under "
             "a second; `python -m fastadagrad warmup` compiles ahead of time" if cached else
             "Numba's on-disk cache is off or not writable here, so every new process "
             "compiles again")
    return (f"fastadagrad: compiling {what} and the kernels it needs on first use; this "
            f"can take several seconds. {later}. Silence this message with "
            "logging.getLogger('fastadagrad').setLevel(logging.ERROR).")


def _on_start(event: Any) -> None:
    disp = _ours(event)
    if disp is None:
        return
    with _lock:
        _state["count"] += 1
        _state["depth"] += 1
        if _state["depth"] == 1:
            _state["t0"] = time.perf_counter()
        say = not _state["noticed"] and not _state["suppressed"]
        if say:
            _state["noticed"] = True
    if say:
        LOGGER.warning(_message(disp, event))


def _on_end(event: Any) -> None:
    if _ours(event) is None:
        return
    with _lock:
        _state["depth"] -= 1
        if _state["depth"] == 0:  # nested compiles are inside the outer one's time
            _state["seconds"] += time.perf_counter() - _state["t0"]


def install(event_module: ModuleType | None = None) -> None:
    """Listen to ``event_module``'s compile events (default ``numba.core.event``).

    Idempotent per module. Call it before the first kernel runs.
    """
    if event_module is None:
        from numba.core import event as event_module
    with _lock:
        if event_module.__name__ in _installed:
            return
        _installed.add(event_module.__name__)

    class _Listener(event_module.Listener):  # type: ignore[name-defined, misc]
        def on_start(self, event: Any) -> None:
            _on_start(event)

        def on_end(self, event: Any) -> None:
            _on_end(event)

    event_module.register("numba:compile", _Listener())


def compile_count() -> int:
    """How many fastadagrad functions Numba has compiled in this process (cache loads
    not counted; a kernel's inlined helpers count separately)."""
    return int(_state["count"])


def compile_seconds() -> float:
    """Wall time spent compiling fastadagrad functions in this process (outermost
    compiles only, so nested ones are not counted twice)."""
    return float(_state["seconds"])


@contextlib.contextmanager
def suppressed() -> Iterator[None]:
    """No notice inside this block (the warm-up command reports compiles itself)."""
    with _lock:
        _state["suppressed"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["suppressed"] -= 1


def reset() -> None:
    """Forget that the notice was given (tests)."""
    with _lock:
        _state["noticed"] = False
