"""fastadagrad: the AdaGrad update fused into one compiled pass over memory, CPU and GPU.

>>> import numpy as np, fastadagrad
>>> opt = fastadagrad.AdaGrad(lr=0.01)          # drop-in for the NumPy class

See :func:`adagrad_update`, :class:`AdaGrad`, :class:`FlatBuffer`.
"""

from . import config

config.apply_thread_env()  # before Numba starts its OpenMP pool (see config.py)

from ._hyper import Rule  # noqa: E402
from .flat import FlatBuffer  # noqa: E402
from .optim import AdaGrad, adagrad_update  # noqa: E402
from .presets import PRESETS  # noqa: E402

__all__ = ["AdaGrad", "FlatBuffer", "PRESETS", "Rule", "adagrad_update"]
__version__ = "0.1.0"
