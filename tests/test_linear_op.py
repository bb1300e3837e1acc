"""The extension's whole-layer op `condlora_C::linear` (C++ autograd, docs/design.md §4) against the float64
reference, in every dtype, at odd shapes; gradcheck; autocast with float32 masters; inference mode; opcheck;
torch.compile. CPU here; the same tests run on CUDA tensors where a GPU is (there `prepare` is one kernel for paper
mode: the shapes below cover it and the cuBLAS path)."""

import pytest
import torch

from condlora_kernels import FusedCondLoRALinear, reference
from condlora_kernels.timing import capture_cuda_graph
from condlora_kernels.kernels import cpp
from condlora_kernels.testing import ODD_SHAPES, check_close, make_problem

pytestmark = pytest.mark.skipif(cpp.LOAD_ERROR is not None, reason=f"extension not loaded: {cpp.LOAD_ERROR}")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and cpp.WITH_CUDA else [])


def linear(*args, **kwargs):
    return torch.ops.condlora_C.linear.default(*args, **kwargs)


def reference_outputs(problem, dtype, grad_y, dropout_p=0.0, seed=None, upcast=None):
    """(y, dx, dtheta_a, dtheta_b, db) of the reference in `dtype` (weights rounded to it), or upcast to float64."""
    leaves = [t.detach().to(dtype) if t is not None else None for t in problem.tensors()]
    x, w, b, ta, tb = leaves
    x2d = x.reshape(-1, x.shape[-1])
    out = reference.condlora_forward(x2d, w, b, ta, tb, problem.scaling, dropout_p, seed, problem.mode, upcast=upcast)
    grads = reference.condlora_backward(grad_y.reshape(-1, w.shape[0]).to(dtype), x2d, w, ta, tb, out.u, out.lora_a,
                                        out.lora_b, problem.scaling, dropout_p, seed, problem.mode, upcast=upcast)
    return (out.y.reshape(*x.shape[:-1], -1), grads.grad_x.reshape(x.shape), grads.grad_theta_a,
            grads.grad_theta_b, grads.grad_bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode,n,d_in,d_out,r", ODD_SHAPES + [("paper", 300, 1000, 1000, 12)])
def test_matches_reference(device, dtype, mode, n, d_in, d_out, r):
    problem = make_problem(n, d_in, d_out, r, mode=mode, dtype=dtype, device=device, leading=(2,), seed=n + r)
    x, w, b, ta, tb = problem.leaves()
    y = linear(x, w, b, ta, tb, problem.scaling, 0.0, mode)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(device, dtype)
    got = (y, *torch.autograd.grad(y, [x, ta, tb, b], grad_y))
    got = (got[0], got[1], got[2], got[3], got[4])
    ref = reference_outputs(problem, dtype, grad_y, upcast=torch.float64)
    base = reference_outputs(problem, dtype, grad_y)
    for name, out, r64, b_ in zip(("y", "dx", "dtheta_a", "dtheta_b", "db"), got, ref, base):
        assert out.dtype == dtype and out.shape == r64.shape, name
        ok, msg = check_close(out, r64, b_, name)
        assert ok, msg


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 7, 7), ("general", 6, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(device, mode, d_in, d_out, bias):
    problem = make_problem(5, d_in, d_out, 3, mode=mode, dtype=torch.float64, device=device, leading=(2,), seed=3,
                           bias=bias)
    x, w, b, ta, tb = problem.leaves(bias)
    if bias:
        fn, args = (lambda x, b, ta, tb: linear(x, w, b, ta, tb, 1.5, 0.0, mode)), (x, b, ta, tb)  # noqa: E731
    else:
        fn, args = (lambda x, ta, tb: linear(x, w, None, ta, tb, 1.5, 0.0, mode)), (x, ta, tb)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6)
    # a frozen bias, or only some inputs requiring grad: the gradients asked for, in the right places
    y = linear(x, w, None if b is None else b.detach(), ta.detach(), tb, 1.5, 0.0, mode)
    grad_x, grad_tb = torch.autograd.grad(y.sum(), [x, tb])
    want = torch.autograd.grad(reference.condlora_forward(x.reshape(-1, d_in), w, None if b is None else b.detach(),
                                                          ta.detach(), tb, 1.5, mode=mode).y.sum(), [x, tb])
    torch.testing.assert_close(grad_x, want[0])
    torch.testing.assert_close(grad_tb, want[1])


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_with_dropout(device):
    """A fixed torch seed makes the drawn dropout seed, hence the mask, a deterministic function."""
    problem = make_problem(6, 8, 8, 2, dtype=torch.float64, device=device, mode="paper", seed=4)
    x, w, b, ta, tb = problem.leaves()

    def fn(x, b, ta, tb):
        torch.manual_seed(11)
        return linear(x, w, b, ta, tb, 0.75, 0.4, "paper")

    assert torch.autograd.gradcheck(fn, (x, b, ta, tb), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_matches_reference_mask(device):
    problem = make_problem(9, 16, 16, 2, dtype=torch.float64, device=device, mode="paper", seed=5)
    x, w, b, ta, tb = problem.leaves()
    torch.manual_seed(123)
    y = linear(x, w, b, ta, tb, 2.0, 0.3, "paper")
    torch.manual_seed(123)
    seed = torch.ops.condlora_C.draw_seed.default(x)
    want = reference.condlora_forward(x, w, b, ta, tb, 2.0, 0.3, seed, "paper").y
    torch.testing.assert_close(y, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode,n,d", [("paper", 33, 24), ("paper", 65, 1000)])
def test_float32_masters_under_autocast(device, mode, n, d):
    """Under autocast the op takes float32 W0, b and generators as F.linear would, rounding them to the autocast
    dtype; the generators' gradients come back in float32."""
    dtype = torch.bfloat16
    problem = make_problem(n, d, d, 4, mode=mode, dtype=torch.float32, device=device, seed=9)
    x, w, b, ta, tb = problem.leaves()
    with torch.autocast(device, dtype=dtype):
        y = linear(x, w, b, ta, tb, problem.scaling, 0.0, mode)
    assert y.dtype == dtype
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    dx, dta, dtb, db = torch.autograd.grad(y, [x, ta, tb, b], grad_y)
    assert (dx.dtype, dta.dtype, dtb.dtype, db.dtype) == (torch.float32,) * 4
    ref = reference_outputs(problem, dtype, grad_y, upcast=torch.float64)
    base = reference_outputs(problem, dtype, grad_y)
    for name, out, r64, b_ in zip(("y", "dx", "dtheta_a", "dtheta_b", "db"), (y, dx, dta, dtb, db), ref, base):
        # the float32 masters give A, B and dtheta in float32, at least as accurate as the all-bf16 reference
        ok, msg = check_close(out.to(dtype), r64, b_, name)
        assert ok, msg


@pytest.mark.parametrize("device", DEVICES)
def test_inference_mode_and_no_grad(device):
    problem = make_problem(10, 12, 12, 2, mode="paper", device=device)
    x, w, b, ta, tb = problem.tensors()
    want = reference.condlora_forward(x, w, b, ta, tb, problem.scaling, mode="paper").y
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w, b, ta, tb, problem.scaling), want)
    with torch.no_grad():
        y = linear(x, w, b, ta.requires_grad_(), tb, problem.scaling)
    assert y.grad_fn is None
    torch.testing.assert_close(y, want)


