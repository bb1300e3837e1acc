"""Model-level benchmark: training throughput of a transformers model built from its config.

Providers (the adapters put on the same base model, copied for each):

    frozen                  no adapter; the input embeddings' output requires grad, so the backward runs
                            through every layer as with adapters: the floor
    peft_lora               peft.get_peft_model(LoraConfig(...)), PEFT's defaults (fp32 adapters)
    paper_code_condlora     the paper's code: per-target shared nn.Linear generators, forward via
                            reference.paper_code_condlora (swap_paper_code below)
    condlora[<backend>]     this package: apply_condlora(model, targets, backend=<backend>)

A step is forward, loss, backward, AdamW step, zero_grad. "bf16" is mixed precision as the HF Trainer's
bf16=True runs it (fp32 weights, torch.autocast to bf16); "fp32" is plain fp32.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from condlora_kernels import reference, timing
from condlora_kernels.bench import report
from condlora_kernels.bench.kernels import Point, error_message
from condlora_kernels.bench.providers import backend_unavailable_reason
from condlora_kernels.bench.shapes import ModelCase, Settings
from condlora_kernels.integrations.model import apply_condlora, match_target, set_submodule

MODEL_PROVIDERS = ("frozen", "peft_lora", "paper_code_condlora", "condlora[triton]", "condlora[cuda]",
                   "condlora[cpu]", "condlora[reference]")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# The paper's code as a module swapper
# --------------------------------------------------------------------------------------------------


class PaperCodeCondLoRALinear(nn.Module):
    """CyberAgentAILab/CondLoRA's `Linear`: frozen W0 and b, and the shared generators `linear_for_lora_A`,
    `linear_for_lora_B` (nn.Linear without bias) that make A and B from W0 at every call.

    Square layers run reference.paper_code_condlora. For non-square layers (which the paper leaves to
    future work) the same code shape with general-mode generation: A = theta_A W0, B = W0 theta_B^T.
    """

    def __init__(self, base: nn.Linear, linear_for_lora_A: nn.Linear, linear_for_lora_B: nn.Linear,
                 scaling: float, dropout: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.linear_for_lora_A, self.linear_for_lora_B = linear_for_lora_A, linear_for_lora_B
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.scaling = scaling
        self.square = base.in_features == base.out_features

    def forward(self, x):
        theta_a, theta_b = self.linear_for_lora_A.weight, self.linear_for_lora_B.weight
        if self.square:
            return reference.paper_code_condlora(x, self.weight, self.bias, theta_a, theta_b, self.scaling,
                                                 self.lora_dropout)
        lora_a = F.linear(self.weight.t(), theta_a).t()  # theta_A W0, (r, d_in)
        lora_b = F.linear(self.weight, theta_b)  # W0 theta_B^T, (d_out, r)
        if self.lora_dropout is not None:
            x = self.lora_dropout(x)  # on x before the frozen matmul too, as the paper's code does
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, lora_a), lora_b) * self.scaling


def swap_paper_code(model: nn.Module, targets, r: int, alpha: float, dropout: float = 0.0,
                    modules_to_save=()) -> nn.Module:
    """Replace the target nn.Linear layers by PaperCodeCondLoRALinear, one generator pair per target name
    (and shape) shared by all layers; freeze everything else but `modules_to_save`."""
    for p in model.parameters():
        p.requires_grad_(False)
    generators = {}
    for name, module in list(model.named_modules()):
        target = match_target(name, list(targets)) if isinstance(module, nn.Linear) else None
        if target is None:
            continue
        d_out, d_in = module.weight.shape
        key = (target, d_in, d_out)
        if key not in generators:
            # as the paper's code: theta_A kaiming-uniform (nn.Linear's default), theta_B zeros;
            # theta_A is (r, d_out) in both modes (d_out == d_in in paper mode)
            gen_a = nn.Linear(d_out, r, bias=False, device=module.weight.device)
            gen_b = nn.Linear(d_in, r, bias=False, device=module.weight.device)
            nn.init.zeros_(gen_b.weight)
            generators[key] = (gen_a, gen_b)
        set_submodule(model, name, PaperCodeCondLoRALinear(module, *generators[key], alpha / r, dropout))
    if not generators:
        raise ValueError(f"targets {list(targets)} matched no nn.Linear")
    for name, module in model.named_modules():
        if modules_to_save and match_target(name, list(modules_to_save)) is not None:
            for p in module.parameters():
                p.requires_grad_(True)
    return model


# --------------------------------------------------------------------------------------------------
# Models and providers
# --------------------------------------------------------------------------------------------------


def build_model(case: ModelCase, device: torch.device) -> nn.Module:
    """The case's model from its transformers config, random weights (nothing downloaded), on `device`."""
    transformers = importlib.import_module("transformers")
    torch.manual_seed(0)
    if case.family == "roberta":
        config = transformers.RobertaConfig(**dict(case.config), num_labels=2)
        cls = transformers.RobertaForSequenceClassification
    elif case.family == "llama":
        config = transformers.LlamaConfig(**dict(case.config))
        cls = transformers.LlamaForCausalLM
    else:
        raise ValueError(f"unknown model family {case.family!r}")
    with torch.device(device):  # initialise on the device: fast for the 4096-wide stack
        model = cls(config)
    return model.to(device)


def make_batch(case: ModelCase, model: nn.Module, device: torch.device) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(2, vocab, (case.batch, case.seq), generator=g).to(device)  # 0/1: pad/special ids
    if case.family == "roberta":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (case.batch,), generator=g).to(device)}
    return {"input_ids": ids, "labels": ids}


