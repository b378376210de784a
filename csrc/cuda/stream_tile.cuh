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
//   lse_topk_partial_kernel  the same with the top-k partials below in the same pass (tensor-core
//                         engines, where its state fits: snca_forward.cu)
//   lse_combine_kernel    log-sum-exp combine, rescale-sum of the accumulators
//   topk_partial_kernel   per query a sorted top-k list per split, candidate buffer, threshold
//   topk_combine_kernel   pairwise (tree) merge of the sorted lists of all splits
// Each tile goes through the same phases, separated by __syncthreads:
//   load    bank tile (and its labels) into shared memory, converted to the accumulation dtype;
//           the block learns whether the tile holds a non-finite value (__syncthreads_or)
//   scores  S[64 queries x 64 bank rows] = Q M^T (raw inner products)
//   rows    softmax or top-k update: the tensor-core lse kernel on S in the MMAs' registers
//           (lse_tiles_in_registers); the others on S in shared memory, a warp per query row
//   sums    (with_grad) O_same += P_same M, O_other += P_other M
// The matrix work is done by an "engine": TensorCoreEngine (fp32 features, D <= 128,
// mma.sync TF32 with split precision, see below) or GenericEngine (fp64, any D: FMA loops).
//
// Precision of the tensor-core engine. The features are fp32, and the tests hold a backend to
// "at least as accurate as plain PyTorch in fp32", whose matmul is exact FP32 FFMA unless
// torch.backends.cuda.matmul.allow_tf32 is set. A bf16/fp16 bank value is exact in TF32 (8/11
// significant bits <= TF32's 11), so only the fp32 operands need care: each is split as
// x = hi + lo with hi = tf32(x), lo = tf32(x - hi) (22 significant bits together), and the
// products hi*hi + lo*hi (+ hi*lo for an fp32 bank) are accumulated in fp32: "3xTF32", about
// as accurate as FFMA at 2-3 tensor-core products per FFMA-equivalent, still several times
// faster than FFMA (495 vs 67 TFLOP/s on H100/H200). The softmax weights P are split the same
// way for the weighted sums. The queries, the same for every tile, are split once per block. When
// allowTF32CuBLAS() is true (PyTorch's own matmul would then use TF32) a single TF32 product is
// used. Converting the queries to bf16/fp16 instead would lose 16 bits of the fp32 features and
// is not done.
//
// Tensor-core rounding. Whether an MMA rounds its fp32 accumulation to nearest or toward zero is
// not documented (papers measure both). The MMAs therefore accumulate short chunks from zero (4
// k-steps of the scores, one 64-row tile of the weighted sums), each added into the running fp32
// fragment with an ordinary add (round to nearest): a biased rounding cannot build up over the
// bank. tests/test_cuda_emulation.py replays this arithmetic under both models and holds it to
// the accuracy rule; an accumulator carried through a split's tiles fails it under RZ.
//
// Non-finite values. The MMAs see finite operands only (inf - tf32(inf) would be NaN); a tile or a
// block of queries holding a non-finite value takes a rare path that puts the IEEE inner product
// wherever it is not finite (TensorCoreEngine::scores), so a score is +-inf or NaN exactly when
// the IEEE inner product is. Per query and group, a NaN score makes the lse NaN and a +inf one
// +inf.
//
// Lazy rescaling. The reference max of a group is moved only when a tile's max exceeds it by more
// than kLazyRescale (8 logit units): each exp(s - ref) stays below e^8, which cannot overflow fp32
// even summed over 2^31 rows, and after the first tiles rescales of the weighted-sum accumulators
// (64 registers per thread at D = 128) become rare.
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
  const float* queries_padded;  // tensor-core engine without queries in shared memory: [2][Bpad][Dp]
  bool with_grad;
  bool vec_ok;     // D == the engine's padded D and 16-byte aligned bank: vector loads
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

// ----------------------------------------------------------------------------- engines

