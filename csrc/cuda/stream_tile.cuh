// What the CUDA kernels of both ops share (snca_forward.cu, bank_topk.cu): the tile constants, the
// device helpers, the matrix engines, the shared-memory layouts and the launch helpers.
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
//   lse_combine_kernel    log-sum-exp combine, rescale-sum of the accumulators
//   topk_partial_kernel   per query a sorted top-k list per split, rejection threshold
//   topk_combine_kernel   pairwise (tree) merge of the sorted lists of all splits
//
// Each tile goes through the same phases, separated by __syncthreads:
//   load    bank tile (and its labels) into shared memory, converted to the accumulation dtype
//   scores  S[64 queries x 64 bank rows] = Q M^T into shared memory (raw inner products)
//   rows    each warp takes 8 query rows: softmax update or top-k update, lanes over the columns
//   sums    (with_grad) O_same += P_same M, O_other += P_other M
// The matrix work is done by an "engine": TensorCoreEngine (fp32 features, D <= 128, WMMA TF32
// with split precision, see below) or GenericEngine (fp64, any D: plain FMA loops).
//
// Precision of the tensor-core engine. The features are fp32, and the tests hold a backend to
// "at least as accurate as plain PyTorch in fp32", whose matmul is exact FP32 FFMA unless
// torch.backends.cuda.matmul.allow_tf32 is set. A bf16/fp16 bank value is exact in TF32 (8/11
// significant bits <= TF32's 11), so only the fp32 operands need care: each is split as
// x = hi + lo with hi = tf32(x), lo = tf32(x - hi) (22 significant bits together), and the
// products hi*hi + lo*hi (+ hi*lo for an fp32 bank) are accumulated in fp32: "3xTF32", about
// as accurate as FFMA at 2-3 tensor-core products per FFMA-equivalent, still several times
// faster than FFMA (495 vs 67 TFLOP/s on H100/H200). The softmax weights P are split the same
// way for the weighted sums. When allowTF32CuBLAS() is true (PyTorch's own matmul would then use
// TF32) a single TF32 product is used. Converting the queries to bf16/fp16 instead would lose
// 16 bits of the fp32 features and is not done.
//
// Tensor-core rounding. Whether an MMA rounds its fp32 accumulation to nearest or toward zero is
// not documented (papers measure both). The MMAs therefore accumulate short chunks from zero (4
// k-steps of the scores, one 64-row tile of the weighted sums), each added into the running fp32
// fragment with an ordinary add (round to nearest): a biased rounding cannot build up over the
// bank. tests/test_cuda_emulation.py replays this arithmetic under both models and holds it to
// the accuracy rule; an accumulator carried through a split's tiles fails it under RZ.
//
// Non-finite values. Only finite values are split (inf - tf32(inf) would be NaN), and the cross
// products use the finite part of the other operand, so a score is +-inf or NaN exactly when the
// IEEE inner product is. Per query and group, a NaN score makes the lse NaN and a +inf one +inf.
//
// Lazy rescaling. The weighted-sum accumulators live in WMMA fragments, whose element-to-row map
// is opaque, so rescaling a row means a round trip through shared memory. The reference max of a
// group is therefore moved only when a tile's max exceeds it by more than kLazyRescale (8 logit
// units): each exp(s - ref) stays below e^8, which cannot overflow fp32 even summed over 2^31
// rows, and after the first tiles rescales become rare.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "tile_config.h"

#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

