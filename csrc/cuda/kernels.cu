// Hand-written CUDA kernels of the CondLoRA ops: what cuBLAS cannot fuse. The GEMMs (the frozen GEMM, the rank-r
// products, the generation where no kernel below takes it) run through ATen/cuBLAS in cuda_ops.cpp; these kernels do
//   - the Philox dropout mask (one call per 8 elements), drawn from a seed read from device memory (so CUDA graphs
//     replay correctly),
//   - the reductions over tokens (dA, dB, db) with fp32 accumulators, fused with the mask and with the low-rank
//     term of dx, so that the backward reads x once and dy once for all of them,
//   - the generation of A and B with W0's rounding in one pass over W0 (docs/design.md §4): one block per row for
//     small paper-mode layers, a tiled tensor-core pass for the other half-precision layers within its limits.
// Every index is int64; every launch goes to the stream and device the caller (cuda_ops.cpp) passes.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <atomic>
#include <mutex>

#include "../philox.h"
#include "kernels.cuh"

namespace condlora {
namespace cuda {
namespace {

// fp32 accumulation for the half types and float, fp64 for double
template <typename T>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccumulateType<T>::type;

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
__host__ __device__ inline int64_t min_int64(int64_t a, int64_t b) { return a < b ? a : b; }

// Calls fn(T{}) with T the CUDA type of dtype.
template <typename Fn>
cudaError_t dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kHalf: return fn(__half{});
    case DType::kBFloat16: return fn(__nv_bfloat16{});
    case DType::kFloat: return fn(float{});
    case DType::kDouble: return fn(double{});
  }
  return cudaErrorInvalidValue;
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise: the mask, and x * mask / (1 - p). One thread per group of 8 columns of a row, the elements that share
// a Philox call (philox.h); the group's flat counter row * ceil(n_cols / 8) + col / 8 is the grid-stride index itself.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kElementwiseThreads = 256;

// Grid-stride launches: enough blocks to fill any GPU, few enough that each thread draws several groups.
unsigned elementwise_blocks(int64_t n) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ceil_div(n, kElementwiseThreads), 1 << 16)));
}

// The 8 elements of a group, loaded and stored as one vector where the row length is a multiple of 8 and the
// pointers are aligned (then every group is): 16-byte accesses instead of eight 2-byte ones.
template <typename T>
struct alignas(sizeof(T) * kDropoutGroup < 16 ? sizeof(T) * kDropoutGroup : 16) Group {
  T v[kDropoutGroup];
};

template <typename T>
bool group_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % alignof(Group<T>) == 0;
}

// Calls body(row, col, bits) for every group of 8 columns of an (n_rows, n_cols) matrix, grid-stride, with the
// group's 8 keep bits: the loop both elementwise kernels share.
template <typename Body>
__device__ __forceinline__ void for_each_dropout_group(const int64_t* __restrict__ seed_ptr, int64_t n_rows,
                                                       int64_t n_cols, uint32_t threshold, Body&& body) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);
  const int64_t groups_per_row = ceil_div(n_cols, kDropoutGroup), n_groups = n_rows * groups_per_row;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < n_groups; g += stride) {
    const int64_t row = g / groups_per_row, col = (g - row * groups_per_row) * kDropoutGroup;
    body(row, col, dropout_keep_bits(seed, static_cast<uint64_t>(g), threshold));
  }
}

__global__ void dropout_keep_mask_kernel(const int64_t* __restrict__ seed_ptr, int64_t n_rows, int64_t n_cols,
                                         uint32_t threshold, bool vectorized, bool* __restrict__ out) {
  for_each_dropout_group(seed_ptr, n_rows, n_cols, threshold, [&](int64_t row, int64_t col, uint32_t bits) {
    bool* group_out = out + row * n_cols + col;
    if (vectorized) {
      Group<bool> keep;
#pragma unroll
      for (int j = 0; j < kDropoutGroup; ++j) keep.v[j] = (bits >> j) & 1u;
      *reinterpret_cast<Group<bool>*>(group_out) = keep;
    } else {
      for (int j = 0; j < kDropoutGroup && col + j < n_cols; ++j) group_out[j] = (bits >> j) & 1u;
    }
  });
}

