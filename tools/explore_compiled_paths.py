"""Exploration (issue #11): two candidate changes to CondLoRA's training step, measured at the model level against
PEFT LoRA and the package as it is, in one process (condlora_kernels/bench/model.py builds the models and steps).

benchmarks/NOTES.md (seventh session) has why: in RoBERTa-base's compiled modes the peak memory is 1.4-3.6 MiB
above PEFT's, because the peaks fall at different moments of the last layer's forward, not because the op saves more
per layer. The candidates (no dropout; decomposed is a Python autograd Function over the extension's inner ops):

    op          the package as it is (condlora_C::linear: prepare, forward_ab, backward_ab; the bf16 W0 saved)
    decomposed  prepare, then the forward as plain torch ops, y = x W0^T + b + s (x A^T) B^T: Inductor sees the
                low-rank sum and can fuse it into its consumers (the attention's transposes), as it does for
                PEFT. The backward is still backward_ab. Measured in the fifteenth session (benchmarks/NOTES.md):
                RoBERTa's compiled peak 5-6 MiB below PEFT's, its step 1.6-2.4 ms slower; on the Llama stack (no
                bias) Inductor rewrites the sum into an out-of-place addmm: +96 MiB, +0.4-0.9 ms
    function    the op's forward and backward (prepare, forward_ab, backward_ab), but through a Python autograd
                Function instead of the C++ one: the same compiled graph, unless the route matters (ninth session)
    recast      the op's forward and backward, but the backward casts W0 again from its float32 master instead of
                the forward saving the bf16 copy: 2 bytes per weight element less memory from forward to
                backward, one more pass over W0 per layer in the backward. Measured in the eighth session through
                this file's Function; it is now the package's setting, and the candidate runs it
                (set_recompute_weight_cast)

Each candidate runs on the CUDA backend's ops. A training step, a median step time and the peak memory per point,
as the bench measures them (the previous point collected first). `--check` (any device) compares each candidate's
loss and gradients with the op's on the tiny RoBERTa first.

    python tools/explore_compiled_paths.py [--models roberta-base llama-4096-2L] [--modes compile reduce-overhead]
                                           [--candidates op function decomposed recast] [--rounds N]
                                           [--json OUT] [--check] [--host-ops]

`--rounds N` measures every point N times, the providers in turn each round (drift in the host's speed shows as
a spread between rounds). `--host-ops` first times the host cost of one call of each inner op (CUDA, 64 tokens x
768^2, r=8, where the GPU keeps up) against the ATen calls of the same GEMMs made from Python.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import time

import torch
import torch.nn.functional as F

from condlora_kernels import set_recompute_weight_cast, timing
from condlora_kernels.bench import model as bench_model
from condlora_kernels.bench.shapes import LLAMA_2L, ROBERTA_BASE, ROBERTA_TINY
from condlora_kernels.modules.linear import FusedCondLoRALinear

CASES = {case.name: case for case in (ROBERTA_BASE, LLAMA_2L, ROBERTA_TINY)}


class CandidateFunction(torch.autograd.Function):
    """One CondLoRA layer (p = 0) over the extension's inner ops, `variant` as in the module docstring; x, bias in
    the compute dtype, weight and the generators as stored (float32 masters)."""

    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b, scaling: float, mode: str, variant: str):
        dtype = x.dtype
        weight_cast, lora_a, lora_b = torch.ops.condlora_C.prepare.default(weight, theta_a, theta_b, dtype, mode)
        w = weight if weight.dtype == dtype else weight_cast
        x2d = x.reshape(-1, weight.shape[1])
        bias_c = None if bias is None else bias.to(dtype)
        if variant == "decomposed":
            u = x2d @ lora_a.t()
            y = F.linear(x2d, w, bias_c) + scaling * (u @ lora_b.t())
        else:
            y, u = torch.ops.condlora_C.forward_ab.default(x2d, w, bias_c, lora_a, lora_b, scaling, 0.0, None)
        ctx.save_for_backward(x2d, w, u, lora_a, lora_b)
        ctx.scaling, ctx.mode, ctx.dtype, ctx.x_shape = scaling, mode, dtype, x.shape
        ctx.theta_dtypes = (theta_a.dtype, theta_b.dtype)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        x2d, w, u, lora_a, lora_b = ctx.saved_tensors
        need_x, _, need_b, need_ta, need_tb = ctx.needs_input_grad[:5]
        theta_grad_dtype = torch.float32 if ctx.dtype in (torch.float16, torch.bfloat16) else ctx.dtype
        gx, gta, gtb, gb = torch.ops.condlora_C.backward_ab.default(
            grad_y.reshape(-1, w.shape[0]), x2d, w, u, lora_a, lora_b, ctx.scaling, 0.0, None, ctx.mode,
            theta_grad_dtype, [need_x, need_ta, need_tb, need_b and ctx.has_bias])
        return (gx.reshape(ctx.x_shape) if need_x else None, None, gb if need_b and ctx.has_bias else None,
                gta.to(ctx.theta_dtypes[0]) if need_ta else None, gtb.to(ctx.theta_dtypes[1]) if need_tb else None,
                None, None, None)


def candidate_forward(variant: str):
    def forward(self: FusedCondLoRALinear, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            x = x.to(torch.get_autocast_dtype(device_type))
        generator = self.generator
        with torch.autocast(device_type, enabled=False):
            return CandidateFunction.apply(x, self.weight, self.bias, generator.theta_a, generator.theta_b,
                                           self.alpha / self.r, self.mode, variant)
    return forward


def attach(provider: str, base, case):
    """A copy of `base` with the provider's adapters: "peft_lora", or a candidate (CondLoRA on the cuda or cpu
    backend, its layers' forward replaced unless the candidate is "op")."""
    if provider == "peft_lora":
        return bench_model.attach("peft_lora", copy.deepcopy(base), case, 0.0)
    device = next(base.parameters()).device
    backend = "cuda" if device.type == "cuda" else "cpu"
    model = bench_model.attach(f"condlora[{backend}]", copy.deepcopy(base), case, 0.0)
    if provider == "recast":
        return set_recompute_weight_cast(model)
    if provider != "op":
        for module in model.modules():
            if isinstance(module, FusedCondLoRALinear):
                module.forward = candidate_forward(provider).__get__(module)
    return model


