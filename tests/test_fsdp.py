"""CondLoRA under FSDP2 (`torch.distributed.fsdp.fully_shard`): each block sharded, then the root (§8.7).

Two CPU processes (gloo) train a tiny BERT (from a config) for a few AdamW steps on halves of each global batch;
a single process trains the same model on the whole global batches. The generators live in the root's FSDP unit:
the layers must read them whole in every block's forward and recomputation, and their gradients must add up over
every layer before the root's reduce-scatter. Checked per configuration: the per-step losses (averaged over the
ranks) and the final trainable parameters (generators, classifier; gathered from the shards) against the single
process, and what each layer read at each call. The HF Trainer and accelerate take their FSDP2 path only on
accelerators (accelerate ignores the FSDP plugin under MULTI_CPU and wraps the model in DDP instead): here the
accelerate state is switched to FSDP as it is on GPUs (`_fsdp_state_on_cpu`), which runs their real sharding
code (`fsdp2_prepare_model`: auto-wrap of BertLayer, the embeddings' own unit, the root, CheckpointWrapper,
loading the full state dict from rank 0 into a model moved to the meta device). The processes are spawned once
for all configurations.
"""

import contextlib
import copy
import functools
import os

import pytest
import torch

from condlora_kernels import (apply_condlora, condlora_generators, condlora_layers, load_condlora, save_condlora,
                              shard_condlora_model)
from tests.distributed_runs import run_in_processes
from tests.test_distributed import GLOBAL_BATCH, STEPS, _batches, _enable_checkpointing, _steps, _trainer_losses

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

WORLD_SIZE = 2
LEARNING_RATE = 0.02
# float64: FSDP2 and the single process differ only by the order of the gradient sums (~1e-16 a step); the
# negative control (blocks sharded, the root not) drifts by 0.12.
EXACT = dict(rtol=1e-9, atol=1e-11)
# bf16 parameters (MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)) against one process doing
# the same arithmetic (_single_process_bf16_policy): measured bit for bit equal on CPU; allowed: float32 round-off
# of the gradient average. (Against float32 training the run differs by up to 40% of the update on this model,
# whose large weights make bf16's own rounding show: that is bf16, not sharding.)
BF16 = dict(rtol=1e-6, atol=1e-7)

# name: (how it is sharded and trained, model dtype, expected: "exact" / "bf16" / "drift" / "error")
CONFIGS = {
    "per-block": ("per-block", torch.float64, "exact"),
    "helper-non-reentrant": ("helper non-reentrant", torch.float64, "exact"),
    "helper-reentrant": ("helper reentrant", torch.float64, "exact"),
    "root-only": ("root", torch.float64, "exact"),
    "bf16-mixed-precision": ("helper bf16", torch.float32, "bf16"),
    "accelerate": ("accelerate", torch.float64, "exact"),
    "trainer": ("trainer", torch.float64, "exact"),
    "blocks-only": ("blocks", torch.float64, "drift"),
    "store-sharded": ("store", torch.float64, "error"),
    "store-sharded-then-helper": ("store helper", torch.float64, "error"),
    "layer-called-alone": ("per-block layer-alone", torch.float64, "error"),
}
SAVED_FROM = "per-block"  # the run whose adapter is saved (on every rank: save_condlora gathers the shards)


def _base_model(dtype):
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=48, vocab_size=50, max_position_embeddings=16,
                                     num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     initializer_range=0.3)  # large W0: a sizeable low-rank update
    return transformers.BertForSequenceClassification(config).to(dtype)


def _model(dtype=torch.float64):
    model = _base_model(dtype)
    apply_condlora(model, ["query", "value"], r=4, modules_to_save=["classifier"])
    for generator in condlora_generators(model).values():  # theta_b = 0 at initialisation would zero dtheta_a
        torch.nn.init.normal_(generator.theta_b, std=0.3)
    return model.train()


def _optimizer(params):
    return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)  # as the Trainer's below


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # a DTensor: gather the shards


def _trained_state(model, losses):
    return {"losses": losses, "params": {n: _full(p.detach()).flatten().tolist()
                                         for n, p in model.named_parameters() if p.requires_grad}}


