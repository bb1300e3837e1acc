"""What the Triton launchers need at run time, apart from the launch configuration (config.py):
where the kernels run (the interpreter, torch.compile tracing), the GPU's properties, the dependency
flags, tensor descriptors, the dropout mask's arguments, and the launch itself with its one fallback
(docs/design.md §5).
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Optional

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from condlora_kernels import reference

# ==================================================================================================
# where the kernels run
# ==================================================================================================


def interpreting() -> bool:
    """Whether Triton runs the kernels in its interpreter (TRITON_INTERPRET=1): on CPU tensors, one
    program after another."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tracing(t: torch.Tensor) -> bool:
    """True while torch.compile (or opcheck) traces the op: the tensors are fake or functional wrappers,
    not plain tensors, and have no memory that could be cached across calls."""
    return type(t) is not torch.Tensor or torch.compiler.is_compiling()


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of this GPU (132 on an H100)."""
    return _sm_count(device_index(device))


@functools.lru_cache(maxsize=None)
def _smem_limit(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_limit(device: torch.device) -> int:
    """Bytes of shared memory one block may use on this GPU (opt-in maximum: 227 KiB on an H100)."""
    return _smem_limit(device_index(device))


# ==================================================================================================
# kernel arguments
# ==================================================================================================


def tma_ready(*tensors: torch.Tensor) -> bool:
    """Whether TMA tensor descriptors can address these 2-D tensors: a Hopper GPU or newer (or the
    interpreter), unit stride in the last dimension, 16-byte aligned rows and start (the caching
    allocator aligns every allocation to 512 bytes, so the start is aligned when the storage offset
    is). Not in float64 (the interpreter's gradcheck)."""
    device = tensors[0].device
    if not interpreting() and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9):
        return False
    for t in tensors:
        size = t.element_size()
        if (t.dtype == torch.float64 or t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * size) % 16
                or (t.storage_offset() * size) % 16):
            return False
    return True


def descriptor(t: torch.Tensor, block_shape) -> TensorDescriptor:
    """A host-side TMA tensor descriptor of `t` that loads or stores blocks of `block_shape`."""
    return TensorDescriptor.from_tensor(t, list(block_shape))


_FLAG_WORKSPACES: dict = {}


def flags(n: int, like: torch.Tensor, reuse: bool = True) -> torch.Tensor:
    """n int32 dependency flags, zero on entry. In eager mode one buffer per (device, stream) is kept:
    every launch leaves its flags zeroed at exit (the kernels' `_exit_and_reset_flags`), so the next
    launch on that stream finds them clean and no zero-fill launch is needed per call. A fresh zeroed
    tensor under torch.compile tracing (a traced op) and where `reuse` is False: the custom ops that
    compiled graphs call, whose allocations may come from a CUDA graph's private pool (cudagraph trees
    refuse a tensor of that pool kept alive outside the graph's outputs)."""
    device = like.device
    if not reuse or tracing(like):
        return torch.zeros(n, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buf = _FLAG_WORKSPACES.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _FLAG_WORKSPACES[key] = buf
    return buf


def dropout_args(seed: Optional[torch.Tensor], dropout_p: float, placeholder: torch.Tensor):
    """(seed tensor, keep scale, 16-bit threshold) of the dropout mask (docs/design.md §3); without
    dropout `placeholder` stands in for the seed, which the kernels then never read."""
    if dropout_p > 0.0:
        return seed, reference.dropout_keep_scale(dropout_p), reference.dropout_threshold(dropout_p)
    return placeholder, 1.0, 0


# ==================================================================================================
# the launch
# ==================================================================================================


def _launchable(kernel, like: torch.Tensor):
    """The kernel itself in eager mode; wrapped for torch.compile while tracing. (Called outside a
    triton_op body, wrap_triton routes every launch through a higher-order op that keeps its constant
    arguments in a global table: slower, and it holds on to the tensors behind tensor descriptors.)"""
    return torch.library.wrap_triton(kernel) if tracing(like) else kernel


@functools.lru_cache(maxsize=None)
def _runtime_parameters(kernel) -> tuple[str, ...]:
    """The kernel's parameters that are not tl.constexpr, in order (the interpreter's kernels too)."""
    parameters = inspect.signature(kernel.fn).parameters.values()
    return tuple(p.name for p in parameters if "constexpr" not in str(p.annotation))


def _in_order(kernel, args: dict) -> tuple:
    """The runtime arguments, given by name, in the kernel's parameter order; every one must be named."""
    names = _runtime_parameters(kernel)
    try:
        if len(args) == len(names):
            return tuple(map(args.__getitem__, names))
    except KeyError:
        pass
    raise TypeError(f"{kernel.fn.__name__}: arguments {sorted(set(args) ^ set(names))} missing or unknown")


_STAGE_LIMITS: dict = {}  # launch configuration -> the most pipeline stages that fit this GPU's shared memory


def launch(kernel, grid, args: dict, meta: dict, like: torch.Tensor, quiet: bool = False) -> None:
    """kernel[grid](**args, **meta): `args` are the runtime arguments by name (passed on in the kernel's
    parameter order: the binder's fast path, and the form wrap_triton has always been given), `meta`
    the constexpr ones and the launch options num_warps and num_stages.

    One fallback: a configuration whose pipeline does not fit the GPU's shared memory (an A100 has
    164 KiB, an H100 227 KiB; Triton versions lay buffers out differently) is retried with one stage
    fewer, and the limit is remembered. Said once, as a warning: it costs some speed (not while the
    autotuner races candidates, `quiet`: it times each as it runs)."""
    key = (kernel.fn.__name__, like.device, tuple(sorted((k, v) for k, v in meta.items() if k != "num_stages")))
    stages = min(meta["num_stages"], _STAGE_LIMITS.get(key, meta["num_stages"]))
    positional = _in_order(kernel, args)
    while True:
        try:
            _launchable(kernel, like)[grid](*positional, **{**meta, "num_stages": stages})
            return
        except triton.runtime.errors.OutOfResources as exc:
            if stages <= 1 or tracing(like):
                raise
            stages -= 1
            _STAGE_LIMITS[key] = stages
            if not quiet:
                warnings.warn(f"condlora_kernels: {key[0]} with {dict(key[2])} does not fit this GPU's shared "
                              f"memory ({exc}); using {stages} pipeline stage(s)", stacklevel=3)