// setup.py drops architectures below sm_80 from TORCH_CUDA_ARCH_LIST; this guards a manual build.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "snca_ext's CUDA kernels need sm_80 or newer (TF32 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace snca_ext {
namespace {

using namespace nvcuda;

using tile::kCols;
using tile::kLdS;
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

template <typename acc_t, typename bank_t>
struct StreamArgs {
  const acc_t* features;       // [B, D]
  const bank_t* bank;          // [N, D]
  const int64_t* labels;       // [B] (lse only)
  const int64_t* self_rows;    // [B], -1 for none
  const int64_t* bank_labels;  // [N] (lse only)
  int64_t B, N, D, Bpad;       // Bpad = B rounded up to kRows
  int num_tiles, splits;
  acc_t inv_t;
  bool tf32_only;  // tensor-core engine: one TF32 product per multiply (allowTF32CuBLAS())
  const float* queries_padded;  // tensor-core engine without queries in shared memory: [Bpad, Dp]
  bool with_grad;
  bool vec_ok;     // D == the engine's padded D and 16-byte aligned bank: vector loads
  // lse partials: stats [5][splits][Bpad] (max_same, sum_same, max_other, sum_other, non-finite
  // flags: kNanSame | kNanOther | kInfSame | kInfOther, as a small integer),
  // accumulators [2][splits][Bpad][acc_cols] (same class, other classes)
  acc_t* stats;
  acc_t* osum;
  // top-k partials: lists [splits][Bpad][2][k], meta [splits][Bpad][2] (count, live buffer)
  int k;
  acc_t* list_v;
  int* list_i;
  int* meta;
};

// ----------------------------------------------------------------------------- engines

// fp32 features, fp32/bf16/fp16 bank, D <= Dp (Dp a multiple of 32). The bank tile sits in
// shared memory as fp32 (zero-padded to Dp columns and to full tiles); the queries too when
// kQueriesInSmem, else they are read through L1/L2 from a copy zero-padded to [Bpad, Dp] (the
// configuration for GPUs with 99 KB of shared memory per block, tile_config.h). So every WMMA
// operand is in bounds. Warp w computes scores rows 16*(w/2).., columns 32*(w%2)..; for the
// weighted sums it owns accumulator rows 16*(w/2).. and columns (Dp/2)*(w%2)..
template <int Dp, typename bank_type, bool kQueriesInSmem>
struct TensorCoreEngine {
  static_assert(Dp % 32 == 0, "Dp must be a multiple of 32");
  using acc_t = float;
  using bank_t = bank_type;
  using Args = StreamArgs<float, bank_t>;
  static constexpr int kLd = Dp + 4;
  static constexpr int kLdQ = kQueriesInSmem ? kLd : Dp;
  static constexpr int kOCols = Dp / 2;
  static constexpr int kOFrags = kOCols / 16;
  // A bf16/fp16 value is exact in TF32: the bank needs no low part, so 2 products per multiply
  // (lo(f) m + hi(f) m); an fp32 bank 3 (+ hi(f) lo(m)). Fixed at compile time, so the products a
  // bank type does not need are not in the code.
  static constexpr bool kSplitBank = std::is_same<bank_t, float>::value;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  const float* qs;  // [kRows][kLdQ], shared or global
  float* ms;        // [kCols][kLd]
  float* scratch;   // [kWarps][16 * 16], for rescaling fragments
  bool tf32_only;   // allowTF32CuBLAS(): one TF32 product, as PyTorch's own matmul would do
  FragC o[2][kOFrags];

  static constexpr bool kPaddedQueries = !kQueriesInSmem;
  // Blocks per SM the lse kernel is compiled for: one (up to 255 registers). At Dp = 128 the
  // weighted-sum accumulators and each tile's partial take 128 registers per thread, and at
  // Dp = 64 two blocks (128 registers) spill on sm_80; one block of 8 warps is also all that
  // fits in shared memory on sm_80/86/89 at Dp = 128.
  static constexpr int kMinBlocks = 1;
  static int64_t acc_cols(int64_t) { return Dp; }
  static size_t smem_bytes(int64_t) { return tile::tensor_core_bytes(Dp, kQueriesInSmem); }

