"""export_peft_adapter: a CondLoRA model as a standard PEFT LoRA adapter (docs/design.md §8).

CondLoRA's update of each layer is s * B A with A, B generated from that layer's W0, which is exactly a LoRA
update: written out per layer, the adapter loads in PEFT (and LoRA servers that read PEFT's format) with the
same outputs. Only the size differs: PEFT stores every layer's A and B, CondLoRA two maps per module type.
"""

from __future__ import annotations

import collections
import os
import re
import warnings
from typing import Union

import torch
from torch import nn

from condlora_kernels import reference
from condlora_kernels.integrations.adapter_file import atomic_write, check_output_directory, write_json
from condlora_kernels.integrations.model import (_model_modules, _modules_to_save_names, _require_layers, _some,
                                                 _contains)

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # PEFT's prefix of the base model's parameter names


def _exact(name: str) -> str:
    """A PEFT rank/alpha pattern that selects module `name` only (PEFT matches `(.*\\.)?(pattern)$`)."""
    return "^" + re.escape(name)


def _peft_modules_to_save(model: nn.Module) -> list:
    """The outermost modules_to_save modules, by full name. PEFT wraps every module whose name ends with an
    entry (no dot boundary); a module that an entry selects beyond ours is exported too, unchanged."""
    selected = _modules_to_save_names(model)
    outermost = [n for n in selected if not any(o != n and _contains(o, n) for o in selected)]
    extra = [n for n in _model_modules(model) if n not in selected and any(n.endswith(o) for o in outermost)
             and not any(_contains(o, n) for o in outermost)]
    if extra:
        warnings.warn(f"PEFT's modules_to_save matches module names by suffix, so its copy of {_some(extra)} "
                      "will be saved and trainable too; the exported adapter holds their current (frozen) values, "
                      "so the outputs are the same")
    return outermost + extra


def _refuse_tied_modules_to_save(model: nn.Module, modules_to_save: list) -> None:
    """PEFT trains and loads a modules_to_save module as a copy of it, so a parameter that module shares with one
    outside it (tied input and output embeddings, say) comes back untied: the outside one keeps the base model's
    value and the outputs differ. Refused, before anything is written."""
    names_of = collections.defaultdict(list)  # every name of each parameter, shared ones included
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of[id(param)].append(name)
    tied = []
    for module_name in modules_to_save:
        for param_name, param in model.get_submodule(module_name).named_parameters():
            outside = [n for n in names_of[id(param)] if not n.startswith(module_name + ".")]
            if outside:
                tied.append(f"{module_name}.{param_name} (also {', '.join(outside)})")
    if tied:
        raise ValueError(f"modules_to_save parameters tied to parameters outside their module: {_some(tied)}. PEFT "
                         "loads a modules_to_save module as a copy, which unties them, so the exported adapter would "
                         "not reproduce this model's outputs. Keep the tied module out of modules_to_save, or keep the "
                         "adapter in CondLoRA's own format (save_condlora), which keeps the tie")


def export_peft_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write a standard PEFT LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`) to `directory`:
    each CondLoRA layer's generated A and B (in float32), `r` and `lora_alpha` such that PEFT's scaling is ours,
    target modules that select exactly the adapted layers, and the modules_to_save with their current values.
    `peft.PeftModel.from_pretrained(base_model, directory)` then reproduces the CondLoRA model's outputs."""
    from safetensors.torch import save_file

    layers = _require_layers(model, "export_peft_adapter")
    directory = os.fspath(directory)
    check_output_directory(directory, (ADAPTER_WEIGHTS_NAME, ADAPTER_CONFIG_NAME))
    merged = [name for name, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layers {_some(merged)} are merged (their weight holds W0 + s*B*A, not W0): call "
                         "unmerge_adapters(model) before export_peft_adapter")
    tensors = {}
    with torch.no_grad():
        for name, layer in layers.items():
            lora_a, lora_b = reference.generate_lora_weights(layer.weight.float(), layer.generator.theta_a.float(),
                                                             layer.generator.theta_b.float(), layer.mode)
            tensors[f"{_PREFIX}{name}.lora_A.weight"] = lora_a.cpu().contiguous()
            tensors[f"{_PREFIX}{name}.lora_B.weight"] = lora_b.cpu().contiguous()
    modules_to_save = _peft_modules_to_save(model)
    _refuse_tied_modules_to_save(model, modules_to_save)
    for module_name in modules_to_save:
        for param_name, param in model.get_submodule(module_name).named_parameters():
            tensors[f"{_PREFIX}{module_name}.{param_name}"] = param.detach().cpu().contiguous()

    # the most common (r, alpha) is the default; other layers get exact-name patterns
    (r, alpha), _ = collections.Counter((layer.r, layer.alpha) for layer in layers.values()).most_common(1)[0]
    dropouts = sorted({layer.dropout for layer in layers.values()})
    if len(dropouts) > 1:
        warnings.warn(f"the CondLoRA layers use dropouts {dropouts}, PEFT has one lora_dropout: exporting "
                      f"{dropouts[-1]} (dropout changes training only, not the outputs in eval mode)")
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": name_or_path, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropouts[-1], "use_rslora": False, "use_dora": False,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": "|".join(re.escape(name) for name in layers),  # PEFT full-matches a string
        "rank_pattern": {_exact(n): layer.r for n, layer in layers.items() if layer.r != r},
        "alpha_pattern": {_exact(n): layer.alpha for n, layer in layers.items() if layer.alpha != alpha},
        "modules_to_save": modules_to_save or None,
    }
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, ADAPTER_WEIGHTS_NAME),
                 lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_json(os.path.join(directory, ADAPTER_CONFIG_NAME), config)
