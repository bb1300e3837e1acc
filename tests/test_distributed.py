"""CondLoRA under DDP: exact gradients or a clear error, in every configuration (docs/design.md §8.7).

Two CPU processes (gloo) train a tiny BERT (from a config, float64) for a few SGD steps on halves of each global
batch; a single process trains the same model on the whole global batches. Every configuration either matches
the single process (per-step losses averaged over the ranks, final generator and classifier parameters, both
ranks equal) within TOLERANCE, or raises ReentrantCheckpointDDPError in the first backward, naming both fixes.
The processes are spawned once for all configurations (a few seconds each, the rest is start-up).
"""

import dataclasses
import math
import os

import pytest
import torch

from condlora_kernels import apply_condlora, condlora_generators
from condlora_kernels.integrations import distributed
from tests.distributed_runs import run_in_processes

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

WORLD_SIZE = 2
STEPS, GLOBAL_BATCH, SEQ_LEN, VOCAB = 3, 4, 8, 50
LEARNING_RATE = 0.1
# float64 training: the DDP and single-process runs differ only by the order of the gradient sums (~1e-16 per
# step, ~1e-15 after 3 steps); the wrong-gradient configuration drifts by ~1e-1 (negative control below).
TOLERANCE = dict(rtol=1e-10, atol=1e-12)

# name: (how the model is trained, activation checkpointing: None / use_reentrant, DDP keyword arguments,
#        expected: "exact", "error" (ReentrantCheckpointDDPError) or "drift" (negative control: the guard is off))
CONFIGS = {
    "ddp": ("loop", None, {}, "exact"),
    "ddp-find-unused": ("loop", None, {"find_unused_parameters": True}, "exact"),
    "ddp-static": ("loop", None, {"static_graph": True}, "exact"),
    "non-reentrant": ("loop", False, {}, "exact"),
    "non-reentrant-find-unused": ("loop", False, {"find_unused_parameters": True}, "exact"),
    "non-reentrant-static": ("loop", False, {"static_graph": True}, "exact"),
    "reentrant": ("loop", True, {}, "error"),
    "reentrant-find-unused": ("loop", True, {"find_unused_parameters": True}, "error"),
    "reentrant-static": ("loop", True, {"static_graph": True}, "exact"),
    "reentrant-guard-off": ("loop", True, {}, "drift"),
    "trainer-non-reentrant": ("trainer", False, {}, "exact"),
    "trainer-reentrant": ("trainer", True, {}, "error"),
    "trainer-reentrant-static": ("trainer", True, {"static_graph": True}, "exact"),
    "accelerate-non-reentrant": ("accelerate", False, {}, "exact"),
    "accelerate-reentrant": ("accelerate", True, {}, "error"),
    "accelerate-reentrant-static": ("accelerate", True, {"static_graph": True}, "exact"),
}


def _model():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=16,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     initializer_range=0.3)  # large W0: a sizeable low-rank update
    model = transformers.BertForSequenceClassification(config).double()
    apply_condlora(model, ["query", "value"], r=4, modules_to_save=["classifier"])
    for generator in condlora_generators(model).values():  # theta_b = 0 at initialisation would zero dtheta_a
        torch.nn.init.normal_(generator.theta_b, std=0.3)
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, SEQ_LEN), generator=g)
    labels = torch.randint(0, 2, (STEPS, GLOBAL_BATCH), generator=g)
    return ids, labels


def _enable_checkpointing(model, use_reentrant):
    if use_reentrant is not None:  # transformers >= 5 renamed gradient_checkpointing_enable
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def _trained_state(model, losses):
    """What is compared: the per-step losses and every trainable parameter (generators and classifier)."""
    return {"losses": losses, "params": {n: p.detach().flatten().tolist() for n, p in model.named_parameters()
                                         if p.requires_grad}}


def _steps(model, optimizer, rank, world_size, backward=torch.Tensor.backward):
    """STEPS optimizer steps on this rank's share of each global batch (the whole batch when world_size is 1);
    the losses. Shared with tests/test_fsdp.py."""
    ids, labels = _batches()
    share = GLOBAL_BATCH // world_size
    losses = []
    for step in range(STEPS):
        rows = slice(rank * share, (rank + 1) * share)
        loss = model(input_ids=ids[step, rows], labels=labels[step, rows]).loss
        backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)