// fp32 features, fp32/bf16/fp16 bank, D <= Dp (Dp a multiple of 32), on mma.sync.m16n8k8 TF32 (the
// fragment layouts are those of the PTX ISA, so every register's row and column is known:
// accumulators are rescaled in registers, and the fragment loads are LDS from rows padded to kLd =
// Dp + 4 words: no bank conflict, but for a 2-way one on the bank operand of the weighted sums).
// The queries are split once per block, in init, into (hi, lo) with their non-finite values as 0,
// and kept in shared memory when kQueriesInSmem, else read through L1/L2 from a copy prepared the
// same way by the host ([2][Bpad][Dp], pad_queries: the configuration for GPUs with 99 KB of shared
// memory per block, tile_config.h). The bank tile sits in shared memory as fp32, zero-padded to Dp
// columns and to full tiles. So the main loop loads ready operands: no split of the queries, none
// of a bf16/fp16 bank (exact in TF32), no finite masks. Non-finite inputs take a rare path per tile
// (scores_frag()). Warp w computes scores rows 16*(w/2).., columns 32*(w%2)..; for the weighted sums it
// owns accumulator rows 16*(w/2).. and columns (Dp/2)*(w%2)..
template <int Dp, typename bank_type, bool kQueriesInSmem>
struct TensorCoreEngine {
  static_assert(Dp % 32 == 0, "Dp must be a multiple of 32");
  using acc_t = float;
  using bank_t = bank_type;
  using Args = StreamArgs<float, bank_t>;
  static constexpr int kLd = Dp + 4;
  static constexpr int kLdQ = kQueriesInSmem ? kLd : Dp;
  static constexpr int kOCols = Dp / 2;   // accumulator columns per warp
  static constexpr int kONt = kOCols / 8;  // their n-tiles of 8
  static constexpr int kSNt = 4;           // score n-tiles of 8 per warp (32 bank rows)
  // A bf16/fp16 value is exact in TF32: the bank needs no low part, so 2 products per multiply
  // (lo(f) m + hi(f) m); an fp32 bank 3 (+ hi(f) lo(m)). Fixed at compile time, so the products a
  // bank type does not need are not in the code.
  static constexpr bool kSplitBank = std::is_same<bank_t, float>::value;

  const float* q_hi;  // [kRows][kLdQ], shared or global
  const float* q_lo;
  float* ms;          // [kCols][kLd]
  bool tf32_only;     // allowTF32CuBLAS(): one TF32 product, as PyTorch's own matmul would do
  bool queries_bad;   // a query of this block holds a non-finite value
  float o[2][kONt][4];  // C fragments of the weighted sums (same class, other classes)

  static constexpr bool kPaddedQueries = !kQueriesInSmem;
  static constexpr bool kFragmentSoftmax = true;  // the lse kernel's softmax runs on scores_frag()
  // Blocks per SM the lse kernel is compiled for: one (up to 255 registers). At Dp = 128 the
  // weighted-sum accumulators and each tile's partial take 128 registers per thread; one block
  // of 8 warps is also all that fits in shared memory on sm_80/86/89 at Dp = 128.
  static constexpr int kMinBlocks = 1;
  static int64_t acc_cols(int64_t) { return Dp; }
  static size_t smem_bytes(int64_t) { return tile::tensor_core_bytes(Dp, kQueriesInSmem); }

