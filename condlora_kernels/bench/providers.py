"""The implementations compared at kernel level, their inputs, and the timed step of each mode.

    frozen                 F.linear(x, W0, b): the floor (docs/design.md §7)
    lora                   reference.lora_linear: plain torch LoRA, unfused
    peft_lora              PEFT's LoRA layer (peft.tuners.lora.Linear, built by get_peft_model on a one-layer module)
    paper_code             reference.paper_code_condlora: the paper's code (square layers only)
    paper_code_compiled    torch.compile of it
    condlora[<backend>]    condlora_linear(..., backend=<backend>), for each backend available here

Baselines come from condlora_kernels.reference, the code the tests check against, not rewritten here.
Every provider is a function (input set, shape) -> (layer: x -> y, trainable tensors). The step of a
mode is built around it the same way for all providers:

    forward            y = layer(x)                               (autograd recording, x requires grad)
    backward           autograd.grad(y, [x, *trainables], dy)     on a forward graph built beforehand (retained)
    forward+backward   both, in one step

so every provider computes dx and the gradients of its own trainable weights (theta for CondLoRA, A and B
for LoRA, nothing but x for the frozen layer). Small shapes rotate among a few input sets, so that a timer
without L2 flushes (CUDA graphs, CPU) does not see inputs that stay in cache from the previous call.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from condlora_kernels import reference
from condlora_kernels.bench.shapes import KernelShape
from condlora_kernels.ops.backends import BACKEND_NAMES, available_backends
from condlora_kernels.ops.condlora_linear import condlora_linear

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCALING = 2.0  # alpha / r; not 1.0, so that no implementation can skip the multiplication


class Unavailable(Exception):
    """The provider does not run on this point: status "skipped" (not here) or "n/a" (not for this shape)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Provider:
    name: str
    kind: str  # "frozen", "lora" or "condlora": which FLOPs it does (flop_count)
    description: str
    make: Callable[[dict, KernelShape], tuple]  # (input set, shape) -> (layer, trainables)
    # (shape, device, dtype) -> None, or raises Unavailable
    check: Callable[[KernelShape, torch.device, torch.dtype], None] = lambda shape, device, dtype: None


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def rotation_sets(shape: KernelShape, dtype: torch.dtype, device: torch.device) -> int:
    """How many input sets to rotate among: enough that one round of them is twice the last-level cache."""
    per_set = (shape.n * (shape.d_in + shape.d_out) + shape.d_in * shape.d_out) * _itemsize(dtype)
    if device.type == "cuda":
        cache = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20) or (50 << 20)
    else:
        cache = 32 << 20
    return int(min(4, max(1, math.ceil(2 * cache / per_set))))


def make_inputs(shape: KernelShape, dtype: torch.dtype, device: torch.device, n_sets: int, seed: int = 0) -> list:
    """n_sets independent input sets: x (requires grad), frozen W0 and b, theta_a/theta_b, LoRA's A/B, dy."""
    g = torch.Generator(device=device).manual_seed(seed)
    n, d_in, d_out, r = shape.n, shape.d_in, shape.d_out, shape.r
    ta_shape = reference.theta_a_shape(r, d_out, d_in, shape.mode)

    def rnd(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=dtype) * scale

    sets = []
    for _ in range(n_sets):
        sets.append({
            "x": rnd(n, d_in).requires_grad_(True),
            "weight": rnd(d_out, d_in, scale=d_in ** -0.5),
            "bias": rnd(d_out),
            "theta_a": rnd(*ta_shape, scale=ta_shape[1] ** -0.25).requires_grad_(True),
            "theta_b": rnd(r, d_in, scale=d_in ** -0.25).requires_grad_(True),
            "lora_a": rnd(r, d_in, scale=d_in ** -0.5).requires_grad_(True),
            "lora_b": rnd(d_out, r, scale=r ** -0.5).requires_grad_(True),
            "grad_y": rnd(n, d_out),
        })
    return sets


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------------


def _frozen(s, shape):
    return (lambda x: F.linear(x, s["weight"], s["bias"])), []


