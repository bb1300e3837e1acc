"""Exploration (issue #11): does a model point's peak memory in the suite depend on the points before it?

The suite (`condlora bench --only model`) measures a point's peak as the peak of CUDA memory over the point above
what was allocated before it, its points one after the other in one process. Allocations that a process makes once
and keeps (a library's workspace, allocated on first use through torch's caching allocator) are then charged to the
first point that needs them. This tool measures, on one GPU:

  once     in a fresh process, the bytes that stay allocated after single calls of the GEMM kinds a training step
           makes (outputs freed): what a point pays if no earlier point made that call;
  points   RoBERTa-base's points (bf16, the suite's case) measured as the suite measured them before it made those
           allocations first (ModelSuite._warm_libraries), in the order given, in this process: peak above the
           point's start, steady peak, and the bytes allocated at the step's start above the point's start (the
           model, its optimizer state, anything kept).

    python tools/explore_point_memory.py once
    python tools/explore_point_memory.py points --mode compile --order frozen peft_lora "condlora[cuda]" [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json

import torch
import torch.nn.functional as F

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import ROBERTA_BASE


def allocated() -> int:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def once() -> dict:
    """Bytes kept allocated after the first call of each kind, in this (fresh) process."""
    import condlora_kernels  # noqa: F401  (loads the extension's ops)

    bf16, dev = torch.bfloat16, "cuda"
    n, d, r = 8192, 768, 8
    x = torch.randn(n, d, device=dev, dtype=bf16, requires_grad=True)
    w32 = torch.randn(d, d, device=dev)
    b32 = torch.randn(d, device=dev)
    theta = [torch.randn(r, d, device=dev, requires_grad=True) for _ in range(2)]
    calls = {
        "mm bf16 (F.linear without bias)": lambda: F.linear(x, w32.to(bf16)),
        "addmm bf16 with bias (F.linear)": lambda: F.linear(x, w32.to(bf16), b32.to(bf16)),
        "backward of F.linear (dx)": lambda: torch.autograd.grad(F.linear(x, w32.to(bf16)).sum(), x),
        "mm bf16 -> float32 out (the op's dtheta)": lambda: torch.mm(theta[0].to(bf16), w32.to(bf16),
                                                                     out_dtype=torch.float32),
        "condlora_C::linear forward + backward": lambda: torch.autograd.grad(
            torch.ops.condlora_C.linear.default(x, w32.to(bf16), b32.to(bf16), *theta, 1.0, 0.0, "paper").sum(),
            [x, *theta]),
    }
    base = allocated()
    kept = {}
    for name, call in calls.items():
        before = allocated()
        try:
            out = call()
        except (RuntimeError, TypeError) as exc:  # a call this torch does not have
            print(f"{name}: not run ({type(exc).__name__}: {exc})", flush=True)
            continue
        del out
        kept[name] = allocated() - before
        print(f"{name}: {kept[name]:,} bytes kept", flush=True)
    return {"base_bytes": base, "kept_bytes": kept}


def points(mode: str, order: list) -> dict:
    device = torch.device("cuda")
    case = ROBERTA_BASE
    base = bench_model.build_model(case, device)
    rows = {}
    for provider in order:
        torch._dynamo.reset()
        gc.collect()
        torch.cuda.empty_cache()
        before = allocated()
        torch.cuda.reset_peak_memory_stats()
        step, _ = bench_model.prepare_point(base, case, "bf16", mode, provider, device)
        for _ in range(3):  # the suite's first step and warm-up
            step()
        whole = torch.cuda.max_memory_allocated()
        start = allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(5):
            step()
        steady = torch.cuda.max_memory_allocated()
        rows[provider] = {"peak_mem_bytes": max(whole, steady) - before, "step_peak_mem_bytes": steady - before,
                          "kept_at_step_start_bytes": start - before, "step_peak_above_step_start": steady - start}
        print(provider, {k: f"{v:,}" for k, v in rows[provider].items()}, flush=True)
        del step
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["once", "points"])
    parser.add_argument("--mode", default="compile")
    parser.add_argument("--order", nargs="+", default=["frozen", "peft_lora", "condlora[cuda]"])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": importlib.metadata.version("triton")}
    result.update(once() if args.what == "once" else {"mode": args.mode, "order": args.order,
                                                      "points": points(args.mode, args.order)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