def measure(provider, base, case, mode, precision, device, steps) -> dict:
    torch._dynamo.reset()
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    model = attach(provider, base, case)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    step = bench_model.training_step(model, optimizer, bench_model.make_batch(case, model, device), device,
                                     precision, mode)
    started = time.perf_counter()
    step()
    bench_model.synchronize(device)
    first = time.perf_counter() - started
    if cuda:
        ms = timing.cuda_median_ms(step, warmup=2, reps=steps, min_reps=steps)
        peak = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    else:
        ms = timing.host_median_ms(step, warmup=1, reps=steps, min_reps=steps)
        peak = None
    row = {"model": case.name, "mode": mode, "provider": provider, "median_ms": ms, "peak_mib": peak,
           "first_step_s": first}
    print(f"{case.name:14} {mode:16} {provider:11} {ms:8.2f} ms  peak {peak if peak is None else round(peak, 1)} "
          f"MiB  first step {first:.1f} s", flush=True)
    return row


def host_ops(device: torch.device, n_tokens: int = 64, d: int = 768, r: int = 8, calls: int = 300) -> None:
    """Host time of one call of each inner op, and of the ATen GEMMs it makes, called from Python: median over
    rounds of `calls` calls without synchronising (the GPU keeps up at this size)."""
    bf16 = torch.bfloat16
    w = torch.randn(d, d, device=device)
    theta_a, theta_b = torch.randn(r, d, device=device), torch.randn(r, d, device=device)
    x, bias, dy = (torch.randn(n_tokens, d, device=device, dtype=bf16), torch.randn(d, device=device, dtype=bf16),
                   torch.randn(n_tokens, d, device=device, dtype=bf16))
    ops = torch.ops.condlora_C
    wc, a, b = ops.prepare.default(w, theta_a, theta_b, bf16, "paper")
    y, u = ops.forward_ab.default(x, wc, bias, a, b, 1.0, 0.0, None)
    stacked = torch.randn(2 * r, d, device=device, dtype=bf16)
    cases = {
        "prepare": lambda: ops.prepare.default(w, theta_a, theta_b, bf16, "paper"),
        "forward_ab": lambda: ops.forward_ab.default(x, wc, bias, a, b, 1.0, 0.0, None),
        "backward_ab": lambda: ops.backward_ab.default(dy, x, wc, u, a, b, 1.0, 0.0, None, "paper", torch.float32,
                                                       [True, True, True, False]),
        "3 GEMMs from Python (forward_ab's)": lambda: torch.addmm(bias, torch.mm(x, a.t()), b.t()).addmm_(x, wc.t()),
        "1 torch.mm": lambda: torch.mm(x, wc.t()),
        "1 torch.mm, float32 out": lambda: torch.mm(stacked, wc, out_dtype=torch.float32),
    }
    for name, call in cases.items():
        times = []
        for _ in range(7):
            torch.cuda.synchronize(device)
            started = time.perf_counter()
            for _ in range(calls):
                call()
            times.append((time.perf_counter() - started) / calls * 1e6)
        torch.cuda.synchronize(device)
        times.sort()
        print(f"host per call  {name:36} {times[len(times) // 2]:7.1f} us (min {times[0]:.1f})", flush=True)


