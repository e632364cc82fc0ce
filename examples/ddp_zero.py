"""Distributed training with fastadagrad: DDP + ZeroRedundancyOptimizer, gloo, 2 processes.

Each process holds a full replica of the model (DistributedDataParallel averages the
gradients), and ``torch.distributed.optim.ZeroRedundancyOptimizer`` gives each rank
only its shard of the parameters to update, so each rank keeps only its shard of the
AdaGrad accumulators; the updated shards are then broadcast. The optimizer that runs
on each shard is ``fastadagrad.torch.Adagrad``.

The script trains the same model twice, once with ``optimizer_class=torch.optim.Adagrad``
and once with ``optimizer_class=fastadagrad.torch.Adagrad``, and checks that the final
parameters are bit-identical on every rank.

Run it on one machine (it spawns the processes itself, over 127.0.0.1)::

    python examples/ddp_zero.py                      # 2 processes, gloo
    torchrun --nproc_per_node 2 examples/ddp_zero.py # the same, started by torchrun

On several machines, start the same script on each of them with torchrun (GPUs: add
``--backend nccl``; each process then uses the GPU of its local rank)::

    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
        --rdzv_endpoint HOST:29500 examples/ddp_zero.py --backend nccl
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel as DDP

import fastadagrad.torch


def build_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 10))


def train(optimizer_class: type, rank: int, steps: int, device: torch.device
          ) -> tuple[list[torch.Tensor], int, int]:
    """Train on this rank's data; return the parameters and the shard sizes."""
    torch.manual_seed(0)  # the same initial model on every rank
    model = build_model().to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=optimizer_class,
                                  lr=0.05, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    for _ in range(steps):
        x = torch.randn(32, 64, generator=gen).to(device)
        y = torch.randint(0, 10, (32,), generator=gen).to(device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    held = len(opt.optim.state)  # accumulators this rank keeps: its shard only
    return [p.detach().cpu().clone() for p in model.parameters()], held, len(
        list(model.parameters()))


def initial_parameters() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [p.detach().clone() for p in build_model().parameters()]


def worker(rank: int, world: int, port: int, backend: str, steps: int) -> None:
    if port:  # spawned by this script; under torchrun the environment is set
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    import numba

    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    ref, _, _ = train(torch.optim.Adagrad, rank, steps, device)
    out, held, total = train(fastadagrad.torch.Adagrad, rank, steps, device)
    same = all(torch.equal(a.view(torch.int32), b.view(torch.int32))
               for a, b in zip(out, ref))
    trained = all(not torch.equal(a, b) for a, b in zip(out, initial_parameters()))
    flags = torch.tensor([int(same and trained)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)  # every rank must agree
    print(f"rank {rank}/{world}: accumulators for {held} of {total} parameter tensors; "
          f"every tensor trained: {trained}; bit-identical to torch.optim.Adagrad: {same}",
          flush=True)
    dist.destroy_process_group()
    if not bool(flags.item()):
        sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2, help="processes to spawn (default 2)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = ap.parse_args(argv)
    if "RANK" in os.environ:  # started by torchrun: this process is one rank
        worker(0, 0, 0, args.backend, args.steps)
    else:
        mp.spawn(worker, args=(args.nproc, free_port(), args.backend, args.steps),
                 nprocs=args.nproc)


if __name__ == "__main__":
    main()
