// CondLoRA ops of the extension condlora_kernels._C: what the CPU and the CUDA implementations share.
//
//   W0 (d_out, d_in) frozen weight      theta_a, theta_b  shared generators      s = alpha / r
//   paper mode   (square W0): A = theta_a W0^T,  B = W0 theta_b^T       A (r, d_in), B (d_out, r)
//   general mode (any W0):    A = theta_a W0,    B = W0 theta_b^T
//   forward:  x_hat = x * M / (1 - p),  u = x_hat A^T  (N, r),  y = x W0^T + b + s * u B^T
//
// The chain rule (forward, backward) is written once, in condlora.cpp, on top of ATen GEMMs (cuBLAS on CUDA,
// MKL/oneDNN on CPU). Each device supplies the few kernels that no GEMM library fuses: the passes that
// regenerate the Philox dropout mask and the reductions over tokens (struct DeviceKernels below).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

namespace condlora {

enum class Mode { kPaper, kGeneral };

// Problem sizes of one call: N tokens (rows of the 2-D x), d_in, d_out, rank r.
struct Sizes {
  int64_t n_rows, d_in, d_out, r;
  Mode mode;
};

// Values in Python's notation for the error messages: (2, 3), torch.float32, 0.5. Every argument of a TORCH_CHECK
// message in this library is a string: c10::str joins strings directly but formats any other type through an
// std::ostringstream, and with torch 2.11 on the H100 machine an ostringstream in this library crashed the
// process (SIGSEGV) instead of raising (measured: only the messages that formatted an integer crashed).
std::string py_tuple(at::IntArrayRef shape);
std::string py_dtype(at::ScalarType dtype);
std::string py_float(double value);

// Argument checks with the wording of condlora_kernels/_validation.py (TypeError / ValueError as there).
Sizes check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                         const std::optional<at::Tensor>& seed, const std::string& mode);
Sizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& theta_a, const at::Tensor& theta_b, const at::Tensor& u,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
                          const std::optional<at::Tensor>& seed, const std::string& mode);
void check_seed(const std::optional<at::Tensor>& seed, double dropout_p, const at::Device& device);
// A floating, dense (strided) tensor: TypeError otherwise, naming the argument.
void check_layout_and_dtype(const char* name, const at::Tensor& t);
// W0 is 2-D (d_out, d_in) with d_out, d_in >= 1: ValueError otherwise.
void check_weight_shape(const at::Tensor& weight);
inline bool is_half_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }
// Whether a weight or bias of dtype `t` goes with an x of dtype `x_dtype`: the same dtype, or a float32 master of a
// half-precision x (rounded to x's dtype as autocast would, docs/design.md §4).
inline bool weight_dtype_fits(at::ScalarType t, at::ScalarType x_dtype) {
  return t == x_dtype || (is_half_dtype(x_dtype) && t == at::kFloat);
}
// t in dtype: t itself where it has it, else a rounded copy (to nearest even, as autocast and prepare round).
inline at::Tensor cast(const at::Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }
// A weight or bias: floating, dense, weight_dtype_fits x's dtype, on x's device (TypeError / ValueError otherwise).
void check_master(const char* name, const at::Tensor& t, at::ScalarType x_dtype, const at::Device& x_device);
// scaling finite and within float32's range (the kernels multiply in float32); dropout_p in [0, 1) and not so close
// to 1 that every element is dropped (the 16-bit threshold would reach 2^16, docs/design.md §3).
void check_scaling_and_dropout(double scaling, double dropout_p);

// Dropout seeds are drawn uniformly from [0, kSeedHigh) on x's device (docs/design.md §3).
constexpr int64_t kSeedHigh = int64_t(1) << 62;
// dropout_keep_mask's arguments: p in [0, 1), sizes >= 0, an int64 seed with one element.
void check_mask_args(const at::Tensor& seed, int64_t n_rows, int64_t n_cols, double dropout_p);

