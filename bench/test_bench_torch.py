"""torch models on the CPU: ``fastadagrad.torch.Adagrad`` against ``torch.optim.Adagrad``.

One ``optimizer.step()`` per call, adapter overhead included (gradient checks, address
reads, the plan lookup, the step counters), on two models whose parameters are torch
tensors with their gradients set, as after ``loss.backward()``:

- ``torch-model100``: the 100-tensor, 2.95M-parameter CNN-like model of
  ``bench/benchlib.model_shapes`` (float32);
- ``torch-mlp784-1024-512-10``: an MLP, weights and biases (float32);
- ``torch-net784-50-10`` (4 tensors, 39,760 parameters) and ``torch-1x1024`` (one
  tensor of 1,024): small models, where the fixed cost of a step decides;
- ``torch-resnet18-channels-last``: ResNet-18's 62 parameters (11.69M) after
  ``model.to(memory_format=torch.channels_last)``: its 4-d convolution weights, their
  gradients and sums are dense but not contiguous (float32).

Implementations: torch's three (default single-tensor, ``foreach=True``,
``fused=True``) and the adapter with the same three flag sets (each reproduces the bits
of the torch implementation the same flags select). Target: the adapter at least 1.5x
faster than torch fused on the 100-tensor model, for each flag set. Under
``--benchmark-disable`` each case runs once on a shrunken model (every dimension capped
at 8: the same 100 tensors, ~40k parameters) so CI stays quick.

``torch-model100-flushed``: the 100-tensor model, adapter ``fused=True`` against torch
fused, with the caches flushed (64 MiB written, untimed) before every timed step: the
state comes from DRAM, as in a training loop whose forward and backward pass evicted it.
No target; it shows how much of the margin over torch fused is left when the step is
bound by memory.

``torch-mlp784-1024-512-10-f64``: the MLP in float64, torch's default and fused steps
and the adapter with the same flags: torch's eager formula there goes through MKL's
float64 square root.

``torch-embedding-sparse``: one ``nn.Embedding(100_000, 64, sparse=True)`` table (float32)
with the sparse gradient of 16,384 skewed lookups (about a third of them distinct rows),
one step of ``torch.optim.Adagrad`` (default flags; its sparse branch) against the
adapter (the same bits). Disabled: a 1,000 x 16 table, 256 lookups.
"""

from __future__ import annotations

from typing import Any

import pytest

from bench import benchlib as B

