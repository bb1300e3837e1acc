"""apply_condlora on transformers models and plain modules: parameter counts, sharing, freezing, merge, save/load."""

import pytest
import torch
from torch import nn

from condlora_kernels import (FusedCondLoRALinear, apply_condlora, condlora_generators, condlora_layers,
                              load_condlora, merge_and_unload, merge_condlora, save_condlora, unmerge_condlora)

transformers = pytest.importorskip("transformers")


def _trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def roberta_base():
    torch.manual_seed(0)
    return transformers.RobertaModel(transformers.RobertaConfig())  # roberta-base sizes, nothing downloaded


def test_roberta_base_paper_parameter_count(roberta_base):
    """Paper Table 4: CondLoRA on query and value, r=8: 24,576 trainable parameters (LoRA: 294,912)."""
    model = apply_condlora(roberta_base, ["query", "value"], r=8, alpha=8, backend="reference")
    assert _trainable(model) == 24_576
    layers = condlora_layers(model)
    assert len(layers) == 24
    gens = condlora_generators(model)
    assert sorted(gens) == ["query", "value"]
    assert all(layer.generator is gens["query"] for name, layer in layers.items() if name.endswith("query"))
    assert all(layer.mode == "paper" for layer in layers.values())
    # each theta exactly once in model.parameters()
    ids = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(ids) == len(set(ids)) == 4


def test_lora_count_for_comparison():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = transformers.RobertaModel(transformers.RobertaConfig(num_hidden_layers=12))
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"]))
    assert _trainable(lora) == 294_912


def _tiny_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                  vocab_size=50, max_position_embeddings=16, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def test_starts_at_frozen_model_and_trains():
    model = _tiny_bert().eval()
    ids = torch.randint(0, 50, (2, 7))
    before = model(ids).logits.detach()
    apply_condlora(model, ["query", "value", "intermediate.dense"], r=4, modules_to_save=["classifier"],
                   backend="reference")
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)
    assert condlora_layers(model)["bert.encoder.layer.0.intermediate.dense"].mode == "general"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("classifier" in n for n in trainable)
    assert all("generator" in n or "classifier" in n for n in trainable)
    model.train()
    out = model(ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_regex_targets_like_peft():
    model = _tiny_bert()
    apply_condlora(model, r".*attention\.self\.(query|key)", r=2, backend="reference")
    assert sorted(condlora_generators(model)) == ["key", "query"]
    assert len(condlora_layers(model)) == 4


def test_no_match_is_an_error():
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        apply_condlora(_tiny_bert(), ["qkv_proj"], backend="reference")


def test_shapes_differing_within_a_target_get_one_generator_each():
    model = nn.ModuleDict({"a": nn.ModuleDict({"proj": nn.Linear(8, 8)}), "b": nn.ModuleDict({"proj": nn.Linear(8, 12)}),
                           "c": nn.ModuleDict({"proj": nn.Linear(8, 8)})})
    apply_condlora(model, ["proj"], r=2, backend="reference")
    gens = condlora_generators(model)
    assert sorted(gens) == ["proj", "proj__12x8"]
    assert model["a"]["proj"].generator is model["c"]["proj"].generator


def test_merge_unmerge_and_unload():
    model = _tiny_bert().eval()
    apply_condlora(model, ["query", "value"], r=4, backend="reference")
    for gen in condlora_generators(model).values():
        nn.init.normal_(gen.theta_b, std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).logits.detach()
    weights = {n: l.weight.detach().clone() for n, l in condlora_layers(model).items()}
    merge_condlora(model)
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    unmerge_condlora(model)
    assert all(torch.equal(l.weight, weights[n]) for n, l in condlora_layers(model).items())
    merge_and_unload(model)
    assert not condlora_layers(model)
    assert not any(isinstance(m, FusedCondLoRALinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_save_and_load_roundtrip(tmp_path):
    model = _tiny_bert().eval()
    apply_condlora(model, ["query", "value"], r=4, modules_to_save=["classifier"], backend="reference")
    for gen in condlora_generators(model).values():
        nn.init.normal_(gen.theta_b, std=0.1)
    ids = torch.randint(0, 50, (2, 7))
    ref = model(ids).logits.detach()
    save_condlora(model, tmp_path)
    fresh = _tiny_bert().eval()  # same seed: same frozen weights, fresh generators
    load_condlora(fresh, tmp_path)
    torch.testing.assert_close(fresh(ids).logits, ref, rtol=0, atol=0)
    assert _trainable(fresh) == _trainable(model)


def test_torch_export_of_unmerged_model():
    layer = FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, backend="reference").eval()
    nn.init.normal_(layer.generator.theta_b)
    x = torch.randn(3, 8)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))
