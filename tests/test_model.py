"""apply_condlora on transformers models and plain modules: parameter counts, generators stored once at the root,
freezing, a second call, bad arguments, transactional failures, dtype casts, merging."""

import copy

import pytest
import torch
from torch import nn

from condlora_kernels import (FusedCondLoRALinear, apply_condlora, condlora_generators, condlora_layers,
                              load_condlora, merge_adapters_in_place, merge_and_unload, merge_condlora,
                              print_trainable_parameters, reference, save_condlora, unmerge_adapters)
from condlora_kernels.testing import assert_close
from tests.model_fixtures import assert_unchanged, perturb_adapter, snapshot, tiny_bert, token_ids

transformers = pytest.importorskip("transformers")


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def roberta_base():
    torch.manual_seed(0)
    return transformers.RobertaModel(transformers.RobertaConfig())  # roberta-base sizes, nothing downloaded


def test_roberta_base_paper_parameter_count(roberta_base, capsys):
    """Paper Table 4: CondLoRA on query and value, r=8: 24,576 trainable parameters (LoRA: 294,912)."""
    model = apply_condlora(roberta_base, ["query", "value"], r=8, alpha=8, backend="reference")
    assert _trainable(model) == 24_576
    layers = condlora_layers(model)
    assert len(layers) == 24
    gens = condlora_generators(model)
    assert sorted(gens) == ["query", "value"]
    assert all(layer.generator is gens["query"] for name, layer in layers.items() if name.endswith("query"))
    assert all(layer.mode == "paper" for layer in layers.values())
    # each theta exactly once in model.parameters(), named_parameters() and state_dict()
    ids = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == 4
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        "condlora_generators.query.theta_a", "condlora_generators.query.theta_b",
        "condlora_generators.value.theta_a", "condlora_generators.value.theta_b"]
    assert [k for k in model.state_dict() if "theta" in k] == [
        n for n, p in model.named_parameters() if p.requires_grad]
    counts = print_trainable_parameters(model)
    total = sum(p.numel() for p in model.parameters())
    assert counts == (24_576, total)
    assert capsys.readouterr().out == (f"trainable params: 24,576 || all params: {total:,} || "
                                       f"trainable%: {100 * 24_576 / total:.4f}\n")


def test_lora_count_for_comparison():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(num_hidden_layers=12))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
    assert _trainable(lora) == 294_912


def test_generators_stored_once_at_the_root(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, modules_to_save=["classifier"], backend="reference")
    store = model.condlora_generators
    assert isinstance(store, nn.ModuleDict) and sorted(store) == ["query", "value"]
    for name, layer in condlora_layers(model).items():
        assert layer.generator is store[layer.generator_key] and not layer.owns_generator
        assert not any("generator" in key for key in layer.state_dict())  # a reference, not a submodule
        assert f"generator={layer.generator_key!r}" in repr(layer)
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(set(names)) == len(model.state_dict())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 4 + 2  # 2 generators, the classifier (weight, bias)
    # the checkpoint writers that refuse shared tensors
    safetensors_torch.save_model(model, str(tmp_path / "model.safetensors"))
    model.save_pretrained(tmp_path / "hf")
    saved = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert sorted(k for k in saved if "theta" in k) == sorted(k for k in names if "theta" in k)


def test_save_pretrained_state_reloads_into_an_adapted_model(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, modules_to_save=["classifier"],
                           backend="reference").eval()
    perturb_adapter(model)
    model.save_pretrained(tmp_path)
    ids = token_ids()
    fresh = apply_condlora(tiny_bert(seed=3), ["query", "value"], r=4, modules_to_save=["classifier"],
                           backend="reference").eval()
    assert not torch.equal(fresh(ids).logits, model(ids).logits)
    missing, unexpected = fresh.load_state_dict(safetensors_torch.load_file(str(tmp_path / "model.safetensors")),
                                                strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_deepcopy_keeps_the_sharing():
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, backend="reference")
    clone = copy.deepcopy(model)
    store = clone.condlora_generators
    assert store["query"] is not model.condlora_generators["query"]
    for layer in condlora_layers(clone).values():
        assert layer.generator is store[layer.generator_key]
    assert len({id(p) for p in clone.parameters()}) == len(list(clone.named_parameters()))