// dst = (accumulate ? dst : 0) + (src * keep) * keep_scale, in the accumulation type and rounded once: in the half
// types this is exactly the reference's x * keep * (1 / (1 - p)), NaN and inf of dropped elements included. src and
// dst may alias, hence no __restrict__.
template <typename T>
__global__ void dropout_scale_kernel(const T* src, T* dst, int64_t n_rows, int64_t n_cols,
                                     const int64_t* __restrict__ seed_ptr, uint32_t threshold, acc_t<T> keep_scale,
                                     bool accumulate, bool vectorized) {
  for_each_dropout_group(seed_ptr, n_rows, n_cols, threshold, [&](int64_t row, int64_t col, uint32_t bits) {
    const int64_t first = row * n_cols + col;
    if (vectorized) {
      const Group<T> in = *reinterpret_cast<const Group<T>*>(src + first);
      Group<T> out;
      if (accumulate) out = *reinterpret_cast<const Group<T>*>(dst + first);
#pragma unroll
      for (int j = 0; j < kDropoutGroup; ++j) {
        const acc_t<T> before = accumulate ? to_acc(out.v[j]) : acc_t<T>(0);
        out.v[j] = from_acc<T>(before + (to_acc(in.v[j]) * acc_t<T>((bits >> j) & 1u)) * keep_scale);
      }
      *reinterpret_cast<Group<T>*>(dst + first) = out;
    } else {
      for (int j = 0; j < kDropoutGroup && col + j < n_cols; ++j) {
        const acc_t<T> before = accumulate ? to_acc(dst[first + j]) : acc_t<T>(0);
        dst[first + j] = from_acc<T>(before + (to_acc(src[first + j]) * acc_t<T>((bits >> j) & 1u)) * keep_scale);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions over tokens, fused with the mask and the low-rank term of dx (see TokenReduceArgs in kernels.cuh)
//
// Layout: one thread per column c of z, one block per 128 columns and one row split (gridDim.y). Each thread keeps
// its column's r accumulators (and column c of lora_a, for the epilogue) in registers and walks down the rows of
// its split; the rows' weights w[n, :] are staged in shared memory, 32 rows at a time, and read by all threads as
// broadcasts, next to the keep bits of those rows (one Philox call per 8 columns, drawn by one thread for its 8
// neighbours). A warp reads 32 consecutive elements of a row (coalesced), and each element of z is read once for
// all r outputs, the column sum and the epilogue. The per-split sums go to a workspace that sum_partials adds up in
// a fixed order: no atomics, deterministic results.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kReduceThreads = 128;
constexpr int kStageRows = 32;  // rows of w staged in shared memory at a time
// Rows of z loaded together: a thread's loads are only 2-8 bytes, so several must be in flight per warp to cover
// the HBM latency (an H100 needs ~14 KB in flight per SM to stream at 3 TB/s).
constexpr int kRowUnroll = 8;

template <typename T, int R>
__global__ void __launch_bounds__(kReduceThreads) token_reduce_kernel(TokenReduceArgs args) {
  using acc = acc_t<T>;
  constexpr int kGroupsPerBlock = kReduceThreads / kDropoutGroup;
  __shared__ acc w_stage[kStageRows][R];
  __shared__ uint8_t keep_stage[kStageRows][kGroupsPerBlock];  // bit j of [row][g]: column 8 g + j of the block

  const T* __restrict__ z = static_cast<const T*>(args.z);
  const T* __restrict__ w = static_cast<const T*>(args.w);
  const int64_t n_rows = args.n_rows, n_cols = args.n_cols;
  const int r = args.r;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x;
  const bool active = col < n_cols;
  const int64_t rows_per_split = ceil_div(n_rows, args.splits);
  const int64_t row_begin = min_int64(n_rows, static_cast<int64_t>(blockIdx.y) * rows_per_split);
  const int64_t row_end = min_int64(n_rows, row_begin + rows_per_split);

  const bool dropout = args.seed != nullptr;
  const bool reduce = args.partial != nullptr;
  const bool column_sum = args.partial_colsum != nullptr;
  T* __restrict__ epilogue_out = static_cast<T*>(args.epilogue_out);
  const uint64_t seed = dropout ? static_cast<uint64_t>(*args.seed) : 0;
  const acc keep_scale = static_cast<acc>(args.keep_scale);
  const acc epilogue_scale = static_cast<acc>(args.epilogue_scale);

  acc sums[R];
  acc a_col[R];  // column `col` of lora_a, for the epilogue
#pragma unroll
  for (int k = 0; k < R; ++k) {
    sums[k] = 0;
    a_col[k] = (epilogue_out != nullptr && active && k < r)
                   ? to_acc(static_cast<const T*>(args.lora_a)[k * n_cols + col])
                   : acc(0);
  }
  acc colsum = 0, colsum_compensation = 0;

  for (int64_t stage = row_begin; stage < row_end; stage += kStageRows) {
    const int rows = static_cast<int>(min_int64(kStageRows, row_end - stage));
    __syncthreads();  // every thread is done with the previous stage
    for (int i = threadIdx.x; i < kStageRows * R; i += kReduceThreads) {
      const int row = i / R, k = i % R;  // ranks past r are zero, so the loops below run over all R
      w_stage[row][k] = (row < rows && k < r) ? to_acc(w[(stage + row) * r + k]) : acc(0);
    }
    if (dropout) {
      for (int i = threadIdx.x; i < kStageRows * kGroupsPerBlock; i += kReduceThreads) {
        const int row = i / kGroupsPerBlock, g = i % kGroupsPerBlock;
        const int64_t group = static_cast<int64_t>(blockIdx.x) * kGroupsPerBlock + g;
        const bool inside = row < rows && group * kDropoutGroup < n_cols;
        keep_stage[row][g] = inside ? static_cast<uint8_t>(dropout_keep_bits(
                                          seed, dropout_counter(stage + row, group, n_cols), args.threshold))
                                    : uint8_t(0);
      }
    }
    __syncthreads();
    if (!active) continue;

    for (int row0 = 0; row0 < rows; row0 += kRowUnroll) {
      // rows past `rows` read as zero (their w_stage rows are zero too), so the chunk loops need no bounds
      acc z_values[kRowUnroll], keep[kRowUnroll], z_masked[kRowUnroll];
#pragma unroll
      for (int j = 0; j < kRowUnroll; ++j) {
        z_values[j] = row0 + j < rows ? to_acc(z[(stage + row0 + j) * n_cols + col]) : acc(0);
      }
#pragma unroll
      for (int j = 0; j < kRowUnroll; ++j) {
        keep[j] = dropout ? static_cast<acc>((keep_stage[row0 + j][threadIdx.x / kDropoutGroup] >> (threadIdx.x % kDropoutGroup)) & 1u)
                          : acc(1);
        z_masked[j] = dropout ? (z_values[j] * keep[j]) * keep_scale : z_values[j];
      }
      // Two-level sums: each chunk of kRowUnroll rows is summed on its own, then added to the running total, so the
      // rounding error grows with sqrt(rows / kRowUnroll) rather than sqrt(rows) (the reference's GEMMs and sums
      // are blocked too).
      if (reduce) {
#pragma unroll
        for (int k = 0; k < R; ++k) {
          acc chunk = 0;
#pragma unroll
          for (int j = 0; j < kRowUnroll; ++j) chunk += w_stage[row0 + j][k] * z_masked[j];
          sums[k] += chunk;
        }
      }
      if (column_sum) {  // the bias gradient: compensated (Kahan) running total, as exact as torch's tree sums
        acc chunk = 0;
#pragma unroll
        for (int j = 0; j < kRowUnroll; ++j) chunk += z_values[j];
        const acc corrected = chunk - colsum_compensation;
        const acc total = colsum + corrected;
        colsum_compensation = (total - colsum) - corrected;
        if (!isfinite(colsum_compensation)) colsum_compensation = 0;  // an inf in dy: keep inf, not inf - inf = NaN
        colsum = total;
      }
      if (epilogue_out != nullptr) {
#pragma unroll
        for (int j = 0; j < kRowUnroll; ++j) {
          if (row0 + j >= rows) break;
          const int64_t index = (stage + row0 + j) * n_cols + col;
          acc lowrank = 0;
#pragma unroll
          for (int k = 0; k < R; ++k) lowrank += w_stage[row0 + j][k] * a_col[k];
          const acc lowrank_masked = dropout ? (lowrank * keep[j]) * keep_scale : lowrank;
          epilogue_out[index] = from_acc<T>(to_acc(epilogue_out[index]) + epilogue_scale * lowrank_masked);
        }
      }
    }
  }

  if (!active) return;
  if (reduce) {
    acc* partial = static_cast<acc*>(args.partial);
#pragma unroll
    for (int k = 0; k < R; ++k) {
      if (k < r) partial[(static_cast<int64_t>(blockIdx.y) * r + k) * n_cols + col] = sums[k];
    }
  }
  if (column_sum) static_cast<acc*>(args.partial_colsum)[static_cast<int64_t>(blockIdx.y) * n_cols + col] = colsum;
}

template <typename T>
__global__ void sum_partials_kernel(const acc_t<T>* __restrict__ partial, int splits, int64_t m, acc_t<T> scale,
                                    T* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m; i += stride) {
    acc_t<T> total = 0;
    for (int s = 0; s < splits; ++s) total += partial[s * m + i];
    out[i] = from_acc<T>(scale * total);
  }
}

// Calls fn(kernel) with the token_reduce_kernel instantiation for dtype and rank r: the rank rounded up to a
// compiled size, since the per-thread accumulators are registers and R must be a constant.
template <typename Fn>
cudaError_t with_token_reduce_kernel(DType dtype, int r, Fn&& fn) {
  return dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    if (r <= 8) return fn(token_reduce_kernel<T, 8>);
    if (r <= 16) return fn(token_reduce_kernel<T, 16>);
    if (r <= 32) return fn(token_reduce_kernel<T, 32>);
    return fn(token_reduce_kernel<T, 64>);
  });
}


// ---------------------------------------------------------------------------------------------------------------
// Paper mode's generation (see launch_prepare in kernels.cuh): A^T and B are both W0 [theta_a; theta_b]^T row by row
// ---------------------------------------------------------------------------------------------------------------

constexpr int kPrepareWarps = 8;                   // warps per row of W0: they split its columns
constexpr int64_t kPrepareThetaElements = 24576;   // 2r * d: 96 KiB of float32 theta, read from L1

// One block per row of W0, its 8 warps splitting the columns: d blocks fill the machine and each thread walks only
// d / 256 dependent steps (a warp per row exposed its load latency, benchmarks/NOTES.md); theta stays in L1/L2.
// At most 64 registers, so that 4 blocks fit on a multiprocessor.
template <typename TW, typename TT, typename TO, int R2>
__global__ void __launch_bounds__(kPrepareWarps * 32, 4) prepare_kernel(const TW* __restrict__ weight,
                                                                     const TT* __restrict__ theta_a,
                                                                     const TT* __restrict__ theta_b, int64_t d, int r,
                                                                     TO* __restrict__ weight_out,
                                                                     TO* __restrict__ lora_a,
                                                                     TO* __restrict__ lora_b) {
  using acc = acc_t<TW>;
  __shared__ acc warp_sums[kPrepareWarps][R2];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t row = blockIdx.x;
  acc sums[R2];  // [0, r): row `row` of A^T, [r, 2r): row `row` of B; the rest stays zero
#pragma unroll
  for (int k = 0; k < R2; ++k) sums[k] = 0;
  const TW* w_row = weight + row * d;
  for (int64_t c = threadIdx.x; c < d; c += kPrepareWarps * 32) {
    const acc w = to_acc(w_row[c]);
    if (weight_out != nullptr) weight_out[row * d + c] = from_acc<TO>(w);
#pragma unroll
    for (int k = 0; k < R2; ++k) {
      if (k < 2 * r) sums[k] += static_cast<acc>(to_acc(k < r ? theta_a[k * d + c] : theta_b[(k - r) * d + c])) * w;
    }
  }
#pragma unroll
  for (int k = 0; k < R2; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) sums[k] += __shfl_down_sync(0xffffffffu, sums[k], offset);
    if (lane == 0) warp_sums[warp][k] = sums[k];
  }
  __syncthreads();
  if (threadIdx.x < 2 * r) {  // thread k sums dot product k over the warps, in a fixed order (deterministic)
    const int k = threadIdx.x;
    acc total = 0;
#pragma unroll
    for (int w = 0; w < kPrepareWarps; ++w) total += warp_sums[w][k];
    if (k < r) {
      lora_a[k * d + row] = from_acc<TO>(total);
    } else {
      lora_b[row * r + (k - r)] = from_acc<TO>(total);
    }
  }
}

template <typename TW, typename TT, typename TO>
cudaError_t launch_prepare_typed(const void* weight, const void* theta_a, const void* theta_b, int64_t d, int r,
                                 void* weight_out, void* lora_a, void* lora_b, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(d);
  auto run = [&](auto kernel) {
    kernel<<<blocks, kPrepareWarps * 32, 0, stream>>>(
        static_cast<const TW*>(weight), static_cast<const TT*>(theta_a), static_cast<const TT*>(theta_b), d, r,
        static_cast<TO*>(weight_out), static_cast<TO*>(lora_a), static_cast<TO*>(lora_b));
    return cudaGetLastError();
  };
  if (2 * r <= 16) return run(prepare_kernel<TW, TT, TO, 16>);
  return run(prepare_kernel<TW, TT, TO, 32>);
}

// ---------------------------------------------------------------------------------------------------------------
// Both modes' generation for the half-precision layers the row kernel does not take, on tensor cores (see
// launch_tiled_prepare in kernels.cuh). Every product the generation needs is a reduction of W0 against theta,
// along one of W0's two axes (docs/design.md §4):
//   along a row    R[i, n] = sum_j W0[i, j] theta_r[n, j]   paper: theta_r = [theta_a; theta_b] (R = [A^T | B])
//                                                           general: theta_r = theta_b (R = B)
//   along a column C[k, j] = sum_i theta_a[k, i] W0[i, j]   general only (C = A)
// A block owns a rectangle of W0, rows [row0, row0 + BM) x one strip of columns, and walks it in 64 x 64 tiles,
// copied asynchronously a few tiles ahead: it reads each tile once (writing its rounding, the weight the frozen
// GEMM uses), keeps it in shared memory as 16-bit values, and feeds both reductions from there with WMMA (16-bit
// products, float32 sums). R is summed over the strip in registers and written once per block; C is summed over
// the block's rows per column tile. Blocks of other strips (for R) and of other row ranges (for C) write float32
// partial sums, which finish_generation_kernel adds up in a fixed order: the result is deterministic.
// ---------------------------------------------------------------------------------------------------------------

constexpr int kTiledPrepareThreads = 256;  // 8 warps
constexpr int kTile = 64;                  // W0 tile: kTile x kTile
constexpr int kTilePitch = kTile + 8;      // 16-bit tiles' row pitch (a multiple of 8, as WMMA asks; fewer conflicts)
constexpr int kStages = 3;                 // tiles being loaded while one is multiplied: 2 in flight per block
constexpr int kPaperBlockRows = 64;        // rows per block: paper mode writes no column partials
constexpr int kGeneralBlockRows = 256;     // general mode: each row block writes an (r, d_in) partial of C

struct TiledPrepareArgs {  // launch_tiled_prepare's arguments, as the kernel reads them
  const void* weight;
  const void* theta_a;
  const void* theta_b;
  int64_t d_out, d_in;   // d_in a multiple of 8, W0 and the copied theta 16-byte aligned: whole 16-byte copies
  int r;
  int64_t strip_cols;    // columns per strip, a multiple of kTile
  void* weight_out;      // W0 rounded, or null
  float* row_partial;    // (column strips, d_out, n_row) with n_row = 2r (paper) or r (general)
  float* column_partial; // (row blocks, r, d_in), general mode only
};

// An asynchronous 16-byte copy from global to shared memory (sm_80), zeros where `inside` is false.
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, bool inside) {
#if __CUDA_ARCH__ >= 800
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(inside ? 16 : 0));
#endif
}
__device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int pending>
__device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// 8 consecutive values rounded to T, as one Group<T> (16 bytes for the 16-bit types): the tiled pass's unit of
// rounding and storing.
template <typename T, typename TS>
__device__ __forceinline__ Group<T> round_group(const TS* values) {
  Group<T> out;
#pragma unroll
  for (int k = 0; k < kDropoutGroup; ++k) out.v[k] = from_acc<T>(to_acc(values[k]));
  return out;
}

