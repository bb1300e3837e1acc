"""Exploration (issue #11): the GPU kernels of one CondLoRA layer's training step, eager and replayed from a CUDA
graph, with each kernel's GPU time from torch.profiler, beside the frozen layer's (F.linear) in the same setting.
Inside a capture `prepare` takes the cuBLAS path, outside it the fused kernel where it takes the layer
(csrc/cuda/cuda_ops.cpp), so the two tables compare the two paths.

Settings (--precision):
  autocast  bf16 autocast over float32 masters (as the HF Trainer's bf16=True), x bf16 requiring grad
  bf16      every tensor bf16, no autocast: the kernel level of `condlora bench` (bench/providers.py)
Paper mode (d_in = d_out = D). --forward profiles the forward alone (x requiring grad, what it saves included).

    python tools/profile_layer.py [--shape 8192,768,8] [--steps 20] [--backend cuda] [--precision autocast]
                                  [--forward] [--no-graph]
"""

from __future__ import annotations

import argparse
import contextlib
from collections import defaultdict

import torch
import torch.nn.functional as F

from condlora_kernels import condlora_linear
from condlora_kernels.timing import capture_cuda_graph


def kernel_table(fn, steps: int) -> dict:
    """{kernel name: (calls per step, GPU µs per step)} over `steps` calls of fn."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_name[event.name][0] += 1
            per_name[event.name][1] += event.device_time
    return {name: (count / steps, us / steps) for name, (count, us) in per_name.items()}


def show(title: str, table: dict):
    total = sum(us for _, us in table.values())
    print(f"{title}: {total:.1f} µs of GPU time per step")
    for name, (calls, us) in sorted(table.items(), key=lambda item: -item[1][1]):
        print(f"  {us:8.1f} µs  {calls:4.1f}×  {name[:110]}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="8192,768,8", help="N,D,R (paper mode: d_in = d_out = D)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="cuda")
    parser.add_argument("--precision", choices=("autocast", "bf16"), default="autocast")
    parser.add_argument("--forward", action="store_true", help="also profile the forward alone")
    parser.add_argument("--no-graph", action="store_true", help="eager only (no CUDA-graph replay)")
    args = parser.parse_args()
    n, d, r = (int(v) for v in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    master = torch.float32 if args.precision == "autocast" else torch.bfloat16
    x = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(d, d, device="cuda", generator=g) * d ** -0.5).to(master)
    bias = torch.randn(d, device="cuda", generator=g).to(master)
    theta_a = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.25).to(master).requires_grad_()
    theta_b = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.25).to(master).requires_grad_()
    grad_y = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)

    def precision():
        if args.precision == "autocast":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def condlora_forward():
        with precision():
            return condlora_linear(x, weight, bias, theta_a, theta_b, 2.0, mode="paper", backend=args.backend)

    def frozen_forward():
        with precision():
            return F.linear(x, weight, bias)

    layers = {"frozen": (frozen_forward, [x]), f"condlora[{args.backend}]": (condlora_forward, [x, theta_a, theta_b])}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; N={n}, d={d}, r={r}, "
          f"precision={args.precision}")
    for name, (forward, inputs) in layers.items():
        def step(forward=forward, inputs=inputs):
            return torch.autograd.grad(forward(), inputs, grad_y)

        phases = {"forward+backward": step}
        if args.forward:
            phases = {"forward": forward, **phases}
        for phase, fn in phases.items():
            show(f"{name}, {phase}, eager", kernel_table(fn, args.steps))
            if not args.no_graph:
                graph, _, _ = capture_cuda_graph(fn)
                show(f"{name}, {phase}, CUDA graph replay", kernel_table(graph.replay, args.steps))


if __name__ == "__main__":
    main()
