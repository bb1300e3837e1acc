"""The C++/CUDA extension `condlora_kernels._C` (sources in csrc/) as the "cpu" and "cuda" backends.

The ops are defined once in C++ (TORCH_LIBRARY, namespace `condlora_C`) with one implementation per dispatch key;
this module adds their fake (shape-only) implementations for torch.compile and wraps them in the backend interface
of ops/backends.py:

    torch.ops.condlora_C.generate_lora_weights(weight, theta_a, theta_b, mode)                -> (lora_a, lora_b)
    torch.ops.condlora_C.forward(x, weight, bias?, theta_a, theta_b, scaling, dropout_p, seed?, mode)
                                                                                   -> (y, u, lora_a, lora_b)
    torch.ops.condlora_C.backward(grad_y, x, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p,
                                  seed?, mode, needs[4])      -> (grad_x, grad_theta_a, grad_theta_b, grad_bias)
    torch.ops.condlora_C.dropout_keep_mask(seed, n_rows, n_cols, dropout_p)         -> bool (n_rows, n_cols)

x is 2-D (N, d_in); `seed` is None when dropout_p == 0, else an int64 tensor with one element on x's device (the
CUDA kernels read it from device memory, so CUDA graphs and torch.compile stay correct). A custom op cannot return
None, so a gradient that `needs` does not ask for comes back as an empty tensor and is mapped to None here.

The extension is optional: where it was not built (CONDLORA_SKIP_EXT=1, no compiler) or does not load (built
against another torch), `LOAD_ERROR` says why, these backends report it as the reason they cannot run, and
`backend="auto"` falls back to the reference with a warning that names it.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from condlora_kernels import reference

_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` against the installed torch"


def load_extension():
    """(module, None) when _C loads and matches the running torch, else (None, the reason). Run once at
    import (`LOAD_ERROR`); public so that a test or a diagnosis can run it again."""
    try:
        from condlora_kernels import _C  # registers the torch.ops.condlora_C ops
    except ModuleNotFoundError as exc:
        return None, f"condlora_kernels._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`"
    except (ImportError, OSError) as exc:  # an undefined symbol, a missing libc10_cuda.so, ...
        return None, (f"condlora_kernels._C failed to load ({exc}); it was probably built against another torch "
                      f"(or another CUDA/CPU build of it) than the running {torch.__version__}: {_REBUILD}")
    built_for = getattr(_C, "torch_version", "unknown")
    if torch_release(built_for) != torch_release(torch.__version__):  # it loaded, but its ABI may not match: refuse it
        return None, (f"condlora_kernels._C was built against torch {built_for} but torch {torch.__version__} is "
                      f"running: {_REBUILD}")
    return _C, None


def torch_release(version: str):
    """(major, minor, patch) of a torch version string such as "2.14.1+cu130" or "2.15.0a0+git1234"."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(part) for part in match.groups()) if match else version


_C, LOAD_ERROR = load_extension()
WITH_CUDA: bool = bool(getattr(_C, "with_cuda", False))
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------------------------------------------
# Fake implementations: output shapes, strides and dtypes of the real ones, for FakeTensor / torch.compile
# --------------------------------------------------------------------------------------------------------------

