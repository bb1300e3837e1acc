// condlora_C::linear: the whole layer as one op, with its autograd in C++ (docs/design.md §4).
//
// One call from Python per forward and none per backward: the autograd node is a C++ Function, so a training step
// of a CondLoRA layer costs about the host time of the nn.Linear it replaces. The op
//   - casts for autocast as F.linear does (the Autocast kernels below), but leaves float32 master weights and the
//     generators uncast: the op rounds them itself, in the form it needs;
//   - draws the dropout seed on x's device (draw_seed, an op Inductor keeps as it is, so compiled and eager runs
//     draw the same masks);
//   - runs through two ops of condlora.cpp, which are what torch.compile traces (each has a fake implementation
//     in kernels/cpp.py): prepare_forward (prepare: A and B, and the weight rounded to x's dtype, in one pass over
//     W0 where the device has the kernel; then forward_ab: u and y) and backward_ab. One op per direction: in a
//     compiled graph each op is one call from Python per layer and step;
//   - returns the generators' gradients in the generators' own dtype (the engine casts them);
//   - keeps from forward to backward the weight in x's dtype (prepare's rounding of a float32 master), or, with
//     recompute_weight_cast or an x that needs no gradient, only the master, rounded again in the backward: 2 bytes
//     less per W0 element between forward and backward, one more pass over W0 in the backward (docs/design.md §4).
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/enum_tag.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "condlora.h"

namespace condlora {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handles of the ops this file calls through the dispatcher (found once).
const c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)>& draw_seed_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("condlora_C::draw_seed", "")
                             .typed<at::Tensor(const at::Tensor&)>();
  return op;
}

using Four = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

const auto& prepare_forward_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("condlora_C::prepare_forward", "").typed<Five(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      double, double, const std::optional<at::Tensor>&, const std::string&)>();
  return op;
}

const auto& backward_ab_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("condlora_C::backward_ab", "").typed<Four(
      const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
      const at::Tensor&, double, double, const std::optional<at::Tensor>&, const std::string&, at::ScalarType,
      std::array<bool, 4>, bool)>();
  return op;
}

const auto& linear_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("condlora_C::linear", "").typed<at::Tensor(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&, const at::Tensor&,
      double, double, c10::string_view, bool)>();
  return op;
}

// The arguments linear() takes beyond the shared checks of condlora.cpp: x of any rank (..., d_in), dense; weight
// and bias in x's dtype or, for half-precision x, float32 masters; the generators in any floating dtype.
void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p) {
  check_layout_and_dtype("x", x);
  check_layout_and_dtype("theta_a", theta_a);
  check_layout_and_dtype("theta_b", theta_b);
  check_scaling_and_dropout(scaling, dropout_p);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (..., d_in), got a 0-d tensor");
  check_master("weight", weight, x.scalar_type(), x.device());
  if (bias.has_value()) check_master("bias", *bias, x.scalar_type(), x.device());
  check_weight_shape(weight);
  TORCH_CHECK_VALUE(x.size(-1) == weight.size(1), "x must have last dimension d_in=", std::to_string(weight.size(1)),
                    " (weight is ", py_tuple(weight.sizes()), "), got x ", py_tuple(x.sizes()));
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"theta_a", theta_a}, {"theta_b", theta_b}}) {
    TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device().str(), " but x is on ", x.device().str(),
                      ": all tensors must be on one device");
  }
  TORCH_CHECK_VALUE(!weight.requires_grad(),
                    "weight requires grad, but CondLoRA keeps W0 frozen and never computes its gradient; call "
                    "weight.requires_grad_(False)");
}

std::vector<c10::SymInt> output_shape(const at::Tensor& x, const c10::SymInt& d_out) {
  std::vector<c10::SymInt> shape(x.sym_sizes().begin(), x.sym_sizes().end());
  shape.back() = d_out;
  return shape;
}

// The generators' gradients come back in float32 for float32 generators of a half-precision x (the backward's last
// GEMM writes float32), else in x's dtype; the engine casts them to the generators' dtype where it differs.
at::ScalarType theta_grad_dtype(const at::Tensor& x, const at::Tensor& theta) {
  return is_half_dtype(x.scalar_type()) && theta.scalar_type() == at::kFloat ? at::kFloat : x.scalar_type();
}

