"""save_condlora / load_condlora: a CondLoRA adapter on disk, written atomically and verified on load.

Format 2 (docs/design.md §8): `condlora_model.safetensors` is self-contained and the single commit point. Its
tensors are the adapter's state under the model's own parameter names (`condlora_generators.<key>.theta_a`,
`classifier.weight`, ...); its metadata holds the format version, the full config (JSON) and a sha256 of the
config and the tensors. It is written to a temporary file, fsynced and renamed over the previous one, so the
directory always holds one complete adapter. `condlora_config.json` beside it is a readable copy (with the same
sha256), written after the commit: load uses the weights file's config and checks that the copy agrees.

Format 1 (written by earlier versions of condlora_kernels): `condlora_config.json` (the arguments of apply_condlora and
`generator_keys`) and `condlora_model.safetensors` without metadata, with keys `generators.<key>.theta_a|theta_b`
and `base.<parameter name>`; no checksum. It still loads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from condlora_kernels.ops.backends import check_backend_name
from condlora_kernels.integrations.model import (GENERATORS_ATTR, _apply_calls, _commit_apply,
                                                 _plan_apply, _some, _Undo, condlora_layers, condlora_state_dict,
                                                 generator_parameter_names)

FORMAT_VERSION = 2
WEIGHTS_NAME = "condlora_model.safetensors"
CONFIG_NAME = "condlora_config.json"
_META_VERSION, _META_CONFIG, _META_SHA256 = "condlora_format_version", "condlora_config", "condlora_sha256"
_COMPARED_CALL_FIELDS = ("target_modules", "r", "alpha", "dropout", "mode", "modules_to_save")  # not backend

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# Descriptions and checksum
# --------------------------------------------------------------------------------------------------


def _layer_descriptions(model: nn.Module) -> dict:
    """{layer name: what must match between an adapter and a model}."""
    descriptions = {}
    for name, layer in condlora_layers(model).items():
        generator = f"{name}.generator" if layer.owns_generator else f"{GENERATORS_ATTR}.{layer.generator_key}"
        descriptions[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                              "bias": layer.bias is not None, "r": layer.r, "alpha": layer.alpha,
                              "dropout": layer.dropout, "mode": layer.mode, "generator": generator}
    return descriptions


# CondLoRA generates each layer's A and B from its W0, so an adapter reproduces its model only on the base weights
# it was trained on. Each layer's W0 is summarised by (sum, L2 norm) in float64; on load a layer whose summary moved
# by more than this fraction of its norm is reported (a rounding of the same checkpoint to bf16 moves it ~0.2%).
_BASE_TOLERANCE = 5e-3


def _base_fingerprint(model: nn.Module) -> dict:
    """{layer name: [sum, L2 norm] of its W0 in float64}; a sharded (DTensor) W0 is reduced across its shards."""
    fingerprint = {}
    with torch.no_grad():
        for name, layer in condlora_layers(model).items():
            w = layer._unmerged_weight if layer.merged else layer.weight
            values = [torch.sum(w, dtype=torch.float64), torch.linalg.vector_norm(w, dtype=torch.float64)]
            fingerprint[name] = [float(v.full_tensor() if hasattr(v, "full_tensor") else v) for v in values]
    return fingerprint


def _check_base_weights(model: nn.Module, saved: Optional[dict], directory: str) -> None:
    """Warn where the model's frozen weights are not those the adapter was saved with (older files have no record)."""
    if not saved:
        return
    current = _base_fingerprint(model)
    moved = [name for name, (total, norm) in saved.items() if name in current and
             max(abs(total - current[name][0]), abs(norm - current[name][1])) > _BASE_TOLERANCE * max(norm, 1e-30)]
    if moved:
        warnings.warn(f"the adapter in {directory} was saved on other base weights than this model's (W0 differs in "
                      f"layers {_some(moved)}): CondLoRA generates A and B from W0, so the loaded model will not "
                      "reproduce the saved model's outputs. Load it onto the base model it was trained on")


