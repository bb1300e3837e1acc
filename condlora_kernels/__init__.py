"""condlora_kernels: fused kernels and modules for CondLoRA (arXiv 2403.14946).

CondLoRA generates each layer's LoRA matrices from that layer's frozen weight W0 with one pair of
linear maps per module type, shared by all layers:  A = theta_a W0^T (or theta_a W0),  B = W0 theta_b^T.

    condlora_linear(x, weight, bias, theta_a, theta_b, scaling, *, dropout_p=0.0, mode="paper", backend="auto")
    FusedCondLoRALinear.from_linear(linear, r=8, alpha=8, ...)        drop-in for nn.Linear
    apply_condlora(model, ["query", "value"], r=8, alpha=8)          any nn.Module / transformers model
    save_condlora / load_condlora, merge_condlora, export_peft_adapter
    set_recompute_weight_cast(model, True | False | "auto")   a float32 W0 under autocast: round it again in the
                                           backward (less memory) or keep its rounding; "auto", the default, where cheap
"""

from condlora_kernels import reference
from condlora_kernels.integrations import (apply_condlora, condlora_generators, condlora_layers, condlora_state_dict,
                                           export_peft_adapter, load_condlora, merge_adapters_in_place,
                                           merge_and_unload, merge_condlora, print_trainable_parameters,
                                           save_condlora, set_recompute_weight_cast, shard_condlora_model,
                                           unmerge_adapters)
from condlora_kernels.integrations.distributed import ReentrantCheckpointDDPError, ShardedTensorError
from condlora_kernels.modules import CondLoRAGenerator, FusedCondLoRALinear
from condlora_kernels.ops import (BackendUnavailableError, CondLoRAFallbackWarning, available_backends,
                                  condlora_linear)

from condlora_kernels.ops.backends import preload_backends

preload_backends()  # before any torch.compile trace, which cannot import them (backends.preload_backends)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError", "CondLoRAFallbackWarning", "CondLoRAGenerator", "FusedCondLoRALinear",
    "apply_condlora", "available_backends", "condlora_generators", "condlora_layers", "condlora_linear",
    "condlora_state_dict", "export_peft_adapter", "load_condlora", "merge_adapters_in_place", "merge_and_unload",
    "merge_condlora", "print_trainable_parameters", "reference", "ReentrantCheckpointDDPError", "save_condlora",
    "set_recompute_weight_cast", "shard_condlora_model", "ShardedTensorError", "unmerge_adapters",
    "__version__",
]
