"""`condlora_linear`: the public functional API and the autograd Function behind it.

    y = x W0^T + b + s * (dropout(x) A^T) B^T,   A, B generated from W0 by theta_a, theta_b

Two routes, one contract (docs/design.md §4):
  - the cpu and cuda backends run the whole layer as the extension's op `condlora_C::linear` (checks, autocast,
    dropout seed and autograd in C++: one call from Python per forward, none per backward);
  - the triton and reference backends go through `CondLoRALinearFunction` below, one autograd Function for both,
    whose backward is each backend's hand-written implementation of the chain rule of docs/design.md §2.
The dropout mask is not stored: it is a function of a seed drawn from torch's RNG on x's device (so
`torch.manual_seed` reproduces it) and of the element's index, regenerated in the backward (docs/design.md §3).
With `recompute_weight_cast`, or for an x that needs no gradient, neither is the rounding of a float32 master W0 to
the compute dtype: the backward rounds the master again (docs/design.md §4).
"""

from __future__ import annotations

from typing import Optional

import torch

from condlora_kernels._validation import (check_condlora_args, check_dropout_p, check_mode,
                                          check_recompute_weight_cast, check_scaling)
from condlora_kernels.ops.backends import BACKENDS, autocast_on, native_linear_op, resolve_backend

SEED_HIGH = 1 << 62  # seeds are drawn uniformly from [0, 2^62)
_PLAIN_REALS = (float, int)  # not bool: type(True) is bool