def check(device: torch.device, candidates) -> None:
    """Loss and generator gradients of each candidate against the op's, tiny RoBERTa, eager and compiled."""
    case = dataclasses.replace(ROBERTA_TINY, config=ROBERTA_TINY.config + (("num_hidden_layers", 1),))
    base = bench_model.build_model(case, device)
    for mode in ("eager", "compile"):
        results = {}
        for provider in ["op", *[c for c in candidates if c != "op"]]:
            torch._dynamo.reset()
            model = attach(provider, base, case)
            torch.manual_seed(1)
            for p in model.condlora_generators.parameters():
                torch.nn.init.normal_(p, std=0.05)  # theta_b starts at zero: make the low-rank term count
            torch.manual_seed(0)
            forward = bench_model.compiled(model, mode, "inductor" if device.type == "cuda" else "aot_eager")
            loss = forward(**bench_model.make_batch(case, model, device)).loss
            loss.backward()
            results[provider] = [loss.detach()] + [p.grad for p in model.condlora_generators.parameters()]
        for provider, got in results.items():
            for a, b in zip(got, results["op"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        print(f"check {mode}: {', '.join(results)} agree with the op", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["roberta-base", "llama-4096-2L"], choices=sorted(CASES))
    parser.add_argument("--modes", nargs="+", default=["compile", "reduce-overhead"],
                        choices=["eager", "compile", "reduce-overhead"])
    parser.add_argument("--candidates", nargs="+", default=["op", "decomposed", "recast"],
                        choices=["op", "function", "decomposed", "recast"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--host-ops", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--check", action="store_true", help="check the candidates against the op first")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.check:
        check(device, args.candidates)
    if args.host_ops:
        host_ops(device)
    rows = []
    for name in args.models:
        case = CASES[name]
        precision = "bf16" if device.type == "cuda" else "fp32"
        base = bench_model.build_model(case, device)
        for mode in args.modes:
            for round_ in range(args.rounds):
                for provider in ["peft_lora", *args.candidates]:
                    rows.append(dict(measure(provider, base, case, mode, precision, device, args.steps),
                                     round=round_))
        del base
    if args.json:
        env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__}
        with open(args.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
