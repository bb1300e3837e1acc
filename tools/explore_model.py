"""Exploration (issue #11): training-step time of a model per provider and mode (eager, compile, reduce-overhead).

    python tools/explore_model.py --models roberta-base llama-4096-2L --modes eager compile reduce-overhead \
        --providers frozen peft_lora "condlora[cuda]" --json out.json

bf16 autocast over float32 weights; a step is forward, loss, backward, AdamW step, zero_grad; median of --steps
after --warmup steps (the first warm-up step's wall time, compilation included, is reported as first_step_s).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from condlora_kernels.bench.model import attach, build_model, make_batch
from condlora_kernels.bench.shapes import LLAMA_2L, ROBERTA_BASE

CASES = {c.name: c for c in (ROBERTA_BASE, LLAMA_2L)}


def run_point(case, base, provider, mode, warmup, steps):
    torch._dynamo.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = attach(provider, copy.deepcopy(base), case, 0.0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    batch = make_batch(case, model, torch.device("cuda"))
    fwd = model if mode == "eager" else torch.compile(model, mode=None if mode == "compile" else "reduce-overhead")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(**batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(steps):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    peak = torch.cuda.max_memory_allocated() - before
    del model, optimizer, fwd
    torch.cuda.empty_cache()
    return {"ms": statistics.median(times), "first_step_s": first, "peak_gib": peak / 2**30}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(CASES))
    parser.add_argument("--modes", nargs="+", default=["eager", "compile", "reduce-overhead"])
    parser.add_argument("--providers", nargs="+", default=["frozen", "peft_lora", "condlora[cuda]"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        case = CASES[name]
        base = build_model(case, torch.device("cuda"))
        for mode in args.modes:
            for provider in args.providers:
                row = {"model": name, "mode": mode, "provider": provider}
                try:
                    row.update(run_point(case, base, provider, mode, args.warmup, args.steps))
                except Exception as exc:  # exploration: record and go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:400]
                rows.append(row)
                frozen = next((r for r in rows if r["model"] == name and r["mode"] == mode and
                               r["provider"] == "frozen" and "ms" in r), None)
                peft = next((r for r in rows if r["model"] == name and r["mode"] == mode and
                             r["provider"] == "peft_lora" and "ms" in r), None)
                if "ms" in row:
                    print(f"{name:14s} {mode:16s} {provider:18s} {row['ms']:8.2f} ms  "
                          f"x{row['ms'] / frozen['ms'] if frozen else float('nan'):5.2f} frozen  "
                          f"x{row['ms'] / peft['ms'] if peft else float('nan'):5.2f} peft  "
                          f"{row['peak_gib']:6.2f} GiB  first {row['first_step_s']:6.1f} s", flush=True)
                else:
                    print(f"{name:14s} {mode:16s} {provider:18s} ERROR {row['error']}", flush=True)
        del base
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