// The shared memory of one block, carved from the dynamic allocation: the raw stages (W0 and theta_r tiles in
// their own types, as copied), the 16-bit tiles WMMA reads, this block's rows of theta_a (general mode), and one
// float fragment per warp for stores.
template <typename TW, typename TT, typename T, int NR, int NC, int BM>
struct TiledPrepareShared {  // each member aligned for 16-byte copies and WMMA's 32-byte pointers
  alignas(128) TW w_raw[kStages][kTile][kTile];
  alignas(128) TT theta_raw[kStages][NR][kTile];
  alignas(128) T w_tile[kTile][kTilePitch];
  alignas(128) T theta_row[NR][kTilePitch];
  alignas(128) T theta_col[NC > 0 ? NC : 1][BM + 8];
  alignas(128) float scratch[kTiledPrepareThreads / 32][16][16];
};

// T: the 16-bit type of the products and outputs; TW, TT: the types of W0 and theta (float32 masters, or T);
// NR: the row-reduction width 2r or r rounded up to 16; NC: the column reduction's (0 in paper mode); BM: rows per
// block (paper mode has no column partials, so small blocks; general mode needs tall ones to keep them few).
// The tiles in order: column tile by column tile, each as BM / 64 row tiles, copied kStages - 1 tiles ahead.
template <typename TW, typename TT, typename T, int NR, int NC, int BM>
__global__ void __launch_bounds__(kTiledPrepareThreads, 2) tiled_prepare_kernel(TiledPrepareArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // a build without sm_80 code, run on a newer GPU from older PTX: fail loudly, never write nothing
#elif defined(__CUDA_ARCH__)
  using namespace nvcuda;
  constexpr bool kPaper = NC == 0;
  constexpr int kWarps = kTiledPrepareThreads / 32;
  constexpr int kRowTiles = BM / kTile;
  constexpr int kRowFragments = (BM / 16) * (NR / 16);  // R's accumulators over the warps
  constexpr int kRowFragmentsPerWarp = (kRowFragments + kWarps - 1) / kWarps;
  constexpr int kColumnFragments = (NC / 16) * (kTile / 16);  // C's, per column tile
  static_assert(kColumnFragments <= kWarps, "one column fragment per warp at most");
  constexpr int kWChunk = 16 / sizeof(TW), kThetaChunk = 16 / sizeof(TT);  // elements per 16-byte copy
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  auto& sh = *reinterpret_cast<TiledPrepareShared<TW, TT, T, NR, NC, BM>*>(shared_bytes);

  const TW* weight = static_cast<const TW*>(args.weight);
  const TT* theta_a = static_cast<const TT*>(args.theta_a);
  const TT* theta_b = static_cast<const TT*>(args.theta_b);
  T* weight_out = static_cast<T*>(args.weight_out);
  const int64_t d_out = args.d_out, d_in = args.d_in;
  const int r = args.r, n_row = kPaper ? 2 * r : r;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t col_begin = static_cast<int64_t>(blockIdx.x) * args.strip_cols;
  const int64_t col_end = min_int64(d_in, col_begin + args.strip_cols);  // a multiple of 8
  const int n_tiles = static_cast<int>(ceil_div(col_end - col_begin, kTile)) * kRowTiles;

  // Copies tile `tile` (and, at a column tile's first row tile, its theta_r) into stage `stage`; zeros outside W0.
  auto copy_tile = [&](int tile, int stage) {
    const int64_t col0 = col_begin + (tile / kRowTiles) * kTile, tile_row0 = row0 + (tile % kRowTiles) * kTile;
    for (int chunk = threadIdx.x; chunk < kTile * kTile / kWChunk; chunk += kTiledPrepareThreads) {
      const int row = chunk / (kTile / kWChunk), col = (chunk % (kTile / kWChunk)) * kWChunk;
      const bool inside = tile_row0 + row < d_out && col0 + col < col_end;
      copy_async_16(&sh.w_raw[stage][row][col], inside ? weight + (tile_row0 + row) * d_in + col0 + col : weight,
                    inside);
    }
    if (tile % kRowTiles == 0) {
      for (int chunk = threadIdx.x; chunk < NR * kTile / kThetaChunk; chunk += kTiledPrepareThreads) {
        const int n = chunk / (kTile / kThetaChunk), col = (chunk % (kTile / kThetaChunk)) * kThetaChunk;
        const bool inside = n < n_row && col0 + col < col_end;
        const TT* source = kPaper && n >= r ? theta_b + (n - r) * d_in : (kPaper ? theta_a : theta_b) + n * d_in;
        copy_async_16(&sh.theta_raw[stage][n][col], inside ? source + col0 + col : theta_b, inside);
      }
    }
  };
#pragma unroll
  for (int stage = 0; stage < kStages - 1; ++stage) {
    if (stage < n_tiles) copy_tile(stage, stage);
    copy_async_commit();
  }
  if constexpr (NC > 0) {  // theta_col[k][i] = theta_a[k, row0 + i]: theta_a is (r, d_out) in general mode
    for (int e = threadIdx.x; e < NC * BM; e += kTiledPrepareThreads) {
      const int k = e / BM, i = e % BM;
      const bool inside = k < r && row0 + i < d_out;
      sh.theta_col[k][i] = from_acc<T>(inside ? to_acc(theta_a[k * d_out + row0 + i]) : 0.0f);
    }
  }
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> row_sums[kRowFragmentsPerWarp];
#pragma unroll
  for (int f = 0; f < kRowFragmentsPerWarp; ++f) wmma::fill_fragment(row_sums[f], 0.0f);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> column_sums;

  // This thread's 8 columns of the tile (one Group<T>: 16 bytes of T), in rows group_row + 32n
  constexpr int kGroupsPerRow = kTile / kDropoutGroup, kGroupRowStep = kTiledPrepareThreads / kGroupsPerRow;
  const int group_col = (threadIdx.x % kGroupsPerRow) * kDropoutGroup, group_row = threadIdx.x / kGroupsPerRow;
  for (int tile = 0; tile < n_tiles; ++tile) {
    const int sub = tile % kRowTiles, stage = tile % kStages;
    const int64_t col0 = col_begin + (tile / kRowTiles) * kTile, tile_row0 = row0 + sub * kTile;
    if (tile + kStages - 1 < n_tiles) copy_tile(tile + kStages - 1, (tile + kStages - 1) % kStages);
    copy_async_commit();
    copy_async_wait<kStages - 1>();  // this tile's copies have landed
    __syncthreads();                 // ... for every thread; and the last tile's multiplications are done
    // Round the tile to T, 8 consecutive elements per thread and step: into the 16-bit tile and out to weight_out
    // (one 16-byte store each)
    const int rows_inside = static_cast<int>(min_int64(kTile, d_out - tile_row0));
    const bool columns_inside = col0 + group_col < col_end;  // the 8 columns are all inside or all outside
    T* out = weight_out == nullptr ? nullptr : weight_out + (tile_row0 + group_row) * d_in + col0 + group_col;
#pragma unroll
    for (int n = 0; n < kTile / kGroupRowStep; ++n) {
      const int row = group_row + n * kGroupRowStep;
      const Group<T> rounded = round_group<T>(&sh.w_raw[stage][row][group_col]);
      if (out != nullptr && columns_inside && row < rows_inside) {
        *reinterpret_cast<Group<T>*>(out + static_cast<int64_t>(n) * kGroupRowStep * d_in) = rounded;
      }
      *reinterpret_cast<Group<T>*>(&sh.w_tile[row][group_col]) = rounded;
    }
    if (sub == 0) {
      for (int row = group_row; row < NR; row += kGroupRowStep) {
        *reinterpret_cast<Group<T>*>(&sh.theta_row[row][group_col]) = round_group<T>(&sh.theta_raw[stage][row][group_col]);
      }
      wmma::fill_fragment(column_sums, 0.0f);
    }
    __syncthreads();
#pragma unroll
    for (int f = 0; f < kRowFragmentsPerWarp; ++f) {  // R += tile rows x theta_r^T
      const int fragment = warp + f * kWarps;
      const int m = fragment / (NR / 16), n = fragment % (NR / 16);
      if (fragment >= kRowFragments || (m * 16) / kTile != sub) continue;
#pragma unroll
      for (int kk = 0; kk < kTile; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, &sh.w_tile[(m * 16) % kTile][kk], kTilePitch);
        wmma::load_matrix_sync(b, &sh.theta_row[n * 16][kk], kTilePitch);
        wmma::mma_sync(row_sums[f], a, b, row_sums[f]);
      }
    }
    if constexpr (NC > 0) {  // C += theta_a[:, tile rows] x tile; after the last row tile, this block's part of C
      if (warp < kColumnFragments) {
        const int k0 = (warp / (kTile / 16)) * 16, c0 = (warp % (kTile / 16)) * 16;
#pragma unroll
        for (int kk = 0; kk < kTile; kk += 16) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, &sh.theta_col[k0][sub * kTile + kk], BM + 8);
          wmma::load_matrix_sync(b, &sh.w_tile[kk][c0], kTilePitch);
          wmma::mma_sync(column_sums, a, b, column_sums);
        }
        if (sub == kRowTiles - 1) {
          wmma::store_matrix_sync(&sh.scratch[warp][0][0], column_sums, 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += 32) {
            const int k = k0 + e / 16;
            const int64_t jj = col0 + c0 + e % 16;
            if (k < r && jj < col_end) {
              args.column_partial[(blockIdx.y * static_cast<int64_t>(r) + k) * d_in + jj] = sh.scratch[warp][e / 16][e % 16];
            }
          }
          __syncwarp();
        }
      }
    }
  }
  copy_async_wait<0>();  // no copy outlives the block (the last stages' groups are empty)
