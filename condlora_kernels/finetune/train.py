"""Training for `condlora finetune`: a sequence classifier with PEFT LoRA or with CondLoRA, one plain loop.

Both methods get the same model, data, split, seed, rank, targets and schedule; they differ only in the
adapter and its learning rate. The loop: AdamW, linear warm-up then linear decay to zero, gradient
clipping, bf16 autocast on CUDA; for a seed it draws the same classifier head, batches and dropout masks.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import torch
import torch.nn.functional as F

from condlora_kernels.finetune import parallel
from condlora_kernels.finetune.data import InputError, PreparedData
from condlora_kernels.finetune.parallel import SINGLE, Processes

METHODS = ("lora", "condlora")
METHOD_TITLES = {"lora": "PEFT LoRA", "condlora": "CondLoRA"}
TARGET_MODULES = ["query", "value"]
RANK = 8
ALPHA = 8
HEAD = "classifier"  # the fresh classification head, trained in both methods (modules_to_save)

# Recommended learning rates (AdamW, batch 32, the schedule below), measured with tools/lr_sweep.py
# (benchmarks/results/lr_sweep_h200/, README "Learning rates"). Held-out accuracy, seed 0:
#   full split on an H200 (10,201 sentences, 3 epochs, 957 optimizer steps):
#     LoRA      5e-4 0.804, 1e-3 0.815, 2e-3 0.816, 5e-3 0.805
#     CondLoRA  1e-3 0.797, 2e-3 0.800, 5e-3 0.685, 1e-2 0.578, 2e-2 0.578 (0.578: the majority class, diverged)
#   the CPU defaults (3,000 sentences, 1 epoch, 94 steps):
#     LoRA      1e-3 0.567, 2e-3 0.744, 5e-3 0.771
#     CondLoRA  2e-3 0.689, 5e-3 0.706, 1e-2 0.651, 2e-2 0.567
# One theta moves the A and B of every layer of its type at once, so CondLoRA does not tolerate the rates that
# suit LoRA on a long run: it peaks at 2e-3 and collapses at 5e-3 where LoRA still does well. Short runs (fewer
# than SHORT_RUN_STEPS steps) do best at 5e-3 for both.
RECOMMENDED_LR = {"lora": 2e-3, "condlora": 2e-3}
SHORT_RUN_LR = {"lora": 5e-3, "condlora": 5e-3}
SHORT_RUN_STEPS = 300


def recommended_lr(method: str, optimizer_steps: int) -> float:
    """The learning rate of `method` for a run of `optimizer_steps` steps (see the sweeps above)."""
    return (SHORT_RUN_LR if optimizer_steps < SHORT_RUN_STEPS else RECOMMENDED_LR)[method]


@dataclass
class TrainSettings:
    lr: float
    epochs: int = 1
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    backend: str = "auto"  # CondLoRA's backend (see condlora_linear)
    recompute_weight_cast: Union[bool, str] = "auto"  # CondLoRA's memory setting (set_recompute_weight_cast)
    warmup_fraction: float = 0.06  # of the optimizer steps, as in the LoRA and RoBERTa GLUE recipes
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 128
    progress: bool = True  # tqdm bars on stderr


@dataclass
class MethodResult:
    method: str
    accuracy: float
    trainable_params: int
    adapter_params: int  # trainable parameters outside the classifier head
    examples_per_s: float  # training examples per second of train_seconds
    train_seconds: float  # the training loop only: not loading, not evaluation
    lr: float
    steps: int
    train_examples: int
    eval_examples: int
    eval_seconds: float
    eval_loss: float
    diverged: bool  # some training loss was not finite
    backend: Optional[str] = None  # the CondLoRA backend that ran
    losses: list = field(default_factory=list)  # training loss of every step
    processes: int = 1  # under torchrun: the processes that shared every global batch (parallel.py)

    def as_dict(self) -> dict:
        return asdict(self)


@contextlib.contextmanager
def _quiet_transformers():
    """Loading a checkpoint into a *ForSequenceClassification model reports that the head is new and shows a
    progress bar: expected here, so silenced (the command says which head it trains)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        logging.enable_progress_bar()


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    with _quiet_transformers():
        try:
            return AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        except (OSError, ValueError) as exc:  # no tokenizer files in the folder, or ones it cannot read
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"--model {model_path}: could not load its tokenizer ({reason})") from None


def load_model(model_path: str, label_names: list, seed: int) -> torch.nn.Module:
    """The pretrained encoder with a fresh classification head, in float32 (also from a float16 checkpoint);
    the head's initial weights depend on `seed` only."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(label_names), id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)}, local_files_only=True, dtype=torch.float32)
    return model.float()


def add_adapter(model: torch.nn.Module, method: str, backend: str = "auto",
                recompute_weight_cast: Union[bool, str] = "auto") -> torch.nn.Module:
    """PEFT LoRA or CondLoRA on the query and value projections, r=8, alpha=8; the head trains in both.
    recompute_weight_cast: CondLoRA's memory setting (set_recompute_weight_cast)."""
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGET_MODULES, lora_dropout=0.0,
                            modules_to_save=[HEAD])
        with warnings.catch_warnings():  # peft calls a transformers method that transformers 5 deprecated
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    if method == "condlora":
        from condlora_kernels import apply_condlora, set_recompute_weight_cast

        model = apply_condlora(model, TARGET_MODULES, r=RANK, alpha=ALPHA, modules_to_save=[HEAD], backend=backend)
        return set_recompute_weight_cast(model, recompute_weight_cast)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def count_trainable(model: torch.nn.Module) -> tuple:
    """(all trainable parameters, those outside the head); each shared tensor counted once."""
    total = adapter = 0
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
            adapter += 0 if HEAD in name.split(".") else param.numel()
    return total, adapter


