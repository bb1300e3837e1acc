"""Exploration for the C++/CUDA backend on the GPU (not a test): times the backend's forward and backward
against the same chain rule composed of cuBLAS GEMMs in different orders, step by step, so that NOTES.md can
say where the time goes. Also probes how a retained autograd graph's backward can be captured in a CUDA graph.

    python benchmarks/cuda_explore.py --out results.json [--shape N D_IN D_OUT R]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F


def median_ms(fn, reps=30):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def explore_cuda_backend(n, d_in, d_out, r, results, ops_only=False):
    from condlora_kernels.kernels import cpp  # loads the extension
    assert cpp.LOAD_ERROR is None, cpp.LOAD_ERROR
    plan = os.environ.get("CONDLORA_CUDA_PLAN", "default")
    dt, dev, s = torch.bfloat16, "cuda", 2.0
    x = torch.randn(n, d_in, device=dev, dtype=dt)
    w = torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in**0.5
    ta = torch.randn(r, d_in, device=dev, dtype=dt) / d_in**0.5
    tb = torch.randn(r, d_in, device=dev, dtype=dt) / d_in**0.5
    dy = torch.randn(n, d_out, device=dev, dtype=dt)
    ops = torch.ops.condlora_C
    y, u, a, b = ops.forward(x, w, None, ta, tb, s, 0.0, None, "paper")
    bt = b.t().contiguous()
    t = {}
    t["frozen_fwd x@W0^T"] = median_ms(lambda: F.linear(x, w))
    t["frozen_bwd dy@W0"] = median_ms(lambda: dy @ w)
    seed = torch.tensor([7], device=dev)
    t["op forward, dropout 0.1"] = median_ms(lambda: ops.forward(x, w, None, ta, tb, s, 0.1, seed, "paper"))
    t["op backward (dx, dtheta), dropout 0.1"] = median_ms(
        lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.1, seed, "paper", [True, True, True, False]))
    t["op backward (dx, dtheta, db)"] = median_ms(
        lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [True, True, True, True]))
    # accuracy of the op's gradients against float64 (the same chain rule)
    gx, gta, gtb, _ = ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [True, True, True, False])
    xd, wd, ad, bd, dyd, ud = (t_.double() for t_ in (x, w, a, b, dy, u))
    vd = dyd @ bd
    ref_gx = dyd @ wd + s * vd @ ad
    ref_gta = (s * vd.t() @ xd) @ wd
    ref_gtb = (s * ud.t() @ dyd) @ wd
    for name, got, ref in (("dx", gx, ref_gx), ("dtheta_a", gta, ref_gta), ("dtheta_b", gtb, ref_gtb)):
        t[f"rel err {name} ({plan})"] = ((got.double() - ref).norm() / ref.norm()).item()
    if ops_only:
        t["op forward"] = median_ms(lambda: ops.forward(x, w, None, ta, tb, s, 0.0, None, "paper"))
        t["op backward (dx, dtheta)"] = median_ms(
            lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [True, True, True, False]))
        for k, val in t.items():
            print(f"CUDA[{plan}] {k:48s} {val:.4g}")
        results[f"cuda_backend_{plan}"] = {"shape": [n, d_in, d_out, r], "ms": t}
        return
    t["op forward"] = median_ms(lambda: ops.forward(x, w, None, ta, tb, s, 0.0, None, "paper"))
    t["op backward (dx, dtheta)"] = median_ms(
        lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [True, True, True, False]))
    t["op backward (dx only)"] = median_ms(
        lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [True, False, False, False]))
    t["op backward (dtheta only)"] = median_ms(
        lambda: ops.backward(dy, x, w, ta, tb, u, a, b, s, 0.0, None, "paper", [False, True, True, False]))
    # pieces
    t["gen A,B^T (cat + mm)"] = median_ms(lambda: torch.cat([ta, tb]) @ w.t())
    t["u = x@A^T"] = median_ms(lambda: x @ a.t())
    t["u = F.linear(x, A)"] = median_ms(lambda: F.linear(x, a))
    t["y = s u B^T (write)"] = median_ms(lambda: torch.mm(u, bt, out=torch.empty(n, d_out, device=dev, dtype=dt)).mul_(s))
    t["y = addmm(0,u,B^T,alpha=s)"] = median_ms(lambda: torch.addmm(y, u, b.t(), beta=0, alpha=s))
    yy = torch.empty_like(y)
    t["y.addmm_(u,B^T) (r/w y)"] = median_ms(lambda: yy.addmm_(u, b.t(), alpha=s))
    t["y.addmm_(x,W0^T) beta=1"] = median_ms(lambda: yy.addmm_(x, w.t()))
    t["v = dy@B"] = median_ms(lambda: dy @ b)
    t["v = dy@B (B^T contig)"] = median_ms(lambda: dy @ bt.t())
    v = dy @ b
    t["dA = s v^T x"] = median_ms(lambda: torch.mm(v.t(), x).mul_(s))
    t["dA = addmm(alpha=s) v^T x"] = median_ms(lambda: torch.addmm(ta, v.t(), x, beta=0, alpha=s))
    t["dB^T = s u^T dy"] = median_ms(lambda: torch.addmm(tb, u.t(), dy, beta=0, alpha=s))
    t["db = dy.sum(0)"] = median_ms(lambda: dy.sum(0))
    dx = torch.empty_like(x)
    t["dx = s v A (write)"] = median_ms(lambda: torch.addmm(dx, v, a, beta=0, alpha=s))
    t["dx.addmm_(dy, W0) beta=1"] = median_ms(lambda: dx.addmm_(dy, w))
    t["dx.addmm_(v, A) (r/w dx)"] = median_ms(lambda: dx.addmm_(v, a, alpha=s))
    t["dtheta [dA;dB^T]@W0"] = median_ms(lambda: torch.cat([ta, tb]) @ w)

    def fwd_lowrank_first():
        aa, bb = (torch.cat([ta, tb]) @ w.t()).split(r)
        uu = x @ aa.t()
        out = torch.addmm(y, uu, bb, beta=0, alpha=s)  # bb is B^T (r, d_out)
        return out.addmm_(x, w.t()), uu

    def bwd_cublas():
        v = dy @ b
        dx = torch.addmm(x, v, a, beta=0, alpha=s).addmm_(dy, w)
        ga = torch.addmm(ta, v.t(), x, beta=0, alpha=s)
        gbt = torch.addmm(tb, u.t(), dy, beta=0, alpha=s)
        return dx, torch.cat([ga, gbt]) @ w

    t["variant fwd: lowrank first, frozen GEMM beta=1"] = median_ms(fwd_lowrank_first)
    t["variant bwd: all cuBLAS, dx beta=1"] = median_ms(bwd_cublas)
    yv, uv = fwd_lowrank_first()
    ref = (x.double() @ w.double().t()) + s * (x.double() @ a.double().t()) @ b.double().t()
    t["err fwd variant (max abs)"] = (yv.double() - ref).abs().max().item()
    t["err fwd op (max abs)"] = (y.double() - ref).abs().max().item()
    t["err fwd bf16 torch (max abs)"] = ((F.linear(x, w) + s * F.linear(F.linear(x, a), b)).double() - ref).abs().max().item()
    for k, val in t.items():
        print(f"CUDA[{plan}] {k:48s} {val:.4g}")
    results[f"cuda_backend_{plan}"] = {"shape": [n, d_in, d_out, r], "ms": t}


def explore_capture(results):
    """Capture the backward of a graph built before the capture (retain_graph), several ways."""
    out = {}
    n, d = 4096, 768
    w = torch.randn(d, d, device="cuda", dtype=torch.bfloat16)

    def attempt(name, error_mode, forward_on_capture_stream, use_grad_outputs=True):
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            if forward_on_capture_stream:
                with torch.cuda.stream(stream):
                    y = F.linear(x, w)
            else:
                y = F.linear(x, w)
                torch.cuda.synchronize()
            with torch.cuda.stream(stream):
                for _ in range(3):
                    torch.autograd.grad(y, [x], dy, retain_graph=True)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream, capture_error_mode=error_mode):
                    for _ in range(4):
                        torch.autograd.grad(y, [x], dy, retain_graph=True)
                g.replay()
                torch.cuda.synchronize()
            out[name] = "ok"
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            torch.cuda.synchronize()
        print(f"CAPTURE {name}: {out[name]}")

    for mode in ("global", "thread_local", "relaxed"):
        attempt(f"{mode}, forward on capture stream", mode, True)
        attempt(f"{mode}, forward on default stream", mode, False)
    results["capture"] = out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--shape", nargs=4, type=int, default=[16384, 4096, 4096, 16])
    p.add_argument("--skip-capture", action="store_true")
    p.add_argument("--ops-only", action="store_true", help="only the op timings and errors (the plan comparison)")
    args = p.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_capture:
        explore_capture(results)
    explore_cuda_backend(*args.shape, results, ops_only=args.ops_only)
    if not args.ops_only:  # the same op timings with the hand-written reductions (CONDLORA_CUDA_PLAN=fused)
        subprocess.run([sys.executable, __file__, "--ops-only", "--skip-capture", "--shape", *map(str, args.shape)],
                       env={**os.environ, "CONDLORA_CUDA_PLAN": "fused"}, check=False)
    if args.out:
        json.dump(results, open(args.out, "w"), indent=1)
