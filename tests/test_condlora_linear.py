"""The functional op and its autograd Function (reference backend): gradcheck, shapes, dropout, autocast."""

import pytest
import torch

from condlora_kernels import condlora_linear, reference
from condlora_kernels.ops.condlora_linear import CondLoRALinearFunction
from condlora_kernels.testing import make_problem

F64 = torch.float64




@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 10, 10), ("general", 9, 13)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("leading", [(), (2, 3)])
def test_gradcheck_float64(mode, d_in, d_out, bias, leading):
    problem = make_problem(5, d_in, d_out, 3, mode=mode, bias=bias, dtype=F64, leading=leading, seed=2)
    x, w, b, ta, tb = problem.leaves(bias)

    def fn(x, b, ta, tb):
        return condlora_linear(x, w, b, ta, tb, 1.5, mode=mode, backend="reference")

    assert torch.autograd.gradcheck(fn, (x, b, ta, tb), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("mode,d_in,d_out", [("paper", 8, 8), ("general", 7, 11)])
def test_gradcheck_with_dropout_fixed_seed(mode, d_in, d_out):
    """With a fixed seed the dropout mask is a deterministic function, so gradcheck applies to the Function."""
    problem = make_problem(6, d_in, d_out, 2, mode=mode, dtype=F64, seed=4)
    x, w, b, ta, tb = problem.leaves()
    seed = torch.tensor([2024], dtype=torch.int64)

    def fn(x, b, ta, tb):
        return CondLoRALinearFunction.apply(x, w, b, ta, tb, 0.75, 0.4, seed, mode, "reference")

    assert torch.autograd.gradcheck(fn, (x, b, ta, tb), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_output_shape_and_leading_dims():
    p = make_problem(4, 6, 10, 2, mode="general", leading=(3, 2))
    y = condlora_linear(*p.tensors(), p.scaling, mode="general", backend="reference")
    assert y.shape == (3, 2, 4, 10)
    y1 = condlora_linear(p.x[0, 0, 0], *p.tensors()[1:], p.scaling, mode="general", backend="reference")
    assert y1.shape == (10,)
    torch.testing.assert_close(y1, y[0, 0, 0])


def test_matches_reference_forward():
    p = make_problem(9, 12, 12, 3, mode="paper", dtype=F64)
    y = condlora_linear(*p.tensors(), p.scaling, mode="paper", backend="reference")
    want = reference.condlora_forward(p.x, p.weight, p.bias, p.theta_a, p.theta_b, p.scaling, mode="paper").y
    torch.testing.assert_close(y, want)


def test_non_contiguous_input():
    p = make_problem(8, 12, 12, 3, mode="paper", dtype=F64)
    xt = p.x.t().contiguous().t()  # same values, transposed strides
    assert not xt.is_contiguous()
    y = condlora_linear(xt, *p.tensors()[1:], p.scaling, mode="paper", backend="reference")
    torch.testing.assert_close(y, condlora_linear(*p.tensors(), p.scaling, mode="paper", backend="reference"))


def test_dropout_reproducible_under_manual_seed_and_only_on_low_rank_path():
    p = make_problem(16, 12, 12, 3, mode="paper", dtype=F64)
    torch.manual_seed(7)
    y1 = condlora_linear(*p.tensors(), p.scaling, dropout_p=0.5, mode="paper", backend="reference")
    torch.manual_seed(7)
    y2 = condlora_linear(*p.tensors(), p.scaling, dropout_p=0.5, mode="paper", backend="reference")
    y3 = condlora_linear(*p.tensors(), p.scaling, dropout_p=0.5, mode="paper", backend="reference")
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.equal(y1, y3)
    # with B = 0 (theta_b = 0) the low-rank path vanishes and dropout must not touch the frozen matmul
    y0 = condlora_linear(p.x, p.weight, p.bias, p.theta_a, torch.zeros_like(p.theta_b), p.scaling, dropout_p=0.5,
                         mode="paper", backend="reference")
    torch.testing.assert_close(y0, torch.nn.functional.linear(p.x, p.weight, p.bias))


def test_nan_in_nan_out():
    p = make_problem(5, 8, 8, 2, mode="paper")
    x = p.x.clone()
    x[2, 3] = float("nan")
    y = condlora_linear(x, *p.tensors()[1:], p.scaling, mode="paper", backend="reference")
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("leading", [(0,), (3, 0)])
def test_empty_batch(leading):
    p = make_problem(0, 8, 6, 2, mode="general", leading=leading[:-1])
    x, w, b, ta, tb = p.leaves()
    y = condlora_linear(x, w, b, ta, tb, p.scaling, mode="general", backend="reference")
    assert y.shape == (*leading, 6)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(ta.grad) == 0 and torch.count_nonzero(tb.grad) == 0


def test_gradients_only_where_required():
    p = make_problem(5, 8, 8, 2, mode="paper")
    ta = p.theta_a.clone().requires_grad_(True)
    y = condlora_linear(p.x, p.weight, p.bias, ta, p.theta_b, p.scaling, backend="reference")
    y.sum().backward()
    assert ta.grad is not None and ta.grad.abs().sum() > 0


def test_autocast_casts_to_autocast_dtype():
    p = make_problem(5, 8, 8, 2, mode="paper")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = condlora_linear(*p.tensors(), p.scaling, backend="reference")
    assert y.dtype == torch.bfloat16
