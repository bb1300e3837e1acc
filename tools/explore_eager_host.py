"""Exploration (issue #11): where an eager training step's host time goes, per phase, per provider, as `condlora
bench --only model` builds the step (condlora_kernels/bench/model.py), with the caching allocator's counters.

The tenth session's suite measured RoBERTa-base eager at 28.2 ms for condlora[cuda] and 22.2 ms for
condlora[cuda]+recompute with the same GPU time (the op keeps the float32 master instead of its bf16 rounding; the
backward rounds it again): more work, less host time. This runs the providers alternately, each step split into
forward, backward, optimizer and the wait for the GPU (host clock; the GPU is drained once per step), with the
allocator's cudaMalloc/cudaFree counts over the timed steps and, per provider, once more with Python's garbage
collector off.

`--model roberta-12L-w64` is RoBERTa-base's 12 layers (24 adapted query and value layers) at width 64 on 2 x 16
tokens: its GPU work is negligible, so every phase is host time and the providers compare on host cost alone, not
on the host's speed against the GPU's. `--device cpu` runs it on CPU tensors (fp32, the cpu backend, one thread;
the allocator columns stay 0).

    python tools/explore_eager_host.py [--model roberta-base] [--providers frozen peft_lora "condlora[cuda]"
                                       "condlora[cuda]+recompute"] [--rounds 2] [--steps 15] [--json OUT]
    python tools/explore_eager_host.py --device cpu --model roberta-12L-w64 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.host import reference_call_us
from condlora_kernels.bench.shapes import LLAMA_2L, ROBERTA_BASE, ModelCase
from condlora_kernels.bench.timing import synchronize

ROBERTA_12L_W64 = ModelCase("roberta-12L-w64", "roberta",
                            (("hidden_size", 64), ("num_hidden_layers", 12), ("num_attention_heads", 2),
                             ("intermediate_size", 128), ("vocab_size", 512), ("max_position_embeddings", 72)),
                            2, 16, ("query", "value"), 8, 8, head="classifier", floor_module="embeddings.LayerNorm",
                            note="roberta-base's depth at width 64: host time only")
CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L, ROBERTA_12L_W64)}
ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")
PHASES = ("forward", "backward", "optimizer", "gpu_wait", "step")


def measure(provider: str, base, case, device, steps: int, gc_off: bool) -> dict:
    model = bench_model.attach(provider, copy.deepcopy(base), case, 0.0)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    batch = bench_model.make_batch(case, model, device)
    times = {phase: [] for phase in PHASES}

    on_gpu = device.type == "cuda"  # bf16 autocast there, as the suite; fp32 on CPU, as the suite's CPU runs

    def step(record: bool):
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_gpu):
            loss = model(**batch).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        synchronize(device)
        t4 = time.perf_counter()
        if record:
            for phase, seconds in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                times[phase].append(seconds * 1e3)

    for _ in range(3):
        step(False)
    host_mm = reference_call_us(device)
    before = torch.cuda.memory_stats() if on_gpu else {}
    if gc_off:
        gc.disable()
    try:
        for _ in range(steps):
            step(True)
    finally:
        gc.enable()
    after = torch.cuda.memory_stats() if on_gpu else {}
    row = {"provider": provider, "gc_off": gc_off, "host_mm_us": host_mm}
    row.update({f"{phase}_ms": statistics.median(values) for phase, values in times.items()})
    row.update({name: after.get(name, 0) - before.get(name, 0) for name in ALLOCATOR_COUNTERS})
    del model, optimizer, batch
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="roberta-base", choices=sorted(CASES))
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--providers", nargs="+",
                        help="default: frozen, peft_lora, condlora[cuda] and condlora[cuda]+recompute on cuda; "
                             "frozen, peft_lora and condlora[cpu] on cpu")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    providers = args.providers or (["frozen", "peft_lora", "condlora[cuda]", "condlora[cuda]+recompute"]
                                   if device.type == "cuda" else ["frozen", "peft_lora", "condlora[cpu]"])
    if device.type == "cpu":
        torch.set_num_threads(1)  # host time per op, as the host-time level measures it (bench/host.py)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    case = CASES[args.model]
    base = bench_model.build_model(case, device)
    print(f"{device_name}, torch {torch.__version__}: {case.name}, eager; ms per step (medians)")
    print("provider                     gc   fwd    bwd    optim  wait   step   mm_us  mallocs frees")
    rows = []
    for round_ in range(args.rounds):
        for gc_off in (False, True):
            for provider in providers:
                row = dict(measure(provider, base, case, device, args.steps, gc_off), round=round_)
                rows.append(row)
                figures = [row[f"{phase}_ms"] for phase in PHASES]
                print(f"{provider:28s} {'off' if gc_off else 'on ':3s} " + " ".join(f"{v:6.2f}" for v in figures)
                      + f" {row['host_mm_us']:6.1f} {row['num_device_alloc']:7d} {row['num_device_free']:5d}")
    if args.json:
        env = {"device": device_name, "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "model": case.name, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
