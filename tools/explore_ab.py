"""Exploration (issue #11): a C++ change's effect on a training step, A/B in one process.

The change lives on a branch, with a switch its C++ reads (`std::getenv(NAME)`) to take the former path: an
experiment's switch for this tool, never a product setting, removed before anything lands.

RoBERTa-base (the bench's case: 16 x 512, query + value, r = 8, bf16 autocast), one model per variant and mode:
frozen, peft (PEFT LoRA), new (condlora[cuda] as built) and old (condlora[cuda] built, compiled and run with the
environment variable `--toggle` set). The old variant is a model of its own, compiled with the switch set and with
Inductor's caches off, so that a switch read while the graph is traced (which ops the graph calls) takes effect as
much as one read per call. Then rounds in which each variant runs `--steps` timed steps, in a rotated order each
round. Per variant: the median of its round medians, and the step's peak memory above its start (the largest over
the rounds); per round: new - old.

    python tools/explore_ab.py --toggle NAME [--modes eager compile] [--rounds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import ROBERTA_BASE
from condlora_kernels.timing import cuda_median_ms

# each variant's provider: new and old are condlora[cuda], old built and run with the toggle set
VARIANTS = {"frozen": "frozen", "peft": "peft_lora", "new": "condlora[cuda]", "old": "condlora[cuda]"}


@contextlib.contextmanager
def toggled(name: str, on: bool):
    if on:
        os.environ[name] = "1"
    try:
        yield
    finally:
        os.environ.pop(name, None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--toggle", required=True, help="the environment variable that selects the old path")
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda")
    case = ROBERTA_BASE
    base = bench_model.build_model(case, device)
    results = {"toggle": args.toggle, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "triton": importlib.metadata.version("triton"), "case": case.name, "modes": {}}
    # the old variant's graph must be traced with the switch set, not found in a cache filled by the new one's
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    for mode in args.modes:
        torch._dynamo.reset()
        steps = {}
        for variant, provider in VARIANTS.items():
            with toggled(args.toggle, variant == "old"):
                step, _ = bench_model.prepare_point(base, case, "bf16", mode, provider, device)
                for _ in range(3):  # compile, warm up
                    step()
            steps[variant] = step
        torch.cuda.synchronize()

        def run(variant):
            with toggled(args.toggle, variant == "old"):
                step = steps[variant]
                step()  # one untimed step after a switch
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = cuda_median_ms(step, warmup=1, reps=args.steps, min_reps=args.steps)
                return ms, torch.cuda.max_memory_allocated() - start

        variants = list(VARIANTS)
        rounds = {v: [] for v in variants}
        peaks = {v: 0 for v in variants}
        for i in range(args.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            for v in order:
                ms, peak = run(v)
                rounds[v].append(ms)
                peaks[v] = max(peaks[v], peak)
            print(mode, i, {v: round(rounds[v][-1], 2) for v in variants}, flush=True)
        medians = {v: statistics.median(ms) for v, ms in rounds.items()}
        diffs = [n - o for n, o in zip(rounds["new"], rounds["old"])]
        results["modes"][mode] = {"round_ms": rounds, "median_ms": medians, "new_minus_old_ms": diffs,
                                  "median_new_minus_old_ms": statistics.median(diffs),
                                  "ratio_to_frozen": {v: m / medians["frozen"] for v, m in medians.items()},
                                  "step_peak_bytes_above_start": peaks}
        print(f"{mode}: " + ", ".join(f"{v} {m:.2f} ms ({m / medians['frozen']:.3f}x)" for v, m in medians.items())
              + f"; new - old per round: median {statistics.median(diffs):+.2f} ms, "
              f"range {min(diffs):+.2f} .. {max(diffs):+.2f}", flush=True)
        print(f"{mode}: step peak above its start, bytes: {peaks}; new - peft {peaks['new'] - peaks['peft']:+,}, "
              f"new - old {peaks['new'] - peaks['old']:+,}", flush=True)
        steps.clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
