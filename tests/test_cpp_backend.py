"""The C++/CUDA extension `condlora_kernels._C` (csrc/) as the "cpu" and "cuda" backends, against the reference.

CPU tests run everywhere the extension is built (CI builds it, CUDA sources included, without a GPU); the CUDA
tests need a GPU (`requires_cuda`). Accuracy rule: condlora_kernels.testing (error against float64 at most 2x the
error of the same-dtype reference); float64 is checked with gradcheck and tight tolerances instead (its
same-dtype baseline is the float64 reference itself). The dropout mask must equal reference.dropout_keep_mask
bit for bit.
"""

import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from condlora_kernels import BackendUnavailableError, CondLoRAFallbackWarning, FusedCondLoRALinear, condlora_linear
from condlora_kernels import reference
from condlora_kernels._validation import check_condlora_args
from condlora_kernels.kernels import cpp
from condlora_kernels.ops import backends
from condlora_kernels.ops.condlora_linear import CondLoRALinearFunction
from condlora_kernels.testing import ODD_SHAPES, backend_vs_reference, make_problem
from condlora_kernels.timing import capture_cuda_graph
from tests.conftest import requires_cuda

F64 = torch.float64
SKIP_EXT = os.environ.get("CONDLORA_SKIP_EXT", "0") == "1"  # the build skipped _C on purpose
needs_ext = pytest.mark.skipif(cpp.LOAD_ERROR is not None, reason=f"condlora_kernels._C unavailable: {cpp.LOAD_ERROR}")

# the shared odd shapes, and two the C++ backend treats apart
CPP_SHAPES = ODD_SHAPES + [
    ("general", 300, 32, 48, 8),  # N >= d_in, d_out: the low-rank term is folded into the weight when p == 0 (CPU)
    ("general", 0, 40, 56, 3),
]
SHAPE_IDS = ["-".join(map(str, s)) for s in CPP_SHAPES]
ALL_NEEDS = (True, True, True, True)


def _assert_all_ok(results):
    bad = [msg for ok, msg in results if not ok]
    assert not bad, "\n".join(bad)




def _op_args(problem, dropout_p, seed_value=1234567891011):
    p = problem
    seed = torch.tensor([seed_value], dtype=torch.int64, device=p.x.device) if dropout_p > 0 else None
    return (p.x.reshape(-1, p.x.shape[-1]), p.weight, p.bias, p.theta_a, p.theta_b, p.scaling, dropout_p, seed, p.mode)


# --------------------------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(SKIP_EXT, reason="CONDLORA_SKIP_EXT=1: the extension was not built")
def test_extension_loads():
    """CI builds _C: it must load (a broken build would otherwise only show up as skipped tests)."""
    assert cpp.LOAD_ERROR is None, cpp.LOAD_ERROR
    module, reason = cpp.load_extension()
    assert reason is None and cpp.torch_release(module.torch_version) == cpp.torch_release(torch.__version__)
    assert cpp.torch_release("2.15.0a0+git1234") == (2, 15, 0)


