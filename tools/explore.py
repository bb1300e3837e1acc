"""Sweep the fused Triton kernels' launch configurations on one GPU, through the launchers' `config=`.

Per shape: the frozen F.linear (forward, and the input gradient dy W0 that the backward's GEMM
matches), then the fused forward with each tile of its case (config.forward_pool) and the backward
with each of its tiles (config.backward_pool), each beside the launchers' own choice ("auto": autotuned
or heuristic); with --helpers also the backward's helper count and lookahead. Every fused forward is
checked against the reference. GPU medians by condlora_kernels.timing (triton.testing.do_bench's
method); one JSON row per shape, written as it goes.

    python tools/explore.py --out explore.json [--shapes 0,2] [--dropout 0.1] [--helpers]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton

from condlora_kernels import reference, timing
from condlora_kernels.kernels.triton import config
from condlora_kernels.kernels.triton.condlora_linear import condlora_backward_launch, condlora_forward_launch
from condlora_kernels.kernels.triton.config import BackwardConfig, ForwardConfig

SHAPES = [  # (N, d_in, d_out, r, mode): docs/design.md §7's shapes
    (16384, 4096, 4096, 16, "paper"),
    (16384, 8192, 8192, 16, "paper"),
    (8192, 4096, 4096, 64, "paper"),
    (8192, 4096, 11008, 16, "general"),
    (8192, 768, 768, 8, "paper"),
]
HELPER_COUNTS = (None, 8, 12, 16, 24)  # None: the rate model's count
LOOKAHEADS = (1, 2, 4)


def median_ms(fn) -> float:
    return timing.cuda_median_ms(fn, warmup_ms=25, rep_ms=100)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def ceilings() -> dict:
    """Copy bandwidth and the bf16 matmul rate of this GPU through torch."""
    n = 1 << 28  # 512 MiB of bf16
    a = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    b = torch.empty_like(a)
    copy_ms = median_ms(lambda: b.copy_(a))
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: x @ y)
    return {"copy_GBps": 2 * n * 2 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


def sweep_shape(n, d_in, d_out, r, mode, dropout_p, helpers: bool) -> dict:
    torch.manual_seed(0)
    dtype, paper = torch.bfloat16, mode == "paper"
    x = torch.randn(n, d_in, device="cuda", dtype=dtype)
    w = torch.randn(d_out, d_in, device="cuda", dtype=dtype) / d_in**0.5
    ta = torch.randn(*reference.theta_a_shape(r, d_out, d_in, mode), device="cuda", dtype=dtype) / d_in**0.25
    tb = torch.randn(r, d_in, device="cuda", dtype=dtype) / d_in**0.25
    dy = torch.randn(n, d_out, device="cuda", dtype=dtype)
    seed = torch.tensor([7], device="cuda", dtype=torch.int64)
    row = {"N": n, "d_in": d_in, "d_out": d_out, "r": r, "mode": mode, "dropout": dropout_p,
           "frozen_fwd_ms": median_ms(lambda: F.linear(x, w)), "frozen_dgrad_ms": median_ms(lambda: dy @ w)}

    def forward(cfg=None):
        return condlora_forward_launch(x, w, None, ta, tb, 2.0, dropout_p, seed, paper, config=cfg)

    y_ref = reference.condlora_forward(x, w, None, ta, tb, 2.0, mode=mode, upcast=torch.float64).y
    _, u, lora_a, lora_b = forward()
    r_pad = config.r_pad(r)
    for name, cfg in [("auto", None)] + [(str(t), ForwardConfig(t)) for t in config.forward_pool(dtype, r_pad)]:
        try:
            if dropout_p == 0.0:
                row[f"fwd_err[{name}]"] = relative_error(forward(cfg)[0], y_ref)
            row[f"fwd_ms[{name}]"] = median_ms(lambda: forward(cfg))
        except Exception as exc:  # record and go on: one bad configuration must not hide the others
            row[f"fwd_error[{name}]"] = f"{type(exc).__name__}: {str(exc)[:300]}"

    def backward(cfg=None):
        return condlora_backward_launch(dy, x, w, lora_a, lora_b, u, 2.0, dropout_p, seed, paper, True, True, False,
                                        config=cfg)

    configs = [("auto", None)] + [(str(t), BackwardConfig(t))
                                  for t in config.backward_pool(dtype, r_pad, dropout_p > 0.0)]
    if helpers:
        configs += [(f"helpers={h} lookahead={look}", BackwardConfig(num_helpers=h, lookahead=look))
                    for h in HELPER_COUNTS for look in LOOKAHEADS]
    for name, cfg in configs:
        try:
            row[f"bwd_ms[{name}]"] = median_ms(lambda: backward(cfg))
        except Exception as exc:
            row[f"bwd_error[{name}]"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return row


def summary(row: dict) -> str:
    def best(prefix):
        return min((v, k) for k, v in row.items() if k.startswith(prefix) and isinstance(v, float))

    fwd, bwd = best("fwd_ms"), best("bwd_ms")
    return (f"{row['N']}x{row['d_in']}x{row['d_out']} r{row['r']} p{row['dropout']}: "
            f"fwd {fwd[0]:.4f} ms = {fwd[0] / row['frozen_fwd_ms']:.3f}x frozen ({fwd[1]}), "
            f"bwd {bwd[0]:.4f} ms = {bwd[0] / row['frozen_dgrad_ms']:.3f}x dgrad ({bwd[1]})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="explore.json")
    parser.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--helpers", action="store_true", help="also sweep the backward's helper count and lookahead")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tools/explore.py measures on a CUDA GPU; none is visible here", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    meta = {"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), **ceilings()}
    print(json.dumps(meta), flush=True)
    indices = range(len(SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    rows = []
    for i in indices:
        rows.append(sweep_shape(*SHAPES[i], args.dropout, args.helpers))
        print(summary(rows[-1]), flush=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
