"""Exploration (issue #11): where a model-level training step's time goes, per provider, as `condlora bench --only
model` runs it (condlora_kernels/bench/model.py builds the model, the adapters and the step).

Per provider, in the mode given: wall time per step without and with the profiler, GPU kernel time per step,
host-side synchronisations per step, the operators with the most host (self CPU) time and those with the most GPU
time; in a compiled mode (`--mode compile` or `reduce-overhead`) with `--breaks`, first the graph breaks with
their reasons. A step whose wall time exceeds its GPU kernel time is bound by the host.

    python tools/profile_model.py [--model roberta-base] [--providers frozen peft_lora "condlora[cuda]"]
                                  [--mode eager] [--steps 5] [--top 15] [--breaks]

A provider named `candidate:NAME` is one of tools/explore_compiled_paths.py's candidates (`candidate:decomposed`:
the forward after `prepare` as plain torch ops, whose compiled RoBERTa step cost 1.6-2.4 ms more host time than
the op's in the fifteenth session; benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import ROBERTA_BASE, LLAMA_2L

CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L)}


def wall_ms(step, steps: int) -> float:
    """Wall time per step over `steps` steps queued back to back (CUDA events around them all)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def profile_step(step, steps: int, top: int):
    print(f"  wall {wall_ms(step, steps):.2f} ms/step (not profiled)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        wall = wall_ms(step, steps)
    gpu_us = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / steps
    syncs = Counter(e.name for e in prof.events()
                    if e.device_type == torch.autograd.DeviceType.CPU and
                    (e.name.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"))
                     or e.name in ("cudaMemcpy", "aten::item", "aten::_local_scalar_dense")))
    kernels = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / steps
    print(f"  wall {wall:.2f} ms/step (profiled), GPU kernels {gpu_us / 1e3:.2f} ms/step in {kernels:.0f} kernels; "
          f"synchronising calls per step: {({k: v / steps for k, v in syncs.items()} or 'none')}")
    for sort_by in ("self_cpu_time_total", "self_device_time_total"):
        table = prof.key_averages().table(sort_by=sort_by, row_limit=top, max_name_column_width=60)
        print("\n".join("    " + line for line in table.splitlines()))


def explain_breaks(model, batch, mode: str):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, mode=None if mode == "compile" else mode)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(**batch).loss
    loss.backward()
    breaks = dict(counters["graph_break"])
    print(f"  graphs {counters['stats']['unique_graphs']}, breaks {sum(breaks.values())}")
    for reason, count in sorted(breaks.items(), key=lambda item: -item[1])[:8]:
        print(f"    {count}× {reason[:300]}")


def candidate_step(name: str, base, case, mode: str, device):
    """The training step of one of explore_compiled_paths.py's candidates (run from the repository root)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import explore_compiled_paths

    model = explore_compiled_paths.attach(name, base, case)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return bench_model.training_step(model, optimizer, bench_model.make_batch(case, model, device), device, "bf16",
                                     mode)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="roberta-base", choices=sorted(CASES))
    parser.add_argument("--providers", nargs="+", default=["frozen", "peft_lora", "condlora[cuda]"])
    parser.add_argument("--mode", default="eager", choices=("eager", "compile", "reduce-overhead"))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--breaks", action="store_true", help="compiled modes: list the graph breaks first")
    args = parser.parse_args()
    device = torch.device("cuda")
    case = CASES[args.model]
    base = bench_model.build_model(case, device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}: {case.name}, {args.mode}")
    for provider in args.providers:
        print(f"{provider}:")
        if args.mode != "eager" and args.breaks:
            model = bench_model.attach(provider, bench_model.copy.deepcopy(base), case, 0.0)
            explain_breaks(model, bench_model.make_batch(case, model, device), args.mode)
            del model
        if provider.startswith("candidate:"):
            step = candidate_step(provider.split(":", 1)[1], base, case, args.mode, device)
        else:
            step, _ = bench_model.prepare_point(base, case, "bf16", args.mode, provider, device)
        for _ in range(3):
            step()
        profile_step(step, args.steps, args.top)


if __name__ == "__main__":
    main()