def _lora(s, shape):
    return (lambda x: reference.lora_linear(x, s["weight"], s["bias"], s["lora_a"], s["lora_b"], SCALING),
            [s["lora_a"], s["lora_b"]])


class _OneLayer(nn.Module):
    def __init__(self, proj: nn.Linear):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _check_peft(shape, device, dtype):
    if importlib.util.find_spec("peft") is None:
        raise Unavailable("skipped", "peft is not installed (pip install peft)")


def _peft(s, shape):
    peft = importlib.import_module("peft")
    base = nn.Linear(shape.d_in, shape.d_out, device="meta")  # then take the input set's W0 and b, no copy
    base.weight = nn.Parameter(s["weight"], requires_grad=False)
    base.bias = nn.Parameter(s["bias"], requires_grad=False)
    model = peft.get_peft_model(_OneLayer(base), peft.LoraConfig(r=shape.r, lora_alpha=SCALING * shape.r,
                                                                  target_modules=["proj"], lora_dropout=0.0))
    layer = model.base_model.model.proj
    # get_peft_model keeps adapters of half-precision layers in fp32; at kernel level every provider
    # computes in one dtype, so cast them (the model-level benchmark keeps PEFT's default).
    lora_a, lora_b = layer.lora_A["default"], layer.lora_B["default"]
    lora_a.to(s["x"].dtype)
    lora_b.to(s["x"].dtype)
    with torch.no_grad():
        lora_a.weight.copy_(s["lora_a"])
        lora_b.weight.copy_(s["lora_b"])
    return layer, [lora_a.weight, lora_b.weight]


def _check_square(shape, device, dtype):
    if shape.mode != "paper":
        raise Unavailable("n/a", "the paper's code generates A = theta_A W0^T: square layers only")


def _paper_code(s, shape):
    return (lambda x: reference.paper_code_condlora(x, s["weight"], s["bias"], s["theta_a"], s["theta_b"], SCALING),
            [s["theta_a"], s["theta_b"]])


_compiled_paper_code = None


def _paper_code_compiled(s, shape):
    global _compiled_paper_code
    if _compiled_paper_code is None:
        # one compiled function serves every shape and dtype (dynamic=False: one specialised graph each),
        # more than the default limit of 8 graphs per function
        cfg = torch._dynamo.config
        limit = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
        setattr(cfg, limit, max(getattr(cfg, limit), 64))
        _compiled_paper_code = torch.compile(reference.paper_code_condlora, dynamic=False)
    fn = _compiled_paper_code
    return (lambda x: fn(x, s["weight"], s["bias"], s["theta_a"], s["theta_b"], SCALING),
            [s["theta_a"], s["theta_b"]])