#pragma unroll
  for (int f = 0; f < kRowFragmentsPerWarp; ++f) {  // this strip's part of R for the block's rows
    const int fragment = warp + f * kWarps;
    if (fragment >= kRowFragments) continue;
    const int m = fragment / (NR / 16), n0 = (fragment % (NR / 16)) * 16;
    wmma::store_matrix_sync(&sh.scratch[warp][0][0], row_sums[f], 16, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int64_t i = row0 + m * 16 + e / 16;
      const int n = n0 + e % 16;
      if (i < d_out && n < n_row) args.row_partial[(blockIdx.x * d_out + i) * n_row + n] = sh.scratch[warp][e / 16][e % 16];
    }
    __syncwarp();
  }
#endif
}

// A and B from the partial sums, each element summed over the splits in order. A (r, d_in): general mode's C, or
// paper mode's first r columns of R transposed; B (d_out, r): R's last r columns.
template <typename T>
__global__ void finish_generation_kernel(const float* __restrict__ row_partial, int row_splits,
                                         const float* __restrict__ column_partial, int column_splits, int64_t d_out,
                                         int64_t d_in, int r, bool paper, T* __restrict__ lora_a,
                                         T* __restrict__ lora_b) {
  const int n_row = paper ? 2 * r : r;
  const int64_t a_size = static_cast<int64_t>(r) * d_in, total = a_size + d_out * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += stride) {
    float sum = 0.0f;
    if (e < a_size && paper) {  // A[k, j] = R[j, k]: consecutive threads read consecutive k
      const int64_t j = e / r, k = e % r;
      for (int s = 0; s < row_splits; ++s) sum += row_partial[(s * d_out + j) * n_row + k];
      lora_a[k * d_in + j] = from_acc<T>(sum);
    } else if (e < a_size) {
      const int64_t k = e / d_in, j = e % d_in;
      for (int s = 0; s < column_splits; ++s) sum += column_partial[(s * static_cast<int64_t>(r) + k) * d_in + j];
      lora_a[e] = from_acc<T>(sum);
    } else {
      const int64_t i = (e - a_size) / r, k = (e - a_size) % r;
      for (int s = 0; s < row_splits; ++s) sum += row_partial[(s * d_out + i) * n_row + (paper ? r + k : k)];
      lora_b[e - a_size] = from_acc<T>(sum);
    }
  }
}