def _train_loop(model, rank, world_size):
    """AdamW on this rank's share of each global batch (the whole batch when world_size is 1)."""
    return _steps(model, _optimizer([p for p in model.parameters() if p.requires_grad]), rank, world_size)


# --------------------------------------------------------------------------------------------------
# The two processes
# --------------------------------------------------------------------------------------------------


def _record_reads(model, reads):
    """Before every CondLoRA layer call: (inside a backward, i.e. a recomputation; theta_a's type, shape, dtype;
    W0's type)."""
    def record(layer, args):
        theta_a = layer.generator.theta_a
        reads.append((torch._C._current_graph_task_id() != -1, type(theta_a).__name__, list(theta_a.shape),
                      str(theta_a.dtype), type(layer.weight).__name__))
    for layer in condlora_layers(model).values():
        layer.register_forward_pre_hook(record)


@contextlib.contextmanager
def _record_backward_order(model, events):
    """In the backward: ("layer", generator key) when a CondLoRA layer's output gradient arrives (its backward
    runs next), ("reduce-scatter", elements) for each reduce-scatter FSDP2 issues (through
    torch.distributed.reduce_scatter_single in torch 2.14)."""
    original = torch.distributed.reduce_scatter_single

    def reduce_scatter(*args, **kwargs):
        events.append(("reduce-scatter", (kwargs["input"] if "input" in kwargs else args[1]).numel()))
        return original(*args, **kwargs)

    def on_output(layer, args, output):
        output.register_hook(lambda grad: events.append(("layer", layer.generator_key)))

    handles = [layer.register_forward_hook(on_output) for layer in condlora_layers(model).values()]
    torch.distributed.reduce_scatter_single = reduce_scatter
    try:
        yield
    finally:
        torch.distributed.reduce_scatter_single = original
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _fsdp_state_on_cpu():
    """accelerate switches to FSDP only on accelerators; under MULTI_CPU it ignores the plugin and wraps the model
    in DDP. Switch it as its GPU branch does, so that Accelerator.prepare (and the Trainer) run fsdp2_prepare_model."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    @functools.wraps(original)
    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original
        AcceleratorState._reset_state(reset_partial_state=True)


def _train_accelerate(model, rank):
    import accelerate

    plugin = accelerate.FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["BertLayer"],
        activation_checkpointing=True, cpu_ram_efficient_loading=True)
    with _fsdp_state_on_cpu():
        accelerator = accelerate.Accelerator(cpu=True, fsdp_plugin=plugin)
        optimizer = _optimizer([p for p in model.parameters() if p.requires_grad])
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        assert type(wrapped.bert.encoder.layer[0]).__name__ == "FSDPCheckpointWrapper", "not accelerate's FSDP2"
        losses = _steps(wrapped, optimizer, rank, WORLD_SIZE, accelerator.backward)
    return wrapped, losses


def _train_trainer(model, output_dir):
    """The Trainer's FSDP2 path (fsdp_config version 2, BertLayer blocks), AdamW as _optimizer, consecutive
    global batches (sequential sampling), no clipping; average_tokens_across_devices=False as in
    tests/test_distributed.py (BertForSequenceClassification's loss is a per-rank mean)."""
    args = transformers.TrainingArguments(
        output_dir=output_dir, use_cpu=True, per_device_train_batch_size=GLOBAL_BATCH // WORLD_SIZE,
        max_steps=STEPS, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", optim="adamw_torch",
        weight_decay=0.0, max_grad_norm=0.0, average_tokens_across_devices=False, train_sampling_strategy="sequential",
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["BertLayer"]})
    with _fsdp_state_on_cpu():
        trainer, losses = _trainer_losses(model, args)
    assert type(trainer.model).__name__.startswith("FSDP"), "not the Trainer's FSDP2 path"
    return trainer.model, losses


