"""Reference math for CondLoRA, in plain PyTorch, written to be read.

Every fast path in this package is checked against these functions. Notation (docs/design.md §1-§3):

    W0  (d_out, d_in)  frozen weight          theta_a, theta_b  shared generators, one pair per module type
    A   (r, d_in)      generated lora_a       B                 (d_out, r) generated lora_b
    s = alpha / r      scaling                p                 dropout probability on the low-rank path

    paper mode   (square W0, the reference code):  A = theta_a W0^T,  B = W0 theta_b^T,  theta_a, theta_b (r, d)
    general mode (any W0):                          A = theta_a W0,    B = W0 theta_b^T,  theta_a (r, d_out), theta_b (r, d_in)

    forward:   x_hat = x * M / (1 - p)          (M: the keep mask, a pure function of (seed, row, col))
               u     = x_hat A^T                 (N, r), saved for the backward
               y     = x W0^T + b + s * u B^T

The dropout mask is Philox4x32-10 keyed by a 64-bit seed, 16 bits per element (one Philox call serves
8 neighbouring elements of a row), so the reference, the Triton kernels and the C++/CUDA kernels draw
the very same mask and can be compared element for element, and the backward regenerates it instead
of storing it. See `dropout_draws` for the exact mapping.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

MODES = ("paper", "general")

# --------------------------------------------------------------------------------------------------
# Generation of A and B from W0
# --------------------------------------------------------------------------------------------------


def theta_a_shape(r: int, d_out: int, d_in: int, mode: str) -> tuple[int, int]:
    """Shape of theta_a: (r, d_in) in paper mode (where d_in == d_out), (r, d_out) in general mode."""
    return (r, d_in) if mode == "paper" else (r, d_out)


def generate_lora_weights(weight: torch.Tensor, theta_a: torch.Tensor, theta_b: torch.Tensor, mode: str):
    """Generate (lora_a, lora_b) = (A, B) from the frozen weight W0.

    paper:   A = theta_a W0^T   (the reference code's `linear_for_lora_A(W0).T`)
    general: A = theta_a W0
    both:    B = W0 theta_b^T   (the reference code's `linear_for_lora_B(W0)`)
    """
    if mode == "paper":
        lora_a = theta_a @ weight.t()
    elif mode == "general":
        lora_a = theta_a @ weight
    else:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    lora_b = weight @ theta_b.t()
    return lora_a, lora_b


# --------------------------------------------------------------------------------------------------
# Dropout mask: Philox4x32-10, one draw per element of x
# --------------------------------------------------------------------------------------------------

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF


def _mulhilo32(a: torch.Tensor, b: int):
    """(high, low) 32-bit halves of a * b for a uint32 tensor `a` (held in int64) and a uint32 constant.

    int64 cannot hold a 64-bit product, so b is split into 16-bit limbs: every partial product fits.
    """
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi = a * b_hi  # < 2^48
    p_lo = a * b_lo  # < 2^48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _U32
    return high, low


def philox_uint32(seed: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """First 32-bit word of Philox4x32-10 at counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi)."""
    return philox_uint32_x4(seed, offsets)[0]


def philox_uint32_x4(seed: torch.Tensor, offsets: torch.Tensor):
    """The four 32-bit words of Philox4x32-10 at counter (offset_lo, offset_hi, 0, 0), key (seed_lo, seed_hi).

    `seed` is an int64 tensor with one element, `offsets` an int64 tensor of non-negative counters.
    Returns uint32 values held in int64 tensors. Same rounds as `triton.language.randint4x`.
    """
    seed = seed.reshape(()).to(torch.int64)
    k0 = seed & _U32
    k1 = (seed >> 32) & _U32
    c0 = offsets & _U32
    c1 = (offsets >> 32) & _U32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mulhilo32(c2, PHILOX_ROUND_B)
        hi_a, lo_a = _mulhilo32(c0, PHILOX_ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _U32
        k1 = (k1 + PHILOX_KEY_B) & _U32
    return c0, c1, c2, c3


MASK_BITS = 16  # each element's draw is 16 bits: one Philox call serves 8 elements
ELEMENTS_PER_DRAW = 8


def dropout_threshold(p: float) -> int:
    """An element is kept when its 16-bit draw is >= this threshold, t = round(p * 2^16).

    Integer arithmetic, so every backend agrees; the probability actually dropped is t / 2^16, within
    2^-17 of p (FlashAttention quantises it more coarsely, to 8 bits).
    """
    return round(p * (1 << MASK_BITS))


def dropout_keep_scale(p: float) -> float:
    """1 / (1 - t / 2^16): the kept entries' scale that keeps x_hat unbiased for the quantised p."""
    return 1.0 / (1.0 - dropout_threshold(p) / (1 << MASK_BITS))


def dropout_draws(seed: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, n_cols: int) -> torch.Tensor:
    """16-bit draws (in int64) for the elements (rows[:, None], cols[None, :]) of an (n, n_cols) matrix.

    Element (row, col) takes half-word col % 8 of Philox counter row * ceil(n_cols / 8) + col // 8:
    the four 32-bit words c0, c1, c2, c3 give half-words (c0 lo, c0 hi, c1 lo, c1 hi, c2 lo, ...).
    The counter depends on (row, col) only, so a tile of any position computes its own draws.
    """
    groups = -(-n_cols // ELEMENTS_PER_DRAW)
    counters = rows[:, None].to(torch.int64) * groups + (cols[None, :].to(torch.int64) // ELEMENTS_PER_DRAW)
    words = philox_uint32_x4(seed, counters)
    lane = cols[None, :] % ELEMENTS_PER_DRAW
    word = torch.stack(words, dim=-1).gather(-1, (lane // 2).expand(counters.shape).unsqueeze(-1)).squeeze(-1)
    return torch.where(lane % 2 == 0, word & 0xFFFF, word >> 16)


def dropout_keep_mask(seed: torch.Tensor, n_rows: int, n_cols: int, p: float, device=None) -> torch.Tensor:
    """Boolean keep mask M (n_rows, n_cols): element (row, col) is kept when its draw >= dropout_threshold(p)."""
    device = seed.device if device is None else device
    rows = torch.arange(n_rows, device=device)
    cols = torch.arange(n_cols, device=device)
    return dropout_draws(seed.to(device), rows, cols, n_cols) >= dropout_threshold(p)


def apply_dropout(x2d: torch.Tensor, seed: Optional[torch.Tensor], p: float) -> torch.Tensor:
    """x_hat = x * M / (1 - p) for a 2-D x; identity when p == 0."""
    if p == 0.0:
        return x2d
    keep = dropout_keep_mask(seed, x2d.shape[0], x2d.shape[1], p, device=x2d.device)
    return x2d * keep.to(x2d.dtype) * dropout_keep_scale(p)


# --------------------------------------------------------------------------------------------------
# Forward and backward of the fused op, on 2-D activations
# --------------------------------------------------------------------------------------------------


class ForwardOutputs(NamedTuple):
    y: torch.Tensor  # (N, d_out)
    u: torch.Tensor  # (N, r) = x_hat A^T, saved for the backward
    lora_a: torch.Tensor  # (r, d_in)
    lora_b: torch.Tensor  # (d_out, r)


def _upcast(tensors, dtype):
    if dtype is None:
        return tensors
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors]


def condlora_forward(x2d, weight, bias, theta_a, theta_b, scaling, dropout_p=0.0, seed=None, mode="paper",
                     upcast: Optional[torch.dtype] = None):
    """y = x W0^T + b + s * (x_hat A^T) B^T, with A and B generated from W0.

    `upcast` (e.g. torch.float64) computes everything in that dtype, for accuracy checks.
    """
    x2d, weight, bias, theta_a, theta_b = _upcast([x2d, weight, bias, theta_a, theta_b], upcast)
    lora_a, lora_b = generate_lora_weights(weight, theta_a, theta_b, mode)
    u = apply_dropout(x2d, seed, dropout_p) @ lora_a.t()
    y = F.linear(x2d, weight, bias) + scaling * (u @ lora_b.t())
    return ForwardOutputs(y, u, lora_a, lora_b)


class BackwardOutputs(NamedTuple):
    grad_x: Optional[torch.Tensor]
    grad_theta_a: Optional[torch.Tensor]
    grad_theta_b: Optional[torch.Tensor]
    grad_bias: Optional[torch.Tensor]


def condlora_backward(grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b, scaling,
                      dropout_p=0.0, seed=None, mode="paper", needs=(True, True, True, True),
                      upcast: Optional[torch.dtype] = None):
    """The hand-derived backward of docs/design.md §2, term by term, in the order written there.

    `needs` says which of (dx, dtheta_a, dtheta_b, db) to compute; the others come back as None.
    `upcast` computes in that dtype, for accuracy checks.
    """
    grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b = _upcast(
        [grad_y, x2d, weight, theta_a, theta_b, u, lora_a, lora_b], upcast)
    need_x, need_ta, need_tb, need_b = needs
    v = grad_y @ lora_b
    grad_x = grad_theta_a = grad_theta_b = grad_bias = None
    if need_x:
        grad_x = grad_y @ weight + apply_dropout(scaling * (v @ lora_a), seed, dropout_p)
    if need_ta:
        grad_a = scaling * (v.t() @ apply_dropout(x2d, seed, dropout_p))
        grad_theta_a = grad_a @ weight if mode == "paper" else grad_a @ weight.t()
    if need_tb:
        grad_b = scaling * (grad_y.t() @ u)
        grad_theta_b = grad_b.t() @ weight
    if need_b:
        grad_bias = grad_y.sum(0)
    return BackwardOutputs(grad_x, grad_theta_a, grad_theta_b, grad_bias)


# --------------------------------------------------------------------------------------------------
# The paper's code, as it computes (docs/design.md §1), kept as a baseline for tests and benchmarks
# --------------------------------------------------------------------------------------------------


def paper_code_condlora(x, weight, bias, theta_a, theta_b, scaling, dropout: Optional[torch.nn.Module] = None):
    """CyberAgentAILab/CondLoRA `Linear.forward` in paper mode, quirks included.

    lora_A = linear_for_lora_A(W0).T, lora_B = linear_for_lora_B(W0); the reference code applies its
    dropout to x before the frozen matmul as well (standard LoRA, and this package, do not).
    """
    lora_a = F.linear(weight, theta_a).t()
    lora_b = F.linear(weight, theta_b)
    if dropout is not None:
        x = dropout(x)
    result = F.linear(x, weight, bias)
    return result + F.linear(F.linear(x, lora_a), lora_b) * scaling


def lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout: Optional[torch.nn.Module] = None):
    """Plain LoRA in torch ops: y = x W0^T + b + s * B A dropout(x), the unfused baseline."""
    x_lora = dropout(x) if dropout is not None else x
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x_lora, lora_a), lora_b)


def merged_weight(weight, theta_a, theta_b, scaling, mode, compute_dtype=torch.float32):
    """W0 + s * B A, computed in `compute_dtype` and returned in weight's dtype (used by merge())."""
    w = weight.to(compute_dtype)
    lora_a, lora_b = generate_lora_weights(w, theta_a.to(compute_dtype), theta_b.to(compute_dtype), mode)
    return (w + scaling * (lora_b @ lora_a)).to(weight.dtype)
