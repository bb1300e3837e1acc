"""export_peft_adapter: the adapter loads in PEFT and reproduces the CondLoRA model's outputs."""

import json
import warnings

import pytest
import torch
from torch import nn

from condlora_kernels import apply_condlora, condlora_layers, export_peft_adapter, merge_adapters_in_place
from tests.model_fixtures import perturb_adapter, tiny_bert, token_ids

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _outputs(model):
    """The logits and the last hidden states (where an adapter's effect is not squashed by the small head)."""
    out = model(token_ids(), output_hidden_states=True)
    return out.logits.detach(), out.hidden_states[-1].detach()


def _peft_outputs(directory, family="bert"):
    base = tiny_bert(family=family).eval()  # the same frozen weights as the CondLoRA model's base
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft: no base_model_name_or_path to check against
        model = peft.PeftModel.from_pretrained(base, directory).eval()
    return _outputs(model), model


@pytest.mark.parametrize("family", ["bert", "roberta"])
@pytest.mark.parametrize("mode", ["auto", "general"])
@pytest.mark.parametrize("modules_to_save", [None, ["classifier"]])
def test_peft_reproduces_the_outputs(tmp_path, family, mode, modules_to_save):
    model = apply_condlora(tiny_bert(family=family).eval(), ["query", "value", "intermediate.dense"], r=4, alpha=6,
                           mode=mode, modules_to_save=modules_to_save, backend="reference")
    perturb_adapter(model, std=3.0)
    ref = _outputs(model)
    frozen = _outputs(tiny_bert(family=family).eval())
    assert (ref[1] - frozen[1]).abs().max() > 1e-2  # the adapter changes the outputs well beyond the tolerance
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 6)
    assert config["modules_to_save"] == modules_to_save
    outputs, peft_model = _peft_outputs(tmp_path, family)
    for got, want in zip(outputs, ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    lora_layers = {n for n, m in peft_model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert lora_layers == {f"base_model.model.{n}" for n in condlora_layers(model)}  # exactly the adapted layers


def test_layers_of_two_calls_get_their_own_rank_and_alpha(tmp_path):
    model = apply_condlora(tiny_bert().eval(), ["query"], r=4, alpha=8, backend="reference")
    apply_condlora(model, ["value"], r=2, alpha=3, modules_to_save=["classifier"], backend="reference")
    perturb_adapter(model, std=3.0)
    export_peft_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert len(config["rank_pattern"]) == len(config["alpha_pattern"]) == 2  # the two value layers
    outputs, _ = _peft_outputs(tmp_path)
    for got, want in zip(outputs, _outputs(model)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_suffix_matches_of_peft_modules_to_save_are_exported_unchanged(tmp_path):
    """PEFT's modules_to_save matches by raw suffix: "head" also selects "pre_head", which is exported as is."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "pre_head": nn.Linear(8, 8), "head": nn.Linear(8, 2)}).eval()
    apply_condlora(model, ["proj"], r=2, modules_to_save=["head"], backend="reference")
    perturb_adapter(model)
    with pytest.warns(UserWarning, match="pre_head"):
        export_peft_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["head", "pre_head"]


def test_merged_layers_are_refused(tmp_path):
    model = apply_condlora(tiny_bert().eval(), ["query"], r=4, backend="reference")
    merge_adapters_in_place(model)
    with pytest.raises(ValueError, match="merged.*unmerge_adapters"):
        export_peft_adapter(model, tmp_path)
    assert not list(tmp_path.iterdir())


def test_tied_modules_to_save_are_refused_before_writing(tmp_path):
    """A modules_to_save module whose weight is tied to one outside it (the Llama-style tied embeddings): PEFT's copy
    of the module would untie them and the outputs would differ, so the export refuses and writes nothing."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = apply_condlora(model, ["q_proj"], r=2, modules_to_save=["embed_tokens"], backend="reference")
    with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight \(also lm_head\.weight\).*unties them"):
        export_peft_adapter(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    export_peft_adapter(apply_condlora(tiny_bert().eval(), ["query"], r=2, modules_to_save=["classifier"],
                                       backend="reference"), tmp_path / "untied")  # nothing tied: exported


def test_export_refuses_unwritable_paths_before_writing(tmp_path):
    model = apply_condlora(tiny_bert().eval(), ["query"], r=2, backend="reference")
    (tmp_path / "adapter_config.json").mkdir()
    with pytest.raises(ValueError, match=r"adapter_config.json is a folder, where the adapter writes a file"):
        export_peft_adapter(model, tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()