  // x = hi + lo with hi = tf32(x), lo = tf32(x - hi), the part hi misses, where tf32() keeps the
  // top 10 explicit mantissa bits (truncation: one LOP3, where cvt.rna.tf32 costs about four
  // instructions on sm_90; x - hi is exact, and the pair carries 22 of x's 24 significant bits,
  // accurate enough by tests/test_cuda_emulation.py). Only for finite x.
  __device__ __forceinline__ static float tf32_trunc(float x) {
    return __uint_as_float(__float_as_uint(x) & 0xffffe000u);
  }
  __device__ __forceinline__ static void split(float x, uint32_t& hi, uint32_t& lo) {
    const float h = tf32_trunc(x);
    hi = __float_as_uint(h);
    lo = __float_as_uint(tf32_trunc(x - h));
  }
  // The split A fragment of one m16n8k8 step from a row-major shared tile (rows g and g + 8,
  // columns kk + t and kk + t + 4 of the mma() layout below; p points at row g, column t).
  template <int kLdA>
  __device__ __forceinline__ static void split_a_fragment(const float* p, int kk, uint32_t (&hi)[4],
                                                          uint32_t (&lo)[4]) {
    split(p[kk], hi[0], lo[0]);
    split(p[8 * kLdA + kk], hi[1], lo[1]);
    split(p[kk + 4], hi[2], lo[2]);
    split(p[8 * kLdA + kk + 4], hi[3], lo[3]);
  }

  // c += a b: one m16n8k8 TF32 MMA. a: (g, t), (g + 8, t), (g, t + 4), (g + 8, t + 4);
  // b: (k = t, n = g), (t + 4, g); c: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1), where
  // g = lane / 4 and t = lane % 4.
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }

  // t += a b for one k-step of 8, with the small cross products first, so that they are not lost
  // against the large one. t is a chunk's accumulator, started from zero by the caller and then
  // added into the running fp32 registers with an ordinary add (round to nearest): whatever
  // rounding the tensor core applies to its own accumulation (RN or RZ, not documented) then
  // touches a short partial only, and a biased rounding cannot build up over D (scores: chunks
  // of 4 k-steps) or over the bank (weighted sums: one chunk per tile of 64 rows).
  // tests/test_cuda_emulation.py replays this arithmetic under both models. b is the finite bank
  // value (exact in TF32 for bf16/fp16), split here for an fp32 bank.
  __device__ __forceinline__ void mma_terms(float (&t)[4], const uint32_t (&a_hi)[4],
                                            const uint32_t (&a_lo)[4], float b0, float b1) const {
    uint32_t h0 = __float_as_uint(b0), h1 = __float_as_uint(b1), l0 = 0, l1 = 0;
    if (kSplitBank) {
      split(b0, h0, l0);
      split(b1, h1, l1);
    }
    if (!tf32_only) {
      mma(t, a_lo, h0, h1);
      if (kSplitBank) mma(t, a_hi, l0, l1);
    }
    mma(t, a_hi, h0, h1);
  }

  __device__ __forceinline__ static void add_into(float (&c)[4], const float (&t)[4]) {
#pragma unroll
    for (int e = 0; e < 4; ++e) c[e] += t[e];
  }

  __device__ void init(unsigned char* smem, const Args& a, int, int64_t row0) {
    float* base = reinterpret_cast<float*>(smem);
    ms = base + (kQueriesInSmem ? 2 * kRows * kLd : 0);
    tf32_only = a.tf32_only;
    bool bad = false;
    if (kQueriesInSmem) {
      float* hi = base;
      float* lo = base + kRows * kLd;
      for (int e = threadIdx.x; e < kRows * Dp; e += kThreads) {
        const int r = e / Dp, d = e % Dp;
        const float x = (row0 + r < a.B && d < a.D) ? a.features[(row0 + r) * a.D + d] : 0.0f;
        const bool finite = isfinite(x);
        bad |= !finite;
        const float h = finite ? tf32_trunc(x) : 0.0f;
        hi[r * kLd + d] = h;
        lo[r * kLd + d] = finite ? tf32_trunc(x - h) : 0.0f;
      }
      q_hi = hi;
      q_lo = lo;
    } else {
      const int D = static_cast<int>(a.D);
      const int rows = static_cast<int>(min(int64_t(kRows), a.B - row0));
      for (int e = threadIdx.x; e < rows * D; e += kThreads) bad |= !isfinite(a.features[row0 * D + e]);
      q_hi = a.queries_padded + row0 * Dp;
      q_lo = a.queries_padded + (a.Bpad + row0) * Dp;
    }
    queries_bad = __syncthreads_or(bad) != 0;
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kONt; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[grp][f][e] = 0.0f;
      }
    }
  }

  // Loads the tile as fp32 into shared memory; true when this thread met a non-finite value (the
  // caller ORs it over the block and passes it to scores()).
  __device__ bool load_tile(const Args& a, int64_t start, int n) {
    bool bad = false;
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
          for (int t = 0; t < kVec; ++t) {
            vals[t] = static_cast<float>(v[t]);
            bad |= !isfinite(vals[t]);
          }
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
        const float x = (j < n && d < a.D) ? static_cast<float>(a.bank[(start + j) * a.D + d]) : 0.0f;
        bad |= !isfinite(x);
        ms[j * kLd + d] = x;
      }
    }
    return bad;
  }

  // S = Q M^T (raw inner products) in C fragments: c[u] holds rows 16 (w / 2) + g (c[u][0..1]) and
  // + 8 (c[u][2..3]), columns 32 (w % 2) + 8 u + 2 t (+ 1) of the tile, for warp w, lane 4 g + t.
  // fix: the tile holds a non-finite bank value.
  //
  // Non-finite inputs. The MMAs see finite operands only: the queries were stored with their
  // non-finite values as 0 (init), and a tile with a non-finite value has them set to 0 here
  // first; the weighted sums use that tile too, as the contract says (a non-finite bank value
  // counts as 0; its weights are 0 anyway, its scores being non-finite). Where a query or the
  // tile held a non-finite value, each lane then recomputes its scores in IEEE fp32 from the raw
  // inputs and keeps that value where it is not finite: an inner product with a non-finite
  // operand is always +-inf or NaN (inf * 0 = NaN), so a score is non-finite exactly when the
  // IEEE inner product is, with its value. This path is rare (the block's queries or the tile are
  // not finite) and costs a plain FMA product of the tile.
  __device__ void scores_frag(const Args& a, int64_t start, int n, bool fix, float (&c)[kSNt][4]) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rg = warp / 2, h = warp % 2;
    if (fix) {
      for (int e = threadIdx.x; e < kCols * Dp; e += kThreads) {
        float& x = ms[(e / Dp) * kLd + e % Dp];
        if (!isfinite(x)) x = 0.0f;
      }
      __syncthreads();
    }
    const float* qh = q_hi + (rg * 16 + g) * kLdQ + t;
    const float* ql = q_lo + (rg * 16 + g) * kLdQ + t;
    const float* mb = ms + (h * 32 + g) * kLd + t;  // M^T: element (k, n) at ms[n * kLd + k]
