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
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastadagrad' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
