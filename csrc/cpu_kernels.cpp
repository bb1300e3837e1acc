// CPU implementation of the condlora_C ops: the shared chain rule (condlora.cpp) plus at::parallel_for kernels for
// the passes that need the dropout mask. Without a mask, ATen's GEMMs (MKL / oneDNN) do every step. With one, the
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

// CPU BLAS adds C into its split-K reduction block by block: the frozen GEMM goes first (see condlora.h)
bool lowrank_first_cpu(double) { return false; }

const DeviceKernels kCpuKernels{dropout_project_cpu, x_pass_cpu, dy_pass_cpu, lowrank_first_cpu};

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
}
