"""Model-level benchmark: training steps of a transformers model built from its config, in three modes.

Providers (the adapters put on the same base model, copied for each):

    frozen                  no adapter; the small module `case.floor_module` before the first layer trains
                            (RoBERTa's embedding LayerNorm, Llama's first input norm: 1.5k and 4k parameters),
                            so that the backward runs through every layer, as with adapters: the floor
    peft_lora               peft.get_peft_model(LoraConfig(...)), PEFT's defaults (fp32 adapters)
    paper_code_condlora     the paper's code: per-target shared nn.Linear generators, forward via
                            reference.paper_code_condlora (swap_paper_code below)
    condlora[<backend>]     this package: apply_condlora(model, targets, backend=<backend>), its defaults
                            (recompute_weight_cast="auto": on RoBERTa-base's 8192 tokens it recomputes, on the
                            Llama stack's it keeps the rounding; docs/design.md §4)
    condlora[cuda]+recompute   the same with set_recompute_weight_cast(model): the float32 W0 kept until the
                            backward instead of its bf16 rounding in every layer; not in the first-step level

(The frozen model used to make the embeddings' output a leaf requiring grad, in a forward hook: the same
backward, but `requires_grad_()` on an intermediate breaks torch.compile's graph, which would make the
compiled floor a partly eager model.)

Modes (shapes.MODEL_MODES), with torch._dynamo.reset() before each point so that every point compiles afresh:

    eager             the model as it is
    compile           torch.compile(model)
    reduce-overhead   torch.compile(model, mode="reduce-overhead"): CUDA graphs (cudagraph trees), and
                      torch.compiler.cudagraph_mark_step_begin() before each step. On CPU it compiles as
                      `compile` does (inductor has no CPU graphs).

A step is forward, loss, backward, AdamW step, zero_grad (the optimizer step stays eager in every mode).
"bf16" is mixed precision as the HF Trainer's bf16=True runs it (fp32 weights, torch.autocast to bf16);
"fp32" is plain fp32. Per point, in this order:

    (priming)         compiled modes with settings.prime_compile (GPU runs; `--no-prime-compile` turns it off),
                      a point's first round only: the point is built, compiled and run for its warm-up steps
                      once, then thrown away, so that the point measured after it finds Inductor's caches (and
                      the autotuners') filled, as every run after a machine's first does. Without it a compiled
                      point's peak includes the first compilation's transient (Inductor timing an autotuned
                      kernel's configurations in the first backward: ~19 MiB on RoBERTa-base, benchmarks/NOTES.md,
                      twelfth session), which depends on the cache, not on the adapter
    first_step_s      the first step alone, synchronised: compilation, autotuning and allocation included,
                      in this process, so with whatever the earlier points left in the in-memory and on-disk
                      caches (first_step.py times it in fresh processes with cold and warm caches); of the
                      priming run where there is one
    first_compile_peak_mem_bytes  the priming run's peak, measured as peak_mem_bytes is: the first
                      compilation's, kept so that the cold figure stays in the results
    (warm-up)         settings.model_warmup_steps - 1 more untimed steps (one at least), then the whole
                      point's peak memory is read and the peak reset
    host_mm_us        the host's speed just before the timed steps: host time of one tiny torch.mm on the
                      device (bench/host.py, reference_call_us), for steps bound by the host
    median_ms         the median of settings.model_steps timed steps: CUDA events on GPU, perf_counter on CPU
    peak_mem_bytes    the peak of CUDA memory over the whole measured point (first step, compilation from the
                      primed caches and CUDA graph recording included), above what was allocated before it. The previous point's model is collected first: a compiled
                      model sits in reference cycles, and freed by the garbage collector in the middle of the
                      next point it lowered that point's figure by whatever it held (benchmarks/NOTES.md,
                      seventh session); and cuBLAS's workspaces are allocated before the first point, so that no
                      point is charged with what the process allocates once (nineteenth session)
    step_peak_mem_bytes  the same peak over the timed steps only: the steady state, what bounds the batch size
    peak_requested_bytes  the whole point's peak of the bytes the tensors asked for, before the allocator
                      rounds each request up to the block it hands out (the blocks are what peak_mem_bytes
                      counts; a block that cannot be split is handed out whole, up to 1 MiB more than asked,
                      benchmarks/NOTES.md, twenty-second session)
    peak_reserved_bytes  the whole point's peak of the memory the caching allocator holds from CUDA (what an
                      out-of-memory error is about), above what it held before the point
    round_ms          with settings.model_rounds = R > 1, each model and mode's providers are measured R times,
    round_host_mm_us  in turn, each time as above, the order rotated by one place per round (frozen, PEFT, ours;
                      then PEFT, ours, frozen; ...); the point's row keeps every round's median step time and
                      host_mm_us, and reports their medians (median_ms, host_mm_us), the highest peaks, and the
                      first round's first step. A step bound by the host (eager RoBERTa-base, or a compiled one on
                      a slow host) follows the host's speed, which on the H200 machines moved by up to 1.7x within
                      one process over seconds (benchmarks/NOTES.md, tenth session) and slowed round after round
                      for the adapted compiled steps (twenty-third session): alternating the providers over rounds
                      spreads that drift over all of them, and rotating them puts each provider once in each
                      place of a round.
    graphs_compiled   compiled modes: the graphs Dynamo compiled (beyond graph_breaks + 1: recompilations,
    graph_breaks      each one more compile during the first steps) and the graph breaks it met
    point_s           the point's wall time, everything included

Time of a full GPU run of this level (Settings.for_device("cuda"): RoBERTa-base and the Llama stack in bf16,
three modes; frozen, peft_lora, paper_code_condlora, condlora[triton], condlora[cuda] in every mode and
condlora[reference] in eager mode only: 32 points), measured on an H200 (benchmarks/NOTES.md, seventh session):
eager mode with host time 97 s (Triton's first eager points autotune: ~30 s each), the compiled modes of frozen,
PEFT and both backends 342 s, the paper's code compiled 144 s; the first-step level in fresh processes 219 s. The
progress bar prints each point's wall time and the rows keep it (`point_s`). condlora[cuda]+recompute adds 6
points. On a freshly started machine (ninth session) RoBERTa's compiled points took 38-72 s each and the Llama
stack's 7-48 s. To stay within a time limit per command, run it in parts with `--merge` and `--models`
(tools/device_suite.sh does it in four).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import importlib
import importlib.util
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from condlora_kernels import reference, timing
from condlora_kernels.bench import host, report
from condlora_kernels.bench.kernels import Point, error_message
from condlora_kernels.bench.providers import backend_unavailable_reason
from condlora_kernels.bench.shapes import MODEL_MODES, ModelCase, Settings, condlora_provider
from condlora_kernels.bench.timing import synchronize
from condlora_kernels.integrations.model import (apply_condlora, match_target, set_recompute_weight_cast,
                                                 set_submodule)

# the default backend on CUDA (the extension's op) before Triton, whose first eager point autotunes
MODEL_PROVIDERS = ("frozen", "peft_lora", "paper_code_condlora", "condlora[cuda]", "condlora[triton]",
                   "condlora[cpu]", "condlora[reference]", "condlora[cuda]+recompute")
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
        # problem_type set here rather than by the first call, which would make torch.compile recompile
        config = transformers.RobertaConfig(**dict(case.config), num_labels=2,
                                            problem_type="single_label_classification")
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
    ours = condlora_provider(provider)
    if ours is not None:
        return backend_unavailable_reason(ours[0], device, PRECISIONS[precision] or torch.float32)
    return None


def attach(provider: str, model: nn.Module, case: ModelCase, dropout: float) -> nn.Module:
    """Put the provider's adapters on `model` (a copy of the base); returns the model to call."""
    head = [case.head] if case.head else []
    if provider == "frozen":
        trained = head + [case.floor_module]
        found = set()
        for p in model.parameters():
            p.requires_grad_(False)
        for name, module in model.named_modules():
            target = match_target(name, trained)
            if target is not None:
                found.add(target)
                for p in module.parameters():
                    p.requires_grad_(True)
        if case.floor_module not in found:
            raise ValueError(f"model case {case.name}: floor_module {case.floor_module!r} matches no module")
        return model
    if provider == "peft_lora":
        peft = importlib.import_module("peft")
        config = peft.LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=dropout,
                                 target_modules=list(case.targets), modules_to_save=head or None)
        return peft.get_peft_model(model, config)
    if provider == "paper_code_condlora":
        return swap_paper_code(model, case.targets, case.r, case.alpha, dropout, modules_to_save=head)
    ours = condlora_provider(provider)
    if ours is not None:
        backend, recompute = ours
        model = apply_condlora(model, list(case.targets), r=case.r, alpha=case.alpha, dropout=dropout,
                               modules_to_save=head or None, backend=backend)
        return set_recompute_weight_cast(model) if recompute else model
    raise ValueError(f"unknown model provider {provider!r}")


