"""Kernel-development measurements for the Triton backend (see benchmarks/NOTES.md).

Measures, in one process on one GPU: the two ceilings (copy bandwidth, bf16 matmul rate), then per
problem shape the frozen F.linear (forward; forward + input gradient), a plain persistent Triton GEMM
with the same main loop as the fused kernel (what Triton's GEMM reaches against cuBLAS), and the fused
CondLoRA forward and forward + backward under several tile configurations. Medians of
triton.testing.do_bench; each fused configuration is also checked against the reference.

    python benchmarks/triton_explore.py --out results.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from condlora_kernels import condlora_linear, reference
from condlora_kernels.kernels.triton import condlora_linear as tk

SHAPES = [  # (N, d_in, d_out, r, mode)
    (16384, 4096, 4096, 16, "paper"),
    (16384, 8192, 8192, 16, "paper"),
    (8192, 4096, 4096, 64, "paper"),
    (8192, 4096, 11008, 16, "general"),
    (8192, 768, 768, 8, "paper"),
    (4096, 768, 768, 8, "paper"),
]

FWD_CONFIGS = {
    "default": None,  # what the launcher picks
    "128x256x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "128x128x64 w8 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    "128x128x64 w4 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
}
BWD_CONFIGS = {
    "default": None,
    "128x256x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
    "128x128x64 w8 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
}


@triton.jit
def _plain_gemm(x_ptr, w_ptr, y_ptr, n_rows, d_in, d_out, stride_xm, stride_wn, stride_ym, num_programs,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """y = x W^T, persistent and grouped like the fused kernel's Y tiles, without the low-rank epilogue."""
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(d_out, BLOCK_N)
    for t in range(tl.program_id(0), num_m * num_n, num_programs):
        group = t // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        m = first_m + (t % (GROUP_M * num_n)) % group_m
        n = (t % (GROUP_M * num_n)) // group_m
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
        w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, d_in, BLOCK_K):
            x = tl.load(x_ptrs, mask=(rows[:, None] < n_rows) & (offs_k[None, :] < d_in - k0), other=0.0)
            w = tl.load(w_ptrs, mask=(cols[None, :] < d_out) & (offs_k[:, None] < d_in - k0), other=0.0)
            acc = tl.dot(x, w, acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < d_out))


@triton.jit
def _plain_gemm_hinted(x_ptr, w_ptr, y_ptr, n_rows, d_in, d_out, stride_xm, stride_wn, stride_ym, num_programs,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """As _plain_gemm, but rows/cols past the edge are clamped (not masked), with contiguity hints, and
    the persistent loop is flattened (tutorial 09): the loads carry a K mask only."""
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(d_out, BLOCK_N)
    k_tiles = tl.cdiv(d_in, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for t in tl.range(tl.program_id(0), num_m * num_n, num_programs, flatten=True):
        group = t // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        m = first_m + (t % (GROUP_M * num_n)) % group_m
        n = (t % (GROUP_M * num_n)) // group_m
        rows = m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = tl.max_contiguous(tl.multiple_of(tl.where(rows < n_rows, rows, 0), BLOCK_M), BLOCK_M)
        cols_c = tl.max_contiguous(tl.multiple_of(tl.where(cols < d_out, cols, 0), BLOCK_N), BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            ks = ki * BLOCK_K + offs_k
            x = tl.load(x_ptr + rows_c[:, None].to(tl.int64) * stride_xm + ks[None, :],
                        mask=offs_k[None, :] < d_in - ki * BLOCK_K, other=0.0)
            w = tl.load(w_ptr + cols_c[None, :].to(tl.int64) * stride_wn + ks[:, None],
                        mask=offs_k[:, None] < d_in - ki * BLOCK_K, other=0.0)
            acc = tl.dot(x, w, acc)
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rows[:, None] < n_rows) & (cols[None, :] < d_out))


@triton.jit
def _plain_gemm_tma(x_desc, w_desc, y_desc, n_rows, d_in, d_out, num_programs,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """As _plain_gemm, with host-side tensor descriptors (TMA loads and store), flattened persistent loop."""
    num_m = tl.cdiv(n_rows, BLOCK_M)
    num_n = tl.cdiv(d_out, BLOCK_N)
    k_tiles = tl.cdiv(d_in, BLOCK_K)
    for t in tl.range(tl.program_id(0), num_m * num_n, num_programs, flatten=True):
        group = t // (GROUP_M * num_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(num_m - first_m, GROUP_M)
        m = first_m + (t % (GROUP_M * num_n)) % group_m
        n = (t % (GROUP_M * num_n)) // group_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([m * BLOCK_M, ki * BLOCK_K])
            w = w_desc.load([n * BLOCK_N, ki * BLOCK_K])
            acc = tl.dot(x, w.T, acc)
        y_desc.store([m * BLOCK_M, n * BLOCK_N], acc.to(y_desc.dtype))


def plain_gemm(x, w, cfg, variant="pointer"):
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    meta = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if variant == "pointer":
        _plain_gemm[(num_sms,)](x, w, y, x.shape[0], x.shape[1], w.shape[0], x.stride(0), w.stride(0), y.stride(0),
                                num_sms, **meta)
    elif variant == "hinted":
        _plain_gemm_hinted[(num_sms,)](x, w, y, x.shape[0], x.shape[1], w.shape[0], x.stride(0), w.stride(0),
                                       y.stride(0), num_sms, **meta)
    else:
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]])
        w_desc = TensorDescriptor.from_tensor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]])
        y_desc = TensorDescriptor.from_tensor(y, [cfg["BLOCK_M"], cfg["BLOCK_N"]])
        _plain_gemm_tma[(num_sms,)](x_desc, w_desc, y_desc, x.shape[0], x.shape[1], w.shape[0], num_sms, **meta)
    return y


