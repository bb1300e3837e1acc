"""Probe (device only): the suite's CUDA-graph rows in backward mode, for a few providers, at 4096 x 768."""
import dataclasses
import sys

import torch

from condlora_kernels.bench import KernelSuite, Settings
from condlora_kernels.bench.shapes import KernelShape

shape = KernelShape(4096, 768, 768, 8, launch_bound=True)
settings = dataclasses.replace(Settings.for_device("cuda", quick=True), cudagraph=True, cudagraph_repeats=1)
suite = KernelSuite(torch.device("cuda"), settings)
for provider in sys.argv[1:]:
    for mode in ("backward", "forward+backward"):
        for row in suite.measure(provider, shape, mode, "bf16").rows:
            print(f"PROBE {provider:18s} {mode:17s} {row['timer']:9s} {row['status']:6s} "
                  f"{row['median_ms'] if row['median_ms'] is None else round(row['median_ms'], 4)} "
                  f"{row['ratio_to_frozen'] if row['ratio_to_frozen'] is None else round(row['ratio_to_frozen'], 2)} "
                  f"{row['reason'][:160]}")
