"""Accuracy checks shared by the tests, the self-check (`python -m condlora_kernels`) and the benchmarks.

The rule (as flash-attention's tests): a backend's result passes when its error against a float64
reference is at most twice the error of the same computation done by the reference in the backend's
own dtype, plus a floor of eps(dtype) * min(4, 32 / sqrt(numel)). Errors are relative Frobenius norms.
The floor is a finite-sample allowance: for a large tensor the relative norm averages over many
elements and the 2x rule alone is statistically sound (the floor is eps/8 at 65,536 elements and
shrinks further); for a tiny output (the 40-element dx at N=1, a 1x1 u at r=1) the 2x rule compares a
handful of roundings, the baseline may round luckily, and the floor, at most 4 eps, takes over. In
float64 the same-dtype baseline is the reference itself, so the floor is a flat 64 eps.
NaN and inf must sit exactly where the float64 reference has them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from condlora_kernels import reference
from condlora_kernels.ops.backends import BACKENDS

ERROR_FACTOR = 2.0

# Small shapes where nothing is a multiple of a block, shared by the backend tests: (mode, N, d_in, d_out, r)
ODD_SHAPES = [
    ("general", 37, 40, 56, 3),
    ("paper", 37, 48, 48, 4),
    ("general", 1, 40, 56, 1),   # one token
    ("paper", 1, 16, 16, 1),     # rank 1
    ("general", 45, 33, 17, 5),  # d_in not a multiple of 8 (no TMA; a ragged dropout group)
    ("paper", 70, 24, 24, 17),   # r > 16: R_PAD = 32
]


def error_floor(dtype: torch.dtype, numel: int = 65536) -> float:
    if dtype == torch.float64:  # the same-dtype baseline is the reference itself (error 0): a few ulps of floor
        return 64 * torch.finfo(dtype).eps
    return torch.finfo(dtype).eps * min(4.0, 32.0 / math.sqrt(max(numel, 1)))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| over the finite entries, in float64."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref64)
    diff = (out64 - ref64)[finite]
    denom = ref64[finite].norm().item()
    num = diff.norm().item()
    if denom == 0.0:
        return num
    return num / denom


def check_close(out: torch.Tensor, ref64: torch.Tensor, baseline: torch.Tensor, name: str) -> tuple[bool, str]:
    """(passed, message) for `out` against the float64 `ref64`, given the same-dtype `baseline`."""
    if out.shape != ref64.shape:
        return False, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    out_c, ref_c = out.detach().cpu(), ref64.detach().cpu()
    for kind, pred in (("NaN", torch.isnan), ("inf", torch.isinf)):
        if not torch.equal(pred(out_c), pred(ref_c)):
            return False, (f"{name}: {kind} pattern differs: {int(pred(out_c).sum())} in output, "
                           f"{int(pred(ref_c).sum())} in the float64 reference")
    err = relative_error(out, ref64)
    base = relative_error(baseline, ref64)
    bound = ERROR_FACTOR * base + error_floor(out.dtype, out.numel())
    ok = err <= bound and not math.isnan(err)
    return ok, f"{name}: rel. error {err:.2e} vs bound {bound:.2e} ({ERROR_FACTOR:g} x same-dtype torch {base:.2e})"


def assert_close(out, ref64, baseline, name: str) -> None:
    ok, msg = check_close(out, ref64, baseline, name)
    assert ok, msg


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    theta_a: torch.Tensor
    theta_b: torch.Tensor
    scaling: float
    mode: str

    def tensors(self):
        return self.x, self.weight, self.bias, self.theta_a, self.theta_b

    def leaves(self, bias: bool = True):
        """(x, weight, bias, theta_a, theta_b) as fresh leaves: x, bias and the thetas require grad, the frozen
        weight does not; bias is None when the problem has none or `bias` is False."""
        b = self.bias.clone().requires_grad_(True) if (bias and self.bias is not None) else None
        return (self.x.clone().requires_grad_(True), self.weight, b, self.theta_a.clone().requires_grad_(True),
                self.theta_b.clone().requires_grad_(True))


def make_problem(n_rows: int, d_in: int, d_out: int, r: int, *, mode: str = "general", bias: bool = True,
                 dtype=torch.float32, device="cpu", scaling: float = 2.0, seed: int = 0,
                 leading: tuple = ()) -> Problem:
    """Fresh random inputs (never zeros) at a scale where the low-rank term is a sizeable part of y.

    theta_b is random, not zero as at initialisation, so that B != 0 and every path is exercised.
    x has shape leading + (n_rows, d_in).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    theta_a_shape = reference.theta_a_shape(r, d_out, d_in, mode)
    return Problem(
        x=rnd(*leading, n_rows, d_in),
        weight=rnd(d_out, d_in, scale=d_in ** -0.5),
        bias=rnd(d_out) if bias else None,
        theta_a=rnd(*theta_a_shape, scale=theta_a_shape[1] ** -0.25),
        theta_b=rnd(r, d_in, scale=d_in ** -0.25),
        scaling=scaling,
        mode=mode,
    )


