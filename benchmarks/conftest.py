"""pytest-benchmark wrappers over condlora_kernels.bench, the machinery that `condlora bench` runs too.

    pytest benchmarks/                                   CPU points (tiny, quick) + GPU points where CUDA is
    pytest benchmarks/ -m gpu --benchmark-json=out.json  the GPU-scale points only

The numbers to read are in each benchmark's extra_info (CUDA-event medians from triton's do_bench on GPU,
ratio to the frozen layer, TFLOP/s, GB/s, peak memory); pytest-benchmark's own columns time a few
synchronised rounds by wall clock. GPU-scale points carry the `gpu` marker and are skipped without CUDA.
CONDLORA_BENCH_QUICK=1 shortens the GPU timings. Timings are never asserted on.
"""

import os

import pytest
import torch

from condlora_kernels.bench import KernelSuite, ModelSuite, Settings
from condlora_kernels.bench.timing import synchronized, torch_threads

ROUNDS = {"cpu": 3, "cuda": 10}  # pytest-benchmark's own rounds per point


def bench_settings(device_type: str) -> Settings:
    quick = device_type == "cpu" or os.environ.get("CONDLORA_BENCH_QUICK") == "1"
    return Settings.for_device(device_type, quick=quick)


def _per_device(factory):
    suites = {}

    def get(device_type: str):
        if device_type not in suites:
            suites[device_type] = factory(torch.device(device_type), bench_settings(device_type))
        return suites[device_type]

    return get


@pytest.fixture(scope="session")
def kernel_suite():
    """kernel_suite("cpu" | "cuda") -> the session's KernelSuite of that device (it keeps the frozen times)."""
    return _per_device(KernelSuite)


@pytest.fixture(scope="session")
def model_suite():
    return _per_device(ModelSuite)


@pytest.fixture(autouse=True)
def _cpu_threads(request):
    """CPU points run with the settings' thread count (one thread: see timing.torch_threads), restored after."""
    params = getattr(request.node, "callspec", None)
    device = params.params.get("device") if params else None
    with torch_threads(bench_settings("cpu").cpu_threads if device == "cpu" else None):
        yield


@pytest.fixture
def record_point():
    """record_point(benchmark, point, device): extra_info from the point's rows, skip or fail by its status,
    then pytest-benchmark's rounds of the same step."""

    def record(benchmark, point, device: str, rounds=None):
        row = point.row
        benchmark.extra_info.update({k: v for k, v in row.items() if v is not None})
        if len(point.rows) > 1:
            keys = ("repeat", "median_ms", "ratio_to_frozen", "status", "reason")
            benchmark.extra_info["cudagraph"] = [{k: r[k] for k in keys} for r in point.rows[1:]]
        if row["status"] in ("skipped", "n/a"):
            pytest.skip(f"{row['provider']}: {row['reason']}")
        if row["status"] == "error":
            pytest.fail(f"{row['provider']} raised: {row['reason']}")
        assert row["median_ms"] > 0
        benchmark.pedantic(synchronized(point.step, torch.device(device)), rounds=rounds or ROUNDS[device],
                           warmup_rounds=1, iterations=1)

    return record


class _Bench:
    """pytest-benchmark's `benchmark` fixture, taken only when a point is timed (a skipped point would make
    the plugin warn that its fixture went unused), or a stand-in where the plugin is missing or off
    (-p no:benchmark): the suite runs either way, with our timings in the rows."""

    def __init__(self, request):
        self._request = request
        self.extra_info, self.group = {}, None

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1):
        if not self._request.config.pluginmanager.hasplugin("benchmark"):
            for _ in range(warmup_rounds + rounds * iterations):
                target()
            return
        benchmark = self._request.getfixturevalue("benchmark")
        benchmark.group = self.group
        benchmark.extra_info.update(self.extra_info)
        benchmark.pedantic(target, rounds=rounds, warmup_rounds=warmup_rounds, iterations=iterations)


@pytest.fixture
def bench(request):
    return _Bench(request)