// The forward below autograd: (y2d, what the backward needs).
struct ForwardResult {
  at::Tensor y2d, x2d, weight, u, lora_a, lora_b;
  std::optional<at::Tensor> seed;
};

ForwardResult run_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                          const std::string& mode) {
  ForwardResult out;
  out.x2d = x.reshape_symint({-1, x.sym_size(-1)});
  if (dropout_p > 0.0) out.seed = draw_seed_op().call(x);
  auto [y, u, weight_cast, lora_a, lora_b] =
      prepare_forward_op().call(out.x2d, weight, bias, theta_a, theta_b, scaling, dropout_p, out.seed, mode);
  out.weight = weight.scalar_type() == x.scalar_type() ? weight : weight_cast;
  out.y2d = y;
  out.u = u;
  out.lora_a = lora_a;
  out.lora_b = lora_b;
  return out;
}

class LinearFunction : public torch::autograd::Function<LinearFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const at::Tensor& theta_a,
                            const at::Tensor& theta_b, double scaling, double dropout_p, c10::string_view mode,
                            bool recompute_weight_cast) {
    const BelowAutograd below_autograd;
    const std::string mode_name(mode);
    const ForwardResult result = run_forward(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode_name);
    // The master (a parameter, alive anyway) instead of its rounding, which the backward then rounds again: with
    // recompute_weight_cast, and where x needs no gradient, whose backward has no dx GEMM to keep the rounding for
    // (docs/design.md §4: as F.linear keeps no weight for such an input; the first layer after frozen embeddings)
    const bool keep_master = recompute_weight_cast || !x.requires_grad();
    const at::Tensor& saved_weight = keep_master ? weight : result.weight;
    ctx->save_for_backward({result.x2d, saved_weight, result.u, result.lora_a, result.lora_b,
                            result.seed.has_value() ? *result.seed : at::Tensor(),
                            x});  // x for dx's shape (its sizes may be symbolic under torch.compile)
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    ctx->saved_data["scaling"] = scaling;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->saved_data["mode"] = mode_name;
    ctx->saved_data["theta_a_dtype"] = theta_a.scalar_type();
    ctx->saved_data["theta_b_dtype"] = theta_b.scalar_type();
    ctx->saved_data["theta_grad_dtype"] = theta_grad_dtype(x, theta_b);
    return result.y2d.view_symint(output_shape(x, weight.sym_size(0)));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const auto saved = ctx->get_saved_variables();
    // weight: its rounding to x's dtype, or the float32 master (recompute_weight_cast), which backward_ab rounds
    const at::Tensor &x2d = saved[0], &weight = saved[1], &u = saved[2], &lora_a = saved[3], &lora_b = saved[4];
    const at::Tensor &seed = saved[5], &x = saved[6];
    // needs_input_grad counts tensor inputs only: without a bias, theta_a and theta_b come one place earlier
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const size_t theta_a_index = has_bias ? 3 : 2;
    const std::array<bool, 4> needs{ctx->needs_input_grad(0), ctx->needs_input_grad(theta_a_index),
                                    ctx->needs_input_grad(theta_a_index + 1), has_bias && ctx->needs_input_grad(2)};
    const at::Tensor dy = grad_outputs[0].reshape_symint({-1, grad_outputs[0].sym_size(-1)});
    const std::string& mode = ctx->saved_data["mode"].toStringRef();
    const bool stacked = can_stack_theta_grads(mode, needs);  // [dtheta_a; dtheta_b] in one tensor, split here
    auto [grad_x, grad_theta_a, grad_theta_b, grad_bias] = backward_ab_op().call(
        dy, x2d, weight, u, lora_a, lora_b, ctx->saved_data["scaling"].toDouble(),
        ctx->saved_data["dropout_p"].toDouble(), seed.defined() ? std::optional<at::Tensor>(seed) : std::nullopt,
        mode, ctx->saved_data["theta_grad_dtype"].toScalarType(), needs, stacked);
    if (stacked) {
      const auto r = lora_a.sym_size(0);
      grad_theta_b = grad_theta_a.narrow_symint(0, r, r);
      grad_theta_a = grad_theta_a.narrow_symint(0, 0, r);
    }
    variable_list out(9);
    if (needs[0]) out[0] = grad_x.view_symint(x.sym_sizes());
    if (needs[3]) out[2] = grad_bias;
    if (needs[1]) out[3] = cast(grad_theta_a, ctx->saved_data["theta_a_dtype"].toScalarType());
    if (needs[2]) out[4] = cast(grad_theta_b, ctx->saved_data["theta_b_dtype"].toScalarType());
    return out;
  }
};

