// CPU implementation of the condlora_C ops: the shared chain rule (condlora.cpp) plus at::parallel_for kernels where
// they beat composing ATen ops. Without a dropout mask, ATen's GEMMs (MKL / oneDNN) do the large products and one
// hand-written pass does all of the backward's reductions over tokens (token_reductions_cpu). With a mask, the
// kernels below walk x in blocks of rows that stay in cache: each block's mask is drawn (one Philox call per 8
// elements) and fused with the scaling into x_hat, which the GEMMs of that block read while it is still in cache;
// x_hat never exists as an N x d_in tensor, and the backward draws the mask once for both of its uses.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "condlora.h"
#include "philox.h"

namespace condlora {
namespace {

uint64_t seed_value(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

at::ScalarType acc_dtype(at::ScalarType dtype) { return dtype == at::kDouble ? at::kDouble : at::kFloat; }

// keep[c] = 1 where element (row, c) of a row-major (., n_cols) tensor is kept, else 0: one Philox call per group
// of 8 columns, whose 8 keep bits are expanded through a table (a bit-by-bit loop costs as much as the Philox call).
// Consumers multiply by keep and then by the keep scale (not select), so NaN and inf of dropped elements propagate
// exactly as in the reference's x * keep * scale.
template <typename acc_t>
void fill_keep_row(uint64_t seed, int64_t row, int64_t n_cols, uint32_t threshold, acc_t* keep) {
  static const auto expand = [] {
    std::array<std::array<acc_t, kDropoutGroup>, 256> table{};
    for (int bits = 0; bits < 256; ++bits) {
      for (int j = 0; j < kDropoutGroup; ++j) table[bits][j] = static_cast<acc_t>((bits >> j) & 1);
    }
    return table;
  }();
  for (int64_t group = 0; group * kDropoutGroup < n_cols; ++group) {
    const uint32_t bits = dropout_keep_bits(seed, dropout_counter(row, group, n_cols), threshold);
    const int64_t first = group * kDropoutGroup, count = std::min<int64_t>(kDropoutGroup, n_cols - first);
    std::copy_n(expand[bits].data(), count, keep + first);
  }
}

// Rows of x are processed in blocks of ~256 KB (in the accumulation type), so a block's x_hat, drawn once, is still
// in cache when its GEMMs read it. The blocks are split among a fixed number of chunks, one per thread, each with
// its own partial sums, added up in chunk order at the end: results do not depend on which thread ran what.
struct RowBlocks {
  int64_t n_rows, block_rows, n_chunks, rows_per_chunk;

  RowBlocks(int64_t rows, int64_t n_cols, int64_t element_size) : n_rows(rows) {
    block_rows = std::max<int64_t>(1, std::min<int64_t>(256, (256 << 10) / (element_size * std::max<int64_t>(1, n_cols))));
    n_chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (rows + block_rows - 1) / block_rows));
    rows_per_chunk = (rows + n_chunks - 1) / n_chunks;
  }

  // fn(chunk, first_row, end_row) for every block, the chunks in parallel
  template <typename Fn>
  void for_each(const Fn& fn) const {
    at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        const int64_t chunk_end_row = std::min(n_rows, (chunk + 1) * rows_per_chunk);
        for (int64_t row = chunk * rows_per_chunk; row < chunk_end_row; row += block_rows) {
          fn(chunk, row, std::min(chunk_end_row, row + block_rows));
        }
      }
    });
  }
};

