"""Model-level integrations: apply CondLoRA to any nn.Module / transformers model, merge, save, load."""

from condlora_kernels.integrations.model import (apply_condlora, condlora_generators, condlora_layers,
                                                 condlora_state_dict, load_condlora, merge_and_unload,
                                                 merge_condlora, save_condlora, unmerge_condlora)

__all__ = ["apply_condlora", "condlora_generators", "condlora_layers", "condlora_state_dict", "load_condlora",
           "merge_and_unload", "merge_condlora", "save_condlora", "unmerge_condlora"]