@pytest.mark.parametrize("cast", ["to", "half", "bfloat16"])
def test_half_precision_casts_keep_float32_generators(cast):
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, modules_to_save=["classifier"],
                           backend="reference").eval()
    perturb_adapter(model)
    masters = {k: g.theta_b.detach().clone() for k, g in condlora_generators(model).items()}
    half = torch.bfloat16 if cast != "half" else torch.float16
    model = model.to(half) if cast == "to" else getattr(model, cast)()
    assert model.classifier.weight.dtype == half
    layer = condlora_layers(model)["bert.encoder.layer.0.attention.self.query"]
    assert layer.weight.dtype == half
    for key, generator in condlora_generators(model).items():
        assert generator.theta_a.dtype == generator.theta_b.dtype == torch.float32
        assert torch.equal(generator.theta_b, masters[key])  # not rounded through half precision
    logits = model(token_ids()).logits
    assert logits.dtype == half and torch.isfinite(logits).all()
    model.double()  # casts to float32/float64 apply as usual
    assert model.condlora_generators["query"].theta_a.dtype == torch.float64


def test_starts_at_frozen_model_and_trains():
    model = tiny_bert().eval()
    ids = token_ids()
    before = model(ids).logits.detach()
    apply_condlora(model, ["query", "value", "intermediate.dense"], r=4, modules_to_save=["classifier"],
                   backend="reference")
    assert not any(m.training for m in model.modules())  # new layers keep the model's eval mode
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert condlora_layers(model)["bert.encoder.layer.0.intermediate.dense"].mode == "general"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all(n.startswith("condlora_generators.") or "classifier" in n for n in trainable)
    model.train()
    out = model(ids, labels=torch.tensor([0, 1, 1]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_regex_targets_like_peft():
    model = tiny_bert()
    apply_condlora(model, r".*attention\.self\.(query|key)", r=2, backend="reference")
    assert sorted(condlora_generators(model)) == ["key", "query"]
    assert len(condlora_layers(model)) == 4


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_condlora(tiny_bert(), ["qkv_proj"], backend="reference")


def test_shapes_differing_within_a_target_get_one_generator_each():
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": nn.Linear(8, 8)}), "b": nn.ModuleDict({"proj": nn.Linear(8, 12)}),
                           "c": nn.ModuleDict({"proj": nn.Linear(8, 8)})})
    apply_condlora(model, ["proj"], r=2, backend="reference")
    gens = condlora_generators(model)
    assert sorted(gens) == ["proj", "proj__12x8"]
    assert model["a"]["proj"].generator is model["c"]["proj"].generator


def test_a_module_reused_under_two_names_is_replaced_under_both():
    shared = nn.Linear(8, 8)
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": shared}), "b": nn.ModuleDict({"proj": shared})})
    apply_condlora(model, ["proj"], r=2, backend="reference")
    assert isinstance(model["b"]["proj"], FusedCondLoRALinear) and model["a"]["proj"] is model["b"]["proj"]


# --------------------------------------------------------------------------------------------------
# A second call, bad arguments, failures that leave the model as it was
# --------------------------------------------------------------------------------------------------


def test_second_call_adds_targets_and_keeps_the_first_trainable():
    model = apply_condlora(tiny_bert(), ["query"], r=4, modules_to_save=["classifier"], backend="reference")
    first = {n for n, p in model.named_parameters() if p.requires_grad}
    apply_condlora(model, ["value"], r=2, alpha=4, backend="reference")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == first | {"condlora_generators.value.theta_a", "condlora_generators.value.theta_b"}
    assert [call["target_modules"] for call in model.condlora_config["apply_condlora_calls"]] == [["query"], ["value"]]
    assert model.condlora_config["apply_condlora_calls"][0]["modules_to_save"] == ["classifier"]
    assert condlora_layers(model)["bert.encoder.layer.1.attention.self.value"].r == 2


