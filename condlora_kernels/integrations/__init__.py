"""Model-level integrations: apply CondLoRA to any nn.Module / transformers model, merge, save, load, export."""

from condlora_kernels.integrations.adapter_file import load_condlora, save_condlora
from condlora_kernels.integrations.model import (TrainableParameters, apply_condlora, condlora_generators,
                                                 condlora_layers, condlora_state_dict, match_target,
                                                 merge_adapters_in_place, merge_and_unload, merge_condlora,
                                                 print_trainable_parameters, set_recompute_weight_cast, set_submodule,
                                                 unmerge_adapters)
from condlora_kernels.integrations.distributed import shard_condlora_model
from condlora_kernels.integrations.peft_export import export_peft_adapter

__all__ = ["TrainableParameters", "apply_condlora", "condlora_generators", "condlora_layers", "condlora_state_dict",
           "export_peft_adapter", "load_condlora", "match_target", "merge_adapters_in_place", "merge_and_unload",
           "merge_condlora", "print_trainable_parameters", "save_condlora", "set_recompute_weight_cast",
           "set_submodule", "shard_condlora_model", "unmerge_adapters"]