def _shard(model, how):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.fsdp import fully_shard as fsdp_fully_shard

    # the ranks train on the CPU (gloo): without a mesh, fully_shard would take a GPU's mesh on a host that has one
    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    fully_shard = functools.partial(fsdp_fully_shard, mesh=mesh)
    blocks = model.bert.encoder.layer
    if how.startswith("per-block"):  # the recipe written out
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
        if how.endswith("layer-alone"):  # a layer called outside the sharded model's forward
            model.bert.encoder.layer[0].attention.self.query(torch.randn(2, 32, dtype=torch.float64))
    elif how == "root":
        fully_shard(model)
    elif how == "blocks":  # the root forgotten: the generators are in no FSDP unit
        for block in blocks:
            fully_shard(block)
    elif how.startswith("store"):  # the generators sharded on their own (fully_shard refuses the ModuleDict)
        for generator in model.condlora_generators.values():
            fully_shard(generator)
        if how.endswith("helper"):
            shard_condlora_model(model, mesh=mesh)
        for block in blocks:
            fully_shard(block)
        fully_shard(model)
    elif how == "helper non-reentrant":  # the default blocks: _no_split_modules ({BertLayer, BertEmbeddings} in
        _enable_checkpointing(model, False)  # transformers 5; BERT lists none in transformers 4)
        shard_condlora_model(model, mesh=mesh, **({} if getattr(model, "_no_split_modules", None) else
                                       {"block_classes": ["BertLayer"]}))
    elif how == "helper reentrant":
        _enable_checkpointing(model, True)
        shard_condlora_model(model, block_classes=["BertLayer"], mesh=mesh)
    else:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_condlora_model(model, block_classes=[transformers.models.bert.modeling_bert.BertLayer], mp_policy=policy,
                             mesh=mesh)