def _nvcc_present():
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    return bool((home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc"))


@needs_ext
@pytest.mark.skipif(torch.version.cuda is None or not _nvcc_present() or os.environ.get("CONDLORA_NO_CUDA") == "1",
                    reason="a CPU-only build is expected here (no CUDA build of torch or no nvcc)")
def test_cuda_sources_compiled_where_nvcc_exists():
    """CI has nvcc but no GPU: the CUDA sources must still be compiled into _C (and the CUDA kernels registered)."""
    assert cpp.WITH_CUDA
    assert torch._C._dispatch_has_kernel_for_dispatch_key("condlora_C::forward", "CUDA")


@needs_ext
def test_schemas():
    forward = str(torch.ops.condlora_C.forward.default._schema)
    assert "Tensor? bias" in forward and "Tensor? seed" in forward and "-> (Tensor y, Tensor u" in forward
    assert "bool[4] needs" in str(torch.ops.condlora_C.backward.default._schema)
    for op in ("generate_lora_weights", "forward", "backward", "dropout_keep_mask"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"condlora_C::{op}", "CPU")


# --------------------------------------------------------------------------------------------------------------
# CPU kernels against the reference
# --------------------------------------------------------------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_float32(shape, dropout_p, bias):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, bias=bias, dtype=torch.float32, seed=n + r)
    _assert_all_ok(backend_vs_reference("cpu", problem, dropout_p=dropout_p))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", CPP_SHAPES[:2] + CPP_SHAPES[5:7], ids=SHAPE_IDS[:2] + SHAPE_IDS[5:7])
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_cpu_half_dtypes(dtype, shape, dropout_p):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, seed=3)
    _assert_all_ok(backend_vs_reference("cpu", problem, dropout_p=dropout_p))


@needs_ext
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (False, True, True, False), (True, False, True, True)])
@pytest.mark.parametrize("mode", ["paper", "general"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_cpu_partial_gradients(needs, mode, dropout_p):
    """Only the requested gradients are computed (the others come back as None); each matches the reference."""
    d_out = 40 if mode == "paper" else 56
    problem = make_problem(37, 40, d_out, 3, mode=mode, dtype=torch.float32, seed=5)
    _assert_all_ok(backend_vs_reference("cpu", problem, dropout_p=dropout_p, needs=needs))
    x2d, weight, bias, theta_a, theta_b, scaling, p, seed, mode = _op_args(problem, dropout_p)
    out = cpp.CpuBackend.forward(x2d, weight, bias, theta_a, theta_b, scaling, p, seed, mode)
    grads = cpp.CpuBackend.backward(torch.randn_like(out.y), x2d, weight, theta_a, theta_b, out.u, out.lora_a,
                                    out.lora_b, scaling, p, seed, mode, needs)
    assert [g is not None for g in grads] == list(needs)


@needs_ext
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("mode,n,d_in,d_out", [("paper", 301, 64, 64), ("general", 301, 33, 70),
                                               ("paper", 200, 256, 256)])
def test_cpu_token_reductions_over_thread_chunks(threads, mode, n, d_in, d_out):
    """Without dropout the CPU backward takes dA, dB^T, db (and v, where dx is not folded: N < d) from one
    hand-written pass over dy and x, its rows split into one chunk per thread: uneven chunks, a ragged last group of
    rows, d not a multiple of the 16 partial sums."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (True, False):
            problem = make_problem(n, d_in, d_out, 5, mode=mode, bias=bias, dtype=torch.float32, seed=threads + n)
            _assert_all_ok(backend_vs_reference("cpu", problem, dropout_p=0.0))
    finally:
        torch.set_num_threads(old)


@needs_ext
@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 12, 12), ("general", 9, 13)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_cpu_float64_matches_reference(mode, d_in, d_out, dropout_p):
    problem = make_problem(300, d_in, d_out, 3, mode=mode, dtype=F64, seed=11)
    args = _op_args(problem, dropout_p)
    out, ref = cpp.CpuBackend.forward(*args), reference.condlora_forward(*args)
    for name in ref._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-12, msg=name)
    grad_y = torch.randn_like(ref.y)
    bwd = (grad_y, args[0], problem.weight, problem.theta_a, problem.theta_b, ref.u, ref.lora_a, ref.lora_b,
           problem.scaling, dropout_p, args[7], mode, ALL_NEEDS)
    grads, ref_grads = cpp.CpuBackend.backward(*bwd), reference.condlora_backward(*bwd)
    for name in ref_grads._fields:
        torch.testing.assert_close(getattr(grads, name), getattr(ref_grads, name), rtol=1e-12, atol=1e-12, msg=name)


@needs_ext
@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 10, 10), ("general", 9, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_cpu_gradcheck_float64(mode, d_in, d_out, bias, dropout_p):
    """With a fixed seed the dropout mask is a fixed function, so gradcheck applies to the Function."""
    problem = make_problem(6, d_in, d_out, 3, mode=mode, bias=bias, dtype=F64, seed=2, leading=(2,))
    x, w, b, ta, tb = problem.leaves(bias)
    seed = torch.tensor([2024], dtype=torch.int64) if dropout_p > 0 else None

    def fn(x, b, ta, tb):
        return CondLoRALinearFunction.apply(x, w, b, ta, tb, 1.5, dropout_p, seed, mode, "cpu")

    inputs = (x, b, ta, tb) if bias else (x, None, ta, tb)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


@needs_ext
def test_cpu_through_autograd_matches_reference_backend():
    problem = make_problem(5, 24, 24, 4, mode="paper", dtype=F64, leading=(3,), seed=12)
    results = []
    for backend in ("cpu", "reference"):
        x, w, b, ta, tb = problem.leaves()
        y = condlora_linear(x, w, b, ta, tb, problem.scaling, mode="paper", backend=backend)
        y.square().sum().backward()
        results.append((y, x.grad, b.grad, ta.grad, tb.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@needs_ext
def test_auto_picks_cpu_kernels_on_cpu_tensors():
    assert backends.select_backend("auto", torch.empty(2, 3)).name == "cpu"


@needs_ext
def test_the_short_backend_lookup(monkeypatch):
    """Once the extension's backend is chosen for CPU tensors, any floating dtype and autocast state finds it by
    (request, CONDLORA_BACKEND, device type); a changed CONDLORA_BACKEND is a new key; a non-floating x reaches the op,
    which refuses it itself; a request naming another backend never takes the route."""
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.delenv("CONDLORA_BACKEND", raising=False)
    assert backends.resolve_backend("auto", torch.empty(2, 3)).name == "cpu"
    assert backends._RESOLVED[("auto", "", "cpu")].name == "cpu"
    chosen = len(backends._RESOLVED)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        assert backends.resolve_backend("auto", torch.empty(2, 3, dtype=dtype)).name == "cpu"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert backends.resolve_backend("auto", torch.empty(2, 3)).name == "cpu"
    assert len(backends._RESOLVED) == chosen  # found by the short key: select_backend did not run again
    assert backends.resolve_backend("reference", torch.empty(2, 3)).name == "reference"
    monkeypatch.setenv("CONDLORA_BACKEND", "reference")
    assert backends.resolve_backend("auto", torch.empty(2, 3)).name == "reference"
    monkeypatch.delenv("CONDLORA_BACKEND")
    p = make_problem(4, 8, 8, 2, mode="paper")
    with pytest.raises(TypeError, match=r"x must be a floating tensor"):
        condlora_linear(torch.ones(4, 8, dtype=torch.int64), *p.tensors()[1:], 1.0)


@needs_ext
def test_non_contiguous_x():
    problem = make_problem(8, 12, 12, 3, mode="paper", dtype=torch.float32, seed=13)
    xt = problem.x.t().contiguous().t()
    assert not xt.is_contiguous()
    args = (problem.weight, problem.bias, problem.theta_a, problem.theta_b, problem.scaling)
    for p in (0.0, 0.3):
        torch.manual_seed(1)
        y_strided = condlora_linear(xt, *args, dropout_p=p, backend="cpu")
        torch.manual_seed(1)
        y_contiguous = condlora_linear(problem.x, *args, dropout_p=p, backend="cpu")
        torch.testing.assert_close(y_strided, y_contiguous, rtol=0, atol=0)


@needs_ext
def test_deterministic_gradients():
    problem = make_problem(300, 40, 56, 3, mode="general", dtype=torch.float32, seed=9)
    grads = []
    for _ in range(2):
        x, w, b, ta, tb = problem.leaves()
        y = CondLoRALinearFunction.apply(x, w, b, ta, tb, 2.0, 0.1, torch.tensor([5]), "general", "cpu")
        y.backward(torch.ones_like(y))
        grads.append((x.grad, ta.grad, tb.grad, b.grad))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------------
# The dropout mask: Philox4x32-10 bit for bit
# --------------------------------------------------------------------------------------------------------------

SEEDS = [0, 1, 2024, 1234567891011, (1 << 62) - 1, -5]  # negative: the int64's two's complement bits are the key


@needs_ext
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.999])
def test_mask_equals_reference(seed, p):
    seed_t = torch.tensor([seed], dtype=torch.int64)
    mask = torch.ops.condlora_C.dropout_keep_mask(seed_t, 37, 41, p)  # 1517 elements: the SIMD tail included
    assert mask.dtype == torch.bool and mask.shape == (37, 41)
    assert torch.equal(mask, reference.dropout_keep_mask(seed_t, 37, 41, p))


def _check_identity_problem_uses_reference_mask(backend, d, p, mode, device):
    """Exactly: with W0 = I and theta_a = theta_b = I, A = B = I, so u = x_hat = x * M * c, c = keep scale (the nonzeros
    of u are the mask) and, with v = dy B = dy, the backward's dx = dy W0 + s (v A) * M * c = dy * (1 + M * c)."""
    x = torch.rand(37, d, dtype=F64, device=device) + 0.5  # no zeros
    dy = torch.rand(37, d, dtype=F64, device=device) + 0.5
    eye = torch.eye(d, dtype=F64, device=device)
    seed = torch.tensor([987654321], dtype=torch.int64, device=device)
    keep = reference.dropout_keep_mask(seed.cpu(), 37, d, p).to(device)
    scale = reference.dropout_keep_scale(p)
    out = backend.forward(x, eye, None, eye, eye, 1.0, p, seed, mode)
    assert torch.equal(out.lora_a, eye) and torch.equal(out.lora_b, eye)
    assert torch.equal(out.u != 0, keep)
    keep = keep.to(F64)
    torch.testing.assert_close(out.u, x * keep * scale, rtol=1e-15, atol=0)
    grads = backend.backward(dy, x, eye, eye, eye, out.u, out.lora_a, out.lora_b, 1.0, p, seed, mode,
                             (True, True, False, False))
    torch.testing.assert_close(grads.grad_x, dy * (1 + keep * scale), rtol=1e-15, atol=0)
    # dA = s v^T x_hat = dy^T (x * M * c), and dtheta_a = dA W0 = dA
    torch.testing.assert_close(grads.grad_theta_a, dy.t() @ (x * keep * scale), rtol=1e-13, atol=1e-13)


@needs_ext
@pytest.mark.parametrize("p", [0.1, 0.7])
@pytest.mark.parametrize("mode", ["general", "paper"])
def test_cpu_forward_and_backward_use_the_reference_mask(p, mode):
    _check_identity_problem_uses_reference_mask(cpp.CpuBackend, 40, p, mode, "cpu")


# --------------------------------------------------------------------------------------------------------------
# Bad input: TORCH_CHECK with the wording (and the exception type) of the Python API
# --------------------------------------------------------------------------------------------------------------


def _bad_inputs():
    p = make_problem(4, 8, 8, 2, mode="paper")
    g = make_problem(4, 6, 10, 2, mode="general")
    ok = dict(x=p.x, weight=p.weight, bias=p.bias, theta_a=p.theta_a, theta_b=p.theta_b, scaling=1.0, dropout_p=0.0,
              mode="paper")
    gen = dict(x=g.x, weight=g.weight, bias=g.bias, theta_a=g.theta_a, theta_b=g.theta_b, scaling=1.0,
               dropout_p=0.0, mode="general")
    return {
        "x_last_dim": dict(ok, x=torch.randn(4, 7)),
        "weight_not_2d": dict(ok, weight=p.weight[0]),
        "bias_shape": dict(ok, bias=torch.randn(5)),
        "theta_a_shape_general": dict(gen, theta_a=torch.randn(2, 6)),
        "theta_b_shape": dict(ok, theta_b=torch.randn(3, 8)),
        "paper_needs_square": dict(gen, theta_a=torch.randn(2, 6), mode="paper"),
        "rank_zero": dict(ok, theta_a=torch.randn(0, 8), theta_b=torch.randn(0, 8)),
        "dropout_one": dict(ok, dropout_p=1.0),
        "dropout_negative": dict(ok, dropout_p=-0.1),
        "dtype_mismatch": dict(ok, weight=p.weight.double()),
        "bias_half_of_float_x": dict(ok, bias=p.bias.half()),
        "sparse_x": dict(ok, x=p.x.to_sparse()),
        "scaling_beyond_float32": dict(ok, scaling=1e300),
        "dropout_rounds_to_one": dict(ok, dropout_p=0.999999),
        "not_float": dict(ok, x=p.x.long()),
        "scaling_inf": dict(ok, scaling=float("inf")),
        "unknown_mode": dict(ok, mode="square"),
    }


BAD_INPUTS = _bad_inputs()


@needs_ext
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_messages_match_python(case):
    kw = BAD_INPUTS[case]
    with pytest.raises((TypeError, ValueError)) as python_error:
        check_condlora_args(kw["x"], kw["weight"], kw["bias"], kw["theta_a"], kw["theta_b"], kw["scaling"],
                            kw["dropout_p"], kw["mode"])
    # the whole-layer op has the Python API's contract (the generators in any floating dtype, float32 masters)
    with pytest.raises(python_error.type) as cpp_error:
        torch.ops.condlora_C.linear(kw["x"], kw["weight"], kw["bias"], kw["theta_a"], kw["theta_b"], kw["scaling"],
                                    kw["dropout_p"], kw["mode"])
    assert str(python_error.value) in str(cpp_error.value)


@needs_ext
def test_inner_forward_op_wants_one_dtype():
    """The inner ops take every tensor in x's dtype (condlora_C::linear casts before calling them)."""
    p = make_problem(4, 8, 8, 2, mode="paper")
    with pytest.raises(TypeError, match=r"theta_a has dtype torch.float64 but x has dtype torch.float32"):
        torch.ops.condlora_C.forward(p.x, p.weight, p.bias, p.theta_a.double(), p.theta_b, 1.0, 0.0, None, "paper")


@needs_ext
def test_bad_input_backward_and_seed():
    p = make_problem(4, 8, 8, 2, mode="paper")
    y, u, a, b = torch.ops.condlora_C.forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, 1.0, 0.0, None, "paper")
    with pytest.raises(ValueError, match=r"grad_y must have shape \(4, 8\) \(N, d_out\), got \(4, 7\)"):
        torch.ops.condlora_C.backward(torch.randn(4, 7), p.x, p.weight, p.theta_a, p.theta_b, u, a, b, 1.0, 0.0,
                                      None, "paper", [True] * 4)
    with pytest.raises(ValueError, match=r"u must have shape \(4, 2\)"):
        torch.ops.condlora_C.backward(y, p.x, p.weight, p.theta_a, p.theta_b, u[:3], a, b, 1.0, 0.0, None, "paper",
                                      [True] * 4)
    with pytest.raises(ValueError, match=r"seed must be given when dropout_p > 0"):
        torch.ops.condlora_C.forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, 1.0, 0.5, None, "paper")
    with pytest.raises(TypeError, match=r"seed must be an int64 tensor with one element"):
        torch.ops.condlora_C.forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, 1.0, 0.5, torch.tensor([1.0]),
                                     "paper")
    with pytest.raises(ValueError, match=r"x must be 2-D \(N, d_in\)"):
        torch.ops.condlora_C.forward(p.x[None], p.weight, p.bias, p.theta_a, p.theta_b, 1.0, 0.0, None, "paper")
    with pytest.raises(ValueError, match=r"theta_b must have shape \(2, 8\)"):
        torch.ops.condlora_C.generate_lora_weights(p.weight, p.theta_a, p.theta_b[:, :5], "paper")