class CondLoRALinearFunction(torch.autograd.Function):
    """Autograd over one backend's forward and backward ops (the backend is passed by name). `weight` is in x's
    dtype; `master` is the float32 weight it was rounded from, saved instead of it (recompute_weight_cast), or
    None."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b, scaling: float, dropout_p: float,
                seed: Optional[torch.Tensor], mode: str, backend_name: str, master: Optional[torch.Tensor] = None):
        backend = BACKENDS[backend_name]
        d_out, d_in = weight.shape
        x2d = x.reshape(-1, d_in)
        out = backend.forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode)
        saved_weight = weight if master is None else master
        ctx.save_for_backward(x2d, saved_weight, theta_a, theta_b, out.u, out.lora_a, out.lora_b, seed)
        ctx.scaling, ctx.dropout_p, ctx.mode, ctx.backend_name = scaling, dropout_p, mode, backend_name
        ctx.x_shape = x.shape
        return out.y.reshape(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx, grad_y):
        x2d, weight, theta_a, theta_b, u, lora_a, lora_b, seed = ctx.saved_tensors
        if weight.dtype != x2d.dtype:  # a master kept instead of its rounding: rounded again, as the forward did
            weight = (round_master_in_backward(weight, grad_y, x2d.dtype) if torch.compiler.is_compiling()
                      else weight.to(x2d.dtype))
        need_x, _, need_b, need_ta, need_tb = ctx.needs_input_grad[:5]
        grads = BACKENDS[ctx.backend_name].backward(
            grad_y.reshape(-1, weight.shape[0]), x2d, weight, theta_a, theta_b, u, lora_a, lora_b,
            ctx.scaling, ctx.dropout_p, seed, ctx.mode, (need_x, need_ta, need_tb, need_b))
        grad_x = grads.grad_x.reshape(ctx.x_shape) if need_x else None
        return (grad_x, None, grads.grad_bias if need_b else None, grads.grad_theta_a if need_ta else None,
                grads.grad_theta_b if need_tb else None, None, None, None, None, None, None)


@torch.library.custom_op("condlora::round_master_in_backward", mutates_args=())
def round_master_in_backward(master: torch.Tensor, grad_y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """master.to(dtype), for the backward of a compiled step. Traced as a plain cast, it would be merged with the
    forward's identical rounding, and Inductor's partitioner would then keep that rounding from forward to backward,
    the copy the master was kept instead of. As an opaque op that reads grad_y (only to be ordered after it), it
    stays in the backward and the partitioner keeps the master."""
    return master.to(dtype, copy=True)  # an op's output may not alias its input


@round_master_in_backward.register_fake
def _(master, grad_y, dtype):
    return torch.empty_like(master, dtype=dtype)  # the strides .to keeps


def _autocast_inputs(x, weight, bias):
    """Under autocast for x's device, x, weight and bias in the autocast dtype, as F.linear would cast them (float64
    stays). The generators are cast later, to the compute dtype."""
    device_type = x.device.type
    if not autocast_on(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in (x, weight, bias))


def _to(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def draw_seed(x: torch.Tensor) -> torch.Tensor:
    """A dropout seed: one int64 drawn from torch's RNG on x's device (so `torch.manual_seed` reproduces it).
    Through the extension's op where it is built: torch.compile keeps that op as it is (it is tagged
    nondeterministic_seeded), so compiled and eager runs draw the same masks (docs/design.md §3)."""
    if native_linear_op() is not None:
        return torch.ops.condlora_C.draw_seed.default(x)
    return torch.randint(0, SEED_HIGH, (1,), device=x.device, dtype=torch.int64)


def condlora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], theta_a: torch.Tensor,
                    theta_b: torch.Tensor, scaling: float, *, dropout_p: float = 0.0, mode: str = "paper",
                    backend: str = "auto", recompute_weight_cast: bool = False) -> torch.Tensor:
    """CondLoRA linear layer: ``x W0^T + b + scaling * (dropout(x) A^T) B^T`` with A, B generated from W0.

    Args:
        x: input of shape (..., d_in).
        weight: the frozen W0, (d_out, d_in), in x's dtype (or a float32 master of a half-precision x); it never
            gets a gradient (must not require grad).
        bias: (d_out,) or None, dtype as weight; gets a gradient when it requires grad.
        theta_a: (r, d_in) in paper mode, (r, d_out) in general mode; shared by all layers of a module type. Any
            floating dtype (float32 masters of a half-precision layer are cast per call; the gradient comes back
            in theta's dtype).
        theta_b: (r, d_in), as theta_a.
        scaling: alpha / r.
        dropout_p: dropout probability on the low-rank path only (the frozen matmul sees x unchanged).
        mode: "paper" (A = theta_a W0^T, square W0, the paper's code) or "general" (A = theta_a W0, any W0).
        backend: "auto", "reference", "triton", "cuda" or "cpu" (see `available_backends()`).
        recompute_weight_cast: when weight is a float32 master rounded to a half-precision compute dtype, keep only
            the master from forward to backward and round it again in the backward: 2 bytes less memory per W0
            element until the backward, one more pass over W0 in it; the result is the same. No effect when W0 is
            already in the compute dtype.

    Returns:
        y of shape x.shape[:-1] + (d_out,), in x's dtype (the autocast dtype under autocast).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_recompute_weight_cast(recompute_weight_cast)  # a layer's attribute may have been set to anything
    chosen = resolve_backend(backend, x)
    if chosen.native:
        # the extension's op: checks, autocast, dropout seed and autograd in C++ (docs/design.md §4). Its schema
        # would convert a bool or a 0-d tensor to a float silently and fail on None without naming the argument:
        # the plain types pass at the cost of a type() each, anything else gets the Python route's checks first.
        if not (type(scaling) in _PLAIN_REALS and type(dropout_p) in _PLAIN_REALS and type(mode) is str):
            check_scaling(scaling)
            check_dropout_p(dropout_p)
            check_mode(mode)
        if weight is None or theta_a is None or theta_b is None:
            check_condlora_args(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode)  # names the None
        return chosen.linear(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode, recompute_weight_cast)
    stored = weight
    x, weight, bias = _autocast_inputs(x, weight, bias)
    check_condlora_args(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode)
    dtype = x.dtype
    weight, bias, theta_a, theta_b = (_to(t, dtype) for t in (weight, bias, theta_a, theta_b))
    half = dtype in (torch.float16, torch.bfloat16)
    # the master instead of its rounding where keeping the rounding is not worth it: x needing no gradient has no
    # dx GEMM in the backward (docs/design.md §4; the same rule as the C++ op's, csrc/linear.cpp)
    keep_master = recompute_weight_cast or not x.requires_grad
    master = stored if keep_master and half and stored.dtype == torch.float32 else None
    seed = draw_seed(x) if dropout_p > 0.0 else None
    args = (x, weight, bias, theta_a, theta_b, float(scaling), float(dropout_p), seed, mode, chosen.name, master)
    if not autocast_on(x.device.type):  # meta tensors, say: a device type autocast does not know
        return CondLoRALinearFunction.apply(*args)
    with torch.autocast(x.device.type, enabled=False):
        return CondLoRALinearFunction.apply(*args)