// For the rows [begin, end) of x: their 0/1 keep values into `keep` and, unless x_hat is null,
// x_hat = x * keep * keep_scale, both in the accumulation type, row by row (the row's mask is still in L1).
template <typename scalar_t, typename acc_t>
void fill_x_hat_block(const scalar_t* x, int64_t begin, int64_t end, int64_t d_in, uint64_t seed,
                      const DropoutParams& dropout, acc_t* keep, acc_t* x_hat) {
  const acc_t keep_scale = static_cast<acc_t>(dropout.keep_scale);
  for (int64_t row = begin; row < end; ++row) {
    acc_t* keep_row = keep + (row - begin) * d_in;
    fill_keep_row(seed, row, d_in, dropout.threshold, keep_row);
    if (x_hat == nullptr) continue;
    acc_t* x_hat_row = x_hat + (row - begin) * d_in;
    const scalar_t* x_row = x + row * d_in;
    for (int64_t c = 0; c < d_in; ++c) x_hat_row[c] = (static_cast<acc_t>(x_row[c]) * keep_row[c]) * keep_scale;
  }
}

// u = x_hat A^T, block by block: the block's x_hat in cache, then one GEMM for its rows of u.
at::Tensor dropout_project_cpu(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& seed, double p) {
  const int64_t n_rows = x.size(0), d_in = x.size(1);
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const at::Tensor a_acc = lora_a.to(acc_type);
  at::Tensor u = at::empty({n_rows, lora_a.size(0)}, acc_options);
  const DropoutParams dropout = make_dropout_params(p);
  const uint64_t seed_u64 = seed_value(seed);
  const RowBlocks blocks(n_rows, d_in, c10::elementSize(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "condlora_dropout_project_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    blocks.for_each([&](int64_t, int64_t begin, int64_t end) {
      thread_local std::vector<acc_t> keep, x_hat;
      keep.resize(blocks.block_rows * d_in);
      x_hat.resize(blocks.block_rows * d_in);
      fill_x_hat_block(x_data, begin, end, d_in, seed_u64, dropout, keep.data(), x_hat.data());
      at::Tensor u_block = u.narrow(0, begin, end - begin);
      at::mm_out(u_block, at::from_blob(x_hat.data(), {end - begin, d_in}, acc_options), a_acc.t());
    });
  });
  return u.to(x.scalar_type());
}

// The backward's pass over x. Without dropout both outputs are plain GEMMs. With dropout, per block of rows, the
// mask is drawn once and used twice (keep_scale = 1 / (1 - t / 2^16), see philox.h):
//   grad_a (r, d_in)     += v[block]^T x_hat[block]                      a GEMM per block, fp32 partial sums per chunk
//   grad_x[block]        += s * (v[block] A) * keep * keep_scale         a GEMM per block, then the masked add
void x_pass_cpu(const at::Tensor& x, const at::Tensor& v, const at::Tensor& lora_a,
                const std::optional<at::Tensor>& seed, double p, double scaling, const at::Tensor& grad_a,
                const at::Tensor& grad_x) {
  if (p == 0.0) {
    at::Tensor out_a = grad_a, out_x = grad_x;  // addmm_out takes non-const outputs
    if (out_a.defined()) at::addmm_out(out_a, out_a, v.t(), x, /*beta=*/0.0, /*alpha=*/scaling);
    if (out_x.defined()) out_x.addmm_(v, lora_a, /*beta=*/1.0, /*alpha=*/scaling);
    return;
  }
  const int64_t n_rows = x.size(0), d_in = x.size(1), r = lora_a.size(0);
  const at::ScalarType acc_type = acc_dtype(x.scalar_type());
  const auto acc_options = x.options().dtype(acc_type);
  const at::Tensor a_acc = lora_a.to(acc_type), v_acc = v.to(acc_type);
  const DropoutParams dropout = make_dropout_params(p);
  const uint64_t seed_u64 = seed_value(*seed);
  const bool want_a = grad_a.defined(), want_x = grad_x.defined();
  const RowBlocks blocks(n_rows, d_in, c10::elementSize(acc_type));
  at::Tensor partial_a = want_a ? at::zeros({blocks.n_chunks, r, d_in}, acc_options) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "condlora_x_pass_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x_data = x.data_ptr<scalar_t>();
    scalar_t* grad_x_data = want_x ? grad_x.data_ptr<scalar_t>() : nullptr;
    const acc_t s = static_cast<acc_t>(scaling), keep_scale = static_cast<acc_t>(dropout.keep_scale);
    blocks.for_each([&](int64_t chunk, int64_t begin, int64_t end) {
      const int64_t rows = end - begin;
      thread_local std::vector<acc_t> keep, x_hat;
      keep.resize(blocks.block_rows * d_in);
      x_hat.resize(blocks.block_rows * d_in);
      fill_x_hat_block(x_data, begin, end, d_in, seed_u64, dropout, keep.data(), want_a ? x_hat.data() : nullptr);
      const at::Tensor v_block = v_acc.narrow(0, begin, rows);
      if (want_a) {
        partial_a[chunk].addmm_(v_block.t(), at::from_blob(x_hat.data(), {rows, d_in}, acc_options));
      }
      if (want_x) {  // x_hat's buffer is free again: (v A)[block] goes there
        at::Tensor lowrank = at::from_blob(x_hat.data(), {rows, d_in}, acc_options);
        at::mm_out(lowrank, v_block, a_acc);
        for (int64_t i = 0; i < rows * d_in; ++i) {
          scalar_t& out = grad_x_data[begin * d_in + i];
          out = static_cast<scalar_t>(static_cast<acc_t>(out) + s * ((x_hat[i] * keep[i]) * keep_scale));
        }
      }
    });
  });
  if (want_a) {
    at::Tensor out_a = grad_a;
    out_a.copy_(partial_a.sum(0).mul_(scaling));
  }
}

