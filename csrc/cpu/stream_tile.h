// The streaming machinery that both CPU ops share: the bank is read in tiles of kTileRows rows,
// one contiguous run of tiles per worker thread (B = 256 queries are too few to parallelise over).
// Each worker keeps, per query, a running max and rescaled sum for the same-class and the
// other-class log-sum-exp (online softmax), optionally the rescaled softmax-weighted sums of bank
// rows (the one-pass gradient of README "How it works"), and optionally a candidate buffer for the
// top-k. The partials are merged in worker order at the end, so a result is deterministic for a
// given thread count. Extra memory is O(workers * (B * tile + B * D)).
//
// snca_forward.cpp and bank_topk.cpp hold the ops; stream_tile.cpp the vectorised row kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace snca_ext {
namespace cpu {

constexpr int64_t kTileRows = 512;
// Below one same-class entry in this many, the same-class weighted sum skips the dense GEMM.
constexpr int64_t kDenseSameRatio = 8;

// The row loops keep kLanes independent partial results and combine them at the end: a single
// running sum or max is a loop-carried dependency that the compiler may not vectorise without
// -ffast-math, which would also drop the NaN checks. Bools are combined with & rather than &&:
// short-circuit control flow blocks vectorisation.
constexpr int64_t kLanes = 16;

// Compiled once per instruction set and picked at load time (GCC function multiversioning), so
// one wheel is vectorised with AVX-512 or AVX2 where the processor has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SNCA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SNCA_CLONES
#endif

template <typename acc_t>
struct RowTileResult {
  acc_t max_same, max_other;
  bool nan_same, nan_other;  // a NaN score in the group: its lse is NaN (README's contract)
  int64_t same_count;        // same-class rows in the tile (own row excluded)
};

// The row kernels (stream_tile.cpp), one clone set per accumulation type. Pass 1 over one query
// row of a tile: the tile's max over same-class and other-class rows.
RowTileResult<float> row_max_float(const float* dot, const int64_t* bank_labels, int64_t label,
                                   int64_t self_col, int64_t n, float inv_t);
RowTileResult<double> row_max_double(const double* dot, const int64_t* bank_labels, int64_t label,
                                     int64_t self_col, int64_t n, double inv_t);
// Pass 2: exp(s - max of its group), summed per group; with p_same != nullptr the weights are
// also written to p_same / p_other (zero outside the group) for the weighted-sum GEMM.
void row_exp_sums_float(const float* dot, const int64_t* bank_labels, int64_t label, int64_t self_col,
                        int64_t n, float inv_t, float max_same, float max_other, float* sum_same,
                        float* sum_other, float* p_same, float* p_other);
void row_exp_sums_double(const double* dot, const int64_t* bank_labels, int64_t label,
                         int64_t self_col, int64_t n, double inv_t, double max_same, double max_other,
                         double* sum_same, double* sum_other, double* p_same, double* p_other);
// Whether all n values are finite (one vectorised pass; x * 0 is NaN exactly for inf and NaN).
bool all_finite(const float* values, int64_t n);
bool all_finite(const double* values, int64_t n);

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

// Ranks candidates as torch.topk does: NaN above everything, then larger value first; ties (NaN
// with NaN too) to the lower bank row, so every backend agrees.
template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t index;
  bool operator<(const Candidate& other) const {
    const bool nan = value != value, other_nan = other.value != other.value;
    if (nan || other_nan) return nan && (!other_nan || index < other.index);
    return value > other.value || (value == other.value && index < other.index);
  }
};

// Whether a newcomer ranks above the k-th held candidate. It comes from a later bank row, so a
// tie (NaN with NaN included) keeps the held one.
template <typename acc_t>
inline bool beats_threshold(acc_t value, acc_t threshold) {
  return value > threshold || (value != value && threshold == threshold);
}

// Per-query top-k candidates of one worker. Rows arrive in increasing bank order, so once k are
// held a newcomer enters only if it ranks strictly above the k-th (beats_threshold).
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
      if ((full && !beats_threshold(v, threshold)) || j == self_col) continue;
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
    if (full_[row] && !beats_threshold(value, threshold_[row])) return;
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
  std::vector<uint8_t> nan_same, nan_other;
  at::Tensor weighted;  // [2B, D]: rows 0..B-1 same class, B..2B-1 other classes

  LseState(int64_t rows, int64_t dim, bool with_grad, const at::TensorOptions& options)
      : max_same(rows, -std::numeric_limits<acc_t>::infinity()), sum_same(rows, 0),
        max_other(rows, -std::numeric_limits<acc_t>::infinity()), sum_other(rows, 0),
        nan_same(rows, 0), nan_other(rows, 0) {
    if (with_grad) weighted = at::zeros({2 * rows, dim}, options);
  }
};