def backend_vs_reference(backend, problem: Problem, dropout_p: float = 0.0,
                         needs=(True, True, True, True)) -> list[tuple[bool, str]]:
    """Run one backend's forward and backward ops on `problem` and check every output.

    `backend` is a name of ops.backends.BACKENDS, or an object with a backend's `forward` and
    `backward` (e.g. TritonBackend.with_config(...): the Triton kernels with fixed launch configurations).
    Checks y, u, A, B and dx, dtheta_a, dtheta_b, db against the float64 reference, each with the
    same-dtype reference as the baseline. Returns a list of (passed, message).
    """
    p = problem
    x2d = p.x.reshape(-1, p.x.shape[-1])
    seed = torch.tensor([1234567891011], dtype=torch.int64, device=p.x.device) if dropout_p > 0 else None
    impl = BACKENDS[backend] if isinstance(backend, str) else backend
    args = (x2d, p.weight, p.bias, p.theta_a, p.theta_b, p.scaling, dropout_p, seed, p.mode)
    out = impl.forward(*args)
    base = reference.condlora_forward(*args)
    ref = reference.condlora_forward(*args, upcast=torch.float64)
    results = [check_close(getattr(out, k), getattr(ref, k), getattr(base, k), k) for k in ("y", "u", "lora_a", "lora_b")]

    g = torch.Generator(device="cpu").manual_seed(99)
    grad_y = torch.randn(ref.y.shape, generator=g, dtype=torch.float64).to(p.x.device, p.x.dtype)
    needs = (needs[0], needs[1], needs[2], needs[3] and p.bias is not None)
    # every backend's backward gets the same saved tensors (the reference's), so only the backward is compared
    saved = (x2d, p.weight, p.theta_a, p.theta_b, base.u, base.lora_a, base.lora_b)
    bwd_args = (grad_y, *saved, p.scaling, dropout_p, seed, p.mode, needs)
    grads = impl.backward(*bwd_args)
    base_g = reference.condlora_backward(*bwd_args)
    ref_g = reference.condlora_backward(*bwd_args, upcast=torch.float64)
    for k, need in zip(("grad_x", "grad_theta_a", "grad_theta_b", "grad_bias"), needs):
        if need:
            results.append(check_close(getattr(grads, k), getattr(ref_g, k), getattr(base_g, k), k))
    return results


class _PartitionSeen(Exception):
    pass


def compiled_saved_tensors(run) -> list:
    """What a step compiled by Inductor keeps from forward to backward, as its partitioner decides it, without
    compiling a kernel: `run()` must make torch.compile (inductor) compile a forward with a backward (its first
    call); Inductor's partition function is wrapped, the backward graph's inputs are recorded and the compilation
    stops there (the exception is swallowed). Returns [(shape, stride, dtype, is_input)] of the saved tensors,
    is_input True for a graph input saved as it is (a parameter: no memory of its own). The partition works on the
    traced graph, so CPU tensors give what a GPU run at the same shapes saves (tools/saved_tensors.py, docs/design.md
    §7)."""
    import torch._inductor.compile_fx as compile_fx

    saved = []
    partition = compile_fx.min_cut_rematerialization_partition

    def recording_partition(joint, *args, **kwargs):
        forward, backward = partition(joint, *args, **kwargs)
        inputs = {node.name for node in forward.graph.nodes if node.op == "placeholder"}
        for node in backward.graph.nodes:
            value = node.meta.get("val")
            if node.op == "placeholder" and not node.name.startswith("tangents") and isinstance(value, torch.Tensor):
                saved.append((tuple(value.shape), tuple(value.stride()), value.dtype, node.name in inputs))
        raise _PartitionSeen

    compile_fx.min_cut_rematerialization_partition = recording_partition
    try:
        run()
    except Exception as exc:  # torch.compile wraps the backend's exception
        chain, seen = exc, False
        while chain is not None and not seen:
            seen = isinstance(chain, _PartitionSeen)
            chain = chain.__cause__ or chain.__context__
        if not seen:
            raise
    finally:
        compile_fx.min_cut_rematerialization_partition = partition
        torch._dynamo.reset()
    return saved
