"""The Triton backend against the reference.

Without a GPU the kernels run under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py), in float32,
float16 and float64 at small odd shapes; the interpreter multiplies bf16 bit patterns in tl.dot
(triton-lang/triton#11584), so bf16 is tested on the GPU only. GPU tests cover bf16/fp16/fp32 at
model shapes and odd shapes. Accuracy rule: condlora_kernels.testing (error against float64 at most
2x the error of the same-dtype reference).
"""

import os

import pytest
import torch
import triton
import triton.language as tl

from condlora_kernels import BackendUnavailableError, reference, FusedCondLoRALinear, condlora_linear
from condlora_kernels.ops.backends import BACKENDS
from condlora_kernels.kernels.triton import condlora_linear as tk
from condlora_kernels.kernels.triton import runtime
from condlora_kernels.kernels.triton.config import BackwardConfig, ForwardConfig, backward_tile
from condlora_kernels.ops.condlora_linear import CondLoRALinearFunction
from condlora_kernels.testing import ODD_SHAPES, assert_close, backend_vs_reference, make_problem
from tests.conftest import HAS_CUDA, requires_cuda

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if HAS_CUDA else "cpu"
triton_ready = BACKENDS["triton"].unavailable_reason(torch.empty(0, device=DEVICE))
pytestmark = pytest.mark.skipif(triton_ready is not None, reason=f"Triton backend cannot run here: {triton_ready}")


def _assert_all_ok(results):
    bad = [msg for ok, msg in results if not ok]
    assert not bad, "\n".join(bad)


@pytest.fixture(params=["pointer", "tma"])
def main_loop(request):
    """The Triton backend through the pointer main loops and through the TMA ones (which eager mode
    takes above config.TMA_MIN_MACS multiply-adds; here wherever the tensors' strides allow it)."""
    use_tma = request.param == "tma"
    return tk.TritonBackend.with_config(ForwardConfig(use_tma=use_tma), BackwardConfig(use_tma=use_tma))


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_odd_shapes_float32(shape, dropout_p, bias, main_loop):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, bias=bias, dtype=torch.float32, device=DEVICE, seed=n + r)
    _assert_all_ok(backend_vs_reference(main_loop, problem, dropout_p=dropout_p))