  // x = hi + lo with hi = tf32(x), lo = tf32(x - hi), the part hi misses, where tf32() keeps the
  // top 10 explicit mantissa bits (truncation: one LOP3, where cvt.rna.tf32 costs about four
  // instructions on sm_90; x - hi is exact, and the pair carries 22 of x's 24 significant bits,
  // accurate enough by tests/test_cuda_emulation.py). fin is hi for a finite x and 0 otherwise.
  // A non-finite x keeps hi = x (a NaN whose payload sits in the low bits must not become inf)
  // and gets lo = 0 (x - hi would be NaN); the cross products use fin, so that inf * 0 = NaN can
  // only come from the main product hi * hi, exactly where the IEEE inner product has it.
  __device__ __forceinline__ static float tf32_trunc(float x) {
    return __uint_as_float(__float_as_uint(x) & 0xffffe000u);
  }

  template <class Frag>
  __device__ __forceinline__ static void split(Frag& hi, Frag& lo, Frag& fin) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float x = hi.x[t];
      const bool finite = isfinite(x);
      const float h = finite ? tf32_trunc(x) : x;
      hi.x[t] = h;
      lo.x[t] = finite ? tf32_trunc(x - h) : 0.0f;
      fin.x[t] = finite ? h : 0.0f;
    }
  }

  // (hi, lo) only: for operands whose cross products need no finite part (see accumulate).
  template <class Frag>
  __device__ __forceinline__ static void split(Frag& hi, Frag& lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float x = hi.x[t];
      const bool finite = isfinite(x);
      const float h = finite ? tf32_trunc(x) : x;
      hi.x[t] = h;
      lo.x[t] = finite ? tf32_trunc(x - h) : 0.0f;
    }
  }

  // fin only: the bank operand of an unsplit (bf16/fp16) bank in the cross product lo(f) m.
  template <class Frag>
  __device__ __forceinline__ static void finite_part(const Frag& x, Frag& fin) {
#pragma unroll
    for (int t = 0; t < x.num_elements; ++t) fin.x[t] = isfinite(x.x[t]) ? x.x[t] : 0.0f;
  }

  // t += a b for one k-step of 8, with the small cross products first, so that they are not lost
  // against the large one. t is a chunk's accumulator, started from zero by the caller and then
  // added into the running fp32 fragment with an ordinary add (round to nearest): whatever
  // rounding the tensor core applies to its own accumulation (RN or RZ, not documented) then
  // touches a short partial only, and a biased rounding cannot build up over D (scores: chunks
  // of 4 k-steps) or over the bank (weighted sums: one chunk per tile of 64 rows).
  // tests/test_cuda_emulation.py replays this arithmetic under both models.
  template <class FA, class FB>
  __device__ __forceinline__ void mma_terms(FragC& t, const FA& a_hi, const FA& a_lo, const FA& a_fin,
                                            const FB& b_hi, const FB& b_lo, const FB& b_fin) const {
    if (!tf32_only) {
      wmma::mma_sync(t, a_lo, b_fin, t);
      if (kSplitBank) wmma::mma_sync(t, a_fin, b_lo, t);
    }
    wmma::mma_sync(t, a_hi, b_hi, t);
  }

  __device__ __forceinline__ static void add_into(FragC& c, const FragC& t) {
#pragma unroll
    for (int e = 0; e < c.num_elements; ++e) c.x[e] += t.x[e];
  }

  // The bank operand of the weighted sums: (hi, lo) with non-finite values as 0. A bank row
  // holding inf or NaN has a non-finite score for every query, hence weight exactly 0 (its group
  // is flagged instead), and the contract says such a row contributes nothing: as 0 it cannot
  // make 0 * inf = NaN in the other queries' sums.
  __device__ __forceinline__ void load_bank(FragB& b_hi, FragB& b_lo, const float* ptr) const {
    FragB raw;
    wmma::load_matrix_sync(raw, ptr, kLd);
    if (kSplitBank) {
      split(raw, b_lo, b_hi);  // b_hi = fin(raw); the unmasked hi left in raw is not used
    } else {
      finite_part(raw, b_hi);
    }
  }

  // Loads the bank-side fragment and prepares (hi, lo, fin) for this bank type.
  template <class FB>
  __device__ __forceinline__ void load_bank(FB& b_hi, FB& b_lo, FB& b_fin, const float* ptr) const {
    wmma::load_matrix_sync(b_hi, ptr, kLd);
    if (kSplitBank) {
      split(b_hi, b_lo, b_fin);
    } else {
      finite_part(b_hi, b_fin);  // exact in TF32 already: no rounding, no low part
    }
  }

  __device__ void init(unsigned char* smem, const Args& a, int, int64_t row0) {
    float* q_smem = reinterpret_cast<float*>(smem);
    ms = q_smem + (kQueriesInSmem ? kRows * kLd : 0);
    scratch = ms + kCols * kLd;
    tf32_only = a.tf32_only;
    if (kQueriesInSmem) {
      for (int e = threadIdx.x; e < kRows * Dp; e += kThreads) {
        const int r = e / Dp, d = e % Dp;
        q_smem[r * kLd + d] = (row0 + r < a.B && d < a.D) ? a.features[(row0 + r) * a.D + d] : 0.0f;
      }
      qs = q_smem;
    } else {
      qs = a.queries_padded + row0 * Dp;
    }
#pragma unroll
    for (int g = 0; g < 2; ++g) {
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) wmma::fill_fragment(o[g][f], 0.0f);
    }
  }

  __device__ void load_tile(const Args& a, int64_t start, int n) {
    if (a.vec_ok) {
      constexpr int kVec = 16 / sizeof(bank_t);
      constexpr int kVecPerRow = Dp / kVec;
      static_assert(kCols * kVecPerRow % kThreads == 0, "whole vectors per thread");
#pragma unroll
      for (int it = 0; it < kCols * kVecPerRow / kThreads; ++it) {
        const int e = threadIdx.x + it * kThreads;
        const int j = e / kVecPerRow, d0 = (e % kVecPerRow) * kVec;
        float vals[kVec];
        if (j < n) {
          const uint4 raw = __ldg(reinterpret_cast<const uint4*>(a.bank + (start + j) * Dp + d0));
          const bank_t* v = reinterpret_cast<const bank_t*>(&raw);
#pragma unroll
          for (int t = 0; t < kVec; ++t) vals[t] = static_cast<float>(v[t]);
        } else {
#pragma unroll
          for (int t = 0; t < kVec; ++t) vals[t] = 0.0f;
        }
        float4* dst = reinterpret_cast<float4*>(ms + j * kLd + d0);
#pragma unroll
        for (int t = 0; t < kVec / 4; ++t) {
          dst[t] = make_float4(vals[4 * t], vals[4 * t + 1], vals[4 * t + 2], vals[4 * t + 3]);
        }
      }
    } else {
      for (int e = threadIdx.x; e < kCols * Dp; e += kThreads) {
        const int j = e / Dp, d = e % Dp;
        ms[j * kLd + d] =
            (j < n && d < a.D) ? static_cast<float>(a.bank[(start + j) * a.D + d]) : 0.0f;
      }
    }
  }

  __device__ void scores(const Args&, float* ss, int64_t, int) const {
    const int warp = threadIdx.x / 32, g = warp / 2, h = warp % 2;
    FragC c[2];
    wmma::fill_fragment(c[0], 0.0f);
    wmma::fill_fragment(c[1], 0.0f);
    // Chunks of 4 k-steps (32 columns of D); the chunk loop is not unrolled: with the weighted-sum
    // accumulators live, more unrolled k-steps spill.
#pragma unroll 1
    for (int kk = 0; kk < Dp; kk += 32) {
      FragC t[2];
      wmma::fill_fragment(t[0], 0.0f);
      wmma::fill_fragment(t[1], 0.0f);
#pragma unroll
      for (int k8 = kk; k8 < kk + 32; k8 += 8) {
        FragA a_hi, a_lo, a_fin;
        wmma::load_matrix_sync(a_hi, qs + g * 16 * kLdQ + k8, kLdQ);
        split(a_hi, a_lo, a_fin);
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          FragBt b_hi, b_lo, b_fin;  // M^T: element (k8 + x, col) at ms[col * kLd + k8 + x]
          load_bank(b_hi, b_lo, b_fin, ms + (h * 32 + u * 16) * kLd + k8);
          mma_terms(t[u], a_hi, a_lo, a_fin, b_hi, b_lo, b_fin);
        }
      }
      add_into(c[0], t[0]);
      add_into(c[1], t[1]);
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::store_matrix_sync(ss + g * 16 * kLdS + h * 32 + t * 16, c[t], kLdS, wmma::mem_row_major);
    }
  }

  // O = O * fac (rows whose reference max moved) + P M, for both groups.
  __device__ void accumulate(const Args&, const float* ps, const float* po, const float* fac,
                             const int* rescale, int64_t, int) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = warp / 2, h = warp % 2;
    if (rescale[g]) {
      float* sc = scratch + warp * 256;
#pragma unroll
      for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
        for (int f = 0; f < kOFrags; ++f) {
          wmma::store_matrix_sync(sc, o[grp][f], 16, wmma::mem_row_major);
          __syncwarp();
          for (int e = lane; e < 256; e += 32) sc[e] *= fac[grp * kRows + g * 16 + e / 16];
          __syncwarp();
          wmma::load_matrix_sync(o[grp][f], sc, 16, wmma::mem_row_major);
          __syncwarp();
        }
      }
    }
    // The weights are finite (exp of finite scores; NaN and +inf scores are kept out), so their
    // hi is its own finite part; the bank operand comes finite from load_bank.
    // This tile's P M from zero (one chunk), then added into the running sums.
    FragC tile[2][kOFrags];
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) wmma::fill_fragment(tile[grp][f], 0.0f);
    }