def _run_config(name, rank, output_dir):
    how, dtype, _ = CONFIGS[name]
    model, reads, events = _model(dtype), [], []
    try:
        if how == "accelerate":
            model, losses = _train_accelerate(model, rank)
        elif how == "trainer":
            model, losses = _train_trainer(model, os.path.join(output_dir, name))
        else:
            _shard(model, how)
            _record_reads(model, reads)
            recording = name == "per-block" and hasattr(torch.distributed, "reduce_scatter_single")
            with _record_backward_order(model, events) if recording else contextlib.nullcontext():
                losses = _train_loop(model, rank, WORLD_SIZE)
        if name == SAVED_FROM:
            save_condlora(model, os.path.join(output_dir, "adapter"))
    except Exception as exc:  # noqa: BLE001 -- reported to the parent, which checks the type and message
        return {"error_type": type(exc).__name__, "error": str(exc), "losses": [], "reads": reads}
    return {**_trained_state(model, losses), "reads": reads, "backward": events}


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{config name: (rank 0 result, rank 1 result)}, and the folder holding the saved adapter."""
    pytest.importorskip("accelerate")
    output_dir = str(tmp_path_factory.mktemp("fsdp"))
    return run_in_processes(_run_config, CONFIGS, WORLD_SIZE, output_dir), output_dir


@functools.lru_cache(maxsize=None)
def _single_process_model(dtype):
    model = _model(dtype)
    losses = _train_loop(model, rank=0, world_size=1)
    return model, losses


def _single_process(dtype):
    return _trained_state(*_single_process_model(dtype))


def _single_process_bf16_policy():
    """One process doing FSDP2's mixed-precision arithmetic on both halves of each global batch: float32 master
    parameters, a bfloat16 copy for the forward and backward (generators included), each half's gradients cast
    to float32 and averaged, AdamW on the masters."""
    master = _model(torch.float32)
    compute = copy.deepcopy(master)
    for param in compute.parameters():  # directly: CondLoRAGenerator._apply keeps its masters in float32
        param.data = param.data.to(torch.bfloat16)
    masters = [p for p in master.parameters() if p.requires_grad]
    copies = [p for p in compute.parameters() if p.requires_grad]
    optimizer = _optimizer(masters)
    ids, labels = _batches()
    share, losses = GLOBAL_BATCH // WORLD_SIZE, []
    for step in range(STEPS):
        halves = []
        for rank in range(WORLD_SIZE):
            rows = slice(rank * share, (rank + 1) * share)
            loss = compute(input_ids=ids[step, rows], labels=labels[step, rows]).loss
            loss.backward()
            halves.append(loss.item())
            for m, c in zip(masters, copies):
                m.grad = c.grad.float() / WORLD_SIZE + (m.grad if rank else 0.0)
                c.grad = None
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for m, c in zip(masters, copies):
                c.copy_(m)
        losses.append(sum(halves) / WORLD_SIZE)
    return _trained_state(master, losses)


def _differences(ranks, reference, tolerance):
    """Lines naming what differs from the single process beyond `tolerance`, and the largest differences."""
    bad, largest = [], {"losses": 0.0, "params": 0.0}

    def compare(what, out, ref):
        out, ref = torch.tensor(out, dtype=torch.float64), torch.tensor(ref, dtype=torch.float64)
        diff = (out - ref).abs().max().item()
        largest[what.split()[0]] = max(largest[what.split()[0]], diff)
        if not torch.allclose(out, ref, **tolerance):
            bad.append(f"{what}: max |difference| {diff:.3e} from the single process")

    mean_losses = [sum(step) / len(step) for step in zip(*(r["losses"] for r in ranks))]
    assert len(mean_losses) == STEPS, ranks
    compare("losses", mean_losses, reference["losses"])
    for rank, result in enumerate(ranks):
        assert sorted(result["params"]) == sorted(reference["params"])
        for name, ref in reference["params"].items():
            compare(f"params rank {rank} {name}", result["params"][name], ref)
    return bad, largest


def _no_errors(ranks):
    errors = [r["error_type"] + ": " + r["error"] for r in ranks if "error" in r]
    assert not errors, errors


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[2] == "exact"])
def test_matches_single_process(runs, name):
    ranks = runs[0][name]
    _no_errors(ranks)
    bad, _ = _differences(ranks, _single_process(torch.float64), EXACT)
    assert not bad, "\n".join(bad)


def test_bf16_mixed_precision_policy(runs):
    """MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32): the layers read bf16 generators (the op
    casts nothing and returns bf16 gradients, reduced in float32), and the run equals one process doing the same
    mixed-precision arithmetic; it is not float32 training (the policy was applied)."""
    ranks = runs[0]["bf16-mixed-precision"]
    _no_errors(ranks)
    bad, _ = _differences(ranks, _single_process_bf16_policy(), BF16)
    assert not bad, "\n".join(bad)
    _, from_float32 = _differences(ranks, _single_process(torch.float32), BF16)
    assert from_float32["losses"] > 1e-4 and from_float32["params"] > 1e-4, from_float32
    reads = ranks[0]["reads"]
    assert reads and all(r[3] == "torch.bfloat16" for r in reads), "the layers did not read bf16 generators"


@pytest.mark.parametrize("name", ["per-block", "helper-non-reentrant", "helper-reentrant", "bf16-mixed-precision"])
def test_layers_read_the_whole_generators(runs, name):
    """In every block's forward and in every recomputation, each layer reads the whole, unsharded generator and
    weight (plain parameters gathered by the root's and the block's FSDP units), never a DTensor shard."""
    for result in runs[0][name]:
        reads = result["reads"]
        assert len(reads) >= STEPS * 4, reads  # 2 blocks x (query, value) per forward
        for _, theta_type, shape, _, weight_type in reads:
            assert (theta_type, shape, weight_type) == ("Parameter", [4, 32], "Parameter"), reads
        recomputed = [r for r in reads if r[0]]
        assert len(recomputed) == (len(reads) // 2 if "helper-" in name else 0), reads  # checkpointed: once more


def test_one_reduce_scatter_after_every_layer(runs):
    """The generators' gradients are reduce-scattered once per backward, after every layer has added its part:
    the blocks have no trainable parameter (nothing to reduce), the root's unit holds the generators and the
    classifier."""
    events = runs[0]["per-block"][0]["backward"]
    if not events:
        pytest.skip("this torch issues FSDP2's reduce-scatter through another function")
    trainable = sum(len(values) for values in _single_process(torch.float64)["params"].values())
    layers = len(condlora_layers(_model()))
    step = [("layer", key) for key in ["value", "query"] * (layers // 2)] + [("reduce-scatter", trainable)]
    assert [tuple(e) for e in events] == step * STEPS, events


def test_root_left_out_drifts(runs):
    """Negative control: blocks sharded but not the root leaves the generators in no FSDP unit: each rank trains
    its own copy (why shard_condlora_model always shards the root), far outside EXACT."""
    ranks = runs[0]["blocks-only"]
    _no_errors(ranks)
    bad, _ = _differences(ranks, _single_process(torch.float64), EXACT)
    assert any("generator" in line for line in bad), "expected the generators to drift"
    drift = max(abs(a - b) for name in ranks[0]["params"] if "generator" in name
                for a, b in zip(ranks[0]["params"][name], ranks[1]["params"][name]))
    assert drift > 1e-2, f"rank 0 and rank 1 generators differ by only {drift:.2e}"  # measured: 0.12


@pytest.mark.parametrize("name", ["store-sharded", "layer-called-alone"])
def test_sharded_generator_is_refused(runs, name):
    """A layer that would read a generator shard: ShardedTensorError, naming the generator and the recipe."""
    for result in runs[0][name]:
        assert result.get("error_type") == "ShardedTensorError", result.get("error", "no error raised")
        assert "condlora_generators" in result["error"] and "shard_condlora_model" in result["error"]
        assert "'query'" in result["error"]


def test_helper_refuses_a_sharded_generator_store(runs):
    for result in runs[0]["store-sharded-then-helper"]:
        assert result.get("error_type") == "ValueError", result.get("error", "no error raised")
        assert "condlora_generators is sharded on its own" in result["error"]


def test_adapter_saved_under_fsdp2_reproduces_the_single_process(runs):
    """save_condlora on every rank of the FSDP2 run (it gathers the DTensor shards); loaded into a plain model,
    the adapter gives the single process's outputs."""
    _no_errors(runs[0][SAVED_FROM])
    trained, _ = _single_process_model(torch.float64)
    loaded = load_condlora(_base_model(torch.float64), os.path.join(runs[1], "adapter")).eval()
    ids = _batches()[0][0]
    with torch.no_grad():
        expected, got = trained.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits
    trained.train()
    torch.testing.assert_close(got, expected, **EXACT)
    untrained = _model(torch.float64).eval()(input_ids=ids).logits.detach()
    assert (expected - untrained).abs().max() > 1e-3, "training changed nothing: the comparison says nothing"


