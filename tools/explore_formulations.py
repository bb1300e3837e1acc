"""Exploration (issue #11): GPU time of candidate formulations of one CondLoRA layer, as a training step sees it.

Setting: bf16 autocast over float32 master weights (as the HF Trainer's bf16=True), x bf16 requiring grad, W0 and b
float32 frozen, theta float32 trainable. Each formulation is a hand-written autograd.Function (the GPU work a C++
implementation would launch), timed
  - under CUDA graphs (host time removed): forward, and forward+backward (dx, dtheta), median ms per step;
  - eagerly (host time included): a loop of steps between CUDA events, median ms per step.

    python tools/explore_formulations.py [--shapes 8192,768,768,8 ...] [--json out.json]

Formulations:
  frozen        F.linear under autocast (the floor)
  peft          PEFT LoRA layer (fp32 adapters, autocast)
  cuda, triton  this package's backends through condlora_linear (cuda: the extension's op condlora_C::linear)
  fold          y = x (W0 + s B A)^T + b: one GEMM; dx = dy (W0 + s B A); dtheta from skinny GEMMs (u, v, dA, dB)
  fold_wgrad    as fold, dtheta from the weight gradient G = dy^T x (one GEMM), dA = s B^T G, dB = s G A^T
  lowrank       y = x W0^T + b + s (x A^T) B^T with cuBLAS calls, hand-written backward (low-rank term first: the
                frozen GEMM adds onto it with beta = 1, in y and in dx, as the cuda backend does without dropout)
  frozen_first  as lowrank, the frozen GEMM first (with the bias in its epilogue; dx = dy W0 with beta = 0), the
                rank-r GEMM adding onto it with beta = 1 (at 8192 x 768^2 cuBLAS ran the frozen GEMM with beta = 1
                in 17 us against 7-8 us with beta = 0: benchmarks/NOTES.md, eighth session)
(fold, fold_wgrad, lowrank and frozen_first are Python prototypes of formulations; benchmarks/NOTES.md has what
they measured. A `stacked` prototype, W0 and A in one buffer so that one GEMM gives [x W0^T + b | u], measured
4-9% slower than lowrank in the eleventh session and was removed; it is in git history.)
benchmarks/results/explore_formulations_h200.json was written in the fifth session by an earlier version, whose
`op_<plan>` rows called condlora_C::linear with a plan argument the op no longer has: its `op_lowrank` rows are the
op as the cuda backend runs it now, its `cuda` rows the cuda backend's route before it ran as that op.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import condlora_kernels as ck
from condlora_kernels import timing


def gen(weight32, theta_a, theta_b, paper):
    """(A, B) in float32 from the float32 master W0."""
    if paper:
        both = torch.cat([theta_a, theta_b]) @ weight32.t()  # [A; B^T]
        r = theta_a.shape[0]
        return both[:r], both[r:].t()
    return theta_a @ weight32, weight32 @ theta_b.t()


def dtheta(grad_a, grad_b, weight32, paper):
    """(dtheta_a, dtheta_b) in float32 from dA (r, d_in), dB (d_out, r)."""
    if paper:
        both = torch.cat([grad_a, grad_b.t()]) @ weight32
        r = grad_a.shape[0]
        return both[:r], both[r:]
    return grad_a @ weight32.t(), grad_b.t() @ weight32


class Fold(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b, s, paper, wgrad):
        a, b = gen(weight, theta_a, theta_b, paper)
        w_eff = torch.addmm(weight, b, a, alpha=s).to(x.dtype)
        y = torch.addmm(bias.to(x.dtype), x.reshape(-1, x.shape[-1]), w_eff.t())
        ctx.save_for_backward(x, weight, w_eff, a, b)
        ctx.s, ctx.paper, ctx.wgrad = s, paper, wgrad
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, w_eff, a, b = ctx.saved_tensors
        s = ctx.s
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        dx = (dy2 @ w_eff).view(x.shape)
        if ctx.wgrad:
            g = (dy2.t() @ x2).to(weight.dtype)  # (d_out, d_in)
            ga, gb = s * (b.t() @ g), s * (g @ a.t())
        else:
            u = x2 @ a.to(x.dtype).t()
            v = dy2 @ b.to(x.dtype)
            ga = torch.mm(v.t(), x2).to(weight.dtype) * s
            gb = torch.mm(dy2.t(), u).to(weight.dtype) * s
        dta, dtb = dtheta(ga, gb, weight, ctx.paper)
        return dx, None, None, dta, dtb, None, None, None


class LowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, theta_a, theta_b, s, paper, frozen_first=False):
        a, b = gen(weight, theta_a, theta_b, paper)
        ah, bh, wh = a.to(x.dtype), b.to(x.dtype), weight.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        u = x2 @ ah.t()
        if frozen_first:
            y = torch.addmm(bias.to(x.dtype), x2, wh.t())
            y.addmm_(u, bh.t(), alpha=s)
        else:
            y = torch.addmm(bias.to(x.dtype), u, bh.t(), alpha=s)
            y.addmm_(x2, wh.t())
        ctx.save_for_backward(x, weight, wh, ah, bh, u)
        ctx.s, ctx.paper, ctx.frozen_first = s, paper, frozen_first
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, dy):
        x, weight, wh, ah, bh, u = ctx.saved_tensors
        dx, dta, dtb = lowrank_backward(x, dy, weight, wh, ah, bh, u, ctx.s, ctx.paper, ctx.frozen_first)
        return dx, None, None, dta, dtb, None, None, None


def lowrank_backward(x, dy, weight, wh, ah, bh, u, s, paper, frozen_first):
    """(dx, dtheta_a, dtheta_b) of the low-rank formulations, with wh, ah, bh the rounded W0, A and B."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    v = dy2 @ bh
    if frozen_first:
        dx = dy2 @ wh
        dx.addmm_(v, ah, alpha=s)
    else:
        dx = torch.addmm(torch.empty_like(x2), v, ah, beta=0, alpha=s)
        dx.addmm_(dy2, wh)
    ga = torch.mm(v.t(), x2).to(weight.dtype) * s
    gb = torch.mm(dy2.t(), u).to(weight.dtype) * s
    dta, dtb = dtheta(ga, gb, weight, paper)
    return dx.view(x.shape), dta, dtb