GEMM_SWEEP = {
    "128x256x64 w8 s3": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=3),
    "128x256x64 w8 s4": dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, num_warps=8, num_stages=4),
    "128x128x64 w4 s4": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
    "128x128x64 w8 s5": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=5),
    "128x128x128 w8 s3": dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3),
    "256x128x64 w8 s3": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3),
}


def gemm_sweep(shapes):
    """Plain Triton GEMM variants against cuBLAS: how close can the main loop get?"""
    rows = []
    for n, d_in, d_out in shapes:
        x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
        ref = F.linear(x, w)
        row = {"N": n, "d_in": d_in, "d_out": d_out, "cublas_ms": bench(lambda: F.linear(x, w))}
        for name, cfg in GEMM_SWEEP.items():
            for variant in ("pointer", "hinted", "tma"):
                key = f"{variant}[{name}]"
                try:
                    y = plain_gemm(x, w, cfg, variant)
                    err = rel_err(y, ref)
                    if err > 1e-2:
                        row[key] = f"wrong: rel err {err:.2e}"
                        continue
                    row[key] = bench(lambda: plain_gemm(x, w, cfg, variant))
                except Exception as exc:
                    row[key] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        best = min((v, k) for k, v in row.items() if isinstance(v, float) and k != "cublas_ms")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        print(f"GEMM {n}x{d_in}x{d_out}: cuBLAS {row['cublas_ms']:.4f} ms, best Triton {best[0]:.4f} ms "
              f"({best[1]}), ratio {best[0] / row['cublas_ms']:.3f}", flush=True)
    return rows
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    num_sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    _plain_gemm[(num_sms,)](x, w, y, x.shape[0], x.shape[1], w.shape[0], x.stride(0), w.stride(0), y.stride(0), num_sms,
                            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=8,
                            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return y


def bench(fn, rep=100):
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def ceilings():
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    copy_ms = bench(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench(lambda: x @ y)
    return {"copy_GBps": 2 * n * 2 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192 ** 3 / mm_ms / 1e9}


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_shape(n, d_in, d_out, r, mode, dropout_p, quick):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    x = torch.randn(n, d_in, device=dev, dtype=dt)
    w = (torch.randn(d_out, d_in, device=dev, dtype=dt) / d_in ** 0.5)
    b = torch.randn(d_out, device=dev, dtype=dt)
    ta = torch.randn(*reference.theta_a_shape(r, d_out, d_in, mode), device=dev, dtype=dt) / d_in ** 0.25
    tb = torch.randn(r, d_in, device=dev, dtype=dt) / d_in ** 0.25
    dy = torch.randn(n, d_out, device=dev, dtype=dt)
    s = 2.0
    row = {"N": n, "d_in": d_in, "d_out": d_out, "r": r, "mode": mode, "dropout": dropout_p}

    row["frozen_fwd_ms"] = bench(lambda: F.linear(x, w, b))
    xg = x.clone().requires_grad_(True)

    def frozen_step():  # autograd.grad, not .backward: no gradient accumulation kernel in the timing
        torch.autograd.grad(F.linear(xg, w, b), [xg], dy)

    row["frozen_fwdbwd_ms"] = bench(frozen_step)

    y_ref = None
    if dropout_p == 0.0:
        y_ref = reference.condlora_forward(x, w, b, ta, tb, s, mode=mode, upcast=torch.float32).y
        row["frozen_err"] = rel_err(F.linear(x, w, b), y_ref)

    configs = list(FWD_CONFIGS.items())[:2] if quick else FWD_CONFIGS.items()
    for name, cfg in configs:
        if cfg is not None:
            row[f"plain_triton_gemm_ms[{name}]"] = bench(lambda: plain_gemm(x, w, cfg))
        tk.FWD_CONFIG_OVERRIDE = cfg
        try:
            seed = torch.tensor([7], device=dev, dtype=torch.int64)
            y, *_ = torch.ops.condlora_triton.forward(x, w, b, ta, tb, s, dropout_p, seed, mode == "paper")
            if y_ref is not None:
                row[f"fused_fwd_err[{name}]"] = rel_err(y, y_ref)
            row[f"fused_fwd_ms[{name}]"] = bench(
                lambda: torch.ops.condlora_triton.forward(x, w, b, ta, tb, s, dropout_p, seed, mode == "paper"))
        except Exception as exc:  # record and continue: one bad config must not hide the others
            row[f"fused_fwd_error[{name}]"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    tk.FWD_CONFIG_OVERRIDE = None

    bwd_configs = list(BWD_CONFIGS.items())[:2] if quick else BWD_CONFIGS.items()
    ta_g, tb_g = ta.clone().requires_grad_(True), tb.clone().requires_grad_(True)
    for name, cfg in bwd_configs:
        tk.BWD_CONFIG_OVERRIDE = cfg
        try:
            def fused_step():
                y = condlora_linear(xg, w, b, ta_g, tb_g, s, dropout_p=dropout_p, mode=mode, backend="triton")
                torch.autograd.grad(y, [xg, ta_g, tb_g], dy)

            fused_step()
            row[f"fused_fwdbwd_ms[{name}]"] = bench(fused_step)
            seed = torch.tensor([7], device=dev, dtype=torch.int64)
            y, u, la, lb = torch.ops.condlora_triton.forward(x, w, b, ta, tb, s, dropout_p, seed, mode == "paper")
            row[f"fused_bwd_ms[{name}]"] = bench(lambda: torch.ops.condlora_triton.backward(
                dy, x, w, la, lb, u, s, dropout_p, seed, mode == "paper", True, True, False))
        except Exception as exc:
            row[f"fused_bwd_error[{name}]"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    tk.BWD_CONFIG_OVERRIDE = None
    return row


def _host_time(fn, warmup=20, reps=200) -> float:
    """Milliseconds per call by the host clock (synchronised): what a launch-bound step really costs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1e3


def profile_small_step(n=4096, d=768, r=8):
    """Where the time of a small (launch-bound) training step goes: host and device, per op."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(d, d, device="cuda", dtype=torch.bfloat16) / d ** 0.5
    ta = (torch.randn(r, d, device="cuda", dtype=torch.bfloat16) / 5).requires_grad_(True)
    tb = (torch.randn(r, d, device="cuda", dtype=torch.bfloat16) / 5).requires_grad_(True)
    dy = torch.randn(n, d, device="cuda", dtype=torch.bfloat16)

    def step():
        y = condlora_linear(x, w, None, ta, tb, 2.0, mode="paper", backend="triton")
        torch.autograd.grad(y, [x, ta, tb], dy)

    print(f"host-timed step: {_host_time(step):.4f} ms", flush=True)
    xf = x.detach().clone().requires_grad_(True)
    frozen_ms = _host_time(lambda: torch.autograd.grad(F.linear(xf, w), [xf], dy))
    print(f"host-timed frozen F.linear step: {frozen_ms:.4f} ms", flush=True)
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        step()
    torch.cuda.synchronize()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(22)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), flush=True)
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60), flush=True)


