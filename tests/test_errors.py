"""Bad input raises a ValueError / TypeError naming the argument and the sizes, before any computation."""

import pytest
import torch

from condlora_kernels import BackendUnavailableError, CondLoRAGenerator, FusedCondLoRALinear, condlora_linear
from condlora_kernels.testing import make_problem


def _call(x, w, b, ta, tb, scaling=1.0, **kw):
    kw.setdefault("backend", "reference")
    return condlora_linear(x, w, b, ta, tb, scaling, **kw)


@pytest.fixture
def paper():
    return make_problem(4, 8, 8, 2, mode="paper")


@pytest.fixture
def general():
    return make_problem(4, 6, 10, 2, mode="general")


def test_x_last_dim(paper):
    x = torch.randn(4, 7)
    with pytest.raises(ValueError, match=r"x must have last dimension d_in=8.*\(4, 7\)"):
        _call(x, *paper.tensors()[1:])


def test_weight_not_2d(paper):
    with pytest.raises(ValueError, match=r"weight must be 2-D"):
        _call(paper.x, paper.weight[0], *paper.tensors()[2:])


def test_bias_shape(paper):
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\).*\(5,\)"):
        _call(paper.x, paper.weight, torch.randn(5), paper.theta_a, paper.theta_b)


def test_theta_a_shape_general(general):
    with pytest.raises(ValueError, match=r"theta_a must have shape \(2, 10\) in general mode.*\(2, 6\)"):
        _call(general.x, general.weight, general.bias, torch.randn(2, 6), general.theta_b, mode="general")


def test_theta_b_shape(paper):
    with pytest.raises(ValueError, match=r"theta_b must have shape \(2, 8\).*\(3, 8\)"):
        _call(*paper.tensors()[:4], torch.randn(3, 8))


def test_paper_mode_needs_square(general):
    with pytest.raises(ValueError, match=r"mode='paper' needs a square weight.*\(10, 6\)"):
        _call(general.x, general.weight, general.bias, torch.randn(2, 6), general.theta_b, mode="paper")


def test_rank_zero(paper):
    with pytest.raises(ValueError, match=r"r \(rows of theta_a\) must be >= 1"):
        _call(*paper.tensors()[:3], torch.randn(0, 8), torch.randn(0, 8))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_range(paper, p):
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        _call(*paper.tensors(), dropout_p=p)