def test_cuda_backend_refuses_cpu_tensors():
    p = make_problem(4, 8, 8, 2, mode="paper")
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run here"):
        condlora_linear(*p.tensors(), 1.0, backend="cuda")
    assert cpp.CudaBackend.unavailable_reason(p.x) is not None


# --------------------------------------------------------------------------------------------------------------
# torch.library: opcheck and torch.compile
# --------------------------------------------------------------------------------------------------------------


def _opcheck_all(device):
    for mode, d_in, d_out in (("paper", 16, 16), ("general", 12, 20)):
        problem = make_problem(9, d_in, d_out, 2, mode=mode, dtype=torch.float32, device=device, seed=10)
        torch.library.opcheck(torch.ops.condlora_C.generate_lora_weights,
                              (problem.weight, problem.theta_a, problem.theta_b, mode))
        for dropout_p in (0.0, 0.2):
            args = _op_args(problem, dropout_p)
            torch.library.opcheck(torch.ops.condlora_C.forward, args)
            torch.library.opcheck(torch.ops.condlora_C.forward, args[:2] + (None,) + args[3:])
            y, u, a, b = torch.ops.condlora_C.forward(*args)
            for needs in ([True] * 4, [False, True, False, True], [True, False, True, False]):
                bwd_args = (torch.randn_like(y), args[0], problem.weight, problem.theta_a, problem.theta_b, u, a, b,
                            problem.scaling, dropout_p, args[7], mode, needs)
                torch.library.opcheck(torch.ops.condlora_C.backward, bwd_args)
    seed = torch.tensor([5], dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.condlora_C.dropout_keep_mask, (seed, 7, 9, 0.3))


