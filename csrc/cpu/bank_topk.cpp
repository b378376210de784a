// CPU kernel of snca_ext::bank_topk: the k bank rows with the largest inner product with each
// query, in one streaming pass (stream_tile.h), or through a bfloat16 ranking filter where the
// processor multiplies bfloat16 natively.
#include <torch/library.h>

#include "../checks.h"
#include "stream_tile.h"

#include <cstdlib>
#include <cstring>

namespace snca_ext {
namespace cpu {
namespace {

// bank_topk for float32 queries: a bfloat16 GEMM (twice the rate of float32 on CPUs with
// AVX512-BF16) ranks the tile approximately, and only rows that could still enter the top k are
// scored exactly in float32. With u = 2^-8 (bfloat16 rounding), rounding both operands changes
// each product by at most (2u + u^2)|q_d m_d| and rounding the output adds u|dot|, so
// |approx - exact| <= ~0.0118 |q| |m|; the filter uses 2^-6 |q| |m|. A row is skipped only if
// approx + bound <= the exact k-th value so far, so the result equals the exact path's.
constexpr float kBf16DotErrorBound = 1.0f / 64;

// may_enter[j] = 1 unless approx[j] + slack * norms[j] <= threshold, i.e. unless row j provably
// cannot beat the k-th held value (approx holds bfloat16 bits; a bfloat16 is the top half of a
// float32). Written as !(x <= t) so that any NaN (a NaN or inf row, a NaN threshold) marks the
// row for the exact path, which ranks NaN and inf as the contract says.
SNCA_CLONES void mark_candidates(const uint16_t* approx, const float* norms, int64_t n, float slack,
                                 float threshold, uint8_t* may_enter) {
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t bits = static_cast<uint32_t>(approx[j]) << 16;
    float value;
    std::memcpy(&value, &bits, sizeof(value));
    may_enter[j] = static_cast<uint8_t>(!(value + slack * norms[j] <= threshold));
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

// SNCA_EXT_CPU_TOPK_FILTER=0 turns the filter off, =1 on even without AVX512-BF16 (slower there,
// but it lets the tests check its results on any processor).
bool bf16_filter_enabled() {
  const char* setting = std::getenv("SNCA_EXT_CPU_TOPK_FILTER");
  if (setting != nullptr && setting[0] == '0') return false;
  if (setting != nullptr && setting[0] == '1') return true;
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
          const float slack = kBf16DotErrorBound * query_norms[i];
          if (state.full(i)) {
            mark_candidates(reinterpret_cast<const uint16_t*>(approx_row), bank_norms.data(), n, slack,
                            state.threshold(i), may_enter.data());
          } else {  // fewer than k held: every row enters, -inf and NaN ones included
            std::fill(may_enter.begin(), may_enter.begin() + n, uint8_t(1));
          }
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

TORCH_LIBRARY_IMPL(snca_ext, CPU, m) { m.impl("bank_topk", &bank_topk_cpu); }

}  // namespace cpu
}  // namespace snca_ext