// What the launches need to know of a device, asked of the driver once per device (std::call_once: the first call
// of each device does the queries, later calls only read): the multiprocessor count that sizes the grids, and for
// the tiled pass whether the build has sm_80 code for the device (WMMA on 16-bit types; a build without it would run
// the pass from older PTX, where its body is a trap) and the shared memory a block may opt in to (sm_86 and sm_89
// allow 99 KiB, less than the largest instantiation's 110 KiB).
struct DeviceFacts {
  int multiprocessors = 132;  // a guess where the query fails: it only changes the grid shape
  bool has_sm80_code = false;
  int64_t shared_bytes_per_block = 0;
};

DeviceFacts query_device_facts(int device) {
  DeviceFacts facts;
  int previous = 0, value = 0;
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device) == cudaSuccess && value > 0) {
    facts.multiprocessors = value;
  }
  if (cudaDeviceGetAttribute(&value, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess) {
    facts.shared_bytes_per_block = value;
  }
  cudaFuncAttributes attributes;
  if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device) == cudaSuccess) {
    // ptxVersion: the virtual architecture of the code that runs on this device (as CUB's PtxVersion reads it)
    if (cudaFuncGetAttributes(&attributes, tiled_prepare_kernel<float, float, __half, 16, 0, kPaperBlockRows>) ==
        cudaSuccess) {
      facts.has_sm80_code = attributes.ptxVersion >= 80;
    }
    (void)cudaSetDevice(previous);
  }
  (void)cudaGetLastError();  // an error here only means "not known": clear it
  return facts;
}