template <typename acc_t>
inline acc_t rescale_factor(acc_t old_max, acc_t new_max) {
  return old_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0)
                                                             : std::exp(old_max - new_max);
}

struct StreamOptions {
  bool with_lse;
  bool with_grad;
  int64_t k;
  double temperature;
};

// The tile for the weighted sums: a bank row holding inf or NaN never has a finite score, so its
// weight is 0 or NaN for every query; a zero weight must contribute nothing to the weighted sums
// (the contract), not 0 * inf = NaN through the GEMM. Such rows enter the sums as zeros (a copy in
// finite_buffer, allocated on the first such tile): a NaN weight still makes its group NaN at
// the merge.
template <typename acc_t>
at::Tensor finite_tile(const at::Tensor& tile_rows, at::Tensor& finite_buffer, int64_t n, int64_t dim,
                       const at::TensorOptions& options) {
  if (all_finite(tile_rows.template data_ptr<acc_t>(), n * dim)) return tile_rows;
  if (!finite_buffer.defined()) finite_buffer = at::empty({kTileRows, dim}, options);
  at::Tensor finite_rows = finite_buffer.narrow(0, 0, n).copy_(tile_rows);
  acc_t* finite_ptr = finite_rows.template data_ptr<acc_t>();
  for (int64_t j = 0; j < n; ++j) {
    acc_t* row = finite_ptr + j * dim;
    if (!all_finite(row, dim)) std::fill(row, row + dim, acc_t(0));
  }
  return finite_rows;
}

