// The vectorised row kernels of stream_tile.h: one query row of a tile at a time, compiled once
// per instruction set (SNCA_CLONES).
#include "stream_tile.h"

#include <cstring>

namespace snca_ext {
namespace cpu {
namespace {

// The row kernels below are inlined into each instruction-set clone (SNCA_CLONES), so each clone
// vectorises them for its own ISA instead of calling one baseline copy.
#if defined(__GNUC__)
#define SNCA_INLINE inline __attribute__((always_inline))
#define SNCA_LAMBDA_INLINE __attribute__((always_inline))
#else
#define SNCA_INLINE inline
#define SNCA_LAMBDA_INLINE
#endif

// expf via Cephes' range reduction and polynomial (about 1 ulp). std::exp is a library call
// that blocks vectorisation, and the exponentials are B * N of the op's work.
SNCA_INLINE float exp_poly(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float t = xc * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const int32_t n_int = t_bits - 0x4B400000;  // the integer sits in t's low mantissa bits
  float r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t scale_bits = (n_int + 127) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  // Below -87 the true value is under 1.3e-38: negligible next to the running max's exp(0) = 1.
  return x < -87.0f ? 0.0f : p * scale;
}
SNCA_INLINE double exp_poly(double x) { return std::exp(x); }

// Pass 1 over one query row of a tile: the tile's max over same-class and other-class rows.
template <typename acc_t>
SNCA_INLINE RowTileResult<acc_t> row_max(const acc_t* dot, const int64_t* bank_labels, int64_t label,
                                         int64_t self_col, int64_t n, acc_t inv_t) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_same[kLanes], max_other[kLanes];
  int32_t nan_same[kLanes], nan_other[kLanes], same_count[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    max_same[l] = max_other[l] = neg_inf;
    nan_same[l] = nan_other[l] = same_count[l] = 0;
  }
  auto step = [&](int64_t j, int64_t l) SNCA_LAMBDA_INLINE {
    const acc_t s = dot[j] * inv_t;
    const bool same = bank_labels[j] == label;
    const bool valid = j != self_col;
    // Each group's own NaN flag: a NaN makes only its group's lse NaN; the own row does not count.
    nan_same[l] |= static_cast<int32_t>(valid & same & (s != s));
    nan_other[l] |= static_cast<int32_t>(valid & !same & (s != s));
    same_count[l] += static_cast<int32_t>(valid & same);
    const acc_t s_same = (valid & same) ? s : neg_inf;
    const acc_t s_other = (valid & !same) ? s : neg_inf;
    max_same[l] = s_same > max_same[l] ? s_same : max_same[l];
    max_other[l] = s_other > max_other[l] ? s_other : max_other[l];
  };
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) step(j0 + l, l);
  }
  for (int64_t j = j0; j < n; ++j) step(j, 0);
  RowTileResult<acc_t> result{neg_inf, neg_inf, false, false, 0};
  for (int64_t l = 0; l < kLanes; ++l) {
    result.max_same = std::max(result.max_same, max_same[l]);
    result.max_other = std::max(result.max_other, max_other[l]);
    result.nan_same |= nan_same[l] != 0;
    result.nan_other |= nan_other[l] != 0;
    result.same_count += same_count[l];
  }
  return result;
}

// Pass 2: exp(s - max of its group), summed per group; when the weights are wanted they are
// written to p_same / p_other (zero outside the group) for the weighted-sum GEMM.
template <typename acc_t, bool kStoreWeights>
SNCA_INLINE void row_exp_sums(const acc_t* dot, const int64_t* bank_labels, int64_t label,
                              int64_t self_col, int64_t n, acc_t inv_t, acc_t max_same,
                              acc_t max_other, acc_t* sum_same_out, acc_t* sum_other_out,
                              acc_t* p_same, acc_t* p_other) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t sum_same[kLanes], sum_other[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) sum_same[l] = sum_other[l] = 0;
  auto step = [&](int64_t j, int64_t l) SNCA_LAMBDA_INLINE {
    const acc_t s = dot[j] * inv_t;
    const bool same = bank_labels[j] == label;
    const bool valid = (j != self_col) & (s > neg_inf);
    const acc_t e = exp_poly(s - (same ? max_same : max_other));
    const acc_t w_same = (valid & same) ? e : acc_t(0);
    const acc_t w_other = (valid & !same) ? e : acc_t(0);
    sum_same[l] += w_same;
    sum_other[l] += w_other;
    if constexpr (kStoreWeights) {
      p_same[j] = w_same;
      p_other[j] = w_other;
    }
  };
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) step(j0 + l, l);
  }
  for (int64_t j = j0; j < n; ++j) step(j, 0);
  acc_t total_same = 0, total_other = 0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total_same += sum_same[l];
    total_other += sum_other[l];
  }
  *sum_same_out = total_same;
  *sum_other_out = total_other;
}

template <typename acc_t>
SNCA_INLINE bool all_finite_impl(const acc_t* values, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t j0 = 0;
  for (; j0 + kLanes <= n; j0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += values[j0 + l] * acc_t(0);
  }
  for (int64_t j = j0; j < n; ++j) lanes[0] += values[j] * acc_t(0);
  acc_t total = 0;
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total == acc_t(0);
}

}  // namespace

SNCA_CLONES bool all_finite(const float* values, int64_t n) { return all_finite_impl(values, n); }
SNCA_CLONES bool all_finite(const double* values, int64_t n) { return all_finite_impl(values, n); }

#define SNCA_DEFINE_ROW_KERNELS(acc_t)                                                          \
  SNCA_CLONES RowTileResult<acc_t> row_max_##acc_t(const acc_t* dot, const int64_t* bl,          \
                                                   int64_t label, int64_t self_col, int64_t n,   \
                                                   acc_t inv_t) {                                \
    return row_max<acc_t>(dot, bl, label, self_col, n, inv_t);                                   \
  }                                                                                              \
  SNCA_CLONES void row_exp_sums_##acc_t(const acc_t* dot, const int64_t* bl, int64_t label,      \
                                        int64_t self_col, int64_t n, acc_t inv_t, acc_t ms,      \
                                        acc_t mo, acc_t* ss, acc_t* so, acc_t* ps, acc_t* po) {  \
    if (ps != nullptr) {                                                                         \
      row_exp_sums<acc_t, true>(dot, bl, label, self_col, n, inv_t, ms, mo, ss, so, ps, po);     \
    } else {                                                                                     \
      row_exp_sums<acc_t, false>(dot, bl, label, self_col, n, inv_t, ms, mo, ss, so, ps, po);    \
    }                                                                                            \
  }
SNCA_DEFINE_ROW_KERNELS(float)
SNCA_DEFINE_ROW_KERNELS(double)
#undef SNCA_DEFINE_ROW_KERNELS

}  // namespace cpu
}  // namespace snca_ext
