// The CondLoRA ops: schemas (TORCH_LIBRARY), argument checks, and the forward and backward written once for
// every device on top of ATen GEMMs. The device-specific kernels come in through DeviceKernels (condlora.h):
// cpu_kernels.cpp registers the CPU implementations, cuda/cuda_ops.cpp the CUDA ones.
#include "condlora.h"
#include "philox.h"

#include <ATen/core/enum_tag.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace condlora {

// ---------------------------------------------------------------------------------------------------------------
// Messages in Python's notation, so they read exactly as those of condlora_kernels/_validation.py
// ---------------------------------------------------------------------------------------------------------------

std::string py_tuple(at::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string py_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(dtype);
  }
}

// Python's repr of a float: the shortest form that reads back exactly, "1.0" rather than "1".
std::string py_float(double value) {
  if (std::isnan(value)) return "nan";
  if (std::isinf(value)) return value > 0 ? "inf" : "-inf";
  char buffer[32];
  for (int precision = 1; precision <= 17; ++precision) {
    std::snprintf(buffer, sizeof(buffer), "%.*g", precision, value);
    if (std::strtod(buffer, nullptr) == value) break;
  }
  std::string text(buffer);
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

namespace {

std::string py_layout(at::Layout layout) {
  switch (layout) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    default: return "a non-strided layout";
  }
}

std::string describe(const at::Tensor& t) {
  return "shape " + py_tuple(t.sizes()) + ", dtype " + py_dtype(t.scalar_type()) + ", device " + t.device().str();
}

bool is_float_dtype(at::ScalarType dtype) {
  return dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat || dtype == at::kDouble;
}

Mode parse_mode(const std::string& mode) {
  if (mode == "paper") return Mode::kPaper;
  TORCH_CHECK_VALUE(mode == "general", "mode must be one of ('paper', 'general'), got '", mode, "'");
  return Mode::kGeneral;
}

void check_float_dtype(const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(is_float_dtype(t.scalar_type()), name,
                   " must be a floating tensor (float16, bfloat16, float32 or float64), got ", py_dtype(t.scalar_type()));
}

// t must share the dtype and device of `like` (x in the forward and backward, weight in the generation).
void check_same_dtype_and_device(const char* name, const at::Tensor& t, const at::Tensor& like,
                                 const char* like_name = "x") {
  check_float_dtype(name, t);
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " has dtype ", py_dtype(t.scalar_type()), " but ",
                   like_name, " has dtype ", py_dtype(like.scalar_type()), ": all tensors must share one dtype");
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " is on ", t.device().str(), " but ", like_name, " is on ",
                    like.device().str(), ": all tensors must be on one device");
}

// weight, theta_a and theta_b: 2-D, with the shapes the mode asks for; returns r.
int64_t check_weight_and_generators(const at::Tensor& weight, const at::Tensor& theta_a, const at::Tensor& theta_b,
                                    Mode mode, const std::string& mode_name) {
  check_weight_shape(weight);
  const int64_t d_out = weight.size(0), d_in = weight.size(1);
  TORCH_CHECK_VALUE(theta_a.dim() == 2 && theta_b.dim() == 2, "theta_a and theta_b must be 2-D (r, d), got ",
                    py_tuple(theta_a.sizes()), " and ", py_tuple(theta_b.sizes()));
  const int64_t r = theta_a.size(0);
  TORCH_CHECK_VALUE(r >= 1, "r (rows of theta_a) must be >= 1, got theta_a ", py_tuple(theta_a.sizes()));
  TORCH_CHECK_VALUE(mode != Mode::kPaper || d_out == d_in,
                    "mode='paper' needs a square weight (A = theta_a W0^T has d_out columns), got weight ",
                    py_tuple(weight.sizes()), "; use mode='general' for non-square layers");
  const int64_t theta_a_cols = mode == Mode::kPaper ? d_in : d_out;
  TORCH_CHECK_VALUE(theta_a.size(1) == theta_a_cols, "theta_a must have shape ", py_tuple({r, theta_a_cols}), " in ",
                    mode_name, " mode for weight ", py_tuple(weight.sizes()), ", got ", py_tuple(theta_a.sizes()));
  TORCH_CHECK_VALUE(theta_b.size(0) == r && theta_b.size(1) == d_in, "theta_b must have shape ", py_tuple({r, d_in}),
                    " (r from theta_a, d_in from weight ", py_tuple(weight.sizes()), "), got ",
                    py_tuple(theta_b.sizes()));
  return r;
}

