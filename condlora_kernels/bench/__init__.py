"""Benchmarks of CondLoRA against the frozen layer and LoRA, kernel level and model level.

Shared by `condlora bench` (cli.py) and the pytest-benchmark suite in benchmarks/, so both measure the
same thing the same way:

    shapes.py      the benchmarked shapes (DESIGN.md §3's table on GPU, tiny ones on CPU) and settings
    timing.py      median timers: triton's do_bench / do_bench_cudagraph on GPU, perf_counter on CPU; peak memory
    providers.py   the implementations compared (frozen F.linear, LoRA, PEFT, paper code, compiled, backends),
                   their input sets and the timed step of each mode, FLOP and byte counts
    kernels.py     one kernel-level point -> result rows (with ratios to the frozen layer)
    model.py       model-level training throughput (RoBERTa-base paper setting, a Llama-style stack)
    report.py      environment record, JSON, markdown tables, the PNG plot
    cli.py         `condlora bench`
"""

from condlora_kernels.bench.kernels import KernelSuite
from condlora_kernels.bench.model import ModelSuite
from condlora_kernels.bench.shapes import Settings

__all__ = ["KernelSuite", "ModelSuite", "Settings"]
