"""Probe (device only): where the host time of a small, host-bound layer step goes.

1. Per-call wall time of one layer (RoBERTa-base query: 8192 x 768 x 768, r=8) under bf16 autocast with fp32
   weights, as the model benchmark runs it, for the frozen layer, a PEFT-style LoRA and each backend; with the
   GPU time of the same call (CUDA events) beside it. Wall >> GPU means host-bound.
2. The Triton launches alone (time inside `_launch`) and a cProfile of the Triton backend's step.
3. One RoBERTa-base training step (bf16 autocast) per provider under torch.profiler: kernels launched, GPU
   busy time, wall time.
"""
import copy
import cProfile
import io
import pstats
import sys
import time

import torch
from torch import nn

from condlora_kernels import FusedCondLoRALinear
from condlora_kernels.kernels.triton import condlora_linear as tl_mod

device = torch.device("cuda")
N, D, R = 8192, 768, 8
torch.manual_seed(0)
base = nn.Linear(D, D, device=device).requires_grad_(False)
x = torch.randn(N, D, device=device, requires_grad=True)


class LoRA(nn.Module):  # PEFT's LoRA layer, as plain modules
    def __init__(self, linear):
        super().__init__()
        self.base = linear
        self.lora_A = nn.Linear(D, R, bias=False, device=device)
        self.lora_B = nn.Linear(R, D, bias=False, device=device)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(x)) * 1.0


layers = {"frozen": base, "lora": LoRA(base)}
for backend in ("triton", "cuda", "reference"):
    layers[f"condlora[{backend}]"] = FusedCondLoRALinear.from_linear(copy.deepcopy(base), r=R, alpha=8, backend=backend)
for m in layers.values():
    for p in m.parameters():
        if p.dim() == 2 and p.requires_grad:
            nn.init.normal_(p, std=0.02)


def step(m, backward):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(x)
    if backward:
        y.backward(torch.ones_like(y))


def wall_and_gpu(m, backward, n=100):
    for _ in range(10):
        step(m, backward)
    torch.cuda.synchronize()
    t = time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        step(m, backward)
    end.record()
    host = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    total = start.elapsed_time(end) / n
    # GPU time alone: the same calls captured in a CUDA graph would remove the host; here the kernels' sum
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(m, backward)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu = sum(e.device_time for e in kernels) / 5 / 1e3
    return host, total, gpu, len(kernels) / 5


if "--model-only" not in sys.argv:
    print("HOST layer 8192x768x768 r8, bf16 autocast, fp32 weights: host ms/call (enqueue), events ms/call, "
          "kernel-sum ms/call, kernels/call")
    for name, m in layers.items():
        for backward in (False, True):
            h, t, g, k = wall_and_gpu(m, backward)
            print(f"HOST {name:20s} {'fwd+bwd' if backward else 'fwd    '} host {h:.3f} events {t:.3f} gpu {g:.3f} "
                  f"kernels {k:.0f}")

    # 2. time inside the Triton launches
    launch_times = []
    _orig_launch = tl_mod._launch


    def timed_launch(*args, **kwargs):
        t = time.perf_counter()
        _orig_launch(*args, **kwargs)
        launch_times.append(time.perf_counter() - t)


    tl_mod._launch = timed_launch
    m = layers["condlora[triton]"]
    for _ in range(50):
        step(m, True)
    torch.cuda.synchronize()
    launch_times.sort()
    print(f"HOST triton _launch: median {launch_times[len(launch_times) // 2] * 1e6:.0f} us over {len(launch_times)}")
    tl_mod._launch = _orig_launch
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        step(m, True)
    prof.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(30)
    print("\n".join("PROF " + line for line in s.getvalue().splitlines() if line.strip()))


# 3. model step
if "--model" in sys.argv or "--model-only" in sys.argv:
    from condlora_kernels.bench import model as M
    from condlora_kernels.bench.shapes import ROBERTA_BASE
    from condlora_kernels.integrations.model import condlora_layers
    from condlora_kernels.modules.generator import CondLoRAGenerator
    base_model = M.build_model(ROBERTA_BASE, device)
    batch = M.make_batch(ROBERTA_BASE, base_model, device)
    watched = ("cudaLaunchKernel", "cuLaunchKernel", "cudaStreamSynchronize", "cudaDeviceSynchronize",
               "cudaEventSynchronize", "cudaMemcpyAsync", "cudaMalloc", "cudaStreamWaitEvent", "cudaEventRecord")
    for provider in ("frozen", "peft_lora", "paper_code_condlora", "condlora[triton]", "condlora[cuda]",
                     "condlora[cuda] unshared", "condlora[cuda] no-autocast-casts"):
        model = M.attach(provider.split()[0], copy.deepcopy(base_model), ROBERTA_BASE, 0.0)
        if provider.endswith("unshared"):  # one generator per layer: is sharing what costs?
            for layer in condlora_layers(model).values():
                g = layer.generator
                layer.generator = CondLoRAGenerator(g.in_features, g.out_features, r=g.r, mode=g.mode, device=device)
        model.train()
        autocast = not provider.endswith("no-autocast-casts")
        if not autocast:  # the model in bf16 outright: no casts at all
            model.to(torch.bfloat16)
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-4)

        def train_step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            train_step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            train_step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 5 * 1e3
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as p:
            train_step()
            torch.cuda.synchronize()
        events = p.events()
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        counts = {w: sum(1 for e in events if e.name == w) for w in watched}
        print(f"MODEL roberta bf16 {provider:34s} wall {wall:.1f} ms  kernels {len(kernels)}  "
              f"gpu-busy {sum(e.device_time for e in kernels) / 1e3:.1f} ms  "
              + " ".join(f"{k}={v}" for k, v in counts.items() if v))
        table = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        print("\n".join(f"TOP {provider:12.12s} " + line for line in table.splitlines()))
        del model, opt
        torch.cuda.empty_cache()
