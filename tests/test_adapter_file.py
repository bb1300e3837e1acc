"""save_condlora / load_condlora: the format-2 file (self-contained, checksummed, written atomically), what load
refuses (damaged, edited or mismatched adapters) without changing the model, format-1 files, a kill during a save."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from torch import nn

from condlora_kernels import (CondLoRAGenerator, FusedCondLoRALinear, apply_condlora, condlora_generators,
                              load_condlora, merge_adapters_in_place, save_condlora)
from condlora_kernels.integrations import adapter_file
from condlora_kernels.integrations.adapter_file import CONFIG_NAME, WEIGHTS_NAME
from tests.model_fixtures import assert_unchanged, perturb_adapter, snapshot, tiny_bert, token_ids

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
from safetensors import safe_open  # noqa: E402

TARGETS = ["query", "value", "intermediate.dense"]


def _adapted(seed=0, **kwargs):
    settings = dict(r=4, alpha=8, dropout=0.1, modules_to_save=["classifier"], backend="reference")
    settings.update(kwargs)
    model = apply_condlora(tiny_bert(seed).eval(), settings.pop("targets", TARGETS), **settings)
    perturb_adapter(model)
    return model


@pytest.fixture
def saved(tmp_path):
    """(model, directory, reference logits) of a saved adapter."""
    model = _adapted()
    save_condlora(model, tmp_path)
    return model, tmp_path, model(token_ids()).logits.detach()


def _outputs_after_load(directory, **kwargs):
    fresh = tiny_bert(kwargs.pop("seed", 0), **kwargs).eval()
    load_condlora(fresh, directory)
    return fresh(token_ids()).logits.detach()


def test_file_is_self_contained_and_checksummed(saved):
    model, directory, _ = saved
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary file left
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        metadata, keys = f.metadata(), sorted(f.keys())
    assert keys == sorted(["condlora_generators.query.theta_a", "condlora_generators.query.theta_b",
                           "condlora_generators.value.theta_a", "condlora_generators.value.theta_b",
                           "condlora_generators.intermediate_dense.theta_a",
                           "condlora_generators.intermediate_dense.theta_b", "classifier.weight", "classifier.bias"])
    assert metadata["condlora_format_version"] == "2" and len(metadata["condlora_sha256"]) == 64
    config = json.loads(metadata["condlora_config"])
    assert config["apply_condlora_calls"] == model.condlora_config["apply_condlora_calls"]
    assert config["layers"]["bert.encoder.layer.1.intermediate.dense"] == {
        "in_features": 32, "out_features": 48, "bias": True, "r": 4, "alpha": 8, "dropout": 0.1, "mode": "general",
        "generator": "condlora_generators.intermediate_dense"}
    copy = json.loads((directory / CONFIG_NAME).read_text())
    assert copy == {**config, "sha256": metadata["condlora_sha256"]}


def test_load_into_a_fresh_and_into_an_adapted_model(saved):
    model, directory, ref = saved
    torch.testing.assert_close(_outputs_after_load(directory), ref, rtol=0, atol=0)
    adapted = _adapted(seed=0)
    with torch.no_grad():
        for g in condlora_generators(adapted).values():
            g.theta_b.zero_()
    load_condlora(adapted, directory)
    torch.testing.assert_close(adapted(token_ids()).logits, ref, rtol=0, atol=0)
    assert {n for n, p in adapted.named_parameters() if p.requires_grad} == \
        {n for n, p in model.named_parameters() if p.requires_grad}


def test_two_apply_calls_round_trip(tmp_path):
    model = _adapted(targets=["query"], modules_to_save=None)
    apply_condlora(model, ["value"], r=2, alpha=3, modules_to_save=["classifier"], backend="reference")
    perturb_adapter(model, seed=5)
    save_condlora(model, tmp_path)
    fresh = tiny_bert().eval()
    load_condlora(fresh, tmp_path)
    assert fresh.condlora_config == model.condlora_config
    torch.testing.assert_close(fresh(token_ids()).logits, model(token_ids()).logits, rtol=0, atol=0)


def test_layers_built_by_hand_round_trip(tmp_path):
    def build(seed):
        torch.manual_seed(seed)
        shared = CondLoRAGenerator(8, 8, r=2)
        return nn.Sequential(FusedCondLoRALinear.from_linear(nn.Linear(8, 8), r=2, generator=shared, backend="reference"),
                             FusedCondLoRALinear.from_linear(nn.Linear(8, 6), r=2, backend="reference")).eval()

    model = build(0)
    perturb_adapter(model)
    save_condlora(model, tmp_path)
    fresh = build(0)
    load_condlora(fresh, tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="built by hand"):
        load_condlora(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6)), tmp_path)


# --------------------------------------------------------------------------------------------------
# Damaged, edited or mismatched adapters: refused, the model unchanged
# --------------------------------------------------------------------------------------------------


def _refused(directory, match, model=None, error=ValueError):
    model = tiny_bert().eval() if model is None else model
    before = snapshot(model)
    with pytest.raises(error, match=match):
        load_condlora(model, directory)
    assert_unchanged(model, before)


def test_truncated_file_is_refused(saved):
    _, directory, _ = saved
    path = directory / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    _refused(directory, "damaged or truncated")
    path.write_bytes(b"")
    _refused(directory, "damaged or truncated")


def test_corrupted_tensor_bytes_are_refused(saved):
    _, directory, _ = saved
    path = directory / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40  # a bit of the last tensor's data
    path.write_bytes(bytes(data))
    _refused(directory, "fails its checksum")


def test_edited_config_in_the_weights_file_is_refused(saved):
    _, directory, _ = saved
    path = str(directory / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors_torch.load_file(path)
    config = json.loads(metadata["condlora_config"])
    config["apply_condlora_calls"][0]["alpha"] = 16
    safetensors_torch.save_file(tensors, path, metadata={**metadata, "condlora_config": json.dumps(config)})
    _refused(directory, "fails its checksum")


def test_edited_readable_copy_is_refused(saved):
    _, directory, _ = saved
    path = directory / CONFIG_NAME
    copy = json.loads(path.read_text())
    copy["apply_condlora_calls"][0]["mode"] = "general"
    path.write_text(json.dumps(copy))
    _refused(directory, r"condlora_config.json disagrees.*apply_condlora_calls")


def test_stale_or_missing_readable_copy_only_warns(saved):
    _, directory, ref = saved
    path = directory / CONFIG_NAME
    copy = json.loads(path.read_text())
    path.write_text(json.dumps({**copy, "sha256": "0" * 64, "apply_condlora_calls": []}))  # another save's copy
    with pytest.warns(UserWarning, match="stale"):
        torch.testing.assert_close(_outputs_after_load(directory), ref, rtol=0, atol=0)
    path.unlink()
    with pytest.warns(UserWarning, match="missing"):
        torch.testing.assert_close(_outputs_after_load(directory), ref, rtol=0, atol=0)


def test_newer_format_is_refused_naming_the_version(saved):
    _, directory, _ = saved
    path = str(directory / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    safetensors_torch.save_file(safetensors_torch.load_file(path), path,
                                metadata={**metadata, "condlora_format_version": "3"})
    _refused(directory, "adapter format 3.*reads formats 1 and 2")


def test_base_model_mismatches_are_refused(saved):
    _, directory, _ = saved
    _refused(directory, r"in_features=32 in the adapter, 64 in the model", model=tiny_bert(hidden=64).eval())
    _refused(directory, r"layers in the adapter but not in the model: bert.encoder.layer.1",
             model=tiny_bert(layers=1).eval())
    three_labels = tiny_bert().eval()
    three_labels.classifier = nn.Linear(32, 3)
    _refused(directory, r"classifier.weight: shape \(2, 32\) in the adapter, \(3, 32\) in the model",
             model=three_labels)


@pytest.mark.parametrize("change, match", [
    (dict(r=8), r"r=4 in the adapter, 8 in the model"),
    (dict(alpha=16), r"alpha=8 in the adapter, 16 in the model"),
    (dict(mode="general"), r"mode='paper' in the adapter, 'general' in the model"),
    (dict(targets=["query", "value"]), r"layers in the adapter but not in the model: .*intermediate.dense"),
    (dict(dropout=0.0), r"dropout=0.1 in the adapter, 0.0 in the model"),
])
def test_an_adapted_model_whose_config_disagrees_is_refused(saved, change, match):
    _, directory, _ = saved
    _refused(directory, match, model=_adapted(**change))


def test_loading_into_merged_layers_is_refused(saved):
    _, directory, _ = saved
    model = _adapted()
    merge_adapters_in_place(model)
    _refused(directory, "merged.*unmerge_adapters", model=model)


def test_missing_adapter_is_refused(tmp_path):
    _refused(tmp_path, "no CondLoRA adapter", error=FileNotFoundError)
    (tmp_path / "adapter_config.json").write_text("{}")
    _refused(tmp_path, "PEFT adapter: load it with peft", error=FileNotFoundError)


def test_load_failing_half_way_is_undone(saved, monkeypatch):
    """A failure after the layers were created (simulated in the tensor check) restores the model."""
    _, directory, _ = saved

    def fail(*args):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(adapter_file, "_check_fits", fail)
    _refused(directory, "simulated failure", error=RuntimeError)


# --------------------------------------------------------------------------------------------------
# Format 1 (earlier condlora_kernels versions), written by hand as they wrote it
# --------------------------------------------------------------------------------------------------


def _write_format_1(model, directory):
    config = {"target_modules": TARGETS, "r": 4, "alpha": 8, "dropout": 0.1, "mode": "auto",
              "modules_to_save": ["classifier"], "backend": "reference",
              "generator_keys": sorted(condlora_generators(model))}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    tensors = {}
    for key, generator in condlora_generators(model).items():
        tensors[f"generators.{key}.theta_a"] = generator.theta_a.detach().contiguous()
        tensors[f"generators.{key}.theta_b"] = generator.theta_b.detach().contiguous()
    tensors["base.classifier.weight"] = model.classifier.weight.detach().contiguous()
    tensors["base.classifier.bias"] = model.classifier.bias.detach().contiguous()
    safetensors_torch.save_file(tensors, str(directory / WEIGHTS_NAME))


def test_format_1_still_loads(tmp_path):
    model = _adapted()
    _write_format_1(model, tmp_path)
    with pytest.warns(UserWarning, match=r"earlier condlora_kernels \(adapter format 1\), which has no checksum"):
        torch.testing.assert_close(_outputs_after_load(tmp_path), model(token_ids()).logits, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="format 1"):
        _refused(tmp_path, r"r=4 in the adapter, 8 in the model", model=_adapted(r=8))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"format_version": 2}))
    _refused(tmp_path, r"no format metadata \(written by an earlier.*adapter format 1\).*different saves")
    (tmp_path / CONFIG_NAME).unlink()
    _refused(tmp_path, r"adapter format 1.*condlora_config.json.*missing")


# --------------------------------------------------------------------------------------------------
# Atomic saves: a failure or a kill at any moment leaves a loadable adapter
# --------------------------------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_adapter(saved, monkeypatch):
    model, directory, ref = saved
    perturb_adapter(model, seed=9)
    original = adapter_file.atomic_write

    def fail_after_writing(path, write):
        def write_then_fail(tmp):
            write(tmp)
            raise OSError("simulated disk error")
        original(path, write_then_fail)

    monkeypatch.setattr(adapter_file, "atomic_write", fail_after_writing)
    with pytest.raises(OSError, match="simulated disk error"):
        save_condlora(model, directory)
    assert sorted(os.listdir(directory)) == [CONFIG_NAME, WEIGHTS_NAME]  # the temporary file was removed
    torch.testing.assert_close(_outputs_after_load(directory), ref, rtol=0, atol=0)


def test_interrupted_after_the_commit_loads_the_new_adapter(saved, monkeypatch):
    """The weights file is the commit point: a save that stops before rewriting the readable copy has saved."""
    model, directory, _ = saved
    perturb_adapter(model, seed=9)

    def crash(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_file, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        save_condlora(model, directory)
    with pytest.warns(UserWarning, match="stale"):
        torch.testing.assert_close(_outputs_after_load(directory), model(token_ids()).logits, rtol=0, atol=0)


_SAVER = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from condlora_kernels import apply_condlora, save_condlora
    torch.manual_seed(0)  # the loading test builds the same base weights
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "head": nn.Linear(4096, 4096)})  # a 64 MiB adapter
    apply_condlora(model, ["proj"], r=2, modules_to_save=["head"], backend="reference")
    adapter = [p for p in model.parameters() if p.requires_grad]
    for version in range(1, 10_000):  # each version: tensors filled with `version`, and alpha = version
        with torch.no_grad():
            for p in adapter:
                p.fill_(version)
        model.proj.alpha = model.condlora_config["apply_condlora_calls"][0]["alpha"] = version
        save_condlora(model, sys.argv[1])
        print(version, flush=True)
""")


