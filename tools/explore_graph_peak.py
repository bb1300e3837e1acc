"""Exploration (issue #11): what is alive at a compiled RoBERTa-base point's peak, per provider.

The suite's whole-point peak under CUDA graphs (`reduce-overhead`) was 164,352 bytes above PEFT LoRA's for
condlora[cuda] in two runs (nineteenth and twentieth sessions), while its steady peak is 6.7 MB below. This tool
measures a point as the suite does (libraries warmed, the point primed: compiled once and thrown away, then a fresh
copy's first step and warm-up steps), with the caching allocator's history recorded over the measured part. From
the trace it rebuilds the allocated bytes event by event, finds the peak, and lists the blocks alive there with
the Python frames that allocated them (Inductor's generated code included, with its source line), so that two
providers' peaks can be compared block by block.

    python tools/explore_graph_peak.py --mode reduce-overhead --providers peft_lora "condlora[cuda]" --json OUT

With --phases it reads instead the allocator's peak statistic after each phase (forward, backward, optimizer step)
of the measured point's first four steps (in which phase the whole point's peak is reached), and lists what the
second step's compiled forward saved for its backward (shape, dtype, storage bytes, whether it is a parameter).
With --phases --alive it also lists every block the allocator holds after that forward, read from its snapshot
(not rebuilt from the trace, which missed 12-18 MB): size, memory pool, stream and the innermost frames that
allocated it, grouped, so that two providers' live memory can be diffed group by group.
"""

from __future__ import annotations

import argparse
import collections
import copy
import importlib.metadata
import json
import linecache
import os

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import ROBERTA_BASE, Settings

KEEP = ("torchinductor", "condlora", "peft", "transformers", "explore_graph_peak")


def short_frames(frames: list, keep: int = 5, libraries_only: bool = True) -> list:
    """The innermost frames worth reading, with their source line: generated code and the libraries' (all frames
    with libraries_only=False)."""
    out = []
    for f in frames:
        name = f.get("filename", "")
        if libraries_only and not any(k in name for k in KEEP):
            continue
        line = linecache.getline(name, f.get("line", 0)).strip()[:160]
        out.append(f"{os.path.basename(name)}:{f.get('line')} {f.get('name')} | {line}")
        if len(out) == keep:
            break
    return out


def live_at_peak(trace: list) -> tuple:
    """(peak bytes above the trace's start, index of the event that reached it, the blocks alive there)."""
    total = peak = 0
    peak_index = -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            total += event["size"]
        elif event["action"] == "free_requested":  # the allocated-bytes statistic drops when free is called
            total -= event["size"]
        if total > peak:
            peak, peak_index = total, i
    live = {}
    for i, event in enumerate(trace[:peak_index + 1]):
        if event["action"] == "alloc":
            live[event["addr"]] = (i, event)
        elif event["action"] == "free_requested":
            live.pop(event["addr"], None)
    return peak, peak_index, list(live.values())


MARKER_BYTES = 512 * 1013  # a size no step allocates: its allocations mark where each step begins in the trace


def mark(k: int) -> None:
    torch.empty(MARKER_BYTES + 512 * k, dtype=torch.uint8, device="cuda")


def phase(index: int, marks: list) -> str:
    """Which part of the measured point an event belongs to: "model" (the copy and its optimizer), "step N"."""
    names = ["model"] + [f"step {k}" for k in range(1, len(marks))]
    return next((names[k] for k in reversed(range(len(marks))) if index > marks[k]), "model")


def prime(suite, base, mode: str, provider: str) -> tuple:
    """What the suite does before it measures a point (ModelSuite.start_point): a clean slate, the libraries'
    one-off allocations made, the point compiled once and thrown away. Returns the priming's (first step's seconds,
    peak bytes)."""
    return suite.start_point(base, ROBERTA_BASE, "bf16", mode, provider, prime=True)


def measure(suite, base, mode: str, provider: str) -> dict:
    case = ROBERTA_BASE
    first_s, first_peak = prime(suite, base, mode, provider)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    mark(0)
    step, _ = bench_model.prepare_point(base, case, "bf16", mode, provider, torch.device("cuda"))
    for k in range(1, 4):  # the suite's first step and warm-up steps
        mark(k)
        step()
    torch.cuda.synchronize()
    whole = torch.cuda.max_memory_allocated() - before
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][torch.cuda.current_device()]
    peak, index, live = live_at_peak(trace)
    marks = [i for i, e in enumerate(trace)
             if e["action"] == "alloc" and MARKER_BYTES <= e["size"] < MARKER_BYTES + 512 * 8]
    blocks = [{"size": e["size"], "event": i, "phase": phase(i, marks), "frames": short_frames(e["frames"])}
              for i, e in live]
    groups = collections.Counter()
    for b in blocks:
        groups[(b["size"], b["phase"], b["frames"][0] if b["frames"] else "?")] += 1
    print(f"{provider} {mode}: whole-point peak {whole:,} (suite's way), from the trace {peak:,} at event "
          f"{index} of {len(trace)}; {len(live)} blocks alive, {sum(b['size'] for b in blocks):,} bytes", flush=True)
    print(f"  peak in {phase(index, marks)} (marks at events {marks})", flush=True)
    print("  event at the peak:", short_frames(trace[index]["frames"], 8), flush=True)
    for (size, where, frame), n in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[1])[:40]:
        print(f"  {n:4d} x {size:>12,}  {where:7s} {frame[:150]}", flush=True)
    del step
    return {"whole_point_peak_bytes": whole, "trace_peak_bytes": peak, "peak_event": index, "events": len(trace),
            "primed_first_step_s": first_s, "primed_peak_bytes": first_peak,
            "peak_phase": phase(index, marks), "marks": marks,
            "peak_event_frames": short_frames(trace[index]["frames"], 12), "live_at_peak": blocks}


