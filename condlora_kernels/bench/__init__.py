"""Benchmarks of CondLoRA against the frozen layer, LoRA and PEFT: kernel, model, host-time and first-step levels.

Shared by `condlora bench` (cli.py) and the pytest-benchmark suite in benchmarks/, so both measure the
same thing the same way:

    shapes.py       the benchmarked shapes and model cases (tiny ones on CPU), the model modes, and settings
    timing.py       median timers: triton's do_bench / do_bench_cudagraph on GPU, perf_counter on CPU; peak memory
    providers.py    the implementations compared (frozen F.linear, LoRA, PEFT, paper code, compiled, backends),
                    their input sets and the timed step of each mode, FLOP and byte counts
    kernels.py      one kernel-level point -> result rows (with ratios to the frozen layer)
    model.py        model-level training steps (RoBERTa-base paper setting, a Llama-style stack) in eager,
                    torch.compile and reduce-overhead modes
    host.py         host time per call of FusedCondLoRALinear against nn.Linear at a tiny shape
    first_step.py   the first training step in fresh processes, cold and warm caches
    report.py       environment record, JSON, markdown tables, the targets of issue #11, the PNG plot
    cli.py          `condlora bench`
"""

from condlora_kernels.bench.host import HostSuite
from condlora_kernels.bench.kernels import KernelSuite
from condlora_kernels.bench.model import ModelSuite
from condlora_kernels.bench.shapes import Settings

__all__ = ["HostSuite", "KernelSuite", "ModelSuite", "Settings"]
