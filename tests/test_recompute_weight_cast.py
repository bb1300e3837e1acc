"""`recompute_weight_cast` (docs/design.md §4): a float32 W0 in a half-precision step is kept as it is from forward
to backward and rounded again in the backward, instead of its rounding being kept. Same results bit for bit as the
default on every backend (dropout included), compiled too; the master, not a copy, is what the layer saves; on a
GPU, the memory held between forward and backward is smaller by the rounded copy."""

import copy
import math

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


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_step_follows_auto(backend):
    """Under torch.compile "auto" is decided while tracing, from the traced shapes: what the partitioner keeps for
    the four adapted layers of TwoBlocks (share 0.2) is the bf16 rounding one token below the first token count
    and the float32 W0 itself from it on. The frozen layers' F.linear keeps its own bf16 copies either way."""
    if available_backends("cpu", torch.bfloat16)[backend] is not None:
        pytest.skip(available_backends("cpu", torch.bfloat16)[backend])
    kept_masters = {}
    for offset in (-1, 0):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = TwoBlocks()
        apply_condlora(model, ["query", "value"], r=2, backend=backend)
        tokens = condlora_layers(model)["first.query"]._recast_min_tokens + offset
        x = torch.randn(tokens, 16, requires_grad=True)
        compiled = torch.compile(model, fullgraph=True)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                compiled(x).float().sum().backward()

        kept_masters[offset] = sum(1 for shape, _, dtype, is_input in compiled_saved_tensors(step)
                                   if shape == (16, 16) and dtype == torch.float32 and is_input)
    torch._dynamo.reset()
    assert kept_masters == {-1: 0, 0: 4}, kept_masters


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
    assert all(layer.recompute_weight_cast == "auto" for layer in condlora_layers(model).values())  # the default
    assert "recompute_weight_cast" not in repr(model)  # "auto" is not shown
    assert set_recompute_weight_cast(model) is model
    assert all(layer.recompute_weight_cast is True for layer in condlora_layers(model).values())
    assert "recompute_weight_cast=True" in repr(model)
    set_recompute_weight_cast(model, False)
    assert all(layer.recompute_weight_cast is False for layer in condlora_layers(model).values())
    assert "recompute_weight_cast=False" in repr(model)
    set_recompute_weight_cast(model, "auto")
    assert all(layer.recompute_weight_cast == "auto" for layer in condlora_layers(model).values())
    assert "recompute_weight_cast" not in repr(model.condlora_config)  # how the model runs, not what it is
    with pytest.raises(TypeError, match="recompute_weight_cast must be True, False or 'auto', got 1 of type int"):
        set_recompute_weight_cast(model, 1)
    with pytest.raises(ValueError, match="recompute_weight_cast must be True, False or 'auto', got 'yes'"):
        set_recompute_weight_cast(model, "yes")
    with pytest.raises(ValueError, match="recompute_weight_cast must be True, False or 'auto'"):
        FusedCondLoRALinear(8, 8, recompute_weight_cast="yes")
    assert all(layer.recompute_weight_cast == "auto" for layer in condlora_layers(model).values())  # unchanged
    layer = condlora_layers(model)["first"]
    for bad in (1, "auto"):  # the op takes what the layer resolved: a bool
        with pytest.raises(TypeError, match=f"recompute_weight_cast must be a bool, got {bad!r}"):
            condlora_linear(torch.randn(2, 8), layer.weight, layer.bias, layer.generator.theta_a,
                            layer.generator.theta_b, 1.0, recompute_weight_cast=bad)


class Block(torch.nn.Module):
    """Attention-like projections and a wider FFN: 4 * 16² + 2 * 16 * 48 = 2560 weight elements, 512 of them in
    query and value."""

    def __init__(self, d=16):
        super().__init__()
        self.query, self.key, self.value, self.out = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down = torch.nn.Linear(d, 3 * d), torch.nn.Linear(3 * d, d)

    def forward(self, x):
        h = self.out(self.query(x) * self.key(x) + self.value(x))
        return self.down(torch.relu(self.up(h)))


class TwoBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Block(), Block()

    def forward(self, x):
        return self.second(self.first(x))