def compiled(model: nn.Module, mode: str, backend: str = "inductor") -> Callable:
    """The model as the mode runs it (shapes.MODEL_MODES). `backend` other than inductor (tests on CPU) has
    no reduce-overhead mode: it compiles both compiled modes the same way."""
    if mode == "eager":
        return model
    if mode not in MODEL_MODES:
        raise ValueError(f"unknown model mode {mode!r}; expected one of {MODEL_MODES}")
    if mode == "reduce-overhead" and backend == "inductor":
        return torch.compile(model, mode="reduce-overhead")
    return torch.compile(model, backend=backend)


def training_step(model: nn.Module, optimizer, batch: dict, device: torch.device, precision: str, mode: str,
                  backend: str = "inductor",
                  after_phase: Optional[Callable[[str, torch.Tensor], None]] = None) -> Callable[[], torch.Tensor]:
    """One training step of `model` in `mode`: forward and loss (under autocast for bf16), backward, AdamW step.
    after_phase(name, loss), where given, is called after each of the phases "forward", "backward" and "optimizer"
    (the tools that read memory per phase; the suite gives none)."""
    forward = compiled(model, mode, backend)
    dtype = PRECISIONS[precision]
    graphs = mode == "reduce-overhead"

    def step():
        if graphs:  # a new iteration: the CUDA graphs may reuse the previous step's outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        with (torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()):
            loss = forward(**batch).loss
        if after_phase is not None:
            after_phase("forward", loss)
        loss.backward()
        if after_phase is not None:
            after_phase("backward", loss)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if after_phase is not None:
            after_phase("optimizer", loss)
        return loss

    return step


