"""Model-level API: apply CondLoRA to any nn.Module (transformers models included), merge, save, load.

One generator per target module name is shared by all layers of that name, as in the paper: for
RoBERTa-base with target_modules=["query", "value"] and r=8 there are two generators (query, value)
and 2 * 2 * 8 * 768 = 24,576 trainable parameters, against 294,912 for LoRA.

Layers of one target name whose shapes differ (rare: some pruned or mixture models) get one generator
per shape; their keys are `<target>` for the first shape met and `<target>__<out>x<in>` for the others.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable, Optional, Union

import torch
from torch import nn

from condlora_kernels._validation import check_dropout_p, check_rank
from condlora_kernels.modules.generator import CondLoRAGenerator
from condlora_kernels.modules.linear import FusedCondLoRALinear, adapter_dtype, resolve_mode
from condlora_kernels.ops.backends import check_backend_name

CONFIG_NAME = "condlora_config.json"
WEIGHTS_NAME = "condlora_model.safetensors"


def _matched_target(name: str, target_modules: Union[str, Iterable[str]]) -> Optional[str]:
    """The target that module `name` matches: a regex (full match, as PEFT) or a list of name suffixes."""
    if isinstance(target_modules, str):
        return name.rsplit(".", 1)[-1] if re.fullmatch(target_modules, name) else None
    for target in target_modules:
        if name == target or name.endswith("." + target):
            return target
    return None


def _generator_key(target: str) -> str:
    return target.replace(".", "_")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def condlora_layers(model: nn.Module) -> dict:
    """{module name: FusedCondLoRALinear} for every CondLoRA layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedCondLoRALinear)}


def condlora_generators(model: nn.Module) -> dict:
    """{generator key: CondLoRAGenerator}, each shared generator once (keyed by apply_condlora's key, or by
    the name of the first layer that uses it for layers built by hand)."""
    generators, seen = {}, set()
    for name, layer in condlora_layers(model).items():
        if id(layer.generator) not in seen:
            seen.add(id(layer.generator))
            generators[layer.generator_key or name.replace(".", "_")] = layer.generator
    return generators


def apply_condlora(model: nn.Module, target_modules: Union[str, Iterable[str]], r: int = 8, alpha: float = 8,
                   dropout: float = 0.0, mode: str = "auto", modules_to_save: Optional[Iterable[str]] = None,
                   backend: str = "auto") -> nn.Module:
    """Replace the matching nn.Linear layers of `model` by FusedCondLoRALinear, in place, and return `model`.

    Args:
        target_modules: module-name suffixes (e.g. ["query", "value"]), or one regex matched against the
            whole module name, as PEFT's LoraConfig takes them.
        r, alpha, dropout: rank, scaling numerator (scaling = alpha / r) and dropout on the low-rank path.
        mode: "auto" (paper mode for square layers, general otherwise), "paper" or "general".
        modules_to_save: module-name suffixes whose parameters stay trainable (e.g. ["classifier"]).
        backend: passed to every layer (see `condlora_linear`).

    All parameters except the generators and `modules_to_save` are frozen.
    """
    check_rank(r)
    check_dropout_p(dropout)
    check_backend_name(backend)
    if isinstance(target_modules, str) and not target_modules:
        raise ValueError("target_modules must name at least one module")
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")

    matches = [(name, module, _matched_target(name, targets)) for name, module in model.named_modules()
               if isinstance(module, nn.Linear)]
    matches = [(name, module, target) for name, module, target in matches if target is not None]
    if not matches:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:8]
        raise ValueError(f"target_modules={target_modules!r} matched no nn.Linear in the model; "
                         f"some of its linear layers: {linear_names}")

    for param in model.parameters():
        param.requires_grad_(False)

    generators: dict = {}  # (target, in, out) -> (key, generator)
    used_keys = set(condlora_generators(model))
    for name, linear, target in matches:
        shape = (linear.in_features, linear.out_features)
        layer_mode = resolve_mode(mode, *shape)
        if (target, *shape) not in generators:
            key = _generator_key(target)
            if key in used_keys:
                key = f"{key}__{shape[1]}x{shape[0]}"
            used_keys.add(key)
            generator = CondLoRAGenerator(*shape, r=r, mode=layer_mode, device=linear.weight.device,
                                          dtype=adapter_dtype(linear.weight.dtype))
            generators[(target, *shape)] = (key, generator)
        key, generator = generators[(target, *shape)]
        layer = FusedCondLoRALinear.from_linear(linear, r=r, alpha=alpha, dropout=dropout, generator=generator,
                                                mode=layer_mode, backend=backend)
        layer.generator_key = key
        _set_submodule(model, name, layer)

    for name, module in model.named_modules():
        if modules_to_save and _matched_target(name, list(modules_to_save)) is not None:
            for param in module.parameters():
                param.requires_grad_(True)
    model.condlora_config = {"target_modules": targets, "r": r, "alpha": alpha, "dropout": dropout, "mode": mode,
                             "modules_to_save": list(modules_to_save or []), "backend": backend}
    return model


