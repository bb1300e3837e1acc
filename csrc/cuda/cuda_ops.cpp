// CUDA implementation of the condlora_C ops: the shared chain rule (condlora.cpp, GEMMs through ATen/cuBLAS) plus
// the hand-written kernels of kernels.cu for the dropout mask and the reductions over tokens.
//
// Only c10/cuda headers here (streams, guards, error checks): ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a bare CUDA toolkit may lack.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../condlora.h"
#include "../philox.h"
#include "kernels.cuh"

namespace condlora {
namespace {

cuda::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return cuda::DType::kHalf;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kFloat: return cuda::DType::kFloat;
    case at::kDouble: return cuda::DType::kDouble;
    default: break;
  }
  TORCH_CHECK_TYPE(false, "the CUDA kernels support float16, bfloat16, float32 and float64, got ",
                   py_dtype(t.scalar_type()));
  return cuda::DType::kFloat;  // not reached
}

// The type the kernels accumulate in (and write their partial sums in): fp32, or fp64 for fp64.
at::ScalarType accumulate_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }

// The seed stays on the GPU: the kernels read it there, so no host synchronisation and CUDA graphs replay correctly.
const int64_t* seed_pointer(const at::Tensor& seed) { return seed.data_ptr<int64_t>(); }

// Without dropout the reductions over tokens are plain GEMMs with a long K (dA = s v^T x, dB^T = s u^T dy), which
// cuBLAS runs near the memory bandwidth; the hand-written token_reduce pass pays off where it saves a pass, when it
// draws the dropout mask once for both dA and dx (measured on the H100: benchmarks/NOTES.md, CUDA backend v2).
bool gemm_reductions(int64_t r, double p) { return r > cuda::kMaxFusedRank || p == 0.0; }

bool lowrank_first_cuda(double p) { return p == 0.0; }

// x_hat = x * M / (1 - p), one Philox call per 8 elements (1 - p as quantised in philox.h).
at::Tensor dropout_scaled_copy(const at::Tensor& x, const at::Tensor& seed, double p) {
  at::Tensor x_hat = at::empty(x.sizes(), x.options());
  const DropoutParams dropout = make_dropout_params(p);
  C10_CUDA_CHECK(cuda::launch_dropout_scale(kernel_dtype(x), x.data_ptr(), x_hat.data_ptr(), x.size(0), x.size(1),
                                            seed_pointer(seed), dropout.threshold, dropout.keep_scale,
                                            /*accumulate=*/false, current_stream()));
  return x_hat;
}

// u = x_hat A^T: the masked copy, then a cuBLAS GEMM (a skinny one, bound by reading x_hat). Fusing the copy into
// a hand-written projection would save one write and one read of N x d_in elements (~2/3 of this step).
at::Tensor dropout_project_cuda(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& seed, double p) {
  return at::mm(dropout_scaled_copy(x, seed, p), lora_a.t()).contiguous();
}