// The backward's pass over dy: two reductions over tokens that ATen does well (the CPU GEMM and sum kernels
// accumulate half dtypes in fp32).
void dy_pass_cpu(const at::Tensor& grad_y, const at::Tensor& u, double scaling, const at::Tensor& grad_b_t,
                 const at::Tensor& grad_bias) {
  at::Tensor out_b = grad_b_t, out_bias = grad_bias;
  if (out_b.defined()) at::addmm_out(out_b, out_b, u.t(), grad_y, /*beta=*/0.0, /*alpha=*/scaling);
  if (out_bias.defined()) at::sum_out(out_bias, grad_y, {0});
}

// ---------------------------------------------------------------------------------------------------------------
// Without dropout: all of the backward's reductions over tokens in one pass over the rows of dy and x
// ---------------------------------------------------------------------------------------------------------------
// For a rank-r adapter these are skinny products, v = dy B, s u^T dy, s v^T x and the column sums of dy, which ATen
// runs as separate passes over N x d tensors (2-vCPU EPYC, N = 2048, d = 768, r = 8: ~0.45 ms each, once the big
// GEMMs have pushed dy and x out of cache). Here each group of kRowGroup rows of dy and x is read from memory once
// and everything is computed from it while it is in L1:
//   v[k]       = dy[k] B          r dot products of length d_out, against the rows of B^T
//   grad_b_t  += u[k]^T dy[k]     r row updates of length d_out  } a group updates each accumulator row in one
//   grad_bias += dy[k]                                           } load and store of it, not one per token
//   grad_a    += v[k]^T x[k]      r row updates of length d_in   }
// and s is applied once, at the end. The loops are written so that a compiler vectorises them without reassociating
// any sum (no -ffast-math): a dot product keeps kLanes partial sums; a row update adds its group's rows in order.
// The rows are split as for the dropout passes (RowBlocks: a chunk per thread with its own partial sums, added in
// chunk order at the end): results depend on the thread count, as ATen's GEMMs do, but not on the schedule.

constexpr int64_t kLanes = 16;  // partial sums of a dot product: two AVX2 registers of float
constexpr int kRowGroup = 4;    // rows whose updates go into an accumulator row in one pass over it

#if defined(__GNUC__) || defined(__clang__)
#define CONDLORA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CONDLORA_ALWAYS_INLINE inline
#endif

