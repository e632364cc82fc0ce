"""torch models on the CPU: ``fastadagrad.torch.Adagrad`` against ``torch.optim.Adagrad``.

One ``optimizer.step()`` per call, adapter overhead included (gradient checks, address
reads, the plan lookup, the step counters), on two models whose parameters are torch
tensors with their gradients set, as after ``loss.backward()``:

- ``torch-model100``: the 100-tensor, 2.95M-parameter CNN-like model of
  ``bench/benchlib.model_shapes`` (float32);
- ``torch-mlp784-1024-512-10``: an MLP, weights and biases (float32).

Implementations: torch's three (default single-tensor, ``foreach=True``,
``fused=True``) and the adapter with the default flags and with ``fused=True`` (each
reproduces the bits of the torch implementation the same flags select). Target: the
adapter at least 1.5x faster than torch fused on the 100-tensor model. Under
``--benchmark-disable`` each case runs once on a shrunken model (every dimension capped
at 8: the same 100 tensors, ~40k parameters) so CI stays quick.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import benchlib as B

FAST_TORCH = "fastadagrad.torch"
FAST_TORCH_FUSED = "fastadagrad.torch fused=True"
IMPLS = {
    FAST_TORCH: ("fastadagrad", {}),
    FAST_TORCH_FUSED: ("fastadagrad", {"fused": True}),
    B.TORCH_FORLOOP: ("torch", {"foreach": False}),
    B.TORCH_FOREACH: ("torch", {"foreach": True}),
    B.TORCH_FUSED: ("torch", {"fused": True}),
}


def mlp_shapes() -> list[tuple[int, ...]]:
    sizes = (784, 1024, 512, 10)
    out: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        out += [(b, a), (b,)]
    return out


MODELS = {"torch-model100": B.model_shapes, "torch-mlp784-1024-512-10": mlp_shapes}


def make_step(impl: str, shapes: list[tuple[int, ...]]) -> Any:
    torch = B.require_torch()
    lib, kw = IMPLS[impl]
    gen = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = (torch.randn(s, generator=gen) * 0.1).requires_grad_()
        p.grad = torch.randn(s, generator=gen) * 0.01
        params.append(p)
    if lib == "torch":
        opt = torch.optim.Adagrad(params, lr=B.LR, eps=B.EPS, **kw)
    else:
        import fastadagrad.torch

        opt = fastadagrad.torch.Adagrad(params, lr=B.LR, eps=B.EPS, **kw)
    return opt.step


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("model", list(MODELS))
def test_torch_model(run: Any, disabled: bool, impl: str, model: str) -> None:
    shapes = MODELS[model]()
    if disabled:
        shapes = [tuple(min(d, 8) for d in s) for s in shapes]
    step = make_step(impl, shapes)
    run(step, scenario=model, impl=impl, dtype="float32", n=B.numel(shapes),
        tensors=len(shapes), group=f"{model} float32")
