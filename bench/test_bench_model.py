"""Scenarios (b) and (c): whole models through the dict API, one step per call.

(b) a 100-tensor, 2.95M-parameter CNN-like model, float32; (c) the 784-50-10 two-layer
network the NumPy class was written for, float32 and float64 (the original code
trains it in float64). Gradients are separately allocated arrays, as a backward pass
returns them, one set that every implementation reads (torch's and DeepSpeed's steps
read ``p.grad``, which cannot be switched between steps outside the timed region, so
no implementation switches). ``roofline`` moves the same number of bytes
over one flat buffer of the model's total size; ``plain numba`` calls the plain fused
loop (``bench/plain.py``) once per array.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest

from bench import benchlib as B
from fastadagrad import FlatBuffer, config

MODEL_IMPLS = (B.FAST, B.FAST_SERIAL, B.FAST_FLAT, B.NUMPY, B.TORCH_FORLOOP,
               B.TORCH_FOREACH, B.TORCH_FUSED, B.PLAIN, B.ROOFLINE, B.DEEPSPEED)

MODELS = {
    "b. model100": lambda: {f"t{i:02d}": s for i, s in enumerate(B.model_shapes())},
    "c. mlp784-50-10": B.two_layer_shapes,
}


def make_model_step(impl: str, shapes: dict[str, tuple[int, ...]], dtype: Any,
                    monkeypatch: pytest.MonkeyPatch) -> Any:
    params = B.tensors(shapes, dtype, seed=0)
    # one gradient set for every implementation: torch's and DeepSpeed's steps read
    # p.grad, which cannot be switched between steps without timing the switch, so the
    # others do not alternate either (the same arrays, the same cache footprint)
    grad_sets = [B.tensors(shapes, dtype, seed=1)]
    for gs in grad_sets:
        for v in gs.values():
            v *= 0.1
    if impl == B.FAST:
        return B.fast_dict(params, grad_sets)
    if impl == B.FAST_SERIAL:
        monkeypatch.setattr(config, "PARALLEL_THRESHOLD", sys.maxsize)
        return B.fast_dict(params, grad_sets)
    if impl == B.FAST_FLAT:  # params and grads live in flat buffers: one kernel call
        return B.fast_dict(FlatBuffer(params), [FlatBuffer(gs) for gs in grad_sets])
    if impl == B.NUMPY:
        return B.numpy_dict(params, grad_sets)
    if impl == B.PLAIN:  # one plain prange call per array
        return B.plain_dict(params, grad_sets)
    keys = list(shapes)
    if impl in B.TORCH_MODES:
        B.require_torch()
        return B.torch_step([params[k] for k in keys], [grad_sets[0][k] for k in keys],
                            impl)
    if impl == B.DEEPSPEED:
        B.require_deepspeed(dtype)
        return B.deepspeed_step([params[k] for k in keys],
                                [grad_sets[0][k] for k in keys])
    if impl == B.ROOFLINE:
        return B.roofline_step(B.numel(shapes), dtype)
    raise AssertionError(impl)


@pytest.mark.parametrize("impl", MODEL_IMPLS)
@pytest.mark.parametrize("model,dtype", [("b. model100", "float32"),
                                         ("c. mlp784-50-10", "float32"),
                                         ("c. mlp784-50-10", "float64")])
def test_model(run: Any, monkeypatch: pytest.MonkeyPatch, impl: str, model: str,
               dtype: str) -> None:
    shapes = MODELS[model]()
    step = make_model_step(impl, shapes, dtype, monkeypatch)
    run(step, scenario=model.split(" ", 1)[1], impl=impl, dtype=dtype,
        n=B.numel(shapes), tensors=len(shapes), group=f"{model} {dtype}")
