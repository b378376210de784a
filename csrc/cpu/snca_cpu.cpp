// CPU kernels of the fused SNCA op: one streaming pass over the bank in tiles of kTileRows rows.
//
// The bank is split into one contiguous run of tiles per worker thread (B = 256 queries are too
// few to parallelise over). Each worker keeps, per query, a running max and rescaled sum for the
// same-class and the other-class log-sum-exp (online softmax), optionally the rescaled
// softmax-weighted sums of bank rows (the one-pass gradient of README "How it works"), and optionally a
// candidate buffer for the top-k. The partials are merged in worker order at the end, so a result
// is deterministic for a given thread count. Extra memory is O(workers * (B * tile + B * D)).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../checks.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

namespace snca_ext {
namespace {

constexpr int64_t kTileRows = 512;
// Below one same-class entry in this many, the same-class weighted sum skips the dense GEMM.
constexpr int64_t kDenseSameRatio = 8;

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

template <typename acc_t>
struct RowTileResult {
  acc_t max_same, max_other;
  bool has_nan;
  int64_t same_count;  // same-class rows in the tile (own row excluded)
};

// The row loops keep kLanes independent partial results and combine them at the end: a single
// running sum or max is a loop-carried dependency that the compiler may not vectorise without
// -ffast-math, which would also drop the NaN checks. Bools are combined with & rather than &&:
// short-circuit control flow blocks vectorisation.
constexpr int64_t kLanes = 16;

// Pass 1 over one query row of a tile: the tile's max over same-class and other-class rows.
template <typename acc_t>
SNCA_INLINE RowTileResult<acc_t> row_max(const acc_t* dot, const int64_t* bank_labels, int64_t label,
                                         int64_t self_col, int64_t n, acc_t inv_t) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  acc_t max_same[kLanes], max_other[kLanes];
  int32_t has_nan[kLanes], same_count[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    max_same[l] = max_other[l] = neg_inf;
    has_nan[l] = same_count[l] = 0;
  }
  auto step = [&](int64_t j, int64_t l) SNCA_LAMBDA_INLINE {
    const acc_t s = dot[j] * inv_t;
    const bool same = bank_labels[j] == label;
    const bool valid = j != self_col;
    has_nan[l] |= static_cast<int32_t>(valid & (s != s));  // the own row does not count
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
  RowTileResult<acc_t> result{neg_inf, neg_inf, false, 0};
  for (int64_t l = 0; l < kLanes; ++l) {
    result.max_same = std::max(result.max_same, max_same[l]);
    result.max_other = std::max(result.max_other, max_other[l]);
    result.has_nan |= has_nan[l] != 0;
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

// Compiled once per instruction set and picked at load time (GCC function multiversioning), so
// one wheel is vectorised with AVX-512 or AVX2 where the processor has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SNCA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SNCA_CLONES
#endif

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

inline RowTileResult<float> row_max_dispatch(const float* d, const int64_t* bl, int64_t l,
                                             int64_t s, int64_t n, float t) {
  return row_max_float(d, bl, l, s, n, t);
}
inline RowTileResult<double> row_max_dispatch(const double* d, const int64_t* bl, int64_t l,
                                              int64_t s, int64_t n, double t) {
  return row_max_double(d, bl, l, s, n, t);
}
inline void row_exp_sums_dispatch(const float* d, const int64_t* bl, int64_t l, int64_t s,
                                  int64_t n, float t, float ms, float mo, float* ss, float* so,
                                  float* ps, float* po) {
  row_exp_sums_float(d, bl, l, s, n, t, ms, mo, ss, so, ps, po);
}
inline void row_exp_sums_dispatch(const double* d, const int64_t* bl, int64_t l, int64_t s,
                                  int64_t n, double t, double ms, double mo, double* ss,
                                  double* so, double* ps, double* po) {
  row_exp_sums_double(d, bl, l, s, n, t, ms, mo, ss, so, ps, po);
}

// Ranks candidates: larger value first, ties to the lower bank row, so every backend agrees.
template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t index;
  bool operator<(const Candidate& other) const {
    return value > other.value || (value == other.value && index < other.index);
  }
};

// Per-query top-k candidates of one worker. Rows arrive in increasing bank order, so once k are
// held a newcomer enters only if strictly larger than the k-th: on a tie it has the higher row.
template <typename acc_t>
class TopKBuffer {
 public:
  TopKBuffer(int64_t rows, int64_t k)
      : k_(k), capacity_(std::max<int64_t>(2 * k, 16)),
        items_(static_cast<size_t>(rows * capacity_)), count_(rows, 0),
        threshold_(rows, -std::numeric_limits<acc_t>::infinity()), full_(rows, false) {}

  void scan(int64_t row, const acc_t* values, int64_t n, int64_t first_index, int64_t self_col) {
    Candidate<acc_t>* items = items_.data() + row * capacity_;
    int64_t count = count_[row];
    acc_t threshold = threshold_[row];
    bool full = full_[row] != 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t v = values[j];
      // NaN compares false, so it is never a candidate.
      if (!(full ? v > threshold : v == v) || j == self_col) continue;
      items[count++] = {v, first_index + j};
      if (count == capacity_) {
        std::nth_element(items, items + (k_ - 1), items + count);
        count = k_;
        threshold = items[k_ - 1].value;
        full = true;
      }
    }
    count_[row] = count;
    threshold_[row] = threshold;
    full_[row] = full;
  }

  // One candidate at a time, for callers that filter before they compute the exact value.
  bool full(int64_t row) const { return full_[row] != 0; }
  acc_t threshold(int64_t row) const { return threshold_[row]; }
  void offer(int64_t row, acc_t value, int64_t index) {
    if (!(full_[row] ? value > threshold_[row] : value == value)) return;
    Candidate<acc_t>* items = items_.data() + row * capacity_;
    items[count_[row]++] = {value, index};
    if (count_[row] == capacity_) {
      std::nth_element(items, items + (k_ - 1), items + capacity_);
      count_[row] = k_;
      threshold_[row] = items[k_ - 1].value;
      full_[row] = 1;
    }
  }

  // Merges the buffers of all workers for one query and writes the sorted top k (padded with
  // -inf / -1 when fewer than k rows were eligible).
  static void merge(const std::vector<TopKBuffer>& workers, int64_t row, int64_t k, acc_t* values,
                    int64_t* indices) {
    std::vector<Candidate<acc_t>> all;
    for (const auto& w : workers) {
      const Candidate<acc_t>* items = w.items_.data() + row * w.capacity_;
      all.insert(all.end(), items, items + w.count_[row]);
    }
    const int64_t take = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + take, all.end());
    for (int64_t t = 0; t < k; ++t) {
      values[t] = t < take ? all[t].value : -std::numeric_limits<acc_t>::infinity();
      indices[t] = t < take ? all[t].index : -1;
    }
  }

