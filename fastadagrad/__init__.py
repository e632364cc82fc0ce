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
from .rows import RowAdaGrad, adagrad_update_rows

__all__ = ["AdaGrad", "FlatBuffer", "PRESETS", "RowAdaGrad", "Rule", "adagrad_update",
           "adagrad_update_rows"]
__version__ = "0.1.0"