if _C is not None:

    @torch.library.register_fake("condlora_C::generate_lora_weights")
    def _generate_lora_weights_fake(weight, theta_a, theta_b, mode):
        d_out, d_in = weight.shape
        r = theta_a.shape[0]
        return weight.new_empty(r, d_in), weight.new_empty(d_out, r)

    @torch.library.register_fake("condlora_C::forward")
    def _forward_fake(x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode):
        n_rows, d_in = x.shape
        d_out = weight.shape[0]
        r = theta_a.shape[0]
        return x.new_empty(n_rows, d_out), x.new_empty(n_rows, r), x.new_empty(r, d_in), x.new_empty(d_out, r)

    @torch.library.register_fake("condlora_C::backward")
    def _backward_fake(grad_y, x, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p, seed, mode, needs):
        need_x, need_theta_a, need_theta_b, need_bias = needs

        def maybe(needed, *shape):
            return x.new_empty(*shape) if needed else x.new_empty(0)

        return (maybe(need_x, *x.shape), maybe(need_theta_a, *theta_a.shape), maybe(need_theta_b, *theta_b.shape),
                maybe(need_bias, weight.shape[0]))

    @torch.library.register_fake("condlora_C::dropout_keep_mask")
    def _dropout_keep_mask_fake(seed, n_rows, n_cols, dropout_p):
        return seed.new_empty(n_rows, n_cols, dtype=torch.bool)

    @torch.library.register_fake("condlora_C::prepare")
    def _prepare_fake(weight, theta_a, theta_b, dtype, mode):
        d_out, d_in = weight.shape
        r = theta_a.shape[0]
        cast = weight.dtype != dtype
        return (weight.new_empty((d_out, d_in) if cast else (0, 0), dtype=dtype), weight.new_empty(r, d_in, dtype=dtype),
                weight.new_empty(d_out, r, dtype=dtype))

    @torch.library.register_fake("condlora_C::forward_ab")
    def _forward_ab_fake(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])

    @torch.library.register_fake("condlora_C::prepare_forward")
    def _prepare_forward_fake(x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode):
        weight_cast, lora_a, lora_b = _prepare_fake(weight, theta_a, theta_b, x.dtype, mode)
        return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], theta_a.shape[0]), weight_cast, \
            lora_a, lora_b

    @torch.library.register_fake("condlora_C::backward_ab")
    def _backward_ab_fake(grad_y, x, weight, u, lora_a, lora_b, scaling, dropout_p, seed, mode, theta_dtype, needs,
                          stack_theta_grads=False):
        need_x, need_theta_a, need_theta_b, need_bias = needs
        d_out, d_in = weight.shape
        r = lora_a.shape[0]
        theta_a_cols = d_in if mode == "paper" else d_out
        if stack_theta_grads:  # [dtheta_a; dtheta_b] in one tensor (csrc/condlora.h)
            theta_a_shape, theta_b_shape = (2 * r, d_in), (0,)
        else:
            theta_a_shape = (r, theta_a_cols) if need_theta_a else (0,)
            theta_b_shape = (r, d_in) if need_theta_b else (0,)
        return (x.new_empty(x.shape if need_x else (0,)),
                x.new_empty(theta_a_shape, dtype=theta_dtype), x.new_empty(theta_b_shape, dtype=theta_dtype),
                x.new_empty((d_out,) if need_bias else (0,)))

    @torch.library.register_fake("condlora_C::draw_seed")
    def _draw_seed_fake(like):
        return like.new_empty(1, dtype=torch.int64)

    @torch.library.register_fake("condlora_C::linear")
    def _linear_fake(x, weight, bias, theta_a, theta_b, scaling, dropout_p=0.0, mode="paper",
                     recompute_weight_cast=False):
        return x.new_empty(*x.shape[:-1], weight.shape[0])


# --------------------------------------------------------------------------------------------------------------
# The backend interface of ops/backends.py
# --------------------------------------------------------------------------------------------------------------


def _forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode) -> reference.ForwardOutputs:
    y, u, lora_a, lora_b = torch.ops.condlora_C.forward(x2d, weight, bias, theta_a, theta_b, float(scaling),
                                                        float(dropout_p), seed, mode)
    return reference.ForwardOutputs(y, u, lora_a, lora_b)


def _backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p, seed, mode,
              needs) -> reference.BackwardOutputs:
    needs = [bool(n) for n in needs]
    grads = torch.ops.condlora_C.backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, float(scaling),
                                          float(dropout_p), seed, mode, needs)
    return reference.BackwardOutputs(*(g if need else None for g, need in zip(grads, needs)))


class _ExtensionBackend:
    device_type = ""

    forward = staticmethod(_forward)
    backward = staticmethod(_backward)

    @classmethod
    def unavailable_reason(cls, x: torch.Tensor) -> Optional[str]:
        if LOAD_ERROR is not None:
            return LOAD_ERROR
        if x.device.type != cls.device_type:
            return f"the {cls.device_type} backend runs on {cls.device_type.upper()} tensors, got a tensor on {x.device}"
        if x.dtype not in SUPPORTED_DTYPES:
            return f"the {cls.device_type} backend supports float16, bfloat16, float32 and float64, got {x.dtype}"
        return None


class CpuBackend(_ExtensionBackend):
    """The C++ kernels (csrc/cpu_kernels.cpp) on CPU tensors."""

    device_type = "cpu"


class CudaBackend(_ExtensionBackend):
    """The CUDA kernels (csrc/cuda/) on CUDA tensors."""

    device_type = "cuda"

    @classmethod
    def unavailable_reason(cls, x: torch.Tensor) -> Optional[str]:
        reason = super().unavailable_reason(x)
        if reason is None and not WITH_CUDA:
            return ("condlora_kernels._C was built without its CUDA kernels (a CPU build of torch, no nvcc, or "
                    "CONDLORA_NO_CUDA=1 at build time)")
        return reason