 private:
  int64_t k_;
  int64_t capacity_;
  std::vector<Candidate<acc_t>> items_;
  std::vector<int64_t> count_;
  std::vector<acc_t> threshold_;
  std::vector<uint8_t> full_;
};

// Per-worker running state of the log-sum-exps and, optionally, the weighted sums.
template <typename acc_t>
struct LseState {
  std::vector<acc_t> max_same, sum_same, max_other, sum_other;
  std::vector<uint8_t> has_nan;
  at::Tensor weighted;  // [2B, D]: rows 0..B-1 same class, B..2B-1 other classes

  LseState(int64_t rows, int64_t dim, bool with_grad, const at::TensorOptions& options)
      : max_same(rows, -std::numeric_limits<acc_t>::infinity()), sum_same(rows, 0),
        max_other(rows, -std::numeric_limits<acc_t>::infinity()), sum_other(rows, 0),
        has_nan(rows, 0) {
    if (with_grad) weighted = at::zeros({2 * rows, dim}, options);
  }
};

template <typename acc_t>
acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                             : std::exp(old_max - new_max);
}

struct StreamOptions {
  bool with_lse;
  bool with_grad;
  int64_t k;
  double temperature;
};

template <typename acc_t>
void stream_bank(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& self_rows,
                 const at::Tensor& bank, const at::Tensor& bank_labels, const StreamOptions& opt,
                 at::Tensor* lse_same, at::Tensor* lse_other, at::Tensor* wmean_same,
                 at::Tensor* wmean_other, at::Tensor* topk_values, at::Tensor* topk_indices) {
  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  const int64_t bank_rows = bank.size(0);
  const int64_t num_tiles = (bank_rows + kTileRows - 1) / kTileRows;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  const acc_t inv_t = static_cast<acc_t>(1.0 / opt.temperature);
  const auto acc_options = features.options();
  const bool convert_tiles = bank.scalar_type() != features.scalar_type();

  const int64_t* label_ptr = opt.with_lse ? labels.data_ptr<int64_t>() : nullptr;
  const int64_t* self_ptr = self_rows.data_ptr<int64_t>();
  const int64_t* bank_label_ptr = opt.with_lse ? bank_labels.data_ptr<int64_t>() : nullptr;

  std::vector<LseState<acc_t>> lse_states;
  std::vector<TopKBuffer<acc_t>> topk_states;
  for (int64_t w = 0; w < workers; ++w) {
    if (opt.with_lse) lse_states.emplace_back(rows, dim, opt.with_grad, acc_options);
    if (opt.k > 0) topk_states.emplace_back(rows, opt.k);
  }

  at::parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t w = worker_begin; w < worker_end; ++w) {
      const int64_t tile_begin = num_tiles * w / workers;
      const int64_t tile_end = num_tiles * (w + 1) / workers;
      at::Tensor dots = at::empty({rows, kTileRows}, acc_options);
      at::Tensor weights = opt.with_grad ? at::empty({2 * rows, kTileRows}, acc_options)
                                         : at::Tensor();
      at::Tensor tile_buffer = convert_tiles ? at::empty({kTileRows, dim}, acc_options)
                                             : at::Tensor();
      std::vector<int64_t> self_cols(rows);
      std::vector<RowTileResult<acc_t>> tile_max(rows);
      for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
        const int64_t start = tile * kTileRows;
        const int64_t n = std::min(kTileRows, bank_rows - start);
        at::Tensor tile_rows = bank.narrow(0, start, n);
        if (convert_tiles) {
          tile_rows = tile_buffer.narrow(0, 0, n).copy_(tile_rows);
        }
        at::Tensor tile_dots = dots.narrow(1, 0, n);
        at::mm_out(tile_dots, features, tile_rows.t());
        const acc_t* dot_ptr = dots.data_ptr<acc_t>();
        const int64_t dot_stride = dots.stride(0);
        acc_t* weight_ptr = opt.with_grad ? weights.data_ptr<acc_t>() : nullptr;
        const int64_t weight_stride = opt.with_grad ? weights.stride(0) : 0;
        LseState<acc_t>* lse = opt.with_lse ? &lse_states[w] : nullptr;
        acc_t* weighted_ptr = opt.with_grad ? lse->weighted.template data_ptr<acc_t>() : nullptr;

        // Pass 1 for every query first: the tile's same-class count decides how the
        // same-class weighted sum is formed below.
        int64_t same_total = 0;
        for (int64_t i = 0; i < rows; ++i) {
          const acc_t* row_dots = dot_ptr + i * dot_stride;
          self_cols[i] = (self_ptr[i] >= start && self_ptr[i] < start + n) ? self_ptr[i] - start : -1;
          if (opt.k > 0) topk_states[w].scan(i, row_dots, n, start, self_cols[i]);
          if (!opt.with_lse) continue;
          tile_max[i] = row_max_dispatch(row_dots, bank_label_ptr + start, label_ptr[i], self_cols[i], n,
                                         inv_t);
          same_total += tile_max[i].same_count;
        }
        if (!opt.with_lse) continue;
        // With many classes the same-class weights are almost all zero (1 in 1000 on ImageNet):
        // adding those few bank rows directly beats a dense B x tile x D GEMM over the zeros.
        const bool sparse_same = opt.with_grad && same_total * kDenseSameRatio < rows * n;
        const acc_t* tile_data = opt.with_grad ? tile_rows.template data_ptr<acc_t>() : nullptr;

        for (int64_t i = 0; i < rows; ++i) {
          const acc_t* row_dots = dot_ptr + i * dot_stride;
          lse->has_nan[i] |= tile_max[i].has_nan;
          const acc_t new_max_same = std::max(lse->max_same[i], tile_max[i].max_same);
          const acc_t new_max_other = std::max(lse->max_other[i], tile_max[i].max_other);
          acc_t* p_same = opt.with_grad ? weight_ptr + i * weight_stride : nullptr;
          acc_t* p_other = opt.with_grad ? weight_ptr + (rows + i) * weight_stride : nullptr;
          acc_t tile_sum_same, tile_sum_other;
          row_exp_sums_dispatch(row_dots, bank_label_ptr + start, label_ptr[i], self_cols[i], n, inv_t,
                                new_max_same, new_max_other, &tile_sum_same, &tile_sum_other, p_same,
                                p_other);
          const acc_t scale_same = rescale_factor(lse->max_same[i], new_max_same);
          const acc_t scale_other = rescale_factor(lse->max_other[i], new_max_other);
          lse->sum_same[i] = lse->sum_same[i] * scale_same + tile_sum_same;
          lse->sum_other[i] = lse->sum_other[i] * scale_other + tile_sum_other;
          lse->max_same[i] = new_max_same;
          lse->max_other[i] = new_max_other;
          if (!opt.with_grad) continue;
          acc_t* same_row = weighted_ptr + i * dim;
          acc_t* other_row = weighted_ptr + (rows + i) * dim;
          if (scale_same != acc_t(1)) {
            for (int64_t d = 0; d < dim; ++d) same_row[d] *= scale_same;
          }
          if (scale_other != acc_t(1)) {
            for (int64_t d = 0; d < dim; ++d) other_row[d] *= scale_other;
          }
          if (sparse_same && tile_max[i].same_count > 0) {
            for (int64_t j = 0; j < n; ++j) {
              const acc_t weight = p_same[j];
              if (weight == acc_t(0)) continue;
              const acc_t* bank_row = tile_data + j * dim;
              for (int64_t d = 0; d < dim; ++d) same_row[d] += weight * bank_row[d];
            }
          }
        }
        if (opt.with_grad) {
          at::Tensor tile_weights = weights.narrow(1, 0, n);
          if (sparse_same) {
            lse->weighted.narrow(0, rows, rows).addmm_(tile_weights.narrow(0, rows, rows), tile_rows);
          } else {
            lse->weighted.addmm_(tile_weights, tile_rows);
          }
        }
      }
    }
  });

  // Merge the workers' partials in a fixed order.
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  if (opt.with_lse) {
    acc_t* out_same = lse_same->data_ptr<acc_t>();
    acc_t* out_other = lse_other->data_ptr<acc_t>();
    acc_t* grad_same = opt.with_grad ? wmean_same->data_ptr<acc_t>() : nullptr;
    acc_t* grad_other = opt.with_grad ? wmean_other->data_ptr<acc_t>() : nullptr;
    std::vector<const acc_t*> weighted(workers);
    for (int64_t w = 0; w < workers; ++w) {
      weighted[w] = opt.with_grad ? lse_states[w].weighted.template data_ptr<acc_t>() : nullptr;
    }
    at::parallel_for(0, rows, 16, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t i = row_begin; i < row_end; ++i) {
        acc_t max_same = neg_inf, max_other = neg_inf;
        bool has_nan = false;
        for (const auto& st : lse_states) {
          max_same = std::max(max_same, st.max_same[i]);
          max_other = std::max(max_other, st.max_other[i]);
          has_nan |= st.has_nan[i] != 0;
        }
        acc_t sum_same = 0, sum_other = 0;
        if (opt.with_grad) {
          std::fill(grad_same + i * dim, grad_same + (i + 1) * dim, acc_t(0));
          std::fill(grad_other + i * dim, grad_other + (i + 1) * dim, acc_t(0));
        }
        for (int64_t w = 0; w < workers; ++w) {
          const auto& st = lse_states[w];
          const acc_t f_same = rescale_factor(st.max_same[i], max_same);
          const acc_t f_other = rescale_factor(st.max_other[i], max_other);
          sum_same += st.sum_same[i] * f_same;
          sum_other += st.sum_other[i] * f_other;
          if (opt.with_grad) {
            const acc_t* ws = weighted[w] + i * dim;
            const acc_t* wo = weighted[w] + (rows + i) * dim;
            for (int64_t d = 0; d < dim; ++d) {
              grad_same[i * dim + d] += ws[d] * f_same;
              grad_other[i * dim + d] += wo[d] * f_other;
            }
          }
        }
        out_same[i] = has_nan ? nan : (sum_same > 0 ? max_same + std::log(sum_same) : neg_inf);
        out_other[i] = has_nan ? nan : (sum_other > 0 ? max_other + std::log(sum_other) : neg_inf);
        if (opt.with_grad) {
          const acc_t inv_same = has_nan ? nan : (sum_same > 0 ? acc_t(1) / sum_same : acc_t(0));
          const acc_t inv_other = has_nan ? nan : (sum_other > 0 ? acc_t(1) / sum_other : acc_t(0));
          for (int64_t d = 0; d < dim; ++d) {
            grad_same[i * dim + d] *= inv_same;
            grad_other[i * dim + d] *= inv_other;
          }
        }
      }
    });
  }
  if (opt.k > 0) {
    acc_t* values = topk_values->data_ptr<acc_t>();
    int64_t* indices = topk_indices->data_ptr<int64_t>();
    at::parallel_for(0, rows, 16, [&](int64_t row_begin, int64_t row_end) {
      for (int64_t i = row_begin; i < row_end; ++i) {
        TopKBuffer<acc_t>::merge(topk_states, i, opt.k, values + i * opt.k, indices + i * opt.k);
      }
    });
  }
}

