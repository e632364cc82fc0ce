"""Real-GPU tests with torch CUDA tensors (and CuPy arrays where installed): CUDA-graph
capture of the optimizer step, one launch per dtype for a torch model, checkpoints of
torch/CuPy device state, two-device errors. Skipped without torch CUDA (and always under
the simulator, which has no torch interop)."""

from __future__ import annotations

import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("torch CUDA tensors need a real GPU", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch has no usable CUDA device", allow_module_level=True)

import fastadagrad as fa  # noqa: E402
from fastadagrad import cuda as fcuda  # noqa: E402

if fcuda.unavailable_reason() is not None:
    pytest.skip(fcuda.unavailable_reason(), allow_module_level=True)


def _model(seed=0, shapes=((64, 33), (33,), (7, 5, 3), (1,))):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    ps = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    gs = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    return ps, gs


@pytest.mark.parametrize("nonfinite", ["ignore", "skip"])
def test_cuda_graph_capture_replay_matches_eager(nonfinite):
    """torch.cuda.graph capture of AdaGrad(capturable=True).update, replayed, gives the
    same bits as eager steps (lr_decay and a skipped step included)."""
    kw = dict(lr=0.05, lr_decay=0.1, weight_decay=0.01, nonfinite=nonfinite)
    ps, gs = _model()
    eager_p = [p.clone() for p in ps]
    eager = fa.AdaGrad.from_preset("torch", **kw)
    graph_opt = fa.AdaGrad.from_preset("torch", capturable=True, **kw)
    static_g = [g.clone() for g in gs]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up: compiles, builds the tables
        graph_opt.update(ps, static_g)
    torch.cuda.current_stream().wait_stream(s)
    eager.update(eager_p, [g.clone() for g in gs])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graph_opt.update(ps, static_g)
    gen = torch.Generator(device="cuda").manual_seed(1)
    for k in range(6):
        new = [torch.randn(g.shape, device="cuda", generator=gen) for g in gs]
        if k == 3 and nonfinite == "skip":
            new[1][0] = float("nan")
        for dst, src in zip(static_g, new):
            dst.copy_(src)
        graph.replay()
        eager.update(eager_p, new)
    torch.cuda.synchronize()
    for a, b in zip(ps, eager_p):
        assert torch.equal(a, b)
    graph_opt.sync_steps()
    assert (graph_opt.step, graph_opt.skipped_steps) == (eager.step, eager.skipped_steps)


def test_torch_model_one_launch_per_step_and_cpu_bits(monkeypatch):
    from fastadagrad import cuda_launch

    ps, gs = _model(2)
    cpu_p = [p.cpu().numpy() for p in ps]
    count = []
    real = cuda_launch.run_kernel
    monkeypatch.setattr(cuda_launch, "run_kernel",
                        lambda k, *a: count.append(k.kind) or real(k, *a))
    opt = fa.AdaGrad.from_preset("torch", lr=0.1)
    ref = fa.AdaGrad.from_preset("torch", lr=0.1)
    for _ in range(3):
        opt.update(ps, gs)
        ref.update(cpu_p, [g.cpu().numpy() for g in gs])
    torch.cuda.synchronize()
    assert count == ["update"] * 3
    for a, b in zip(ps, cpu_p):
        np.testing.assert_array_equal(a.cpu().numpy(), b)


@pytest.mark.parametrize("lib", ["torch", "cupy"])
def test_device_state_checkpoint_roundtrip(tmp_path, lib):
    """State held as torch/CuPy device arrays saves and loads; resuming gives the same
    bits as never stopping."""
    if lib == "cupy":
        cp = pytest.importorskip("cupy")
        ps0, gs0 = _model(3)
        ps = [cp.asarray(p.cpu().numpy()) for p in ps0]
        gs = [cp.asarray(g.cpu().numpy()) for g in gs0]

        def clone(xs):
            return [x.copy() for x in xs]

        def host(x):
            return cp.asnumpy(x)
    else:
        ps, gs = _model(3)

        def clone(xs):
            return [x.clone() for x in xs]

        def host(x):
            return x.cpu().numpy()
    a = fa.AdaGrad(lr=0.1)
    pa = clone(ps)
    for _ in range(2):
        a.update(pa, gs)
    path = a.save(tmp_path / "ck")
    b = fa.AdaGrad(lr=0.1)
    pb = clone(pa)
    b.load(path, pb)
    a.update(pa, gs)
    b.update(pb, gs)
    for x, y in zip(pa, pb):
        np.testing.assert_array_equal(host(x), host(y))
    assert b.step == a.step == 3


def test_arrays_on_two_devices_rejected():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    p0 = torch.zeros(4, device="cuda:0")
    g1 = torch.ones(4, device="cuda:1")
    h0 = torch.zeros(4, device="cuda:0")
    with pytest.raises(ValueError, match="device 0.*device 1|device 1.*device 0"):
        fa.adagrad_update(p0, g1, h0)
    assert torch.equal(p0, torch.zeros(4, device="cuda:0"))


def _ulps(a, b):
    """Largest distance in units in the last place between two float tensors."""
    ia = a.detach().contiguous().view(torch.int32 if a.dtype == torch.float32 else torch.int64)
    ib = b.detach().contiguous().view(ia.dtype)
    return int((ia.long() - ib.long()).abs().max()) if ia.numel() else 0


@pytest.mark.parametrize("kw", [{}, {"foreach": False}, {"foreach": True, "maximize": True},
                                {"lr_decay": 0.01, "weight_decay": 0.1,
                                 "initial_accumulator_value": 0.1}],
                         ids=["default", "single-tensor", "foreach-maximize", "decay-wd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_adapter_on_cuda_matches_torch_bits(monkeypatch, kw, dtype):
    """fastadagrad.torch.Adagrad on CUDA parameters: torch.optim.Adagrad's bits with the
    same arguments, and (gradients updated in place) validated once, not every step."""
    from fastadagrad.torch import Adagrad

    ps, gs = _model(7)
    # clone(): .to() of a tensor already of ``dtype`` returns it, and the two models
    # must not share memory
    mine = [torch.nn.Parameter(p.to(dtype).clone()) for p in ps]
    theirs = [torch.nn.Parameter(p.to(dtype).clone()) for p in ps]
    opt = Adagrad(mine, lr=0.1, **kw)
    ref = torch.optim.Adagrad(theirs, lr=0.1, **kw)
    calls = []
    real = fcuda._validate_and_plan
    monkeypatch.setattr(fcuda, "_validate_and_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    for a, b, g in zip(mine, theirs, gs):
        a.grad, b.grad = g.to(dtype).clone(), g.to(dtype).clone()
    for _ in range(5):
        opt.step()
        ref.step()
        for a, b in zip(mine, theirs):  # in place: the same gradient tensors next step
            a.grad.mul_(-0.75)
            b.grad.mul_(-0.75)
    torch.cuda.synchronize()
    worst = max(_ulps(a, b) for a, b in zip(mine, theirs))
    worst_h = max(_ulps(opt.state[a]["sum"], ref.state[b]["sum"])
                  for a, b in zip(mine, theirs))
    assert (worst, worst_h) == (0, 0), f"params {worst} ulp, sums {worst_h} ulp from torch"
    if kw.get("foreach", True):  # the kernels' path: validated at the first step only
        assert len(calls) == 1


def test_functional_calls_on_torch_tensors_follow_in_place_changes(monkeypatch):
    """adagrad_update on torch CUDA tensors validates once while param and state are the
    same tensors with the same address, shape, layout and dtype (the gradient: the same
    of those, any tensor object); a storage swapped in place (``.data =``) or a new
    gradient address is validated again, and a dtype changed in place is refused,
    naming the parameter, with nothing written. The bits are the CPU reference's."""
    from fastadagrad._hyper import Hyper
    from fastadagrad.reference import reference_step

    calls = []
    real = fcuda._validate_and_plan
    monkeypatch.setattr(fcuda, "_validate_and_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator(device="cuda").manual_seed(11)
    p = torch.randn(1000, device="cuda", generator=gen)
    g = torch.randn(1000, device="cuda", generator=gen)
    h = torch.zeros(1000, device="cuda")
    hp, hh = p.cpu().numpy(), h.cpu().numpy()
    hyper = Hyper.make()

    def step():
        assert fa.adagrad_update(p, g, h) is True
        reference_step(hp, g.cpu().numpy(), hh, hyper, 1)

    step()
    step()
    g.mul_(0.5)  # in place: the same address
    step()
    assert len(calls) == 1
    g = g.clone()  # another address
    step()
    step()
    assert len(calls) == 2
    h.data = h.data.clone()  # the state's storage swapped under the same tensor
    step()
    p.data = p.data.clone()
    step()
    assert len(calls) == 4
    torch.cuda.synchronize()
    np.testing.assert_array_equal(p.cpu().numpy(), hp)
    np.testing.assert_array_equal(h.cpu().numpy(), hh)
    p.data = p.data.double()
    before = h.clone()
    with pytest.raises(TypeError, match="param"):
        fa.adagrad_update(p, g, h)
    assert torch.equal(h, before)
    np.testing.assert_array_equal(p.cpu().numpy(), hp.astype(np.float64))