def resolve_device(device: str) -> torch.device:
    """'auto': CUDA when there is a GPU, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device (try auto, cpu, cuda, cuda:1)") from None
    if resolved.type not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: condlora finetune trains on cpu or cuda")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: torch sees no CUDA device here (use --device cpu)")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return resolved


def condlora_backend_name(backend: str, device: torch.device) -> str:
    """The backend CondLoRA will run on `device` (under bf16 autocast on CUDA); an InputError if the one
    asked for cannot run there."""
    from condlora_kernels.ops.backends import BackendUnavailableError, select_backend

    probe = torch.empty(0, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        return select_backend(backend, probe).name
    except (BackendUnavailableError, ValueError) as exc:
        raise InputError(f"--backend {backend}: {exc}") from None


def linear_warmup_decay(total_steps: int, warmup_fraction: float):
    """The learning-rate factor of each step: 0 -> 1 over the warm-up, then 1 -> 0 at the last step."""
    warmup = max(1, math.ceil(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, dynamic_ncols=True,
                leave=True)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def evaluate(model: torch.nn.Module, data: PreparedData, device: torch.device, settings: TrainSettings,
             desc: str = "eval", processes: Processes = SINGLE) -> tuple:
    """(accuracy, mean cross-entropy) on the held-out split; with several processes, each scores its share."""
    pad_to = data.max_length if device.type == "cuda" else None
    model.eval()
    correct, loss_sum = 0, 0.0
    rows = list(range(len(data.eval)))[processes.rank::processes.size]
    starts = range(0, len(rows), settings.eval_batch_size)
    with torch.no_grad(), _progress_bar(len(starts), desc, settings.progress and processes.main) as bar:
        for start in starts:
            batch = data.eval.batch(rows[start:start + settings.eval_batch_size], data.pad_id, pad_to)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with _autocast(device):
                logits = model(**batch).logits.float()
            correct += int((logits.argmax(-1) == labels).sum())
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            bar.update()
    correct, loss_sum = parallel.sum_over(torch.tensor([correct, loss_sum], dtype=torch.float64), processes,
                                          device).tolist()
    return correct / len(data.eval), loss_sum / len(data.eval)


def finetune(method: str, model_path: str, data: PreparedData, settings: TrainSettings,
             processes: Processes = SINGLE) -> MethodResult:
    """Train `method` ("lora" or "condlora") on data.train, score it on data.eval. `processes`: under torchrun,
    this process's place; every process calls this, with settings.device its own device (parallel.py)."""
    device = resolve_device(settings.device)
    backend = condlora_backend_name(settings.backend, device) if method == "condlora" else None
    model = add_adapter(load_model(model_path, data.label_names, settings.seed), method, settings.backend,
                        settings.recompute_weight_cast)
    model.to(device)
    trainable, adapter = count_trainable(model)
    trained = parallel.wrap(model, processes, device)

    # Padding: on CUDA to max_length, so that every batch has one shape (one kernel configuration, see
    # docs/design.md §5 on autotuning); on CPU to the longest row of the batch, which does far less work.
    pad_to = data.max_length if device.type == "cuda" else None
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    total_steps = settings.epochs * steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(total_steps, settings.warmup_fraction))
    order = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # dropout masks
    losses = []

    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start_time = time.perf_counter()
    with _progress_bar(total_steps, f"{method} train", settings.progress and processes.main) as bar:
        for _ in range(settings.epochs):
            permutation = torch.randperm(len(data.train), generator=order).tolist()
            for start in range(0, len(permutation), settings.batch_size):
                rows = permutation[start:start + settings.batch_size]
                mine, weight = parallel.my_rows(rows, processes)
                batch = data.train.batch(mine, data.pad_id, pad_to)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                labels = batch.pop("labels")
                with _autocast(device):
                    logits = trained(**batch).logits
                # this process's share of the global batch's mean loss; DDP averages over the processes, hence
                # the factor (one process: the mean cross-entropy)
                share = F.cross_entropy(logits.float(), labels, reduction="sum") / len(rows) * weight
                loss = share * processes.size
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(share.detach())
                bar.update()
                if device.type != "cuda" or bar.n % 20 == 1:  # reading the loss waits for the GPU
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_seconds = parallel.longest(time.perf_counter() - start_time, processes, device)

    eval_start = time.perf_counter()
    accuracy, eval_loss = evaluate(model, data, device, settings, f"{method} eval", processes)
    eval_seconds = parallel.longest(time.perf_counter() - eval_start, processes, device)
    losses = parallel.sum_over(torch.stack(losses).float(), processes, device).tolist() if losses else []
    return MethodResult(method=method, accuracy=accuracy, trainable_params=trainable, adapter_params=adapter,
                        examples_per_s=settings.epochs * len(data.train) / train_seconds,
                        train_seconds=train_seconds, lr=settings.lr, steps=total_steps,
                        train_examples=len(data.train), eval_examples=len(data.eval), eval_seconds=eval_seconds,
                        eval_loss=eval_loss, diverged=not all(math.isfinite(v) for v in losses + [eval_loss]),
                        backend=backend,
                        losses=losses, processes=processes.size)