// bank_topk for float32 queries: a bfloat16 GEMM (twice the rate of float32 on CPUs with
// AVX512-BF16) ranks the tile approximately, and only rows that could still enter the top k are
// scored exactly in float32. With u = 2^-8 (bfloat16 rounding), rounding both operands changes
// each product by at most (2u + u^2)|q_d m_d| and rounding the output adds u|dot|, so
// |approx - exact| <= ~0.0118 |q| |m|; the filter uses 2^-6 |q| |m|. A row is skipped only if
// approx + bound <= the exact k-th value so far, so the result equals the exact path's.
constexpr float kBf16DotErrorBound = 1.0f / 64;

// may_enter[j] = 1 where approx[j] + slack * norms[j] could beat the threshold (approx holds
// bfloat16 bits; a bfloat16 is the top half of a float32).
SNCA_CLONES void mark_candidates(const uint16_t* approx, const float* norms, int64_t n, float slack,
                                 float threshold, uint8_t* may_enter) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(approx[j]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    // -inf threshold (fewer than k held): everything but NaN enters.
    may_enter[j] = static_cast<uint8_t>(value + slack * norms[j] > threshold);
  }
}

SNCA_CLONES float dot_product(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t d0 = 0;
  for (; d0 + kLanes <= n; d0 += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[d0 + l] * b[d0 + l];
  }
  for (int64_t d = d0; d < n; ++d) lanes[0] += a[d] * b[d];
  float sum = 0;
  for (int64_t l = 0; l < kLanes; ++l) sum += lanes[l];
  return sum;
}

