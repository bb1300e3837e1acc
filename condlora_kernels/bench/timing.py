"""Timers: median milliseconds of one call of `fn`, and the peak memory of one call.

GPU: triton.testing.do_bench (CUDA events around each call, L2 flushed before each, median), and for
launch-bound shapes the method of do_bench_cudagraph (many calls captured in one CUDA graph: no launch
overhead, no L2 flush, hence the rotating input sets of providers.py). CPU: time.perf_counter around
each call, median. Timings are measurements to report, never to assert on.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Optional

import torch

from condlora_kernels.bench.shapes import Settings


def median_ms(fn: Callable[[], object], device: torch.device, settings: Settings) -> float:
    """Median time of one call of fn, in ms: do_bench on CUDA, perf_counter on CPU."""
    if device.type == "cuda":
        return _cuda_median_ms(fn, settings)
    return _cpu_median_ms(fn, settings)


def cudagraph_median_ms(make_step: Callable[[], Callable[[], object]], settings: Settings) -> float:
    """Median time of one step replayed from a CUDA graph (launch overhead removed), in ms.

    As triton.testing.do_bench_cudagraph (many steps captured in one graph, the graph replayed 10 times),
    but the step is built by `make_step` on the capture stream: a backward-mode step reuses a forward graph
    built beforehand, and autograd runs each backward op on its forward op's stream, so that forward must
    run on the capture stream too (on the default stream it would break the capture), and on leaves not used
    by any graph before (providers.fresh_leaves).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_step()
        for _ in range(3):  # warm up on the capture stream: lazy initialisations must not happen while capturing
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        end.synchronize()
        n_repeat = max(1, int(settings.cudagraph_rep_ms / max(start.elapsed_time(end) / 5, 1e-3)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n_repeat):
                fn()
        times = []
        for _ in range(10):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n_repeat)
    torch.cuda.current_stream().wait_stream(stream)
    del graph, fn
    return statistics.median(times)


def _cuda_median_ms(fn, settings: Settings) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:  # no triton: same method by hand (events per call, median), without the L2 flush
        return _cuda_events_median_ms(fn, settings)
    return float(do_bench(fn, warmup=settings.warmup_ms, rep=settings.rep_ms, return_mode="median"))


def _cuda_events_median_ms(fn, settings: Settings) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(settings.warmup_ms / estimate))):
        fn()
    n = max(1, int(settings.rep_ms / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _cpu_median_ms(fn, settings: Settings) -> float:
    fn()  # warm-up (first-call allocations, lazy imports)
    times = []
    deadline = time.perf_counter() + settings.cpu_budget_s
    while len(times) < 3 or (len(times) < settings.cpu_max_reps and time.perf_counter() < deadline):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