const DeviceFacts& device_facts(int device) {
  constexpr int kMaxDevices = 64;
  static std::once_flag once[kMaxDevices];
  static DeviceFacts facts[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) {  // beyond the table: asked on every call
    thread_local DeviceFacts unlisted;
    unlisted = query_device_facts(device);
    return unlisted;
  }
  std::call_once(once[device], [device] { facts[device] = query_device_facts(device); });
  return facts[device];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

cudaError_t launch_dropout_keep_mask(const int64_t* seed, int64_t n_rows, int64_t n_cols, uint32_t threshold,
                                     bool* out, cudaStream_t stream) {
  const int64_t n_groups = n_rows * ceil_div(n_cols, kDropoutGroup);
  if (n_groups == 0) return cudaSuccess;
  const bool vectorized = n_cols % kDropoutGroup == 0 && group_aligned<bool>(out);
  dropout_keep_mask_kernel<<<elementwise_blocks(n_groups), kElementwiseThreads, 0, stream>>>(
      seed, n_rows, n_cols, threshold, vectorized, out);
  return cudaGetLastError();
}

cudaError_t launch_dropout_scale(DType dtype, const void* src, void* dst, int64_t n_rows, int64_t n_cols,
                                 const int64_t* seed, uint32_t threshold, double keep_scale, bool accumulate,
                                 cudaStream_t stream) {
  const int64_t n_groups = n_rows * ceil_div(n_cols, kDropoutGroup);
  if (n_groups == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    const bool vectorized = n_cols % kDropoutGroup == 0 && group_aligned<T>(src) && group_aligned<T>(dst);
    dropout_scale_kernel<T><<<elementwise_blocks(n_groups), kElementwiseThreads, 0, stream>>>(
        static_cast<const T*>(src), static_cast<T*>(dst), n_rows, n_cols, seed, threshold,
        static_cast<acc_t<T>>(keep_scale), accumulate, vectorized);
    return cudaGetLastError();
  });
}

