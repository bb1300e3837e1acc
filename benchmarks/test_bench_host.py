"""Host time per call: one FusedCondLoRALinear forward+backward against a frozen nn.Linear whose input requires
grad, at 8 x 64 -> 64, r=4, where only overhead counts (condlora_kernels.bench.host says how it is timed).

CPU tensors with the cpu backend; CUDA tensors with the default backend (marked `gpu`). The host-clock
medians and the ratio to nn.Linear are in extra_info; pytest-benchmark times rounds of one batch of calls.
"""

import pytest
import torch

from condlora_kernels.bench.host import HOST_LAYERS

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
CASES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=GPU, id="cuda")]


@pytest.mark.parametrize("provider", list(HOST_LAYERS))
@pytest.mark.parametrize("device", CASES)
def test_host_time(bench, host_points, record_point, device, provider):
    bench.group = f"host time {device}"
    point = host_points(device)[provider]
    record_point(bench, point, device, rounds=5)
    assert point.row["layer"] == HOST_LAYERS[provider]
