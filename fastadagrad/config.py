"""Tunables in one place, so tests and benchmarks can patch them (stumpy's ``config``).

Every number here comes from a measurement on the project's 2-core CI/dev machine
(AMD EPYC Zen 4, AVX-512, numba 0.68, omp threading layer) unless stated otherwise.
"""

from __future__ import annotations

import numbers
import os

from numba.extending import register_jitable

#: Below this many float32 elements the serial kernel is used: waking the omp thread pool
#: costs a few microseconds per call (~3 us even for 16 elements). Chosen from
#: ``bench/cpu_probe.py``'s threshold section (the smallest size from which the forced-
#: parallel call beats the forced-serial one at every larger measured size) on two CPU
#: families: float32 24,576 on the 2-core AMD EPYC (its last two runs; earlier runs
#: 16,384-65,536) and on a 16-core Intel Xeon host, 16,384 on a 2-core Intel Xeon; at
#: 24,576 the parallel call was 1.15x (AMD EPYC) and 1.25x (2-core Xeon) faster than
#: the serial one (bench/results/cpu-probe-*.md). float64 arrays switch at a quarter of
#: this (:func:`parallel_from`: 6,144; the AMD EPYC's run before its last, the 16-core
#: and the 2-core Xeon gave 6,144, 6,144 and 4,096, the last AMD run no stable float64
#: crossover): each element costs more (double sqrt/div).
#: A process forked after parallel kernels ran on Numba's omp layer sets it to
#: ``sys.maxsize`` (serial kernels only; see ``cpu._after_fork_in_child``).
PARALLEL_THRESHOLD: int = 24_576


@register_jitable
def parallel_from(itemsize: int, threshold: int = -1) -> int:
    """The element count from which the parallel kernels run, for an array dtype of
    ``itemsize`` bytes: ``threshold`` (default: ``PARALLEL_THRESHOLD``, read at every
    call, so patching it works) for 4-byte elements, a quarter of it for 8-byte ones.
    Compiled code calls it too (it cannot read the module global at run time), passing
    ``threshold`` explicitly."""
    t = PARALLEL_THRESHOLD if threshold < 0 else threshold
    return t if itemsize <= 4 else t // 4

#: Elements per work item of the parallel kernels. Each chunk is a contiguous span that
#: the inner loop vectorises over; 16k f32 elements = 64 KiB per array, large enough to
#: amortise the per-chunk bookkeeping and small enough to balance a model whose tensors
#: differ in size by 1000x (prange schedules chunks statically, by count). Read again at
#: every parallel step: a model's cached plan follows a change.
CHUNK: int = 1 << 14


def chunk() -> int:
    """:data:`CHUNK`, checked: a bad setting raises before anything is written (a
    negative one made the parallel kernels skip every element)."""
    c = CHUNK
    if type(c) is int and c >= 1:  # (the usual value, without the ABC check: ~0.4 us)
        return c
    if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
        raise ValueError(f"fastadagrad.config.CHUNK must be an int >= 1, got {c!r}")
    return int(c)

#: Use Numba's on-disk cache (``cache=True``). Falls back to no cache when no cache
#: directory is writable. ``FASTADAGRAD_NO_CACHE=1`` turns it off.
CACHE: bool = os.environ.get("FASTADAGRAD_NO_CACHE", "") not in ("1", "true", "yes")

#: Skip the parts of Numba's start-up that fastadagrad's kernels do not need (see
#: ``_jit.py``): the full context refresh before a cache load and the ``numpy.ma`` import
#: when an ndarray argument is first typed; ~100 ms of a warm process's import and first
#: update on the 2-core AMD EPYC. ``FASTADAGRAD_FULL_NUMBA_START=1`` turns it off.
#: Read at every cache load and argument typing.
LIGHT_START: bool = os.environ.get("FASTADAGRAD_FULL_NUMBA_START", "") not in (
    "1", "true", "yes")

#: ``fastadagrad.torch``: check a repeated step's tensors' metadata (type, device,
#: layout, dtype, shape, strides, negative bit, inference) in one C++ call of torch's
#: compiler guards (``_tensorguard.py``) instead of one Python call per tensor and
#: property: the check of the 100-tensor model's 400 tensors took 295 -> 126 us on a
#: 2-core Xeon. Used only where they pass a self-check in this process.
#: ``FASTADAGRAD_NO_TORCH_GUARDS=1`` turns it off (the Python checks then run at every
#: step). Read at every step.
TORCH_GUARDS: bool = os.environ.get("FASTADAGRAD_NO_TORCH_GUARDS", "") not in (
    "1", "true", "yes")

#: CUDA launch configuration: threads per block for the grid-stride kernels, and the
#: most blocks per SM the grid is sized to (grid-stride loops cover the rest). Measured
#: on an H100 (bench/gpu_sweep.py, 2^26 elements): 8 blocks/SM of 256 threads reached
#: 94% of a device-to-device copy (f32), one thread per element 100%; so the cap only
#: bites above ~2^27 elements.
THREADS_PER_BLOCK: int = 256
BLOCKS_PER_SM: int = 4096


#: Elements per chunk of the GPU's multi-tensor kernel: one thread block updates one
#: chunk at a time (32 elements per thread at 256 threads), so a 100-tensor 2.95M
#: parameter model is ~460 blocks, enough to fill 132 SMs, and 2^26 elements 8192.
GPU_CHUNK: int = 1 << 13

#: Cap on the multi-tensor kernel's grid (None: ``BLOCKS_PER_SM`` per SM). Tests set it
#: to 2 so that each block walks several chunks, on the simulator and on hardware alike.
GPU_MAX_BLOCKS: int | None = None

#: A dtype group of ONE tensor (e.g. one flat buffer) takes the update kernel's
#: grid-stride variant (``cuda_kernels.GRID_STRIDE``: 4 elements per thread per pass,
#: loads before stores; the same bits) with ``GRID_STRIDE_BLOCKS_PER_SM`` blocks per SM.
#: Off until it is measured through the library on a GPU (``bench/gpu_sweep.py`` times
#: both); its stand-alone twin reached 92.5% of copy bandwidth at 2^26 float32 on an
#: H200 where the chunked kernel reached 67.8%. ``FASTADAGRAD_GPU_GRID_STRIDE=1`` turns
#: it on (e.g. for ``python -m fastadagrad validate``).
GPU_GRID_STRIDE: bool = os.environ.get("FASTADAGRAD_GPU_GRID_STRIDE", "") in (
    "1", "true", "yes")
GRID_STRIDE_BLOCKS_PER_SM: int = 4

#: The multi-tensor (chunked) kernel takes ``cuda_kernels.UNROLL`` elements per thread
#: per pass too (``cuda_kernels.UNROLL_CHUNKS``; the same bits). Off until measured;
#: ``FASTADAGRAD_GPU_UNROLL_CHUNKS=1`` turns it on.
GPU_UNROLL_CHUNKS: bool = os.environ.get("FASTADAGRAD_GPU_UNROLL_CHUNKS", "") in (
    "1", "true", "yes")
