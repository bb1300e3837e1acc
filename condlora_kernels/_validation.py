"""Argument checks shared by every backend: they run before any kernel launches.

Each message names the argument and the shapes, dtypes or devices involved. The C++ extension
repeats these checks with TORCH_CHECK and the same wording.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from condlora_kernels.reference import MASK_BITS, MODES, dropout_threshold, theta_a_shape

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Problem(NamedTuple):
    """Sizes of one call: N tokens (rows of x flattened to 2-D), d_in, d_out, rank r."""

    n_rows: int
    d_in: int
    d_out: int
    r: int


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return mode


def check_recompute_weight_cast(value, auto_allowed: bool = False):
    """A bool; also "auto" where a layer resolves it per call (FusedCondLoRALinear, docs/design.md §4)."""
    if auto_allowed and isinstance(value, str):
        if value != "auto":
            raise ValueError(f"recompute_weight_cast must be True, False or 'auto', got {value!r}")
        return value
    if not isinstance(value, bool):
        expected = "True, False or 'auto'" if auto_allowed else "a bool"
        raise TypeError(f"recompute_weight_cast must be {expected}, got {value!r} of type {type(value).__name__}")
    return value


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_threshold(float(dropout_p)) >= 1 << MASK_BITS:
        raise ValueError(f"dropout_p={dropout_p} rounds to 1 in the 16-bit dropout mask (p * 2^16 >= 65535.5): "
                         "every element would be dropped")
    return float(dropout_p)


def check_positive_int(name: str, value) -> int:
    """A size or a rank (in_features, out_features, r): an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def check_float_dtype(name: str, dtype) -> None:
    """A factory dtype: None (torch's default) or a floating dtype the kernels take."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating dtype (float16, bfloat16, float32 or float64) or None, got "
                        f"{dtype!r}")


def check_rank(r) -> int:
    return check_positive_int("r", r)


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}; convert it with .to_dense()")


FLOAT32_MAX = 3.4028234663852886e38


def check_scaling(scaling) -> float:
    """scaling = alpha / r: a finite real within float32's range (the kernels multiply in float32)."""
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real) or not math.isfinite(float(scaling)):
        raise TypeError(f"scaling must be a finite float (alpha / r), got {scaling!r}")
    if abs(float(scaling)) > FLOAT32_MAX:
        raise ValueError(f"scaling must fit in float32 (the kernels multiply in float32), got {scaling!r}")
    return float(scaling)


def check_condlora_args(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode) -> Problem:
    """Validate the arguments of `condlora_linear`; return the problem sizes.

    x: (..., d_in), any floating dtype. weight and bias: x's dtype, or float32 masters of a half-precision x (they
    are rounded to x's dtype, as autocast would). theta_a and theta_b: any floating dtype (cast to the compute
    dtype; their gradients come back in their own dtype). All on x's device.
    """
    _check_tensor("x", x)
    half_x = x.dtype in (torch.float16, torch.bfloat16)
    named = {"weight": weight, "bias": bias, "theta_a": theta_a, "theta_b": theta_b}
    for name, t in named.items():
        if t is None and name == "bias":
            continue
        _check_tensor(name, t)
        if name in ("weight", "bias") and t.dtype != x.dtype and not (half_x and t.dtype == torch.float32):
            raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}: {name} must share x's dtype "
                            "(or be a float32 master of a half-precision x)")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}: all tensors must be on one device")
    check_mode(mode)
    check_dropout_p(dropout_p)
    check_scaling(scaling)

    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (d_out, d_in), got {_describe(weight)}")
    d_out, d_in = weight.shape
    if d_out < 1 or d_in < 1:
        raise ValueError(f"weight must have d_out >= 1 and d_in >= 1, got {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"x must have last dimension d_in={d_in} (weight is {tuple(weight.shape)}), got x {tuple(x.shape)}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != d_out):
        raise ValueError(f"bias must have shape ({d_out},) to match weight {tuple(weight.shape)}, got {tuple(bias.shape)}")
    if theta_a.dim() != 2 or theta_b.dim() != 2:
        raise ValueError(f"theta_a and theta_b must be 2-D (r, d), got {tuple(theta_a.shape)} and {tuple(theta_b.shape)}")
    r = theta_a.shape[0]
    if r < 1:
        raise ValueError(f"r (rows of theta_a) must be >= 1, got theta_a {tuple(theta_a.shape)}")
    if mode == "paper" and d_out != d_in:
        raise ValueError(
            f"mode='paper' needs a square weight (A = theta_a W0^T has d_out columns), got weight {tuple(weight.shape)}; "
            "use mode='general' for non-square layers")
    want_a = theta_a_shape(r, d_out, d_in, mode)
    if tuple(theta_a.shape) != want_a:
        raise ValueError(f"theta_a must have shape {want_a} in {mode} mode for weight {tuple(weight.shape)}, "
                         f"got {tuple(theta_a.shape)}")
    if tuple(theta_b.shape) != (r, d_in):
        raise ValueError(f"theta_b must have shape {(r, d_in)} (r from theta_a, d_in from weight {tuple(weight.shape)}), "
                         f"got {tuple(theta_b.shape)}")
    if weight.requires_grad:
        raise ValueError("weight requires grad, but CondLoRA keeps W0 frozen and never computes its gradient; "
                         "call weight.requires_grad_(False)")
    n_rows = x.numel() // d_in
    return Problem(n_rows, d_in, d_out, r)
