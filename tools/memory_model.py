"""Exploration (issue #11): what is alive at the peak of a model-level training step, per provider, as
`condlora bench --only model` runs the step (condlora_kernels/bench/model.py builds it).

Per provider, each in this process after the previous one is collected: the peak over the first step
(compilation included) and over the steady steps, both above the memory allocated before the provider's
model was built; then the allocations alive at the steady peak, grouped by the Python line that made them
(`torch.cuda.memory._record_memory_history`), largest groups first. Inductor's generated code names its
buffers on those lines, so a compiled step's groups read as "which saved tensor, which temporary". `--json` also
keeps every allocation alive at the peak (size, line), for a diff between providers.

    python tools/memory_model.py [--model roberta-base] [--mode compile] [--providers frozen peft_lora
                                 "condlora[cuda]"] [--steps 3] [--top 12] [--json OUT] [--trace-first]
                                 [--code-dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import linecache
import os
import shutil
from collections import defaultdict

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import LLAMA_2L, ROBERTA_BASE

CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L)}
MiB = 2 ** 20


def live_at_peak(snapshot: dict) -> tuple:
    """(peak bytes above the trace's start, {allocating line: bytes alive at that peak}, [(size, line)] of every
    allocation alive at it, the allocation that reached it (its line: the instant of the peak), the Inductor output
    files those lines are in), from the trace of the device's allocations and frees; allocations made before the
    trace started are not in it."""
    live, total, peak, at_peak, peak_event = {}, 0, 0, {}, None
    for event in snapshot["device_traces"][0]:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
        if total > peak:
            peak, at_peak, peak_event = total, dict(live), event
    groups = defaultdict(int)
    for event in at_peak.values():
        groups[_where(event.get("frames", []))] += event["size"]
    code_files = {frame["filename"] for event in at_peak.values() for frame in event.get("frames", [])
                  if "torchinductor" in frame["filename"]}
    reached_at = _where(peak_event.get("frames", [])) if peak_event else None
    return (peak, groups, sorted((event["size"], _where(event.get("frames", []))) for event in at_peak.values()),
            reached_at, sorted(code_files))


def _where(frames: list) -> str:
    # the innermost Python frame outside torch's own modules, with its source line
    for frame in frames:
        name = frame["filename"]
        if name.endswith(".py") and ("/torch/" not in name or "torchinductor" in name):
            text = linecache.getline(name, frame["line"]).strip()
            return f"{name.rsplit('/', 1)[-1]}:{frame['line']} {text[:90]}"
    return "(no Python frame)"


def measure(provider: str, base, case, mode: str, steps: int, top: int, trace_first: bool = False,
            code_dir: str = None) -> dict:
    device = torch.device("cuda")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step, _ = bench_model.prepare_point(base, case, "bf16", mode, provider, device)
    if trace_first:  # the first step: compilation (and Inductor's autotuning, on a cold cache) included
        torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    step()
    first_step_groups = None
    if trace_first:
        torch.cuda.synchronize()
        first_snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        _, groups_first, _, _, _ = live_at_peak(first_snapshot)
        first_step_groups = sorted(groups_first.items(), key=lambda item: -item[1])[:top]
        print(f"\n{provider}: first step's peak {(torch.cuda.max_memory_allocated() - before) / MiB:.1f} MiB; "
              "alive at its traced peak, by allocating line:")
        for where, size in first_step_groups:
            print(f"  {size / MiB:9.2f} MiB  {where}")
    step()
    torch.cuda.synchronize()
    first = torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated() - before
    torch.cuda.memory._record_memory_history(max_entries=500_000)
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    steady = torch.cuda.max_memory_allocated() - before
    traced_peak, groups, alive, reached_at, code_files = live_at_peak(snapshot)
    if code_dir:  # Inductor's generated code of the step: which buffer is which, and when each is freed
        os.makedirs(code_dir, exist_ok=True)
        for path in code_files:
            # a plain file name ("condlora[cuda]" -> "condlora_cuda_"): the device tool returns no other
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in provider)
            shutil.copy(path, os.path.join(code_dir, f"{safe}_{os.path.basename(path)}"))
    largest = sorted(groups.items(), key=lambda item: -item[1])[:top]
    print(f"\n{provider}: the steady peak is reached at {reached_at}")
    print(f"{provider} ({case.name}, {mode}): first steps' peak {first / MiB:.1f} MiB, steady peak "
          f"{steady / MiB:.1f} MiB (allocated between steps {start / MiB:.1f}, traced peak above it "
          f"{traced_peak / MiB:.1f}); alive at the steady peak, by allocating line:")
    for where, size in largest:
        print(f"  {size / MiB:9.2f} MiB  {where}")
    del step
    torch._dynamo.reset()
    return {"provider": provider, "first_peak_mib": first / MiB, "steady_peak_mib": steady / MiB,
            "between_steps_mib": start / MiB, "traced_peak_mib": traced_peak / MiB,
            "peak_reached_at": reached_at, "code_files": [os.path.basename(path) for path in code_files],
            "alive_at_peak": [[w, s / MiB] for w, s in largest],
            "alive_at_first_step_peak": first_step_groups and [[w, s / MiB] for w, s in first_step_groups],
            "every_allocation_at_peak": [[size, where] for size, where in alive]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", choices=sorted(CASES))
    parser.add_argument("--mode", default="compile", choices=["eager", "compile", "reduce-overhead"])
    parser.add_argument("--providers", nargs="+", default=["frozen", "peft_lora", "condlora[cuda]"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--code-dir", help="copy Inductor's generated code named in the trace here, per provider")
    parser.add_argument("--trace-first", action="store_true",
                        help="also trace the first step (compilation included) and list what is alive at its peak")
    args = parser.parse_args()
    case = CASES[args.model]
    base = bench_model.build_model(case, torch.device("cuda"))
    rows = [measure(p, base, case, args.mode, args.steps, args.top, args.trace_first, args.code_dir)
            for p in args.providers]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "model": case.name,
                       "mode": args.mode, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
