"""Exploration (issue #11): the host-level benchmark of one build, printed as one JSON line, for comparing two builds
of the extension in alternated fresh processes on one machine (a host-bound figure follows the host's speed, which
drifts: benchmarks/NOTES.md, tenth session; so each line carries host_mm_us, the host's speed where it was measured).

    PYTHONPATH=/path/to/other/tree python tools/host_ab.py [--device cuda] [--repeats 15]

The layer and the timer are the suite's (condlora_kernels/bench/host.py): FusedCondLoRALinear forward+backward at
8 x 64 -> 64, r=4, against a frozen nn.Linear, batches of both alternating.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import condlora_kernels
from condlora_kernels.bench.host import batch_us_per_call, host_steps, reference_call_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    steps = host_steps(device)
    times = {p: [] for p in steps}
    for _, step in steps.values():
        batch_us_per_call(step, args.calls, device)
    for _ in range(args.repeats):
        for p, (_, step) in steps.items():
            times[p].append(batch_us_per_call(step, args.calls, device))
    frozen, ours = statistics.median(times["frozen"]), statistics.median(times["condlora"])
    print(json.dumps({"build": condlora_kernels.__file__, "device": args.device, "backend": steps["condlora"][0],
                      "host_mm_us": round(reference_call_us(device), 2), "frozen_us": round(frozen, 2),
                      "condlora_us": round(ours, 2), "ratio": round(ours / frozen, 3)}))


if __name__ == "__main__":
    main()
