"""Hypothesis fuzzing of the op (forward and every gradient) on the reference, cpu and interpreted Triton backends.

Each example draws N (0..300 rows), d_in, d_out, r, the leading dims of x (1-4 dims in all), its layout
(contiguous, transposed or sliced), the dtype (float64, float32, float16; bf16 is not fuzzed on CPU: the Triton
interpreter multiplies bf16 bit patterns, see test_triton_backend.py), dropout, bias (none, frozen, trainable),
which inputs need gradients, float32 masters (weight, bias and generators in float32 for a float16 x) and the
mode, then calls `condlora_linear` on one backend (the cpu backend's route is the extension's op with its autograd in
C++, the others the Python autograd Function) and compares y, dx, dtheta_a, dtheta_b and db with an independent
implementation written here: the forward formulas of
docs/design.md §1-2 as plain matmuls, differentiated by torch.autograd, with the dropout mask from a Philox4x32-10
written here in numpy (§3). Accuracy rule of condlora_kernels.testing: the error against the float64 result at most
twice the error of the same computation in the example's dtype, plus the floor; the floor is scaled by the output's
condition number where it is the whole allowance (float64, outputs of few rounded sums: see `check`).

CI runs a fixed set of examples (derandomize=True, no example database): the same ones every run. A failure
prints the falsifying Case; rerun with the printed `@reproduce_failure` blob or raise EXAMPLES for a longer hunt.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from condlora_kernels.ops.backends import BACKENDS
from condlora_kernels.ops.condlora_linear import condlora_linear, draw_seed
from condlora_kernels.testing import ERROR_FACTOR, check_close, error_floor, relative_error

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, note, settings, strategies as st  # noqa: E402

# Examples per backend in one CI run (>= 200 in all); the interpreter takes ~0.1-1.5 s an example, the others ms.
EXAMPLES = {"reference": 90, "cpu": 90, "triton": 60}
DTYPES = (torch.float32, torch.float16, torch.float64)


def _ci_settings(backend: str):
    return settings(max_examples=EXAMPLES[backend], derandomize=True, database=None, deadline=None,
                    print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --------------------------------------------------------------------------------------------------
# Independent dropout mask: Philox4x32-10 (Salmon et al., SC'11) in numpy, mapped to elements as in §3
# --------------------------------------------------------------------------------------------------

_U32 = np.uint64(0xFFFFFFFF)
PHILOX_MULTIPLIERS = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
PHILOX_WEYL = (np.uint64(0x9E3779B9), np.uint64(0xBB67AE85))


def philox4x32_10(counter, key):
    """The four output words for counters (c0, c1, c2, c3) (uint32 values in uint64 arrays) under key (k0, k1)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.uint64(k) for k in key)
    for _ in range(10):
        p0 = c0 * PHILOX_MULTIPLIERS[0]  # exact: both factors < 2^32
        p1 = c2 * PHILOX_MULTIPLIERS[1]
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _U32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _U32
        k0, k1 = (k0 + PHILOX_WEYL[0]) & _U32, (k1 + PHILOX_WEYL[1]) & _U32
    return c0, c1, c2, c3