@needs_ext
def test_opcheck_cpu():
    _opcheck_all("cpu")


@needs_ext
def test_compile_before_any_eager_call():
    """A fresh process whose first call of the op is inside torch.compile(fullgraph=True): the backend's module
    must already be imported (backends.preload_backends), since Dynamo cannot trace an import."""
    code = ("import torch; from condlora_kernels import FusedCondLoRALinear\n"
            "layer = FusedCondLoRALinear.from_linear(torch.nn.Linear(16, 16), r=2)\n"
            "torch.nn.init.normal_(layer.generator.theta_b, std=0.1)\n"
            "x = torch.randn(5, 16)\n"
            "out = torch.compile(layer, fullgraph=True)(x)\n"
            "torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def _compile_check(device):
    torch.manual_seed(0)
    backend = "cpu" if device == "cpu" else "cuda"
    layer = FusedCondLoRALinear.from_linear(torch.nn.Linear(16, 16, device=device), r=2, backend=backend)
    torch.nn.init.normal_(layer.generator.theta_b, std=0.1)
    x = torch.randn(3, 7, 16, device=device)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    grads = []
    for fn in (compiled, layer):
        layer.generator.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        fn(xg).square().sum().backward()
        grads.append((xg.grad, layer.generator.theta_a.grad.clone(), layer.generator.theta_b.grad.clone()))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    layer.dropout = 0.1  # with dropout: the seed is drawn inside the graph; check that it runs and trains
    compiled(x.clone().requires_grad_(True)).sum().backward()


@needs_ext
def test_torch_compile_fullgraph_cpu():
    torch._dynamo.reset()
    _compile_check("cpu")


# --------------------------------------------------------------------------------------------------------------
# Where _C is missing or built against another torch: the package imports, the backends say why, auto warns once
# --------------------------------------------------------------------------------------------------------------


def test_missing_extension_reason(monkeypatch):
    import condlora_kernels

    monkeypatch.delattr(condlora_kernels, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "condlora_kernels._C", None)  # the import of _C now fails
    module, reason = cpp.load_extension()
    assert module is None and "condlora_kernels._C is not built" in reason and "pip install" in reason


def test_extension_built_against_another_torch(monkeypatch):
    import types

    import condlora_kernels

    fake = types.ModuleType("condlora_kernels._C")
    fake.torch_version = "0.0.1"
    monkeypatch.setitem(sys.modules, "condlora_kernels._C", fake)
    monkeypatch.setattr(condlora_kernels, "_C", fake, raising=False)
    module, reason = cpp.load_extension()
    assert module is None and "built against torch 0.0.1" in reason and torch.__version__ in reason


def test_fallback_when_extension_unavailable(monkeypatch):
    reason = "condlora_kernels._C is not built (simulated)"
    monkeypatch.setattr(cpp, "LOAD_ERROR", reason)
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_RESOLVED", {})  # the per-call choice is remembered: forget the real one
    p = make_problem(4, 8, 8, 2, mode="paper")
    with pytest.raises(BackendUnavailableError, match=r"simulated"):
        condlora_linear(*p.tensors(), 1.0, backend="cpu")
    with pytest.warns(CondLoRAFallbackWarning, match=r"cpu: condlora_kernels._C is not built \(simulated\)"):
        y = condlora_linear(*p.tensors(), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        condlora_linear(*p.tensors(), 1.0)
    torch.testing.assert_close(y, condlora_linear(*p.tensors(), 1.0, backend="reference"))


def test_package_imports_without_extension():
    code = ("import sys, warnings; sys.modules['condlora_kernels._C'] = None\n"
            "import torch, condlora_kernels as ck\n"
            "from condlora_kernels.testing import make_problem\n"
            "p = make_problem(4, 8, 8, 2, mode='paper')\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    ck.condlora_linear(*p.tensors(), 1.0); ck.condlora_linear(*p.tensors(), 1.0)\n"
            "msgs = [str(x.message) for x in w if issubclass(x.category, UserWarning)]\n"
            "assert len(msgs) == 1 and 'condlora_kernels._C is not built' in msgs[0], msgs\n"
            "print('ok')\n")
    env = dict(os.environ, CONDLORA_BACKEND="auto")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------------
# CUDA kernels (GPU only)
# --------------------------------------------------------------------------------------------------------------

GPU_SHAPES = [  # (mode, N, d_in, d_out, r)
    ("paper", 4096, 768, 768, 8),       # RoBERTa-base query/value, the paper's setting
    ("general", 2048, 1024, 2816, 16),  # an FFN projection
    ("paper", 1000, 1000, 1000, 7),     # nothing a multiple of a block
    ("paper", 8192, 4096, 4096, 16),    # the benchmark shape (half its tokens)
    ("general", 513, 96, 4000, 64),     # the largest fused rank
]
GPU_ODD_SHAPES = CPP_SHAPES + [
    ("general", 45, 33, 17, 33),   # 32 < r <= 64
    ("paper", 300, 256, 256, 80),  # r > 64: the GEMM fallback path
    ("general", 3, 1, 5, 2),       # d_in = 1
]
GPU_CASES = ([(torch.bfloat16, s) for s in GPU_SHAPES]
             + [(dtype, s) for dtype in (torch.float16, torch.float32) for s in GPU_SHAPES[1:3]])


def _case_id(value):
    return str(value).replace("torch.", "") if isinstance(value, torch.dtype) else "-".join(map(str, value))


@requires_cuda
@needs_ext
@pytest.mark.parametrize("dtype,shape", GPU_CASES, ids=_case_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
def test_gpu_model_shapes(dtype, shape, dropout_p):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, device="cuda", seed=n)
    _assert_all_ok(backend_vs_reference("cuda", problem, dropout_p=dropout_p))


@requires_cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", GPU_ODD_SHAPES, ids=_case_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_gpu_odd_shapes(dtype, shape, dropout_p):
    mode, n, d_in, d_out, r = shape
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, device="cuda", seed=n + r)
    _assert_all_ok(backend_vs_reference("cuda", problem, dropout_p=dropout_p))


@requires_cuda
@needs_ext
@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True),
                                   (True, False, True, True)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gpu_partial_gradients(needs, dropout_p):
    problem = make_problem(300, 40, 56, 3, mode="general", dtype=torch.float32, device="cuda", seed=5)
    _assert_all_ok(backend_vs_reference("cuda", problem, dropout_p=dropout_p, needs=needs))


