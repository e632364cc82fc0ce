"""Framework presets: each framework's AdaGrad formula and defaults.

A preset is a :class:`~fastadagrad._hyper.Rule` (the formula, i.e. where every
rounding happens) plus default hyperparameters. ``AdaGrad.from_preset(name, **kw)``
and ``adagrad_update(..., preset=name)`` use them; keyword arguments override the
defaults, never the formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._hyper import Rule


@dataclass(frozen=True)
class Preset:
    name: str
    rule: Rule
    defaults: dict[str, Any] = field(default_factory=dict)
    formula: str = ""


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "numpy",
            Rule(),
            dict(lr=0.01, eps=1e-7, initial_accumulator_value=0.0),
            "h += g*g;  p -= lr*g / (sqrt(h) + eps)",
        ),
        Preset(
            "torch",
            Rule(fma_accumulate=True, weight_decay_mode="coupled"),
            dict(lr=0.01, eps=1e-10, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0),
            "g += wd*p;  h = fma(g, g, h);  p -= clr*g / (sqrt(h) + eps),  "
            "clr = lr / (1 + (step-1)*lr_decay)",
        ),
        Preset(
            "keras",
            Rule(eps_placement="inside", weight_decay_mode="decoupled"),
            dict(lr=0.001, eps=1e-7, initial_accumulator_value=0.1),
            "p -= p*wd*lr;  h += g*g;  p -= lr*g / sqrt(h + eps)",
        ),
        Preset(
            "optax",
            Rule(eps_placement="inside", lr_placement="after", zero_where_h0=True),
            dict(lr=0.01, eps=1e-7, initial_accumulator_value=0.1),
            "h += g*g;  p -= (g / sqrt(h + eps)) * lr  (0 where h == 0)",
        ),
        Preset(
            "tensorflow",
            Rule(),
            dict(lr=0.001, eps=1e-7, initial_accumulator_value=0.1),
            "h += g*g;  p -= lr*g / (sqrt(h) + eps)   (ApplyAdagradV2)",
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") \
            from None