FAST_TORCH = "fastadagrad.torch"
FAST_TORCH_FOREACH = "fastadagrad.torch foreach=True"
FAST_TORCH_FUSED = "fastadagrad.torch fused=True"
IMPLS = {
    FAST_TORCH: ("fastadagrad", {}),
    FAST_TORCH_FOREACH: ("fastadagrad", {"foreach": True}),
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


def resnet18_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-18 parameters in order: convolution weights, batch-norm
    weights and biases, the 1000-class head (62 tensors, 11,689,512 parameters)."""
    out: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for cout in (64, 128, 256, 512):
        for block in range(2):
            out += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if block == 0 and cout != cin:  # the downsampling shortcut
                out += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    return out + [(1000, 512), (1000,)]


MODELS = {"torch-model100": B.model_shapes, "torch-mlp784-1024-512-10": mlp_shapes,
          # small models, where each step's fixed costs decide
          "torch-net784-50-10": lambda: [(50, 784), (50,), (10, 50), (10,)],
          "torch-1x1024": lambda: [(1024,)],
          "torch-resnet18-channels-last": resnet18_shapes}
#: models whose 4-d weights are channels_last (``model.to(memory_format=...)``); their
#: gradients from autograd have the same strides
CHANNELS_LAST = {"torch-resnet18-channels-last"}


def make_step(impl: str, shapes: list[tuple[int, ...]], dtype: str = "float32",
              channels_last: bool = False) -> Any:
    torch = B.require_torch()
    lib, kw = IMPLS[impl]
    gen = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)

    def tensor(s: tuple[int, ...], scale: float) -> Any:
        t = torch.randn(s, generator=gen, dtype=dt) * scale
        return (t.contiguous(memory_format=torch.channels_last)
                if channels_last and len(s) == 4 else t)

    params = []
    for s in shapes:
        p = tensor(s, 0.1).requires_grad_()
        p.grad = tensor(s, 0.01)
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
    step = make_step(impl, shapes, channels_last=model in CHANNELS_LAST)
    run(step, scenario=model, impl=impl, dtype="float32", n=B.numel(shapes),
        tensors=len(shapes), group=f"{model} float32")


@pytest.mark.parametrize("impl", [FAST_TORCH, FAST_TORCH_FUSED, B.TORCH_FORLOOP,
                                  B.TORCH_FUSED])
def test_torch_mlp_float64(run: Any, disabled: bool, impl: str) -> None:
    shapes = mlp_shapes()
    if disabled:
        shapes = [tuple(min(d, 8) for d in s) for s in shapes]
    step = make_step(impl, shapes, "float64")
    run(step, scenario="torch-mlp784-1024-512-10-f64", impl=impl, dtype="float64",
        n=B.numel(shapes), tensors=len(shapes),
        group="torch-mlp784-1024-512-10-f64 float64")


#: Bytes written between two timed steps of ``torch-model100-flushed``: twice the
#: largest last-level cache seen on the project's machines (32 MiB), so that the
#: optimizer's state and the gradients start in DRAM, as after a forward and backward
#: pass over a model larger than the cache (back to back, the 100-tensor model's 35 MB
#: of parameters, gradients and sums partly stay in a 32 MiB L3 between steps).
FLUSH_BYTES = 64 << 20


@pytest.mark.parametrize("impl", [FAST_TORCH_FUSED, B.TORCH_FUSED])
def test_torch_model_flushed(run: Any, disabled: bool, impl: str) -> None:
    """The 100-tensor model's step with the caches flushed before each one (untimed)."""
    import numpy as np

    shapes = B.model_shapes()
    if disabled:
        shapes = [tuple(min(d, 8) for d in s) for s in shapes]
    step = make_step(impl, shapes)
    # ones, not zeros: untouched zeros are the kernel's one shared zero page, and
    # reading them would flush nothing
    buf = np.ones((4096 if disabled else FLUSH_BYTES) // 8)

    def flush() -> None:
        # reads every line: clean lines replace the model's in the caches (a written
        # buffer would leave dirty lines, whose write-backs the timed step would pay)
        buf.sum()

    run(step, scenario="torch-model100-flushed", impl=impl, dtype="float32",
        n=B.numel(shapes), tensors=len(shapes), setup=flush,
        group="torch-model100-flushed float32")


SPARSE_IMPLS = {FAST_TORCH: "fastadagrad", B.TORCH_FORLOOP: "torch"}


@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
@pytest.mark.parametrize("impl", list(SPARSE_IMPLS))
def test_torch_sparse_embedding(run: Any, disabled: bool, impl: str) -> None:
    torch = B.require_torch()
    rows, dim, lookups = (1_000, 16, 256) if disabled else (100_000, 64, 16_384)
    gen = torch.Generator().manual_seed(0)
    emb = torch.nn.Embedding(rows, dim, sparse=True)
    # skewed lookups (u^3: a few hot rows, many repeats, as a real batch has)
    idx = (torch.rand(lookups, generator=gen) ** 3 * rows).long()
    emb(idx).pow(2).sum().backward()  # the gradient nn.Embedding gives: not coalesced
    if SPARSE_IMPLS[impl] == "torch":
        opt = torch.optim.Adagrad(emb.parameters(), lr=B.LR, eps=B.EPS)
    else:
        import fastadagrad.torch

        opt = fastadagrad.torch.Adagrad(emb.parameters(), lr=B.LR, eps=B.EPS)
    run(opt.step, scenario="torch-embedding-sparse", impl=impl, dtype="float32",
        n=lookups * dim, rows=rows, lookups=lookups,
        group=f"torch-embedding-sparse {rows}x{dim} float32")