def backend_unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why condlora_linear(backend=...) is not benchmarked here (None when it is)."""
    if backend == "triton" and device.type != "cuda":
        # available on CPU tensors only under TRITON_INTERPRET=1, whose timings say nothing about the kernels
        return "the triton backend runs on CPU tensors only under the Triton interpreter: not timed"
    return available_backends(device, dtype).get(backend)


def _condlora_provider(backend: str) -> Provider:
    def check(shape, device, dtype):
        reason = backend_unavailable_reason(backend, device, dtype)
        if reason is not None:
            raise Unavailable("skipped", reason)

    def make(s, shape):
        return (lambda x: condlora_linear(x, s["weight"], s["bias"], s["theta_a"], s["theta_b"], SCALING,
                                          mode=shape.mode, backend=backend),
                [s["theta_a"], s["theta_b"]])

    return Provider(f"condlora[{backend}]", "condlora", f"this package, condlora_linear(backend={backend!r})",
                    make, check)


PROVIDERS = {p.name: p for p in [
    Provider("frozen", "frozen", "F.linear(x, W0, b): the frozen layer alone (the floor)", _frozen),
    Provider("lora", "lora", "plain torch LoRA (reference.lora_linear)", _lora),
    Provider("peft_lora", "lora", "PEFT's LoRA layer (peft.tuners.lora.Linear)", _peft, _check_peft),
    Provider("paper_code", "condlora", "the paper's code (reference.paper_code_condlora)", _paper_code, _check_square),
    Provider("paper_code_compiled", "condlora", "torch.compile(reference.paper_code_condlora)", _paper_code_compiled,
             _check_square),
    *[_condlora_provider(name) for name in ("triton", "cuda", "cpu", "reference")],
]}
assert set(BACKEND_NAMES) <= {name[len("condlora["):-1] for name in PROVIDERS if name.startswith("condlora[")}
PROVIDER_NAMES = tuple(PROVIDERS)


# --------------------------------------------------------------------------------------------------
# The timed step of each mode
# --------------------------------------------------------------------------------------------------


def fresh_leaves(sets: list) -> list:
    """Copies of the input sets whose tensors have never been used by an autograd graph.

    Autograd remembers, for each leaf that requires grad, the stream its gradient accumulator was created on
    (the leaf's first use in a forward) and, at the end of a backward, makes the caller's stream wait on it.
    For a leaf first used on the default stream, that wait is an event recorded on the legacy default stream,
    which invalidates a CUDA graph being captured on another stream: a graph of backward steps needs leaves
    whose first forward ran on the capture stream.
    """
    return [{k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in s.items()} for s in sets]


def build_step(provider: Provider, shape: KernelShape, sets: list, mode: str) -> Callable[[], object]:
    """One call = one step of `mode` on the next input set. Returns what the step computed (to keep it alive
    while peak memory is read)."""
    calls = []
    for s in sets:
        layer, trainables = provider.make(s, shape)
        x, dy = s["x"], s["grad_y"]
        wrt = [x, *trainables]
        if mode == "forward":
            calls.append(lambda layer=layer, x=x: layer(x))
        elif mode == "backward":
            y = layer(x)  # built once, outside the timed step; retain_graph lets each call reuse it
            calls.append(lambda y=y, wrt=wrt, dy=dy: torch.autograd.grad(y, wrt, dy, retain_graph=True))
        elif mode == "forward+backward":
            calls.append(lambda layer=layer, x=x, wrt=wrt, dy=dy: torch.autograd.grad(layer(x), wrt, dy))
        else:
            raise ValueError(f"unknown mode {mode!r}")
    turn = itertools.cycle(range(len(calls)))

    def step():
        return calls[next(turn)]()

    return step


# --------------------------------------------------------------------------------------------------
# FLOP and byte counts (docs/design.md §7)
# --------------------------------------------------------------------------------------------------


def flop_count(kind: str, shape: KernelShape, mode: str) -> int:
    """FLOPs of the provider's math in this mode.

    forward:  frozen GEMM 2 N d_in d_out, + low-rank path 2 N r (d_in + d_out) for LoRA and CondLoRA,
              + generation 4 r d_in d_out for CondLoRA.
    backward: dx's GEMM 2 N d_in d_out, + twice the low-rank path (v = dy B, v A, dA, dB),
              + for CondLoRA the generators' gradients (dtheta_a, dtheta_b: 4 r d_in d_out).
    """
    n, d_in, d_out, r = shape.n, shape.d_in, shape.d_out, shape.r
    gemm, low_rank, generation = 2 * n * d_in * d_out, 2 * n * r * (d_in + d_out), 4 * r * d_in * d_out
    adapter = kind in ("lora", "condlora")
    forward = gemm + (low_rank if adapter else 0) + (generation if kind == "condlora" else 0)
    backward = gemm + (2 * low_rank if adapter else 0) + (generation if kind == "condlora" else 0)
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def byte_count(shape: KernelShape, mode: str, dtype: torch.dtype) -> int:
    """Bytes that any implementation must move, the same for all providers: x, W0, y once each in the
    forward; dy, W0, dx once each in the backward. GB/s is then an effective bandwidth."""
    n, d_in, d_out = shape.n, shape.d_in, shape.d_out
    one_pass = (n * d_in + d_in * d_out + n * d_out) * _itemsize(dtype)
    return {"forward": one_pass, "backward": one_pass, "forward+backward": 2 * one_pass}[mode]