template <typename T>
CONDLORA_ALWAYS_INLINE T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  T lanes[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) lanes[j] += a[c + j] * b[c + j];
  }
  T total = 0;
  for (; c < n; ++c) total += a[c] * b[c];
  for (int64_t j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

// acc[c] += sum over g < G, in order, of coef[g * coef_stride] * rows[g * row_stride + c]
template <int G, typename T>
CONDLORA_ALWAYS_INLINE void add_rows(T* __restrict acc, const T* __restrict rows, int64_t row_stride,
                                     const T* __restrict coef, int64_t coef_stride, int64_t n) {
  T w[G];
  for (int g = 0; g < G; ++g) w[g] = coef[g * coef_stride];
  for (int64_t c = 0; c < n; ++c) {
    T sum = acc[c];
    for (int g = 0; g < G; ++g) sum += w[g] * rows[g * row_stride + c];
    acc[c] = sum;
  }
}

template <typename T>
struct TokenReductionArgs {
  const T *dy, *x, *u, *b_t;  // dy (N, d_out), x (N, d_in), u (N, r), B^T (r, d_out), all contiguous
  T* v_out;                   // (N, r), or null
  int64_t d_in, d_out, r;
  bool want_a, want_b, want_bias;
};

// Rows [k, k + G) into one chunk's partial sums grad_a (r, d_in), grad_b_t (r, d_out), grad_bias (d_out); v is
// scratch for the group's (G, r) block of v.
template <int G, typename T>
CONDLORA_ALWAYS_INLINE void reduce_row_group(const TokenReductionArgs<T>& a, int64_t k, T* v, T* grad_a,
                                             T* grad_b_t, T* grad_bias) {
  const T* dy = a.dy + k * a.d_out;
  if (a.want_a || a.v_out != nullptr) {
    for (int g = 0; g < G; ++g) {
      for (int64_t j = 0; j < a.r; ++j) v[g * a.r + j] = dot(dy + g * a.d_out, a.b_t + j * a.d_out, a.d_out);
    }
    if (a.v_out != nullptr) std::copy_n(v, G * a.r, a.v_out + k * a.r);
  }
  if (a.want_b) {
    for (int64_t j = 0; j < a.r; ++j) add_rows<G>(grad_b_t + j * a.d_out, dy, a.d_out, a.u + k * a.r + j, a.r, a.d_out);
  }
  if (a.want_bias) {
    T ones[G];
    std::fill_n(ones, G, T(1));
    add_rows<G>(grad_bias, dy, a.d_out, ones, 1, a.d_out);
  }
  if (a.want_a) {
    const T* x = a.x + k * a.d_in;
    for (int64_t j = 0; j < a.r; ++j) add_rows<G>(grad_a + j * a.d_in, x, a.d_in, v + j, a.r, a.d_in);
  }
}

// Rows [begin, end) into one chunk's partial sums; v is scratch for kRowGroup rows of v.
template <typename T>
CONDLORA_ALWAYS_INLINE void reduce_rows(const TokenReductionArgs<T>& a, int64_t begin, int64_t end, T* v, T* grad_a,
                                        T* grad_b_t, T* grad_bias) {
  int64_t k = begin;
  for (; k + kRowGroup <= end; k += kRowGroup) reduce_row_group<kRowGroup>(a, k, v, grad_a, grad_b_t, grad_bias);
  for (; k < end; ++k) reduce_row_group<1>(a, k, v, grad_a, grad_b_t, grad_bias);
}

// The same loops compiled twice: for x86-64's baseline (SSE2) and, chosen at run time where the CPU has them, for
// AVX2 and FMA (twice the vector width; the build targets the baseline, so the compiler will not use them unasked).
// In the AVX2 clone the compiler may contract a * b + c into one FMA, so its last bits can differ from the baseline's.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <typename T>
__attribute__((target("avx2,fma"))) void reduce_rows_avx2(const TokenReductionArgs<T>& a, int64_t begin,
                                                          int64_t end, T* v, T* grad_a, T* grad_b_t, T* grad_bias) {
  reduce_rows(a, begin, end, v, grad_a, grad_b_t, grad_bias);
}

bool cpu_has_avx2_fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T>
void reduce_rows_best(const TokenReductionArgs<T>& a, int64_t begin, int64_t end, T* v, T* grad_a, T* grad_b_t,
                      T* grad_bias) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (cpu_has_avx2_fma()) return reduce_rows_avx2(a, begin, end, v, grad_a, grad_b_t, grad_bias);
#endif
  reduce_rows(a, begin, end, v, grad_a, grad_b_t, grad_bias);
}