#pragma unroll 1
    for (int kk = 0; kk < kCols; kk += 8) {
      FragA s_hi, s_lo, t_hi, t_lo;
      wmma::load_matrix_sync(s_hi, ps + g * 16 * kLdS + kk, kLdS);
      wmma::load_matrix_sync(t_hi, po + g * 16 * kLdS + kk, kLdS);
      split(s_hi, s_lo);
      split(t_hi, t_lo);
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) {
        FragB b_hi, b_lo;
        load_bank(b_hi, b_lo, ms + kk * kLd + h * kOCols + f * 16);
        mma_terms(tile[0][f], s_hi, s_lo, s_hi, b_hi, b_lo, b_hi);
        mma_terms(tile[1][f], t_hi, t_lo, t_hi, b_hi, b_lo, b_hi);
      }
    }
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) add_into(o[grp][f], tile[grp][f]);
    }
  }

  __device__ void store(const Args& a, int split_id, int64_t row0) const {
    const int warp = threadIdx.x / 32, g = warp / 2, h = warp % 2;
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) {
        float* dst = a.osum + ((int64_t(grp) * a.splits + split_id) * a.Bpad + row0 + g * 16) * Dp +
                     h * kOCols + f * 16;
        wmma::store_matrix_sync(dst, o[grp][f], Dp, wmma::mem_row_major);
      }
    }
  }
};

