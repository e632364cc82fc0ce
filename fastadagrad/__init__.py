"""fastadagrad: the AdaGrad update fused into one compiled pass over memory, CPU and GPU.

>>> import numpy as np, fastadagrad
>>> opt = fastadagrad.AdaGrad(lr=0.01)          # drop-in for the NumPy class

See :func:`adagrad_update`, :class:`AdaGrad`, :class:`FlatBuffer`; for PyTorch,
``fastadagrad.torch.Adagrad`` (imported on its own: ``import fastadagrad`` does not import torch).
"""

from ._hyper import Rule
from .flat import FlatBuffer
from .optim import AdaGrad, adagrad_update
from .presets import PRESETS

__all__ = ["AdaGrad", "FlatBuffer", "PRESETS", "RowAdaGrad", "Rule", "adagrad_update",
           "adagrad_update_rows"]
__version__ = "0.1.0"

#: names imported on first access (PEP 562): ``import fastadagrad`` is what a training
#: script pays before its first step, and the row-wise optimizer's modules took ~10 ms
#: of it (2-core AMD EPYC) for a class a dense model never uses
_LAZY = {"RowAdaGrad": "rows", "adagrad_update_rows": "rows"}


def __getattr__(name: str) -> object:
    """``fastadagrad.RowAdaGrad`` and friends, and submodules (``fastadagrad.checkpoint``,
    ``fastadagrad.torch``...), imported when first asked for."""
    import importlib
    import importlib.util

    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastadagrad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
