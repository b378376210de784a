// What the CUDA kernels of both ops share (snca_forward.cu, bank_topk.cu): the tile constants, the
// device helpers, the kernel arguments, the shared-memory layouts. The matrix engines have a file
// each (engine_tf32.cuh, engine_mma16.cuh, engine_generic.cuh), the host side of the launches is in
// stream_launch.cuh.
//
// Split-KV design. B = 256 queries make only 4 blocks of kRows = 64, far too few for a GPU, so
// the bank is also split: block (q, s) streams the queries of block q over the s-th contiguous
// run of bank tiles (kCols = 64 rows each) and writes partials to workspace tensors; a combine
// kernel then merges the partials of every split in a fixed order. No atomics anywhere, so a
// result is bitwise reproducible for a given split count (it depends on the GPU's SM count).
//
//   lse_partial_kernel    per query: reference max and rescaled sum of the same-class and the
//                         other-class exponentials (online softmax), optionally the rescaled
//                         softmax-weighted sums of bank rows (the one-pass gradient of README "How it works")
//   lse_topk_partial_kernel  the same with the top-k partials below in the same pass (tensor-core
//                         engines, where its state fits: snca_forward.cu)
//   lse_combine_kernel    log-sum-exp combine, rescale-sum of the accumulators
//   topk_partial_kernel   per query a sorted top-k list per split, candidate buffer, threshold
//   topk_combine_kernel   pairwise (tree) merge of the sorted lists of all splits
// Each tile goes through the same phases, separated by __syncthreads:
//   load    bank tile (and its labels) into shared memory, in the engine's operand dtype (fp32;
//           16-bit: the features'); the block learns whether it holds a non-finite value
//   scores  S[64 queries x 64 bank rows] = Q M^T (raw inner products)
//   rows    softmax or top-k update: the tensor-core lse kernel on S in the MMAs' registers
//           (lse_tiles_in_registers); the others on S in shared memory, a warp per query row
//   sums    (with_grad) O_same += P_same M, O_other += P_other M
// The matrix work is done by an "engine": TensorCoreEngine (engine_tf32.cuh: fp32 features,
// D <= 128, mma.sync TF32 with split precision), Mma16Engine (engine_mma16.cuh: bf16/fp16 features,
// D <= 128, mma.sync m16n8k16 with ldmatrix fragments and a cp.async pipeline) or GenericEngine
// (engine_generic.cuh: fp64, or D > 128: FMA loops).
//
// Tensor-core rounding. Whether an MMA rounds its fp32 accumulation to nearest or toward zero is
// not documented (papers measure both). The MMAs therefore accumulate short chunks from zero (the
// scores of a tile; one 64-row tile of the weighted sums), each added into the running fp32
// fragment with an ordinary add or FFMA (round to nearest): a biased rounding cannot build up over
// the bank. tests/test_cuda_emulation.py replays both engines under both models and the accuracy
// rule; an accumulator carried through a split's tiles fails the fp32 one under RZ.
//
// Non-finite values. The MMAs see finite operands only (inf - tf32(inf) would be NaN); a tile or a
// block of queries holding a non-finite value takes a rare path that puts the IEEE inner product
// wherever it is not finite (the engines' scores_frag), so a score is +-inf or NaN exactly when
// the IEEE inner product is. Per query and group, a NaN score makes the lse NaN and a +inf one
// +inf.
//
// Lazy rescaling (fp32, fp64). A group's reference max moves only when a tile's max exceeds it by
// more than kLazyRescale (8 logit units): each exp(s - ref) stays below e^8, which cannot overflow
// fp32 even summed over 2^31 rows, and after the first tiles rescales of the weighted-sum
// accumulators become rare. (The 16-bit engine keeps the running max: engine_mma16.cuh.)
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "tile_config.h"


#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