def alive_blocks() -> list:
    """Every allocated block the caching allocator holds now, grouped by (size, pool, stream, innermost frames):
    count and bytes per group, largest first. Blocks allocated before the history was recorded have no frames."""
    groups = collections.Counter()
    for segment in torch.cuda.memory._snapshot()["segments"]:
        pool = str(segment.get("segment_pool_id", "?"))
        for block in segment["blocks"]:
            if block["state"] != "active_allocated":
                continue
            frames = tuple(short_frames(block.get("frames", []), keep=4, libraries_only=False))
            groups[(block["size"], pool, segment["stream"], frames)] += 1
    rows = [{"size": size, "pool": pool, "stream": stream, "frames": list(frames), "count": n, "bytes": size * n}
            for (size, pool, stream, frames), n in groups.items()]
    return sorted(rows, key=lambda r: -r["bytes"])


def phases(suite, base, mode: str, provider: str, alive: bool = False) -> dict:
    """The allocator's peak statistic per phase (forward, backward, optimizer step) of the measured point's first
    four steps, above what was allocated before the point: where the whole point's peak is reached. The step is
    the suite's (bench_model.training_step), read after each phase through its after_phase hook."""
    case, device = ROBERTA_BASE, torch.device("cuda")
    prime(suite, base, mode, provider)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    model = bench_model.attach(provider, copy.deepcopy(base), case, 0.0)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = bench_model.make_batch(case, model, device)
    out = []

    def phase_done(name):
        torch.cuda.synchronize()
        out.append({"phase": name, "peak": torch.cuda.max_memory_allocated() - before,
                    "allocated_after": torch.cuda.memory_allocated() - before})
        torch.cuda.reset_peak_memory_stats()

    def saved_for_backward(loss) -> list:
        """What the compiled forward saved for its backward: (shape, dtype, bytes, is a parameter) per tensor."""
        params = {p.data_ptr() for p in model.parameters()}
        rows, seen, stack = [], set(), [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            if "CompiledFunction" in type(node).__name__:
                try:
                    tensors = node.saved_tensors
                except RuntimeError as exc:  # the tool reports what it could not read rather than stopping
                    print(f"  saved_tensors of {type(node).__name__}: {exc}", flush=True)
                    tensors = ()
                for t in tensors:
                    if isinstance(t, torch.Tensor):
                        rows.append({"shape": list(t.shape), "dtype": str(t.dtype),
                                     "bytes": t.untyped_storage().nbytes(), "param": t.data_ptr() in params})
            stack.extend(n for n, _ in node.next_functions)
        return rows

    saved, live, k = [], [], 0

    def after_phase(name, loss):
        nonlocal saved, live
        phase_done(f"step {k} {name}")
        if name == "forward" and k == 2:
            saved = saved_for_backward(loss)
            if alive:
                live = alive_blocks()
                torch.cuda.memory._record_memory_history(enabled=None)
                print(f"  {provider}: {sum(r['bytes'] for r in live):,} bytes in {sum(r['count'] for r in live)} "
                      f"blocks alive after step 2's forward (allocated: {torch.cuda.memory_allocated():,})",
                      flush=True)
                for r in live[:25]:
                    print(f"    {r['count']:4d} x {r['size']:>12,} pool {r['pool']:10s} {r['frames'][:1]}", flush=True)

    step = bench_model.training_step(model, optimizer, batch, device, "bf16", mode, after_phase=after_phase)
    if alive:
        torch.cuda.memory._record_memory_history(context="alloc", stacks="python", max_entries=2_000_000)
    torch.cuda.reset_peak_memory_stats()
    for k in range(1, 5):
        step()
    for row in out:
        print(f"  {provider:16s} {row['phase']:20s} peak {row['peak']:>15,}  "
              f"allocated after {row['allocated_after']:>15,}", flush=True)
    counts = collections.Counter((tuple(r["shape"]), r["dtype"], r["bytes"], r["param"]) for r in saved)
    print(f"  {provider}: {len(saved)} tensors saved for the backward, "
          f"{sum(r['bytes'] for r in saved if not r['param']):,} bytes not parameters", flush=True)
    for (shape, dtype, nbytes, param), n in sorted(counts.items(), key=lambda kv: -kv[0][2] * kv[1]):
        print(f"    {n:3d} x {str(shape):24s} {dtype:15s} {nbytes:>12,} {'param' if param else ''}", flush=True)
    return {"phases": out, "saved_for_backward": saved, "alive_after_step2_forward": live}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", default="reduce-overhead")
    parser.add_argument("--providers", nargs="+", default=["peft_lora", "condlora[cuda]"])
    parser.add_argument("--phases", action="store_true",
                        help="the peak statistic per phase of the first steps instead of the trace")
    parser.add_argument("--alive", action="store_true",
                        help="with --phases: the allocator's live blocks after the recorded forward, grouped")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    suite = bench_model.ModelSuite(torch.device("cuda"), Settings.for_device("cuda"))
    base = bench_model.build_model(ROBERTA_BASE, torch.device("cuda"))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": importlib.metadata.version("triton"), "mode": args.mode, "points": {}}
    for provider in args.providers:
        if args.phases:
            result["points"][provider] = phases(suite, base, args.mode, provider, alive=args.alive)
        else:
            result["points"][provider] = measure(suite, base, args.mode, provider)
        if args.json:  # after each point: a cut run keeps what it measured
            with open(args.json, "w") as f:
                json.dump(result, f)


if __name__ == "__main__":
    main()