// One token_reduce launch over z with weights w, then the partial sums added up into the requested outputs.
void token_reduce(const at::Tensor& z, const at::Tensor& w, const std::optional<at::Tensor>& seed, double p,
                  const at::Tensor& lora_a, double epilogue_scale, const at::Tensor& epilogue_out,
                  const at::Tensor& weighted_sum, double weighted_sum_scale, const at::Tensor& column_sum) {
  const int64_t n_rows = z.size(0), n_cols = z.size(1), r = w.size(1);
  const at::Tensor w_rows = w.contiguous();  // the kernel reads w[n, k] at n * r + k
  cuda::TokenReduceArgs args;
  args.z = z.data_ptr();
  args.n_rows = n_rows;
  args.n_cols = n_cols;
  args.w = w_rows.data_ptr();
  args.r = static_cast<int>(r);
  args.splits = cuda::token_reduce_splits(kernel_dtype(z), args.r, n_rows, n_cols, z.get_device());
  const auto partial_options = z.options().dtype(accumulate_dtype(z));
  at::Tensor partial, partial_colsum;
  if (weighted_sum.defined()) {
    partial = at::empty({args.splits, r, n_cols}, partial_options);
    args.partial = partial.data_ptr();
  }
  if (column_sum.defined()) {
    partial_colsum = at::empty({args.splits, n_cols}, partial_options);
    args.partial_colsum = partial_colsum.data_ptr();
  }
  if (epilogue_out.defined()) {
    args.lora_a = lora_a.data_ptr();
    args.epilogue_out = epilogue_out.data_ptr();
    args.epilogue_scale = epilogue_scale;
  }
  if (p > 0.0) {
    const DropoutParams dropout = make_dropout_params(p);
    args.seed = seed_pointer(*seed);
    args.threshold = dropout.threshold;
    args.keep_scale = dropout.keep_scale;
  }
  const cuda::DType dtype = kernel_dtype(z);
  C10_CUDA_CHECK(cuda::launch_token_reduce(dtype, args, current_stream()));
  if (weighted_sum.defined()) {
    C10_CUDA_CHECK(cuda::launch_sum_partials(dtype, partial.data_ptr(), args.splits, r * n_cols, weighted_sum_scale,
                                             weighted_sum.data_ptr(), current_stream()));
  }
  if (column_sum.defined()) {
    C10_CUDA_CHECK(cuda::launch_sum_partials(dtype, partial_colsum.data_ptr(), args.splits, n_cols, 1.0,
                                             column_sum.data_ptr(), current_stream()));
  }
}

// The backward's pass over x: dA = s v^T x_hat, and dx += s (v A) * M / (1 - p), in one launch, each element's mask
// drawn once. Without dropout, and for ranks above kMaxFusedRank, GEMMs (on a masked copy) instead.
void x_pass_cuda(const at::Tensor& x, const at::Tensor& v, const at::Tensor& lora_a,
                 const std::optional<at::Tensor>& seed, double p, double scaling, const at::Tensor& grad_a,
                 const at::Tensor& grad_x) {
  if (gemm_reductions(lora_a.size(0), p)) {
    const at::Tensor x_hat = p > 0.0 ? dropout_scaled_copy(x, *seed, p) : x;
    at::Tensor out_a = grad_a, out_x = grad_x;  // addmm_out takes non-const outputs
    if (out_a.defined()) at::addmm_out(out_a, out_a, v.t(), x_hat, /*beta=*/0.0, /*alpha=*/scaling);
    if (out_x.defined() && p == 0.0) {
      out_x.addmm_(v, lora_a, /*beta=*/1.0, /*alpha=*/scaling);
    } else if (out_x.defined()) {  // dx += (s v A) * M / (1 - p)
      const at::Tensor lowrank = at::mm(v, lora_a).mul_(scaling);
      const DropoutParams dropout = make_dropout_params(p);
      C10_CUDA_CHECK(cuda::launch_dropout_scale(kernel_dtype(x), lowrank.data_ptr(), out_x.data_ptr(),
                                                out_x.size(0), out_x.size(1), seed_pointer(*seed), dropout.threshold,
                                                dropout.keep_scale, /*accumulate=*/true, current_stream()));
    }
    return;
  }
  token_reduce(x, v, seed, p, lora_a, scaling, grad_x, grad_a, scaling, at::Tensor());
}

// The backward's reductions over dy: dB^T = s u^T dy and db = sum over rows of dy. As two cuBLAS/ATen passes
// (measured faster than token_reduce's single read of dy, benchmarks/NOTES.md).
void dy_pass_cuda(const at::Tensor& grad_y, const at::Tensor& u, double scaling, const at::Tensor& grad_b_t,
                  const at::Tensor& grad_bias) {
  if (gemm_reductions(u.size(1), 0.0)) {
    at::Tensor out_b = grad_b_t, out_bias = grad_bias;
    if (out_b.defined()) at::addmm_out(out_b, out_b, u.t(), grad_y, /*beta=*/0.0, /*alpha=*/scaling);
    if (out_bias.defined()) at::sum_out(out_bias, grad_y, {0});  // accumulates half types in fp32
    return;
  }
  token_reduce(grad_y, u, std::nullopt, 0.0, at::Tensor(), 1.0, at::Tensor(), grad_b_t, scaling, grad_bias);
}

