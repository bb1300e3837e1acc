"""Distributed training: refuse the one DDP configuration that would train CondLoRA with wrong gradients.

Every CondLoRA layer of one module type uses the same generator (theta_a, theta_b) (docs/design.md §1, §8).
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
backward pass (its one check on the hot path, docs/design.md §4), i.e. when activation checkpointing recomputes
the layer. It raises `ReentrantCheckpointDDPError` before the nested backward runs, hence before any optimizer
step, when

  * the recomputation is reentrant: torch's non-reentrant checkpoint recomputes inside a saved-tensor unpack hook
    with its own saved-tensors hooks pushed (defined in `torch.utils.checkpoint`); a recomputation without them
    is differentiated by a nested backward; and
  * a DistributedDataParallel with `static_graph=False` synchronises a trainable parameter of the layer's
    generator. DDP instances are found through a module-registration hook (DDP's constructor registers the model
    it wraps as `self.module`), held weakly.

The generator is found through `layer.generator`, wherever the model registers it.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Every DistributedDataParallel built in this process, held weakly; {DDP: ids of the parameters it synchronises}.
_ddp_parameter_ids: "weakref.WeakKeyDictionary[DistributedDataParallel, frozenset]" = weakref.WeakKeyDictionary()


class ReentrantCheckpointDDPError(RuntimeError):
    """Reentrant activation checkpointing under DistributedDataParallel(static_graph=False): CondLoRA's shared
    generators would get wrong gradients (the message says what to change)."""


def _record_ddp(module: nn.Module, name: str, submodule) -> None:
    if isinstance(module, DistributedDataParallel) and name == "module":
        _ddp_parameter_ids[module] = frozenset()  # filled on first use: the constructor has not finished yet


nn.modules.module.register_module_module_registration_hook(_record_ddp)


def _synchronised_ids(ddp: DistributedDataParallel) -> frozenset:
    ids = _ddp_parameter_ids.get(ddp)
    if not ids:
        params = getattr(ddp, "_module_parameters", None)  # what the reducer hooks (ignored parameters excluded)
        ids = frozenset(id(p) for p in (params if params is not None else ddp.module.parameters()))
        _ddp_parameter_ids[ddp] = ids
    return ids


def _non_reentrant_recomputation() -> bool:
    """True inside torch's non-reentrant checkpoint: its recomputation runs under its own saved-tensors hooks."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if hooks is None:
        return False
    pack = hooks[0]
    return bool(getattr(pack, "_checkpoint_internal", False)) or getattr(pack, "__module__", "") == "torch.utils.checkpoint"


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
        "gradient_checkpointing_kwargs={'use_reentrant': False}, its default), or DDP(model, static_graph=True) "
        "(transformers: TrainingArguments(ddp_static_graph=True); accelerate: "
        "DistributedDataParallelKwargs(static_graph=True)).")
