"""Distributed training: refuse the one DDP configuration that would train CondLoRA with wrong gradients.

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