def test_dropout_type(paper):
    with pytest.raises(TypeError, match=r"dropout_p must be a float"):
        _call(*paper.tensors(), dropout_p="0.1")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_mismatched_dtypes(paper, backend):
    with pytest.raises(TypeError, match=r"weight has dtype torch.float64 but x has dtype torch.float32"):
        _call(paper.x, paper.weight.double(), *paper.tensors()[2:], backend=backend)
    with pytest.raises(TypeError, match=r"bias has dtype torch.float16 but x has dtype torch.float32"):
        _call(paper.x, paper.weight, paper.bias.half(), paper.theta_a, paper.theta_b, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_generators_and_float32_masters_of_any_dtype_are_accepted(paper, backend):
    """The generators are cast to the compute dtype; float32 weight and bias are masters of a half-precision x."""
    x, w, b, ta, tb = paper.tensors()
    want = _call(x.bfloat16(), w.bfloat16(), b.bfloat16(), ta.bfloat16(), tb.bfloat16(), backend=backend)
    got = _call(x.bfloat16(), w.bfloat16(), b.bfloat16(), ta, tb.double(), backend=backend)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert _call(x.bfloat16(), w, b, ta, tb, backend=backend).dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("bad,kind", [(lambda x: x.numpy(), TypeError), (lambda x: x.tolist(), TypeError),
                                      (lambda x: x.to_sparse(), TypeError)])
def test_x_not_a_dense_tensor(paper, backend, bad, kind):
    with pytest.raises(kind, match=r"x"):
        _call(bad(paper.x), *paper.tensors()[1:], backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_scaling_out_of_float32_range(paper, backend):
    with pytest.raises(ValueError, match=r"scaling must fit in float32"):
        _call(*paper.tensors(), scaling=1e300, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_dropout_that_rounds_to_one(paper, backend):
    with pytest.raises(ValueError, match=r"rounds to 1 in the 16-bit dropout mask"):
        _call(*paper.tensors(), dropout_p=0.999999, backend=backend)


def test_non_float(paper):
    with pytest.raises(TypeError, match=r"x must be a floating tensor.*torch.int64"):
        _call(paper.x.long(), *paper.tensors()[1:])


def test_not_a_tensor(paper):
    with pytest.raises(TypeError, match=r"theta_b must be a torch.Tensor, got list"):
        _call(*paper.tensors()[:4], [[1.0]])


def test_mismatched_devices(paper):
    meta = paper.theta_b.to("meta")
    with pytest.raises(ValueError, match=r"theta_b is on meta but x is on cpu"):
        _call(*paper.tensors()[:4], meta)


def test_unknown_mode_and_backend(paper):
    with pytest.raises(ValueError, match=r"mode must be one of"):
        _call(*paper.tensors(), mode="square")
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        _call(*paper.tensors(), backend="fast")


def test_available_backends_arguments():
    from condlora_kernels import available_backends

    with pytest.raises(ValueError, match=r"device must name a torch device .* got 'gpu0'"):
        available_backends("gpu0")
    with pytest.raises(TypeError, match=r"dtype must be a torch.dtype .* got 'bfloat16'"):
        available_backends("cpu", "bfloat16")
    for dtype in (torch.int64, torch.bool, torch.complex64):  # the op refuses them: no backend can run
        reasons = available_backends("cpu", dtype)
        assert all(reason == f"the op takes floating tensors (float16, bfloat16, float32, float64), got {dtype}"
                   for reason in reasons.values()), reasons


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks about CUDA on a machine without it")
def test_available_backends_on_a_device_this_machine_lacks():
    """Every backend gets the reason (it raised from torch.empty before)."""
    from condlora_kernels import available_backends

    reasons = available_backends("cuda", torch.bfloat16)
    assert set(reasons) == {"reference", "triton", "cuda", "cpu"}
    assert all(reason.startswith("no tensor can be made on cuda here (") for reason in reasons.values()), reasons


def test_bad_scaling(paper):
    with pytest.raises(TypeError, match=r"scaling must be a finite float"):
        _call(*paper.tensors(), scaling=float("inf"))


def test_weight_requiring_grad(paper):
    with pytest.raises(ValueError, match=r"weight requires grad"):
        _call(paper.x, paper.weight.clone().requires_grad_(True), *paper.tensors()[2:])


def test_env_override_validated(paper, monkeypatch):
    monkeypatch.setenv("CONDLORA_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"CONDLORA_BACKEND must be"):
        condlora_linear(*paper.tensors(), 1.0)


def test_unavailable_backend_explains(paper):
    # the CUDA backend can never run on CPU tensors; the message says why
    with pytest.raises(BackendUnavailableError, match=r"backend='cuda' cannot run here"):
        _call(*paper.tensors(), backend="cuda")


def test_module_errors():
    lin = torch.nn.Linear(6, 10)
    with pytest.raises(ValueError, match=r"mode='paper' needs square layers"):
        FusedCondLoRALinear.from_linear(lin, mode="paper")
    with pytest.raises(ValueError, match=r"r must be >= 1"):
        FusedCondLoRALinear.from_linear(lin, r=0)
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear"):
        FusedCondLoRALinear.from_linear(torch.nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"dropout_p must be in"):
        FusedCondLoRALinear.from_linear(lin, dropout=1.0)


def test_meta_tensors(paper, monkeypatch):
    """Meta x with real weights is a device error; an all-meta call propagates shapes (as F.linear does)."""
    from condlora_kernels.ops import backends

    monkeypatch.setattr(backends, "_warned", set())  # the fallback is said once per process
    monkeypatch.setattr(backends, "_RESOLVED", {})
    with pytest.warns(UserWarning, match=r"no fused backend can run on meta tensors"):
        y = condlora_linear(*[t.to("meta") for t in paper.tensors()], 1.0, backend="auto")
    assert y.device.type == "meta" and y.shape == (4, 8)
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on meta"):
        condlora_linear(paper.x.to("meta"), *paper.tensors()[1:], 1.0)
    layer = FusedCondLoRALinear(8, 8, r=2, device="meta")
    assert layer(torch.empty(3, 8, device="meta")).shape == (3, 8)


def test_the_refusals_can_be_caught_from_the_package():
    """The errors README names (ReentrantCheckpointDDPError, ShardedTensorError) are importable from the top level."""
    import condlora_kernels
    from condlora_kernels.integrations import distributed

    for name in ("ReentrantCheckpointDDPError", "ShardedTensorError"):
        assert name in condlora_kernels.__all__
        assert getattr(condlora_kernels, name) is getattr(distributed, name)
        assert issubclass(getattr(condlora_kernels, name), RuntimeError)


@pytest.mark.parametrize("make, error, match", [
    (lambda: FusedCondLoRALinear(-1, 8), ValueError, r"in_features must be >= 1, got -1"),
    (lambda: FusedCondLoRALinear(8, 0), ValueError, r"out_features must be >= 1, got 0"),
    (lambda: FusedCondLoRALinear(8.0, 8), TypeError, r"in_features must be an int >= 1, got 8.0"),
    (lambda: FusedCondLoRALinear(8, 8, dtype=torch.int64), TypeError, r"dtype must be a floating dtype"),
    (lambda: FusedCondLoRALinear(8, 8, r=2, alpha=1e300), ValueError, r"scaling must fit in float32"),
    (lambda: CondLoRAGenerator(-1, -1), ValueError, r"in_features must be >= 1"),
    (lambda: CondLoRAGenerator(4, 4, dtype=torch.int32), TypeError, r"dtype must be a floating dtype"),
])
def test_constructors_check_their_sizes_and_dtype(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_apply_condlora_refuses_an_alpha_whose_scaling_overflows_float32():
    from condlora_kernels import apply_condlora

    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)})
    weight = model["proj"].weight
    with pytest.raises(ValueError, match=r"scaling must fit in float32"):
        apply_condlora(model, ["proj"], r=8, alpha=1e300)
    assert model["proj"].weight is weight and weight.requires_grad  # unchanged


@pytest.mark.parametrize("call", ["apply_condlora", "save_condlora", "load_condlora", "export_peft_adapter",
                                  "merge_condlora", "merge_adapters_in_place", "unmerge_adapters",
                                  "set_recompute_weight_cast", "condlora_layers", "condlora_generators",
                                  "condlora_state_dict", "print_trainable_parameters", "shard_condlora_model"])
@pytest.mark.parametrize("model", [None, "bert-base-uncased"])
def test_every_model_function_refuses_a_non_module(call, model, tmp_path):
    import condlora_kernels

    args = {"apply_condlora": (["query"],), "save_condlora": (tmp_path,), "load_condlora": (tmp_path,),
            "export_peft_adapter": (tmp_path,)}.get(call, ())
    with pytest.raises(TypeError, match=rf"model must be an nn.Module.*got {type(model).__name__}"):
        getattr(condlora_kernels, call)(model, *args)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_condlora_state_dict_of_a_model_without_an_adapter_is_refused():
    from condlora_kernels import condlora_state_dict

    with pytest.raises(ValueError, match=r"condlora_state_dict: the model has no CondLoRA layers"):
        condlora_state_dict(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(scaling=True), TypeError, r"scaling must be a finite float"),
    (dict(scaling=torch.tensor(1.0)), TypeError, r"scaling must be a finite float"),
    (dict(scaling=None), TypeError, r"scaling must be a finite float"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float in \[0, 1\)"),
    (dict(mode=None), ValueError, r"mode must be one of"),
])
def test_scalar_arguments_are_checked_on_every_route(paper, backend, kwargs, error, match):
    """The extension's op (cpu) refuses what the Python route refuses, naming the argument (its schema converted a
    bool or a 0-d tensor silently and failed on None with a RuntimeError)."""
    kwargs = dict(kwargs)
    scaling = kwargs.pop("scaling", 1.0)
    with pytest.raises(error, match=match):
        condlora_linear(*paper.tensors(), scaling, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_missing_and_empty_weights_are_named_on_every_route(paper, backend):
    x, w, b, ta, tb = paper.tensors()
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got NoneType"):
        condlora_linear(x, None, b, ta, tb, 1.0, backend=backend)
    with pytest.raises(TypeError, match=r"theta_b must be a torch.Tensor, got NoneType"):
        condlora_linear(x, w, b, ta, None, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have d_out >= 1 and d_in >= 1, got \(0, 0\)"):
        condlora_linear(x[:, :0], torch.empty(0, 0), None, ta[:, :0], tb[:, :0], 1.0, backend=backend)


@pytest.mark.parametrize("break_weight, match", [
    (lambda lin: setattr(lin, "weight", torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)),
     r"target layer proj has no floating 2-D weight \(dtype torch.int8, shape \(4, 4\)\)"),
    (lambda lin: setattr(lin, "weight", None), r"target layer proj has no floating 2-D weight \(NoneType\)"),
])
def test_apply_condlora_names_a_target_without_a_float_weight(break_weight, match):
    from condlora_kernels import apply_condlora

    model = torch.nn.ModuleDict({"proj": torch.nn.Linear(4, 4)})
    break_weight(model["proj"])
    with pytest.raises(TypeError, match=match):
        apply_condlora(model, ["proj"], r=2)
    assert type(model["proj"]) is torch.nn.Linear and not hasattr(model, "condlora_config")


def test_apply_condlora_refuses_bytes_as_target_modules():
    from condlora_kernels import apply_condlora

    model = torch.nn.ModuleDict({"query": torch.nn.Linear(4, 4)})
    with pytest.raises(TypeError, match=r"target_modules must be a list of module names or one regex string, "
                                        r"got b'query'"):
        apply_condlora(model, b"query", r=2)