#pragma unroll
    for (int u = 0; u < kSNt; ++u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) c[u][e] = 0.0f;
    }
    // Chunks of 4 k-steps (32 columns of D); the chunk loop is not unrolled: with the weighted-sum
    // accumulators live, more unrolled k-steps spill.
#pragma unroll 1
    for (int kk = 0; kk < Dp; kk += 32) {
      float acc[kSNt][4];
#pragma unroll
      for (int u = 0; u < kSNt; ++u) {
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[u][e] = 0.0f;
      }
#pragma unroll
      for (int k8 = 0; k8 < 32; k8 += 8) {
        const int k = kk + k8;
        const uint32_t a_hi[4] = {__float_as_uint(qh[k]), __float_as_uint(qh[8 * kLdQ + k]),
                                  __float_as_uint(qh[k + 4]), __float_as_uint(qh[8 * kLdQ + k + 4])};
        const uint32_t a_lo[4] = {__float_as_uint(ql[k]), __float_as_uint(ql[8 * kLdQ + k]),
                                  __float_as_uint(ql[k + 4]), __float_as_uint(ql[8 * kLdQ + k + 4])};
#pragma unroll
        for (int u = 0; u < kSNt; ++u) {
          mma_terms(acc[u], a_hi, a_lo, mb[u * 8 * kLd + k], mb[u * 8 * kLd + k + 4]);
        }
      }
#pragma unroll
      for (int u = 0; u < kSNt; ++u) add_into(c[u], acc[u]);
    }
    if (fix || queries_bad) {
      const int64_t row0 = int64_t(blockIdx.x) * kRows;
      const int D = static_cast<int>(a.D);
#pragma unroll 1
      for (int e = 0; e < kSNt * 4; ++e) {
        const int r = rg * 16 + g + ((e % 4) >= 2 ? 8 : 0), col = h * 32 + (e / 4) * 8 + 2 * t + (e % 2);
        if (row0 + r >= a.B || col >= n) continue;
        const float* f = a.features + (row0 + r) * a.D;
        const bank_t* m = a.bank + (start + col) * a.D;
        float s = 0.0f;
        for (int d = 0; d < D; ++d) s = fmaf(f[d], static_cast<float>(m[d]), s);
        if (isfinite(s)) continue;
#pragma unroll
        for (int v = 0; v < kSNt * 4; ++v) {  // c[e / 4][e % 4] = s, without a dynamic index
          if (v == e) c[v / 4][v % 4] = s;
        }
      }
    }
  }

  // The same into ss [kRows][kLdS] (the top-k kernel's row phase reads it there).
  __device__ void scores(const Args& a, float* ss, int64_t start, int n, bool fix) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float c[kSNt][4];
    scores_frag(a, start, n, fix, c);
    float* dst = ss + ((warp / 2) * 16 + g) * kLdS + (warp % 2) * 32 + 2 * t;
