"""Test setup. Without a CUDA device the Triton kernels run under the Triton interpreter on CPU tensors,
so TRITON_INTERPRET must be set before anything imports triton."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _autotune_off_by_default(monkeypatch):
    """The tests run the heuristic launch configurations, as before autotuning existed: a race compiles
    every candidate, seconds each. tests/test_triton_autotune.py turns tuning on; CONDLORA_AUTOTUNE set
    by the caller wins. (A fixture, not os.environ at import: benchmarks/ in the same session tunes.)"""
    if "CONDLORA_AUTOTUNE" not in os.environ:
        monkeypatch.setenv("CONDLORA_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _fresh_rng():
    torch.manual_seed(0)
    yield