// Any D, fp64 (or fp32 with D > 128): scalar FMA loops reading the inputs through the cache and
// keeping the accumulators of the block's rows in the workspace. Correct, not fast.
template <typename acc_type, typename bank_type>
struct GenericEngine {
  using acc_t = acc_type;
  using bank_t = bank_type;
  using Args = StreamArgs<acc_t, bank_t>;
  // The tile's start and row count come as arguments, not members: a member written in one call
  // and read in the next was kept in local memory (a stack frame) by ptxas.
  int64_t row0 = 0;
  acc_t* os = nullptr;  // this split's same-class accumulators, row row0
  acc_t* oo = nullptr;  // other classes

  static constexpr bool kPaddedQueries = false;
  static constexpr int kMinBlocks = 2;
  static int64_t acc_cols(int64_t D) { return D; }
  static size_t smem_bytes(int64_t) { return 0; }

  __device__ void init(unsigned char*, const Args& a, int split_id, int64_t first_row) {
    row0 = first_row;
    if (!a.with_grad) return;
    os = a.osum + (int64_t(split_id) * a.Bpad + row0) * a.D;
    oo = a.osum + (int64_t(a.splits + split_id) * a.Bpad + row0) * a.D;
    for (int64_t e = threadIdx.x; e < kRows * a.D; e += kThreads) {
      os[e] = acc_t(0);
      oo[e] = acc_t(0);
    }
  }

