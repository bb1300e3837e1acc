"""pytest-benchmark wrappers over condlora_kernels.bench, the machinery that `condlora bench` runs too.

    pytest benchmarks/                                   CPU points (tiny, quick) + GPU points where CUDA is
    pytest benchmarks/ -m gpu --benchmark-json=out.json  the GPU-scale points only, with the tables

The numbers to read are in each benchmark's extra_info (CUDA-event medians from triton's do_bench on GPU,
ratio to the frozen layer, TFLOP/s, GB/s, peak memory, host time per call); pytest-benchmark's own columns
time a few synchronised rounds by wall clock. GPU-scale points carry the `gpu` marker and are skipped
without CUDA. CONDLORA_BENCH_QUICK=1 shortens the GPU timings. Timings are never asserted on.

pytest-benchmark's tables (one per group, hundreds of lines) are not printed by default, so that they do
not bury the test run's output: the points are still timed and --benchmark-json still writes them. They
are printed when the run selects the `gpu` marker (`-m gpu`), asks with --benchmark-verbose, or sets
CONDLORA_BENCH_TABLES=1.
"""

import os

import pytest
import torch

from condlora_kernels.bench import KernelSuite, ModelSuite, Settings
from condlora_kernels.bench.host import HostSuite
from condlora_kernels.bench.timing import synchronized, torch_threads


def pytest_configure(config):
    """--benchmark-quiet unless tables were asked for (the module docstring says when). Runs before
    pytest-benchmark's own pytest_configure (trylast), which reads the option."""
    if not config.pluginmanager.hasplugin("benchmark") or not hasattr(config.option, "benchmark_quiet"):
        return
    wanted = "gpu" in (config.option.markexpr or "") or os.environ.get("CONDLORA_BENCH_TABLES") == "1"
    if not wanted and not config.option.benchmark_verbose:
        config.option.benchmark_quiet = True

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


@pytest.fixture(scope="session")
def host_points():
    """host_points("cpu" | "cuda") -> {provider: Point}, measured once per session and device."""
    points = {}

    def get(device_type: str):
        if device_type not in points:
            points[device_type] = HostSuite(bench_settings(device_type)).measure(device_type)
        return points[device_type]

    return get


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
        assert (row["us_per_call"] if "us_per_call" in row else row["median_ms"]) > 0  # host rows: µs per call
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