void check_shape(const char* name, const at::Tensor& t, std::initializer_list<int64_t> want, const char* what) {
  TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(want), name, " must have shape ", py_tuple(want), " (", what,
                    "), got ", py_tuple(t.sizes()));
}

}  // namespace

void check_weight_shape(const at::Tensor& weight) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D (d_out, d_in), got ", describe(weight));
  TORCH_CHECK_VALUE(weight.size(0) >= 1 && weight.size(1) >= 1, "weight must have d_out >= 1 and d_in >= 1, got ",
                    py_tuple(weight.sizes()));
}

void check_seed(const std::optional<at::Tensor>& seed, double dropout_p, const at::Device& device) {
  if (!seed.has_value()) {
    TORCH_CHECK_VALUE(dropout_p == 0.0, "seed must be given when dropout_p > 0 (got dropout_p=", py_float(dropout_p),
                      " and no seed)");
    return;
  }
  TORCH_CHECK_TYPE(seed->scalar_type() == at::kLong && seed->numel() == 1,
                   "seed must be an int64 tensor with one element, got ", describe(*seed));
  TORCH_CHECK_VALUE(seed->device() == device, "seed is on ", seed->device().str(), " but x is on ", device.str());
}

void check_layout_and_dtype(const char* name, const at::Tensor& t) {
  check_float_dtype(name, t);
  TORCH_CHECK_TYPE(t.layout() == at::kStrided, name, " must be a dense (strided) tensor, got layout ",
                   py_layout(t.layout()), "; convert it with .to_dense()");
}

void check_scaling_and_dropout(double scaling, double dropout_p) {
  TORCH_CHECK_TYPE(std::isfinite(scaling), "scaling must be a finite float (alpha / r), got ", py_float(scaling));
  TORCH_CHECK_VALUE(std::fabs(scaling) <= 3.4028234663852886e38,
                    "scaling must fit in float32 (the kernels multiply in float32), got ", py_float(scaling));
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", py_float(dropout_p));
  TORCH_CHECK_VALUE(make_dropout_params(dropout_p).threshold < 65536u, "dropout_p=", py_float(dropout_p),
                    " rounds to 1 in the 16-bit dropout mask (p * 2^16 >= 65535.5): every element would be dropped");
}

void check_mask_args(const at::Tensor& seed, int64_t n_rows, int64_t n_cols, double dropout_p) {
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", py_float(dropout_p));
  TORCH_CHECK_VALUE(n_rows >= 0 && n_cols >= 0, "n_rows and n_cols must be >= 0, got ", std::to_string(n_rows), " and ",
                    std::to_string(n_cols));
  check_seed(seed, dropout_p, seed.device());
}

Sizes check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                         const std::optional<at::Tensor>& seed, const std::string& mode_name) {
  check_layout_and_dtype("x", x);
  const Mode mode = parse_mode(mode_name);
  check_scaling_and_dropout(scaling, dropout_p);
  check_same_dtype_and_device("weight", weight, x);
  check_same_dtype_and_device("theta_a", theta_a, x);
  check_same_dtype_and_device("theta_b", theta_b, x);
  if (bias.has_value()) check_same_dtype_and_device("bias", *bias, x);

  const int64_t r = check_weight_and_generators(weight, theta_a, theta_b, mode, mode_name);
  const int64_t d_out = weight.size(0), d_in = weight.size(1);
  TORCH_CHECK_VALUE(x.dim() == 2, "x must be 2-D (N, d_in) for the condlora_C ops (condlora_linear flattens the ",
                    "leading dimensions), got ", describe(x));
  TORCH_CHECK_VALUE(x.size(1) == d_in, "x must have last dimension d_in=", std::to_string(d_in), " (weight is ", py_tuple(weight.sizes()),
                    "), got x ", py_tuple(x.sizes()));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d_out, "bias must have shape (", std::to_string(d_out),
                      ",) to match weight ", py_tuple(weight.sizes()), ", got ", py_tuple(bias->sizes()));
  }
  check_seed(seed, dropout_p, x.device());
  return Sizes{x.size(0), d_in, d_out, r, mode};
}

