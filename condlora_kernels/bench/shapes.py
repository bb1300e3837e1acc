"""What is benchmarked: kernel shapes, model cases, and the timing settings of a full or quick run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MODES = ("forward", "backward", "forward+backward")
# How a model-level training step runs (model.py): as written, torch.compile(model), and
# torch.compile(model, mode="reduce-overhead") (CUDA graphs).
MODEL_MODES = ("eager", "compile", "reduce-overhead")
# a model provider "condlora[<backend>]" with that backend's layers as they are, or with recompute_weight_cast set
RECOMPUTE_SUFFIX = "+recompute"


def condlora_provider(provider: str) -> Optional[tuple]:
    """(backend, recompute_weight_cast) of a "condlora[<backend>]" or "condlora[<backend>]+recompute" provider,
    None for the other providers."""
    recompute = provider.endswith(RECOMPUTE_SUFFIX)
    name = provider[:-len(RECOMPUTE_SUFFIX)] if recompute else provider
    if not (name.startswith("condlora[") and name.endswith("]")):
        return None
    return name[len("condlora["):-1], recompute


@dataclass(frozen=True)
class KernelShape:
    """One linear layer: N tokens, d_in -> d_out, rank r; `mode` is the CondLoRA generation mode."""

    n: int
    d_in: int
    d_out: int
    r: int
    mode: str = "paper"
    note: str = ""
    launch_bound: bool = False  # small enough that launch overhead dominates: also timed under CUDA graphs

    @property
    def key(self) -> str:
        return f"{self.n}x{self.d_in}x{self.d_out} r{self.r}" + (" general" if self.mode == "general" else "")

    def as_dict(self) -> dict:
        return {"n": self.n, "d_in": self.d_in, "d_out": self.d_out, "r": self.r, "mode": self.mode,
                "key": self.key, "note": self.note}


# The shapes of docs/design.md §7, row for row (bf16 on the H100).
GPU_SHAPES = (
    KernelShape(8192, 768, 768, 8, note="paper: RoBERTa-base, 16 x 512 tokens", launch_bound=True),
    KernelShape(4096, 768, 768, 8, note="RoBERTa-base, 4096 tokens", launch_bound=True),
    KernelShape(16384, 4096, 4096, 16, note="Llama-7B-like attention projection"),
    KernelShape(8192, 4096, 4096, 64, note="Llama-7B-like, r=64"),
    KernelShape(16384, 8192, 8192, 16, note="8192 x 8192"),
    KernelShape(8192, 4096, 11008, 16, mode="general", note="FFN up-projection (not square)"),
)
GPU_QUICK_SHAPES = (GPU_SHAPES[0], GPU_SHAPES[2], GPU_SHAPES[5])

# CPU: small shapes, so the suite runs anywhere (CI: 2 cores, no GPU).
CPU_SHAPES = (
    KernelShape(1024, 256, 256, 8, note="small square (CPU)"),
    KernelShape(1024, 256, 384, 8, mode="general", note="small non-square (CPU)"),
    KernelShape(2048, 768, 768, 8, note="RoBERTa-base width, the CPU backend's target shape (fp32)"),
)
CPU_QUICK_SHAPES = (
    KernelShape(256, 64, 64, 4, note="tiny square (CPU quick)"),
    KernelShape(256, 64, 96, 4, mode="general", note="tiny non-square (CPU quick)"),
)


@dataclass(frozen=True)
class ModelCase:
    """A model built from a transformers config (nothing downloaded) and the adapter setting trained on it."""

    name: str
    family: str  # "roberta" (sequence classification) or "llama" (causal LM)
    config: tuple  # (key, value) pairs of the transformers config
    batch: int
    seq: int
    targets: tuple
    r: int
    alpha: float
    head: Optional[str] = None  # module trained in full alongside the adapters (modules_to_save)
    # a small module before the first layer, trained in the `frozen` model so that its backward runs
    # through every layer as the adapted models' do (model.py says why a parameter and not a hook)
    floor_module: str = ""
    note: str = ""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def as_dict(self) -> dict:
        return {"name": self.name, "family": self.family, "config": dict(self.config), "batch": self.batch,
                "seq": self.seq, "targets": list(self.targets), "r": self.r, "alpha": self.alpha,
                "head": self.head, "floor_module": self.floor_module, "note": self.note}


LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# The paper's Table 4 setting: RoBERTa-base, batch 16 x 512, query and value, r=8, alpha=8.
# RobertaConfig() has roberta-base's sizes but 512 positions: roberta-base has 514 (positions start after
# the padding index 1), which 512-token sequences need.
ROBERTA_BASE = ModelCase("roberta-base", "roberta",
                         (("max_position_embeddings", 514), ("type_vocab_size", 1), ("layer_norm_eps", 1e-5)),
                         16, 512, ("query", "value"), 8, 8, head="classifier", floor_module="embeddings.LayerNorm",
                         note="paper Table 4 setting")
# A Llama-7B-like decoder stack of 2 layers (hidden 4096, FFN 11008); a small vocabulary so that the
# frozen lm_head does not dominate; every projection targeted (gate/up/down in general mode).
LLAMA_2L = ModelCase("llama-4096-2L", "llama",
                     (("hidden_size", 4096), ("intermediate_size", 11008), ("num_hidden_layers", 2),
                      ("num_attention_heads", 32), ("num_key_value_heads", 32), ("vocab_size", 1024),
                      ("max_position_embeddings", 2048)),
                     8, 1024, LLAMA_TARGETS, 16, 16, floor_module="layers.0.input_layernorm",
                     note="Llama-7B-like stack, 2 layers, all projections")
ROBERTA_TINY = ModelCase("roberta-tiny", "roberta",
                         (("hidden_size", 64), ("num_hidden_layers", 2), ("num_attention_heads", 2),
                          ("intermediate_size", 128), ("vocab_size", 512), ("max_position_embeddings", 72)),
                         2, 64, ("query", "value"), 8, 8, head="classifier", floor_module="embeddings.LayerNorm",
                         note="tiny RoBERTa (CPU)")
LLAMA_TINY = ModelCase("llama-tiny", "llama",
                       (("hidden_size", 64), ("intermediate_size", 176), ("num_hidden_layers", 2),
                        ("num_attention_heads", 4), ("num_key_value_heads", 4), ("vocab_size", 256),
                        ("max_position_embeddings", 128)),
                       2, 64, LLAMA_TARGETS, 4, 4, floor_module="layers.0.input_layernorm",
                       note="tiny Llama (CPU)")
MODEL_CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L, ROBERTA_TINY, LLAMA_TINY)}


@dataclass
class Settings:
    """How long to time each point. `for_device` gives the full or quick settings of a device type."""

    quick: bool = False
    warmup_ms: float = 25.0  # do_bench
    rep_ms: float = 100.0
    cudagraph: bool = True  # also time launch-bound shapes under CUDA graphs
    cudagraph_rep_ms: float = 20.0
    cudagraph_repeats: int = 3  # CUDA-graph rows are repeated: at these sizes single runs are noisy
    cpu_budget_s: float = 0.5  # per point, CPU timer
    cpu_max_reps: int = 30
    model_warmup_steps: int = 3  # untimed steps, the first (timed alone: time to first step) included
    model_steps: int = 10  # timed steps: their median is the step time
    # each model and mode's providers measured this many times, alternating; a point reports the median of its
    # rounds (a step bound by the host follows the host's speed, which moves within a process: model.py)
    model_rounds: int = 1
    model_modes: tuple = MODEL_MODES
    # compiled, the reference backend's plain torch ops make the paper code's graph again: a minute of
    # compiling per point for nothing new (`--providers condlora[reference]` runs it in every mode)
    eager_only_providers: tuple = ("condlora[reference]",)
    compile_backend: str = "inductor"  # torch.compile's backend in the compiled modes (tests use "aot_eager")
    # compile each compiled point once and throw it away before measuring it, so that its peak memory counts the
    # training step and not the first compilation's autotuning (model.py, ModelSuite._prime_compile_caches); on
    # for GPU runs, where peaks are measured
    prime_compile: bool = False
    first_step: bool = False  # time the first step in fresh processes, cold and warm caches (first_step.py)
    first_step_case: Optional[tuple] = None  # (ModelCase, precision) it runs on
    first_step_timeout_s: float = 900.0  # per subprocess
    host_calls: int = 200  # host-time level: calls per timed batch (host.py)
    host_repeats: int = 15  # batches; the median batch gives the time per call
    compile: bool = True  # include the torch.compile provider (kernel level)
    cpu_threads: Optional[int] = None  # torch intra-op threads on CPU (None: torch's default); see timing.torch_threads
    shapes: tuple = field(default_factory=tuple)
    model_cases: tuple = field(default_factory=tuple)  # (ModelCase, precision) pairs
    dtypes: tuple = ("bf16",)

    @classmethod
    def for_device(cls, device_type: str, quick: bool = False) -> "Settings":
        if device_type == "cuda":
            # bf16 only at model level: the headline. The three modes of both models fill the time budget of a
            # full run (model.py's docstring has the estimate), so fp32 RoBERTa is left out.
            if quick:
                return cls(quick=True, warmup_ms=10, rep_ms=30, cudagraph_repeats=1, model_warmup_steps=3,
                           model_steps=5, compile=False, shapes=GPU_QUICK_SHAPES,
                           model_cases=((ROBERTA_BASE, "bf16"),), model_modes=("eager", "reduce-overhead"),
                           host_repeats=7, prime_compile=True)
            return cls(shapes=GPU_SHAPES, model_cases=((ROBERTA_BASE, "bf16"), (LLAMA_2L, "bf16")),
                       first_step=True, first_step_case=(ROBERTA_BASE, "bf16"), prime_compile=True)
        # CPU: fp32 (CPU bf16 matmuls say little), no CUDA graphs, and neither torch.compile at kernel level nor
        # the compiled modes at model level by default: inductor takes tens of seconds per graph to build on a
        # small CPU machine (a 2-layer tiny RoBERTa's training step: ~60 s on 2 cores)
        common = dict(cudagraph=False, compile=False, dtypes=("fp32",), model_modes=("eager",),
                      model_cases=((ROBERTA_TINY, "fp32"), (LLAMA_TINY, "fp32")),
                      first_step_case=(ROBERTA_TINY, "fp32"))
        if quick:
            return cls(quick=True, cpu_budget_s=0.05, cpu_max_reps=5, model_warmup_steps=1, model_steps=3,
                       cpu_threads=1, shapes=CPU_QUICK_SHAPES, host_calls=50, host_repeats=5, **common)
        return cls(cpu_budget_s=0.3, cpu_max_reps=20, model_warmup_steps=2, model_steps=5, shapes=CPU_SHAPES,
                   **common)

    def as_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k not in ("shapes", "model_cases", "first_step_case")}
        out["shapes"] = [s.key for s in self.shapes]
        out["model_cases"] = [f"{case.name} {precision}" for case, precision in self.model_cases]
        if self.first_step_case is not None:
            out["first_step_case"] = f"{self.first_step_case[0].name} {self.first_step_case[1]}"
        return out
