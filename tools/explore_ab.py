"""Exploration (issue #11): a C++ change's effect on a training step, A/B in one process.

The change lives on a branch, with a switch its C++ reads per call (`std::getenv(NAME)`) to take the former path:
an experiment's switch for this tool, never a product setting, removed before anything lands.

RoBERTa-base (the bench's case: 16 x 512, query + value, r = 8, bf16 autocast), one step per provider built once
per mode (frozen, PEFT LoRA, condlora[cuda]); then rounds in which each variant runs `--steps` timed steps, the
variants in a rotated order each round: frozen, peft, new (condlora[cuda] as built), old (the same step with the
environment variable `--toggle` set, which the branch's C++ reads per call to take its former path). Both condlora
variants run the same model and compiled graph, so their difference within a round is the change's, host drift
aside. Per variant: the median of its round medians; per round: new - old.

    python tools/explore_ab.py --toggle NAME [--modes eager compile] [--rounds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import ROBERTA_BASE
from condlora_kernels.timing import cuda_median_ms

# each variant's provider: new and old run the same condlora[cuda] step, old with the toggle set
VARIANTS = {"frozen": "frozen", "peft": "peft_lora", "new": "condlora[cuda]", "old": "condlora[cuda]"}


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
               "case": case.name, "modes": {}}
    for mode in args.modes:
        torch._dynamo.reset()
        steps = {}
        for provider in dict.fromkeys(VARIANTS.values()):
            step, _ = bench_model.prepare_point(base, case, "bf16", mode, provider, device)
            for _ in range(3):  # compile, warm up
                step()
            steps[provider] = step
        torch.cuda.synchronize()

        def run(variant):
            if variant == "old":
                os.environ[args.toggle] = "1"
            try:
                step = steps[VARIANTS[variant]]
                step()  # one untimed step after a switch
                return cuda_median_ms(step, warmup=1, reps=args.steps, min_reps=args.steps)
            finally:
                os.environ.pop(args.toggle, None)

        variants = list(VARIANTS)
        rounds = {v: [] for v in variants}
        for i in range(args.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            for v in order:
                rounds[v].append(run(v))
            print(mode, i, {v: round(rounds[v][-1], 2) for v in variants}, flush=True)
        medians = {v: statistics.median(ms) for v, ms in rounds.items()}
        diffs = [n - o for n, o in zip(rounds["new"], rounds["old"])]
        results["modes"][mode] = {"round_ms": rounds, "median_ms": medians, "new_minus_old_ms": diffs,
                                  "median_new_minus_old_ms": statistics.median(diffs),
                                  "ratio_to_frozen": {v: m / medians["frozen"] for v, m in medians.items()}}
        print(f"{mode}: " + ", ".join(f"{v} {m:.2f} ms ({m / medians['frozen']:.3f}x)" for v, m in medians.items())
              + f"; new - old per round: median {statistics.median(diffs):+.2f} ms, "
              f"range {min(diffs):+.2f} .. {max(diffs):+.2f}", flush=True)
        steps.clear()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
