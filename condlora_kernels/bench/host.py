"""Host-time benchmark: what one FusedCondLoRALinear forward+backward costs the host, against a frozen
nn.Linear whose input requires grad, at a size where only overhead counts (8 tokens, 64 -> 64, r=4).

CPU tensors with the cpu backend, and CUDA tensors (where a GPU is) with the default backend ("auto").
One call is `y = layer(x); torch.autograd.grad(y, [x, *trainables], dy)`: dx for both layers, and the
generators' gradients for CondLoRA (no .grad accumulation, as the kernel level's forward+backward).

Timer: the host clock around a batch of settings.host_calls calls, then (CUDA) one synchronize; the
median over settings.host_repeats batches, per call, frozen and CondLoRA batches alternating so that the
drift of a shared machine touches both. At this size a call's GPU work (a few kernels of a few
microseconds) is shorter than its host time: the GPU idles waiting for the host, so the wall time per
call of a batch is the host time per call. Timings are measurements to report, never to assert on.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from condlora_kernels.bench import report
from condlora_kernels.bench.kernels import Point, error_message
from condlora_kernels.bench.shapes import Settings
from condlora_kernels.bench.timing import synchronize
from condlora_kernels.modules.linear import FusedCondLoRALinear
from condlora_kernels.ops.backends import select_backend

HOST_SHAPE = (8, 64, 64, 4)  # tokens, d_in, d_out, r
HOST_BACKENDS = {"cpu": "cpu", "cuda": "auto"}  # the CondLoRA layer's backend on each device's tensors
HOST_LAYERS = {"frozen": "nn.Linear", "condlora": "FusedCondLoRALinear"}  # provider -> the layer it times


def host_steps(device: torch.device) -> dict:
    """{provider: (backend, step)}: one forward+backward per call of step."""
    n, d_in, d_out, r = HOST_SHAPE
    torch.manual_seed(0)
    frozen = nn.Linear(d_in, d_out, device=device).requires_grad_(False)
    ours = FusedCondLoRALinear.from_linear(nn.Linear(d_in, d_out, device=device), r=r, alpha=2 * r,
                                           backend=HOST_BACKENDS[device.type])
    x = torch.randn(n, d_in, device=device, requires_grad=True)
    dy = torch.randn(n, d_out, device=device)

    def step_of(layer, wrt):
        return lambda: torch.autograd.grad(layer(x), wrt, dy)

    backend = select_backend(ours.backend, x).name
    return {"frozen": (None, step_of(frozen, [x])),
            "condlora": (backend, step_of(ours, [x, *ours.generator.parameters()]))}


def batch_us_per_call(step: Callable[[], object], calls: int, device: torch.device) -> float:
    """Host-clock time of `calls` calls and one synchronize, per call, in microseconds."""
    started = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return (time.perf_counter() - started) / calls * 1e6


def reference_call_us(device: torch.device, calls: int = 200, repeats: int = 7) -> float:
    """The host's speed where a row was measured: host time per call of a 64 x 64 `torch.mm` on the device,
    median over `repeats` batches of `calls` (the GPU keeps up at this size). Recorded because a step bound by
    the host follows it: on the H200 machines it moved from 12.4 to 20.7 µs within one process, and an eager
    RoBERTa-base step with it (benchmarks/NOTES.md, tenth session)."""
    a = torch.randn(64, 64, device=device)
    b = torch.randn(64, 64, device=device)
    batch_us_per_call(lambda: torch.mm(a, b), calls, device)  # warm-up: the first call may initialise the BLAS
    return statistics.median(batch_us_per_call(lambda: torch.mm(a, b), calls, device) for _ in range(repeats))


@dataclass
class HostSuite:
    """Measures the host time per call of both layers on a device and keeps the rows."""

    settings: Settings
    rows: list = field(default_factory=list)

    def measure(self, device_type: str) -> dict:
        """{provider: Point} for `device_type` ("cpu" or "cuda"); the rows are appended to self.rows."""
        device = torch.device(device_type)
        n, d_in, d_out, r = HOST_SHAPE
        rows = {p: {"provider": p, "device_type": device_type, "layer": layer, "backend": None,
                    "shape": f"{n}x{d_in}x{d_out} r{r}", "us_per_call": None, "ratio_to_frozen": None,
                    "calls": self.settings.host_calls, "repeats": self.settings.host_repeats, "status": "ok",
                    "reason": "", "device": None, "torch": torch.__version__} for p, layer in HOST_LAYERS.items()}
        points = {p: Point([row]) for p, row in rows.items()}
        try:
            if device_type == "cuda" and not torch.cuda.is_available():
                raise _Skipped("no CUDA device")
            env = report.row_environment(device)
            steps = host_steps(device)
            times = {p: [] for p in HOST_LAYERS}
            for _, step in steps.values():  # warm-up: first calls compile, autotune, allocate
                batch_us_per_call(step, self.settings.host_calls, device)
            for _ in range(self.settings.host_repeats):
                for p, (_, step) in steps.items():
                    times[p].append(batch_us_per_call(step, self.settings.host_calls, device))
        except _Skipped as exc:
            for row in rows.values():
                row.update(status="skipped", reason=str(exc))
        except Exception as exc:  # recorded as error rows; the run goes on
            for row in rows.values():
                row.update(status="error", reason=error_message(exc))
        else:
            frozen_us = statistics.median(times["frozen"])
            for p, row in rows.items():
                us = statistics.median(times[p])
                backend, step = steps[p]
                row.update(env, backend=backend, us_per_call=us, ratio_to_frozen=us / frozen_us)
                points[p].step = _batch(step, self.settings.host_calls)
        self.rows += rows.values()
        return points


class _Skipped(Exception):
    pass


def _batch(step: Callable[[], object], calls: int) -> Callable[[], None]:
    """`calls` calls of step: what pytest-benchmark times per round (bench.timing.synchronized adds the sync)."""

    def run():
        for _ in range(calls):
            step()

    return run