def merge_condlora(model: nn.Module) -> nn.Module:
    """merge() every CondLoRA layer (W0 <- W0 + s B A); unmerge_condlora() restores W0 bit for bit."""
    for layer in condlora_layers(model).values():
        layer.merge()
    return model


def unmerge_condlora(model: nn.Module) -> nn.Module:
    for layer in condlora_layers(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every CondLoRA layer by a plain nn.Linear holding W0 + s B A: a model without this package's ops,
    ready for torch.export, ONNX or serving."""
    for name, layer in condlora_layers(model).items():
        _set_submodule(model, name, layer.to_linear())
    if hasattr(model, "condlora_config"):
        del model.condlora_config
    return model


def condlora_state_dict(model: nn.Module) -> dict:
    """The trainable state only: each generator once (`generators.<key>.theta_a|theta_b`) and the
    parameters of modules_to_save (`base.<parameter name>`)."""
    state = {}
    for key, generator in condlora_generators(model).items():
        state[f"generators.{key}.theta_a"] = generator.theta_a.detach()
        state[f"generators.{key}.theta_b"] = generator.theta_b.detach()
    generator_params = {id(p) for g in condlora_generators(model).values() for p in g.parameters()}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in generator_params:
            state[f"base.{name}"] = param.detach()
    return state


def save_condlora(model: nn.Module, directory: Union[str, os.PathLike]) -> None:
    """Write the config (JSON) and the trainable state (safetensors) of a CondLoRA model to `directory`."""
    from safetensors.torch import save_file

    if not condlora_layers(model):
        raise ValueError("the model has no CondLoRA layers: call apply_condlora(model, ...) first")
    os.makedirs(directory, exist_ok=True)
    config = dict(getattr(model, "condlora_config", {}))
    config["generator_keys"] = sorted(condlora_generators(model))
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    tensors = {k: v.contiguous().cpu() for k, v in condlora_state_dict(model).items()}
    save_file(tensors, os.path.join(directory, WEIGHTS_NAME))


def load_condlora(model: nn.Module, directory: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load what save_condlora wrote. A model without CondLoRA layers gets them first, from the saved config."""
    from safetensors.torch import load_file

    with open(os.path.join(directory, CONFIG_NAME)) as f:
        config = json.load(f)
    if not condlora_layers(model):
        apply_condlora(model, config["target_modules"], r=config["r"], alpha=config["alpha"],
                       dropout=config["dropout"], mode=config["mode"], modules_to_save=config["modules_to_save"],
                       backend=config.get("backend", "auto"))
    saved = load_file(os.path.join(directory, WEIGHTS_NAME))
    expected = condlora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if strict and (missing or unexpected):
        raise ValueError(f"state in {directory} does not fit the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, value in saved.items():
            if key in expected:
                if expected[key].shape != value.shape:
                    raise ValueError(f"{key}: saved shape {tuple(value.shape)} != model shape {tuple(expected[key].shape)}")
                expected[key].copy_(value)
    return model