// Phase 2 of a tile, for every query: folds the tile's exp-sums into the running log-sum-exps
// (rescaled to the new maxima) and, with the gradient, the tile's weighted bank rows into the
// running weighted sums (the same-class ones row by row when they are sparse).
template <typename acc_t>
void fold_tile(LseState<acc_t>& state, const std::vector<RowTileResult<acc_t>>& tile_max,
               const std::vector<int64_t>& self_cols, const acc_t* dot_ptr, int64_t dot_stride,
               const at::Tensor& weights, const at::Tensor& tile_rows, const int64_t* tile_labels,
               const int64_t* label_ptr, int64_t rows, int64_t n, int64_t dim, acc_t inv_t,
               bool with_grad, bool sparse_same) {
  LseState<acc_t>* lse = &state;
  acc_t* weight_ptr = with_grad ? weights.data_ptr<acc_t>() : nullptr;
  const int64_t weight_stride = with_grad ? weights.stride(0) : 0;
  acc_t* weighted_ptr = with_grad ? lse->weighted.template data_ptr<acc_t>() : nullptr;
  const acc_t* tile_data = with_grad ? tile_rows.template data_ptr<acc_t>() : nullptr;
  for (int64_t i = 0; i < rows; ++i) {
    const acc_t* row_dots = dot_ptr + i * dot_stride;
    lse->nan_same[i] |= tile_max[i].nan_same;
    lse->nan_other[i] |= tile_max[i].nan_other;
    const acc_t new_max_same = std::max(lse->max_same[i], tile_max[i].max_same);
    const acc_t new_max_other = std::max(lse->max_other[i], tile_max[i].max_other);
    acc_t* p_same = with_grad ? weight_ptr + i * weight_stride : nullptr;
    acc_t* p_other = with_grad ? weight_ptr + (rows + i) * weight_stride : nullptr;
    acc_t tile_sum_same, tile_sum_other;
    row_exp_sums_dispatch(row_dots, tile_labels, label_ptr[i], self_cols[i], n, inv_t,
                          new_max_same, new_max_other, &tile_sum_same, &tile_sum_other, p_same,
                          p_other);
    const acc_t scale_same = rescale_factor(lse->max_same[i], new_max_same);
    const acc_t scale_other = rescale_factor(lse->max_other[i], new_max_other);
    lse->sum_same[i] = lse->sum_same[i] * scale_same + tile_sum_same;
    lse->sum_other[i] = lse->sum_other[i] * scale_other + tile_sum_other;
    lse->max_same[i] = new_max_same;
    lse->max_other[i] = new_max_other;
    if (!with_grad) continue;
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
  if (with_grad) {
    at::Tensor tile_weights = weights.narrow(1, 0, n);
    if (sparse_same) {
      lse->weighted.narrow(0, rows, rows).addmm_(tile_weights.narrow(0, rows, rows), tile_rows);
    } else {
      lse->weighted.addmm_(tile_weights, tile_rows);
    }
  }
}

// The merge of the log-sum-exps: every worker's running state, in a fixed worker order, into
// each query's log-sum-exps and (with the gradient) weighted means.
template <typename acc_t>
void merge_lse(const std::vector<LseState<acc_t>>& lse_states, int64_t rows, int64_t dim, bool with_grad,
               at::Tensor* lse_same, at::Tensor* lse_other, at::Tensor* wmean_same,
               at::Tensor* wmean_other) {
  const int64_t workers = static_cast<int64_t>(lse_states.size());
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const acc_t pos_inf = std::numeric_limits<acc_t>::infinity();
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  acc_t* out_same = lse_same->data_ptr<acc_t>();
  acc_t* out_other = lse_other->data_ptr<acc_t>();
  acc_t* grad_same = with_grad ? wmean_same->data_ptr<acc_t>() : nullptr;
  acc_t* grad_other = with_grad ? wmean_other->data_ptr<acc_t>() : nullptr;
  std::vector<const acc_t*> weighted(workers);
  for (int64_t w = 0; w < workers; ++w) {
    weighted[w] = with_grad ? lse_states[w].weighted.template data_ptr<acc_t>() : nullptr;
  }
  at::parallel_for(0, rows, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t i = row_begin; i < row_end; ++i) {
      acc_t max_same = neg_inf, max_other = neg_inf;
      bool nan_same = false, nan_other = false;
      for (const auto& st : lse_states) {
        max_same = std::max(max_same, st.max_same[i]);
        max_other = std::max(max_other, st.max_other[i]);
        nan_same |= st.nan_same[i] != 0;
        nan_other |= st.nan_other[i] != 0;
      }
      acc_t sum_same = 0, sum_other = 0;
      if (with_grad) {
        std::fill(grad_same + i * dim, grad_same + (i + 1) * dim, acc_t(0));
        std::fill(grad_other + i * dim, grad_other + (i + 1) * dim, acc_t(0));
      }
      for (int64_t w = 0; w < workers; ++w) {
        const auto& st = lse_states[w];
        const acc_t f_same = rescale_factor(st.max_same[i], max_same);
        const acc_t f_other = rescale_factor(st.max_other[i], max_other);
        sum_same += st.sum_same[i] * f_same;
        sum_other += st.sum_other[i] * f_other;
        if (with_grad) {
          const acc_t* ws = weighted[w] + i * dim;
          const acc_t* wo = weighted[w] + (rows + i) * dim;
          for (int64_t d = 0; d < dim; ++d) {
            grad_same[i * dim + d] += ws[d] * f_same;
            grad_other[i * dim + d] += wo[d] * f_other;
          }
        }
      }
      // The exact IEEE log-sum-exp of each group: NaN if a score is NaN, else +inf if one is
      // +inf (the running sums then hold exp(inf - inf) = NaN and are not used); the gradient
      // of such a group is NaN, that of an empty or all -inf group 0.
      const bool undefined_same = nan_same || max_same == pos_inf;
      const bool undefined_other = nan_other || max_other == pos_inf;
      out_same[i] = undefined_same ? (nan_same ? nan : pos_inf)
                                   : (sum_same > 0 ? max_same + std::log(sum_same) : neg_inf);
      out_other[i] = undefined_other ? (nan_other ? nan : pos_inf)
                                     : (sum_other > 0 ? max_other + std::log(sum_other) : neg_inf);
      if (with_grad) {
        const acc_t inv_same =
            undefined_same ? nan : (sum_same > 0 ? acc_t(1) / sum_same : acc_t(0));
        const acc_t inv_other =
            undefined_other ? nan : (sum_other > 0 ? acc_t(1) / sum_other : acc_t(0));
        for (int64_t d = 0; d < dim; ++d) {
          grad_same[i * dim + d] *= inv_same;
          grad_other[i * dim + d] *= inv_other;
        }
      }
    }
  });
}

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
      at::Tensor finite_buffer;  // allocated on the first tile that holds inf or NaN
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
        LseState<acc_t>* lse = opt.with_lse ? &lse_states[w] : nullptr;

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
        if (opt.with_grad) tile_rows = finite_tile<acc_t>(tile_rows, finite_buffer, n, dim, acc_options);
        fold_tile(*lse, tile_max, self_cols, dot_ptr, dot_stride, weights, tile_rows, bank_label_ptr + start,
                  label_ptr, rows, n, dim, inv_t, opt.with_grad, sparse_same);
      }
    }
  });

  // Merge the workers' partials in a fixed order.
  if (opt.with_lse) {
    merge_lse(lse_states, rows, dim, opt.with_grad, lse_same, lse_other, wmean_same, wmean_other);
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

// The kernel reads bank rows with these indices, so their range is checked here too.
inline void check_rows_in_bank(const at::Tensor& self_rows, int64_t bank_rows, const char* self_name) {
  const int64_t* self_ptr = self_rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < self_rows.size(0); ++i) {
    TORCH_CHECK(self_ptr[i] >= -1 && self_ptr[i] < bank_rows, self_name, "[", i,
                "] must be in [-1, N=", bank_rows, "), got ", self_ptr[i]);
  }
}

}  // namespace cpu
}  // namespace snca_ext