def test_overlapping_second_call_is_an_error():
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, backend="reference")
    before = snapshot(model)
    with pytest.raises(ValueError, match="already are CondLoRA layers.*attention.self.query"):
        apply_condlora(model, ["query", "key"], r=4, backend="reference")
    assert_unchanged(model, before)


@pytest.mark.parametrize("alpha, error", [("8", TypeError), (None, TypeError), (True, TypeError), (-8, ValueError),
                                          (0, ValueError), (float("inf"), ValueError), (float("nan"), ValueError)])
def test_alpha_must_be_a_positive_finite_real(alpha, error):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error, match="alpha"):
        apply_condlora(model, ["query"], alpha=alpha, backend="reference")
    assert_unchanged(model, before)
    with pytest.raises(error, match="alpha"):
        FusedCondLoRALinear.from_linear(nn.Linear(4, 4), alpha=alpha)
    with pytest.raises(error, match="alpha"):
        FusedCondLoRALinear(4, 4, alpha=alpha)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(target_modules=["query", "valeu"]), ValueError, r"'valeu' matches no nn.Linear.*'value'"),
    (dict(target_modules=["query"], modules_to_save="classifier"), TypeError, r"string 'classifier'.*\['classifier'\]"),
    (dict(target_modules=["query"], modules_to_save=["clasifier"]), ValueError, r"'clasifier' matches no module.*'classifier'"),
    (dict(target_modules=["query"], modules_to_save=["attention"]), ValueError, "contains the CondLoRA layer"),
    (dict(target_modules=["query"], mode="Paper"), ValueError, "mode must be one of"),
    (dict(target_modules=["intermediate.dense"], mode="paper"), ValueError, "mode='paper' needs square layers"),
    (dict(target_modules="(query"), ValueError, "not a valid regular expression"),
    (dict(target_modules=["query", 3]), TypeError, "non-empty strings"),
    (dict(target_modules=["query"], r=0), ValueError, "r must be"),
    (dict(target_modules=["query"], dropout=1.5), ValueError, "dropout_p must be"),
    (dict(target_modules=["query"], backend="gpu"), ValueError, "backend"),
])
def test_bad_arguments_leave_the_model_as_it_was(kwargs, error, match):
    model = tiny_bert()
    before = snapshot(model)
    with pytest.raises(error, match=match):
        apply_condlora(model, **kwargs)
    assert_unchanged(model, before)


def test_a_later_target_inside_earlier_modules_to_save_is_an_error():
    model = apply_condlora(tiny_bert(), ["query"], modules_to_save=["classifier"], backend="reference")
    before = snapshot(model)
    with pytest.raises(ValueError, match="inside classifier"):
        apply_condlora(model, [r"classifier"], backend="reference")
    assert_unchanged(model, before)


def test_failure_half_way_through_is_undone(monkeypatch):
    """A failure after the model began to change (simulated in the third layer) restores everything."""
    model = apply_condlora(tiny_bert(), ["query"], r=4, modules_to_save=["classifier"], backend="reference")
    before = snapshot(model)
    calls = []

    def fail_third(self, generator, key):
        calls.append(key)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return original(self, generator, key)

    original = FusedCondLoRALinear.use_shared_generator
    monkeypatch.setattr(FusedCondLoRALinear, "use_shared_generator", fail_third)
    with pytest.raises(RuntimeError, match="simulated failure"):
        apply_condlora(model, ["value", "key"], r=2, modules_to_save=["pooler"], backend="reference")
    assert_unchanged(model, before)
    assert sorted(model.condlora_generators) == ["query"]