at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                           c10::string_view mode, bool recompute_weight_cast) {
  check_linear_args(x, weight, bias, theta_a, theta_b, scaling, dropout_p);
  return LinearFunction::apply(x, weight, bias, theta_a, theta_b, scaling, dropout_p, mode, recompute_weight_cast);
}

// Below autograd (inference mode, or a caller that redispatched): the forward alone, nothing saved.
at::Tensor linear_no_autograd(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                              c10::string_view mode, bool /*recompute_weight_cast: nothing is saved here*/) {
  check_linear_args(x, weight, bias, theta_a, theta_b, scaling, dropout_p);
  const ForwardResult result = run_forward(x, weight, bias, theta_a, theta_b, scaling, dropout_p, std::string(mode));
  return result.y2d.view_symint(output_shape(x, weight.sym_size(0)));
}

// As F.linear under autocast: x is cast to the autocast dtype (float64 stays); weight, bias and the generators are
// passed as they are (float32 masters): the op rounds them to x's dtype itself (prepare: in its pass over W0).
template <c10::DeviceType device_type, c10::DispatchKey autocast_key>
at::Tensor linear_autocast(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                           c10::string_view mode, bool recompute_weight_cast) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(autocast_key);
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  const at::Tensor x_cast = at::autocast::cached_cast(dtype, x, device_type);
  // weight and bias follow x (as F.linear would cast them) unless they are float32 masters of a half x
  auto follow = [&](const at::Tensor& t) {
    return weight_dtype_fits(t.scalar_type(), x_cast.scalar_type()) ? t : at::autocast::cached_cast(dtype, t, device_type);
  };
  const std::optional<at::Tensor> bias_cast = bias.has_value() ? std::optional<at::Tensor>(follow(*bias)) : std::nullopt;
  return linear_op().call(x_cast, follow(weight), bias_cast, theta_a, theta_b, scaling, dropout_p, mode,
                          recompute_weight_cast);
}

at::Tensor draw_seed(const at::Tensor& like) {
  return at::randint(0, kSeedHigh, {1}, like.options().dtype(at::kLong));
}

}  // namespace
}  // namespace condlora

TORCH_LIBRARY_FRAGMENT(condlora_C, m) {
  const std::vector<at::Tag> tags{at::Tag::pt2_compliant_tag};
  m.def(
      "linear(Tensor x, Tensor weight, Tensor? bias, Tensor theta_a, Tensor theta_b, float scaling, "
      "float dropout_p=0.0, str mode=\"paper\", bool recompute_weight_cast=False) -> Tensor",
      tags);
  m.def("draw_seed(Tensor like) -> Tensor", {at::Tag::pt2_compliant_tag, at::Tag::nondeterministic_seeded});
}

TORCH_LIBRARY_IMPL(condlora_C, Autograd, m) { m.impl("linear", &condlora::linear_autograd); }
TORCH_LIBRARY_IMPL(condlora_C, CPU, m) { m.impl("linear", &condlora::linear_no_autograd); }
TORCH_LIBRARY_IMPL(condlora_C, CUDA, m) { m.impl("linear", &condlora::linear_no_autograd); }
TORCH_LIBRARY_IMPL(condlora_C, AutocastCPU, m) {
  m.impl("linear", &condlora::linear_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}
TORCH_LIBRARY_IMPL(condlora_C, AutocastCUDA, m) {
  m.impl("linear", &condlora::linear_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}
TORCH_LIBRARY_IMPL(condlora_C, CompositeExplicitAutograd, m) { m.impl("draw_seed", &condlora::draw_seed); }
