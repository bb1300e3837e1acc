"""CondLoRAGenerator and FusedCondLoRALinear: drop-in behaviour, initialisation, merge/unmerge, training."""

import copy
import math

import pytest
import torch
from torch import nn

from condlora_kernels import (CondLoRAGenerator, FusedCondLoRALinear, apply_condlora, available_backends,
                              condlora_linear, reference)
from condlora_kernels.testing import assert_close


def test_generator_init_as_paper_code():
    torch.manual_seed(0)
    g = CondLoRAGenerator(16, 16, r=4, mode="paper")
    assert torch.count_nonzero(g.theta_b) == 0
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on fan_in=16
    assert g.theta_a.abs().max() <= bound and g.theta_a.std() > bound / 4
    gg = CondLoRAGenerator(6, 10, r=3, mode="general")
    assert gg.theta_a.shape == (3, 10) and gg.theta_b.shape == (3, 6)


@pytest.mark.parametrize("shape", [(12, 12), (7, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_equals_frozen_layer_at_init(shape, bias):
    lin = nn.Linear(*shape, bias=bias)
    layer = FusedCondLoRALinear.from_linear(lin, r=4, alpha=8, backend="reference")
    x = torch.randn(3, 5, shape[0])
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)
    assert layer.weight is lin.weight and not layer.weight.requires_grad
    assert (layer.in_features, layer.out_features) == (lin.in_features, lin.out_features)
    assert layer.mode == ("paper" if shape[0] == shape[1] else "general")


def test_constructor_like_nn_linear():
    layer = FusedCondLoRALinear(9, 5, bias=False, r=2, backend="reference")
    assert layer.bias is None and layer.weight.shape == (5, 9) and not layer.weight.requires_grad
    assert layer(torch.randn(4, 9)).shape == (4, 5)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["generator.theta_a", "generator.theta_b"]


def test_training_step_moves_only_theta():
    torch.manual_seed(1)
    lin = nn.Linear(8, 8)
    layer = FusedCondLoRALinear.from_linear(lin, r=2, dropout=0.1, backend="reference")
    w0 = layer.weight.detach().clone()
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # two steps: theta_b leaves zero, then theta_a gets a gradient too
        opt.zero_grad()
        layer(torch.randn(6, 8)).pow(2).sum().backward()
        opt.step()
    assert torch.equal(layer.weight, w0) and layer.weight.grad is None
    assert torch.count_nonzero(layer.generator.theta_b) > 0


def test_dropout_only_in_training():
    lin = nn.Linear(8, 8)
    layer = FusedCondLoRALinear.from_linear(lin, r=2, dropout=0.5, backend="reference")
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(4, 8)
    layer.eval()  # no dropout and no rescaling: exactly the op without dropout
    no_dropout = condlora_linear(x, layer.weight, layer.bias, layer.generator.theta_a, layer.generator.theta_b,
                                 layer.scaling, dropout_p=0.0, mode=layer.mode, backend="reference")
    torch.testing.assert_close(layer(x), no_dropout, rtol=0, atol=0)
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_exact(dtype):
    lin = nn.Linear(10, 10).to(dtype)
    layer = FusedCondLoRALinear.from_linear(lin, r=3, alpha=6, backend="reference").eval()
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(5, 10, dtype=dtype)
    before = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged and not torch.equal(layer.weight, w0)
    merged_out = layer(x)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(merged_out, before, rtol=tol, atol=tol)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)  # bit for bit
    torch.testing.assert_close(layer(x), before, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_to_linear_matches_module():
    lin = nn.Linear(6, 9)
    layer = FusedCondLoRALinear.from_linear(lin, r=2, backend="reference")
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(4, 6)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-5, atol=1e-5)


def test_shared_generator_and_extra_repr():
    g = CondLoRAGenerator(8, 8, r=2)
    a = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, generator=g, backend="reference")
    b = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, generator=g, backend="reference")
    model = nn.Sequential(a, b)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * 2 * 8
    text = repr(a)
    for field in ("in_features=8", "r=2", "alpha=8", "scaling=4", "mode=paper", "merged=False"):
        assert field in text
    with pytest.raises(ValueError, match="does not fit this layer"):
        FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=4, generator=g)


