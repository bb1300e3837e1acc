"""The C++/CUDA extension `condlora_kernels._C` as the "cpu" and "cuda" backends.

The extension is optional: where it was not built (CONDLORA_SKIP_EXT=1, no compiler) these backends
report why they cannot run, and `backend="auto"` falls back with a warning.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    from condlora_kernels import _C  # noqa: F401  (registers the torch.ops.condlora_C ops)

    LOAD_ERROR: Optional[str] = None
except ImportError as exc:
    _C = None
    LOAD_ERROR = f"condlora_kernels._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`"


class _ExtensionBackend:
    device_type = ""

    @classmethod
    def unavailable_reason(cls, x: torch.Tensor) -> Optional[str]:
        if LOAD_ERROR is not None:
            return LOAD_ERROR
        return "the C++ kernels are not implemented yet"

    @staticmethod
    def forward(*args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(*args, **kwargs):
        raise NotImplementedError


class CpuBackend(_ExtensionBackend):
    device_type = "cpu"


class CudaBackend(_ExtensionBackend):
    device_type = "cuda"
