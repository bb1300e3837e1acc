"""Model-level API: apply CondLoRA to any nn.Module (transformers models included), inspect, merge.

One generator per target module name is shared by all layers of that name, as in the paper: for
RoBERTa-base with target_modules=["query", "value"] and r=8 there are two generators (query, value)
and 2 * 2 * 8 * 768 = 24,576 trainable parameters, against 294,912 for LoRA. The generators are stored
once, at the model root (`model.condlora_generators`, an nn.ModuleDict); each layer keeps a reference
(docs/design.md §8).

Layers of one target name whose shapes differ (rare: some pruned or mixture models) get one generator
per shape; their keys are `<target>` for the first shape met and `<target>__<out>x<in>` for the others.

Every function here checks everything before it changes the model; on an error the model is left as it
was (modules, requires_grad flags, weights, attributes and config).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Iterable, NamedTuple, Optional, Union

import torch
from torch import nn

from condlora_kernels._validation import check_dropout_p, check_mode, check_rank, check_recompute_weight_cast
from condlora_kernels.modules.generator import CondLoRAGenerator
from condlora_kernels.modules.linear import FusedCondLoRALinear, adapter_dtype, check_alpha, resolve_mode
from condlora_kernels.ops.backends import check_backend_name

GENERATORS_ATTR = "condlora_generators"  # the nn.ModuleDict at the model root; state_dict keys start with it
CONFIG_ATTR = "condlora_config"  # {"apply_condlora_calls": [the arguments of each call, in order]}

Targets = Union[str, Iterable[str]]


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def match_target(name: str, target_modules: Targets) -> Optional[str]:
    """The target that module `name` matches: a regex (full match, as PEFT) or a list of name suffixes
    (`name == target` or `name` ends with `"." + target`); None if it matches none."""
    if isinstance(target_modules, str):
        return name.rsplit(".", 1)[-1] if re.fullmatch(target_modules, name) else None
    for target in target_modules:
        if name == target or name.endswith("." + target):
            return target
    return None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule called `name` (dotted path) by `module`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _is_generator_store(name: str) -> bool:
    return name == GENERATORS_ATTR or name.startswith(GENERATORS_ATTR + ".")


def _model_modules(model: nn.Module) -> dict:
    """{name: module} of the model's own modules (not the generator store), every name of a module reused
    under several names."""
    return {name: module for name, module in model.named_modules(remove_duplicate=False)
            if name and not _is_generator_store(name)}


def _close_names(entry: str, names: Iterable[str]) -> list:
    """Module-name suffixes (one or two components) that look like `entry`, for error messages."""
    suffixes = set()
    for name in names:
        parts = name.split(".")
        suffixes.update(".".join(parts[-k:]) for k in (1, 2) if len(parts) >= k)
    return difflib.get_close_matches(entry, sorted(suffixes), n=3, cutoff=0.6)


def _some(names, limit: int = 4) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer + ".")


# --------------------------------------------------------------------------------------------------
# Inspection
# --------------------------------------------------------------------------------------------------


def condlora_layers(model: nn.Module) -> dict:
    """{module name: FusedCondLoRALinear} for every CondLoRA layer of `model`."""
    _check_model(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, FusedCondLoRALinear)}


def _check_model(model) -> None:
    """Every function of this module takes a model: an nn.Module (a clear TypeError, not an AttributeError later)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")


def set_recompute_weight_cast(model: nn.Module, enabled=True) -> nn.Module:
    """Set `recompute_weight_cast` on every CondLoRA layer of `model` and return the model. With float32 weights
    in a half-precision step (autocast), True makes each layer keep only its float32 W0 from forward to backward
    and round it again in the backward; False keeps the rounding, as F.linear does; "auto" (what apply_condlora
    leaves) recomputes where the extra pass is estimated at most 1% of the step (FusedCondLoRALinear;
    docs/design.md §4). A setting of how the model runs, as gradient checkpointing is: neither `condlora_config`
    nor a saved adapter records it."""
    enabled = check_recompute_weight_cast(enabled, auto_allowed=True)
    layers = _require_layers(model, "set_recompute_weight_cast")
    for layer in layers.values():
        layer.recompute_weight_cast = enabled
    return model