def test_half_precision_layers_keep_float32_generators():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8).to(torch.bfloat16), r=2, backend="reference")
    assert layer.generator.theta_a.dtype == torch.float32
    y = layer(torch.randn(3, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.generator.theta_a.grad.dtype == torch.float32


def test_generator_forward_is_reference():
    g = CondLoRAGenerator(6, 9, r=2, mode="general")
    nn.init.normal_(g.theta_b)
    w = torch.randn(9, 6)
    a, b = g(w)
    ra, rb = reference.generate_lora_weights(w, g.theta_a, g.theta_b, "general")
    torch.testing.assert_close(a, ra)
    torch.testing.assert_close(b, rb)


def test_standalone_layer_owns_its_generator():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="reference")
    assert layer.owns_generator and layer.generator_key is None
    assert sorted(k for k in layer.state_dict() if "theta" in k) == ["generator.theta_a", "generator.theta_b"]
    shared = CondLoRAGenerator(8, 8, r=2)
    layer.use_shared_generator(shared, "proj")
    assert layer.generator is shared and not layer.owns_generator and layer.generator_key == "proj"
    assert not any("theta" in k for k in layer.state_dict())
    with pytest.raises(ValueError, match="does not fit"):
        layer.use_shared_generator(CondLoRAGenerator(8, 8, r=4), "proj")
    with pytest.raises(TypeError, match="CondLoRAGenerator"):
        layer.use_shared_generator(nn.Linear(8, 2), "proj")


def test_half_cast_of_a_layer_keeps_the_generator_float32():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="reference")
    nn.init.normal_(layer.generator.theta_b)
    theta_b = layer.generator.theta_b.detach().clone()
    layer.half()
    assert layer.weight.dtype == torch.float16 and layer.generator.theta_b.dtype == torch.float32
    assert torch.equal(layer.generator.theta_b, theta_b)
    assert layer(torch.randn(3, 8, dtype=torch.float16)).dtype == torch.float16
    g = CondLoRAGenerator(4, 4, r=2).to(torch.bfloat16)
    assert g.theta_a.dtype == torch.float32
    assert CondLoRAGenerator(4, 4, r=2).double().theta_a.dtype == torch.float64


def test_from_linear_keeps_eval_mode():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8).eval(), r=2, dropout=0.5, backend="reference")
    assert not layer.training and not layer.generator.training


@pytest.mark.parametrize("bad", [dict(r=0), dict(alpha=-1.0), dict(dropout=1.5), dict(mode="square"),
                                 dict(backend="fast"), dict(recompute_weight_cast="yes"),
                                 dict(generator=CondLoRAGenerator(4, 4, 2, "paper"))])
def test_from_linear_that_fails_leaves_the_layer_as_it_was(bad):
    """Every argument is checked before the layer's weight and bias are frozen."""
    linear = nn.Linear(8, 8)
    with pytest.raises((TypeError, ValueError)):
        FusedCondLoRALinear.from_linear(linear, **bad)
    assert linear.weight.requires_grad and linear.bias.requires_grad


def test_merge_and_to_linear_check_a_given_merged_weight():
    torch.manual_seed(0)
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 6), r=2)
    before = layer.weight.detach().clone()
    for bad, error, match in [(5, TypeError, "merged_weight must be a torch.Tensor"),
                              (torch.randn(6), ValueError, r"shape \(6, 8\).*got shape \(6,\)"),
                              (torch.randn(3, 3), ValueError, r"got shape \(3, 3\)"),
                              (torch.randn(6, 8, dtype=torch.float64), ValueError, "dtype torch.float64"),
                              (torch.randint(0, 3, (6, 8)), ValueError, "dtype torch.int64")]:
        with pytest.raises(error, match=match):
            layer.merge(bad)
        with pytest.raises(error, match=match):
            layer.to_linear(bad)
    assert not layer.merged and layer._unmerged_weight is None and torch.equal(layer.weight, before)
    good = layer.merged_weight()
    assert torch.equal(layer.to_linear(good).weight, good)
    layer.merge(good)
    assert layer.merged and torch.equal(layer.weight, good)



