"""Half-precision formats, rounding modes and the counter-based random stream.

Shared by the half-precision kernels (``cpu_half.py``, ``cuda_half.py``), their
dispatcher and the NumPy reference, so that all of them name the formats, derive the
per-step keys and draw the per-element random bits the same way. Plain Python/NumPy:
importing it compiles nothing and does not import ``ml_dtypes`` (a bfloat16 array is
recognised by its dtype's name; whoever holds one has ``ml_dtypes`` already).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Rounding = Literal["nearest", "stochastic"]
ROUNDINGS = ("nearest", "stochastic")

#: The 16-bit parameter formats, by dtype name, and their carrier integer dtype (the
#: kernels see the bits through ``arr.view(carrier)``; see cpu_half.py).
HALF_CARRIERS = {"bfloat16": np.dtype(np.int16), "float16": np.dtype(np.uint16)}

_M64 = (1 << 64) - 1
_M32 = np.uint64(0xFFFFFFFF)


_CARRIER_OF: dict[Any, np.dtype | None] = {}


def carrier_of(dtype: Any) -> np.dtype | None:
    """The carrier dtype of a 16-bit float dtype (NumPy float16, ``ml_dtypes.bfloat16``,
    torch's two), else None. Memoised by dtype: on the float32 path this is one dict
    lookup per call (``dtype.name`` alone costs ~0.5 us)."""
    try:
        return _CARRIER_OF[dtype]
    except KeyError:
        pass
    except TypeError:  # unhashable: not a dtype
        return None
    if isinstance(dtype, np.dtype):  # (byte-swapped: not a 16-bit float the kernels read)
        c = HALF_CARRIERS.get(dtype.name) if dtype.itemsize == 2 and dtype.isnative else None
    else:
        c = {"torch.bfloat16": HALF_CARRIERS["bfloat16"],
             "torch.float16": HALF_CARRIERS["float16"]}.get(str(dtype))
    if len(_CARRIER_OF) < 256:
        _CARRIER_OF[dtype] = c
    return c


def is_half(dtype: Any) -> bool:
    """True for NumPy's float16 and ``ml_dtypes.bfloat16`` (and torch's two)."""
    return carrier_of(dtype) is not None


def check_rounding(rounding: object) -> Rounding:
    if not isinstance(rounding, str) or rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    return rounding  # type: ignore[return-value]


def check_seed(seed: object) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= _M64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def check_options(rounding: object, seed: object) -> tuple[Rounding, int | None]:
    r = check_rounding(rounding)
    s = None if seed is None else check_seed(seed)
    if r == "stochastic" and s is None:
        raise ValueError("rounding='stochastic' needs seed= (an int); the random bits "
                         "come from (seed, step, element), so pass a different step "
                         "at every call")
    return r, s


def _splitmix64(x: int) -> int:
    """Steele, Lea & Flood's SplitMix64 output function (JDK 8 / Vigna)."""
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def stream_key(seed: int, step: int, tensor: int = 0) -> tuple[np.uint32, np.uint32]:
    """The two 32-bit key words of the random stream of (``seed``, ``step``, ``tensor``).

    ``tensor`` is the array's position in the model (0 for the functional call).
    """
    k = _splitmix64(_splitmix64(_splitmix64(seed) ^ step) ^ tensor)
    return np.uint32(k & 0xFFFFFFFF), np.uint32(k >> 32)


def _mix32(x: np.ndarray) -> np.ndarray:
    """'lowbias32' (C. Wellons, 2018) on uint64 arrays holding 32-bit values."""
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(0x7FEB352D)) & _M32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(0x846CA68B)) & _M32
    return x ^ (x >> np.uint64(16))


def rand32(k0: np.uint32, k1: np.uint32, idx: np.ndarray) -> np.ndarray:
    """Random bits of elements ``idx``: ``mix(mix(lo32(idx) ^ k0) ^ hi32(idx) ^ k1)``.

    The NumPy statement of what the kernels compute (``cpu_half.rand32``).
    """
    i = np.asarray(idx).astype(np.uint64)
    x = _mix32((i & _M32) ^ np.uint64(k0))
    return _mix32(x ^ (i >> np.uint64(32)) ^ np.uint64(k1)).astype(np.uint32)


def round_to(x: np.ndarray, dtype: np.dtype, rounding: Rounding = "nearest",
             bits: np.ndarray | None = None) -> np.ndarray:
    """float32 ``x`` rounded to the 16-bit ``dtype``, in plain NumPy.

    ``"nearest"`` is ``x.astype(dtype)``. ``"stochastic"`` rounds up with probability
    (distance to the lower neighbour) / (gap between neighbours), using the random
    ``bits`` (uint32, one per element): for bfloat16 the low 16 bits are added to the
    16 bits that are dropped; for float16 the high 24 bits give ``u`` in [0, 1), and
    ``u < frac`` rounds up. NaN, inf and values that round to inf keep the nearest
    result.
    """
    x = np.asarray(x, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        near = x.astype(dtype)
    if rounding == "nearest":
        return near
    assert bits is not None
    nb = near.view(np.uint16)
    if dtype.name == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        finite = (u & np.uint64(0x7FFFFFFF)) < np.uint64(0x7F800000)
        r = ((u + (bits.astype(np.uint64) & np.uint64(0xFFFF))) >> np.uint64(16))
        out = np.where(finite, (r & np.uint64(0xFFFF)).astype(np.uint16), nb)
        return out.view(dtype)
    a = np.abs(x)
    na = nb & np.uint16(0x7FFF)
    xa = na.view(np.float16).astype(np.float32)
    keep = ~(a < np.float32(65520.0)) | (xa == a)
    up = xa > a
    lo = np.where(up, na - np.uint16(1), na).astype(np.uint16)
    hi = np.where(up, na, na + np.uint16(1)).astype(np.uint16)
    wl = lo.view(np.float16).astype(np.float32)
    wh = hi.view(np.float16).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = (a - wl) / (wh - wl)
    u = (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    mag = np.where(u < frac, hi, lo)
    out = np.where(keep, nb, mag | (nb & np.uint16(0x8000))).astype(np.uint16)
    return out.view(dtype)
