"""Framework presets: each framework's AdaGrad formula and defaults.

A preset is a :class:`~fastadagrad._hyper.Rule` (the formula, i.e. where every
rounding happens) plus default hyperparameters. ``AdaGrad.from_preset(name, **kw)``
uses them; keyword arguments override the defaults, never the formula.

Every formula below was read from the framework's source and then checked against the
framework itself (``tests/test_presets.py``); ``docs/presets.md`` has the table and the
measurements. Symbols: ``p`` parameter, ``g`` gradient, ``h`` accumulator (starts at
``initial_accumulator_value``), ``fma(a, b, c)`` = ``a*b + c`` rounded once; every other
operation rounds once in the parameter dtype, with every coefficient rounded to that
dtype first.

- ``numpy``: the NumPy class the project started from (bit-identical).
- ``torch``: ``torch.optim.Adagrad(fused=True)`` on the CPU, ATen's
  ``FusedAdagradKernel.cpp``, whose vector body and scalar tail both compile to FMAs
  for ``g + p*wd`` and ``h + g*g`` (and for ``1 + (step-1)*lr_decay``, in double) on
  x86-64 with ATen's AVX2 or AVX-512 kernels; bit-identical there in float32 and float64.
  With ``ATEN_CPU_CAPABILITY=default`` torch does no FMA and matches the same rule with
  the three ``fma_*`` flags off instead.
- ``keras``: Keras 3 ``keras.optimizers.Adagrad`` (``update_step`` and the base
  optimizer's decoupled ``_apply_weight_decay``), as executed op by op (eagerly);
  bit-identical there. Under XLA (``jit_compile``) the division by ``sqrt`` is
  rewritten to an ``rsqrt`` multiply, within a few ulp.
- ``optax``: ``optax.adagrad`` = ``scale_by_rss`` + ``scale_by_learning_rate``. The
  accumulator is bit-identical (XLA on the CPU contracts ``g*g + h`` into an FMA); the
  update uses XLA's ``rsqrt`` (not correctly rounded, up to 1 ulp off) where fastadagrad
  divides by an IEEE ``sqrt``, so updates agree within 4 ulp, not bit for bit.
- ``tensorflow``: TensorFlow's ``ApplyAdagradV2`` kernel (used by the Keras 2 /
  ``tf.keras.optimizers.legacy.Adagrad`` optimizer): the NumPy formula with
  TensorFlow's defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._hyper import Rule


@dataclass(frozen=True)
class Preset:
    """A framework's AdaGrad: its formula (``rule``), defaults and a readable formula."""

    name: str
    rule: Rule
    defaults: dict[str, Any] = field(default_factory=dict)
    formula: str = ""
    source: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "numpy",
            Rule(),
            dict(lr=0.01, eps=1e-7, initial_accumulator_value=0.0),
            "h = h + g*g;  p = p - (lr*g) / (sqrt(h) + eps)",
            "the NumPy AdaGrad class the project started from",
        ),
        Preset(
            "torch",
            Rule(fma_accumulate=True, fma_weight_decay=True, fma_lr_decay=True,
                 weight_decay_mode="coupled"),
            dict(lr=0.01, eps=1e-10, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, maximize=False),
            "clr = lr / fma(step-1, lr_decay, 1)  (double);  g = -g if maximize;  "
            "g = fma(p, wd, g);  h = fma(g, g, h);  p = p - (clr*g) / (sqrt(h) + eps)",
            "torch.optim.Adagrad(fused=True), CPU: aten/src/ATen/native/cpu/"
            "FusedAdagradKernel.cpp",
        ),
        Preset(
            "keras",
            Rule(eps_placement="inside", weight_decay_mode="decoupled"),
            dict(lr=0.001, eps=1e-7, initial_accumulator_value=0.1, weight_decay=0.0),
            "p = p - (p*wd)*lr;  h = h + g*g;  p = p - (lr*g) / sqrt(h + eps)",
            "keras.optimizers.Adagrad (Keras 3): keras/src/optimizers/adagrad.py, "
            "base_optimizer._apply_weight_decay",
        ),
        Preset(
            "optax",
            Rule(eps_placement="inside", lr_placement="after", zero_where_h0=True,
                 fma_accumulate=True),
            dict(lr=0.01, eps=1e-7, initial_accumulator_value=0.1),
            "h = fma(g, g, h);  u = g / sqrt(h + eps), 0 where h == 0;  p = p - u*lr",
            "optax.adagrad = chain(scale_by_rss, scale_by_learning_rate): "
            "optax/_src/transform.py, alias.py",
        ),
        Preset(
            "tensorflow",
            Rule(),
            dict(lr=0.001, eps=1e-7, initial_accumulator_value=0.1),
            "h = h + g*g;  p = p - (g*lr) / (sqrt(h) + eps)",
            "TensorFlow ApplyAdagradV2: tensorflow/core/kernels/training_ops.cc",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError listing the choices otherwise."""
    try:
        return PRESETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") \
            from None