@pytest.mark.parametrize("container", [nn.Sequential, nn.ModuleList])
def test_a_sequence_root_is_refused_before_any_change(container):
    """The generators live at the root as one more child: an nn.Sequential would call it as a layer. Refused with
    what to do, the model unchanged."""
    layers = [nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)]
    model = nn.Sequential(*layers) if container is nn.Sequential else nn.ModuleList(layers)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=rf"model is an nn.{container.__name__}: .*wrap it in a module of your own"):
        apply_condlora(model, ["0", "2"], r=2, backend="reference")
    assert len(model) == 3 and not hasattr(model, "condlora_generators")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    wrapped = nn.Module()
    wrapped.net = model
    apply_condlora(wrapped, ["net.0", "net.2"], r=2, backend="reference")
    assert len(model) == 3 and isinstance(model[0], FusedCondLoRALinear)
    if container is nn.Sequential:
        assert model(torch.randn(3, 8)).shape == (3, 8)  # still runs, its layers adapted


def test_multihead_attention_out_proj_is_refused():
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "proj": nn.Linear(8, 8)})
    with pytest.raises(ValueError, match="MultiheadAttention"):
        apply_condlora(model, ["out_proj", "proj"], backend="reference")


# --------------------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------------------


def float64_logits(model, ids):
    """The adapted model's logits computed in float64 from its weights as they are (the reference for the 2x rule
    of condlora_kernels/testing.py: merging must be as accurate as the unmerged model in the model's dtype)."""
    return copy.deepcopy(model).double()(ids).logits.detach()


def test_merge_unmerge_and_unload():
    model = tiny_bert().eval()
    apply_condlora(model, ["query", "value"], r=4, backend="reference")
    perturb_adapter(model)
    ids = token_ids()
    ref = model(ids).logits.detach()
    ref64 = float64_logits(model, ids)
    weights = {n: l.weight.detach().clone() for n, l in condlora_layers(model).items()}
    merge_adapters_in_place(model)
    assert_close(model(ids).logits, ref64, ref, "merged logits")
    unmerge_adapters(model)
    assert all(torch.equal(l.weight, weights[n]) for n, l in condlora_layers(model).items())
    assert merge_and_unload is merge_condlora
    merge_and_unload(model)
    assert not condlora_layers(model)
    assert not any(isinstance(m, FusedCondLoRALinear) for m in model.modules())
    assert_close(model(ids).logits, ref64, ref, "unloaded logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_condlora_gives_frozen_linears_rounded_once(dtype):
    model = apply_condlora(tiny_bert(), ["query", "intermediate.dense"], r=4, alpha=6,
                           modules_to_save=["classifier"], backend="reference").to(dtype).eval()
    perturb_adapter(model)
    layers = condlora_layers(model)
    expected = {}
    for name, layer in layers.items():  # W0 + s B A in float32, rounded once, computed here independently
        w = layer.weight.detach().float()
        theta_a, theta_b = layer.generator.theta_a.detach().float(), layer.generator.theta_b.detach().float()
        lora_a = theta_a @ (w.t() if layer.mode == "paper" else w)
        expected[name] = (w + (6 / 4) * ((w @ theta_b.t()) @ lora_a)).to(dtype)
    ids = token_ids()
    ref = model(ids).logits.detach()
    ref64 = float64_logits(model, ids)
    merged = merge_condlora(model)
    assert merged is model
    for name, weight in expected.items():
        linear = model.get_submodule(name)
        assert type(linear) is nn.Linear and linear.weight.dtype == dtype
        torch.testing.assert_close(linear.weight, weight, rtol=0, atol=0)
    assert not hasattr(model, "condlora_generators") and not hasattr(model, "condlora_config")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"classifier.weight", "classifier.bias"}
    assert_close(model(ids).logits, ref64, ref, "merged logits")


