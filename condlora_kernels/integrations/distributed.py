"""Distributed training: DDP and FSDP2 with CondLoRA's shared generators (docs/design.md §8.7).

DDP: refuse the one configuration that would train CondLoRA with wrong gradients (below). FSDP2: shard each
block, then the model root (`shard_condlora_model`), and refuse a layer that reads a DTensor (further below).

Every CondLoRA layer of one module type uses the same generator (theta_a, theta_b) (docs/design.md §1, §8.7).
DistributedDataParallel's reducer hooks each parameter's gradient accumulator and all-reduces a parameter when
that hook fires, expecting it to fire once per backward pass. A shared parameter is fine in a plain backward and
under non-reentrant activation checkpointing: the engine sums the contributions of every layer and runs the
accumulator once. Reentrant checkpointing (`torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`, and
DeepSpeed's or Megatron's CheckpointFunction) reruns each block's forward inside the backward and differentiates
it with a nested backward call, so the generator's accumulator fires once per checkpointed block. DDP with
`static_graph=False` then all-reduces the generator when the first block has contributed and lets the other
blocks' contributions stay local: the ranks drift apart without an error (with `find_unused_parameters=True` DDP
stops with "Expected to mark a variable ready only once"). `DDP(static_graph=True)` counts the firings in its
first iteration and reduces after the last one, which is exact.

`check_recomputation(layer)` is called by `FusedCondLoRALinear.forward` only when the forward runs inside a
backward pass (the hot path pays one check, docs/design.md §4), i.e. when activation checkpointing recomputes the
layer. It raises `ReentrantCheckpointDDPError` before the nested backward runs, hence before any optimizer step,
when

  * the recomputation is not torch's non-reentrant one, which recomputes inside a saved-tensor unpack hook with
    saved-tensors hooks of its own pushed (defined in `torch.utils.checkpoint`; on torch < 2.8, which cannot
    read that stack, the innermost `torch.utils.checkpoint` frame tells). Any other forward inside a backward
    (reentrant checkpointing, whatever its implementation) may be differentiated by a nested backward; and
  * a DistributedDataParallel with `static_graph=False` synchronises a trainable parameter of the layer's
    generator. DDP instances are found through a module-registration hook (DDP's constructor registers the model
    it wraps as `self.module`), held weakly.

The generator is found through `layer.generator`, wherever the model registers it. Forwards traced by
torch.compile are not checked (the guard in `forward` is skipped while compiling).
"""

from __future__ import annotations

import sys
import weakref

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Every DistributedDataParallel built in this process, held weakly; {DDP: ids of the parameters it synchronises}.
_ddp_parameter_ids: "weakref.WeakKeyDictionary[DistributedDataParallel, frozenset | None]" = weakref.WeakKeyDictionary()


class ReentrantCheckpointDDPError(RuntimeError):
    """Reentrant activation checkpointing under DistributedDataParallel(static_graph=False): CondLoRA's shared
    generators would get wrong gradients (the message says what to change)."""


def _record_ddp(module: nn.Module, name: str, submodule) -> None:
    if isinstance(module, DistributedDataParallel) and name == "module":
        _ddp_parameter_ids[module] = None  # filled on first use: the constructor has not finished yet


nn.modules.module.register_module_module_registration_hook(_record_ddp)


def _synchronised_ids(ddp: DistributedDataParallel) -> frozenset:
    ids = _ddp_parameter_ids.get(ddp)
    if ids is None:
        params = getattr(ddp, "_module_parameters", None)  # what the reducer hooks (ignored parameters excluded)
        ids = frozenset(id(p) for p in (params if params is not None else ddp.module.parameters()))
        _ddp_parameter_ids[ddp] = ids
    return ids


CHECKPOINT_MODULE = "torch.utils.checkpoint"
# The saved-tensors hooks on top of the stack (torch >= 2.8; None on older torch, which cannot read the stack).
_top_saved_tensors_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def _non_reentrant_recomputation() -> bool:
    """True inside torch's non-reentrant checkpoint: it recomputes under saved-tensors hooks of its own, defined in
    torch.utils.checkpoint. Where the hooks cannot be read, the innermost torch.utils.checkpoint frame says it:
    CheckpointFunction.backward recomputes reentrantly, any other (recompute_fn, unpack_hook) does not."""
    if _top_saved_tensors_hooks is not None:
        hooks = _top_saved_tensors_hooks(False)
        pack = hooks[0] if hooks is not None else None
        return getattr(pack, "_checkpoint_internal", False) or getattr(pack, "__module__", None) == CHECKPOINT_MODULE
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") != CHECKPOINT_MODULE:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_name != "backward"