# --------------------------------------------------------------------------------------------------
# In this process: argument checks and the hot path's DTensor check
# --------------------------------------------------------------------------------------------------


class _Blocks(torch.nn.Module):
    """No _no_split_modules: shard_condlora_model needs block_classes."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_shard_helper_checks_its_arguments():
    """Refused before anything is sharded (no process group is needed to get these errors)."""
    model = apply_condlora(_Blocks(), ["0"], r=2)
    with pytest.raises(ValueError, match="block_classes is needed.*_no_split_modules"):
        shard_condlora_model(model)
    with pytest.raises(ValueError, match=r"\['Sequentail'\] match no module.*Sequential"):
        shard_condlora_model(model, block_classes=["Sequentail"])
    with pytest.raises(ValueError, match=r"\['BertLayer'\] match no module"):
        shard_condlora_model(model, block_classes=[transformers.models.bert.modeling_bert.BertLayer])
    with pytest.raises(TypeError, match="block_classes entries"):
        shard_condlora_model(model, block_classes=[3])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        shard_condlora_model("model", block_classes=["Sequential"])
    with pytest.raises(ValueError, match="block_classes is empty"):
        shard_condlora_model(model, block_classes=[])
    with pytest.raises(TypeError, match=r"mesh must be a DeviceMesh .* got 'cpu'"):
        shard_condlora_model(model, block_classes=["Sequential"], mesh="cpu")
    with pytest.raises(ValueError, match="shard_condlora_model: the model has no CondLoRA layers"):
        shard_condlora_model(_Blocks(), block_classes=["Sequential"])
    assert not any(type(m).__name__.startswith("FSDP") for m in model.modules())