def helper_sweep():
    """Forward and backward times against the number of helper programs and loop flattening."""
    rows = []
    for n, d_in, d_out, r, mode in (SHAPES[0], SHAPES[1], SHAPES[2], SHAPES[3]):
        torch.manual_seed(0)
        x = torch.randn(n, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
        ta = torch.randn(*reference.theta_a_shape(r, d_out, d_in, mode), device="cuda", dtype=torch.bfloat16) / 8
        tb = torch.randn(r, d_in, device="cuda", dtype=torch.bfloat16) / 8
        dy = torch.randn(n, d_out, device="cuda", dtype=torch.bfloat16)
        paper = mode == "paper"
        row = {"N": n, "d_in": d_in, "d_out": d_out, "r": r, "frozen_fwd_ms": bench(lambda: F.linear(x, w))}
        xg = x.clone().requires_grad_(True)
        row["frozen_dgrad_ms"] = bench(lambda: torch.autograd.grad(F.linear(xg, w), [xg], dy)) - row["frozen_fwd_ms"]
        y, u, la, lb = tk.condlora_forward_launch(x, w, None, ta, tb, 2.0, 0.0, None, paper)
        row["fwd"] = bench(lambda: tk.condlora_forward_launch(x, w, None, ta, tb, 2.0, 0.0, None, paper))
        for lookahead in (1, 2, 4):
            tk.LOOKAHEAD_GROUPS = lookahead
            for helpers in (None, 8, 12, 16, 24):
                tk.HELPERS_OVERRIDE = helpers
                row[f"bwd[look={lookahead},h={helpers}]"] = bench(lambda: tk.condlora_backward_launch(
                    dy, x, w, la, lb, u, 2.0, 0.0, None, paper, True, True, False))
        tk.LOOKAHEAD_GROUPS, tk.HELPERS_OVERRIDE = 2, None
        rows.append(row)
        best_f = min((v, k) for k, v in row.items() if k.startswith("fwd"))
        best_b = min((v, k) for k, v in row.items() if k.startswith("bwd"))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        print(f"HELPERS {n}x{d_in}x{d_out} r{r}: fwd best {best_f[0]:.4f} ({best_f[1]}) = {best_f[0] / row['frozen_fwd_ms']:.3f}x"
              f" frozen; bwd best {best_b[0]:.4f} ({best_b[1]}) = {best_b[0] / row['frozen_dgrad_ms']:.3f}x frozen dgrad",
              flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="triton_explore.json")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES")
    ap.add_argument("--gemm-sweep", action="store_true", help="only the plain GEMM variants against cuBLAS")
    ap.add_argument("--profile", action="store_true", help="torch.profiler of one small-shape training step")
    ap.add_argument("--helpers", action="store_true", help="sweep the number of helper programs and flattening")
    args = ap.parse_args(argv)
    props = torch.cuda.get_device_properties(0)
    meta = {"gpu": torch.cuda.get_device_name(), "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    meta.update(ceilings())
    print(json.dumps(meta), flush=True)
    if args.helpers:
        rows = helper_sweep()
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "helper_sweep": rows}, f, indent=1)
        return 0
    if args.profile:
        profile_small_step()
        return 0
    if args.gemm_sweep:
        rows = gemm_sweep([(16384, 4096, 4096), (16384, 8192, 8192), (8192, 4096, 11008)])
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "gemm_sweep": rows}, f, indent=1)
        return 0
    rows = []
    shape_ids = range(len(SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    for i in shape_ids:
        n, d_in, d_out, r, mode = SHAPES[i]
        for p in ((0.0, 0.1) if i == 0 else (0.0,)):
            t0 = time.time()
            row = run_shape(n, d_in, d_out, r, mode, p, args.quick)
            row["wall_s"] = round(time.time() - t0, 1)
            rows.append(row)
            summary = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            print(json.dumps(summary), flush=True)
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows}, f, indent=1)
    # the short table: best fused config against the frozen layer
    print(f"\n{'shape':32s} {'frozen fwd':>10s} {'fused fwd':>10s} {'ratio':>6s} {'plainTri':>8s} "
          f"{'frozen f+b':>10s} {'fused f+b':>10s} {'ratio':>6s}")
    for row in rows:
        fwd = min(((v, k) for k, v in row.items() if k.startswith("fused_fwd_ms")), default=(float("nan"), ""))
        plain = min((v for k, v in row.items() if k.startswith("plain_triton")), default=float("nan"))
        fb = [(v, k) for k, v in row.items() if k.startswith("fused_fwdbwd_ms")]
        fb = min(fb) if fb else (float("nan"), "")
        name = f"{row['N']}x{row['d_in']}x{row['d_out']} r{row['r']} p{row['dropout']}"
        print(f"{name:32s} {row['frozen_fwd_ms']:10.4f} {fwd[0]:10.4f} {fwd[0] / row['frozen_fwd_ms']:6.3f} "
              f"{plain:8.4f} {row['frozen_fwdbwd_ms']:10.4f} {fb[0]:10.4f} {fb[0] / row['frozen_fwdbwd_ms']:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