Sizes check_backward_args(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                          const at::Tensor& theta_a, const at::Tensor& theta_b, const at::Tensor& u,
                          const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
                          const std::optional<at::Tensor>& seed, const std::string& mode) {
  const Sizes sz = check_forward_args(x, weight, std::nullopt, theta_a, theta_b, scaling, dropout_p, seed, mode);
  check_same_dtype_and_device("grad_y", grad_y, x);
  check_same_dtype_and_device("u", u, x);
  check_same_dtype_and_device("lora_a", lora_a, x);
  check_same_dtype_and_device("lora_b", lora_b, x);
  check_shape("grad_y", grad_y, {sz.n_rows, sz.d_out}, "N, d_out");
  check_shape("u", u, {sz.n_rows, sz.r}, "N, r");
  check_shape("lora_a", lora_a, {sz.r, sz.d_in}, "r, d_in");
  check_shape("lora_b", lora_b, {sz.d_out, sz.r}, "d_out, r");
  return sz;
}

// ---------------------------------------------------------------------------------------------------------------
// Generation, forward and backward: the chain rule, written once for every device
// ---------------------------------------------------------------------------------------------------------------

namespace {

// (A, B) from checked arguments of one dtype (docs/design.md §1).
std::tuple<at::Tensor, at::Tensor> generate_checked(const at::Tensor& weight, const at::Tensor& theta_a,
                                                    const at::Tensor& theta_b, Mode mode) {
  const int64_t r = theta_a.size(0);
  if (mode == Mode::kPaper && !weight.is_cpu()) {
    // A = theta_a W0^T and B^T = theta_b W0^T both multiply W0^T: one GEMM reads W0 once for both (a GPU's
    // generation is bound by reading W0). On the CPU the concatenation and B's transposed copy cost more host time
    // than the second read of W0 saves (benchmarks/NOTES.md, sixteenth session): two GEMMs, as in general mode.
    const at::Tensor stacked = at::mm(at::cat({theta_a, theta_b}), weight.t());  // (2r, d) = [A; B^T]
    return {stacked.narrow(0, 0, r), stacked.narrow(0, r, r).t().contiguous()};
  }
  const at::Tensor w_for_a = mode == Mode::kPaper ? weight.t() : weight;  // A = theta_a W0^T (paper), theta_a W0
  return {at::mm(theta_a, w_for_a).contiguous(), at::mm(weight, theta_b.t()).contiguous()};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> generate_lora_weights(const at::Tensor& weight, const at::Tensor& theta_a,
                                                         const at::Tensor& theta_b, const std::string& mode_name) {
  const BelowAutograd below_autograd;
  check_float_dtype("weight", weight);
  check_same_dtype_and_device("theta_a", theta_a, weight, "weight");
  check_same_dtype_and_device("theta_b", theta_b, weight, "weight");
  const Mode mode = parse_mode(mode_name);
  check_weight_and_generators(weight, theta_a, theta_b, mode, mode_name);
  return generate_checked(weight, theta_a, theta_b, mode);
}

namespace {

// With no dropout the low-rank term folds into the weight, x W0^T + s (x A^T) B^T = x (W0 + s B A)^T, and likewise
// dx = dy W0 + s (dy B) A = dy (W0 + s B A). Building W0 + s B A is one pass over d_out x d_in elements; the
// unfolded form costs passes over N x d_out (forward) or N x d_in (backward): fold when N is the larger.
// Only on the CPU in float32/float64: rounding W0 + s B A to a half-precision weight loses adapter deltas below
// half an ulp of W0 (small, early in training) that the unfolded sum keeps, and on the GPU (cuBLAS) the folded
// float32 product measured over twice the reference's error (tests/test_cpp_backend.py, 1000^3).
bool fold_into_weight(const Sizes& sz, double dropout_p, const at::Tensor& like) {
  const bool full_precision = like.scalar_type() == at::kFloat || like.scalar_type() == at::kDouble;
  return dropout_p == 0.0 && like.device().is_cpu() && full_precision && sz.n_rows >= std::max(sz.d_in, sz.d_out);
}

}  // namespace

namespace {

// y and u from checked, contiguous x (N, d_in) and A, B in x's dtype (the forward of docs/design.md §2).
std::tuple<at::Tensor, at::Tensor> forward_core(const DeviceKernels& kernels, const at::Tensor& x,
                                                const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling,
                                                double dropout_p, const std::optional<at::Tensor>& seed,
                                                const Sizes& sz) {
  // u = x_hat A^T (N, r): saved for the backward (dB = s dy^T u), so computed even when y does not need it
  const at::Tensor u = dropout_p > 0.0 ? kernels.dropout_project(x, lora_a, *seed, dropout_p)
                                       : at::mm(x, lora_a.t()).contiguous();
  at::Tensor y;
  if (kernels.lowrank_first(dropout_p)) {
    // y = (b + s u B^T) + x W0^T: the rank-r GEMM writes y, the frozen GEMM adds onto it (beta = 1)
    if (bias.has_value()) {
      y = at::addmm(*bias, u, lora_b.t(), /*beta=*/1.0, /*alpha=*/scaling);
    } else {
      y = at::empty({sz.n_rows, sz.d_out}, x.options());
      at::addmm_out(y, y, u, lora_b.t(), /*beta=*/0.0, /*alpha=*/scaling);  // beta = 0: y's contents unread
    }
    y.addmm_(x, weight.t());
  } else if (fold_into_weight(sz, dropout_p, x)) {
    const at::Tensor merged = at::addmm(weight, lora_b, lora_a, /*beta=*/1.0, /*alpha=*/scaling);
    y = bias.has_value() ? at::addmm(*bias, x, merged.t()) : at::mm(x, merged.t());
  } else {
    // y = (x W0^T + b) + s u B^T: the rank-r GEMM adds onto the frozen GEMM's output (beta = 1, K = r). The other
    // order, y = (b + s u B^T) + x W0^T with the frozen GEMM accumulating in its epilogue, would save a read of y,
    // but a GEMM library may add C into a split-K reduction step by step (CPU BLAS does, block by block along K),
    // which costs accuracy when C is as large as the result.
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.addmm_(u, lora_b.t(), /*beta=*/1.0, /*alpha=*/scaling);
  }
  return {y, u};
}

// The backward of docs/design.md §2 (v, dx, dA, dB^T, db, dtheta; the reductions over tokens in fp32).
// Passes over the N-sized tensors: dy is read by the v GEMM, the dx GEMM and one pass for dB^T and db; x is read
// once, by the pass that yields dA and adds the low-rank term to dx (drawing the mask once per element). Without
// dropout and with N >= d, dx = dy (W0 + s B A) instead: one GEMM, no pass adding a low-rank term. Without dropout,
// a device's token_reductions (CPU) reads dy and x once for v, dA, dB^T and db together.
// dtheta comes out in theta_dtype: x's dtype, or float32 for a half-precision x (the last GEMM writes float32).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_core(
    const DeviceKernels& kernels, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& u, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, const Sizes& sz, std::array<bool, 4> needs, at::ScalarType theta_dtype,
    bool stack_theta_grads = false) {
  const auto [need_x, need_theta_a, need_theta_b, need_bias] = needs;
  const auto options = x.options();
  const int64_t r = sz.r;
  const bool paper = sz.mode == Mode::kPaper;

  // dA and dB^T; in paper mode both theta gradients multiply W0 from the right, so they share one (2r, d) buffer
  // and one GEMM [dA; dB^T] W0 reads W0 once for both.
  const bool stack_ab = can_stack_theta_grads(sz.mode, needs);
  at::Tensor stacked_ab, grad_a, grad_b_t, grad_bias;
  if (stack_ab) {
    stacked_ab = at::empty({2 * r, sz.d_in}, options);
    grad_a = stacked_ab.narrow(0, 0, r);
    grad_b_t = stacked_ab.narrow(0, r, r);
  } else {
    if (need_theta_a) grad_a = at::empty({r, sz.d_in}, options);
    if (need_theta_b) grad_b_t = at::empty({r, sz.d_out}, options);
  }
  if (need_bias) grad_bias = at::empty({sz.d_out}, options);

  const bool fold = need_x && fold_into_weight(sz, dropout_p, dy);
  const bool dx_needs_v = need_x && !fold;
  at::Tensor v;  // dy B (N, r)
  // Without dropout a device may do every reduction over tokens (and v) in one pass over dy and x
  bool reductions_done = false;
  if (dropout_p == 0.0 && kernels.token_reductions != nullptr && (need_theta_a || need_theta_b || need_bias)) {
    if (dx_needs_v) v = at::empty({sz.n_rows, r}, options);
    reductions_done = kernels.token_reductions(dy, x, u, lora_b, scaling, v, grad_a, grad_b_t, grad_bias);
  }
  if (!reductions_done && (need_theta_a || dx_needs_v)) {
    // on the CPU B is read as the transpose of a contiguous B^T (MKL is ~2x faster); cuBLAS takes B as it is
    v = at::mm(dy, x.is_cpu() ? lora_b.t().contiguous().t() : lora_b);
  }

  at::Tensor grad_x;
  bool grad_a_done = false;
  if (need_x) {
    if (fold) {
      grad_x = at::mm(dy, at::addmm(weight, lora_b, lora_a, /*beta=*/1.0, /*alpha=*/scaling));
    } else if (kernels.lowrank_first(dropout_p)) {
      // dx = s v A, then += dy W0 in the frozen GEMM's epilogue (beta = 1); the pass over x then yields dA only
      grad_x = at::empty({sz.n_rows, sz.d_in}, options);
      at::addmm_out(grad_x, grad_x, v, lora_a, /*beta=*/0.0, /*alpha=*/scaling);
      grad_x.addmm_(dy, weight);
    } else {
      // the frozen GEMM first, then the pass over x (which also yields dA) adds E = s (v A) * M / (1 - p) to it
      grad_x = at::mm(dy, weight);
      kernels.x_pass(x, v, lora_a, seed, dropout_p, scaling, reductions_done ? at::Tensor() : grad_a, grad_x);
      grad_a_done = true;
    }
  }
  if (!reductions_done) {
    if (need_theta_a && !grad_a_done) kernels.x_pass(x, v, lora_a, seed, dropout_p, scaling, grad_a, at::Tensor());
    if (need_theta_b || need_bias) kernels.dy_pass(dy, u, scaling, grad_b_t, grad_bias);
  }

  // The theta gradients: cuBLAS writes float32 straight from half-precision operands (one kernel, no cast after)
  const bool float32_from_half = theta_dtype == at::kFloat && is_half_dtype(x.scalar_type());
  auto contract = [&](const at::Tensor& a, const at::Tensor& b) {
    return float32_from_half && x.is_cuda() ? at::mm(a, b, at::kFloat) : cast(at::mm(a, b), theta_dtype);
  };
  at::Tensor grad_theta_a, grad_theta_b;
  if (stack_ab) {
    const at::Tensor both = contract(stacked_ab, weight);  // [dA W0; dB^T W0]
    if (stack_theta_grads) {
      grad_theta_a = both;  // the caller splits it (outputs must not share storage)
    } else {
      grad_theta_a = both.narrow(0, 0, r);
      grad_theta_b = both.narrow(0, r, r).clone();  // outputs must not share storage
    }
  } else {
    if (need_theta_a) grad_theta_a = contract(grad_a, paper ? weight : weight.t());
    if (need_theta_b) grad_theta_b = contract(grad_b_t, weight);
  }
  // custom ops cannot return None: a gradient that was not asked for is an empty tensor
  auto or_empty = [&](const at::Tensor& t, at::ScalarType dtype) {
    return t.defined() ? t : at::empty({0}, options.dtype(dtype));
  };
  return {or_empty(grad_x, x.scalar_type()), or_empty(grad_theta_a, theta_dtype), or_empty(grad_theta_b, theta_dtype),
          or_empty(grad_bias, x.scalar_type())};
}

}  // namespace

void check_master(const char* name, const at::Tensor& t, at::ScalarType x_dtype, const at::Device& x_device) {
  check_layout_and_dtype(name, t);
  TORCH_CHECK_TYPE(weight_dtype_fits(t.scalar_type(), x_dtype), name, " has dtype ", py_dtype(t.scalar_type()),
                   " but x has dtype ", py_dtype(x_dtype), ": ", name,
                   " must share x's dtype (or be a float32 master of a half-precision x)");
  TORCH_CHECK_VALUE(t.device() == x_device, name, " is on ", t.device().str(), " but x is on ", x_device.str(),
                    ": all tensors must be on one device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_forward(
    const DeviceKernels& kernels, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode) {
  const BelowAutograd below_autograd;
  const Sizes sz = check_forward_args(x_in, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode);
  const at::Tensor x = x_in.contiguous();
  auto [lora_a, lora_b] = generate_checked(weight, theta_a, theta_b, sz.mode);
  auto [y, u] = forward_core(kernels, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, sz);
  return {y, u, lora_a, lora_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_backward(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x_in, const at::Tensor& weight,
    const at::Tensor& theta_a, const at::Tensor& theta_b, const at::Tensor& u_in, const at::Tensor& lora_a_in,
    const at::Tensor& lora_b_in, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::string& mode, std::array<bool, 4> needs) {
  const BelowAutograd below_autograd;
  const Sizes sz = check_backward_args(grad_y, x_in, weight, theta_a, theta_b, u_in, lora_a_in, lora_b_in, scaling,
                                       dropout_p, seed, mode);
  return backward_core(kernels, grad_y.contiguous(), x_in.contiguous(), weight, u_in.contiguous(),
                       lora_a_in.contiguous(), lora_b_in.contiguous(), scaling, dropout_p, seed, sz, needs,
                       x_in.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------
// The ops behind condlora_C::linear (linear.cpp): the generation with the weight's rounding, then the forward and
// backward on the generated A and B (docs/design.md §4)
// ---------------------------------------------------------------------------------------------------------------

namespace {

// prepare's arguments: weight in dtype or a float32 master of a half dtype, the generators in any floating dtype,
// all on weight's device, with the shapes the mode asks for.
Mode check_prepare_args(const at::Tensor& weight, const at::Tensor& theta_a, const at::Tensor& theta_b,
                        at::ScalarType dtype, const std::string& mode_name) {
  const Mode mode = parse_mode(mode_name);
  check_master("weight", weight, dtype, weight.device());
  check_layout_and_dtype("theta_a", theta_a);
  check_layout_and_dtype("theta_b", theta_b);
  check_weight_and_generators(weight, theta_a, theta_b, mode, mode_name);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"theta_a", theta_a}, {"theta_b", theta_b}}) {
    TORCH_CHECK_VALUE(t.device() == weight.device(), name, " is on ", t.device().str(), " but weight is on ",
                      weight.device().str(), ": all tensors must be on one device");
  }
  return mode;
}

// (weight_cast, lora_a, lora_b) from checked arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_checked(const DeviceKernels& kernels, const at::Tensor& weight,
                                                               const at::Tensor& theta_a, const at::Tensor& theta_b,
                                                               at::ScalarType dtype, Mode mode) {
  const int64_t d_out = weight.size(0), d_in = weight.size(1), r = theta_a.size(0);
  const bool cast_weight = weight.scalar_type() != dtype;
  const auto options = weight.options().dtype(dtype);
  // an output may not alias an input: the weight comes back only when it had to be cast (else an empty tensor)
  const at::Tensor weight_out = at::empty({cast_weight ? d_out : 0, cast_weight ? d_in : 0}, options);
  if (kernels.prepare != nullptr) {
    at::Tensor lora_a = at::empty({r, d_in}, options), lora_b = at::empty({d_out, r}, options);
    if (kernels.prepare(mode, weight.contiguous(), theta_a.contiguous(), theta_b.contiguous(),
                        cast_weight ? weight_out : at::Tensor(), lora_a, lora_b)) {
      return {weight_out, lora_a, lora_b};
    }
  }
  const at::Tensor w = cast(weight, dtype);  // a new tensor when cast: it is the output itself
  auto [lora_a, lora_b] = generate_checked(w, cast(theta_a, dtype), cast(theta_b, dtype), mode);
  return {cast_weight ? w : weight_out, lora_a, lora_b};
}

// forward_ab's checks of x, bias and the seed against a checked weight (N rows of x, the other sizes from weight).
void check_x_bias_seed(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       double scaling, double dropout_p, const std::optional<at::Tensor>& seed) {
  check_layout_and_dtype("x", x);
  check_scaling_and_dropout(scaling, dropout_p);
  if (bias.has_value()) check_master("bias", *bias, x.scalar_type(), x.device());
  TORCH_CHECK_VALUE(weight.dim() == 2 && x.dim() == 2 && x.size(1) == weight.size(1),
                    "x must be 2-D (N, d_in) with d_in=", std::to_string(weight.size(1)), " (weight is ",
                    py_tuple(weight.sizes()), "), got x ", py_tuple(x.sizes()));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias must have shape (",
                      std::to_string(weight.size(0)), ",) to match weight ", py_tuple(weight.sizes()), ", got ",
                      py_tuple(bias->sizes()));
  }
  check_seed(seed, dropout_p, x.device());
}

std::optional<at::Tensor> bias_in(const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  return bias.has_value() ? std::optional<at::Tensor>(cast(*bias, dtype)) : std::nullopt;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> condlora_prepare(const DeviceKernels& kernels, const at::Tensor& weight,
                                                                const at::Tensor& theta_a, const at::Tensor& theta_b,
                                                                at::ScalarType dtype, const std::string& mode_name) {
  const BelowAutograd below_autograd;
  const Mode mode = check_prepare_args(weight, theta_a, theta_b, dtype, mode_name);
  return prepare_checked(kernels, weight, theta_a, theta_b, dtype, mode);
}

std::tuple<at::Tensor, at::Tensor> condlora_forward_ab(const DeviceKernels& kernels, const at::Tensor& x_in,
                                                       const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                                       const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                       double scaling, double dropout_p,
                                                       const std::optional<at::Tensor>& seed) {
  const BelowAutograd below_autograd;
  check_x_bias_seed(x_in, weight, bias, scaling, dropout_p, seed);
  check_same_dtype_and_device("weight", weight, x_in);
  check_same_dtype_and_device("lora_a", lora_a, x_in);
  check_same_dtype_and_device("lora_b", lora_b, x_in);
  const Sizes sz{x_in.size(0), weight.size(1), weight.size(0), lora_a.size(0), Mode::kGeneral};
  check_shape("lora_a", lora_a, {sz.r, sz.d_in}, "r, d_in");
  check_shape("lora_b", lora_b, {sz.d_out, sz.r}, "d_out, r");
  return forward_core(kernels, x_in.contiguous(), weight, bias_in(bias, x_in.scalar_type()), lora_a.contiguous(),
                      lora_b.contiguous(), scaling, dropout_p, seed, sz);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_prepare_forward(
    const DeviceKernels& kernels, const at::Tensor& x_in, const at::Tensor& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling,
    double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode_name) {
  const BelowAutograd below_autograd;
  check_layout_and_dtype("x", x_in);  // first: x's dtype is the one the others are checked against
  const at::ScalarType dtype = x_in.scalar_type();
  const Mode mode = check_prepare_args(weight, theta_a, theta_b, dtype, mode_name);
  TORCH_CHECK_VALUE(weight.device() == x_in.device(), "weight is on ", weight.device().str(), " but x is on ",
                    x_in.device().str(), ": all tensors must be on one device");
  check_x_bias_seed(x_in, weight, bias, scaling, dropout_p, seed);
  auto [weight_cast, lora_a, lora_b] = prepare_checked(kernels, weight, theta_a, theta_b, dtype, mode);
  const Sizes sz{x_in.size(0), weight.size(1), weight.size(0), lora_a.size(0), mode};
  auto [y, u] = forward_core(kernels, x_in.contiguous(), weight.scalar_type() == dtype ? weight : weight_cast,
                             bias_in(bias, dtype), lora_a, lora_b, scaling, dropout_p, seed, sz);
  return {y, u, weight_cast, lora_a, lora_b};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> condlora_backward_ab(
    const DeviceKernels& kernels, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& u, const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::string& mode_name, at::ScalarType theta_dtype,
    std::array<bool, 4> needs, bool stack_theta_grads) {
  const BelowAutograd below_autograd;
  const Mode mode = parse_mode(mode_name);
  TORCH_CHECK_VALUE(!stack_theta_grads || can_stack_theta_grads(mode_name, needs),
                    "stack_theta_grads needs mode='paper' and both theta gradients asked for (needs[1] and needs[2])");
  check_layout_and_dtype("grad_y", grad_y);
  check_scaling_and_dropout(scaling, dropout_p);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_y", grad_y}, {"u", u},
                                {"lora_a", lora_a}, {"lora_b", lora_b}}) {
    check_same_dtype_and_device(name, t, x);
  }
  check_master("weight", weight, x.scalar_type(), x.device());
  const Sizes sz{x.size(0), weight.size(1), weight.size(0), lora_a.size(0), mode};
  check_shape("grad_y", grad_y, {sz.n_rows, sz.d_out}, "N, d_out");
  check_shape("u", u, {sz.n_rows, sz.r}, "N, r");
  check_shape("lora_a", lora_a, {sz.r, sz.d_in}, "r, d_in");
  check_shape("lora_b", lora_b, {sz.d_out, sz.r}, "d_out, r");
  check_seed(seed, dropout_p, x.device());
  TORCH_CHECK_TYPE(weight_dtype_fits(theta_dtype, x.scalar_type()), "theta_dtype must be x's dtype or float32, got ",
                   py_dtype(theta_dtype));
  // a float32 master (recompute_weight_cast) rounded here as prepare rounded it (to nearest even): in a compiled
  // graph one launch inside this op instead of a cast kernel of its own launched from Python
  return backward_core(kernels, grad_y.contiguous(), x.contiguous(), cast(weight, x.scalar_type()), u.contiguous(),
                       lora_a.contiguous(), lora_b.contiguous(), scaling, dropout_p, seed, sz, needs, theta_dtype,
                       stack_theta_grads);
}

// Where backward_core computes both theta gradients with one GEMM into one (2r, d_in) tensor: backward_ab can
// return that tensor (stack_theta_grads) instead of copying one half into an output of its own, a launch and an
// allocation per layer and step (benchmarks/NOTES.md, tenth session).
bool can_stack_theta_grads(Mode mode, std::array<bool, 4> needs) {
  return mode == Mode::kPaper && needs[1] && needs[2];
}

bool can_stack_theta_grads(const std::string& mode, std::array<bool, 4> needs) {
  return can_stack_theta_grads(parse_mode(mode), needs);
}

}  // namespace condlora

// ---------------------------------------------------------------------------------------------------------------
// Schemas: defined once here; cpu_kernels.cpp and cuda/cuda_ops.cpp register one implementation per dispatch key,
// condlora_kernels/kernels/cpp.py the fake (shape-only) implementations for torch.compile.
// ---------------------------------------------------------------------------------------------------------------

TORCH_LIBRARY(condlora_C, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def("generate_lora_weights(Tensor weight, Tensor theta_a, Tensor theta_b, str mode) -> (Tensor lora_a, Tensor lora_b)",
        tags);
  m.def(
      "forward(Tensor x, Tensor weight, Tensor? bias, Tensor theta_a, Tensor theta_b, float scaling, float dropout_p, "
      "Tensor? seed, str mode) -> (Tensor y, Tensor u, Tensor lora_a, Tensor lora_b)",
      tags);
  m.def(
      "backward(Tensor grad_y, Tensor x, Tensor weight, Tensor theta_a, Tensor theta_b, Tensor u, Tensor lora_a, "
      "Tensor lora_b, float scaling, float dropout_p, Tensor? seed, str mode, bool[4] needs) "
      "-> (Tensor grad_x, Tensor grad_theta_a, Tensor grad_theta_b, Tensor grad_bias)",
      tags);
  m.def("dropout_keep_mask(Tensor seed, int n_rows, int n_cols, float dropout_p) -> Tensor", tags);
  m.def(
      "prepare(Tensor weight, Tensor theta_a, Tensor theta_b, ScalarType dtype, str mode) "
      "-> (Tensor weight_cast, Tensor lora_a, Tensor lora_b)",
      tags);
  m.def(
      "forward_ab(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor y, Tensor u)",
      tags);
  m.def(
      "prepare_forward(Tensor x, Tensor weight, Tensor? bias, Tensor theta_a, Tensor theta_b, float scaling, "
      "float dropout_p, Tensor? seed, str mode) -> (Tensor y, Tensor u, Tensor weight_cast, Tensor lora_a, "
      "Tensor lora_b)",
      tags);
  m.def(
      "backward_ab(Tensor grad_y, Tensor x, Tensor weight, Tensor u, Tensor lora_a, Tensor lora_b, float scaling, "
      "float dropout_p, Tensor? seed, str mode, ScalarType theta_dtype, bool[4] needs, "
      "bool stack_theta_grads=False) "
      "-> (Tensor grad_x, Tensor grad_theta_a, Tensor grad_theta_b, Tensor grad_bias)",
      tags);
}