def _sha256(config_text: str, tensors: dict) -> str:
    """sha256 of the config text, then of each tensor (sorted by name): name, dtype, shape and raw bytes."""
    digest = hashlib.sha256(config_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _adapter_tensors(model: nn.Module) -> dict:
    tensors = {}
    for name, tensor in condlora_state_dict(model).items():
        if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2): save the whole tensor
            tensor = tensor.full_tensor()
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors


# --------------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------------


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):  # some platforms cannot open a directory
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str, write) -> None:
    """Call write(temporary path), fsync the file, rename it to `path`, fsync the directory: `path` holds
    either its previous content or the new one, whatever happens. The temporary file is removed on error."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory or ".")


def check_output_directory(directory: str, names) -> None:
    """Before anything is written: `directory` is a folder or does not exist yet, and none of the files `names`
    it will hold is a folder (which would fail the second write after the first had replaced its file)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"directory {directory} is a file, not a folder: pass the folder to write the adapter to")
    blocked = [name for name in names if os.path.isdir(os.path.join(directory, name))]
    if blocked:
        raise ValueError(f"{', '.join(os.path.join(directory, n) for n in blocked)} is a folder, where the adapter "
                         "writes a file: remove it or choose another directory")


def write_json(path: str, content: dict) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def save_condlora(model: nn.Module, directory: PathLike) -> None:
    """Write the adapter of a CondLoRA model (every generator once, the modules_to_save and any other trainable
    parameter, the full config, a sha256) to `directory`, atomically: if anything fails, the adapter that was
    there stays complete and loadable."""
    from safetensors.torch import save_file

    from condlora_kernels import __version__

    if not condlora_layers(model):
        raise ValueError("the model has no CondLoRA layers: call apply_condlora(model, ...) first")
    directory = os.fspath(directory)
    check_output_directory(directory, (WEIGHTS_NAME, CONFIG_NAME))
    tensors = _adapter_tensors(model)
    config = {"format_version": FORMAT_VERSION, "written_by": f"condlora_kernels {__version__}",
              "apply_condlora_calls": _apply_calls(model), "layers": _layer_descriptions(model),
              "base_weights": _base_fingerprint(model)}
    config_text = json.dumps(config, sort_keys=True)
    sha256 = _sha256(config_text, tensors)
    metadata = {_META_VERSION: str(FORMAT_VERSION), _META_CONFIG: config_text, _META_SHA256: sha256}
    os.makedirs(directory, exist_ok=True)
    atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda tmp: save_file(tensors, tmp, metadata=metadata))
    write_json(os.path.join(directory, CONFIG_NAME), {**config, "sha256": sha256})  # the readable copy


# --------------------------------------------------------------------------------------------------
# Read and verify
# --------------------------------------------------------------------------------------------------


@dataclass
class Adapter:
    format_version: int
    config: dict  # format 2's config; for format 1, {"apply_condlora_calls": [...], "layers": None}
    tensors: dict  # {name in the model's named_parameters (format 1: still its own names): tensor}


