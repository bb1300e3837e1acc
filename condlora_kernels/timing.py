"""Median time of one call, in milliseconds: the package's two timers and the CUDA-graph form of the first.

    cuda_median_ms         CUDA events around each call (GPU time; host time only where the GPU waits
                           for the host). Either each call waited for (`reps`, with a wall-time budget),
                           or, with `rep_ms`, triton.testing.do_bench's method: the number of calls from
                           an estimate, L2 flushed before each, calls queued back to back.
    cuda_graph_median_ms   the same events around replays of a CUDA graph of many calls (no launch
                           overhead), as triton.testing.do_bench_cudagraph.
    host_median_ms         time.perf_counter around each call (CPU work, or host time per call).

The autotuner's race (kernels/triton/autotune.py), the benchmarks (bench/) and tools/ time with these.
Timings are measurements to report or to choose by, never to assert on in tests.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # as do_bench: more than any GPU's L2


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)


def _estimate_ms(fn: Callable[[], object], before_each: Callable[[], object] = lambda: None) -> float:
    """Milliseconds per call of five calls in a row (0.001 at least)."""
    start, end = _event(), _event()
    start.record()
    for _ in range(5):
        before_each()
        fn()
    end.record()
    end.synchronize()
    return max(start.elapsed_time(end) / 5, 1e-3)


def cuda_median_ms(fn: Callable[[], object], *, warmup: int = 1, reps: int = 7, min_reps: int = 1,
                   budget_s: float = math.inf, rep_ms: Optional[float] = None, warmup_ms: float = 25.0) -> float:
    """Median GPU time of one call of fn, each call between two CUDA events.

    With `rep_ms` (do_bench's method): after one call, the number of warm-up and timed calls is taken
    from an estimate (about `warmup_ms` and `rep_ms` of calls), L2 is flushed before each timed call
    so that no call finds its inputs there, and the calls are queued back to back. Otherwise: `warmup`
    calls (one at least: the first may compile), then up to `reps` timed calls, each waited for,
    stopping once `budget_s` of wall time is spent and `min_reps` calls are timed."""
    fn()
    torch.cuda.synchronize()
    if rep_ms is not None:
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
        estimate = _estimate_ms(fn, flush.zero_)
        for _ in range(max(1, int(warmup_ms / estimate))):
            fn()
        events = [(_event(), _event()) for _ in range(max(1, int(rep_ms / estimate)))]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    for _ in range(warmup - 1):
        fn()
    torch.cuda.synchronize()
    times = []
    started = time.perf_counter()
    while len(times) < reps:
        start, end = _event(), _event()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
        if len(times) >= min_reps and time.perf_counter() - started > budget_s:
            break
    return statistics.median(times)


def capture_cuda_graph(fn: Callable[[], object], *, warmup: int = 3) -> tuple:
    """(graph, the last warm-up call's result, the captured call's result): `warmup` calls of fn on a side stream,
    as torch's CUDA graph docs do (lazy initialisations, such as cuBLAS handles and workspaces or an autotuning
    run, must not happen while capturing), then one call captured. `graph.replay()` reruns the captured call,
    writing into the tensors it returned."""
    if warmup < 1:
        raise ValueError(f"warmup must be at least 1, got {warmup}")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            warm = fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn()
    return graph, warm, captured


def cuda_graph_median_ms(make_fn: Callable[[], Callable[[], object]], *, rep_ms: float, replays: int = 10) -> float:
    """Median GPU time of one call, from a CUDA graph of many calls (launch overhead removed).

    As triton.testing.do_bench_cudagraph (about `rep_ms` of calls captured in one graph, replayed
    `replays` times), but the function is built by `make_fn` on the capture stream: a backward-mode
    step reuses a forward graph built beforehand, and autograd runs each backward op on its forward
    op's stream, so that forward must run on the capture stream too (on the default stream it would
    break the capture), and on leaves not used by any graph before (bench.providers.fresh_leaves). So it warms
    up and captures on its own stream, not as capture_cuda_graph does."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn = make_fn()
        for _ in range(3):  # warm up on the capture stream: lazy initialisations must not happen while capturing
            fn()
        n_calls = max(1, int(rep_ms / _estimate_ms(fn)))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(n_calls):
                fn()
        start, end = _event(), _event()
        times = []
        for _ in range(replays):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n_calls)
    torch.cuda.current_stream().wait_stream(stream)
    del graph, fn
    return statistics.median(times)


def host_median_ms(fn: Callable[[], object], *, warmup: int = 1, reps: int = 7, min_reps: int = 1,
                   budget_s: float = math.inf) -> float:
    """Median wall time of one call of fn by the host clock: `warmup` calls, then up to `reps` timed
    calls, stopping once `budget_s` is spent and `min_reps` calls are timed. (To see GPU work, fn
    synchronizes; bench.timing.synchronized wraps it so.)"""
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < reps:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        if len(times) >= min_reps and time.perf_counter() > deadline:
            break
    return statistics.median(times)