def _is_linear_layer(module: nn.Module) -> bool:
    """A layer whose forward is one GEMM over its 2-D weight: nn.Linear, a CondLoRA layer, transformers' Conv1D."""
    return isinstance(module, (nn.Linear, FusedCondLoRALinear)) or (
        type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")
        and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


def adapted_weight_share(model: nn.Module) -> float:
    """The fraction of the elements of `model`'s linear-layer weights that its CondLoRA layers hold: the share
    of the step's GEMM work whose W0 `recompute_weight_cast="auto"` would round again (docs/design.md §4).
    Each module counts once, however many names it has."""
    _check_model(model)
    adapted = total = 0
    for _, module in model.named_modules():
        if _is_linear_layer(module):
            total += module.weight.numel()
            adapted += module.weight.numel() if isinstance(module, FusedCondLoRALinear) else 0
    return adapted / total if adapted else 1.0


def _share_weights(model: nn.Module) -> None:
    """Give every CondLoRA layer of `model` the model's adapted_weight_share (after a call that adds layers)."""
    share = adapted_weight_share(model)
    for layer in condlora_layers(model).values():
        layer.set_adapted_weight_share(share)


def condlora_generators(model: nn.Module) -> dict:
    """{generator key: CondLoRAGenerator}, each generator once: those stored at the model root under their
    key, then those owned by layers built by hand, keyed by the layer's name with dots replaced by "_"."""
    store = getattr(model, GENERATORS_ATTR, None)
    generators = dict(store.items()) if isinstance(store, nn.ModuleDict) else {}
    seen = {id(g) for g in generators.values()}
    for name, layer in condlora_layers(model).items():
        if id(layer.generator) not in seen:
            seen.add(id(layer.generator))
            generators[name.replace(".", "_")] = layer.generator
    return generators


def generator_parameter_names(model: nn.Module) -> set:
    """Names (as in model.named_parameters()) of every generator parameter."""
    generator_params = {id(p) for g in condlora_generators(model).values() for p in g.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in generator_params}


def condlora_state_dict(model: nn.Module) -> dict:
    """The adapter's state, under the model's own parameter names: every generator parameter once
    (`condlora_generators.<key>.theta_a|theta_b`, or `<layer>.generator.theta_a|theta_b` for a layer that
    owns its generator) and every other trainable parameter (modules_to_save)."""
    _require_layers(model, "condlora_state_dict")  # a model without an adapter has no adapter state
    generator_names = generator_parameter_names(model)
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad or name in generator_names}