def keep_mask(seed: int, n_rows: int, n_cols: int, p: float) -> tuple[np.ndarray, float]:
    """(M, 1 / (1 - p')) of §3: element (row, col) draws the 16-bit half-word col % 8 of the Philox output at
    counter row * ceil(n_cols / 8) + col // 8 (key: the seed's two 32-bit halves) and is kept when that draw is
    at least t = round(p * 2^16); p' = t / 2^16 is the probability actually dropped."""
    threshold = round(p * 65536)
    groups = -(-n_cols // 8)
    rows, cols = np.meshgrid(np.arange(n_rows, dtype=np.uint64), np.arange(n_cols, dtype=np.uint64), indexing="ij")
    counter = rows * np.uint64(groups) + cols // np.uint64(8)
    zeros = np.zeros_like(counter)
    words = np.stack(philox4x32_10((counter & _U32, counter >> np.uint64(32), zeros, zeros),
                                   (seed & 0xFFFFFFFF, seed >> 32)))
    lane = (cols % np.uint64(8)).astype(np.int64)
    word = np.take_along_axis(words, (lane // 2)[None], axis=0)[0]
    draw = np.where(lane % 2 == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    return draw >= threshold, 1.0 / (1.0 - threshold / 65536)


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32-10 (kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
              (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in cases:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == expected


def test_keep_mask_rate():
    keep, scale = keep_mask((1 << 40) + 12345, 300, 45, 0.3)
    assert abs(keep.mean() - 0.7) < 0.01 and scale == 1 / (1 - round(0.3 * 65536) / 65536)


# --------------------------------------------------------------------------------------------------
# Independent op: the forward of §1-2 in plain matmuls; its gradients by torch.autograd
# --------------------------------------------------------------------------------------------------


def independent_op(x, weight, bias, theta_a, theta_b, scaling, mode, mask_scale, grad_y, needs, dtype):
    """y and the gradients of <y, grad_y> w.r.t. the inputs flagged in `needs`, all computed in `dtype`.

    y = x W0^T + b + s * ((x * M * scale) A^T) B^T, A = theta_a W0^T (paper) or theta_a W0 (general), B = W0 theta_b^T.
    """
    leaves = {name: t.detach().to(dtype).requires_grad_(needs[name])
              for name, t in (("x", x), ("theta_a", theta_a), ("theta_b", theta_b), ("bias", bias)) if t is not None}
    w = weight.to(dtype)
    x2d = leaves["x"].reshape(-1, w.shape[1])
    lora_a = leaves["theta_a"] @ (w.t() if mode == "paper" else w)
    lora_b = w @ leaves["theta_b"].t()
    x_hat = x2d if mask_scale is None else x2d * mask_scale.to(dtype)
    y2d = x2d @ w.t() + scaling * ((x_hat @ lora_a.t()) @ lora_b.t())
    if "bias" in leaves:
        y2d = y2d + leaves["bias"]
    y = y2d.reshape(*x.shape[:-1], w.shape[0])
    wanted = [name for name in leaves if needs[name]]
    grads = torch.autograd.grad(y, [leaves[n] for n in wanted], grad_y.to(dtype)) if wanted else ()
    return y.detach(), dict(zip(wanted, grads))


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Case:
    backend: str
    dtype: torch.dtype
    mode: str
    x_shape: tuple  # (..., d_in); N = product of the leading dims
    layout: str  # contiguous | transposed (last two dims swapped in memory) | sliced (every other column)
    d_out: int
    r: int
    scaling: float
    dropout_p: float
    rng_seed: int  # torch.manual_seed before the call: the op draws its dropout seed (the mask's key) from it
    bias: str  # none | frozen | trainable
    needs: dict  # which of x, theta_a, theta_b require grad
    masters: bool  # weight, bias, theta_a and theta_b in float32 while x is float16 (cast per call)
    data_seed: int  # the values of the tensors


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def leading_dims(draw, n_rows: int, n_dims: int) -> tuple:
    """n_dims leading dims whose product is n_rows (for n_rows == 0 one of them is 0)."""
    dims, remaining = [], n_rows
    for _ in range(n_dims - 1):
        dim = draw(st.integers(0, 3)) if remaining == 0 else draw(st.sampled_from(_divisors(remaining)))
        dims.append(dim)
        remaining = remaining // dim if remaining else 0
    return tuple(dims) + (remaining,)


@st.composite
def cases(draw, backend: str, max_rows: st.SearchStrategy) -> Case:
    dtype = draw(st.sampled_from([d for d in DTYPES if BACKENDS[backend].unavailable_reason(
        torch.empty(0, dtype=d)) is None]))
    mode = draw(st.sampled_from(["paper", "general"]))
    d_in = draw(st.integers(1, 48))
    d_out = d_in if mode == "paper" else draw(st.integers(1, 48))
    x_dims = draw(st.sampled_from([2, 3, 4, 2, 3, 1]))  # 1-D x (a single row) now and then
    n_rows = 1 if x_dims == 1 else draw(max_rows)
    x_shape = (draw(leading_dims(n_rows, x_dims - 1)) if x_dims > 1 else ()) + (d_in,)
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"] if x_dims > 1 else ["contiguous", "sliced"]))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]) | st.floats(0.0, 0.95))
    needs = draw(st.fixed_dictionaries({"x": st.booleans(), "theta_a": st.booleans(), "theta_b": st.booleans()}))
    return Case(backend=backend, dtype=dtype, mode=mode, x_shape=x_shape, layout=layout, d_out=d_out,
                r=draw(st.integers(1, 20)), scaling=draw(st.floats(0.125, 8.0)), dropout_p=dropout_p,
                rng_seed=draw(st.integers(0, 2**32 - 1)), bias=draw(st.sampled_from(["none", "frozen", "trainable"])),
                needs=needs, masters=dtype == torch.float16 and draw(st.booleans()),
                data_seed=draw(st.integers(0, 2**31 - 1)))


# testing.error_floor is at its largest, 4 eps, up to 64 values: there the 2x rule compares a handful of roundings
FEW_SUMS = 64


def check(out, ref64, baseline, magnitude64, name, sums):
    """testing.check_close, except that the floor is scaled by the output's condition number ||magnitude|| / ||ref||
    (`magnitude`: the same computation on the absolute values of the inputs, the scale of the a priori rounding
    bound) where the rule's allowance for rounding is the floor alone: in float64, whose same-dtype baseline is the
    float64 result itself, and where the output comes from few rounded sums (`sums`, at most its size), whose
    same-dtype baseline may round luckily. The floor assumes an output that does not cancel; one that does is
    legitimately a few eps times its condition number off. Found by this fuzzer, all rounding:
      * dx at N = 1, d_in = 1, float32: terms 2.10 and -2.39 giving -0.29 (condition 38), error 1.2e-6, baseline
        5.7e-8;
      * dtheta_a = dA W0^T at d_in = 1, float32: 78 numbers, but only the r = 2 sums of dA over 297 rows (error
        3.0e-6, baseline 8.4e-7); likewise dtheta_b = dB^T W0 (2 numbers) at d_in = 1;
      * y at d_out = r = 1, float64: y = x W0^T (1 + s theta_a theta_b) with the bracket near 0, error 6e2 eps.
    Outputs of many sums in float16 and float32 keep testing's rule as it is."""
    ok, message = check_close(out, ref64, baseline, name)
    ref_norm = ref64.norm().item()
    sums = min(sums, out.numel())
    if ok or out.shape != ref64.shape or ref_norm == 0.0 or (sums > FEW_SUMS and out.dtype != torch.float64):
        return ok, message
    condition = magnitude64.norm().item() / ref_norm
    bound = ERROR_FACTOR * relative_error(baseline, ref64) + error_floor(out.dtype, sums) * condition
    error = relative_error(out, ref64)  # NaN (hence a failure) when out has a NaN where ref64 has none
    return error <= bound, f"{message}; {sums} sums: floor x condition number {condition:.1f}, bound {bound:.2e}"


def make_inputs(case: Case):
    """Fresh random tensors for `case` (never zeros), at a scale where the low-rank term is a sizeable part of y."""
    g = torch.Generator().manual_seed(case.data_seed)
    master = torch.float32 if case.masters else case.dtype

    def rnd(*shape, scale=1.0, dtype=case.dtype):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    d_in = case.x_shape[-1]
    if case.layout == "transposed":
        x = rnd(*case.x_shape[:-2], d_in, case.x_shape[-2]).transpose(-1, -2)
    elif case.layout == "sliced":
        x = rnd(*case.x_shape[:-1], 2 * d_in)[..., ::2]
    else:
        x = rnd(*case.x_shape)
    theta_a_cols = d_in if case.mode == "paper" else case.d_out
    tensors = {
        "x": x.requires_grad_(case.needs["x"]),  # a leaf with x's strides
        "weight": rnd(case.d_out, d_in, scale=d_in ** -0.5, dtype=master),
        "bias": None if case.bias == "none" else rnd(case.d_out, dtype=master).requires_grad_(case.bias == "trainable"),
        "theta_a": rnd(case.r, theta_a_cols, scale=theta_a_cols ** -0.25, dtype=master).requires_grad_(
            case.needs["theta_a"]),
        "theta_b": rnd(case.r, d_in, scale=d_in ** -0.25, dtype=master).requires_grad_(case.needs["theta_b"]),
    }
    return tensors, rnd(*case.x_shape[:-1], case.d_out)


def check_case(case: Case) -> None:
    t, grad_y = make_inputs(case)
    n_rows, d_in = math.prod(case.x_shape[:-1]), case.x_shape[-1]
    mask_scale = None
    if case.dropout_p > 0.0:  # the seed the op will draw: the same draw from the same RNG state
        torch.manual_seed(case.rng_seed)
        keep, scale = keep_mask(int(draw_seed(t["x"]).item()), n_rows, d_in, case.dropout_p)
        mask_scale = torch.from_numpy(keep).double() * scale
    torch.manual_seed(case.rng_seed)
    y = condlora_linear(t["x"], t["weight"], t["bias"], t["theta_a"], t["theta_b"], case.scaling,
                        dropout_p=case.dropout_p, mode=case.mode, backend=case.backend)
    needs = {**case.needs, "bias": case.bias == "trainable"}
    wanted = [name for name in ("x", "theta_a", "theta_b", "bias") if needs[name]]
    grads = dict(zip(wanted, torch.autograd.grad(y, [t[n] for n in wanted], grad_y) if wanted else ()))

    tensors = [t["x"], t["weight"], t["bias"], t["theta_a"], t["theta_b"]]
    args = (*tensors, case.scaling, case.mode, mask_scale, grad_y, needs)
    y64, grads64 = independent_op(*args, torch.float64)
    y_same, grads_same = independent_op(*args, case.dtype)
    magnitudes = [None if v is None else v.abs() for v in tensors]
    y_mag, grads_mag = independent_op(*magnitudes, case.scaling, case.mode, mask_scale, grad_y.abs(), needs,
                                      torch.float64)
    # the rounded sums behind each output: dtheta_a = dA W0^(T) and dtheta_b = dB^T W0 carry the errors of dA, dB
    sums = {"y": n_rows * case.d_out, "x": n_rows * d_in, "theta_a": case.r * d_in, "theta_b": case.r * case.d_out,
            "bias": case.d_out}
    results = [(y.dtype == case.dtype, f"y has dtype {y.dtype}, expected {case.dtype}"),
               check(y, y64, y_same, y_mag, "y", sums["y"])]
    for n in wanted:  # a master's gradient comes back in the master's dtype, computed in x's dtype
        results.append((grads[n].dtype == t[n].dtype, f"d{n} has dtype {grads[n].dtype}, expected {t[n].dtype}"))
        results.append(check(grads[n].to(case.dtype), grads64[n], grads_same[n], grads_mag[n], f"d{n}", sums[n]))
    for _, message in results:
        note(message)
    failures = [message for ok, message in results if not ok]
    assert not failures, "\n".join(failures)


def _skip_unless_available(backend: str):
    reason = BACKENDS[backend].unavailable_reason(torch.empty(0))
    return pytest.mark.skipif(reason is not None, reason=f"the {backend} backend cannot run on CPU tensors: {reason}")


ROWS = st.integers(0, 300)
ALL_NEED_GRAD = {"x": True, "theta_a": True, "theta_b": True}


def with_edge_examples(backend: str):
    """Cases every run includes, whatever hypothesis draws: no rows (x of shape (0, 3, 20)), a 1-D x, and the
    largest problem (N = 300, r = 20 > 16, float16 with float32 masters, transposed x, dropout, trainable bias)."""
    edges = [
        Case(backend, torch.float32, "general", (0, 3, 20), "contiguous", 28, 3, 2.0, 0.25, 7, "trainable",
             ALL_NEED_GRAD, False, 1),
        Case(backend, torch.float32, "paper", (24,), "sliced", 24, 5, 0.5, 0.5, 8, "frozen", ALL_NEED_GRAD, False, 2),
        Case(backend, torch.float16, "paper", (3, 100, 48), "transposed", 48, 20, 1.0, 0.1, 9, "trainable",
             ALL_NEED_GRAD, True, 3),
    ]

    def decorate(test):
        for case in edges:
            test = example(case=case)(test)
        return test
    return decorate


@_ci_settings("reference")
@with_edge_examples("reference")
@given(case=cases("reference", ROWS))
def test_fuzz_reference(case):
    check_case(case)


@_skip_unless_available("cpu")
@_ci_settings("cpu")
@with_edge_examples("cpu")
@given(case=cases("cpu", ROWS))
def test_fuzz_cpu(case):
    check_case(case)


@_skip_unless_available("triton")
@_ci_settings("triton")
@with_edge_examples("triton")
@given(case=cases("triton", st.integers(0, 64) | ROWS))  # the interpreter's time grows with N: half the cases small
def test_fuzz_triton_interpreted(case):
    check_case(case)