bool bf16_filter_enabled() {
  const char* setting = std::getenv("SNCA_EXT_CPU_TOPK_FILTER");
  if (setting != nullptr && setting[0] == '0') return false;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
  static const bool supported = __builtin_cpu_supports("avx512bf16");
  return supported;
#else
  return false;
#endif
}

void topk_bf16_filtered(const at::Tensor& queries, const at::Tensor& self_rows, const at::Tensor& bank,
                        int64_t k, at::Tensor* topk_values, at::Tensor* topk_indices) {
  const int64_t rows = queries.size(0);
  const int64_t dim = queries.size(1);
  const int64_t bank_rows = bank.size(0);
  const int64_t num_tiles = (bank_rows + kTileRows - 1) / kTileRows;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  const at::Tensor queries_bf16 = queries.to(at::kBFloat16);
  const std::vector<float> query_norms = [&] {
    const at::Tensor norms = queries.norm(2, 1).contiguous();
    return std::vector<float>(norms.data_ptr<float>(), norms.data_ptr<float>() + rows);
  }();
  const float* query_ptr = queries.data_ptr<float>();
  const int64_t* self_ptr = self_rows.data_ptr<int64_t>();
  std::vector<TopKBuffer<float>> states(workers, TopKBuffer<float>(rows, k));

  at::parallel_for(0, workers, 1, [&](int64_t worker_begin, int64_t worker_end) {
    for (int64_t w = worker_begin; w < worker_end; ++w) {
      TopKBuffer<float>& state = states[w];
      at::Tensor approx = at::empty({rows, kTileRows}, queries.options().dtype(at::kBFloat16));
      at::Tensor exact_buffer = bank.scalar_type() == at::kFloat
                                    ? at::Tensor()
                                    : at::empty({kTileRows, dim}, queries.options());
      at::Tensor approx_buffer = bank.scalar_type() == at::kBFloat16
                                     ? at::Tensor()
                                     : at::empty({kTileRows, dim}, approx.options());
      std::vector<float> bank_norms(kTileRows);
      std::vector<uint8_t> may_enter(kTileRows + 8, 0);  // padded for 8-byte reads
      for (int64_t tile = num_tiles * w / workers; tile < num_tiles * (w + 1) / workers; ++tile) {
        const int64_t start = tile * kTileRows;
        const int64_t n = std::min(kTileRows, bank_rows - start);
        const at::Tensor tile_rows = bank.narrow(0, start, n);
        const at::Tensor exact_rows =
            exact_buffer.defined() ? exact_buffer.narrow(0, 0, n).copy_(tile_rows) : tile_rows;
        const at::Tensor approx_rows =
            approx_buffer.defined() ? approx_buffer.narrow(0, 0, n).copy_(tile_rows) : tile_rows;
        at::Tensor approx_tile = approx.narrow(1, 0, n);
        at::mm_out(approx_tile, queries_bf16, approx_rows.t());
        const float* exact_ptr = exact_rows.data_ptr<float>();
        for (int64_t j = 0; j < n; ++j) {
          bank_norms[j] = std::sqrt(dot_product(exact_ptr + j * dim, exact_ptr + j * dim, dim));
        }
        const at::BFloat16* approx_ptr = approx.data_ptr<at::BFloat16>();
        for (int64_t i = 0; i < rows; ++i) {
          const at::BFloat16* approx_row = approx_ptr + i * approx.stride(0);
          const bool full = state.full(i);
          const float threshold = state.threshold(i);
          const float slack = kBf16DotErrorBound * query_norms[i];
          mark_candidates(reinterpret_cast<const uint16_t*>(approx_row), bank_norms.data(), n, slack,
                          full ? threshold : -std::numeric_limits<float>::infinity(), may_enter.data());
          const int64_t self_col = self_ptr[i] - start;
          const float* query = query_ptr + i * dim;
          // Few rows pass once k are held: skip the marks eight at a time.
          for (int64_t j0 = 0; j0 < n; j0 += 8) {
            uint64_t marks;
            std::memcpy(&marks, may_enter.data() + j0, sizeof(marks));
            if (marks == 0) continue;
            for (int64_t j = j0; j < std::min(j0 + 8, n); ++j) {
              if (!may_enter[j] || j == self_col) continue;
              state.offer(i, dot_product(query, exact_ptr + j * dim, dim), start + j);
            }
          }
        }
      }
    }
  });
  float* values = topk_values->data_ptr<float>();
  int64_t* indices = topk_indices->data_ptr<int64_t>();
  at::parallel_for(0, rows, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      TopKBuffer<float>::merge(states, i, k, values + i * k, indices + i * k);
    }
  });
}