class TrainableParameters(NamedTuple):
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def print_trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Print and return the trainable and total parameter counts (each shared tensor counted once), as PEFT's
    `print_trainable_parameters` prints them."""
    _check_model(model)
    params = list(model.parameters())  # deduplicated: a shared generator counts once
    counts = TrainableParameters(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    print(f"trainable params: {counts.trainable:,} || all params: {counts.total:,} || "
          f"trainable%: {counts.percent:.4f}")
    return counts


def _apply_calls(model: nn.Module) -> list:
    return list(getattr(model, CONFIG_ATTR, {}).get("apply_condlora_calls", []))


def _modules_to_save_names(model: nn.Module) -> list:
    """Names of the modules selected by the modules_to_save of every apply_condlora call."""
    entries = [entry for call in _apply_calls(model) for entry in call["modules_to_save"]]
    return [name for name in _model_modules(model) if entries and match_target(name, entries) is not None]


# --------------------------------------------------------------------------------------------------
# apply_condlora: a plan (all checks, nothing changed), then a commit
# --------------------------------------------------------------------------------------------------


def _check_target_modules(target_modules) -> Union[str, list]:
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules must name at least one module")
        try:
            re.compile(target_modules)
        except re.error as e:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {e}") from None
        return target_modules
    if target_modules is None or not isinstance(target_modules, Iterable) or isinstance(target_modules, bytes):
        raise TypeError(f"target_modules must be a list of module names or one regex string, got {target_modules!r}")
    targets = list(target_modules)
    if not targets:
        raise ValueError("target_modules must name at least one module")
    for entry in targets:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"target_modules entries must be non-empty strings, got {entry!r} in {targets!r}")
    return targets


def _check_modules_to_save(modules_to_save) -> list:
    if modules_to_save is None:
        return []
    if isinstance(modules_to_save, str):
        raise TypeError(f"modules_to_save must be a list of module names, got the string {modules_to_save!r}; "
                        f"write [{modules_to_save!r}]")
    if not isinstance(modules_to_save, Iterable):
        raise TypeError(f"modules_to_save must be a list of module names, got {modules_to_save!r}")
    entries = list(modules_to_save)
    for entry in entries:
        if not isinstance(entry, str) or not entry:
            raise TypeError(f"modules_to_save entries must be non-empty strings, got {entry!r} in {entries!r}")
    return entries


@dataclass
class _LayerPlan:
    names: list  # every name the nn.Linear is reachable under (one, unless the module is reused)
    linear: nn.Linear
    key: str
    mode: str


@dataclass
class _ApplyPlan:
    call: dict
    layers: list = field(default_factory=list)
    generators: dict = field(default_factory=dict)  # new key -> CondLoRAGenerator, not yet in the model
    trainable: list = field(default_factory=list)  # modules_to_save parameters
    first_call: bool = True


def _plan_apply(model: nn.Module, target_modules, r, alpha, dropout, mode, modules_to_save, backend) -> _ApplyPlan:
    r = check_rank(r)
    alpha, dropout = check_alpha(alpha, r), check_dropout_p(dropout)
    if mode != "auto":
        check_mode(mode)
    check_backend_name(backend)
    targets = _check_target_modules(target_modules)
    to_save = _check_modules_to_save(modules_to_save)
    if isinstance(model, FusedCondLoRALinear) or not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module containing nn.Linear layers, got {type(model).__name__}")
    if isinstance(model, (nn.Sequential, nn.ModuleList)):
        # the generators live at the root as one more child, which a sequence takes as one of its items (an
        # nn.Sequential would call it as a layer)
        raise TypeError(
            f"model is an nn.{type(model).__name__}: CondLoRA keeps the shared generators at the model root "
            f"(model.{GENERATORS_ATTR}), which would become one of its items; wrap it in a module of your own "
            "that holds it as an attribute and calls it in forward, and apply CondLoRA to that module")
    store = model._modules.get(GENERATORS_ATTR)
    if hasattr(model, GENERATORS_ATTR) and not isinstance(store, nn.ModuleDict):
        raise ValueError(f"the model has an attribute {GENERATORS_ATTR!r} that is not CondLoRA's generator "
                         "store (an nn.ModuleDict); rename it first")

    modules = _model_modules(model)
    existing_layers = [name for name, m in modules.items() if isinstance(m, FusedCondLoRALinear)]
    matches, names_of = _match_targets(model, modules, targets, existing_layers)
    plan = _ApplyPlan(call={"target_modules": targets, "r": r, "alpha": alpha, "dropout": dropout, "mode": mode,
                            "modules_to_save": to_save, "backend": backend},
                      first_call=not existing_layers and not _apply_calls(model))
    target_names = [n for linear, _ in matches for n in names_of[id(linear)]]
    plan.trainable = _modules_to_save_parameters(model, modules, to_save, target_names, existing_layers)
    _plan_generators(plan, matches, names_of, mode, set(store.keys()) if store is not None else set())
    return plan


def _match_targets(model: nn.Module, modules: dict, targets, existing_layers: list) -> tuple:
    """[(nn.Linear, target it matched)] once per module, and {id(module): [its names]}; raises when an entry
    matches nothing, a target is already a CondLoRA layer, or a target would be ignored."""
    names_of = {}
    for name, module in modules.items():
        names_of.setdefault(id(module), []).append(name)
    linears = {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    overlapping = [name for name in existing_layers if match_target(name, targets) is not None]
    if overlapping:
        raise ValueError(f"target_modules={targets!r} selects layers that already are CondLoRA layers "
                         f"({_some(overlapping)}): a second apply_condlora call may only add new targets; "
                         "to change r, alpha or mode, apply CondLoRA to the base model again")
    matched_entries, matches = set(), {}  # id(linear) -> (linear, target)
    for name, linear in linears.items():
        target = match_target(name, targets)
        if target is not None:
            matched_entries.add(target)
            matches.setdefault(id(linear), (linear, target))
    if not matches:
        raise ValueError(f"target_modules={targets!r} matched no nn.Linear in the model; "
                         f"some of its linear layers: {list(linears)[:8]}")
    for entry in [] if isinstance(targets, str) else targets:
        if entry not in matched_entries:
            raise ValueError(f"target_modules entry {entry!r} matches no nn.Linear of the model (other entries "
                             f"do); close names: {_close_names(entry, linears) or 'none'}; "
                             f"some linear layers: {list(linears)[:4]}")
    earlier_saved = _modules_to_save_names(model)
    for linear, _ in matches.values():
        weight = getattr(linear, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.is_floating_point() or weight.dim() != 2:
            described = (f"dtype {weight.dtype}, shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                         else type(weight).__name__)
            raise TypeError(f"target layer {names_of[id(linear)][0]} has no floating 2-D weight ({described}): "
                            "CondLoRA generates A and B from W0, which must be a float tensor (quantised layers "
                            "are not supported); leave it out of target_modules")
        for name in names_of[id(linear)]:
            parent = modules.get(name.rpartition(".")[0]) if "." in name else model
            if isinstance(parent, nn.MultiheadAttention):
                raise ValueError(f"{name} is the output projection of an nn.MultiheadAttention, which reads its "
                                 "weight directly and would ignore the adapter; leave it out of target_modules")
            inside = [m for m in earlier_saved if _contains(m, name)]
            if inside:
                raise ValueError(f"target layer {name} is inside {inside[0]}, a module that an earlier "
                                 "apply_condlora call keeps trainable (modules_to_save); its weight cannot also be "
                                 "frozen")
    return list(matches.values()), names_of


def _modules_to_save_parameters(model: nn.Module, modules: dict, entries: list, target_names: list,
                                existing_layers: list) -> list:
    """The parameters of the modules that `entries` select; each entry must select a module that contains no
    CondLoRA layer (a layer's W0 must stay frozen)."""
    params = []
    for entry in entries:
        selected = [name for name in modules if match_target(name, [entry]) is not None]
        if not selected:
            raise ValueError(f"modules_to_save entry {entry!r} matches no module of the model; close names: "
                             f"{_close_names(entry, modules) or 'none'}")
        for name in selected:
            clash = [t for t in target_names + existing_layers if _contains(name, t)]
            if clash:
                raise ValueError(f"modules_to_save entry {entry!r} selects {name}, which contains the CondLoRA "
                                 f"layer {clash[0]} (whose weight must stay frozen); name the modules to train "
                                 "outside the target layers")
            params.extend(modules[name].parameters())
    return params


def _plan_generators(plan: _ApplyPlan, matches: list, names_of: dict, mode: str, used_keys: set) -> None:
    """One new generator per (target, in_features, out_features), and each layer's plan."""
    groups = {}  # (target, in, out) -> key
    for linear, target in matches:
        shape, name = (linear.in_features, linear.out_features), names_of[id(linear)][0]
        layer_mode = resolve_mode(mode, *shape)
        if layer_mode == "paper" and shape[0] != shape[1]:
            raise ValueError(f"mode='paper' needs square layers, but {name} is {shape[1]}x{shape[0]} (out x in); "
                             "use mode='auto' or 'general'")
        if (target, *shape) not in groups:
            key = _generator_key(target, shape, used_keys)
            used_keys.add(key)
            groups[(target, *shape)] = key
            plan.generators[key] = CondLoRAGenerator(*shape, r=plan.call["r"], mode=layer_mode,
                                                     device=linear.weight.device,
                                                     dtype=adapter_dtype(linear.weight.dtype))
        key = groups[(target, *shape)]
        device = plan.generators[key].theta_a.device
        if linear.weight.device != device:
            raise ValueError(f"the layers of target {target!r} are on {device} and {linear.weight.device} ({name}); "
                             "the generator they share needs them on one device")
        plan.layers.append(_LayerPlan(names_of[id(linear)], linear, key, layer_mode))


def _generator_key(target: str, shape: tuple, used_keys: set) -> str:
    key = target.replace(".", "_")  # nn.ModuleDict keys cannot contain dots
    if key in used_keys:
        key = f"{key}__{shape[1]}x{shape[0]}"
    base, n = key, 2
    while key in used_keys:
        key, n = f"{base}_{n}", n + 1
    return key


class _Undo:
    """What a model-changing call needs to put the model back as it was if it fails half way: the requires_grad
    flags, the replaced modules, the generator store and the config."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.replaced = []  # (name, original module)
        self.had_store = GENERATORS_ATTR in model._modules
        self.store_keys = list(model._modules[GENERATORS_ATTR].keys()) if self.had_store else []
        self.had_config = hasattr(model, CONFIG_ATTR)
        self.config = getattr(model, CONFIG_ATTR, None)

    def replace(self, name: str, module: nn.Module) -> None:
        self.replaced.append((name, self.model.get_submodule(name)))
        set_submodule(self.model, name, module)

    def restore(self) -> None:
        for name, original in reversed(self.replaced):
            set_submodule(self.model, name, original)
        if self.had_store:
            store = self.model._modules[GENERATORS_ATTR]
            for key in [k for k in store.keys() if k not in self.store_keys]:
                del store[key]
        elif GENERATORS_ATTR in self.model._modules:
            delattr(self.model, GENERATORS_ATTR)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        if self.had_config:
            setattr(self.model, CONFIG_ATTR, self.config)
        elif hasattr(self.model, CONFIG_ATTR):
            delattr(self.model, CONFIG_ATTR)


def _commit_apply(model: nn.Module, plan: _ApplyPlan, undo: Optional[_Undo] = None) -> None:
    """Carry out a plan. `undo`: the caller's, when this commit is one step of a larger change (load_condlora);
    the caller restores the model on an error."""
    own_undo = undo is None
    undo = undo or _Undo(model)
    try:
        if plan.first_call:
            for param in model.parameters():
                param.requires_grad_(False)
        if GENERATORS_ATTR not in model._modules:
            model.add_module(GENERATORS_ATTR, nn.ModuleDict().train(model.training))
        store = model._modules[GENERATORS_ATTR]
        for key, generator in plan.generators.items():
            store[key] = generator.train(model.training)
        call = plan.call
        for layer_plan in plan.layers:
            generator = plan.generators[layer_plan.key]
            layer = FusedCondLoRALinear.from_linear(layer_plan.linear, r=call["r"], alpha=call["alpha"],
                                                    dropout=call["dropout"], generator=generator,
                                                    mode=layer_plan.mode, backend=call["backend"])
            layer.use_shared_generator(generator, layer_plan.key)
            for name in layer_plan.names:
                undo.replace(name, layer)
        for param in plan.trainable:
            param.requires_grad_(True)
        setattr(model, CONFIG_ATTR, {"apply_condlora_calls": _apply_calls(model) + [call]})
        _share_weights(model)
    except BaseException:
        if own_undo:
            undo.restore()
        raise


def apply_condlora(model: nn.Module, target_modules: Targets, r: int = 8, alpha: float = 8,
                   dropout: float = 0.0, mode: str = "auto", modules_to_save: Optional[Iterable[str]] = None,
                   backend: str = "auto") -> nn.Module:
    """Replace the matching nn.Linear layers of `model` by FusedCondLoRALinear, in place, and return `model`.

    Args:
        target_modules: module-name suffixes (e.g. ["query", "value"]), or one regex matched against the
            whole module name, as PEFT's LoraConfig takes them. Every entry of a list must match a layer.
        r, alpha, dropout: rank, scaling numerator (scaling = alpha / r, alpha a positive finite real) and
            dropout on the low-rank path.
        mode: "auto" (paper mode for square layers, general otherwise), "paper" or "general".
        modules_to_save: a list of module-name suffixes whose parameters stay trainable (e.g. ["classifier"]).
        backend: passed to every layer (see `condlora_linear`).

    The generators are stored once, in `model.condlora_generators`. The first call freezes every parameter
    except the generators and `modules_to_save`. A later call may add new targets (overlapping ones are an
    error); it freezes only the layers it wraps and leaves every other requires_grad flag as it was.
    `model.condlora_config` records the arguments of every call. On any error the model is left as it was.
    """
    plan = _plan_apply(model, target_modules, r, alpha, dropout, mode, modules_to_save, backend)
    _commit_apply(model, plan)
    return model


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def _layer_names(model: nn.Module) -> dict:
    """{id(layer): [every name it is reachable under]} for the CondLoRA layers."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, FusedCondLoRALinear):
            names.setdefault(id(module), []).append(name)
    return names


def _require_layers(model: nn.Module, what: str) -> dict:
    layers = condlora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no CondLoRA layers (call apply_condlora(model, ...) first)")
    return layers


def merge_condlora(model: nn.Module) -> nn.Module:
    """Replace every CondLoRA layer by a plain, frozen nn.Linear holding W0 + s B A (computed in float32 and
    rounded once to the weight's dtype), remove the generators and the CondLoRA config, and return the model:
    no op of this package is left in it (ready for torch.export, ONNX or serving). Every parameter is frozen
    except those of modules_to_save. Computes every merged weight before it changes anything."""
    layers = _require_layers(model, "merge_condlora")
    keep_trainable = {id(p) for name in _modules_to_save_names(model) for p in model.get_submodule(name).parameters()}
    linears = {id(layer): layer.to_linear() for layer in layers.values()}
    for layer_id, names in _layer_names(model).items():
        for name in names:
            set_submodule(model, name, linears[layer_id])
    if GENERATORS_ATTR in model._modules:
        delattr(model, GENERATORS_ATTR)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    for param in model.parameters():
        param.requires_grad_(id(param) in keep_trainable)
    return model


merge_and_unload = merge_condlora  # PEFT's name


def merge_adapters_in_place(model: nn.Module) -> nn.Module:
    """merge() every CondLoRA layer, keeping the layers (W0 <- W0 + s B A, a copy of W0 kept):
    unmerge_adapters() restores W0 bit for bit. Layers already merged are left as they are."""
    layers = _require_layers(model, "merge_adapters_in_place")
    merged = {name: layer.merged_weight() for name, layer in layers.items() if not layer.merged}
    for name, weight in merged.items():
        layers[name].merge(weight)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """unmerge() every merged CondLoRA layer: W0 restored bit for bit."""
    for layer in _require_layers(model, "unmerge_adapters").values():
        if layer.merged:
            layer.unmerge()
    return model