@requires_cuda
@needs_ext
@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 64, 64), ("general", 40, 56)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gpu_float64(mode, d_in, d_out, dropout_p):
    problem = make_problem(500, d_in, d_out, 5, mode=mode, dtype=F64, device="cuda", seed=14)
    args = _op_args(problem, dropout_p)
    out, ref = cpp.CudaBackend.forward(*args), reference.condlora_forward(*args)
    for name in ref._fields:
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-11, atol=1e-11, msg=name)
    bwd = (torch.randn_like(ref.y), args[0], problem.weight, problem.theta_a, problem.theta_b, ref.u, ref.lora_a,
           ref.lora_b, problem.scaling, dropout_p, args[7], mode, ALL_NEEDS)
    grads, ref_grads = cpp.CudaBackend.backward(*bwd), reference.condlora_backward(*bwd)
    for name in ref_grads._fields:
        torch.testing.assert_close(getattr(grads, name), getattr(ref_grads, name), rtol=1e-11, atol=1e-11, msg=name)


@requires_cuda
@needs_ext
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_rows,n_cols", [(3001, 1001), (257, 1024)])  # scalar and vectorised (8 | n_cols) stores
def test_gpu_mask_equals_reference(seed, n_rows, n_cols):
    seed_t = torch.tensor([seed], dtype=torch.int64, device="cuda")
    mask = torch.ops.condlora_C.dropout_keep_mask(seed_t, n_rows, n_cols, 0.3)
    assert torch.equal(mask.cpu(), reference.dropout_keep_mask(seed_t.cpu(), n_rows, n_cols, 0.3))


