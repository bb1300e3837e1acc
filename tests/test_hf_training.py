"""Training a CondLoRA model with the Hugging Face stack on CPU: the Trainer's checkpoints and resume, bf16,
accelerate, gradient checkpointing (reentrant and not)."""

import os

import pytest
import torch

from condlora_kernels import apply_condlora
from tests.model_fixtures import VOCAB, perturb_adapter, tiny_bert, token_ids

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
safetensors_torch = pytest.importorskip("safetensors.torch")


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=8):
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(2, VOCAB, (n, seq), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model(seed=0):
    model = apply_condlora(tiny_bert(seed), ["query", "value"], r=4, dropout=0.1, modules_to_save=["classifier"])
    if seed:
        perturb_adapter(model, seed=seed)  # another starting point: a resume must overwrite it
    return model


def _train(output_dir, model, resume=None, max_steps=6, **kwargs):
    args = transformers.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=4,
                                          max_steps=max_steps, save_steps=3, learning_rate=1e-2, report_to="none", use_cpu=True, seed=0,
                                          disable_tqdm=True, logging_steps=1, **kwargs)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sentences())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_checkpoints_and_resume_reproduce_the_run(tmp_path):
    model = _model()
    start = _adapter_state(model)
    _train(tmp_path / "full", model)
    final = _adapter_state(model)
    assert all(not torch.equal(final[n], start[n]) for n in final)
    checkpoint = tmp_path / "full" / "checkpoint-3"
    saved = safetensors_torch.load_file(str(checkpoint / "model.safetensors"))
    assert sorted(k for k in saved if "theta" in k) == sorted(k for k in final if "theta" in k)
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= set(os.listdir(checkpoint))

    resumed = _model(seed=7)
    trainer = _train(tmp_path / "resumed", resumed, resume=str(checkpoint))
    assert trainer.state.global_step == 6
    for name, value in _adapter_state(resumed).items():
        assert torch.equal(value, final[name]), name  # bit for bit, as the uninterrupted run


def test_trainer_bf16_on_cpu(tmp_path):
    model = _model()
    start = _adapter_state(model)
    trainer = _train(tmp_path, model, max_steps=2, bf16=True, save_strategy="no")
    assert trainer.accelerator.mixed_precision == "bf16"  # CPU autocast to bfloat16
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for name, value in _adapter_state(model).items():
        assert value.dtype == torch.float32 and not torch.equal(value, start[name])


def _three_steps(model, accelerator=None):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loader = torch.utils.data.DataLoader(_Sentences(), batch_size=4, shuffle=False)
    if accelerator is not None:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    torch.manual_seed(3)  # the dropout masks
    for step, batch in enumerate(loader):
        if step == 3:
            break
        loss = model(**batch).loss
        loss.backward() if accelerator is None else accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return _adapter_state(model if accelerator is None else accelerator.unwrap_model(model))


def test_accelerate_prepare_trains_as_plain_pytorch():
    accelerate = pytest.importorskip("accelerate")
    # accelerate's state is a process-wide singleton: the Trainer runs above left theirs (bf16 autocast included)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    expected = _three_steps(_model())
    got = _three_steps(_model(), accelerate.Accelerator(cpu=True, mixed_precision="no"))
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant):
    ids, labels = token_ids(batch=4, seq=8), torch.tensor([0, 1, 1, 0])

    def gradients(model):
        model.train()
        torch.manual_seed(5)  # the same dropout masks (the checkpoint's recompute replays the RNG state)
        model(ids, labels=labels).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected = gradients(_model(seed=2))
    model = _model(seed=2)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; gradient_checkpointing_enable before
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    got = gradients(model)
    assert got.keys() == expected.keys() and len([n for n in got if n.startswith("condlora_generators.")]) == 4
    for name in expected:
        assert expected[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7)