int token_reduce_splits(DType dtype, int r, int64_t n_rows, int64_t n_cols, int device) {
  // As many blocks as can be resident at once (one wave: no tail of half-empty SMs), each split at least 64 rows
  // long (fewer splits, less workspace to add up).
  int blocks_per_sm = 1;
  (void)with_token_reduce_kernel(dtype, r, [&](auto kernel) {
    return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kReduceThreads, 0);
  });
  const int64_t resident = std::max(1, blocks_per_sm) * static_cast<int64_t>(device_facts(device).multiprocessors);
  const int64_t column_blocks = ceil_div(n_cols, kReduceThreads);
  const int64_t wanted = std::max<int64_t>(1, resident / column_blocks);
  const int64_t most_useful = std::max<int64_t>(1, ceil_div(n_rows, 64));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({wanted, most_useful, 65535})));
}

cudaError_t launch_token_reduce(DType dtype, const TokenReduceArgs& args, cudaStream_t stream) {
  if (args.r < 1 || args.r > kMaxFusedRank) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n_cols, kReduceThreads)), static_cast<unsigned>(args.splits));
  return with_token_reduce_kernel(dtype, args.r, [&](auto kernel) {
    kernel<<<grid, kReduceThreads, 0, stream>>>(args);
    return cudaGetLastError();
  });
}

cudaError_t launch_sum_partials(DType dtype, const void* partial, int splits, int64_t m, double scale, void* out,
                                cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto type_tag) {
    using T = decltype(type_tag);
    sum_partials_kernel<T><<<elementwise_blocks(m), kElementwiseThreads, 0, stream>>>(
        static_cast<const acc_t<T>*>(partial), splits, m, static_cast<acc_t<T>>(scale), static_cast<T*>(out));
    return cudaGetLastError();
  });
}

bool prepare_supported(DType weight_dtype, DType theta_dtype, DType out_dtype, int r, int64_t d) {
  if (r < 1 || 2 * r > 32 || 2 * static_cast<int64_t>(r) * d > kPrepareThetaElements) return false;
  if (d > (int64_t(1) << 31) - 1) return false;  // one block per row
  // the pairs that occur: float32 masters (weight and theta) of any output dtype, a half-precision layer with
  // float32 generators, or one dtype throughout
  const bool float_masters = weight_dtype == DType::kFloat && theta_dtype == DType::kFloat && out_dtype != DType::kDouble;
  const bool half_layer = weight_dtype == out_dtype && theta_dtype == DType::kFloat &&
                          (out_dtype == DType::kHalf || out_dtype == DType::kBFloat16);
  const bool one_dtype = weight_dtype == out_dtype && theta_dtype == out_dtype;
  return float_masters || half_layer || one_dtype;
}

cudaError_t launch_prepare(DType weight_dtype, DType theta_dtype, DType out_dtype, const void* weight,
                           const void* theta_a, const void* theta_b, int64_t d, int r, void* weight_out, void* lora_a,
                           void* lora_b, cudaStream_t stream) {
  if (!prepare_supported(weight_dtype, theta_dtype, out_dtype, r, d)) return cudaErrorInvalidValue;
  if (d == 0) return cudaSuccess;
  if (weight_dtype == DType::kFloat && theta_dtype == DType::kFloat) {
    return dispatch_dtype(out_dtype, [&](auto out_tag) {
      using TO = decltype(out_tag);
      return launch_prepare_typed<float, float, TO>(weight, theta_a, theta_b, d, r, weight_out, lora_a, lora_b, stream);
    });
  }
  if (theta_dtype == DType::kFloat && out_dtype == DType::kHalf) {
    return launch_prepare_typed<__half, float, __half>(weight, theta_a, theta_b, d, r, weight_out, lora_a, lora_b, stream);
  }
  if (theta_dtype == DType::kFloat && out_dtype == DType::kBFloat16) {
    return launch_prepare_typed<__nv_bfloat16, float, __nv_bfloat16>(weight, theta_a, theta_b, d, r, weight_out, lora_a,
                                                                    lora_b, stream);
  }
  return dispatch_dtype(out_dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_prepare_typed<T, T, T>(weight, theta_a, theta_b, d, r, weight_out, lora_a, lora_b, stream);
  });
}