bool token_reductions_cpu(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& u,
                          const at::Tensor& lora_b, double scaling, const at::Tensor& v_out, const at::Tensor& grad_a,
                          const at::Tensor& grad_b_t, const at::Tensor& grad_bias) {
  const at::ScalarType dtype = x.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;  // half dtypes: ATen accumulates them in fp32
  const int64_t n_rows = x.size(0), d_in = x.size(1), d_out = grad_y.size(1), r = u.size(1);
  const bool want_a = grad_a.defined(), want_b = grad_b_t.defined(), want_bias = grad_bias.defined();
  const at::Tensor b_t = lora_b.t().contiguous();
  const RowBlocks blocks(n_rows, d_in + d_out, x.element_size());  // a token's rows of x and dy
  // every chunk's partial sums in one buffer, [grad_a | grad_b_t | grad_bias] per chunk: one allocation, and the
  // sums over chunks below are plain loops (at a layer of a few tokens, ATen calls would cost more than the work)
  const int64_t size_a = want_a ? r * d_in : 0, size_b = want_b ? r * d_out : 0, size_bias = want_bias ? d_out : 0;
  const int64_t per_chunk = size_a + size_b + size_bias;
  const at::Tensor partials = at::zeros({blocks.n_chunks, per_chunk}, x.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "condlora_token_reductions_cpu", [&] {
    const TokenReductionArgs<scalar_t> args{grad_y.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                                            u.data_ptr<scalar_t>(), b_t.data_ptr<scalar_t>(),
                                            v_out.defined() ? v_out.data_ptr<scalar_t>() : nullptr,
                                            d_in, d_out, r, want_a, want_b, want_bias};
    scalar_t* const partial = partials.data_ptr<scalar_t>();
    blocks.for_each([&](int64_t chunk, int64_t begin, int64_t end) {
      thread_local std::vector<scalar_t> v;
      v.resize(kRowGroup * r);
      scalar_t* mine = partial + chunk * per_chunk;
      reduce_rows_best(args, begin, end, v.data(), want_a ? mine : nullptr, want_b ? mine + size_a : nullptr,
                       want_bias ? mine + size_a + size_b : nullptr);
    });
    // out = factor * (the chunks' partial sums added in chunk order): the same result whatever the schedule
    auto finish = [&](const at::Tensor& out, int64_t offset, int64_t size, double factor) {
      if (!out.defined()) return;
      scalar_t* const result = out.data_ptr<scalar_t>();  // preallocated, contiguous: written in place
      const scalar_t f = static_cast<scalar_t>(factor);
      for (int64_t i = 0; i < size; ++i) {
        scalar_t sum = partial[offset + i];
        for (int64_t chunk = 1; chunk < blocks.n_chunks; ++chunk) sum += partial[chunk * per_chunk + offset + i];
        result[i] = sum * f;
      }
    };
    finish(grad_a, 0, size_a, scaling);
    finish(grad_b_t, size_a, size_b, scaling);
    finish(grad_bias, size_a + size_b, size_bias, 1.0);
  });
  return true;
}

// CPU BLAS adds C into its split-K reduction block by block: the frozen GEMM goes first (see condlora.h)
bool lowrank_first_cpu(double) { return false; }

const DeviceKernels kCpuKernels{dropout_project_cpu, x_pass_cpu, dy_pass_cpu, lowrank_first_cpu,
                                 token_reductions_cpu, /*prepare=*/nullptr};

