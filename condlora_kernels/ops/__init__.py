"""The autograd / dispatch layer: the functional API, one autograd Function, backend selection."""

from condlora_kernels.ops.backends import (BackendUnavailableError, CondLoRAFallbackWarning, available_backends,
                                           select_backend)
from condlora_kernels.ops.condlora_linear import CondLoRALinearFunction, condlora_linear

__all__ = ["BackendUnavailableError", "CondLoRAFallbackWarning", "CondLoRALinearFunction", "available_backends",
           "condlora_linear", "select_backend"]