def make(name, n, d_in, d_out, r, device):
    g = torch.Generator(device=device).manual_seed(0)
    paper = d_in == d_out
    mode = "paper" if paper else "general"
    w = torch.randn(d_out, d_in, device=device, generator=g) * d_in ** -0.5
    b = torch.randn(d_out, device=device, generator=g)
    ta_cols = d_in if paper else d_out
    ta = (torch.randn(r, ta_cols, device=device, generator=g) * ta_cols ** -0.5).requires_grad_()
    tb = (torch.randn(r, d_in, device=device, generator=g) * d_in ** -0.5).requires_grad_()
    x = torch.randn(n, d_in, device=device, generator=g, dtype=torch.bfloat16).requires_grad_()
    dy = torch.randn(n, d_out, device=device, generator=g, dtype=torch.bfloat16)
    s = 2.0
    if name == "frozen":
        f, wrt = (lambda: F.linear(x, w, b)), [x]
    elif name == "peft":
        import peft

        class One(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.proj = torch.nn.Linear(d_in, d_out, device=device)

        m = peft.get_peft_model(One(), peft.LoraConfig(r=r, lora_alpha=s * r, target_modules=["proj"]))
        layer = m.base_model.model.proj
        torch.nn.init.normal_(layer.lora_B["default"].weight)
        f, wrt = (lambda: layer(x)), [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    elif name in ("cuda", "triton"):
        f = lambda: ck.condlora_linear(x, w, b, ta, tb, s, mode=mode, backend=name)  # noqa: E731
        wrt = [x, ta, tb]
    elif name in ("fold", "fold_wgrad"):
        f = lambda: Fold.apply(x, w, b, ta, tb, s, paper, name == "fold_wgrad")  # noqa: E731
        wrt = [x, ta, tb]
    elif name in ("lowrank", "frozen_first"):
        f, wrt = (lambda: LowRank.apply(x, w, b, ta, tb, s, paper, name == "frozen_first")), [x, ta, tb]
    else:
        raise ValueError(name)

    def fwd():
        with torch.autocast("cuda", torch.bfloat16):
            return f()

    def step():
        return torch.autograd.grad(fwd(), wrt, dy)

    return fwd, step


def graph_ms(make_fn):
    """GPU time of one call from a CUDA graph of many (host time removed)."""
    return timing.cuda_graph_median_ms(make_fn, rep_ms=2.0)


def eager_ms(fn):
    """One call between CUDA events, calls queued back to back: host time shows where the GPU waits for it."""
    return timing.cuda_median_ms(fn, rep_ms=20.0, warmup_ms=5.0)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["8192,768,768,8", "8192,4096,4096,16", "8192,4096,11008,16"])
    parser.add_argument("--names", nargs="+",
                        default=["frozen", "peft", "cuda", "triton"])
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cuda")
    rows = []
    for shape in args.shapes:
        n, d_in, d_out, r = map(int, shape.split(","))
        for name in args.names:
            row = {"shape": shape, "name": name}
            try:
                row["graph_fwd_ms"] = graph_ms(lambda: make(name, n, d_in, d_out, r, device)[0])
                row["graph_step_ms"] = graph_ms(lambda: make(name, n, d_in, d_out, r, device)[1])
                fwd, step = make(name, n, d_in, d_out, r, device)
                row["eager_fwd_ms"] = eager_ms(fwd)
                row["eager_step_ms"] = eager_ms(step)
            except Exception as exc:  # exploration: record and go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            torch.cuda.empty_cache()
        frozen = next(x for x in rows if x["shape"] == shape and x["name"] == "frozen")
        print(f"\n{shape}  (ratios to frozen; graph = CUDA graph replay, eager = host included)")
        print(f"{'name':12s} {'graph fwd':>14s} {'graph step':>14s} {'eager fwd':>14s} {'eager step':>14s}")
        for x in rows:
            if x["shape"] != shape:
                continue
            if "error" in x:
                print(f"{x['name']:12s} ERROR {x['error']}")
                continue
            cells = [f"{x[k]*1e3:7.1f}us {x[k]/frozen[k]:4.2f}x" for k in
                     ("graph_fwd_ms", "graph_step_ms", "eager_fwd_ms", "eager_step_ms")]
            print(f"{x['name']:12s} " + " ".join(cells))
    if args.json:
        meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
        try:
            import triton
            meta["triton"] = triton.__version__
        except ImportError:
            pass
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