def _train_loop(model, rank, world_size, wrap=lambda m: m):
    """SGD on this rank's share of each global batch (the whole batch when world_size is 1)."""
    return _steps(wrap(model), _sgd(model), rank, world_size)


class _Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids, self.labels = (t.flatten(0, 1) for t in _batches())

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _train_trainer(model, ddp_kwargs, use_reentrant, output_dir):
    """transformers.Trainer launching DDP: consecutive global batches (sequential sampling, each rank one half),
    plain SGD at a constant rate, no clipping. average_tokens_across_devices=False: with its default the Trainer
    multiplies each rank's loss by the world size, expecting the model to divide by the global token count, which
    BertForSequenceClassification's loss does not (a transformers matter: gradients scaled by 2 with or without
    CondLoRA)."""
    args = transformers.TrainingArguments(
        output_dir=output_dir, use_cpu=True, per_device_train_batch_size=GLOBAL_BATCH // WORLD_SIZE,
        max_steps=STEPS, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", optim="sgd",
        weight_decay=0.0, max_grad_norm=0.0, average_tokens_across_devices=False, train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        ddp_static_graph=ddp_kwargs.get("static_graph"), **_checkpointing_args(use_reentrant))
    return _trainer_losses(model, args)[1]


def _checkpointing_args(use_reentrant):
    """TrainingArguments' checkpointing fields under either name: `activation_checkpointing*` in recent
    transformers 5.x, `gradient_checkpointing*` before (5.17 has only those)."""
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": use_reentrant is not None,
            f"{prefix}_checkpointing_kwargs": None if use_reentrant is None else {"use_reentrant": use_reentrant}}


def _trainer_losses(model, args):
    """(the trainer, the loss of every step) of transformers.Trainer on _Rows. Shared with tests/test_fsdp.py."""
    losses = []

    class RecordingTrainer(transformers.Trainer):  # the logged loss is rounded: record the exact one
        def compute_loss(self, *args, **kwargs):
            loss = super().compute_loss(*args, **kwargs)
            losses.append((loss[0] if isinstance(loss, tuple) else loss).item())
            return loss

    trainer = RecordingTrainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    return trainer, losses


def _train_accelerate(model, ddp_kwargs, use_reentrant, rank):
    import accelerate

    _enable_checkpointing(model, use_reentrant)
    accelerator = accelerate.Accelerator(
        cpu=True, kwargs_handlers=[accelerate.DistributedDataParallelKwargs(**ddp_kwargs)])
    wrapped, optimizer = accelerator.prepare(model, _sgd(model))
    return _steps(wrapped, optimizer, rank, WORLD_SIZE, accelerator.backward)