// The generation in one pass over W0 (kernels.cu), where a kernel takes the layer; otherwise the cast and GEMMs.
//   - launch_prepare (paper mode, one block per row of W0): for layers whose theta ([theta_a; theta_b], 2r x d) stays
//     in a multiprocessor's L1 cache, outside CUDA graphs. Inside a capture a launch costs no host time, and its
//     GPU time lost to the cuBLAS path at small shapes (8192 x 768^2 r=8 on the H200: 43 against 85 us per forward,
//     benchmarks/NOTES.md); outside one, the launches saved are host time saved (eager step 739 against 950 us).
//   - launch_tiled_prepare (both modes, tensor cores): half-precision layers, including inside captures. It reads
//     W0 once where the cast and cuBLAS read it two or three times (benchmarks/NOTES.md, fourteenth session). A W0
//     already in the layer's dtype has no rounding to write, and cuBLAS's GEMMs then read it once (paper) or twice
//     (general) near the memory bandwidth, where the tiled pass runs at ~2.4 TB/s: on the H200 the pass won at 768^2
//     (5.5 against 6.8-9.2 us) and lost from 768 x 3072 up (12.9 against 9.8-12.2 us; 36 against 14-17 us at
//     4096^2; benchmarks/NOTES.md, twenty-eighth session), so such a W0 takes it only up to kMaxUnroundedTiledElements.
constexpr int64_t kMaxUnroundedTiledElements = int64_t(1) << 20;  // between the two measured sizes

bool prepare_cuda(Mode mode, const at::Tensor& weight, const at::Tensor& theta_a, const at::Tensor& theta_b,
                  const at::Tensor& weight_out, const at::Tensor& lora_a, const at::Tensor& lora_b) {
  if (theta_a.scalar_type() != theta_b.scalar_type()) return false;
  const bool paper = mode == Mode::kPaper;
  const int64_t r = theta_a.size(0), d_out = weight.size(0), d_in = weight.size(1);
  const cuda::DType weight_dtype = kernel_dtype(weight), theta_dtype = kernel_dtype(theta_b),
                    out_dtype = kernel_dtype(lora_a);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(current_stream(), &capture));
  void* weight_out_ptr = weight_out.defined() ? weight_out.data_ptr() : nullptr;
  if (paper && capture == cudaStreamCaptureStatusNone &&
      cuda::prepare_supported(weight_dtype, theta_dtype, out_dtype, static_cast<int>(r), d_in)) {
    C10_CUDA_CHECK(cuda::launch_prepare(weight_dtype, theta_dtype, out_dtype, weight.data_ptr(), theta_a.data_ptr(),
                                        theta_b.data_ptr(), d_in, static_cast<int>(r), weight_out_ptr,
                                        lora_a.data_ptr(), lora_b.data_ptr(), current_stream()));
    return true;
  }
  const int device = weight.get_device();
  auto aligned = [](const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  // the pass copies W0 and theta_r ([theta_a; theta_b] in paper mode, theta_b in general mode) 16 bytes at a time;
  // general mode's theta_a is read element by element
  if (!aligned(weight) || !aligned(theta_b) || (paper && !aligned(theta_a))) return false;
  if (weight_dtype == out_dtype && d_out * d_in > kMaxUnroundedTiledElements) return false;
  if (!cuda::tiled_prepare_supported(weight_dtype, theta_dtype, out_dtype, paper, static_cast<int>(r), d_out, d_in,
                                     device)) {
    return false;
  }
  const cuda::TiledPrepareGrid grid = cuda::tiled_prepare_grid(paper, d_out, d_in, device);
  const auto partial_options = weight.options().dtype(at::kFloat);
  const at::Tensor row_partial = at::empty({grid.column_strips, d_out, paper ? 2 * r : r}, partial_options);
  const at::Tensor column_partial = at::empty({paper ? 0 : grid.row_blocks, r, d_in}, partial_options);
  C10_CUDA_CHECK(cuda::launch_tiled_prepare(
      weight_dtype, theta_dtype, out_dtype, paper, weight.data_ptr(), theta_a.data_ptr(), theta_b.data_ptr(), d_out,
      d_in, static_cast<int>(r), grid, row_partial.data_ptr<float>(),
      paper ? nullptr : column_partial.data_ptr<float>(), weight_out_ptr, lora_a.data_ptr(), lora_b.data_ptr(),
      current_stream()));
  return true;
}

