"""`CondLoRAGenerator`: the trainable pair (theta_a, theta_b) of one module type, shared by all its layers."""

from __future__ import annotations

import math

import torch
from torch import nn

from condlora_kernels import reference
from condlora_kernels._validation import check_float_dtype, check_mode, check_positive_int, check_rank

HALF_DTYPES = (torch.float16, torch.bfloat16)


class CondLoRAGenerator(nn.Module):
    """Holds theta_a and theta_b, which generate every layer's A and B from that layer's W0.

    paper mode (square layers):  A = theta_a W0^T, B = W0 theta_b^T   theta_a: (r, d), theta_b: (r, d)
    general mode (any layer):    A = theta_a W0,   B = W0 theta_b^T   theta_a: (r, out_features), theta_b: (r, in_features)

    Initialised as the paper's code does: theta_a kaiming-uniform (a=sqrt(5)), theta_b zeros, so that
    B = 0 and every layer starts exactly at its frozen weight.

    The parameters are master weights: casting a model (or this module) to float16 or bfloat16 with
    `.to(dtype)`, `.half()` or `.bfloat16()` leaves them in their precision (float32), while device moves and
    other casts apply as usual; the layers cast them to the weight's dtype on each call (docs/design.md §8).
    """

    def __init__(self, in_features: int, out_features: int, r: int = 8, mode: str = "paper", *,
                 device=None, dtype=None):
        super().__init__()
        in_features = check_positive_int("in_features", in_features)
        out_features = check_positive_int("out_features", out_features)
        check_rank(r)
        check_mode(mode)
        check_float_dtype("dtype", dtype)
        if mode == "paper" and in_features != out_features:
            raise ValueError(f"mode='paper' needs square layers, got in_features={in_features}, "
                             f"out_features={out_features}; use mode='general'")
        self.in_features, self.out_features, self.r, self.mode = in_features, out_features, r, mode
        factory = {"device": device, "dtype": dtype}
        self.theta_a = nn.Parameter(torch.empty(reference.theta_a_shape(r, out_features, in_features, mode), **factory))
        self.theta_b = nn.Parameter(torch.empty((r, in_features), **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.theta_a, a=math.sqrt(5))
        nn.init.zeros_(self.theta_b)

    def _apply(self, fn, recurse=True):
        def keep_master_precision(t: torch.Tensor) -> torch.Tensor:
            applied = fn(t)
            if applied.dtype in HALF_DTYPES and t.dtype not in HALF_DTYPES:
                return t.to(device=applied.device)  # from t, not from `applied`: no rounding through half
            return applied

        return super()._apply(keep_master_precision, recurse)

    def forward(self, weight: torch.Tensor):
        """(lora_a, lora_b) generated from `weight`, in weight's dtype (for inspection and merging)."""
        return reference.generate_lora_weights(weight, self.theta_a.to(weight.dtype), self.theta_b.to(weight.dtype),
                                               self.mode)

    def fits(self, in_features: int, out_features: int) -> bool:
        return (in_features, out_features) == (self.in_features, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, mode={self.mode}"