def _damaged(path: str, error: Exception) -> ValueError:
    return ValueError(f"{path} is damaged or truncated and cannot be read ({type(error).__name__}: {error}); "
                      "save the adapter again or restore the file")


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_adapter(directory: PathLike) -> Adapter:
    """Read and verify the adapter in `directory` (format version, checksum, the readable config copy)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise ValueError(f"directory must be the folder that holds {WEIGHTS_NAME}, got the file {directory}")
    path, json_path = os.path.join(directory, WEIGHTS_NAME), os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        hint = (" (it holds a PEFT adapter: load it with peft.PeftModel.from_pretrained)"
                if os.path.isfile(os.path.join(directory, "adapter_config.json")) else "")
        raise FileNotFoundError(f"no CondLoRA adapter in {directory}: {WEIGHTS_NAME} is missing{hint}")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _damaged(path, e) from None

    if _META_VERSION not in metadata:
        return _read_format_1(directory, json_path, tensors)
    version = metadata[_META_VERSION]
    if version != str(FORMAT_VERSION):
        raise ValueError(f"{path} is adapter format {version}, and this condlora_kernels reads formats 1 and "
                         f"{FORMAT_VERSION}: install the condlora_kernels version that wrote it, or a newer one")
    config_text, sha256 = metadata.get(_META_CONFIG), metadata.get(_META_SHA256)
    if config_text is None or sha256 is None or _sha256(config_text, tensors) != sha256:
        raise ValueError(f"{path} fails its checksum: its tensors or config were changed after it was saved "
                         "(a corrupted or edited file); save the adapter again or restore the file")
    config = json.loads(config_text)
    _check_config(path, config)
    _check_readable_copy(json_path, config, sha256)
    return Adapter(FORMAT_VERSION, config, tensors)


_CALL_FIELDS = frozenset(_COMPARED_CALL_FIELDS) | {"backend"}


def _check_calls(path: str, calls) -> list:
    """The recorded apply_condlora calls: a list of dicts with exactly the fields save_condlora writes (their values
    are checked as apply_condlora's arguments when a call is replayed)."""
    if not isinstance(calls, list) or not all(isinstance(call, dict) for call in calls):
        raise ValueError(f"{path}: apply_condlora_calls must be a list of calls (objects), got {calls!r}")
    for i, call in enumerate(calls):
        missing, unknown = sorted(_CALL_FIELDS - set(call)), sorted(set(call) - _CALL_FIELDS)
        if missing or unknown:
            raise ValueError(f"{path}: apply_condlora call {i + 1} has missing fields {missing} and unknown fields "
                             f"{unknown}: not an adapter this condlora_kernels wrote")
        if call["modules_to_save"] is not None and not isinstance(call["modules_to_save"], list):
            raise ValueError(f"{path}: modules_to_save of apply_condlora call {i + 1} must be a list, got "
                             f"{call['modules_to_save']!r}")
    return calls


def _check_config(path: str, config) -> None:
    """Format 2's config: the fields load reads, with their types."""
    if not isinstance(config, dict):
        raise ValueError(f"{path}: the stored config must be an object, got {type(config).__name__}")
    missing = [key for key in ("apply_condlora_calls", "layers") if key not in config]
    if missing:
        raise ValueError(f"{path}: the stored config lacks {missing}: not an adapter this condlora_kernels wrote")
    _check_calls(path, config["apply_condlora_calls"])
    layers = config["layers"]
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(f"{path}: the stored config's layers must map layer names to descriptions, got {layers!r}")
    base = config.get("base_weights", {})  # absent in files of earlier versions
    if not isinstance(base, dict) or not all(isinstance(v, list) and len(v) == 2 and
                                             all(isinstance(x, (int, float)) for x in v) for v in base.values()):
        raise ValueError(f"{path}: the stored config's base_weights must map layer names to [sum, norm], got {base!r}")


def _check_readable_copy(json_path: str, config: dict, sha256: str) -> None:
    """condlora_config.json must be the copy of this save's config: a copy from another save is stale (the
    save that wrote the weights was interrupted before it rewrote the copy) and only warned about; a copy with
    this save's sha256 but other content was edited, which has no effect, so load refuses it."""
    if not os.path.isfile(json_path):
        warnings.warn(f"{json_path} is missing; the adapter's config is read from {WEIGHTS_NAME}")
        return
    try:
        copy = _read_json(json_path)
    except (OSError, ValueError) as e:
        warnings.warn(f"{json_path} cannot be read ({e}); the adapter's config is read from {WEIGHTS_NAME}")
        return
    if not isinstance(copy, dict) or copy.get("sha256") != sha256:
        warnings.warn(f"{json_path} is stale (it describes another save: the last save was interrupted before it "
                      f"rewrote it); the adapter's config is read from {WEIGHTS_NAME}, which is complete")
        return
    edited = sorted(k for k in set(copy) | set(config) if k != "sha256" and copy.get(k) != config.get(k))
    if edited:
        raise ValueError(f"{json_path} disagrees with the config stored in {WEIGHTS_NAME} (fields {edited}): the "
                         "JSON file is a readable copy and editing it changes nothing; restore it (or delete it) "
                         "to load the adapter as saved, or change the model and save again")


def _read_format_1(directory: str, json_path: str, tensors: dict) -> Adapter:
    version_1 = "written by an earlier condlora_kernels (adapter format 1)"
    if not os.path.isfile(json_path):
        raise ValueError(f"{directory} holds {WEIGHTS_NAME} without format metadata, {version_1}, which needs "
                         f"{CONFIG_NAME} beside it, and that file is missing")
    try:
        config = _read_json(json_path)
    except (OSError, ValueError) as e:
        raise _damaged(json_path, e) from None
    if not isinstance(config, dict) or "format_version" in config:
        raise ValueError(f"{WEIGHTS_NAME} in {directory} has no format metadata ({version_1}) but {CONFIG_NAME} "
                         "does not describe a format-1 adapter: the two files come from different saves")
    unknown = sorted(k for k in tensors if not k.startswith(("generators.", "base.")))
    if unknown:
        raise ValueError(f"{WEIGHTS_NAME} in {directory} is neither format 2 (no metadata) nor format 1 "
                         f"(unexpected tensors {_some(unknown)}): not a CondLoRA adapter")
    warnings.warn(f"the adapter in {directory} was {version_1}, which has no checksum: it loads without an "
                  "integrity check; save_condlora it again to write format 2")
    calls = []
    if "target_modules" in config:
        missing = [key for key in ("r", "alpha", "dropout", "mode") if key not in config]
        if missing:
            raise ValueError(f"{json_path} (adapter format 1) lacks the fields {missing} of its apply_condlora call")
        to_save = config.get("modules_to_save") or []
        calls.append({"target_modules": config["target_modules"], "r": config["r"], "alpha": config["alpha"],
                      "dropout": config["dropout"], "mode": config["mode"],
                      "modules_to_save": list(to_save) if isinstance(to_save, (list, tuple)) else to_save,
                      "backend": config.get("backend", "auto")})
    return Adapter(1, {"apply_condlora_calls": _check_calls(json_path, calls), "layers": None}, tensors)


def _format_1_names(model: nn.Module, tensors: dict) -> dict:
    """Format-1 tensor names -> the model's parameter names: `generators.<key>.X` is the generator stored under
    <key> at the root, or owned by the layer whose name with "." -> "_" is <key>; `base.<name>` is <name>."""
    owned = {name.replace(".", "_"): f"{name}.generator" for name, layer in condlora_layers(model).items()
             if layer.owns_generator}
    store = model._modules.get(GENERATORS_ATTR)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("base."):
            renamed[name[len("base."):]] = tensor
        else:
            key, _, param = name[len("generators."):].rpartition(".")
            prefix = f"{GENERATORS_ATTR}.{key}" if store is not None and key in store else owned.get(key, name)
            renamed[f"{prefix}.{param}"] = tensor
    return renamed


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------


def _differences(saved: dict, current: dict, what: str) -> list:
    """Human-readable differences between two {name: {field: value}} descriptions."""
    lines = []
    missing, extra = [n for n in saved if n not in current], [n for n in current if n not in saved]
    if missing:
        lines.append(f"{what} in the adapter but not in the model: {_some(missing)}")
    if extra:
        lines.append(f"{what} in the model but not in the adapter: {_some(extra)}")
    for name in saved:
        if name in current:
            for key in saved[name]:
                if saved[name][key] != current[name].get(key):
                    lines.append(f"{name}: {key}={saved[name][key]!r} in the adapter, {current[name].get(key)!r} "
                                 "in the model")
    return lines


def _call_fields(calls: list) -> dict:
    return {f"apply_condlora call {i + 1}": {k: call.get(k) for k in _COMPARED_CALL_FIELDS}
            for i, call in enumerate(calls)}


def _check_fits(model: nn.Module, adapter: Adapter, directory: str, tensors: dict) -> dict:
    """Check the adapted model against the adapter; return {parameter: tensor converted to its dtype/device}."""
    merged = [name for name, layer in condlora_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"layers {_some(merged)} are merged (their weight holds W0 + s*B*A computed from the current "
                         "generators): call unmerge_adapters(model) before load_condlora")
    problems = []
    if adapter.config["layers"] is not None:
        problems += _differences(adapter.config["layers"], _layer_descriptions(model), "layers")
    if adapter.config["apply_condlora_calls"] or _apply_calls(model):
        problems += _differences(_call_fields(adapter.config["apply_condlora_calls"]),
                                 _call_fields(_apply_calls(model)), "calls")
    params = dict(model.named_parameters())
    missing = sorted(generator_parameter_names(model) - set(tensors))
    unknown = sorted(name for name in tensors if name not in params)
    frozen = {f"{name}.{attr}" for name in condlora_layers(model) for attr in ("weight", "bias")}
    base = sorted(name for name in tensors if name in frozen)
    if base:
        problems.append(f"tensors for the frozen weights of CondLoRA layers (W0 and b, which an adapter never "
                        f"holds): {_some(base)}")
    if missing:
        problems.append(f"generator parameters missing from the adapter: {_some(missing)}")
    if unknown:
        problems.append(f"tensors of the adapter that the model lacks: {_some(unknown)}")
    for name in sorted(set(tensors) & set(params)):
        if tuple(tensors[name].shape) != tuple(params[name].shape):
            problems.append(f"{name}: shape {tuple(tensors[name].shape)} in the adapter, "
                            f"{tuple(params[name].shape)} in the model")
    if problems:
        raise ValueError(f"the adapter in {directory} does not fit the model:\n  " + "\n  ".join(problems))
    on_meta = sorted(name for name in tensors if params[name].is_meta)
    if on_meta:
        raise ValueError(f"parameters {_some(on_meta)} are on the meta device, which holds no values: load the base "
                         "model's weights (e.g. to_empty(), then its state_dict) before load_condlora")
    if any(layer.weight.is_meta for layer in condlora_layers(model).values()):
        raise ValueError("the CondLoRA layers' frozen weights are on the meta device: load the base model's weights "
                         "before load_condlora (A and B are generated from them)")
    _check_base_weights(model, adapter.config.get("base_weights"), directory)
    return {name: tensor.to(device=params[name].device, dtype=params[name].dtype) for name, tensor in tensors.items()}


def load_condlora(model: nn.Module, directory: PathLike, backend: Optional[str] = None) -> nn.Module:
    """Load what save_condlora wrote into `model`, and return it. A model without CondLoRA layers gets them first
    (the saved apply_condlora calls are replayed); an adapted model must have the saved configuration. The file is
    verified (format version, checksum, readable copy) and checked against the model (layer names and shapes, r,
    alpha, dropout, mode, targets, tensor names and shapes) before the model changes; on any error it is left as
    it was. The loaded parameters (the generators, the modules_to_save, any other parameter that was trainable when
    saved) require grad afterwards. `backend`: the layers' backend when they are created here (default: the saved
    one); checked even where the model has its layers already."""
    condlora_layers(model)  # a TypeError for anything but an nn.Module, before the files are read
    if backend is not None:
        check_backend_name(backend)
    directory = os.fspath(directory)
    adapter = read_adapter(directory)
    calls = adapter.config["apply_condlora_calls"]
    needs_apply = not condlora_layers(model)
    if needs_apply and not calls:
        raise ValueError(f"the adapter in {directory} was saved from layers built by hand (no apply_condlora "
                         "call recorded) and the model has no CondLoRA layers: build the same layers first")
    undo = _Undo(model)
    try:
        if needs_apply:
            for call in calls:
                call = dict(call, backend=backend or call["backend"])
                _commit_apply(model, _plan_apply(model, **call), undo)
        tensors = _format_1_names(model, adapter.tensors) if adapter.format_version == 1 else adapter.tensors
        values = _check_fits(model, adapter, directory, tensors)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
                params[name].requires_grad_(True)
    except BaseException:
        undo.restore()
        raise
    return model
