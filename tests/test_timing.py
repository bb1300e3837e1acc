"""condlora_kernels.timing: how many calls each timer makes and what it returns (never how fast anything is)."""

import pytest
import torch

from condlora_kernels import timing
from tests.conftest import requires_cuda


class FakeClock:
    """time.perf_counter for timing.py: each call of `step` takes `seconds` of it."""

    def __init__(self, seconds):
        self.now, self.seconds, self.calls = 0.0, seconds, 0

    def perf_counter(self):
        return self.now

    def step(self):
        self.calls += 1
        self.now += self.seconds


@pytest.mark.parametrize("budget_s,min_reps,expected_timed", [(float("inf"), 1, 7), (0.0, 1, 1), (0.0, 3, 3),
                                                             (0.0105, 1, 6)])
def test_host_median_ms_counts_calls(monkeypatch, budget_s, min_reps, expected_timed):
    """`warmup` untimed calls, then timed ones until `reps`, or until the budget is spent past `min_reps`."""
    clock = FakeClock(0.002)
    monkeypatch.setattr(timing.time, "perf_counter", clock.perf_counter)
    ms = timing.host_median_ms(clock.step, warmup=2, reps=7, min_reps=min_reps, budget_s=budget_s)
    assert clock.calls == 2 + expected_timed
    assert ms == pytest.approx(2.0)  # milliseconds


@requires_cuda
def test_cuda_timers_count_calls():
    calls = []
    x = torch.randn(256, 256, device="cuda")
    step = lambda: calls.append(x @ x)  # noqa: E731
    assert timing.cuda_median_ms(step, warmup=3, reps=5, min_reps=5) > 0
    assert len(calls) == 3 + 5
    calls.clear()
    assert timing.cuda_median_ms(step, warmup_ms=1, rep_ms=2) > 0  # do_bench's method: counts from an estimate
    assert len(calls) >= 1 + 5 + 1 + 1
    assert timing.cuda_graph_median_ms(lambda: (lambda: x @ x), rep_ms=1) > 0


@requires_cuda
def test_capture_cuda_graph_replays_the_call():
    """The warm-up calls run eagerly, the captured call only at replay: its output follows its input's new value."""
    calls = []
    x = torch.randn(64, 64, device="cuda")

    def step():
        calls.append(None)
        return x @ x

    graph, warm, captured = timing.capture_cuda_graph(step, warmup=2)
    assert len(calls) == 2 + 1
    torch.testing.assert_close(warm, x @ x)
    x.copy_(torch.randn(64, 64, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, x @ x)
    assert len(calls) == 3  # a replay calls no Python
    with pytest.raises(ValueError, match="warmup must be at least 1, got 0"):
        timing.capture_cuda_graph(step, warmup=0)