def test_errors():
    problem = make_problem(4, 8, 8, 2, mode="paper")
    with pytest.raises(ValueError, match=r"weight requires grad"):
        linear(problem.x, problem.weight.clone().requires_grad_(), *problem.tensors()[2:], 1.0)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    problem = make_problem(6, 8, 8, 2, mode="paper", device=device)
    x, w, b, ta, tb = problem.leaves()
    torch.library.opcheck(torch.ops.condlora_C.linear.default, (x, w, b, ta, tb, 1.5, 0.0, "paper"))
    torch.library.opcheck(torch.ops.condlora_C.linear.default, (x, w, b, ta, tb, 1.5, 0.2, "paper"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # the inner ops are opaque to autograd (linear's C++ Function drives them): checked on plain tensors
    x2, b, ta2, tb2 = problem.x.reshape(-1, 8), problem.bias, problem.theta_a, problem.theta_b
    for dtype in (torch.float32, torch.float16):
        torch.library.opcheck(torch.ops.condlora_C.prepare.default, (w, ta2, tb2, dtype, "paper"))
    _, lora_a, lora_b = torch.ops.condlora_C.prepare.default(w, ta2, tb2, torch.float32, "paper")
    torch.library.opcheck(torch.ops.condlora_C.forward_ab.default, (x2, w, b, lora_a, lora_b, 1.5, 0.0, None))
    y, u = torch.ops.condlora_C.forward_ab.default(x2, w, b, lora_a, lora_b, 1.5, 0.0, None)
    for stack in (False, True):
        torch.library.opcheck(torch.ops.condlora_C.backward_ab.default,
                              (torch.randn_like(y), x2, w, u, lora_a, lora_b, 1.5, 0.0, None, "paper", torch.float32,
                               [True, True, True, True], stack))
    # a float32 master weight of a half-precision x (recompute_weight_cast), rounded inside
    x16, (w16, a16, b16) = x2.half(), torch.ops.condlora_C.prepare.default(w, ta2, tb2, torch.float16, "paper")
    y16, u16 = torch.ops.condlora_C.forward_ab.default(x16, w16, b, a16, b16, 1.5, 0.0, None)
    torch.library.opcheck(torch.ops.condlora_C.backward_ab.default,
                          (torch.randn_like(y16), x16, w, u16, a16, b16, 1.5, 0.0, None, "paper", torch.float32,
                           [True, True, True, False], True))
    for x_in in (x2, x2.half()):  # weight in x's dtype, and float32 masters of a half-precision x
        torch.library.opcheck(torch.ops.condlora_C.prepare_forward.default,
                              (x_in, w, b, ta2, tb2, 1.5, 0.0, None, "paper"))
    torch.library.opcheck(torch.ops.condlora_C.draw_seed.default, (x2,), test_utils=("test_schema",
                                                                                    "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("mode,d_in,d_out,r", [("paper", 40, 40, 4), ("general", 24, 40, 3), ("paper", 768, 768, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_prepare_forward_is_prepare_then_forward_ab(device, x_dtype, w_dtype, mode, d_in, d_out, r, bias):
    """prepare_forward, the op linear() calls, returns bit for bit what prepare and forward_ab return one after the
    other: the same kernels on the same inputs (float32 masters of a half-precision x included)."""
    problem = make_problem(37, d_in, d_out, r, mode=mode, dtype=torch.float32, device=device, seed=d_in + r,
                           bias=bias)
    x = problem.x.detach().reshape(-1, d_in).to(x_dtype)
    w, b = problem.weight.to(w_dtype), problem.bias.to(w_dtype) if bias else None
    ta, tb = problem.theta_a.detach(), problem.theta_b.detach()
    weight_cast, lora_a, lora_b = torch.ops.condlora_C.prepare.default(w, ta, tb, x_dtype, mode)
    y, u = torch.ops.condlora_C.forward_ab.default(x, weight_cast if w_dtype != x_dtype else w, b, lora_a, lora_b,
                                                   1.5, 0.0, None)
    got = torch.ops.condlora_C.prepare_forward.default(x, w, b, ta, tb, 1.5, 0.0, None, mode)
    for name, a, b_ in zip(("y", "u", "weight_cast", "lora_a", "lora_b"), got, (y, u, weight_cast, lora_a, lora_b)):
        assert a.dtype == b_.dtype and a.shape == b_.shape and torch.equal(a, b_), name
    assert (got[2].numel() == 0) == (w_dtype == x_dtype)  # the rounding comes back only where there was one


@pytest.mark.parametrize("device", DEVICES)
def test_prepare_forward_names_bad_arguments(device):
    problem = make_problem(6, 8, 8, 2, mode="paper", device=device)
    x, w, b, ta, tb = (t.detach() for t in problem.leaves())
    x2 = x.reshape(-1, 8)
    op = torch.ops.condlora_C.prepare_forward.default
    with pytest.raises(ValueError, match=r"x must be 2-D \(N, d_in\) with d_in=8"):
        op(x2[:, :5], w, b, ta, tb, 1.0, 0.0, None, "paper")
    with pytest.raises(TypeError, match="weight has dtype torch.float64 but x has dtype torch.float32"):
        op(x2, w.double(), b, ta, tb, 1.0, 0.0, None, "paper")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        op(x2, w, b[:3], ta, tb, 1.0, 0.0, None, "paper")
    with pytest.raises(ValueError, match="seed must be given when dropout_p > 0"):
        op(x2, w, b, ta, tb, 1.0, 0.1, None, "paper")
    with pytest.raises(ValueError, match=r"theta_a must have shape \(2, 8\)"):
        op(x2, w, b, ta[:, :3], tb, 1.0, 0.0, None, "paper")
    if device == "cuda":  # (the dispatcher picks the kernel by x's device; a meta weight would pick the fake)
        with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
            op(x2, w.cpu(), b, ta.cpu(), tb.cpu(), 1.0, 0.0, None, "paper")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_ab_stacks_the_theta_gradients_on_request(device):
    """stack_theta_grads: [dtheta_a; dtheta_b] in one (2r, d_in) output, bit for bit the two outputs it replaces;
    refused where one GEMM does not compute both (general mode, or one gradient not asked for)."""
    problem = make_problem(6, 8, 8, 2, mode="paper", device=device)
    x, w, b, ta, tb = (t.detach() for t in problem.leaves())
    x2 = x.reshape(-1, 8)
    _, lora_a, lora_b = torch.ops.condlora_C.prepare.default(w, ta, tb, torch.float32, "paper")
    y, u = torch.ops.condlora_C.forward_ab.default(x2, w, b, lora_a, lora_b, 1.5, 0.0, None)
    args = (torch.randn_like(y), x2, w, u, lora_a, lora_b, 1.5, 0.0, None, "paper", torch.float32)
    needs = [True, True, True, False]
    gx, gta, gtb, _ = torch.ops.condlora_C.backward_ab.default(*args, needs)
    sx, stacked, empty, _ = torch.ops.condlora_C.backward_ab.default(*args, needs, True)
    assert stacked.shape == (4, 8) and empty.numel() == 0
    assert torch.equal(stacked, torch.cat([gta, gtb])) and torch.equal(sx, gx)
    with pytest.raises(ValueError, match="stack_theta_grads needs mode='paper' and both theta gradients"):
        torch.ops.condlora_C.backward_ab.default(*args, [True, True, False, False], True)
    with pytest.raises(ValueError, match="stack_theta_grads needs mode='paper'"):
        torch.ops.condlora_C.backward_ab.default(*args[:-2], "general", torch.float32, needs, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 40, 40), ("general", 24, 40)])
def test_backward_ab_rounds_a_float32_master(device, x_dtype, mode, d_in, d_out):
    """backward_ab takes the float32 master that recompute_weight_cast keeps and rounds it itself: bit for bit
    the gradients of the master rounded before the call (to nearest even, as prepare rounds it). Any other weight
    dtype is refused with both dtypes named."""
    problem = make_problem(37, d_in, d_out, 3, mode=mode, dtype=torch.float32, device=device, seed=d_in)
    x = problem.x.detach().reshape(-1, d_in).to(x_dtype)
    w, ta, tb = problem.weight.detach(), problem.theta_a.detach(), problem.theta_b.detach()
    y, u, weight_cast, lora_a, lora_b = torch.ops.condlora_C.prepare_forward.default(x, w, None, ta, tb, 1.5, 0.0,
                                                                                      None, mode)
    assert torch.equal(weight_cast, w.to(x_dtype))
    needs = [True, True, True, False]
    args = (torch.randn_like(y), x)
    rest = (u, lora_a, lora_b, 1.5, 0.0, None, mode, torch.float32, needs)
    from_master = torch.ops.condlora_C.backward_ab.default(*args, w, *rest)
    from_rounded = torch.ops.condlora_C.backward_ab.default(*args, weight_cast, *rest)
    for name, a, b_ in zip(("dx", "dtheta_a", "dtheta_b"), from_master, from_rounded):
        assert a.dtype == b_.dtype and torch.equal(a, b_), name
    with pytest.raises(TypeError, match=f"weight has dtype torch.float64 but x has dtype {x_dtype}"):
        torch.ops.condlora_C.backward_ab.default(*args, w.double(), *rest)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_matches_eager_with_dropout(device):
    """The compiled layer draws the same dropout seed as eager (issue #13: draw_seed is kept by Inductor), so
    outputs and gradients agree."""
    torch.manual_seed(0)
    layer = FusedCondLoRALinear(16, 16, r=4, dropout=0.25, device=device)
    with torch.no_grad():
        layer.generator.theta_b.normal_()
    x = torch.randn(3, 5, 16, device=device)

    def step(fn):
        torch.manual_seed(42)
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.square().sum().backward()
        grads = (xi.grad, layer.generator.theta_a.grad.clone(), layer.generator.theta_b.grad.clone())
        layer.zero_grad(set_to_none=True)
        return y.detach(), grads

    y_eager, g_eager = step(layer)
    compiled = torch.compile(layer, fullgraph=True)
    y_comp, g_comp = step(compiled)
    torch.testing.assert_close(y_comp, y_eager)
    for a, b_ in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b_)


def test_compiling_before_any_eager_call_compiles_once(monkeypatch):
    """The backend choice is remembered for eager calls only: a graph traced before any eager call must not guard
    on that memory, or the first eager call would make it recompile."""
    from condlora_kernels.ops import backends

    monkeypatch.setattr(backends, "_RESOLVED", {})
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    layer = FusedCondLoRALinear(8, 8, r=2)
    compiled = torch.compile(layer, backend=counter)
    x = torch.randn(3, 8)
    compiled(x)
    layer(x)  # eager: fills the memory
    compiled(x)
    assert counter.frame_count == 1


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and the extension's CUDA kernels")
@pytest.mark.parametrize("d,r", [(768, 8), (1000, 12), (96, 16)])
def test_gpu_cuda_graph_capture_matches_reference(d, r):
    """Inside a CUDA graph capture `prepare` takes the cuBLAS path, outside it the fused kernel (linear.cpp): both
    paths, paper mode, bf16 autocast over float32 masters as a model runs, against the reference."""
    dtype = torch.bfloat16
    problem = make_problem(257, d, d, r, mode="paper", dtype=torch.float32, device="cuda", seed=d + r)
    x, w, b, ta, tb = problem.leaves()
    grad_y = torch.randn(257, d, generator=torch.Generator().manual_seed(2)).to("cuda", dtype)

    def step():
        with torch.autocast("cuda", dtype=dtype):
            y = linear(x, w, b, ta, tb, problem.scaling, 0.0, "paper")
        return (y, *torch.autograd.grad(y, [x, ta, tb, b], grad_y))

    graph, eager, captured = capture_cuda_graph(step, warmup=1)
    graph.replay()
    torch.cuda.synchronize()
    ref = reference_outputs(problem, dtype, grad_y, upcast=torch.float64)
    base = reference_outputs(problem, dtype, grad_y)
    for name, got_eager, got_graph, r64, b_ in zip(("y", "dx", "dtheta_a", "dtheta_b", "db"), eager, captured, ref,
                                                   base):
        for path, out in (("eager", got_eager), ("graph", got_graph)):
            ok, msg = check_close(out.to(dtype), r64, b_, f"{name} ({path})")
            assert ok, msg
