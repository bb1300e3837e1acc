"""Kernel level: one linear layer, every provider against the frozen F.linear, forward / backward / both.

Providers and baselines: condlora_kernels.bench.providers (baselines imported from condlora_kernels.reference).
CPU: tiny shapes, fp32. GPU (marked `gpu`): docs/design.md §7's shapes in bf16, CUDA-graph repeats on the small ones.
"""

import pytest
import torch

from condlora_kernels.bench.providers import PROVIDER_NAMES
from condlora_kernels.bench.shapes import CPU_QUICK_SHAPES, GPU_SHAPES, MODES

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _id(device, shape):
    return f"{device}-{shape.key.replace(' ', '-')}"


CASES = ([pytest.param("cpu", s, id=_id("cpu", s)) for s in CPU_QUICK_SHAPES]
         + [pytest.param("cuda", s, marks=GPU, id=_id("cuda", s)) for s in GPU_SHAPES])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDER_NAMES)
@pytest.mark.parametrize("device,shape", CASES)
def test_kernel(bench, kernel_suite, record_point, device, shape, provider, mode):
    suite = kernel_suite(device)
    dtype = suite.settings.dtypes[0]
    bench.group = f"{device} {shape.key} {dtype} {mode}"  # pytest-benchmark compares providers per group
    point = suite.measure(provider, shape, mode, dtype)
    record_point(bench, point, device)
