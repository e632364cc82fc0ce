"""Train the demo network with bfloat16 parameters: nearest vs stochastic rounding vs float32.

    python examples/bf16_demo.py [--steps 600] [--plot demo_out/bf16_demo.png]

The network and data are those of ``python -m fastadagrad demo`` (a NumPy MLP on a
synthetic 10-class problem). Four runs from the same initial weights and batches:

* ``float32``: float32 params and state (the reference curve);
* ``bfloat16, nearest``: bfloat16 params and gradients, float32 accumulator, each
  step's result rounded to the nearest bfloat16. Once ``lr*g/sqrt(h)`` is below half
  a bfloat16 spacing (about 2^-13 for weights near 0.05), the update rounds away and
  the weights stop moving;
* ``bfloat16, stochastic``: the same, rounded up or down at random in proportion to
  the distance (reproducible for a seed), so small updates survive on average;
* ``bfloat16, master weights``: a float32 copy of the params is updated and the
  bfloat16 params are written from it.

The forward and backward passes run in float32 on the bfloat16 params (cast up), and
the gradients are cast down to bfloat16, as a bfloat16 training step would give them.
Prints the final losses and writes one plot of the loss curves.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import ml_dtypes
import numpy as np

import fastadagrad
from fastadagrad.demo import MLP, make_data

BF16 = np.dtype(ml_dtypes.bfloat16)

RUNS: dict[str, dict[str, Any]] = {
    "float32": {},
    "bfloat16, nearest": {"rounding": "nearest"},
    "bfloat16, stochastic": {"rounding": "stochastic", "seed": 0},
    "bfloat16, master weights": {"master_weights": True},
}


def train(name: str, args: argparse.Namespace) -> np.ndarray:
    x, y = make_data(args.samples, 784, 10, seed=1)
    net = MLP([784, *args.hidden, 10], seed=2)
    half = name != "float32"
    params = {k: v.astype(BF16) for k, v in net.params.items()} if half else net.params
    opt = fastadagrad.AdaGrad(lr=args.lr, **RUNS[name])
    rng = np.random.default_rng(3)
    losses = []
    for _ in range(args.steps):
        idx = rng.integers(0, x.shape[0], args.batch)
        if half:  # compute in float32 from the bfloat16 weights
            net.params = {k: v.astype(np.float32) for k, v in params.items()}
        loss, grads = net.loss_and_grads(x[idx], y[idx])
        if half:
            grads = {k: g.astype(BF16) for k, g in grads.items()}
        opt.update(params, grads)
        losses.append(loss)
    return np.array(losses)


def smooth(v: np.ndarray, k: int) -> np.ndarray:
    k = max(1, min(k, v.size))
    return np.convolve(v, np.ones(k) / k, mode="valid")


def main(argv: list[str] | None = None) -> dict[str, np.ndarray]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4096)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--lr", type=float, default=0.001)
    ap.add_argument("--smooth", type=int, default=25, help="moving-average window")
    ap.add_argument("--plot", default="demo_out/bf16_demo.png")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "samples", "smooth"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    curves = {}
    for name in RUNS:
        curves[name] = train(name, args)
        tail = curves[name][-max(1, args.steps // 10):].mean()
        print(f"{name:26s} loss: first {curves[name][0]:.4f}, mean of the last 10% of "
              f"steps {tail:.4f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, v in curves.items():
            s = smooth(v, args.smooth)
            ax.plot(np.arange(s.size) + (v.size - s.size), s, label=name,
                    linestyle="--" if name == "bfloat16, master weights" else "-")
        ax.set_xlabel("step")
        ax.set_ylabel(f"training loss (moving average of {args.smooth})")
        ax.set_title(f"AdaGrad, lr={args.lr}: bfloat16 params with a float32 accumulator")
        ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"plot written to {args.plot}")
    return curves


if __name__ == "__main__":
    main()
