"""Fixtures for the benchmark suite (pytest-benchmark).

``make bench`` runs ``pytest bench --benchmark-only`` and times every case;
``make test`` runs ``pytest tests bench --benchmark-disable``, which calls each
benchmark function once, untimed, on small inputs, so a broken benchmark fails CI.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from bench import benchlib, machine


def timing_disabled(config: pytest.Config) -> bool:
    return bool(config.getoption("benchmark_disable", default=False))


@pytest.fixture
def disabled(request: pytest.FixtureRequest) -> bool:
    """True under ``--benchmark-disable``: run once, small, untimed."""
    return timing_disabled(request.config)


@pytest.fixture
def elements(disabled: bool) -> Callable[[int], int]:
    """``elements(k)``: 2^k, capped at 2^CI_MAX_EXPONENT when timing is disabled."""
    def f(exponent: int) -> int:
        return 1 << (min(exponent, benchlib.CI_MAX_EXPONENT) if disabled else exponent)

    return f


@pytest.fixture
def run(benchmark: Any, disabled: bool) -> Callable[..., None]:
    """``run(step, scenario=..., impl=..., dtype=..., n=...)``: warm up, then time ``step``
    (with ``setup=``: ``rounds`` timed calls, each after an untimed ``setup()``).

    The warm-up calls compile the kernels (or load them from Numba's cache), fault in
    every page of the state arrays and let torch create its lazy state, so none of it
    is timed. ``extra_info`` carries what ``bench/report.py`` needs: scenario, impl,
    dtype, element count and the effective bytes per step (p, g, h read; p, h written).
    """
    def go(step: Callable[[], Any], *, scenario: str, impl: str, dtype: Any, n: int,
           group: str, warmup: int = 3, setup: Callable[[], Any] | None = None,
           rounds: int = 30, **extra: Any) -> None:
        dt = np.dtype(dtype)
        benchmark.group = group
        for _ in range(1 if disabled else warmup):
            step()
        benchmark.extra_info.update(
            scenario=scenario, impl=impl, dtype=dt.name, n=int(n),
            bytes=int(5 * dt.itemsize * n), **extra)
        if setup is None:
            benchmark(step)
        else:  # untimed ``setup()`` before every timed call, ``rounds`` calls
            benchmark.pedantic(step, setup=setup, rounds=rounds)

    return go


_LOAD_AT_START: tuple[float, float, float] | None = None


def pytest_sessionstart(session: pytest.Session) -> None:
    global _LOAD_AT_START
    _LOAD_AT_START = os.getloadavg()


def _threading_layer() -> str:
    import numba

    try:
        return str(numba.threading_layer())  # the layer actually in use
    except ValueError:  # no parallel kernel has run in this process
        return f"{numba.config.THREADING_LAYER} (none started)"


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return str(getattr(m, "__version__", "?"))
    except Exception:
        return "not installed"


def pytest_benchmark_update_machine_info(config: pytest.Config,
                                         machine_info: dict[str, Any]) -> None:
    """Record what the report's footnote names: CPU, threads, versions, command."""
    import numba

    import fastadagrad

    threads: dict[str, Any] = {
        "numba": numba.get_num_threads(),
        "numba_threading_layer": _threading_layer(),
        "os_cpu_count": os.cpu_count(),
    }
    try:
        import torch

        threads["torch"] = torch.get_num_threads()
    except ImportError:
        pass
    facts = machine.facts()
    threads["usable_cpus"] = facts["usable_cpus"]
    machine_info["fastadagrad"] = {
        "cpu_model": facts["cpu_model"],
        # from /proc/cpuinfo's flags and sysfs (None: not reported, shown as "unknown");
        # py-cpuinfo's l3_cache_size in machine_info["cpu"] is not used: it printed
        # 1 MiB (the L2) for a 32 MiB L3 on one machine and 480 MiB on another
        "vector_isa": facts["vector_isa"],
        "llc_bytes": facts["llc_bytes"],
        "threads": threads,
        "versions": {
            "fastadagrad": fastadagrad.__version__,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "torch": _version("torch"),
            "deepspeed": _version("deepspeed"),
            "python": platform.python_version(),
        },
        "parallel_threshold": __import__("fastadagrad.config").config.PARALLEL_THRESHOLD,
        "chunk": __import__("fastadagrad.config").config.CHUNK,
        "command": "python -m pytest " + shlex.join(sys.argv[1:]),
        # The machine is shared: other processes on its 2 cores show up as noise.
        "loadavg_start": _LOAD_AT_START,
        "loadavg_end": os.getloadavg(),
    }
