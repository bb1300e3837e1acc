"""Exploration (issue #11): GPU time of the generation, `condlora_C::prepare`, against the cast and cuBLAS it replaces.

bf16 layer over float32 masters (W0 and theta), as a training step under autocast sees it; with `--weights bf16`,
W0 already in bf16 (a model loaded in bf16: nothing to round) under float32 theta, or with `--theta bf16` bf16
theta too (the kernel level's setting). Per shape, median GPU time of one call (CUDA graphs: host time removed;
inside a capture `prepare` takes the tiled tensor-core pass):
  op       condlora_C::prepare (the tiled pass inside graphs)
  cublas   the path it replaces: W0.to(bf16), theta_a.to(bf16), theta_b.to(bf16), then the generation's GEMMs
           (condlora_C::generate_lora_weights: paper mode one GEMM and a transposed copy of B, general mode two)
  cast     W0.to(bf16) alone: what the frozen layer pays, the floor (a no-op for bf16 weights)
and, timed eagerly between CUDA events (host included), `op` (the row kernel where it applies) and `cublas`.

    python tools/explore_prepare.py [--weights fp32|bf16] [--theta fp32|bf16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch

from condlora_kernels import reference, timing
from condlora_kernels.bench.providers import DTYPES
from condlora_kernels.kernels import cpp  # noqa: F401  (loads the extension's ops)

SHAPES = [  # (mode, d_in, d_out, r)
    ("paper", 768, 768, 8),
    ("general", 768, 3072, 8),
    ("paper", 4096, 4096, 16),
    ("general", 4096, 11008, 16),
    ("general", 11008, 4096, 16),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--rep-ms", type=float, default=50.0)
    parser.add_argument("--weights", choices=("fp32", "bf16"), default="fp32", help="W0's dtype")
    parser.add_argument("--theta", choices=("fp32", "bf16"), default="fp32", help="theta's dtype")
    args = parser.parse_args()
    dtype = torch.bfloat16
    weight_dtype, theta_dtype = DTYPES[args.weights], DTYPES[args.theta]
    rows = []
    for mode, d_in, d_out, r in SHAPES:
        g = torch.Generator().manual_seed(0)
        weight = (torch.randn(d_out, d_in, generator=g) * d_in ** -0.5).to("cuda", weight_dtype)
        theta_a = torch.randn(*reference.theta_a_shape(r, d_out, d_in, mode), generator=g).to("cuda", theta_dtype)
        theta_b = torch.randn(r, d_in, generator=g).to("cuda", theta_dtype)

        def op():
            return torch.ops.condlora_C.prepare.default(weight, theta_a, theta_b, dtype, mode)

        def cublas():
            w = weight.to(dtype)
            return w, *torch.ops.condlora_C.generate_lora_weights.default(w, theta_a.to(dtype), theta_b.to(dtype),
                                                                         mode)

        def cast():
            return weight.to(dtype)

        row = {"mode": mode, "d_in": d_in, "d_out": d_out, "r": r}
        for name, fn in (("op", op), ("cublas", cublas), ("cast", cast)):
            row[f"{name}_graph_us"] = round(1000 * timing.cuda_graph_median_ms(lambda fn=fn: fn, rep_ms=args.rep_ms), 2)
        for name, fn in (("op", op), ("cublas", cublas)):
            row[f"{name}_eager_us"] = round(1000 * timing.cuda_median_ms(fn, rep_ms=args.rep_ms), 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "triton": __import__("triton").__version__, "dtype": str(dtype),
                  "weights": args.weights, "theta": args.theta, "rows": rows}
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