def test_auto_weighs_the_pass_by_the_adapted_share_and_the_tokens():
    """apply_condlora gives each layer the share of the model's linear-layer weights that CondLoRA layers hold
    (later calls update the earlier layers); "auto" recomputes from share * RECAST_COST_TOKENS / RECAST_BUDGET
    tokens per call on, a layer on its own being a share of 1."""
    from condlora_kernels.integrations.model import adapted_weight_share
    from condlora_kernels.modules.linear import RECAST_BUDGET, RECAST_COST_TOKENS

    model = TwoBlocks()
    assert adapted_weight_share(model) == 1.0  # no CondLoRA layer: nothing to weigh
    apply_condlora(model, ["query", "value"], r=2)
    assert adapted_weight_share(model) == pytest.approx(512 / 2560)
    layers = condlora_layers(model)
    assert len(layers) == 4 and all(layer.adapted_weight_share == pytest.approx(0.2) for layer in layers.values())
    apply_condlora(model, ["up"], r=2)
    share = (512 + 768) / 2560
    assert all(layer.adapted_weight_share == pytest.approx(share) for layer in condlora_layers(model).values())
    layer = condlora_layers(model)["first.query"]
    first = math.ceil(share * RECAST_COST_TOKENS / RECAST_BUDGET)  # tokens from which it recomputes
    for tokens, recomputes in ((first - 1, False), (first, True), (3 * first, True)):
        x = torch.empty(tokens, 16, device="meta")
        assert layer.recomputes_weight_cast(x) is recomputes, tokens
        assert layer.recomputes_weight_cast(x.view(1, tokens, 16)) is recomputes  # tokens, whatever the batch shape
    for setting in (True, False):
        layer.recompute_weight_cast = setting
        assert layer.recomputes_weight_cast(torch.empty(first - 1, 16, device="meta")) is setting
        assert layer.recomputes_weight_cast(torch.empty(first, 16, device="meta")) is setting
    alone = FusedCondLoRALinear(16, 16, r=2)
    assert alone.adapted_weight_share == 1.0
    alone_first = math.ceil(RECAST_COST_TOKENS / RECAST_BUDGET)
    assert not alone.recomputes_weight_cast(torch.empty(alone_first - 1, 16, device="meta"))
    assert alone.recomputes_weight_cast(torch.empty(alone_first, 16, device="meta"))
    for bad, error in ((0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError), (True, TypeError),
                       ("half", TypeError)):
        with pytest.raises(error, match="share must be a real number in"):
            alone.set_adapted_weight_share(bad)
    assert alone.adapted_weight_share == 1.0  # unchanged by the refused calls


def test_adapted_weight_share_counts_transformers_conv1d():
    """GPT-2's Conv1D is a linear layer too (its weight is (in, out)): it counts in the share's total."""
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    model = torch.nn.ModuleDict({"query": torch.nn.Linear(8, 8), "c_attn": conv1d(24, 8)})  # 64 and 192 elements
    apply_condlora(model, ["query"], r=2)
    assert condlora_layers(model)["query"].adapted_weight_share == pytest.approx(64 / 256)


@pytest.mark.parametrize("device,backend", CASES)
def test_auto_saves_the_master_from_its_first_token_count(device, backend):
    """End to end: under autocast with float32 weights, the default ("auto") saves the rounding below the token
    count from which it recomputes and the master from it on, with the same results bit for bit."""
    model = TwoBlocks().to(device)
    apply_condlora(model, ["query", "value"], r=2, backend=backend)
    layer = condlora_layers(model)["second.value"]
    torch.nn.init.normal_(layer.generator.theta_b, std=0.1)
    first = layer._recast_min_tokens
    for tokens, kept_dtype in ((first - 1, torch.bfloat16), (first, torch.float32)):
        x = torch.randn(tokens, 16, device=device, requires_grad=True)
        y, saved = saved_tensors(layer, x)
        kept = [t for t in saved if tuple(t.shape) == (16, 16)]
        assert [t.dtype for t in kept] == [kept_dtype], tokens
        y.backward(torch.ones_like(y))
    x = torch.randn(first - 1, 16, device=device)
    set_recompute_weight_cast(model, True)
    with torch.autocast(device, dtype=torch.bfloat16):
        forced = layer(x)
    set_recompute_weight_cast(model, False)
    with torch.autocast(device, dtype=torch.bfloat16):
        kept_rounding = layer(x)
    assert torch.equal(forced, kept_rounding)


def test_the_backward_rounding_op_passes_opcheck():
    """condlora::round_master_in_backward, which the Python route's backward uses under torch.compile: its fake
    implementation matches it (shapes, strides, dtype) for a contiguous and a transposed master."""
    from condlora_kernels.ops.condlora_linear import round_master_in_backward

    grad_y = torch.randn(3, 6)
    for master in (torch.randn(6, 5), torch.randn(5, 6).t()):
        torch.library.opcheck(round_master_in_backward, (master, grad_y, torch.bfloat16))
        assert torch.equal(round_master_in_backward(master, grad_y, torch.bfloat16), master.to(torch.bfloat16))
