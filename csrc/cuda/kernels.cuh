// Launchers of the hand-written CUDA kernels (kernels.cu), in plain C++ types: kernels.cu includes only the CUDA
// runtime headers (no ATen), so nvcc compiles it quickly and without the cuBLAS headers that ATen's CUDA headers
// pull in; cuda_ops.cpp does the ATen side (allocation, streams, device guards, the GEMMs through cuBLAS).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace condlora {
namespace cuda {

enum class DType { kHalf, kBFloat16, kFloat, kDouble };

// The largest rank the fused token-reduction kernel handles (its per-thread accumulators are registers);
// larger ranks take a slower path built from GEMMs and dropout_scale.
constexpr int kMaxFusedRank = 64;

// The bool keep mask (n_rows, n_cols) of philox.h.
cudaError_t launch_dropout_keep_mask(const int64_t* seed, int64_t n_rows, int64_t n_cols, uint32_t threshold,
                                     bool* out, cudaStream_t stream);

// dst = (accumulate ? dst : 0) + src * keep * keep_scale for contiguous (n_rows, n_cols) tensors, keep the mask of
// philox.h. src and dst may be the same tensor.
cudaError_t launch_dropout_scale(DType dtype, const void* src, void* dst, int64_t n_rows, int64_t n_cols,
                                 const int64_t* seed, uint32_t threshold, double keep_scale, bool accumulate,
                                 cudaStream_t stream);

// One pass over the rows (tokens) of z (n_rows, n_cols), contiguous, with per-token weights w (n_rows, r):
//   partial        (splits, r, n_cols) += sum over the split's rows of w[n, k] * z[n, c] * mask[n, c]   (fp32)
//   partial_colsum (splits, n_cols)    += sum over the split's rows of z[n, c]                          (fp32)
//   epilogue_out   (n_rows, n_cols)    += epilogue_scale * (sum_k w[n, k] lora_a[k, c]) * mask[n, c]
// where mask = keep * keep_scale (the mask of philox.h) with dropout (seed != nullptr), else 1. Each output is skipped when its pointer is
// null. The partial sums are in the accumulation type (float, or double for double) and are finished by
// launch_sum_partials: a fixed order of additions, so results are deterministic.
struct TokenReduceArgs {
  const void* z = nullptr;
  int64_t n_rows = 0, n_cols = 0;
  const void* w = nullptr;
  int r = 0;
  const void* lora_a = nullptr;  // (r, n_cols), for the epilogue
  void* epilogue_out = nullptr;
  double epilogue_scale = 1.0;
  void* partial = nullptr;
  void* partial_colsum = nullptr;
  int splits = 1;  // from token_reduce_splits
  const int64_t* seed = nullptr;
  uint32_t threshold = 0;
  double keep_scale = 1.0;
};

// Number of row splits (gridDim.y) that fills the GPU for this shape in one wave.
int token_reduce_splits(DType dtype, int r, int64_t n_rows, int64_t n_cols, int device);

cudaError_t launch_token_reduce(DType dtype, const TokenReduceArgs& args, cudaStream_t stream);

// out[i] = scale * sum_s partial[s * m + i], partial in the accumulation type of dtype, out in dtype.
cudaError_t launch_sum_partials(DType dtype, const void* partial, int splits, int64_t m, double scale, void* out,
                                cudaStream_t stream);

// Paper mode's generation in one pass over W0 (d, d): lora_a = theta_a W0^T (r, d) and lora_b = W0 theta_b^T (d, r)
// in out_dtype, accumulated in float32 (float64 for float64), and weight_out = W0 in out_dtype where weight_out is
// not null. All pointers contiguous; theta_a and theta_b share theta_dtype. One block per row of W0, each thread
// holding the 2r running dot products of its columns; theta is read from L1, so prepare_supported asks that it fit
// there (2r * d elements) and that 2r <= 32 (the accumulators are registers).
bool prepare_supported(DType weight_dtype, DType theta_dtype, DType out_dtype, int r, int64_t d);

cudaError_t launch_prepare(DType weight_dtype, DType theta_dtype, DType out_dtype, const void* weight,
                           const void* theta_a, const void* theta_b, int64_t d, int r, void* weight_out, void* lora_a,
                           void* lora_b, cudaStream_t stream);

// Both modes' generation in one pass over W0 (d_out, d_in), for half-precision layers where launch_prepare does not
// apply (larger theta, general mode, or inside a CUDA graph): lora_a (r, d_in) and lora_b (d_out, r) as the
// generation of docs/design.md §1 defines them, from W0 and theta rounded to the output type (the products cuBLAS
// computes after the casts), summed in float32; weight_out = W0 rounded, where not null. Inputs contiguous, d_in a
// multiple of 8 and W0 and theta_b 16-byte aligned, theta_a too in paper mode (the pass copies them 16 bytes at a
// time, asynchronously, a few tiles ahead; general mode's theta_a is read element by element); W0 and theta each
// float32 or the output type. Two launches: the pass (tensor cores, sm_80 and later), then the sums of the float32
// partials, in a fixed order. The partial buffers: row_partial (column_strips, d_out, 2r in paper mode or r),
// column_partial (row_blocks, r, d_in) in general mode (unused in paper mode).
struct TiledPrepareGrid {
  int64_t row_blocks = 1, column_strips = 1, strip_cols = 0;
};
bool tiled_prepare_supported(DType weight_dtype, DType theta_dtype, DType out_dtype, bool paper, int r,
                             int64_t d_out, int64_t d_in, int device);
TiledPrepareGrid tiled_prepare_grid(bool paper, int64_t d_out, int64_t d_in, int device);
cudaError_t launch_tiled_prepare(DType weight_dtype, DType theta_dtype, DType out_dtype, bool paper,
                                 const void* weight, const void* theta_a, const void* theta_b, int64_t d_out,
                                 int64_t d_in, int r, const TiledPrepareGrid& grid, float* row_partial,
                                 float* column_partial, void* weight_out, void* lora_a, void* lora_b,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace condlora
