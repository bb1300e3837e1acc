"""nn.Modules: the shared generator and the drop-in fused linear layer."""

from condlora_kernels.modules.generator import CondLoRAGenerator
from condlora_kernels.modules.linear import FusedCondLoRALinear

__all__ = ["CondLoRAGenerator", "FusedCondLoRALinear"]
