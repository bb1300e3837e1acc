"""Exploration (issue #11): the GPU kernels of one CondLoRA layer's training step, eager and replayed from a CUDA
graph, with each kernel's GPU time from torch.profiler. Inside a capture `prepare` takes the cuBLAS path, outside it
the fused kernel (csrc/cuda/cuda_ops.cpp), so the two tables compare the two paths.

Setting: bf16 autocast over float32 masters (as the HF Trainer's bf16=True), x bf16 requiring grad, paper mode.

    python tools/profile_layer.py [--shape 8192,768,8] [--steps 20] [--backend cuda]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

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
    args = parser.parse_args()
    n, d, r = (int(v) for v in args.shape.split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    weight = torch.randn(d, d, device="cuda", generator=g) * d ** -0.5
    bias = torch.randn(d, device="cuda", generator=g)
    theta_a = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.25).requires_grad_()
    theta_b = (torch.randn(r, d, device="cuda", generator=g) * d ** -0.25).requires_grad_()
    grad_y = torch.randn(n, d, device="cuda", generator=g).to(torch.bfloat16)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = condlora_linear(x, weight, bias, theta_a, theta_b, 2.0, mode="paper", backend=args.backend)
        return torch.autograd.grad(y, [x, theta_a, theta_b], grad_y)

    graph, _, _ = capture_cuda_graph(step)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; N={n}, d={d}, r={r}, backend={args.backend}")
    show("eager (fused prepare kernel)", kernel_table(step, args.steps))
    show("CUDA graph replay (cuBLAS generation)", kernel_table(graph.replay, args.steps))


if __name__ == "__main__":
    main()