#pragma unroll
    for (int u = 0; u < kSNt; ++u) {
      *reinterpret_cast<float2*>(dst + u * 8) = make_float2(c[u][0], c[u][1]);
      *reinterpret_cast<float2*>(dst + 8 * kLdS + u * 8) = make_float2(c[u][2], c[u][3]);
    }
  }

  // O = O * fac + P M for both groups, P = (ps, po) [kRows][kLdS]. fac[grp][i]: the rescale factor
  // of group grp in this lane's row 16 (w / 2) + g + 8 i (the rows of its C fragments, the same
  // as in scores_frag). same_chunks[r / 16] has bit c set when some same-class weight of rows
  // 16 (r / 16).. in bank rows 8c..8c+7 is not 0: the same-class products of the other k-steps
  // would add exact zeros (all weights of the 16 x 8 block are +0) and are skipped. At 1,000
  // classes about 1 in 8 k-steps has one.
  __device__ void accumulate(const float* ps, const float* po, const float (&fac)[2][2],
                             const int* same_chunks) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rg = warp / 2, h = warp % 2;
    const bool moved = fac[0][0] != 1.0f || fac[0][1] != 1.0f || fac[1][0] != 1.0f || fac[1][1] != 1.0f;
    if (__any_sync(kFullMask, moved)) {
#pragma unroll
      for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
        for (int f = 0; f < kONt; ++f) {
          o[grp][f][0] *= fac[grp][0];
          o[grp][f][1] *= fac[grp][0];
          o[grp][f][2] *= fac[grp][1];
          o[grp][f][3] *= fac[grp][1];
        }
      }
    }
    const int same = same_chunks[rg];
    // The weights are finite and >= 0 (exp of finite scores, NaN and +inf ones are kept out), so
    // they are split without masks; the bank tile is finite (scores_frag()).
    // This tile's P M from zero (one chunk), then added into the running sums.
    float tile[2][kONt][4];
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kONt; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e) tile[grp][f][e] = 0.0f;
      }
    }
    const float* pa_s = ps + (rg * 16 + g) * kLdS + t;
    const float* pa_o = po + (rg * 16 + g) * kLdS + t;
    const float* mb = ms + t * kLd + h * kOCols + g;  // M: element (k, n) at ms[k * kLd + n]
