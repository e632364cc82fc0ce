"""What the benchmark reports say about the machine, read from the OS (Linux), never guessed.

Used by ``bench/conftest.py`` (recorded into the pytest-benchmark JSON),
``bench/report.py`` and ``bench/cpu_probe.py``; needs only the standard library.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")

#: Widest SIMD extension first: the first flag present names the vector width.
VECTOR_ISAS = (("avx512f", "AVX-512 (512-bit)"), ("avx2", "AVX2 (256-bit)"),
               ("avx", "AVX (256-bit)"), ("sse4_2", "SSE4.2 (128-bit)"),
               ("sse2", "SSE2 (128-bit)"), ("sve", "SVE"), ("asimd", "NEON (128-bit)"))


def _parse_size(text: str) -> int | None:
    """sysfs cache sizes look like ``32768K`` (or ``1M``); bytes, or None."""
    text = text.strip()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    digits = text[:-1] if text[-1:].upper() in "KMG" else text
    return int(digits) * mult if digits.isdigit() else None


def llc_bytes(cache_dir: Path = SYSFS_CACHE) -> int | None:
    """Size of the level-3 cache as sysfs reports it for cpu0, or None if it reports none.

    The L3 is shared by a group of cores; sysfs gives the size of the one cpu0 belongs
    to, which is what one process's working set competes for.
    """
    try:
        entries = sorted(cache_dir.glob("index*"))
    except OSError:
        return None
    for d in entries:
        try:
            if (d / "level").read_text().strip() == "3":
                return _parse_size((d / "size").read_text())
        except OSError:
            continue
    return None


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    if out:
                        break
                    continue
                key, _, val = line.partition(":")
                out.setdefault(key.strip(), val.strip())
    except OSError:
        pass
    return out


def cpu_model(info: dict[str, str] | None = None) -> str:
    info = _cpuinfo() if info is None else info
    return info.get("model name") or platform.processor() or "unknown"


def vector_isa(info: dict[str, str] | None = None) -> str:
    """The widest SIMD extension the CPU flags advertise, e.g. ``AVX-512 (512-bit)``."""
    info = _cpuinfo() if info is None else info
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return next((name for flag, name in VECTOR_ISAS if flag in flags), "unknown")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def facts() -> dict[str, Any]:
    """CPU model, vector width, CPUs, last-level cache and the load average now."""
    info = _cpuinfo()
    llc = llc_bytes()
    return {
        "cpu_model": cpu_model(info),
        "vector_isa": vector_isa(info),
        "os_cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus(),
        "llc_bytes": llc,  # None: sysfs reports no level-3 cache ("unknown")
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def fmt_llc(llc: object) -> str:
    if not isinstance(llc, int) or llc <= 0:
        return "unknown"
    return f"{llc / 2**20:,.0f} MiB" if llc >= 2**20 else f"{llc / 2**10:,.0f} KiB"


def write_results(path: Path, result: dict[str, Any], markdown: Any) -> None:
    """A probe's ``result`` as JSON at ``path`` and ``markdown(result)`` beside it (.md)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(result))