// ---------------------------------------------------------------------------------------------------------------
// The ops for the CPU dispatch key
// ---------------------------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, const at::Tensor& theta_a,
    const at::Tensor& theta_b, double scaling, double dropout_p, const std::optional<at::Tensor>& seed,
    const std::string& mode) {
  return condlora_forward(kCpuKernels, x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& theta_a,
    const at::Tensor& theta_b, const at::Tensor& u, const at::Tensor& lora_a, const at::Tensor& lora_b,
    double scaling, double dropout_p, const std::optional<at::Tensor>& seed, const std::string& mode,
    std::array<bool, 4> needs) {
  return condlora_backward(kCpuKernels, grad_y, x, weight, theta_a, theta_b, u, lora_a, lora_b, scaling, dropout_p,
                           seed, mode, needs);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> prepare_cpu(const at::Tensor& weight, const at::Tensor& theta_a,
                                                           const at::Tensor& theta_b, at::ScalarType dtype,
                                                           const std::string& mode) {
  return condlora_prepare(kCpuKernels, weight, theta_a, theta_b, dtype, mode);
}

std::tuple<at::Tensor, at::Tensor> forward_ab_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                  const at::Tensor& lora_b, double scaling, double dropout_p,
                                                  const std::optional<at::Tensor>& seed) {
  return condlora_forward_ab(kCpuKernels, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed);
}

using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Five prepare_forward_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         const at::Tensor& theta_a, const at::Tensor& theta_b, double scaling, double dropout_p,
                         const std::optional<at::Tensor>& seed, const std::string& mode) {
  return condlora_prepare_forward(kCpuKernels, x, weight, bias, theta_a, theta_b, scaling, dropout_p, seed, mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_ab_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& u,
    const at::Tensor& lora_a, const at::Tensor& lora_b, double scaling, double dropout_p,
    const std::optional<at::Tensor>& seed, const std::string& mode, at::ScalarType theta_dtype,
    std::array<bool, 4> needs, bool stack_theta_grads) {
  return condlora_backward_ab(kCpuKernels, grad_y, x, weight, u, lora_a, lora_b, scaling, dropout_p, seed, mode,
                              theta_dtype, needs, stack_theta_grads);
}

at::Tensor dropout_keep_mask_cpu(const at::Tensor& seed, int64_t n_rows, int64_t n_cols, double dropout_p) {
  check_mask_args(seed, n_rows, n_cols, dropout_p);
  at::Tensor mask = at::empty({n_rows, n_cols}, seed.options().dtype(at::kBool));
  const DropoutParams dropout = make_dropout_params(dropout_p);
  const uint64_t seed_u64 = seed_value(seed);
  bool* out = mask.data_ptr<bool>();
  const int64_t grain_rows = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n_cols));
  at::parallel_for(0, n_rows, grain_rows, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> keep(n_cols);
    for (int64_t row = begin; row < end; ++row) {
      fill_keep_row(seed_u64, row, n_cols, dropout.threshold, keep.data());
      for (int64_t c = 0; c < n_cols; ++c) out[row * n_cols + c] = keep[c] != 0;
    }
  });
  return mask;
}

}  // namespace
}  // namespace condlora

TORCH_LIBRARY_IMPL(condlora_C, CPU, m) {
  m.impl("generate_lora_weights", &condlora::generate_lora_weights);
  m.impl("forward", &condlora::forward_cpu);
  m.impl("backward", &condlora::backward_cpu);
  m.impl("dropout_keep_mask", &condlora::dropout_keep_mask_cpu);
  m.impl("prepare", &condlora::prepare_cpu);
  m.impl("forward_ab", &condlora::forward_ab_cpu);
  m.impl("prepare_forward", &condlora::prepare_forward_cpu);
  m.impl("backward_ab", &condlora::backward_ab_cpu);
}