def _non_static_ddp_synchronising(params) -> DistributedDataParallel | None:
    for ddp in list(_ddp_parameter_ids.keys()):
        if not getattr(ddp, "static_graph", False) and any(id(p) in _synchronised_ids(ddp) for p in params):
            return ddp
    return None


def check_recomputation(layer: nn.Module) -> None:
    """Raise ReentrantCheckpointDDPError if this forward of `layer` (run inside a backward pass) is a reentrant
    recomputation whose generator a DistributedDataParallel(static_graph=False) synchronises; else do nothing."""
    if not torch.is_grad_enabled() or _non_reentrant_recomputation():
        return
    trainable = [p for p in layer.generator.parameters() if p.requires_grad]
    if not trainable or _non_static_ddp_synchronising(trainable) is None:
        return
    key = getattr(layer, "generator_key", None)
    generator = f"the generator shared by every {key!r} layer" if key else "a shared CondLoRA generator"
    raise ReentrantCheckpointDDPError(
        "condlora_kernels: reentrant activation checkpointing (use_reentrant=True) under "
        "DistributedDataParallel(static_graph=False) would give wrong gradients: "
        f"{generator} gets its gradient in one nested backward per checkpointed block, and DDP all-reduces it "
        "after the first one, so the ranks drift apart. Use non-reentrant checkpointing "
        "(torch.utils.checkpoint.checkpoint(..., use_reentrant=False); transformers: "
        "gradient_checkpointing_kwargs={'use_reentrant': False}), or DDP(model, static_graph=True) "
        "(transformers: TrainingArguments(ddp_static_graph=True); accelerate: "
        "DistributedDataParallelKwargs(static_graph=True)).")


# --------------------------------------------------------------------------------------------------
# FSDP2 (torch.distributed.fsdp.fully_shard)
# --------------------------------------------------------------------------------------------------
#
# apply_condlora stores each generator once, at the model root (model.condlora_generators); a layer reads
# layer.generator.theta_a at every call. With each block sharded, then the root, the generators belong to the
# root's FSDP unit: gathered by the root's pre-forward (so every layer, in every block's forward and in the
# recomputation of activation checkpointing, reads the whole unsharded tensors), kept gathered until the
# backward ends (FSDP2 does not reshard the root after its forward), and reduce-scattered once in the root's
# post-backward, after every layer's contribution has been accumulated into the one unsharded gradient.

# What a layer normally reads: a parameter, or a plain tensor (torch.func.functional_call, hand-set tensors).
PLAIN_TENSOR_TYPES = (nn.Parameter, torch.Tensor)


class ShardedTensorError(RuntimeError):
    """A CondLoRA layer was called with a DTensor (an FSDP2 shard) for its generator or weight: the message says
    which fully_shard layout to use instead."""


def check_unsharded(layer: nn.Module) -> None:
    """Raise ShardedTensorError if `layer` would compute with a DTensor; else do nothing. Called by
    FusedCondLoRALinear.forward only when its theta_a or weight is not a plain tensor (docs/design.md §8.7)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    generator = layer.generator
    if isinstance(generator.theta_a, DTensor) or isinstance(generator.theta_b, DTensor):
        key = getattr(layer, "generator_key", None)
        if key is None:  # a hand-built layer owns its generator: the unit that holds the layer gathers it
            raise ShardedTensorError(
                "condlora_kernels: the generator owned by this CondLoRA layer is still sharded (a DTensor) when the "
                "layer runs: fully_shard a module that contains the layer, not the generator by itself")
        raise ShardedTensorError(
            f"condlora_kernels: the generator shared by every {key!r} layer is still sharded (a DTensor) when the "
            "layer runs: no FSDP unit gathered it before this forward. The generators are stored at the model root "
            "(model.condlora_generators) and must be gathered by the root's fully_shard, whose forward runs around "
            "every layer's: shard each block, then the root (condlora_kernels.shard_condlora_model(model), or "
            "`for block in blocks: fully_shard(block)` then `fully_shard(model)`). Do not call fully_shard on a "
            "generator by itself, and call the sharded model, not one of its blocks or layers on its own.")
    if isinstance(layer.weight, DTensor) or isinstance(layer.bias, DTensor):
        raise ShardedTensorError(
            "condlora_kernels: the frozen weight of a CondLoRA layer is still sharded (a DTensor) when the layer "
            "runs: it is called outside the forward of the module that fully_shard wrapped it in (FSDP2 gathers a "
            "unit's parameters only around that unit's forward); call the sharded model instead")


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module inside torch's CheckpointWrapper (apply_activation_checkpointing), or the module itself."""
    return getattr(module, "_checkpoint_wrapped_module", module)