  __device__ void load_tile(const Args&, int64_t, int) {}

  __device__ void scores(const Args& a, acc_t* ss, int64_t start, int n) const {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      acc_t s = 0;
      if (row0 + r < a.B && c < n) {
        const acc_t* f = a.features + (row0 + r) * a.D;
        const bank_t* m = a.bank + (start + c) * a.D;
        for (int64_t d = 0; d < a.D; ++d) s += f[d] * static_cast<acc_t>(m[d]);
      }
      ss[r * kLdS + c] = s;
    }
  }

  __device__ void accumulate(const Args& a, const acc_t* ps, const acc_t* po, const acc_t* fac,
                             const int*, int64_t start, int n) {
    for (int64_t e = threadIdx.x; e < kRows * a.D; e += kThreads) {
      const int r = static_cast<int>(e / a.D);
      const int64_t d = e % a.D;
      if (row0 + r >= a.B) continue;
      acc_t s = os[e] * fac[r];
      acc_t o = oo[e] * fac[kRows + r];
      for (int c = 0; c < n; ++c) {
        // As in the tensor-core engine: a non-finite bank value has weight 0 and counts as 0.
        const acc_t raw = static_cast<acc_t>(a.bank[(start + c) * a.D + d]);
        const acc_t m = isfinite(raw) ? raw : acc_t(0);
        s += ps[r * kLdS + c] * m;
        o += po[r * kLdS + c] * m;
      }
      os[e] = s;
      oo[e] = o;
    }
  }

  __device__ void store(const Args&, int, int64_t) const {}
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

// The tiles of split split_id: the first num_tiles % splits splits get one more. 32-bit
// arithmetic on purpose: a 64-bit division is a subroutine call, around which ptxas spills.
__device__ __forceinline__ void split_range(int num_tiles, int splits, int split_id, int* begin,
                                            int* end) {
  const int q = num_tiles / splits, r = num_tiles % splits;
  *begin = split_id * q + min(split_id, r);
  *end = *begin + q + (split_id < r ? 1 : 0);
}


// ----------------------------------------------------------------------------- host side

template <class E>
struct EngineTag {
  using type = E;
};

// An attribute of the current device (ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a minimal toolkit lacks).
inline int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// The tile configuration for these features on the current device: from its opt-in shared memory
// per block (99 KB on sm_86/89/120, 163 KB on sm_80, 227 KB on sm_90), tile_config.h.
inline tile::Config device_config(const at::Tensor& features) {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const tile::Config c = tile::choose_config(features.size(1), features.scalar_type() == at::kDouble, optin);
  TORCH_CHECK(c.fits, "snca_ext's CUDA kernels need ", std::max(c.lse_smem, c.topk_smem),
              " bytes of shared memory per block; this GPU allows ", optin);
  return c;
}

