"""The benchmarks' timers (the settings of a run applied to condlora_kernels.timing), peak memory, threads.

GPU: CUDA events around each call with L2 flushed before each, median (triton.testing.do_bench's
method), and for launch-bound shapes many calls captured in one CUDA graph (do_bench_cudagraph's: no
launch overhead, no L2 flush, hence the rotating input sets of providers.py). CPU: time.perf_counter
around each call, median. Timings are measurements to report, never to assert on.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from condlora_kernels import timing
from condlora_kernels.bench.shapes import Settings


def median_ms(fn: Callable[[], object], device: torch.device, settings: Settings) -> float:
    """Median time of one call of fn, in ms: CUDA events as do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        return timing.cuda_median_ms(fn, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
    return timing.host_median_ms(fn, reps=settings.cpu_max_reps, min_reps=3, budget_s=settings.cpu_budget_s)


def cudagraph_median_ms(make_step: Callable[[], Callable[[], object]], settings: Settings) -> float:
    """Median time of one step replayed from a CUDA graph (launch overhead removed), in ms; the step is
    built by `make_step` on the capture stream (timing.cuda_graph_median_ms says why)."""
    return timing.cuda_graph_median_ms(make_step, rep_ms=settings.cudagraph_rep_ms)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak CUDA memory allocated during one call of fn, above what was allocated before it (the inputs,
    and in backward mode the saved forward graph). None on CPU, where torch does not track it."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by a device synchronize, so that a wall-clock timer (pytest-benchmark's) sees the GPU work."""
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


@contextlib.contextmanager
def torch_threads(n: Optional[int]):
    """Run with n intra-op CPU threads (None: leave torch's setting), restored afterwards.

    The CPU quick settings use one thread: at tiny shapes threads only add synchronisation, and on small
    virtual machines (2 vCPUs, as CI) a parallel region sometimes waits a scheduler tick (~8 ms) for its
    second thread, which turns a 30 us matmul into 8 ms and the suite's run time into minutes.
    """
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
