"""GPU benchmarks: fastadagrad's CUDA kernel vs torch.optim.Adagrad on CUDA and a copy.

Skipped (with the reason) without numba-cuda, torch with CUDA, or a GPU, and under the
CUDA simulator. Every timed function synchronizes the device before returning, so the
time is the GPU's, not the launch's. Groups: one per size, float32:

* ``fastadagrad``: ``adagrad_update`` on torch CUDA tensors (one fused launch on torch's
  current stream, 20 bytes per element);
* ``torch-foreach`` / ``torch-fused`` (when this torch supports fused Adagrad on CUDA) /
  ``torch-single``: ``torch.optim.Adagrad(...).step()`` on one parameter;
* ``copy``: a device-to-device ``copy_`` moving the same number of bytes (reads and
  writes 10 bytes per element each), the bandwidth ceiling.

Run: ``pytest bench/test_bench_gpu.py --benchmark-only``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("the CUDA simulator cannot be benchmarked", allow_module_level=True)
if not torch.cuda.is_available():
    pytest.skip("torch has no usable CUDA device", allow_module_level=True)
fcuda = pytest.importorskip("fastadagrad.cuda")
if fcuda.unavailable_reason() is not None:
    pytest.skip(f"numba-cuda cannot use the GPU: {fcuda.unavailable_reason()}",
                allow_module_level=True)

import fastadagrad  # noqa: E402

SIZES = [1 << 20, 1 << 24, 1 << 26]


def _tensors(n: int):
    gen = torch.Generator(device="cuda").manual_seed(n)
    p = torch.randn(n, device="cuda", generator=gen)
    g = torch.randn(n, device="cuda", generator=gen) * 1e-2
    h = torch.zeros(n, device="cuda")
    return p, g, h


def _run(benchmark, fn):
    fn()  # warm-up: JIT compilation and allocations stay out of the timing
    torch.cuda.synchronize()

    def timed():
        fn()
        torch.cuda.synchronize()

    rounds = int(os.environ.get("FASTADAGRAD_GPU_BENCH_ROUNDS", "30"))
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("n", SIZES)
def test_fastadagrad(benchmark, n):
    benchmark.group = f"gpu f32 n=2^{n.bit_length() - 1}"
    p, g, h = _tensors(n)
    _run(benchmark, lambda: fastadagrad.adagrad_update(p, g, h, lr=0.01))
    benchmark.extra_info["bytes"] = 5 * 4 * n


@pytest.mark.parametrize("impl", ["foreach", "fused", "single"])
@pytest.mark.parametrize("n", SIZES)
def test_torch_adagrad(benchmark, n, impl):
    benchmark.group = f"gpu f32 n=2^{n.bit_length() - 1}"
    p, g, _ = _tensors(n)
    param = torch.nn.Parameter(p)
    param.grad = g
    kw = {"foreach": impl == "foreach"} if impl != "fused" else {"fused": True}
    try:
        opt = torch.optim.Adagrad([param], lr=0.01, **kw)
        opt.step()
    except (RuntimeError, TypeError, ValueError) as exc:
        pytest.skip(f"torch Adagrad {impl} on CUDA unsupported here: {exc}")
    _run(benchmark, opt.step)
    benchmark.extra_info["bytes"] = 5 * 4 * n


@pytest.mark.parametrize("n", SIZES)
def test_copy(benchmark, n):
    benchmark.group = f"gpu f32 n=2^{n.bit_length() - 1}"
    src = torch.empty(5 * n // 2, device="cuda")
    dst = torch.empty_like(src)
    _run(benchmark, lambda: dst.copy_(src))
    benchmark.extra_info["bytes"] = 5 * 4 * n


def test_fastadagrad_matches_torch_fused_rule_on_gpu():
    """Not a timing: the torch preset on CUDA tensors equals the CPU kernel bit for bit."""
    rule = fastadagrad.PRESETS["torch"].rule
    n = (1 << 20) + 3
    p, g, h = _tensors(n)
    pc, gc, hc = (t.cpu().numpy() for t in (p, g, h))
    for step in (1, 2, 3):
        fastadagrad.adagrad_update(p, g, h, lr=0.01, eps=1e-10, weight_decay=0.01,
                                   step=step, rule=rule)
        fastadagrad.adagrad_update(pc, gc, hc, lr=0.01, eps=1e-10, weight_decay=0.01,
                                   step=step, rule=rule)
    torch.cuda.synchronize()
    np.testing.assert_array_equal(p.cpu().numpy(), pc)
    np.testing.assert_array_equal(h.cpu().numpy(), hc)


# --- whole models of separate tensors ------------------------------------------------

def _model_shapes(name: str):
    from bench.benchlib import model_shapes

    if name == "cnn100":  # 100 tensors, 2.95M parameters
        return model_shapes()
    return [(1024, 784), (1024,), (512, 1024), (512,), (10, 512), (10,)]  # the MLP


MODELS = ["cnn100", "mlp"]


def _torch_model(name: str):
    gen = torch.Generator(device="cuda").manual_seed(3)
    ps = [torch.randn(s, device="cuda", generator=gen) for s in _model_shapes(name)]
    gs = [torch.randn(s, device="cuda", generator=gen) * 1e-2 for s in _model_shapes(name)]
    return ps, gs


@pytest.mark.parametrize("model", MODELS)
def test_model_fastadagrad(benchmark, model):
    """AdaGrad.update over the model's separate torch tensors: one launch per step."""
    benchmark.group = f"gpu model {model}"
    ps, gs = _torch_model(model)
    opt = fastadagrad.AdaGrad.from_preset("torch", lr=0.01)
    _run(benchmark, lambda: opt.update(ps, gs))


@pytest.mark.parametrize("model", MODELS)
def test_model_fastadagrad_torch(benchmark, model):
    """``fastadagrad.torch.Adagrad`` (torch's single-tensor bits) on the model's
    parameters: the drop-in optimizer, adapter overhead included."""
    from fastadagrad.torch import Adagrad

    benchmark.group = f"gpu model {model}"
    ps, gs = _torch_model(model)
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    opt = Adagrad(params, lr=0.01)
    _run(benchmark, opt.step)


@pytest.mark.parametrize("impl", ["foreach", "single"])
@pytest.mark.parametrize("model", MODELS)
def test_model_torch(benchmark, model, impl):
    benchmark.group = f"gpu model {model}"
    ps, gs = _torch_model(model)
    params = [torch.nn.Parameter(p) for p in ps]
    for p, g in zip(params, gs):
        p.grad = g
    opt = torch.optim.Adagrad(params, lr=0.01, foreach=impl == "foreach")
    _run(benchmark, opt.step)