# --------------------------------------------------------------------------------------------------
# The module and an adapted model on each backend this machine runs, against the reference
# --------------------------------------------------------------------------------------------------

CPU_BACKENDS = [name for name, reason in available_backends("cpu", torch.float64).items() if reason is None]


class TwoLayers(nn.Module):
    """Two square layers of one module type: apply_condlora gives them one shared generator."""

    def __init__(self, d=7):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(d, d)}) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = torch.tanh(block["proj"](x))
        return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_gradcheck_float64(backend, bias):
    """The module's gradients wrt x and both generators (general mode, odd sizes), through the module's own call."""
    torch.manual_seed(0)
    layer = FusedCondLoRALinear.from_linear(nn.Linear(5, 7, bias=bias).double(), r=3, alpha=5, backend=backend)
    nn.init.normal_(layer.generator.theta_b)

    def fn(x, theta_a, theta_b):
        return torch.func.functional_call(layer, {"generator.theta_a": theta_a, "generator.theta_b": theta_b}, (x,))

    args = (torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True),
            layer.generator.theta_a.detach().clone().requires_grad_(True),
            layer.generator.theta_b.detach().clone().requires_grad_(True))
    # the Triton interpreter runs a kernel per call: gradcheck's fast mode (a random projection) keeps it short
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_shared_generator_model_gradcheck_float64(backend):
    """apply_condlora on two layers of one type: one generator, its gradient summed over both layers (paper mode)."""
    torch.manual_seed(0)
    model = apply_condlora(TwoLayers().double(), ["proj"], r=2, alpha=3, backend=backend)
    (key,) = model.condlora_generators.keys()
    generator = model.condlora_generators[key]
    nn.init.normal_(generator.theta_b)
    names = (f"condlora_generators.{key}.theta_a", f"condlora_generators.{key}.theta_b")

    def fn(x, theta_a, theta_b):
        return torch.func.functional_call(model, dict(zip(names, (theta_a, theta_b))), (x,))

    args = (torch.randn(3, 7, dtype=torch.float64, requires_grad=True),
            generator.theta_a.detach().clone().requires_grad_(True),
            generator.theta_b.detach().clone().requires_grad_(True))
    # the Triton interpreter runs a kernel per call: gradcheck's fast mode (a random projection) keeps it short
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend, dtype", [
    (name, dtype) for dtype in (torch.float32, torch.bfloat16)
    for name, reason in available_backends("cpu", dtype).items() if reason is None and name != "reference"])
def test_adapted_model_matches_the_reference(backend, dtype):
    """Outputs and gradients (x, the shared generator) of an adapted model on a fast backend, against float64, with
    the error bound of the same model on the reference backend in the same dtype (testing.py's rule)."""
    torch.manual_seed(0)
    base = TwoLayers(d=33)
    x0 = torch.randn(5, 33)

    def run(backend_name, run_dtype):
        model = apply_condlora(copy.deepcopy(base), ["proj"], r=4, alpha=8, backend=backend_name)
        torch.manual_seed(1)
        for generator in model.condlora_generators.values():
            nn.init.normal_(generator.theta_b, std=0.3)
        model = model.to(run_dtype)
        x = x0.to(run_dtype).requires_grad_(True)
        y = model(x)
        y.backward(torch.ones_like(y))
        (generator,) = model.condlora_generators.values()
        return y, x.grad, generator.theta_a.grad, generator.theta_b.grad

    want = run("reference", torch.float64)
    baseline = run("reference", dtype)
    for name, got, ref64, same in zip(("y", "dx", "dtheta_a", "dtheta_b"), run(backend, dtype), want, baseline):
        assert_close(got, ref64, same, name)