@requires_cuda
@needs_ext
@pytest.mark.parametrize("d", [40, 80])  # r = d: the fused token-reduction kernel (40) and the GEMM fallback (80)
@pytest.mark.parametrize("mode", ["general", "paper"])
def test_gpu_forward_and_backward_use_the_reference_mask(d, mode):
    _check_identity_problem_uses_reference_mask(cpp.CudaBackend, d, 0.3, mode, "cuda")


@requires_cuda
@needs_ext
def test_gpu_opcheck():
    _opcheck_all("cuda")


@requires_cuda
@needs_ext
def test_gpu_torch_compile_fullgraph():
    torch._dynamo.reset()
    _compile_check("cuda")


@requires_cuda
@needs_ext
def test_gpu_cuda_graph_reads_seed_from_device():
    """The kernels read the seed from device memory: a captured forward + backward replays with the seed's new value."""
    p = make_problem(64, 32, 32, 4, mode="paper", dtype=torch.float32, device="cuda", seed=15)
    seed = torch.tensor([1], dtype=torch.int64, device="cuda")
    grad_y = torch.randn(64, 32, device="cuda")

    def step():
        y, u, a, b = torch.ops.condlora_C.forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, 2.0, 0.5, seed, "paper")
        grads = torch.ops.condlora_C.backward(grad_y, p.x, p.weight, p.theta_a, p.theta_b, u, a, b, 2.0, 0.5, seed,
                                              "paper", [True] * 4)
        return (y, u, *grads)

    graph, _, captured = capture_cuda_graph(step)
    replays = []
    for value in (7, 123456789):
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        for got, want in zip(captured, step()):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        replays.append(captured[1].clone())
    assert not torch.equal(replays[0], replays[1])  # the two seeds drew different masks


@requires_cuda
@needs_ext
def test_gpu_non_contiguous_x():
    problem = make_problem(8, 12, 12, 3, mode="paper", dtype=torch.float32, device="cuda", seed=13)
    xt = problem.x.t().contiguous().t()
    args = (problem.weight, problem.bias, problem.theta_a, problem.theta_b, problem.scaling)
    torch.testing.assert_close(condlora_linear(xt, *args, backend="cuda"),
                               condlora_linear(problem.x, *args, backend="cuda"), rtol=0, atol=0)
    assert backends.BACKENDS["cuda"].unavailable_reason(problem.x) is None


@requires_cuda
@needs_ext
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_gpu_runs_on_the_tensors_device():
    problem = make_problem(40, 24, 24, 3, mode="paper", dtype=torch.float32, device="cuda:1", seed=16)
    _assert_all_ok(backend_vs_reference("cuda", problem, dropout_p=0.2))
