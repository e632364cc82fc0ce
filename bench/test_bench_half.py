"""Half-precision params: bfloat16/float16 with a float32 accumulator, one flat array.

The 16-bit update moves 14 bytes per element (p and g read as 2 bytes, h read and
written as 4, p written as 2) against 20 for float32, so at 2^24, where every fused
kernel sits at the memory-bandwidth limit (the roofline rows), the target is at least
1.3x the float32 step (20/14 = 1.43x from the bytes alone). Compared with
``torch.optim.Adagrad(fused=True)`` on bfloat16 CPU tensors, whose accumulator is
bfloat16 too (10 bytes per element, and the sum stops growing once large).

``bytes`` in extra_info is the traffic actually moved per step: 14 bytes per element
for the 16-bit kernels (20 with master weights: m, g and h read, m, h and p written; p is
not read), 20 for float32, 10 for torch bfloat16.
Under ``--benchmark-disable`` the size is capped at 2^16 (conftest ``elements``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bench import benchlib as B

ml_dtypes = pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes "
                                "(pip install 'fastadagrad[half]')")

BF16 = np.dtype(ml_dtypes.bfloat16)

#: impl -> (param dtype, adagrad_update keywords, bytes per element)
IMPLS: dict[str, tuple[Any, dict[str, Any], int]] = {
    "fastadagrad float32": (np.float32, {}, 20),
    "fastadagrad bfloat16": (BF16, {}, 14),
    "fastadagrad bfloat16 stochastic": (BF16, {"rounding": "stochastic", "seed": 1}, 14),
    "fastadagrad bfloat16 master": (BF16, {"master": True}, 20),
    "fastadagrad float16": (np.float16, {}, 14),
    "fastadagrad float16 stochastic": (np.float16, {"rounding": "stochastic", "seed": 1},
                                       14),
    "torch fused bfloat16": (BF16, {}, 10),
    "torch foreach bfloat16": (BF16, {}, 10),
}


def make_half_step(impl: str, n: int) -> Any:
    dtype, kw, _ = IMPLS[impl]
    p32, g32 = B.flat_source(n, np.float32)
    p, g = p32.astype(dtype), g32.astype(dtype)
    if impl.startswith("torch"):
        torch = B.require_torch()
        tp = torch.from_numpy(p.view(np.int16)).view(torch.bfloat16).requires_grad_(True)
        tp.grad = torch.from_numpy(g.view(np.int16)).view(torch.bfloat16)
        mode = B.TORCH_FUSED if "fused" in impl else B.TORCH_FOREACH
        opt = torch.optim.Adagrad([tp], lr=B.LR, eps=B.EPS, **B.TORCH_MODES[mode])
        return opt.step
    h = np.zeros(n, np.float32)
    kw = dict(kw)
    if kw.pop("master", False):
        kw["master"] = p32.copy()
    if "seed" in kw:  # a new step each call: a new random stream, as in training
        import fastadagrad

        count = {"step": 0}

        def step() -> Any:
            count["step"] += 1
            return fastadagrad.adagrad_update(p, g, h, lr=B.LR, eps=B.EPS,
                                              step=count["step"], **kw)

        return step
    return B.fast_functional(p, g, h, **kw)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("exponent", [20, 24], ids=lambda k: f"2_{k}")
def test_half(run: Any, benchmark: Any, elements: Any, impl: str, exponent: int) -> None:
    n = elements(exponent)
    dtype, _, per_element = IMPLS[impl]
    step = make_half_step(impl, n)
    run(step, scenario="half", impl=impl, dtype=dtype, n=n,
        group=f"h. half-precision params 2^{exponent:02d}")
    benchmark.extra_info["bytes"] = per_element * n  # the traffic actually moved