def _kill_saver(directory, moment):
    """Run _SAVER, which saves versions 1, 2, ... of an adapter, and SIGKILL it at `moment`; return the last
    version it reported saved."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(directory)], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # version 1 is on disk
        deadline = time.monotonic() + 60
        if moment == "while a temporary file is written":
            while not any(name.endswith(".tmp") for name in os.listdir(directory)):
                assert time.monotonic() < deadline and proc.poll() is None
        else:
            time.sleep(float(moment))
        proc.send_signal(signal.SIGKILL)
        reported = [1] + [int(line) for line in proc.stdout.read().split()]
    finally:
        proc.kill()
        proc.wait()
    return reported[-1]


@pytest.mark.parametrize("moment", ["while a temporary file is written", "0.37"])
def test_kill_during_a_large_save_leaves_a_complete_adapter(tmp_path, moment):
    last_reported = _kill_saver(tmp_path, moment)
    torch.manual_seed(0)
    model = nn.ModuleDict({"proj": nn.Linear(8, 8), "head": nn.Linear(4096, 4096)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_condlora(model, tmp_path)
    assert all("stale" in str(w.message) for w in caught)  # killed between the commit and the readable copy
    adapter = [p for p in model.parameters() if p.requires_grad]
    version = adapter[0].flatten()[0].item()
    assert version in (last_reported, last_reported + 1)  # the last reported save, or one past its commit
    assert all(torch.all(p == version) for p in adapter)  # one save's tensors, never a mixture
    assert model.proj.alpha == version  # and that save's config
    with torch.no_grad():
        for p in adapter:
            p.fill_(-1.0)
    save_condlora(model, tmp_path)  # the killed save's temporary file does not disturb the next one
    load_condlora(model, tmp_path)
    assert all(torch.all(p == -1.0) for p in adapter)


# --------------------------------------------------------------------------------------------------
# What load and save refuse before touching anything (the checksum-valid but malformed, the paths)
# --------------------------------------------------------------------------------------------------


def test_an_adapter_never_writes_a_frozen_weight(tmp_path):
    """A format-1 file holding a CondLoRA layer's W0 (format 1 has no checksum to stop an edit) is refused: loading
    it would overwrite W0 and make it require grad, after which every forward refuses."""
    model = _adapted()
    _write_format_1(model, tmp_path)
    tensors = safetensors_torch.load_file(str(tmp_path / WEIGHTS_NAME))
    query = "bert.encoder.layer.0.attention.self.query"
    tensors[f"base.{query}.weight"] = torch.zeros_like(dict(model.named_parameters())[f"{query}.weight"])
    safetensors_torch.save_file(tensors, str(tmp_path / WEIGHTS_NAME))
    with pytest.warns(UserWarning, match="format 1"):
        _refused(tmp_path, rf"frozen weights of CondLoRA layers .*{query}\.weight")


def _rewrite_config(directory, edit):
    """Rewrite the weights file's stored config with edit(config) and a matching checksum (a file another writer
    made, which the checksum cannot catch)."""
    path = str(directory / WEIGHTS_NAME)
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    tensors = safetensors_torch.load_file(path)
    config = json.loads(metadata[adapter_file._META_CONFIG])
    edit(config)
    text = json.dumps(config, sort_keys=True)
    metadata.update({adapter_file._META_CONFIG: text, adapter_file._META_SHA256: adapter_file._sha256(text, tensors)})
    safetensors_torch.save_file(tensors, path, metadata=metadata)
    (directory / CONFIG_NAME).unlink()  # the readable copy would be stale


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.pop("layers"), r"lacks \['layers'\]"),
    (lambda c: c["apply_condlora_calls"][0].pop("backend"), r"call 1 has missing fields \['backend'\]"),
    (lambda c: c["apply_condlora_calls"][0].update(colour="red"), r"unknown fields \['colour'\]"),
    (lambda c: c["apply_condlora_calls"][0].update(modules_to_save="classifier"), r"modules_to_save .* must be a list"),
    (lambda c: c.update(apply_condlora_calls={"r": 4}), r"apply_condlora_calls must be a list"),
])
def test_a_malformed_stored_config_is_a_value_error(saved, edit, match):
    _, directory, _ = saved
    _rewrite_config(directory, edit)
    _refused(directory, match)  # before the readable copy is looked at


def test_format_1_config_lacking_a_field_is_a_value_error(tmp_path):
    model = _adapted()
    _write_format_1(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    del config["alpha"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="format 1"):
        _refused(tmp_path, r"lacks the fields \['alpha'\]")


def test_load_checks_the_backend_and_the_path_first(saved):
    model, directory, _ = saved
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        load_condlora(model, directory, backend="bogus")  # an adapted model: no call is replayed, still checked
    assert_unchanged(model, before)
    with pytest.raises(ValueError, match=r"must be the folder that holds condlora_model.safetensors, got the file"):
        load_condlora(model, directory / WEIGHTS_NAME)


def test_save_refuses_unwritable_paths_before_writing(saved):
    model, directory, ref = saved
    perturb_adapter(model, seed=5)
    weights_before = (directory / WEIGHTS_NAME).read_bytes()
    (directory / CONFIG_NAME).unlink()
    (directory / CONFIG_NAME).mkdir()
    with pytest.raises(ValueError, match=r"condlora_config.json is a folder, where the adapter writes a file"):
        save_condlora(model, directory)
    assert (directory / WEIGHTS_NAME).read_bytes() == weights_before
    with pytest.raises(ValueError, match=r"is a file, not a folder"):
        save_condlora(model, directory / WEIGHTS_NAME)
    assert (directory / WEIGHTS_NAME).read_bytes() == weights_before


def test_other_base_weights_are_reported_and_meta_weights_refused(saved):
    """The adapter records each adapted layer's W0 (sum and norm): loaded onto other base weights of the same shapes
    it warns, since A and B are generated from W0; the same base in bfloat16 (a rounding) does not warn; a model whose
    weights are on the meta device is refused."""
    _, directory, ref = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no warning
        _outputs_after_load(directory)
    with pytest.warns(UserWarning, match=r"saved on other base weights than this model's .*bert.encoder.layer.0"):
        load_condlora(tiny_bert(seed=1).eval(), directory)
    rounded = tiny_bert().eval()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_condlora(rounded, directory)
    with torch.device("meta"):
        on_meta = tiny_bert().eval()
    with pytest.raises(ValueError, match=r"on the meta device, which holds no values"):
        load_condlora(on_meta, directory)
    assert not hasattr(on_meta, "condlora_config")  # the layers it had created are undone