def provider_unavailable(provider: str, device: torch.device, precision: str) -> Optional[str]:
    if provider == "peft_lora" and importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    if provider.startswith("condlora["):
        dtype = PRECISIONS[precision] or torch.float32
        return backend_unavailable_reason(provider[len("condlora["):-1], device, dtype)
    return None


def attach(provider: str, model: nn.Module, case: ModelCase, dropout: float) -> nn.Module:
    """Put the provider's adapters on `model` (a copy of the base); returns the model to call."""
    head = [case.head] if case.head else []
    if provider == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            if head and match_target(name, head) is not None:
                for p in module.parameters():
                    p.requires_grad_(True)
        # make the backward run through every layer, as it does with adapters (hook: output -> leaf with grad)
        model.get_input_embeddings().register_forward_hook(lambda module, args, out: out.detach().requires_grad_())
        return model
    if provider == "peft_lora":
        peft = importlib.import_module("peft")
        config = peft.LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=dropout,
                                 target_modules=list(case.targets), modules_to_save=head or None)
        return peft.get_peft_model(model, config)
    if provider == "paper_code_condlora":
        return swap_paper_code(model, case.targets, case.r, case.alpha, dropout, modules_to_save=head)
    if provider.startswith("condlora["):
        return apply_condlora(model, list(case.targets), r=case.r, alpha=case.alpha, dropout=dropout,
                              modules_to_save=head or None, backend=provider[len("condlora["):-1])
    raise ValueError(f"unknown model provider {provider!r}")


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelSuite:
    """Measures (model case, precision, provider) points on one device and keeps the rows."""

    device: torch.device
    settings: Settings
    dropout: float = 0.0
    rows: list = field(default_factory=list)
    _base: tuple = (None, None)  # (case name, model): one base model at a time
    _ms: dict = field(default_factory=dict)  # (case, precision, provider) -> median step ms

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._env = report.row_environment(self.device)

    def plan(self, providers=MODEL_PROVIDERS) -> list:
        providers = [p for p in ("frozen", "peft_lora") if p in providers] + \
                    [p for p in providers if p not in ("frozen", "peft_lora")]
        return [(case, precision, p) for case, precision in self.settings.model_cases for p in providers]

    def base_model(self, case: ModelCase) -> nn.Module:
        if self._base[0] != case.name:
            self._base = (None, None)
            self._cleanup()
            self._base = (case.name, build_model(case, self.device))
        return self._base[1]

    def measure(self, case: ModelCase, precision: str, provider: str) -> Point:
        row = {"provider": provider, "model": case.name, "case": case.as_dict(), "shape": f"{case.batch}x{case.seq}",
               "batch": case.batch, "seq": case.seq, "tokens": case.tokens, "mode": "train step",
               "precision": precision, "dtype": precision, "dropout": self.dropout, "median_ms": None,
               "examples_per_s": None, "tokens_per_s": None, "peak_mem_bytes": None, "trainable_params": None,
               "speedup_vs_peft": None, "ratio_to_frozen": None, "status": "ok", "reason": "", **self._env,
               "tflops": None, "gbps": None}  # kernel-level figures; a model step has no FLOP count here
        point = Point([row])
        reason = provider_unavailable(provider, self.device, precision)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            self.rows.append(row)
            return point
        model = optimizer = None
        try:
            base = self.base_model(case)
            if self.device.type == "cuda":  # peak memory of this run: the copy, grads, states, activations
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = torch.cuda.memory_allocated(self.device)
            model = attach(provider, copy.deepcopy(base), case, self.dropout)
            model.train()
            trainable = [p for p in model.parameters() if p.requires_grad]
            row["trainable_params"] = sum(p.numel() for p in trainable)
            optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
            step = self._train_step(model, optimizer, make_batch(case, model, self.device), precision)
            ms = self._median_step_ms(step)
            if self.device.type == "cuda":
                row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device) - before
        except Exception as exc:  # recorded as an error row; the run goes on
            row.update(status="error", reason=error_message(exc))
            model = optimizer = None
            self._cleanup()
        else:
            point.step = step
            row.update(median_ms=ms, examples_per_s=case.batch / (ms * 1e-3), tokens_per_s=case.tokens / (ms * 1e-3))
            self._ms[(case.name, precision, provider)] = ms
        self.rows.append(row)
        self.fill_ratios()
        return point

    def fill_ratios(self) -> None:
        """Ratios of every row to the frozen model and PEFT LoRA of the same case and precision, where measured."""
        for row in self.rows:
            if row["status"] == "ok":
                frozen, peft_ms = (self._ms.get((row["model"], row["precision"], p)) for p in ("frozen", "peft_lora"))
                row["ratio_to_frozen"] = row["median_ms"] / frozen if frozen else None
                row["speedup_vs_peft"] = peft_ms / row["median_ms"] if peft_ms else None

    def _train_step(self, model, optimizer, batch, precision):
        dtype = PRECISIONS[precision]

        def step():
            with (torch.autocast(self.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
                loss = model(**batch).loss
            loss.backward()
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return loss

        return step

    def _median_step_ms(self, step) -> float:
        steps = dict(warmup=self.settings.model_warmup_steps, reps=self.settings.model_steps,
                     min_reps=self.settings.model_steps)
        if self.device.type == "cuda":
            return timing.cuda_median_ms(step, **steps)
        return timing.host_median_ms(step, **steps)

    def _cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