namespace {

// Calls fn(kernel, layout, out_tag) with the instantiation of tiled_prepare_kernel that takes these dtypes and this
// width of R (2r in paper mode, r in general mode): the one place that picks it, for the launch and for the
// shared-memory check. layout is a null TiledPrepareShared pointer (its type is the block's shared memory), out_tag a
// value of the output type.
template <typename Fn>
cudaError_t with_tiled_prepare_kernel(DType weight_dtype, DType theta_dtype, DType out_dtype, bool paper, int n_row,
                                      Fn&& fn) {
  auto pick = [&](auto weight_tag, auto theta_tag, auto out_tag) {
    using TW = decltype(weight_tag);
    using TT = decltype(theta_tag);
    using T = decltype(out_tag);
    if (paper && n_row <= 16) {
      return fn(tiled_prepare_kernel<TW, TT, T, 16, 0, kPaperBlockRows>,
                static_cast<TiledPrepareShared<TW, TT, T, 16, 0, kPaperBlockRows>*>(nullptr), out_tag);
    }
    if (paper) {
      return fn(tiled_prepare_kernel<TW, TT, T, 32, 0, kPaperBlockRows>,
                static_cast<TiledPrepareShared<TW, TT, T, 32, 0, kPaperBlockRows>*>(nullptr), out_tag);
    }
    if (n_row <= 16) {
      return fn(tiled_prepare_kernel<TW, TT, T, 16, 16, kGeneralBlockRows>,
                static_cast<TiledPrepareShared<TW, TT, T, 16, 16, kGeneralBlockRows>*>(nullptr), out_tag);
    }
    return fn(tiled_prepare_kernel<TW, TT, T, 32, 32, kGeneralBlockRows>,
              static_cast<TiledPrepareShared<TW, TT, T, 32, 32, kGeneralBlockRows>*>(nullptr), out_tag);
  };
  auto typed = [&](auto out_tag) {  // W0 and theta each float32 masters or the output type
    using T = decltype(out_tag);
    const bool float_weight = weight_dtype == DType::kFloat, float_theta = theta_dtype == DType::kFloat;
    if (float_weight && float_theta) return pick(float{}, float{}, out_tag);
    if (float_weight) return pick(float{}, T{}, out_tag);
    if (float_theta) return pick(T{}, float{}, out_tag);
    return pick(T{}, T{}, out_tag);
  };
  if (out_dtype == DType::kHalf) return typed(__half{});
  if (out_dtype == DType::kBFloat16) return typed(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

}  // namespace

bool tiled_prepare_supported(DType weight_dtype, DType theta_dtype, DType out_dtype, bool paper, int r,
                             int64_t d_out, int64_t d_in, int device) {
  // 16-bit products: for half-precision layers only (float32 and float64 layers keep cuBLAS's precision)
  if (out_dtype != DType::kHalf && out_dtype != DType::kBFloat16) return false;
  if (weight_dtype != out_dtype && weight_dtype != DType::kFloat) return false;
  if (theta_dtype != out_dtype && theta_dtype != DType::kFloat) return false;
  if (r < 1 || (paper ? 2 * r : r) > 32 || d_out < 1 || d_in < 1) return false;
  if (d_in % 8 != 0) return false;  // rows of whole 16-byte copies
  if (ceil_div(d_out, paper ? kPaperBlockRows : kGeneralBlockRows) > 65535) return false;  // row blocks: gridDim.y
  int64_t shared_bytes = 0;
  (void)with_tiled_prepare_kernel(weight_dtype, theta_dtype, out_dtype, paper, paper ? 2 * r : r,
                                  [&](auto /*kernel*/, auto* layout, auto /*out_tag*/) {
                                    shared_bytes = sizeof(*layout);
                                    return cudaSuccess;
                                  });
  const DeviceFacts& facts = device_facts(device);
  return facts.has_sm80_code && shared_bytes <= facts.shared_bytes_per_block;
}

TiledPrepareGrid tiled_prepare_grid(bool paper, int64_t d_out, int64_t d_in, int device) {
  // One wave of two blocks per multiprocessor (the kernel's launch bounds); paper mode splits rows finely (it has
  // no column partials), general mode coarsely (each row block writes an r x d_in partial of C), and the column
  // strips make up the rest.
  TiledPrepareGrid grid;
  grid.row_blocks = ceil_div(d_out, paper ? kPaperBlockRows : kGeneralBlockRows);
  const int64_t tiles_per_row = ceil_div(d_in, kTile);
  const int64_t wanted = 2 * static_cast<int64_t>(device_facts(device).multiprocessors);
  const int64_t strips = std::max<int64_t>(1, std::min<int64_t>(tiles_per_row, wanted / grid.row_blocks));
  grid.strip_cols = ceil_div(tiles_per_row, strips) * kTile;
  grid.column_strips = ceil_div(d_in, grid.strip_cols);
  return grid;
}

cudaError_t launch_tiled_prepare(DType weight_dtype, DType theta_dtype, DType out_dtype, bool paper,
                                 const void* weight, const void* theta_a, const void* theta_b, int64_t d_out,
                                 int64_t d_in, int r, const TiledPrepareGrid& grid, float* row_partial,
                                 float* column_partial, void* weight_out, void* lora_a, void* lora_b,
                                 cudaStream_t stream) {
  const TiledPrepareArgs args{weight, theta_a, theta_b, d_out, d_in, r, grid.strip_cols, weight_out, row_partial,
                              column_partial};
  const dim3 blocks(static_cast<unsigned>(grid.column_strips), static_cast<unsigned>(grid.row_blocks));
  auto launch = [&](auto kernel, auto* layout, auto out_tag) {
    using T = decltype(out_tag);
    constexpr int kBytes = static_cast<int>(sizeof(*layout));  // above the 48 KiB of a plain launch
    static std::atomic<uint64_t> devices_allowed{0};  // per instantiation: devices where kBytes is allowed
    int device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess) return status;
    const uint64_t bit = device < 64 ? uint64_t(1) << device : 0;
    if (bit == 0 || (devices_allowed.load() & bit) == 0) {
      status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
      if (status != cudaSuccess) return status;
      // all of the unified L1 as shared memory, so that two blocks fit on a multiprocessor (the copies bypass L1)
      status = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                    cudaSharedmemCarveoutMaxShared);
      if (status != cudaSuccess) return status;
      devices_allowed.fetch_or(bit);
    }
    kernel<<<blocks, kTiledPrepareThreads, kBytes, stream>>>(args);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    const int64_t outputs = static_cast<int64_t>(r) * (d_in + d_out);
    finish_generation_kernel<T><<<elementwise_blocks(outputs), kElementwiseThreads, 0, stream>>>(
        row_partial, grid.column_strips, column_partial, grid.row_blocks, d_out, d_in, r, paper,
        static_cast<T*>(lora_a), static_cast<T*>(lora_b));
    return cudaGetLastError();
  };
  return with_tiled_prepare_kernel(weight_dtype, theta_dtype, out_dtype, paper, paper ? 2 * r : r, launch);
}

}  // namespace cuda
}  // namespace condlora
