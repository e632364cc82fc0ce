"""Flat buffers: a whole model's tensors as views into one contiguous 1-D array."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ._arrays import is_cuda_array
from ._rounding import is_half


class FlatBuffer(Mapping[Any, Any]):
    """One contiguous 1-D buffer holding many tensors, handed out as shaped views.

    Pack a model's parameters once, give the views back to the layers, and keep the
    gradients and the optimizer state in buffers of the same layout: then one kernel
    call updates the whole model (``AdaGrad.update`` detects buffers of one layout).

    ``FlatBuffer`` is a read-only ``Mapping`` from the original keys (or ``0..n-1``
    for a sequence) to views; writing into a view writes into :attr:`data`.

    Example:
        >>> import numpy as np, fastadagrad
        >>> params = fastadagrad.FlatBuffer({"W": np.ones((2, 3)), "b": np.zeros(3)})
        >>> grads = params.zeros_like()
        >>> params["W"].shape, params.data.shape
        ((2, 3), (9,))
    """

    __slots__ = ("data", "layout", "_views")

    def __init__(self, arrays: Mapping[Any, Any] | Sequence[Any], *,
                 dtype: Any = None) -> None:
        if not (isinstance(arrays, Mapping) or isinstance(arrays, Sequence)
                and not isinstance(arrays, (str, bytes))):
            raise TypeError("FlatBuffer packs a dict or a list/tuple of arrays, got "
                            f"{type(arrays).__module__}.{type(arrays).__qualname__}")
        items = list(arrays.items()) if isinstance(arrays, Mapping) else list(
            enumerate(arrays))
        ma = sys.modules.get("numpy.ma")  # (not imported: no masked array exists)
        for key, a in items:
            if ma is not None and isinstance(a, ma.MaskedArray):  # asarray drops the mask
                raise TypeError(f"arrays[{key!r}] is a masked array: the packed copy "
                                "would keep the masked values and lose the mask; pass "
                                "a plain array (np.ma.filled(a, value) or a.data)")
        host = [np.asarray(a) if not is_cuda_array(a) else None for _, a in items]
        for (key, _), h in zip(items, host, strict=True):
            if h is None:
                raise TypeError(f"arrays[{key!r}] is a CUDA array; FlatBuffer packs host "
                                "arrays: build it on the host and call .to_device()")
        if dtype is None:
            first: dict[Any, Any] = {}  # dtype -> first key holding it (to name it)
            for (key, _), h in zip(items, host, strict=True):
                assert h is not None
                first.setdefault(h.dtype, key)
            if len(first) > 1:
                (k0, d0), (k1, d1) = [(k, d) for d, k in first.items()][:2]
                raise TypeError(f"arrays[{k1!r}] has dtype {d1} but arrays[{k0!r}] has "
                                f"dtype {d0}; pass dtype= (one kernel call needs one "
                                "dtype)")
            dtype = next(iter(first)) if first else np.float32
            if first and np.dtype(dtype) not in (np.dtype(np.float32),
                                                 np.dtype(np.float64)):
                d = np.dtype(dtype)
                convertible = d.kind in "biuf" or is_half(d)
                raise TypeError(f"arrays[{first[dtype]!r}] has dtype {d}; FlatBuffer "
                                "holds float32 or float64" + (
                                    " (pass dtype= to convert)" if convertible else
                                    ": a plain array of real numbers is needed"))
        dt = np.dtype(dtype)
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"FlatBuffer dtype must be float32 or float64, got {dt}")
        for (key, _), h in zip(items, host, strict=True):
            assert h is not None
            # complex, object, strings: no lossless cast (bfloat16 is kind 'V' but
            # widens exactly, as float16 does)
            if h.dtype.kind not in "biuf" and not is_half(h.dtype):
                raise TypeError(f"arrays[{key!r}] has dtype {h.dtype}, which does not "
                                f"convert to {dt}")
        layout = []
        off = 0
        for (key, _), h in zip(items, host):
            assert h is not None
            layout.append((key, tuple(h.shape), off, int(h.size)))
            off += int(h.size)
        data = np.empty(off, dt)
        for (_, _shape, o, n), h in zip(layout, host):
            assert h is not None
            data[o:o + n] = h.reshape(-1)
        self._init(data, tuple(layout))

    def _init(self, data: Any, layout: tuple[tuple[Any, tuple[int, ...], int, int], ...]
              ) -> None:
        self.data = data
        self.layout = layout
        self._views = {key: data[o:o + n].reshape(shape) for key, shape, o, n in layout}

    @classmethod
    def _from(cls, data: Any, layout: tuple[tuple[Any, tuple[int, ...], int, int], ...]
              ) -> FlatBuffer:
        self = cls.__new__(cls)
        self._init(data, layout)
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        """Copy and pickle the buffer and layout; the views are rebuilt over the copy
        (a default deep copy would give views that no longer point into ``data``)."""
        return (FlatBuffer._from, (self.data, self.layout))

    def full_like(self, value: float) -> FlatBuffer:
        """A new buffer of the same layout, dtype and device, filled with ``value``."""
        if is_cuda_array(self.data):
            from . import cuda

            return FlatBuffer._from(cuda.full(self.data.size, self.data.dtype, value),
                                    self.layout)
        return FlatBuffer._from(np.full(self.data.size, value, self.data.dtype),
                                self.layout)

    def zeros_like(self) -> FlatBuffer:
        return self.full_like(0.0)

    def same_layout(self, other: object) -> bool:
        return isinstance(other, FlatBuffer) and (
            (other.layout is self.layout or other.layout == self.layout)
            and other.data.dtype == self.data.dtype)

    def to_device(self) -> FlatBuffer:
        """A copy on the current CUDA device (needs numba-cuda and a GPU)."""
        from . import cuda

        return FlatBuffer._from(cuda.to_device(self.data), self.layout)

    def to_host(self) -> FlatBuffer:
        if is_cuda_array(self.data):
            return FlatBuffer._from(self.data.copy_to_host(), self.layout)
        return FlatBuffer._from(self.data.copy(), self.layout)

    def __getitem__(self, key: Any) -> Any:
        return self._views[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._views)

    def __len__(self) -> int:
        return len(self._views)

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self)} tensors, {self.data.size} elements, "
                f"dtype={self.data.dtype})")


def layout_of(items: list[tuple[Any, Any]]) -> list[tuple[Any, tuple[int, ...], int, int]]:
    """``(key, shape, offset, size)`` of each ``(key, array)`` packed one after another."""
    out, off = [], 0
    for key, a in items:
        n = int(np.size(a))
        out.append((key, tuple(np.shape(a)), off, n))
        off += n
    return out