// The device-specific kernels the shared forward and backward call. Every tensor is contiguous and on one device;
// outputs are preallocated (an undefined tensor means "not needed") and are overwritten, except grad_x.
struct DeviceKernels {
  // u = x_hat A^T (N, r) for dropout_p > 0, without keeping x_hat.
  at::Tensor (*dropout_project)(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& seed,
                                double dropout_p);
  // One pass over x in the backward, the mask drawn once per element (no mask when dropout_p == 0):
  //   grad_a   (r, d_in)  = s * v^T x_hat                  reduction over tokens, accumulated in fp32
  //   grad_x   (N, d_in) += s * (v A) * M / (1 - p)         the low-rank term of dx, added to dy W0
  void (*x_pass)(const at::Tensor& x, const at::Tensor& v, const at::Tensor& lora_a,
                 const std::optional<at::Tensor>& seed, double dropout_p, double scaling, const at::Tensor& grad_a,
                 const at::Tensor& grad_x);
  // One pass over dy in the backward (reductions over tokens, accumulated in fp32):
  //   grad_b_t (r, d_out) = s * u^T dy,   grad_bias (d_out,) = sum over rows of dy
  void (*dy_pass)(const at::Tensor& grad_y, const at::Tensor& u, double scaling, const at::Tensor& grad_b_t,
                  const at::Tensor& grad_bias);
  // Whether, without dropout, the low-rank term goes first and the frozen GEMM adds onto it in its epilogue
  // (y = s u B^T + b, then y += x W0^T with beta = 1; likewise dx): one pass over the N-sized output fewer. For
  // GEMM libraries that apply beta once, at the end (cuBLAS); not for CPU BLAS, which adds C into its split-K
  // reduction block by block.
  bool (*lowrank_first)(double dropout_p);
  // Optional (nullptr: not provided). Without dropout, every reduction over tokens of the backward in one pass over
  // the rows of dy and x, with v = dy B (N, r) written to v_out when v_out is defined:
  //   grad_a (r, d_in) = s * v^T x,   grad_b_t (r, d_out) = s * u^T dy,   grad_bias (d_out,) = sum over rows of dy
  // Returns false, having written nothing, where it does not handle the inputs (their dtype, say): the backward then
  // takes the separate passes above.
  bool (*token_reductions)(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                           const at::Tensor& lora_b, double scaling, const at::Tensor& v_out, const at::Tensor& grad_a,
                           const at::Tensor& grad_b_t, const at::Tensor& grad_bias);
  // Optional (nullptr: not provided). The generation of docs/design.md §1 in the mode given: from W0 (d_out, d_in)
  // in its dtype and theta_a, theta_b in theirs, lora_a (r, d_in) and lora_b (d_out, r) in the outputs' dtype,
  // accumulated in float32, and weight_out = W0 in that dtype where weight_out is defined: one pass over W0 instead
  // of a cast, two casts of theta and one GEMM (paper mode) or two (general mode). Inputs contiguous. Returns
  // false, having written nothing, where it does not handle them.
  bool (*prepare)(Mode mode, const at::Tensor& weight, const at::Tensor& theta_a, const at::Tensor& theta_b,
                  const at::Tensor& weight_out, const at::Tensor& lora_a, const at::Tensor& lora_b);
};

// Every op below runs its ATen calls below autograd: the ops are primitives whose autograd lives above them
// (condlora_C::linear in linear.cpp, ops/condlora_linear.py), so the autograd and ADInplaceOrView layers of the
// dispatcher would only cost host time on each of their GEMMs, views and allocations; a compiled graph calls the
// ops with no such guard of its own (docs/design.md §4; measured in benchmarks/NOTES.md, twenty-fourth session).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// (lora_a, lora_b) = (A, B), contiguous, in W0's dtype.
std::tuple<at::Tensor, at::Tensor> generate_lora_weights(const at::Tensor& weight, const at::Tensor& theta_a,
                                                         const at::Tensor& theta_b, const std::string& mode);

// (y, u, lora_a, lora_b) for a 2-D x.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_forward(
    const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode);

// (grad_x, grad_theta_a, grad_theta_b, grad_bias); a gradient not in `needs` comes back as an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_backward(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& theta_a, const at::Tensor& theta_b, const at::Tensor& u, const at::Tensor& lora_a,
    const at::Tensor& lora_b, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::string& mode, std::array<bool, 4> needs);

// The ops behind condlora_C::linear (docs/design.md §4). prepare: (weight in dtype, or an empty tensor where it
// already had it; lora_a; lora_b), the generators and a float32 master weight rounded to dtype. forward_ab: (y, u)
// from A and B (weight, A and B in x's dtype; bias in x's dtype or a float32 master). backward_ab: the gradients
// (weight in x's dtype, or a float32 master of a half-precision x, which it rounds as prepare does),
// dtheta in theta_dtype (x's dtype, or float32 for a half-precision x); with stack_theta_grads (which needs
// can_stack_theta_grads: paper mode, both theta gradients asked for), grad_theta_a is [dtheta_a; dtheta_b]
// (2r, d_in) and grad_theta_b is empty: one GEMM writes both, and an op's outputs may not share storage, so
// splitting them inside the op would cost a copy (linear.cpp splits them by views).
// (written once: backward_core stacks on the same condition)
bool can_stack_theta_grads(Mode mode, std::array<bool, 4> needs);
bool can_stack_theta_grads(const std::string& mode, std::array<bool, 4> needs);
std::tuple<at::Tensor, at::Tensor, at::Tensor> condlora_prepare(const DeviceKernels& kernels, const at::Tensor& weight,
                                                                const at::Tensor& theta_a, const at::Tensor& theta_b,
                                                                at::ScalarType dtype, const std::string& mode);
std::tuple<at::Tensor, at::Tensor> condlora_forward_ab(const DeviceKernels& kernels, const at::Tensor& x,
                                                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scaling, double dropout_p,
                                                       const std::optional<at::Tensor>& seed);
// prepare_forward: prepare, then forward_ab, in one op: (y, u, weight_cast, lora_a, lora_b), the compute dtype x's.
// What linear.cpp calls: under torch.compile each op of the graph is one call from Python per step, so one op
// instead of two is one call fewer per layer (benchmarks/NOTES.md, nineteenth session).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_prepare_forward(
    const DeviceKernels& kernels, const at::Tensor& x, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_backward_ab(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& u, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::string& mode, at::ScalarType theta_dtype,
    std::array<bool, 4> needs, bool stack_theta_grads);

}  // namespace condlora