// setup.py drops architectures below sm_80 from TORCH_CUDA_ARCH_LIST; this guards a manual build.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "snca_ext's CUDA kernels need sm_80 or newer (TF32 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace snca_ext {
namespace {

using tile::kCols;
using tile::kLdS;
using tile::kTopkBuffer;
using tile::kRows;
using tile::kRowsPerWarp;
using tile::kThreads;
using tile::kWarps;
constexpr int kMaxSplits = 1024;
constexpr int kMaxFastK = 1024;
constexpr float kLazyRescale = 8.0f;
constexpr unsigned kFullMask = 0xffffffffu;
// Non-finite flags of a query's partial (the last stats plane): a NaN or a +inf score in a group
// makes that group's lse NaN or +inf (NaN first); -inf scores simply contribute nothing.
constexpr int kNanSame = 1, kNanOther = 2, kInfSame = 4, kInfOther = 8;
constexpr int64_t kTopkWorkspaceBytes = int64_t(128) << 20;

// ----------------------------------------------------------------------------- device helpers

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float log_acc(float x) { return logf(x); }
__device__ __forceinline__ double log_acc(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v = fmax(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// exp(old_max - new_max), 0 when the old partial was empty.
template <typename T>
__device__ __forceinline__ T rescale_factor(T old_max, T new_max) {
  return old_max == neg_inf<T>() ? T(0) : exp_acc(old_max - new_max);
}

// The top-k order: (v1, i1) comes before (v2, i2). NaN ranks above +inf, as in torch.topk; equal
// values (NaN with NaN too) go to the lower bank row.
template <typename T>
__device__ __forceinline__ bool beats(T v1, int i1, T v2, int i2) {
  const bool nan1 = v1 != v1, nan2 = v2 != v2;
  if (nan1 || nan2) return nan1 && (!nan2 || i1 < i2);
  return v1 > v2 || (v1 == v2 && i1 < i2);
}

// v comes strictly before the value th in the top-k order, whatever the rows.
template <typename T>
__device__ __forceinline__ bool ranks_above(T v, T th) {
  return (v != v && th == th) || v > th;
}

// Number of entries of a sorted list that come before (v, i): they form a prefix.
template <typename T>
__device__ __forceinline__ int count_beating(const T* values, const int* rows, int count, T v, int i) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (beats(values[mid], rows[mid], v, i)) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ----------------------------------------------------------------------------- arguments

template <typename acc_t, typename bank_t, typename feat_t = acc_t>
struct StreamArgs {
  const feat_t* features;      // [B, D]
  const bank_t* bank;          // [N, D]
  const int64_t* labels;       // [B] (lse only)
  const int64_t* self_rows;    // [B], -1 for none
  const int64_t* bank_labels;  // [N] (lse only)
  int64_t B, N, D, Bpad;       // Bpad = B rounded up to kRows
  int num_tiles, splits;
  acc_t inv_t;
  bool tf32_only;  // tensor-core engine: one TF32 product per multiply (allowTF32CuBLAS())
  const float* queries_padded;  // tensor-core engine without queries in shared memory: [2][Bpad][Dp]
  bool with_grad;
  bool vec_ok;     // D == the engine's padded D and 16-byte aligned bank: vector loads
  int stages;      // 16-bit engine: bank tiles in flight (tile::Config::stages)
  // lse partials: stats [5][splits][Bpad] (max_same, sum_same, max_other, sum_other, non-finite
  // flags: kNanSame | kNanOther | kInfSame | kInfOther, as a small integer),
  // accumulators [2][splits][Bpad][acc_cols] (same class, other classes)
  acc_t* stats;
  acc_t* osum;
  // top-k partials: lists [splits][Bpad][2][k], candidate buffers [splits][Bpad][kTopkBuffer],
  // meta [splits][Bpad][2] (count, live buffer)
  int k;
  acc_t* list_v;
  int* list_i;
  acc_t* buf_v;
  int* buf_i;
  int* meta;
};

// ----------------------------------------------------------------------------- shared memory

// Layouts in tile_config.h, which the host uses to choose a configuration without a GPU.
template <typename acc_t>
constexpr size_t lse_common_bytes() {
  return tile::lse_common_bytes(sizeof(acc_t));
}

template <typename acc_t>
constexpr size_t topk_common_bytes() {
  return tile::topk_common_bytes(sizeof(acc_t));
}

// ----------------------------------------------------------------------------- fragments

// c[e / 4][e % 4] = value for the score e of a lane's C fragments, without a dynamic index (which
// would put c in local memory).
template <int kNt>
__device__ __forceinline__ void set_score(float (&c)[kNt][4], int e, float value) {
#pragma unroll
  for (int v = 0; v < kNt * 4; ++v) {
    if (v == e) c[v / 4][v % 4] = value;
  }
}

// The rare path of the tensor-core engines' scores (the file's "Non-finite values"): each lane's
// scores c (rows 16 (w / 2) + g (+ 8), columns 32 (w % 2) + 8 u + 2 t (+ 1) of the tile, warp w,
// lane 4 g + t) recomputed as IEEE fp32 inner products of the raw inputs, the bank rounded to
// operand_t (the engine's operand dtype: float, or the 16-bit features' dtype), and kept where
// they are not finite.
template <typename operand_t, int kNt, class Args>
__device__ void ieee_scores_where_not_finite(const Args& a, int64_t start, int n, float (&c)[kNt][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int D = static_cast<int>(a.D);
#pragma unroll 1
  for (int e = 0; e < kNt * 4; ++e) {
    const int r = (warp / 2) * 16 + g + ((e % 4) >= 2 ? 8 : 0), col = (warp % 2) * 32 + (e / 4) * 8 + 2 * t + (e % 2);
    if (row0 + r >= a.B || col >= n) continue;
    const auto* f = a.features + (row0 + r) * a.D;
    const auto* m = a.bank + (start + col) * a.D;
    float s = 0.0f;
    for (int d = 0; d < D; ++d) {
      s = fmaf(static_cast<float>(f[d]), static_cast<float>(operand_t(static_cast<float>(m[d]))), s);
    }
    if (!isfinite(s)) set_score(c, e, s);
  }
}

// The weighted-sum accumulators o[group][n-tile] (C fragments: warp w holds rows 16 (w / 2).. and
// columns (Dp / 2) (w % 2).. of the block's 64 x Dp sums) into the split's workspace rows.
template <int Dp, int kONt, class Args>
__device__ void store_weighted_sums(const Args& a, int split_id, int64_t row0, const float (&o)[2][kONt][4]) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int grp = 0; grp < 2; ++grp) {
    float* dst = a.osum + ((int64_t(grp) * a.splits + split_id) * a.Bpad + row0 + (warp / 2) * 16 + g) * Dp +
                 (warp % 2) * (Dp / 2) + 2 * t;
#pragma unroll
    for (int f = 0; f < kONt; ++f) {
      *reinterpret_cast<float2*>(dst + f * 8) = make_float2(o[grp][f][0], o[grp][f][1]);
      *reinterpret_cast<float2*>(dst + 8 * Dp + f * 8) = make_float2(o[grp][f][2], o[grp][f][3]);
    }
  }
}

// The tiles of split split_id: the first num_tiles % splits splits get one more. 32-bit
// arithmetic on purpose: a 64-bit division is a subroutine call, around which ptxas spills.
__device__ __forceinline__ void split_range(int num_tiles, int splits, int split_id, int* begin,
                                            int* end) {
  const int q = num_tiles / splits, r = num_tiles % splits;
  *begin = split_id * q + min(split_id, r);
  *end = *begin + q + (split_id < r ? 1 : 0);
}

}  // namespace
}  // namespace snca_ext