// The kernel reads bank rows with these indices, so their range is checked here too.
void check_rows_in_bank(const at::Tensor& self_rows, int64_t bank_rows, const char* self_name) {
  const int64_t* self_ptr = self_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < self_rows.size(0); ++i) {
    TORCH_CHECK(self_ptr[i] >= -1 && self_ptr[i] < bank_rows, self_name, "[", i,
                "] must be in [-1, N=", bank_rows, "), got ", self_ptr[i]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
snca_forward_cpu(const at::Tensor& features_in, const at::Tensor& labels_in,
                 const at::Tensor& indices_in, const at::Tensor& bank_in,
                 const at::Tensor& bank_labels_in, double temperature, bool with_grad, int64_t k) {
  // Autograd is handled one level up (register_autograd); the tile GEMMs run on OpenMP threads,
  // which do not inherit a dispatch guard, so the inputs are detached instead.
  const at::Tensor features = features_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor bank_labels = bank_labels_in.contiguous();
  check_bank_inputs(features, bank, indices, k, "features", "indices");
  check_label_inputs(features, labels, bank, bank_labels, temperature);
  check_rows_in_bank(indices, bank.size(0), "indices");

  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  auto opts = features.options();
  at::Tensor lse_same = at::empty({rows}, opts);
  at::Tensor lse_other = at::empty({rows}, opts);
  at::Tensor wmean_same = at::empty({with_grad ? rows : 0, dim}, opts);
  at::Tensor wmean_other = at::empty({with_grad ? rows : 0, dim}, opts);
  at::Tensor topk_values = at::empty({rows, k}, opts);
  at::Tensor topk_indices = at::empty({rows, k}, opts.dtype(at::kLong));
  if (rows > 0) {
    const StreamOptions opt{true, with_grad, k, temperature};
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "snca_forward_cpu", [&] {
      stream_bank<scalar_t>(features, labels, indices, bank, bank_labels, opt, &lse_same,
                            &lse_other, &wmean_same, &wmean_other, &topk_values, &topk_indices);
    });
  }
  return {lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices};
}

std::tuple<at::Tensor, at::Tensor> bank_topk_cpu(const at::Tensor& queries_in,
                                                 const at::Tensor& bank_in, int64_t k,
                                                 const at::Tensor& exclude_in) {
  const at::Tensor queries = queries_in.detach().contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor exclude = exclude_in.contiguous();
  check_bank_inputs(queries, bank, exclude, k, "queries", "exclude");
  check_rows_in_bank(exclude, bank.size(0), "exclude");
  const int64_t rows = queries.size(0);
  at::Tensor values = at::empty({rows, k}, queries.options());
  at::Tensor indices = at::empty({rows, k}, queries.options().dtype(at::kLong));
  if (rows > 0 && k > 0 && queries.scalar_type() == at::kFloat && bf16_filter_enabled()) {
    topk_bf16_filtered(queries, exclude, bank, k, &values, &indices);
  } else if (rows > 0 && k > 0) {
    const StreamOptions opt{false, false, k, 1.0};
    AT_DISPATCH_FLOATING_TYPES(queries.scalar_type(), "bank_topk_cpu", [&] {
      stream_bank<scalar_t>(queries, at::Tensor(), exclude, bank, at::Tensor(), opt, nullptr,
                            nullptr, nullptr, nullptr, &values, &indices);
    });
  }
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(snca_ext, CPU, m) {
  m.impl("snca_forward", &snca_forward_cpu);
  m.impl("bank_topk", &bank_topk_cpu);
}

}  // namespace snca_ext