@pytest.mark.parametrize("shape", ODD_SHAPES[:2], ids=lambda s: "-".join(map(str, s)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_odd_shapes_float16(shape, dropout_p):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=torch.float16, device=DEVICE, seed=3)
    _assert_all_ok(backend_vs_reference("triton", problem, dropout_p=dropout_p))


@triton.jit
def _mask_kernel(seed_ptr, out_ptr, n_rows, d_in, threshold, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    seed_lo, seed_hi = tk.load_seed(seed_ptr)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    for c0 in range(0, d_in, BLOCK_C):
        keep = tk.dropout_keep(seed_lo, seed_hi, rows, c0, d_in, threshold, BLOCK_R, BLOCK_C)
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(out_ptr + rows[:, None] * d_in + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < d_in))


def test_dropout_mask_bit_exact():
    """The kernels' mask equals reference.dropout_keep_mask element for element, at a width that is not a
    multiple of the tile or of the 8 elements one Philox call serves."""
    n_rows, d_in, p = 37, 45, 0.3
    seed = torch.tensor([(1 << 40) + 12345], dtype=torch.int64, device=DEVICE)  # a key with both halves set
    out = torch.full((n_rows, d_in), -1, dtype=torch.int8, device=DEVICE)
    _mask_kernel[(triton.cdiv(n_rows, 16),)](seed, out, n_rows, d_in, reference.dropout_threshold(p),
                                             BLOCK_R=16, BLOCK_C=32)
    assert torch.equal(out.bool(), reference.dropout_keep_mask(seed, n_rows, d_in, p))


def test_launch_refuses_a_missing_or_unknown_argument():
    """Launches name every runtime argument: a missing or misspelt one is an error, never a shifted argument."""
    args = {name: 0 for name in ("x_ptr", "w_ptr", "stride_xn")}
    with pytest.raises(TypeError, match="stride_xk.*stride_xn"):
        runtime.launch(tk.condlora_forward_kernel, (1,), args, {"num_stages": 1}, torch.empty(1, device=DEVICE))


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, True, False),
                                   (False, False, False, True), (True, False, True, True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_partial_gradients(needs, dropout_p):
    """Only the requested gradients are computed; each still matches the reference."""
    problem = make_problem(37, 40, 56, 3, mode="general", dtype=torch.float32, device=DEVICE, seed=5)
    _assert_all_ok(backend_vs_reference("triton", problem, dropout_p=dropout_p, needs=needs))


@pytest.mark.parametrize("max_slots", [None, 3])
def test_many_row_blocks(max_slots):
    """17 row blocks through the backward: one partial-sum slot each, or 3 slots that blocks m, m + 3,
    m + 6, ... take in turns (the path large problems take when memory is short)."""
    rows = 17 * backward_tile(1, 8, 16, torch.float32, False).block_m + 3
    problem = make_problem(rows, 40, 72, 2, mode="general", dtype=torch.float32, device=DEVICE, seed=6)
    backend = tk.TritonBackend.with_config(backward=BackwardConfig(max_slots=max_slots))
    _assert_all_ok(backend_vs_reference(backend, problem, dropout_p=0.2))


@pytest.mark.skipif(not INTERPRET, reason="float64 runs under the interpreter only")
@pytest.mark.parametrize("mode,d_in,d_out,dropout_p", [("paper", 8, 8, 0.3), ("general", 7, 11, 0.0)])
def test_gradcheck_float64_interpreted(mode, d_in, d_out, dropout_p):
    problem = make_problem(6, d_in, d_out, 2, mode=mode, dtype=torch.float64, device=DEVICE, seed=7)
    x = problem.x.clone().requires_grad_(True)
    b = problem.bias.clone().requires_grad_(True)
    ta = problem.theta_a.clone().requires_grad_(True)
    tb = problem.theta_b.clone().requires_grad_(True)
    seed = torch.tensor([31337], dtype=torch.int64)

    def fn(x, b, ta, tb):
        return CondLoRALinearFunction.apply(x, problem.weight, b, ta, tb, 1.5, dropout_p, seed, mode, "triton")

    assert torch.autograd.gradcheck(fn, (x, b, ta, tb), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=True)


def test_functional_api_leading_dims_non_contiguous_and_empty():
    problem = make_problem(6, 20, 28, 3, mode="general", dtype=torch.float32, device=DEVICE, leading=(2,), seed=8)
    args = (problem.weight, problem.bias, problem.theta_a, problem.theta_b, problem.scaling)
    x = problem.x.transpose(0, 1)  # (6, 2, 20), not contiguous
    y = condlora_linear(x, *args, mode="general", backend="triton")
    y_ref = condlora_linear(x, *args, mode="general", backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    assert y.shape == (6, 2, 28)
    empty = torch.empty(0, 3, 20, device=DEVICE, requires_grad=True)
    ta = problem.theta_a.clone().requires_grad_(True)
    out = condlora_linear(empty, problem.weight, problem.bias, ta, problem.theta_b, 2.0, mode="general",
                          backend="triton")
    assert out.shape == (0, 3, 28)
    out.sum().backward()
    assert empty.grad.shape == empty.shape and torch.count_nonzero(ta.grad) == 0


def test_deterministic_gradients():
    problem = make_problem(300, 40, 56, 3, mode="general", dtype=torch.float32, device=DEVICE, seed=9)
    grads = []
    for _ in range(2):
        x = problem.x.clone().requires_grad_(True)
        ta = problem.theta_a.clone().requires_grad_(True)
        tb = problem.theta_b.clone().requires_grad_(True)
        y = CondLoRALinearFunction.apply(x, problem.weight, problem.bias, ta, tb, 2.0, 0.1,
                                         torch.tensor([5], dtype=torch.int64, device=DEVICE), "general", "triton")
        y.backward(torch.ones_like(y))
        grads.append((x.grad, ta.grad, tb.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_module_trains_with_triton_backend():
    """A training step of the layer with dropout: its gradients (x, both generators) against float64, within the
    bound of the same step on the reference backend in float32 (the same dropout seed, so the same mask)."""
    torch.manual_seed(0)
    layer = FusedCondLoRALinear.from_linear(torch.nn.Linear(24, 24, device=DEVICE), r=4, dropout=0.1,
                                            backend="triton")
    torch.nn.init.normal_(layer.generator.theta_b, std=0.1)
    x0 = torch.randn(5, 24, device=DEVICE)

    def step(backend, dtype):
        twin = FusedCondLoRALinear.from_linear(torch.nn.Linear(24, 24, device=DEVICE), r=4, dropout=0.1,
                                               backend=backend)
        twin.load_state_dict(layer.state_dict())
        twin = twin.to(dtype)
        x = x0.to(dtype).requires_grad_(True)
        torch.manual_seed(1)  # the dropout seed
        twin(x).square().sum().backward()
        return x.grad, twin.generator.theta_a.grad, twin.generator.theta_b.grad

    want = step("reference", torch.float64)
    for name, got, ref64, same in zip(("dx", "dtheta_a", "dtheta_b"), step("triton", torch.float32), want,
                                      step("reference", torch.float32)):
        assert ref64.abs().max() > 0
        assert_close(got, ref64, same, name)


@pytest.mark.skipif(not INTERPRET, reason="checks the interpreter's dtype guard")
def test_bf16_refused_under_interpreter():
    problem = make_problem(4, 8, 8, 2, mode="paper", dtype=torch.bfloat16)
    with pytest.raises(BackendUnavailableError, match="float16, float32 or float64"):
        condlora_linear(*problem.tensors(), problem.scaling, backend="triton")


# torch traces a triton_op under FakeTensor mode through wrap_triton, which cannot see through the
# interpreter's kernels (it runs them on fake tensors): opcheck and torch.compile are checked on the GPU.
@requires_cuda
def test_opcheck():
    problem = make_problem(9, 16, 16, 2, mode="paper", dtype=torch.float32, device=DEVICE, seed=10)
    seed = torch.tensor([77], dtype=torch.int64, device=DEVICE)
    fwd_args = (problem.x, problem.weight, problem.bias, problem.theta_a, problem.theta_b, 2.0, 0.2, seed, True)
    torch.library.opcheck(torch.ops.condlora_triton.forward, fwd_args)
    y, u, a, b = torch.ops.condlora_triton.forward(*fwd_args)
    bwd_args = (torch.randn_like(y), problem.x, problem.weight, a, b, u, 2.0, 0.2, seed, True, True, True, True)
    torch.library.opcheck(torch.ops.condlora_triton.backward, bwd_args)


@requires_cuda
def test_torch_compile_fullgraph():
    torch.manual_seed(0)
    layer = FusedCondLoRALinear.from_linear(torch.nn.Linear(16, 16, device=DEVICE), r=2, backend="triton")
    torch.nn.init.normal_(layer.generator.theta_b, std=0.1)
    x = torch.randn(3, 7, 16, device=DEVICE)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_(True)
    compiled(xg).sum().backward()
    grad_compiled = layer.generator.theta_a.grad.clone()
    layer.generator.theta_a.grad = None
    layer(x).sum().backward()
    torch.testing.assert_close(grad_compiled, layer.generator.theta_a.grad, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (mode, N, d_in, d_out, r)
    ("paper", 2048, 768, 768, 8),      # RoBERTa-base query/value
    ("general", 1024, 1024, 2816, 16),  # an FFN projection
    ("paper", 1000, 1000, 1000, 7),    # nothing a multiple of a block
    ("general", 37, 40, 56, 3),
    ("general", 513, 96, 4000, 64),
    ("paper", 300, 256, 256, 256),     # the largest rank
]


# bf16 at every shape; fp16 and fp32 at two (each new dtype/shape specialization is a kernel compile)
GPU_CASES = ([(torch.bfloat16, shape) for shape in GPU_SHAPES]
             + [(dtype, shape) for dtype in (torch.float16, torch.float32) for shape in GPU_SHAPES[1:3]])


@requires_cuda
@pytest.mark.parametrize("dtype,shape", GPU_CASES, ids=lambda v: str(v).replace("torch.", "") if isinstance(v, torch.dtype)
                         else "-".join(map(str, v)))
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_against_reference(dtype, shape, dropout_p, main_loop):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, device="cuda", seed=n)
    _assert_all_ok(backend_vs_reference(main_loop, problem, dropout_p=dropout_p))


@requires_cuda
def test_gpu_deterministic_large():
    problem = make_problem(8192, 1024, 1024, 16, mode="paper", dtype=torch.bfloat16, device="cuda", seed=11)
    runs = [backend_grads(problem) for _ in range(3)]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def backend_grads(problem):
    x = problem.x.clone().requires_grad_(True)
    ta = problem.theta_a.clone().requires_grad_(True)
    tb = problem.theta_b.clone().requires_grad_(True)
    y = CondLoRALinearFunction.apply(x, problem.weight, problem.bias, ta, tb, 2.0, 0.1,
                                     torch.tensor([5], dtype=torch.int64, device=x.device), problem.mode, "triton")
    y.backward(torch.ones_like(y))
    return x.grad, ta.grad, tb.grad


@requires_cuda
@pytest.mark.skipif(HAS_CUDA and torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    problem = make_problem(100, 64, 64, 4, mode="paper", dtype=torch.bfloat16, device="cuda:1", seed=12)
    _assert_all_ok(backend_vs_reference("triton", problem, dropout_p=0.1))


def _check_last_rows(n: int, d: int, dtype: torch.dtype, device: str, tail_rows: int = 1000) -> None:
    """The Triton forward and dx for an (n, d) x, paper mode, dropout 0.1, checked on its last `tail_rows` rows against
    float64 from theta (A and B generated independently), with the error bound of the same math in `dtype` (the rule
    of testing.py). The mask is drawn with the rows' global indices, so rows past 2^31 elements check the offsets."""
    torch.manual_seed(0)
    x = torch.randn(n, d, device=device, dtype=dtype)
    w = torch.randn(d, d, device=device, dtype=dtype) / 8
    ta = torch.randn(4, d, device=device, dtype=dtype) / 3
    tb = torch.randn(4, d, device=device, dtype=dtype) / 3
    seed = torch.tensor([3], dtype=torch.int64, device=device)
    y, u, a, b = torch.ops.condlora_triton.forward(x, w, None, ta, tb, 2.0, 0.1, seed, True)
    tail = slice(n - tail_rows, n)
    rows = torch.arange(n - tail_rows, n, device=device, dtype=torch.int64)
    keep = reference.dropout_draws(seed, rows, torch.arange(d, device=device), d) >= reference.dropout_threshold(0.1)
    mask = keep.double() * reference.dropout_keep_scale(0.1)
    dy = torch.randn(tail_rows, d, device=device, dtype=dtype)

    def expected(t):  # u, y, A, B and dx of the tail rows, computed in t's dtype from the inputs alone
        xt, wt, m, dyt = x[tail].to(t), w.to(t), mask.to(t), dy.to(t)
        at, bt = reference.generate_lora_weights(wt, ta.to(t), tb.to(t), "paper")
        ut = (xt * m) @ at.t()
        return ut, xt @ wt.t() + 2.0 * (ut @ bt.t()), at, bt, dyt @ wt + (2.0 * (dyt @ bt) @ at) * m

    want, baseline = expected(torch.float64), expected(dtype)
    for name, got, ref64, same in zip(("u", "y", "lora_a", "lora_b"), (u[tail], y[tail], a, b), want, baseline):
        assert_close(got, ref64, same, name)
    del y, u
    grad_y = torch.zeros(n, d, device=device, dtype=dtype)
    grad_y[tail] = dy
    dx, _, _, _ = torch.ops.condlora_triton.backward(grad_y, x, w, a, b, torch.zeros(n, 4, device=device,
                                                     dtype=dtype), 2.0, 0.1, seed, True, True, False, False)
    assert_close(dx[tail], want[4], baseline[4], "dx")


@requires_cuda
@pytest.mark.slow
def test_offsets_beyond_int32():
    """x and y with more than 2^31 elements: the rows near the end, whose elements sit past 2^31."""
    _check_last_rows((1 << 31) // 64 + 1000, 64, torch.bfloat16, "cuda")


def test_last_rows_check_itself():
    """The check of test_offsets_beyond_int32 at a size every machine runs (float32: the interpreter has no bf16)."""
    _check_last_rows(1200, 64, torch.float32 if INTERPRET else torch.bfloat16, DEVICE, tail_rows=300)