def test_merge_adapters_in_place_is_transactional(monkeypatch):
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, backend="reference").eval()
    perturb_adapter(model)
    before = snapshot(model)
    calls = []

    def fail_third(self):
        calls.append(self)
        if len(calls) == 3:
            raise RuntimeError("simulated failure")
        return original(self)

    original = FusedCondLoRALinear.merged_weight
    monkeypatch.setattr(FusedCondLoRALinear, "merged_weight", fail_third)
    for merge in (merge_adapters_in_place, merge_condlora):
        calls.clear()
        with pytest.raises(RuntimeError, match="simulated failure"):
            merge(model)
        assert_unchanged(model, before)
        assert not any(layer.merged for layer in condlora_layers(model).values())


def test_merge_functions_need_condlora_layers():
    for merge in (merge_condlora, merge_adapters_in_place, unmerge_adapters):
        with pytest.raises(ValueError, match="no CondLoRA layers"):
            merge(tiny_bert())


def test_training_while_merged_is_an_error():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="reference")
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(3, 8)
    layer.merge()
    with pytest.raises(RuntimeError, match="merged.*unmerge"):
        layer(x)
    with torch.no_grad():
        layer(x)
    layer.eval()(x)
    layer.train().generator.requires_grad_(False)
    layer(x)  # training something else while the merged adapter is frozen is fine


def test_merged_weight_matches_reference():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(6, 9), r=2, alpha=3, backend="reference")
    nn.init.normal_(layer.generator.theta_b)
    expected = reference.merged_weight(layer.weight, layer.generator.theta_a, layer.generator.theta_b, 1.5, "general")
    assert torch.equal(layer.merged_weight(), expected)
    linear = layer.to_linear()
    assert torch.equal(linear.weight, expected) and not linear.weight.requires_grad
    assert linear.bias is not layer.bias and torch.equal(linear.bias, layer.bias) and not linear.bias.requires_grad


# --------------------------------------------------------------------------------------------------
# Save/load round trip and export
# --------------------------------------------------------------------------------------------------


def test_save_and_load_roundtrip(tmp_path):
    model = tiny_bert().eval()
    apply_condlora(model, ["query", "value"], r=4, modules_to_save=["classifier"], backend="reference")
    perturb_adapter(model)
    ids = token_ids()
    ref = model(ids).logits.detach()
    save_condlora(model, tmp_path)
    fresh = tiny_bert().eval()  # same seed: same frozen weights, fresh generators
    load_condlora(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, ref, rtol=0, atol=0)
    assert _trainable(fresh) == _trainable(model)


def test_torch_export_of_unmerged_model():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="reference").eval()
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(3, 8)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_torch_export_of_an_adapted_model():
    model = apply_condlora(tiny_bert(), ["query", "value"], r=4, backend="reference").eval()
    perturb_adapter(model)
    ids = token_ids()
    exported = torch.export.export(model, (ids,))
    torch.testing.assert_close(exported.module()(ids).logits, model(ids).logits)


@pytest.mark.parametrize("case_name", ["roberta-tiny", "llama-tiny"])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compiled_model_is_one_graph(case_name, backend):
    """torch.compile of an adapted transformers model (the benchmark's tiny cases) traces one graph with no break:
    a break per layer made compiled CondLoRA models slower than PEFT's (issue #11; torch 2.11's Dynamo could not
    trace torch.amp.is_autocast_available, nor an import on the first call)."""
    from torch._dynamo.utils import counters

    from condlora_kernels.bench import model as bench_model
    from condlora_kernels.bench.shapes import LLAMA_TINY, ROBERTA_TINY
    from condlora_kernels.ops.backends import available_backends

    if available_backends("cpu")[backend] is not None:
        pytest.skip(available_backends("cpu")[backend])
    case = {c.name: c for c in (ROBERTA_TINY, LLAMA_TINY)}[case_name]
    model = bench_model.build_model(case, torch.device("cpu"))
    model = bench_model.attach(f"condlora[{backend}]", model, case, dropout=0.1)
    batch = bench_model.make_batch(case, model, torch.device("cpu"))
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compiled(**batch).loss
        loss.backward()
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