def _block_class_check(model: nn.Module, block_classes) -> tuple:
    """(classes, names) from `block_classes`: classes or class names; by default the model's _no_split_modules
    (transformers models: the decoder or encoder layer classes, as accelerate's transformer_based_wrap)."""
    if block_classes is None:
        block_classes = getattr(model, "_no_split_modules", None)
        if not block_classes:
            raise ValueError(f"block_classes is needed: {type(model).__name__} does not list its block classes "
                             "(_no_split_modules); pass the transformer block class, e.g. block_classes=[MyBlock]")
    if isinstance(block_classes, (str, type)):
        block_classes = [block_classes]
    if not block_classes:
        raise ValueError("block_classes is empty: pass the transformer block classes (or leave it out for a "
                         "transformers model, which lists them)")
    classes, names = [], set()
    for entry in block_classes:
        if isinstance(entry, type) and issubclass(entry, nn.Module):
            classes.append(entry)
        elif isinstance(entry, str) and entry:
            names.add(entry)
        else:
            raise TypeError(f"block_classes entries must be nn.Module classes or class names, got {entry!r}")
    return tuple(classes), names


def shard_condlora_model(model: nn.Module, block_classes=None, **fsdp_kwargs) -> nn.Module:
    """FSDP2 for a model adapted by apply_condlora: `fully_shard` each block, then the model root (which stores
    the shared generators and the modules_to_save), and return the model (sharded in place).

    Equivalent to `for block in blocks: fully_shard(block, **fsdp_kwargs)` then `fully_shard(model, ...)`,
    with checks first: every block class matches a module, no block is the root, and the generator store is not
    sharded on its own (docs/design.md §8.7). Forgetting the root call would leave the generators out of every
    FSDP unit: each rank would train its own copy, without any error.

    Args:
        block_classes: the block classes or class names (e.g. ["BertLayer"], [LlamaDecoderLayer]); default: the
            model's `_no_split_modules` (transformers models). A block inside torch's CheckpointWrapper is found
            through it and the wrapper is sharded. Nested blocks are sharded innermost first.
        fsdp_kwargs: passed to every fully_shard call (mesh, mp_policy, offload_policy, reshard_after_forward,
            ...); the root gets them without reshard_after_forward, so that FSDP2 keeps the root's parameters,
            the generators among them, gathered from its forward to the end of the backward, as it does by
            default. Without `mesh`, fully_shard takes the accelerator's mesh and moves the model there; for a
            model trained on the CPU of a host with a GPU, pass `mesh=init_device_mesh("cpu", (world_size,))`.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    from torch.distributed.device_mesh import DeviceMesh

    from condlora_kernels.integrations.model import GENERATORS_ATTR, _require_layers, _some

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _require_layers(model, "shard_condlora_model")
    mesh = fsdp_kwargs.get("mesh")
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh (e.g. init_device_mesh('cpu', (world_size,))), got {mesh!r}")
    if isinstance(model, FSDPModule):
        raise ValueError(f"{type(model).__name__} is already sharded (fully_shard was called on the model root)")
    store = model._modules.get(GENERATORS_ATTR)
    if isinstance(store, FSDPModule) or any(isinstance(m, FSDPModule) for m in (store.modules() if store else ())):
        raise ValueError(f"model.{GENERATORS_ATTR} is sharded on its own (fully_shard was called on a generator): "
                         "the layers would read shards. Build the model again and let this function shard it: "
                         "each block, then the root, whose fully_shard gathers the generators")
    classes, names = _block_class_check(model, block_classes)

    def is_block(module):
        inner = _unwrapped(module)
        return isinstance(inner, classes) or type(inner).__name__ in names

    candidates = [m for name, m in model.named_modules() if name and is_block(m)]
    wrapped = {id(_unwrapped(m)) for m in candidates if _unwrapped(m) is not m}
    blocks = [m for m in candidates if id(m) not in wrapped]  # a CheckpointWrapper, not the block inside it
    found = {type(_unwrapped(m)).__name__ for m in blocks}
    missing = sorted(names - found) + sorted(c.__name__ for c in classes if not any(
        isinstance(_unwrapped(m), c) for m in blocks))
    if missing if block_classes is not None else not blocks:  # the default list may name unused classes
        raise ValueError(f"block_classes {missing or sorted(names)} match no module of the model (its module "
                         f"classes: {_some(sorted({type(m).__name__ for m in model.modules()}), 12)})")
    root_kwargs = {k: v for k, v in fsdp_kwargs.items() if k != "reshard_after_forward"}
    for block in reversed(blocks):  # named_modules is pre-order: reversed, inner blocks come first
        if not isinstance(block, FSDPModule):
            fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **root_kwargs)
    return model
