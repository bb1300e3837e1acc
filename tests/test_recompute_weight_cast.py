"""`recompute_weight_cast` (docs/design.md §4): a float32 W0 in a half-precision step is kept as it is from forward
to backward and rounded again in the backward, instead of its rounding being kept. Same results bit for bit as the
default on every backend (dropout included), compiled too; the master, not a copy, is what the layer saves; on a
GPU, the memory held between forward and backward is smaller by the rounded copy."""

import copy

import pytest
import torch

from condlora_kernels import (FusedCondLoRALinear, apply_condlora, available_backends, condlora_layers,
                              condlora_linear, set_recompute_weight_cast)
from condlora_kernels.testing import compiled_saved_tensors
from tests.conftest import HAS_CUDA, requires_cuda

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
CASES = [(device, backend) for device in DEVICES
         for backend, reason in available_backends(device, torch.bfloat16).items() if reason is None]
D_IN, D_OUT = 48, 40  # general mode (paper mode needs a square W0)


class TwoLayers(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.first, self.second = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def make_layer(device, backend, recompute, mode="general", d_in=D_IN, d_out=D_OUT, dropout=0.0, dtype=None):
    torch.manual_seed(3)
    linear = torch.nn.Linear(d_in, d_out, device=device, dtype=dtype)
    layer = FusedCondLoRALinear.from_linear(linear, r=4, dropout=dropout, mode=mode, backend=backend,
                                            recompute_weight_cast=recompute)
    for p in layer.generator.parameters():
        torch.nn.init.normal_(p, std=0.1)  # theta_b starts at zero: make the low-rank path count
    return layer


def step(layer, device, half=torch.bfloat16, n=37):
    """(y, dx, dtheta_a, dtheta_b) of one forward+backward under autocast, x and grad_y fixed by seeds."""
    torch.manual_seed(5)  # x, grad_y and the dropout seed
    x = torch.randn(n, layer.in_features, device=device, requires_grad=True)
    with torch.autocast(device, dtype=half):
        y = layer(x)
    y.backward(torch.randn(y.shape, device=device, dtype=y.dtype))
    return y.detach(), x.grad, layer.generator.theta_a.grad, layer.generator.theta_b.grad


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("mode,d_in,d_out", [("general", D_IN, D_OUT), ("paper", 40, 40)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_same_results_bit_for_bit(device, backend, mode, d_in, d_out, dropout):
    halves = [torch.bfloat16] + ([torch.float16] if device == "cuda" else [])
    for half in halves:
        outputs = [step(make_layer(device, backend, recompute, mode, d_in, d_out, dropout).train(), device, half)
                   for recompute in (False, True)]
        for name, a, b in zip(("y", "dx", "dtheta_a", "dtheta_b"), *outputs):
            assert a.dtype == b.dtype and torch.equal(a, b), f"{name} ({half}) differs with recompute_weight_cast"


def saved_tensors(layer, x, autocast=True):
    """(y, every tensor the layer's forward saves for its backward): saved_tensors_hooks see the C++ op's too."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
    return y, saved


@pytest.mark.parametrize("device,backend", CASES)
def test_the_master_is_saved_instead_of_its_rounding(device, backend):
    weight_like = lambda saved: [t for t in saved if tuple(t.shape) == (D_OUT, D_IN)]  # noqa: E731
    x = torch.randn(9, D_IN, device=device, requires_grad=True)
    default = weight_like(saved_tensors(make_layer(device, backend, False), x)[1])
    assert [t.dtype for t in default] == [torch.bfloat16]
    layer = make_layer(device, backend, True)
    kept = weight_like(saved_tensors(layer, x)[1])
    assert [t.dtype for t in kept] == [torch.float32]
    assert kept[0].data_ptr() == layer.weight.data_ptr()  # the parameter itself: no memory of its own


@pytest.mark.parametrize("device,backend", CASES)
def test_no_effect_when_the_weight_is_in_the_compute_dtype(device, backend):
    layer = make_layer(device, backend, True, dtype=torch.bfloat16)
    x = torch.randn(9, D_IN, device=device, dtype=torch.bfloat16, requires_grad=True)
    y, saved = saved_tensors(layer, x, autocast=False)
    kept = [t for t in saved if tuple(t.shape) == (D_OUT, D_IN)]
    assert len(kept) == 1 and kept[0].data_ptr() == layer.weight.data_ptr()
    y.sum().backward()
    assert x.grad is not None and layer.generator.theta_b.grad is not None


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("mode,d_in,d_out", [("general", D_IN, D_OUT), ("paper", 40, 40)])
def test_an_x_that_needs_no_gradient_keeps_the_master(device, backend, mode, d_in, d_out):
    """Without the setting too, a layer whose x needs no gradient (the first layer after frozen embeddings) keeps
    the master, not its rounding: no dx GEMM needs it. The generators' gradients are those of the same layer and
    inputs with an x that needs a gradient, bit for bit."""
    grads = {}
    for x_needs_grad in (True, False):
        layer = make_layer(device, backend, False, mode, d_in, d_out)
        torch.manual_seed(5)
        x = torch.randn(37, d_in, device=device, requires_grad=x_needs_grad)
        y, saved = saved_tensors(layer, x)
        kept = [t for t in saved if tuple(t.shape) == (d_out, d_in)]
        if x_needs_grad:
            assert [t.dtype for t in kept] == [torch.bfloat16]
        else:
            assert [t.dtype for t in kept] == [torch.float32]
            assert kept[0].data_ptr() == layer.weight.data_ptr()  # the parameter itself
        y.backward(torch.randn(y.shape, device=device, dtype=y.dtype, generator=torch.Generator(device).manual_seed(7)))
        grads[x_needs_grad] = (y.detach(), layer.generator.theta_a.grad, layer.generator.theta_b.grad)
    for name, a, b in zip(("y", "dtheta_a", "dtheta_b"), grads[True], grads[False]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_step_keeps_the_master_where_x_needs_no_gradient(backend):
    """What Inductor's partitioner keeps from forward to backward (the partition only, on CPU tensors: it is the
    GPU run's at the same shapes): of two stacked layers, the first, whose input needs no gradient, keeps its
    float32 W0 itself, the second the bf16 rounding; with recompute_weight_cast both keep the float32 W0. PEFT
    LoRA's F.linear keeps no weight for the first (benchmarks/NOTES.md, eleventh session). Both routes: the
    extension's op (cpu) and the Python autograd Function (reference, as triton), whose backward rounds the master
    through an op the compiler cannot merge with the forward's rounding."""
    if available_backends("cpu", torch.bfloat16)[backend] is not None:
        pytest.skip(available_backends("cpu", torch.bfloat16)[backend])
    for recompute in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TwoLayers(24)
        apply_condlora(model, ["first", "second"], r=2, backend=backend)
        set_recompute_weight_cast(model, recompute)
        x = torch.randn(5, 24)  # needs no gradient: the first layer has no dx to compute
        compiled = torch.compile(model)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(x).float().sum().backward()

        weights = sorted((str(dtype), is_input) for shape, _, dtype, is_input in compiled_saved_tensors(step)
                         if shape == (24, 24))
        expected = [("torch.bfloat16", False), ("torch.float32", True)]
        assert weights == (expected[1:] * 2 if recompute else expected), (recompute, weights)
    torch._dynamo.reset()


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES
                                            for b in (["cuda", "triton"] if d == "cuda" else ["cpu", "reference"])])
def test_compiled_matches_eager(device, backend):
    """torch.compile traces the layer's autograd (the op's in C++, or the Python Function; inductor on a GPU,
    aot_eager on the CPU): the backward rounds the master there too, and the step gives the eager default's
    results."""
    if available_backends(device, torch.bfloat16)[backend] is not None:
        pytest.skip(available_backends(device, torch.bfloat16)[backend])
    torch._dynamo.reset()
    expected = step(make_layer(device, backend, False), device)
    layer = make_layer(device, backend, True)
    compiled = torch.compile(layer, backend="inductor" if device == "cuda" else "aot_eager", fullgraph=True)
    got = step(compiled, device)  # the compiled module reads through to the layer's attributes
    for name, a, b in zip(("y", "dx", "dtheta_a", "dtheta_b"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-2 if name == "y" else 1e-4, atol=1e-6, msg=name)
    torch._dynamo.reset()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_under_activation_checkpointing(device, backend, use_reentrant):
    """torch.utils.checkpoint recomputes the forward in the backward: the master is saved again, the results do
    not change."""
    outputs = []
    for recompute in (False, True):
        layer = make_layer(device, backend, recompute)
        torch.manual_seed(5)
        x = torch.randn(37, D_IN, device=device, requires_grad=True)
        with torch.autocast(device, dtype=torch.bfloat16):
            y = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=use_reentrant)
        y.backward(torch.randn(y.shape, device=device, dtype=y.dtype))
        outputs.append((y.detach(), x.grad, layer.generator.theta_a.grad, layer.generator.theta_b.grad))
    for name, a, b in zip(("y", "dx", "dtheta_a", "dtheta_b"), *outputs):
        assert torch.equal(a, b), name


@requires_cuda
@pytest.mark.parametrize("backend", [b for d, b in CASES if d == "cuda"])
def test_less_memory_between_forward_and_backward(backend):
    """What stays allocated after the forward, default against recompute_weight_cast: at least the bf16 copy of
    W0 less (2 bytes per element)."""
    d = 1024
    alive = {}
    for recompute in (False, True):
        layer = make_layer("cuda", backend, recompute, mode="paper", d_in=d, d_out=d)
        x = torch.randn(512, d, device="cuda", requires_grad=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        torch.cuda.synchronize()
        alive[recompute] = torch.cuda.memory_allocated() - before
        y.sum().backward()
        del y, x, layer
    assert alive[False] - alive[True] >= d * d * 2, alive


def test_model_setting_and_argument_checks():
    model = TwoLayers(8)
    with pytest.raises(ValueError, match="no CondLoRA layers"):
        set_recompute_weight_cast(copy.deepcopy(model))
    apply_condlora(model, ["first", "second"], r=2)
    assert set_recompute_weight_cast(model) is model
    assert all(layer.recompute_weight_cast for layer in condlora_layers(model).values())
    assert "recompute_weight_cast=True" in repr(model)
    set_recompute_weight_cast(model, False)
    assert not any(layer.recompute_weight_cast for layer in condlora_layers(model).values())
    assert "recompute_weight_cast" not in repr(model.condlora_config)  # how the model runs, not what it is
    with pytest.raises(TypeError, match="recompute_weight_cast must be a bool, got 1 of type int"):
        set_recompute_weight_cast(model, 1)
    with pytest.raises(TypeError, match="recompute_weight_cast must be a bool"):
        FusedCondLoRALinear(8, 8, recompute_weight_cast="yes")
    layer = condlora_layers(model)["first"]
    with pytest.raises(TypeError, match="recompute_weight_cast must be a bool, got 1 of type int"):
        condlora_linear(torch.randn(2, 8), layer.weight, layer.bias, layer.generator.theta_a,
                        layer.generator.theta_b, 1.0, recompute_weight_cast=1)


def test_the_backward_rounding_op_passes_opcheck():
    """condlora::round_master_in_backward, which the Python route's backward uses under torch.compile: its fake
    implementation matches it (shapes, strides, dtype) for a contiguous and a transposed master."""
    from condlora_kernels.ops.condlora_linear import round_master_in_backward

    grad_y = torch.randn(3, 6)
    for master in (torch.randn(6, 5), torch.randn(5, 6).t()):
        torch.library.opcheck(round_master_in_backward, (master, grad_y, torch.bfloat16))
        assert torch.equal(round_master_in_backward(master, grad_y, torch.bfloat16), master.to(torch.bfloat16))
