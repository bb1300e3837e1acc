// Philox4x32-10 dropout mask, shared by the CPU kernels (host code) and the CUDA kernels (device code).
//
// Bit for bit the mask of condlora_kernels/reference.py (`philox_uint32_x4`, `dropout_draws`, `dropout_keep_mask`):
// element (row, col) of a (., n_cols) matrix draws 16 bits, half-word col % 8 of the Philox call at
//
//     counter = (c_lo, c_hi, 0, 0) with c = row * ceil(n_cols / 8) + col / 8,   key = (seed_lo, seed_hi)
//
// in the order (w0 lo, w0 hi, w1 lo, w1 hi, w2 lo, w2 hi, w3 lo, w3 hi). It is kept iff draw >= t = round(p * 2^16),
// and x_hat = x * keep / (1 - t / 2^16). One Philox call serves the 8 neighbouring elements of a row, which is why
// the kernels draw a whole group of 8 columns at once. The mask is a pure function of (seed, row, col): the backward
// regenerates it instead of storing it, and every backend (reference, Triton, C++, CUDA) draws the same one.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define CONDLORA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CONDLORA_HOST_DEVICE inline
#endif

namespace condlora {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
constexpr int kDropoutGroup = 8;  // elements of a row per Philox call (16 bits each)

// The four 32-bit words of Philox4x32-10 at counter (counter_lo, counter_hi, 0, 0), key (seed_lo, seed_hi).
// A 32x32->64-bit product gives both halves of each round's multiply (one IMAD.WIDE on the GPU).
struct PhiloxWords {
  uint32_t w[4];
};

CONDLORA_HOST_DEVICE PhiloxWords philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t next_c0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next_c2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next_c0;
    c2 = next_c2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  return PhiloxWords{{c0, c1, c2, c3}};
}

// The dropout parameters every kernel needs: keep iff draw >= threshold, kept values scaled by keep_scale.
struct DropoutParams {
  uint32_t threshold = 0;   // t = round(p * 2^16), in [0, 2^16]
  double keep_scale = 1.0;  // 1 / (1 - t / 2^16): unbiased for the quantised p
};

// As reference.dropout_threshold / dropout_keep_scale. p * 2^16 is exact in double, and nearbyint rounds half to
// even (the default rounding mode), as Python's round does.
inline DropoutParams make_dropout_params(double p) {
  DropoutParams params;
  params.threshold = static_cast<uint32_t>(std::nearbyint(p * 65536.0));
  params.keep_scale = 1.0 / (1.0 - static_cast<double>(params.threshold) / 65536.0);
  return params;
}

// Philox counter of the group of 8 columns [8 * group, 8 * group + 8) of `row` in a (., n_cols) matrix.
CONDLORA_HOST_DEVICE uint64_t dropout_counter(int64_t row, int64_t group, int64_t n_cols) {
  const int64_t groups_per_row = (n_cols + kDropoutGroup - 1) / kDropoutGroup;
  return static_cast<uint64_t>(row * groups_per_row + group);
}

// Keep bits of the 8 elements of one group: bit j for column 8 * group + j (the draw's half-word j).
CONDLORA_HOST_DEVICE uint32_t dropout_keep_bits(uint64_t seed, uint64_t counter, uint32_t threshold) {
  const PhiloxWords words = philox4x32_10(seed, counter);
  uint32_t bits = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < kDropoutGroup; ++j) {
    const uint32_t draw = (words.w[j / 2] >> (16 * (j % 2))) & 0xFFFFu;
    bits |= static_cast<uint32_t>(draw >= threshold) << j;
  }
  return bits;
}

}  // namespace condlora