// Calls f(EngineTag<E>{}) with the engine of configuration c for these dtypes.
template <typename F>
void with_engine(const at::Tensor& features, const at::Tensor& bank, const tile::Config& c, F&& f) {
  if (features.scalar_type() == at::kDouble) {
    f(EngineTag<GenericEngine<double, double>>{});
    return;
  }
  auto pick = [&](auto bank_tag) {
    using bank_t = typename decltype(bank_tag)::type;
    if (!c.tensor_cores) {
      f(EngineTag<GenericEngine<float, bank_t>>{});
    } else if (c.dp == 64) {
      f(EngineTag<TensorCoreEngine<64, bank_t, true>>{});
    } else if (c.queries_in_smem) {
      f(EngineTag<TensorCoreEngine<128, bank_t, true>>{});
    } else {
      f(EngineTag<TensorCoreEngine<128, bank_t, false>>{});
    }
  };
  switch (bank.scalar_type()) {
    case at::kFloat:
      pick(EngineTag<float>{});
      break;
    case at::kBFloat16:
      pick(EngineTag<c10::BFloat16>{});
      break;
    case at::kHalf:
      pick(EngineTag<c10::Half>{});
      break;
    default:
      TORCH_CHECK(false, "bank dtype ", bank.scalar_type(), " is not supported");
  }
}

template <class E>
typename E::Args make_args(const at::Tensor& features, const at::Tensor& bank,
                           const at::Tensor& self_rows, double temperature) {
  using acc_t = typename E::acc_t;
  using bank_t = typename E::bank_t;
  typename E::Args a{};
  a.features = features.data_ptr<acc_t>();
  a.bank = bank.data_ptr<bank_t>();
  a.self_rows = self_rows.data_ptr<int64_t>();
  a.B = features.size(0);
  a.N = bank.size(0);
  a.D = features.size(1);
  a.Bpad = (a.B + kRows - 1) / kRows * kRows;
  a.num_tiles = static_cast<int>((a.N + kCols - 1) / kCols);
  a.inv_t = static_cast<acc_t>(1.0 / temperature);
  a.tf32_only = at::globalContext().allowTF32CuBLAS();
  a.vec_ok = E::acc_cols(a.D) == a.D &&
             reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0;
  return a;
}

// The zero-padded [Bpad, Dp] copy of the queries for an engine that reads them from global memory
// (an undefined tensor for the others); it must stay alive until the kernels have run.
template <class E>
at::Tensor pad_queries(const at::Tensor& features, typename E::Args& a) {
  if (!E::kPaddedQueries) return at::Tensor();
  at::Tensor padded = at::zeros({a.Bpad, E::acc_cols(a.D)}, features.options());
  padded.narrow(0, 0, a.B).narrow(1, 0, a.D).copy_(features);
  a.queries_padded = padded.data_ptr<float>();
  return padded;
}

// Enough splits for every SM to hold as many blocks as fit, at most one per tile.
template <typename Kernel>
int choose_splits(Kernel kernel, size_t smem, int64_t query_blocks, int num_tiles, int cap) {
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem));
  TORCH_CHECK(per_sm > 0, "snca_ext CUDA kernel does not fit on this GPU (", smem,
              " bytes of shared memory per block)");
  const int64_t target = int64_t(device_attribute(cudaDevAttrMultiProcessorCount)) * per_sm;
  const int64_t splits = (target + query_blocks - 1) / query_blocks;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({splits, num_tiles, cap, kMaxSplits})));
}


inline void check_common(const at::Tensor& features, const at::Tensor& bank, const at::Tensor& self_rows,
                         int64_t k, const char* features_name, const char* self_name) {
  check_bank_inputs(features, bank, self_rows, k, features_name, self_name);
  TORCH_CHECK(bank.size(0) < std::numeric_limits<int>::max(),
              "bank must have fewer than 2^31 - 1 rows for the CUDA backend, got ", bank.size(0));
  // The kernels only compare bank rows with these, never index with them, so an out-of-range
  // value cannot read out of bounds. Checked on the device: reading the range on the host would
  // synchronise every call (and could not run under CUDA graph capture).
  if (self_rows.numel() > 0) {
    const std::string message =
        std::string(self_name) + " must be in [-1, N=" + std::to_string(bank.size(0)) + ")";
    at::_assert_async(at::logical_and(self_rows.ge(-1), self_rows.lt(bank.size(0))).all(), message);
  }
}

}  // namespace
}  // namespace snca_ext