#pragma unroll 1
    for (int kk = 0; kk < kCols; kk += 8) {
      uint32_t o_hi[4], o_lo[4];
      split_a_fragment<kLdS>(pa_o, kk, o_hi, o_lo);
#pragma unroll
      for (int f = 0; f < kONt; ++f) {
        mma_terms(tile[1][f], o_hi, o_lo, mb[kk * kLd + f * 8], mb[(kk + 4) * kLd + f * 8]);
      }
      // One branch around the whole same-class k-step: a branch between MMAs would make ptxas
      // fence each of them (WARPSYNC) and stop overlapping them.
      if ((same >> (kk / 8)) & 1) {
        uint32_t s_hi[4], s_lo[4];
        split_a_fragment<kLdS>(pa_s, kk, s_hi, s_lo);
#pragma unroll
        for (int f = 0; f < kONt; ++f) {
          mma_terms(tile[0][f], s_hi, s_lo, mb[kk * kLd + f * 8], mb[(kk + 4) * kLd + f * 8]);
        }
      }
    }
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kONt; ++f) add_into(o[grp][f], tile[grp][f]);
    }
  }

  __device__ void store(const Args& a, int split_id, int64_t row0) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int rg = warp / 2, h = warp % 2;
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
      float* dst = a.osum + ((int64_t(grp) * a.splits + split_id) * a.Bpad + row0 + rg * 16 + g) * Dp +
                   h * kOCols + 2 * t;
#pragma unroll
      for (int f = 0; f < kONt; ++f) {
        *reinterpret_cast<float2*>(dst + f * 8) = make_float2(o[grp][f][0], o[grp][f][1]);
        *reinterpret_cast<float2*>(dst + 8 * Dp + f * 8) = make_float2(o[grp][f][2], o[grp][f][3]);
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
  static constexpr bool kFragmentSoftmax = false;  // the lse kernel's row phase, through ss
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

  __device__ bool load_tile(const Args&, int64_t, int) { return false; }

  // IEEE inner products: non-finite values need no special path here.
  __device__ void scores(const Args& a, acc_t* ss, int64_t start, int n, bool) const {
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

// The current device's opt-in shared memory per block (99 KB on sm_86/89/120, 163 KB on sm_80,
// 227 KB on sm_90). The environment variable SNCA_EXT_SMEM_OPTIN may lower it (never raise it),
// so that one GPU can run the configurations of the smaller ones (benchmarks/edge_shapes.py does).
inline int device_smem_optin() {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const char* limit = std::getenv("SNCA_EXT_SMEM_OPTIN");
  return limit ? std::min(optin, std::atoi(limit)) : optin;
}

// The tile configuration for these features on the current device (tile_config.h).
inline tile::Config device_config(const at::Tensor& features) {
  const int optin = device_smem_optin();
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
// Prepared as the tensor-core engine's init prepares the queries it keeps in shared memory: planes
// [2][Bpad][Dp] of (hi, lo) = (tf32(x), tf32(x - hi)) by truncation, non-finite values as 0.
template <class E>
at::Tensor pad_queries(const at::Tensor& features, typename E::Args& a) {
  if (!E::kPaddedQueries) return at::Tensor();
  constexpr int64_t kTf32Mask = -8192;  // 0xffffe000: the sign, the exponent, 10 mantissa bits
  const at::Tensor x = at::where(features.isfinite(), features, 0.0).contiguous();
  const at::Tensor hi = at::bitwise_and(x.view(at::kInt), kTf32Mask).view(at::kFloat);
  const at::Tensor lo = at::bitwise_and((x - hi).contiguous().view(at::kInt), kTf32Mask).view(at::kFloat);
  at::Tensor padded = at::zeros({2, a.Bpad, E::acc_cols(a.D)}, features.options());
  padded.select(0, 0).narrow(0, 0, a.B).narrow(1, 0, a.D).copy_(hi);
  padded.select(0, 1).narrow(0, 0, a.B).narrow(1, 0, a.D).copy_(lo);
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
