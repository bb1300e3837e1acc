"""Exploration (issue #11): what one GEMM costs the host, by route, on this machine (CUDA GPU, nvcc).

The compiled RoBERTa-base step is bound by the host (benchmarks/NOTES.md), and a CondLoRA layer's ops spend it
mostly around their 3 + 6 GEMMs. This measures, at a size where the GPU work is shorter than the host's (64 x 768
times 768 x 8, bf16), the host time per call of:
    aten          at::mm(a, b.t()) from C++, through the whole dispatcher (autograd layer included)
    below         the same below autograd (what the condlora_C ops do since the twenty-fourth session)
    addmm_out     at::addmm_out into a preallocated output, below autograd
    blas          cublasGemmEx on ATen's handle into a preallocated output (no dispatcher at all)
    blas+empty    the same with the output allocated by at::empty each call
    python_mm     torch.mm from Python (what Inductor's extern_kernels.mm calls)
    op_prepare_forward, op_backward_ab   the condlora_C ops from Python at a tiny layer (64 tokens, 64^2, r=4),
                  as a compiled graph calls them
Host time per call = the host clock around a batch of calls (no synchronisation inside: the GPU keeps up), the
median over batches. Also whether cuBLAS called directly gives at::mm's result bit for bit (the same kernel).

    python tools/explore_gemm_host.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch.utils.cpp_extension import load_inline

ATEN_CPP = r"""
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <chrono>

double host_us(at::Tensor a, at::Tensor b, int64_t route, int64_t calls) {
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options());
  std::optional<at::AutoDispatchBelowADInplaceOrView> below;
  if (route != 0) below.emplace();
  auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) {
    if (route == 2) {
      at::addmm_out(c, c, a, b.t(), 0.0, 1.0);
    } else {
      c = at::mm(a, b.t());
    }
  }
  auto end = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::micro>(end - start).count() / calls;
}
"""

# cuBLAS called directly, on ATen's handle for the current stream (at::cuda::blas::gemm is not exported: it does
# not link from an extension, twenty-fourth session)
CUBLAS_CPP = r"""
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <torch/extension.h>
#include <chrono>

// row-major c (m, n) = a (m, k) b^T, as column-major c^T = b a^T
void gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const int m = a.size(0), n = b.size(0), k = a.size(1);
  const float alpha = 1.0f, beta = 0.0f;
  TORCH_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &alpha,
                           b.data_ptr(), CUDA_R_16BF, k, a.data_ptr(), CUDA_R_16BF, k, &beta, c.data_ptr(),
                           CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP) == CUBLAS_STATUS_SUCCESS);
}

at::Tensor product(at::Tensor a, at::Tensor b) {
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options());
  gemm(a, b, c);
  return c;
}

double host_us(at::Tensor a, at::Tensor b, int64_t route, int64_t calls) {
  at::Tensor c = at::empty({a.size(0), b.size(0)}, a.options());
  const at::AutoDispatchBelowADInplaceOrView below;
  auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < calls; ++i) {
    if (route == 4) c = at::empty({a.size(0), b.size(0)}, a.options());
    gemm(a, b, c);
  }
  auto end = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::micro>(end - start).count() / calls;
}
"""

ROUTES = {"aten": 0, "below": 1, "addmm_out": 2, "blas": 3, "blas+empty": 4}


def median_us(fn, batches: int = 15) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(batches):
        times.append(fn())
        torch.cuda.synchronize()
    return statistics.median(times)


def python_us(call, calls: int = 500):
    def batch():
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls * 1e6
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "host_us": {}}
    a = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8, 768, device="cuda", dtype=torch.bfloat16)
    aten = load_inline("gemm_host_aten", cpp_sources=ATEN_CPP, functions=["host_us"], with_cuda=True)
    for name in ("aten", "below", "addmm_out"):
        out["host_us"][name] = median_us(lambda route=ROUTES[name]: aten.host_us(a, b, route, 500))
    try:
        blas = load_inline("gemm_host_cublas", cpp_sources=CUBLAS_CPP, functions=["host_us", "product"],
                           with_cuda=True, extra_ldflags=["-lcublas"])
    except Exception as exc:  # noqa: BLE001  (the finding is that it does not build or link)
        blas, out["cublas"] = None, f"{type(exc).__name__}: {str(exc)[-400:]}"
    if blas is not None:
        got, want = blas.product(a, b), torch.mm(a, b.t())
        out["cublas"] = {"bitwise_equal_to_mm": bool(torch.equal(got, want)),
                         "max_abs_diff": float((got.float() - want.float()).abs().max())}
        for name in ("blas", "blas+empty"):
            out["host_us"][name] = median_us(lambda route=ROUTES[name]: blas.host_us(a, b, route, 500))
    bt = b.t()
    out["host_us"]["python_mm"] = median_us(python_us(lambda: torch.mm(a, bt)))
    from condlora_kernels.testing import make_problem  # the op's own test problem, tiny
    p = make_problem(64, 64, 64, 4, mode="paper", dtype=torch.float32, device="cuda")
    x, w, bias = p.x.detach().reshape(-1, 64).bfloat16(), p.weight.detach(), p.bias.detach()
    ta, tb = p.theta_a.detach(), p.theta_b.detach()
    ops = torch.ops.condlora_C
    y, u, wc, la, lb = ops.prepare_forward.default(x, w, bias, ta, tb, 2.0, 0.0, None, "paper")
    dy = torch.randn_like(y)
    out["host_us"]["op_prepare_forward"] = median_us(python_us(
        lambda: ops.prepare_forward.default(x, w, bias, ta, tb, 2.0, 0.0, None, "paper")))
    out["host_us"]["op_backward_ab"] = median_us(python_us(
        lambda: ops.backward_ab.default(dy, x, w, u, la, lb, 2.0, 0.0, None, "paper", torch.float32,
                                        [True, True, True, False], True)))
    for name, us in out["host_us"].items():
        print(f"{name:>20}: {us:7.2f} us per call")
    print("cuBLAS called directly:", out["cublas"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
