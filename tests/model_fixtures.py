"""Tiny transformers models built from configs (nothing downloaded) and a check that a failed call left a model
exactly as it was. Shared by the model-level test files."""

import copy

import torch
from torch import nn

VOCAB = 50


def tiny_bert(seed: int = 0, hidden: int = 32, layers: int = 2, family: str = "bert", dropout: float = 0.1):
    """A BERT (or RoBERTa) sequence classifier, hidden 32, 2 layers: the same weights for the same seed."""
    import transformers

    torch.manual_seed(seed)
    kwargs = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=48,
                  vocab_size=VOCAB, max_position_embeddings=24, num_labels=2, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout)
    if family == "roberta":
        return transformers.RobertaForSequenceClassification(transformers.RobertaConfig(**kwargs, pad_token_id=1))
    return transformers.BertForSequenceClassification(transformers.BertConfig(**kwargs))


def token_ids(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def perturb_adapter(model: nn.Module, std: float = 0.1, seed: int = 2) -> None:
    """Random theta_b (theta_b starts at zero: the adapter would change nothing) and random modules_to_save."""
    from condlora_kernels import condlora_generators

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for generator in condlora_generators(model).values():
            generator.theta_b.copy_(torch.randn(generator.theta_b.shape, generator=gen) * std)
        for name, param in model.named_parameters():
            if param.requires_grad and "generator" not in name:
                param.add_(torch.randn(param.shape, generator=gen) * std)


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was."""
    return {"state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "modules": {n: type(m) for n, m in model.named_modules()},
            "training": {n: m.training for n, m in model.named_modules()},
            "attributes": sorted(vars(model)),
            "config": copy.deepcopy(getattr(model, "condlora_config", None))}


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["flags"] == before["flags"]
    assert after["training"] == before["training"]
    assert after["attributes"] == before["attributes"]
    assert after["config"] == before["config"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key