const DeviceKernels kCudaKernels{dropout_project_cuda, x_pass_cuda, dy_pass_cuda, lowrank_first_cuda,
                                  /*token_reductions=*/nullptr, prepare_cuda};

// ---------------------------------------------------------------------------------------------------------------
// The ops for the CUDA dispatch key. The dispatcher does not switch devices for custom ops: each op sets the device
// of its tensors (x may be on another GPU than the current one); kernels and GEMMs go to that device's current stream.
// ---------------------------------------------------------------------------------------------------------------

// The device to switch to: a CUDA tensor's own; none for a CPU x, which then gets the "all tensors on one device"
// error from the argument checks.
std::optional<at::Device> cuda_device_of(const at::Tensor& t) {
  return t.is_cuda() ? std::optional<at::Device>(t.device()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> generate_lora_weights_cuda(const at::Tensor& weight, const at::Tensor& theta_a,
                                                              const at::Tensor& theta_b, const std::string& mode) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(weight));
  return generate_lora_weights(weight, theta_a, theta_b, mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& theta_a,
    const at::Tensor& theta_b, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::string& mode) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(x));
  return condlora_forward(kCudaKernels, x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& theta_a,
    const at::Tensor& theta_b, const at::Tensor& u, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode,
    std::array<bool, 4> needs) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(x));
  return condlora_backward(kCudaKernels, grad_y, x, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p,
                           seed, mode, needs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_cuda_op(const at::Tensor& weight, const at::Tensor& theta_a,
                                                               const at::Tensor& theta_b, at::ScalarType dtype,
                                                               const std::string& mode) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(weight));
  return condlora_prepare(kCudaKernels, weight, theta_a, theta_b, dtype, mode);
}

std::tuple<at::Tensor, at::Tensor> forward_ab_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, double scaling, double dropout_p,
                                                   const std::optional<at::Tensor>& seed) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(x));
  return condlora_forward_ab(kCudaKernels, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
}

using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Five prepare_forward_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                         const std::optional<at::Tensor>& seed, const std::string& mode) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(x));
  return condlora_prepare_forward(kCudaKernels, x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_ab_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& u,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::string& mode, at::ScalarType theta_dtype,
    std::array<bool, 4> needs, bool stack_theta_grads) {
  const c10::OptionalDeviceGuard guard(cuda_device_of(x));
  return condlora_backward_ab(kCudaKernels, grad_y, x, weight, u, lora_a, lora_b, scaling, dropout_p, seed, mode,
                              theta_dtype, needs, stack_theta_grads);
}

at::Tensor dropout_keep_mask_cuda(const at::Tensor& seed, int64_t n_rows, int64_t n_cols, double dropout_p) {
  check_mask_args(seed, n_rows, n_cols, dropout_p);
  const c10::OptionalDeviceGuard guard(cuda_device_of(seed));
  at::Tensor mask = at::empty({n_rows, n_cols}, seed.options().dtype(at::kBool));
  const DropoutParams dropout = make_dropout_params(dropout_p);
  C10_CUDA_CHECK(cuda::launch_dropout_keep_mask(seed_pointer(seed), n_rows, n_cols, dropout.threshold,
                                                mask.data_ptr<bool>(), current_stream()));
  return mask;
}

}  // namespace
}  // namespace condlora

TORCH_LIBRARY_IMPL(condlora_C, CUDA, m) {
  m.impl("generate_lora_weights", &condlora::generate_lora_weights_cuda);
  m.impl("forward", &condlora::forward_cuda);
  m.impl("backward", &condlora::backward_cuda);
  m.impl("dropout_keep_mask", &condlora::dropout_keep_mask_cuda);
  m.impl("prepare", &condlora::prepare_cuda_op);
  m.impl("forward_ab", &condlora::forward_ab_cuda);
  m.impl("prepare_forward", &condlora::prepare_forward_cuda);
  m.impl("backward_ab", &condlora::backward_ab_cuda);
}