def _run_config(name, rank, output_dir):
    how, use_reentrant, ddp_kwargs, expected = CONFIGS[name]
    model = _model()
    guard = distributed.check_recomputation
    if expected == "drift":
        distributed.check_recomputation = lambda layer: None
    try:
        if how == "loop":
            _enable_checkpointing(model, use_reentrant)
            wrap = lambda m: torch.nn.parallel.DistributedDataParallel(m, **ddp_kwargs)  # noqa: E731
            losses = _train_loop(model, rank, WORLD_SIZE, wrap)
        elif how == "trainer":
            losses = _train_trainer(model, ddp_kwargs, use_reentrant, os.path.join(output_dir, name))
        else:
            losses = _train_accelerate(model, ddp_kwargs, use_reentrant, rank)
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which checks the type and message
        return {"error_type": type(exc).__name__, "error": str(exc), **_trained_state(model, [])}
    finally:
        distributed.check_recomputation = guard
    return _trained_state(model, losses)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config name: (rank 0 result, rank 1 result)}, all configurations in one pair of processes."""
    pytest.importorskip("accelerate")
    return run_in_processes(_run_config, CONFIGS, WORLD_SIZE, str(tmp_path_factory.mktemp("ddp")))


@pytest.fixture(scope="module")
def single_process():
    model = _model()
    losses = _train_loop(model, rank=0, world_size=1)
    return _trained_state(model, losses)


def _max_excess(out, ref):
    """max(|out - ref| - (atol + rtol |ref|)) over the elements: <= 0 when within TOLERANCE."""
    out, ref = torch.tensor(out, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
    return ((out - ref).abs() - (TOLERANCE["atol"] + TOLERANCE["rtol"] * ref.abs())).max().item()


def _mismatches(ranks, reference):
    """Human-readable list of what differs from the single process (empty when everything is within TOLERANCE)."""
    bad = []
    mean_losses = [sum(step) / len(step) for step in zip(*(r["losses"] for r in ranks))]
    if len(mean_losses) != STEPS or _max_excess(mean_losses, reference["losses"]) > 0:
        bad.append(f"losses {mean_losses} != single process {reference['losses']}")
    for rank, result in enumerate(ranks):
        assert sorted(result["params"]) == sorted(reference["params"])
        for name, ref in reference["params"].items():
            diff = max(abs(a - b) for a, b in zip(result["params"][name], ref))
            if _max_excess(result["params"][name], ref) > 0:
                bad.append(f"rank {rank} {name}: max |difference| {diff:.3e} from the single process")
    return bad


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[3] == "exact"])
def test_exact(runs, single_process, name):
    ranks = runs[name]
    errors = [r["error_type"] + ": " + r["error"] for r in ranks if "error" in r]
    assert not errors, errors
    bad = _mismatches(ranks, single_process)
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[3] == "error"])
def test_refused_before_the_first_step(runs, name):
    initial = _trained_state(_model(), [])
    for result in runs[name]:
        assert result.get("error_type") == "ReentrantCheckpointDDPError", result.get("error", "no error raised")
        assert "use_reentrant=False" in result["error"] and "static_graph=True" in result["error"]
        assert "'query'" in result["error"] or "'value'" in result["error"]  # names the generator
        assert result["params"] == initial["params"], "an optimizer step ran before the error"


@pytest.mark.parametrize("hooks_readable", [True, False], ids=["saved-tensors-hooks", "frames"])
def test_reentrant_recomputation_told_apart(hooks_readable, monkeypatch):
    """What the guard sees inside a recomputation: torch's non-reentrant checkpoint or not, through the
    saved-tensors hooks stack (torch >= 2.8) and through the frames (older torch)."""
    if not hooks_readable:
        monkeypatch.setattr(distributed, "_top_saved_tensors_hooks", None)
    seen = {}

    def block(x, use_reentrant):
        if torch._C._current_graph_task_id() != -1:  # the recomputation
            seen[use_reentrant] = distributed._non_reentrant_recomputation()
        return x.sin()

    for use_reentrant in (True, False):
        x = torch.randn(3, requires_grad=True)
        torch.utils.checkpoint.checkpoint(block, x, use_reentrant, use_reentrant=use_reentrant).sum().backward()
    assert seen == {True: False, False: True}


def test_reentrant_checkpointing_without_ddp_is_exact():
    """The guard only refuses reentrant recomputation under DDP: a single process gets the same gradients with
    reentrant, non-reentrant or no checkpointing."""
    ids, labels = (t[0] for t in _batches())
    grads = {}
    for use_reentrant in (None, True, False):
        model = _model()
        _enable_checkpointing(model, use_reentrant)
        model(input_ids=ids, labels=labels).loss.backward()
        grads[use_reentrant] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for use_reentrant in (True, False):
        for name, grad in grads[None].items():
            torch.testing.assert_close(grads[use_reentrant][name], grad, **TOLERANCE, msg=f"{use_reentrant} {name}")


def test_guard_off_drifts(runs, single_process):
    """Negative control: without the guard, reentrant checkpointing under plain DDP trains silently wrong, far
    outside TOLERANCE (so the exact configurations above are a real check)."""
    ranks = runs["reentrant-guard-off"]
    assert all("error" not in r for r in ranks), ranks
    bad = _mismatches(ranks, single_process)
    assert any("generator" in line for line in bad), "expected the generators to drift"
    drift = max(abs(a - b) for name in single_process["params"] if "generator" in name
                for a, b in zip(ranks[0]["params"][name], ranks[1]["params"][name]))
    assert drift > 1e-3 and math.isfinite(drift), f"rank 0 and rank 1 generators differ by only {drift:.2e}"
