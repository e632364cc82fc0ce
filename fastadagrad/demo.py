"""``python -m fastadagrad demo``: train one network twice, NumPy AdaGrad vs fastadagrad.

A multi-layer perceptron written in plain NumPy learns a synthetic 10-class problem
that this module generates (784-dim "images": class prototypes plus noise, no
download). It is trained twice from the same initial weights and batches, once with
the NumPy AdaGrad class the project started from and once with ``fastadagrad.AdaGrad``.
The demo checks that the two loss curves are identical (bit for bit), reports the
optimizer-step time of each (median over steps) and writes a PNG plot of both curves.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import numba
import numpy as np

from ._hyper import F32_INF_FROM, check_hyper
from .optim import AdaGrad
from .reference import NumpyAdaGrad


def make_data(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    protos = rng.standard_normal((classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    # noisy enough that the classes overlap and the loss falls over hundreds of steps;
    # standardised so the first loss is near log(classes)
    x = protos[y] + 8.0 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= x.std()
    return x.astype(np.float32), y


class MLP:
    """ReLU layers and softmax cross-entropy, forward and backward in plain NumPy."""

    def __init__(self, sizes: list[int], seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.params: dict[str, np.ndarray] = {}
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.params[f"W{i + 1}"] = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)
                                        ).astype(np.float32)
            self.params[f"b{i + 1}"] = np.zeros(b, np.float32)
        self.layers = len(sizes) - 1

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray
                       ) -> tuple[float, dict[str, np.ndarray]]:
        acts = [x]
        for i in range(1, self.layers + 1):
            z = acts[-1] @ self.params[f"W{i}"] + self.params[f"b{i}"]
            acts.append(np.maximum(z, 0) if i < self.layers else z)
        logits = acts[-1]
        logits = logits - logits.max(axis=1, keepdims=True)
        prob = np.exp(logits)
        prob /= prob.sum(axis=1, keepdims=True)
        n = x.shape[0]
        loss = float(-np.log(prob[np.arange(n), y] + 1e-12).mean())
        d = prob
        d[np.arange(n), y] -= 1
        d /= n
        grads: dict[str, np.ndarray] = {}
        for i in range(self.layers, 0, -1):
            grads[f"W{i}"] = acts[i - 1].T @ d
            grads[f"b{i}"] = d.sum(axis=0)
            if i > 1:
                d = (d @ self.params[f"W{i}"].T) * (acts[i - 1] > 0)
        return loss, grads


def train(opt: Any, args: argparse.Namespace, label: str = "", progress: int = 0
          ) -> tuple[np.ndarray, np.ndarray, MLP]:
    """Train a fresh network; every ``progress`` steps print a line (0: none)."""
    x, y = make_data(args.samples, 784, 10, seed=1)
    net = MLP([784, *args.hidden, 10], seed=2)
    rng = np.random.default_rng(3)
    losses, times = [], []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.integers(0, x.shape[0], args.batch)
        loss, grads = net.loss_and_grads(x[idx], y[idx])
        t0 = time.perf_counter()
        opt.update(net.params, grads)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
        if progress and (step % progress == 0 or step == args.steps):
            print(f"  {label:<12} step {step:>{len(str(args.steps))}}/{args.steps}  "
                  f"loss {loss:.4f}  optimizer step {np.median(times) * 1e3:.3f} ms "
                  f"(median so far)  {time.perf_counter() - start:.1f} s elapsed",
                  flush=True)
    return np.array(losses), np.array(times), net


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m fastadagrad demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300,
                    help="training steps per optimizer (default 300)")
    ap.add_argument("--batch", type=int, default=64, help="minibatch size (default 64)")
    ap.add_argument("--samples", type=int, default=4096,
                    help="size of the generated training set (default 4096)")
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 512], metavar="N",
                    help="hidden layer widths (default: 1024 512, i.e. a 784-1024-512-10 "
                         "network, 1.3M parameters)")
    ap.add_argument("--lr", type=float, default=0.001,
                    help="learning rate of both optimizers (default 0.001)")
    ap.add_argument("--progress", type=int, default=50, metavar="N",
                    help="print a progress line every N steps (default 50; 0: none)")
    ap.add_argument("--plot", default="demo_out/adagrad_demo.png", metavar="PATH",
                    help="where to write the PNG plot of both loss curves (default "
                         "demo_out/adagrad_demo.png; an empty string: no plot). Needs "
                         "matplotlib (the demo extra)")
    ap.add_argument("--blas-threads", type=int, default=1, metavar="N",
                    help="threads for NumPy's BLAS during training (default 1; 0: leave "
                         "as is). BLAS threads keep spinning after each matmul and compete "
                         "with the optimizer's threads on small machines (README, "
                         "Performance)")
    ap.add_argument("--threads", type=int, default=0, metavar="N",
                    help="threads for fastadagrad's parallel kernels (numba.set_num_threads;"
                         " default 0: Numba's default, one per core)")
    args = ap.parse_args(argv)
    for name in ("steps", "batch", "samples"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if min(args.hidden) < 1 or args.progress < 0 or args.threads < 0 or \
            args.blas_threads < 0:
        ap.error("--hidden widths must be at least 1, --progress, --threads and "
                 "--blas-threads at least 0")
    if args.threads > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"--threads {args.threads}: Numba was started with "
                 f"{numba.config.NUMBA_NUM_THREADS} threads (NUMBA_NUM_THREADS)")
    try:
        check_hyper("lr", args.lr)
    except (TypeError, ValueError) as e:
        ap.error(f"--lr: {e}")
    if args.lr >= F32_INF_FROM:  # the demo's network is float32
        ap.error(f"--lr {args.lr:g} overflows to inf in float32, the demo's dtype")
    if args.plot and not _have_matplotlib():  # say so before training, not after it
        ap.error(f"--plot {args.plot}: writing the plot needs matplotlib, which is not "
                 "installed; install the demo extra (pip install \".[demo]\") or pass "
                 "--plot '' for no plot")
    if args.plot:
        why = _plot_path_problem(args)  # (the name written, as savefig names it)
        if why:
            ap.error(f"--plot {args.plot}: {why}")
    with _blas_threads(args.blas_threads), _numba_threads(args.threads):
        return _run(args)


def _plot_path_problem(args: argparse.Namespace) -> str | None:
    """Why the plot could not be written to ``args.plot`` (checked before training),
    or None; ``args.plot`` becomes the name savefig writes (``.png`` added to a name
    without an extension, as it does)."""
    from matplotlib.figure import Figure

    root, ext = os.path.splitext(args.plot)
    kinds = Figure().canvas.get_supported_filetypes()
    if not ext:
        args.plot += ".png"
    elif ext[1:].lower() not in kinds:
        return (f"matplotlib cannot write {ext!r} files; use one of "
                f"{', '.join('.' + k for k in sorted(kinds))}")
    folder = os.path.dirname(os.path.abspath(args.plot))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create its folder {folder}: {e.strerror}"
    if not os.access(folder, os.W_OK):
        return f"its folder {folder} is not writable"
    if os.path.isdir(args.plot):
        return "it is a folder; name a file"
    return None


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _numba_threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    before = numba.get_num_threads()
    numba.set_num_threads(n)
    print(f"fastadagrad's parallel kernels use {n} thread(s) (--threads)")
    try:
        yield
    finally:
        numba.set_num_threads(before)


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    if n <= 0:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print("threadpoolctl is not installed: BLAS threads left as they are")
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        print(f"NumPy's BLAS limited to {n} thread(s) during training (--blas-threads)")
        yield


def _run(args: argparse.Namespace) -> int:
    print(f"training a 784-{'-'.join(map(str, args.hidden))}-10 network for {args.steps} "
          f"steps of batch {args.batch}, first with the NumPy AdaGrad class, then with "
          "fastadagrad.AdaGrad", flush=True)
    # warm-up: compile the kernels (or load them from Numba's cache) outside the timing
    t0 = time.perf_counter()
    train(AdaGrad(lr=args.lr), argparse.Namespace(**{**vars(args), "steps": 2}))
    print(f"  fastadagrad kernels ready in {time.perf_counter() - t0:.1f} s (two untimed "
          "steps)", flush=True)

    ref_losses, ref_times, ref_net = train(NumpyAdaGrad(lr=args.lr), args, "NumPy",
                                           args.progress)
    losses, times, net = train(AdaGrad(lr=args.lr), args, "fastadagrad", args.progress)
    nparams = sum(p.size for p in net.params.values())
    same_loss = np.array_equal(losses, ref_losses)
    same_params = all(np.array_equal(net.params[k], ref_net.params[k]) for k in net.params)
    med_ref, med_fast = np.median(ref_times), np.median(times)
    print(f"network 784-{'-'.join(map(str, args.hidden))}-10, {nparams:,} float32 "
          f"parameters in {len(net.params)} arrays, {args.steps} steps of batch {args.batch}")
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
    print(f"loss curves identical (bit for bit): {same_loss}; final parameters identical: "
          f"{same_params}")
    print(f"optimizer step, median over {args.steps} steps: NumPy AdaGrad "
          f"{med_ref * 1e3:.3f} ms, fastadagrad {med_fast * 1e3:.3f} ms, "
          f"speedup {med_ref / med_fast:.1f}x")
    print(f"optimizer time, total: NumPy {ref_times.sum():.3f} s, fastadagrad "
          f"{times.sum():.3f} s")
    if med_fast > med_ref:
        print(_slower_hint(nparams, numba.get_num_threads()))
    if args.plot:
        _plot(args.plot, ref_losses, losses, med_ref, med_fast)
        print(f"plot written to {args.plot}")
    return 0 if (same_loss and same_params) else 1


def _slower_hint(nparams: int, threads: int) -> str:
    """Why fastadagrad can lose to the NumPy class (README: "Where fastadagrad is not
    faster"), for the causes that apply to this run."""
    hint = ("fastadagrad was SLOWER than the NumPy class in this run (README, Performance: "
            "where fastadagrad is not faster).")
    if nparams < 100_000:
        hint += (f" This model is small ({nparams:,} parameters): the fixed cost of each "
                 "call weighs more than the passes over memory it saves.")
    if threads > 1:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        hint += (f" The parallel kernel waits for all {threads} threads at every step, so "
                 f"a core kept busy by another process (1-minute load average {load:.2f} "
                 f"on {os.cpu_count()} CPUs) or by BLAS threads stalls it: try --threads 1 "
                 "(numba.set_num_threads(1) in your own loop).")
    return hint


def _plot(path: str, ref: np.ndarray, fast: np.ndarray, t_ref: float, t_fast: float
          ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), width_ratios=[3, 1])
    steps = np.arange(1, ref.size + 1)
    ax.plot(steps, ref, lw=3, alpha=0.5, label="NumPy AdaGrad")
    ax.plot(steps, fast, lw=1, ls="--", color="k", label="fastadagrad")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (log scale)")
    ax.set_yscale("log")
    ax.set_title("Loss curves (identical)" if np.array_equal(ref, fast)
                 else "Loss curves (DIFFER)")
    ax.legend()
    bx.bar(["NumPy", "fastadagrad"], [t_ref * 1e3, t_fast * 1e3], color=["C0", "k"])
    bx.set_ylabel("optimizer step, median (ms)")
    bx.set_title(f"{t_ref / t_fast:.1f}x faster")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