def prepare_point(base: nn.Module, case: ModelCase, precision: str, mode: str, provider: str,
                  device: torch.device, dropout: float = 0.0, backend: str = "inductor") -> tuple:
    """(the step of a copy of `base` with the provider's adapters, its trainable parameter count)."""
    model = attach(provider, copy.deepcopy(base), case, dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    step = training_step(model, optimizer, make_batch(case, model, device), device, precision, mode, backend)
    return step, sum(p.numel() for p in trainable)


def timed_first_step(step: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of `step` in seconds, the device synchronised before and after."""
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------


def _fold_round(row: dict, later: dict, case: ModelCase) -> None:
    """Adds a later round's measurement of a point to the point's row (see round_ms above). A round that
    failed makes the point an error row: its other rounds are kept, the median is not reported."""
    row["point_s"] += later["point_s"]
    if row["status"] != "ok":
        return
    if later["status"] != "ok":
        row.update(status=later["status"], median_ms=None, examples_per_s=None, tokens_per_s=None,
                   reason=f"round {len(row['round_ms']) + 1}: {later['reason']}")
        return
    row["round_ms"].append(later["median_ms"])
    row["round_host_mm_us"].append(later["host_mm_us"])
    ms = statistics.median(row["round_ms"])
    row.update(median_ms=ms, examples_per_s=case.batch / (ms * 1e-3), tokens_per_s=case.tokens / (ms * 1e-3))
    if all(v is not None for v in row["round_host_mm_us"]):
        row["host_mm_us"] = statistics.median(row["round_host_mm_us"])
    for name in ("peak_mem_bytes", "step_peak_mem_bytes", "peak_requested_bytes", "peak_reserved_bytes"):
        if later.get(name) is not None and row.get(name) is not None:
            row[name] = max(row[name], later[name])


def _allocator_bytes(device: torch.device, which: str) -> tuple:
    """The caching allocator's (allocated, requested, reserved) bytes, "current" or "peak" (since the last reset):
    allocated counts the blocks it hands out (torch.cuda.memory_allocated and max_memory_allocated read the same)."""
    stats = torch.cuda.memory_stats(device)
    return tuple(stats[f"{kind}_bytes.all.{which}"] for kind in ("allocated", "requested", "reserved"))


@dataclass
class ModelSuite:
    """Measures (model case, precision, mode, provider) points on one device and keeps the rows."""

    device: torch.device
    settings: Settings
    dropout: float = 0.0
    rows: list = field(default_factory=list)
    _base: tuple = (None, None)  # (case name, model): one base model at a time

    def __post_init__(self):
        self.device = torch.device(self.device)
        self._env = report.row_environment(self.device)
        self._libraries_warm = False

    def _warm_libraries(self) -> None:
        """Make, before the first point, the allocations a process makes once and keeps: cuBLAS's workspace, one
        per thread that calls it (the forward's and the autograd engine's), and cuBLASLt's (a GEMM with a bias).
        Otherwise the first point that calls them is charged with them: 64 MiB and 1 MiB on the H200, which made a
        point's peak depend on the points run before it (benchmarks/NOTES.md, nineteenth session)."""
        if self._libraries_warm or self.device.type != "cuda":
            return
        x = torch.randn(8, 64, device=self.device, requires_grad=True)
        weight, bias = torch.randn(64, 64, device=self.device), torch.randn(64, device=self.device)
        for dtype in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                y = F.linear(x, weight, bias)
            y.sum().backward()
        synchronize(self.device)
        self._libraries_warm = True

    def plan(self, providers=MODEL_PROVIDERS) -> list:
        """Every (case, precision, mode, provider) of the settings: per case and mode, frozen and PEFT first in
        the first round (the ratios' denominators), the order rotated by one place in each later round (the
        module docstring's round_ms); settings.eager_only_providers in eager mode only."""
        providers = [p for p in ("frozen", "peft_lora") if p in providers] + \
                    [p for p in providers if p not in ("frozen", "peft_lora")]
        eager_only = self.settings.eager_only_providers
        plan = []
        for case, precision in self.settings.model_cases:
            for mode in self.settings.model_modes:
                in_mode = [p for p in providers if mode == "eager" or p not in eager_only]
                for k in range(self.settings.model_rounds):
                    shift = k % max(1, len(in_mode))
                    plan += [(case, precision, mode, p) for p in in_mode[shift:] + in_mode[:shift]]
        return plan

    def base_model(self, case: ModelCase) -> nn.Module:
        if self._base[0] != case.name:
            self._base = (None, None)
            self._cleanup()
            self._base = (case.name, build_model(case, self.device))
        return self._base[1]

    def measure(self, case: ModelCase, precision: str, mode: str, provider: str) -> Point:
        row = {"provider": provider, "model": case.name, "case": case.as_dict(), "shape": f"{case.batch}x{case.seq}",
               "batch": case.batch, "seq": case.seq, "tokens": case.tokens, "mode": mode,
               "precision": precision, "dtype": precision, "dropout": self.dropout, "median_ms": None,
               "examples_per_s": None, "tokens_per_s": None, "peak_mem_bytes": None, "step_peak_mem_bytes": None,
               "peak_requested_bytes": None, "peak_reserved_bytes": None, "trainable_params": None,
               "host_mm_us": None, "first_compile_peak_mem_bytes": None,
               "ratio_to_peft": None, "ratio_to_frozen": None, "first_step_s": None, "point_s": None,
               "graphs_compiled": None, "graph_breaks": None,
               "status": "ok", "reason": "", **self._env,
               "tflops": None, "gbps": None}  # kernel-level figures; a model step has no FLOP count here
        point = Point([row])
        started = time.perf_counter()
        reason = provider_unavailable(provider, self.device, precision)
        if reason is not None:
            row.update(status="skipped", reason=reason, point_s=0.0)
            if self._earlier_round(row) is None:
                self.rows.append(row)
            return point
        step = None
        try:
            import torch._dynamo  # here, not at the top: the first-step processes must not pay its import (~2 s)

            dynamo_counters = torch._dynamo.utils.counters
            base = self.base_model(case)
            primed = mode != "eager" and self.settings.prime_compile and self._earlier_round(row) is None
            priming = self.start_point(base, case, precision, mode, provider, prime=primed)
            dynamo_counters.clear()  # what this point compiles: graphs (recompilations included), breaks
            if primed:  # the first compilation's step time and peak are its; the measured model starts warm
                row["first_step_s"], row["first_compile_peak_mem_bytes"] = priming
            cuda = self.device.type == "cuda"
            if cuda:  # peak memory of this point: the copy, grads, states, activations
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                before = _allocator_bytes(self.device, "current")
            step, row["trainable_params"] = prepare_point(base, case, precision, mode, provider, self.device,
                                                          self.dropout, self.settings.compile_backend)
            first_step_s = timed_first_step(step, self.device)
            if not primed:
                row["first_step_s"] = first_step_s
            self._warm_up(step)
            if cuda:
                whole_point_peaks = _allocator_bytes(self.device, "peak")
                torch.cuda.reset_peak_memory_stats(self.device)
            row["host_mm_us"] = host.reference_call_us(self.device)
            ms = self._median_step_ms(step)
            if cuda:
                step_peaks = _allocator_bytes(self.device, "peak")
                allocated, requested, reserved = (max(whole, steady) - start for whole, steady, start
                                                  in zip(whole_point_peaks, step_peaks, before))
                row.update(peak_mem_bytes=allocated, step_peak_mem_bytes=step_peaks[0] - before[0],
                           peak_requested_bytes=requested, peak_reserved_bytes=reserved)
            if mode != "eager":
                row.update(graphs_compiled=dynamo_counters["stats"]["unique_graphs"],
                           graph_breaks=sum(dynamo_counters["graph_break"].values()))
        except Exception as exc:  # recorded as an error row; the run goes on
            row.update(status="error", reason=error_message(exc))
            step = None
            torch._dynamo.reset()
            self._cleanup()
        else:
            point.step = step
            row.update(median_ms=ms, examples_per_s=case.batch / (ms * 1e-3), tokens_per_s=case.tokens / (ms * 1e-3))
        row["point_s"] = time.perf_counter() - started
        earlier = self._earlier_round(row)
        if earlier is None:
            row.update(round_ms=[row["median_ms"]], round_host_mm_us=[row["host_mm_us"]])
            self.rows.append(row)
        else:
            _fold_round(earlier, row, case)
            point = Point([earlier], step=point.step)
        report.fill_model_ratios(self.rows)
        return point

    def start_point(self, base: nn.Module, case: ModelCase, precision: str, mode: str, provider: str,
                    prime: bool = True) -> Optional[tuple]:
        """What the suite does before it builds a point, for `measure` and for the tools that measure a point the
        suite's way: a clean slate (Dynamo reset, so that the point compiles afresh and the previous point's CUDA
        graphs go; the previous point's model collected, which its compiled wrapper keeps in reference cycles),
        the libraries' one-off allocations made on CUDA (_warm_libraries), and where `prime`, the point compiled
        and run once and thrown away (_prime_compile_caches). Returns the priming's (first step's seconds, peak
        bytes), or None where it did not prime."""
        import torch._dynamo  # not at the top, as in measure

        torch._dynamo.reset()
        self._cleanup()
        if self.device.type == "cuda":
            self._warm_libraries()
        return self._prime_compile_caches(base, case, precision, mode, provider) if prime else None

    def _prime_compile_caches(self, base: nn.Module, case: ModelCase, precision: str, mode: str,
                              provider: str) -> tuple:
        """Compile the point and run its warm-up steps once, then throw it away: (its first step's wall time, its
        peak memory above what was allocated before it, None off CUDA). Its first step fills the caches a compiled
        step reads (Inductor's FX graph and AOTAutograd caches, the best configurations of its autotuned Triton
        kernels, our autotuner's), so the point measured next counts its training step and not this first
        compilation: from a cold cache the first backward's peak includes Inductor timing a kernel's configurations
        while the forward's activations are alive, tens of MiB that a process pays once per graph and a user's
        later runs not at all (benchmarks/NOTES.md, twelfth and twentieth sessions)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
        step, _ = prepare_point(base, case, precision, mode, provider, self.device, self.dropout,
                                self.settings.compile_backend)
        first_step_s = timed_first_step(step, self.device)
        self._warm_up(step)  # the steps after the first can compile again (recompilations, CUDA graph recording)
        peak = torch.cuda.max_memory_allocated(self.device) - before if cuda else None
        del step
        torch._dynamo.reset()
        self._cleanup()
        return first_step_s, peak

    def _earlier_round(self, row: dict) -> Optional[dict]:
        """The row of this point's earlier rounds (settings.model_rounds), or None for a first round."""
        key = ("model", "precision", "mode", "provider", "dropout")
        return next((r for r in self.rows if all(r[k] == row[k] for k in key)), None)

    def _warm_up(self, step):
        # the first step is behind us: settings.model_warmup_steps counts it
        for _ in range(max(1, self.settings.model_warmup_steps - 1)):
            step()
        synchronize(self.device)

    def _median_step_ms(self, step) -> float:
        steps = dict(warmup=0, reps=self.settings.model_steps, min_reps=self.settings.model_steps)
        if self.device.type == "cuda":
            return timing.cuda_median_ms(step, **steps)
        return timing.host_median_ms(step, **steps)

    def _cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
