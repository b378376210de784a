// CUDA kernels of the fused SNCA op: the twin of csrc/cpu/snca_cpu.cpp, same contract (ops.cpp).
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
// x = hi + lo with hi = tf32(x), lo = tf32(x - hi) (24 significant bits together), and the
// products hi*hi + lo*hi (+ hi*lo for an fp32 bank) are accumulated in fp32: "3xTF32", about
// as accurate as FFMA at 2-3 tensor-core products per FFMA-equivalent, still several times
// faster than FFMA (495 vs 67 TFLOP/s on H100/H200). The softmax weights P are split the same
// way for the weighted sums. When allowTF32CuBLAS() is true (PyTorch's own matmul would then use
// TF32) a single TF32 product is used. Converting the queries to bf16/fp16 instead would lose
// 16 bits of the fp32 features and is not done.
//
// Lazy rescaling. The weighted-sum accumulators live in WMMA fragments, whose element-to-row map
// is opaque, so rescaling a row means a round trip through shared memory. The reference max of a
// group is therefore moved only when a tile's max exceeds it by more than kLazyRescale (8 logit
// units): each exp(s - ref) stays below e^8, which cannot overflow fp32 even summed over 2^31
// rows, and after the first tiles rescales become rare.
//
// Top-k (k <= kMaxFastK = 1024). Per query and split, a sorted list of up to k (value, row) lives
// in the workspace (global memory, L2-resident), double-buffered. A bank row is a candidate only
// if it beats the list's k-th value (the rejection threshold, BlockSelect style; rows arrive in
// increasing order within a split, so a tie with the k-th loses). A warp ballots the candidates
// of a row of the tile, compacts them into shared memory, and merges them into the list by rank:
// an element's new position is its old position plus the number of the other side's elements
// that beat it (binary search in the sorted list), which yields the sorted top k directly. Once
// the list is full few rows pass, so the common tile costs one ballot per query row. Larger k
// falls back to materialising B x N inner products and sorting them (documented, slow, exact).
// Order: larger value first, ties to the lower bank row; NaN is never a candidate; the query's
// own row is never a candidate; fewer than k candidates pad the tail with -inf / -1.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../checks.h"

#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "snca_ext's CUDA kernels need sm_80 or newer (TF32 tensor cores): set TORCH_CUDA_ARCH_LIST"
#endif

namespace snca_ext {
namespace {

using namespace nvcuda;

constexpr int kRows = 64;                      // queries per block
constexpr int kCols = 64;                      // bank rows per tile
constexpr int kThreads = 256;                  // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kRows / kWarps;   // query rows per warp in the row phase
constexpr int kLdS = kCols + 4;                // scores row stride (+4: rows in different banks)
constexpr int kMaxSplits = 1024;
constexpr int kMaxFastK = 1024;
constexpr float kLazyRescale = 8.0f;
constexpr unsigned kFullMask = 0xffffffffu;
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

// The top-k order: (v1, i1) comes before (v2, i2).
template <typename T>
__device__ __forceinline__ bool beats(T v1, int i1, T v2, int i2) {
  return v1 > v2 || (v1 == v2 && i1 < i2);
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
  int terms;       // tensor-core products per multiply: 1 (TF32), 2 or 3 (split precision)
  bool with_grad;
  bool vec_ok;     // D == the engine's padded D and 16-byte aligned bank: vector loads
  // lse partials: stats [5][splits][Bpad] (max_same, sum_same, max_other, sum_other, nan flag),
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

// fp32 features, fp32/bf16/fp16 bank, D <= Dp (Dp a multiple of 32). Queries and the bank tile
// sit in shared memory as fp32 (zero-padded to Dp columns and to full tiles), so every WMMA
// operand is in bounds. Warp w computes scores rows 16*(w/2).., columns 32*(w%2)..; for the
// weighted sums it owns accumulator rows 16*(w/2).. and columns (Dp/2)*(w%2)..
template <int Dp, typename bank_type>
struct TensorCoreEngine {
  static_assert(Dp % 32 == 0, "Dp must be a multiple of 32");
  using acc_t = float;
  using bank_t = bank_type;
  using Args = StreamArgs<float, bank_t>;
  static constexpr int kLd = Dp + 4;
  static constexpr int kOCols = Dp / 2;
  static constexpr int kOFrags = kOCols / 16;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragBt = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

  float* qs;       // [kRows][kLd]
  float* ms;       // [kCols][kLd]
  float* scratch;  // [kWarps][16 * 16], for rescaling fragments
  int terms;
  FragC o[2][kOFrags];

  static int64_t acc_cols(int64_t) { return Dp; }
  static size_t smem_bytes(int64_t) {
    return sizeof(float) * (size_t(kRows + kCols) * kLd + size_t(kWarps) * 256);
  }

  // hi = tf32(x) (round to nearest); lo = tf32(x - hi), the part hi misses.
  template <class Frag>
  __device__ __forceinline__ static void split(Frag& hi, Frag& lo, bool want_lo) {
#pragma unroll
    for (int t = 0; t < hi.num_elements; ++t) {
      const float x = hi.x[t];
      const float h = wmma::__float_to_tf32(x);
      hi.x[t] = h;
      lo.x[t] = want_lo ? wmma::__float_to_tf32(x - h) : 0.0f;
    }
  }

  template <class FA, class FB>
  __device__ __forceinline__ void mma(FragC& c, const FA& a_hi, const FA& a_lo, const FB& b_hi,
                                      const FB& b_lo) const {
    // The small cross terms first, so they are not lost against the large one.
    if (terms >= 2) wmma::mma_sync(c, a_lo, b_hi, c);
    if (terms == 3) wmma::mma_sync(c, a_hi, b_lo, c);
    wmma::mma_sync(c, a_hi, b_hi, c);
  }

  __device__ void init(unsigned char* smem, const Args& a, int, int64_t row0) {
    qs = reinterpret_cast<float*>(smem);
    ms = qs + kRows * kLd;
    scratch = ms + kCols * kLd;
    terms = a.terms;
    for (int e = threadIdx.x; e < kRows * Dp; e += kThreads) {
      const int r = e / Dp, d = e % Dp;
      qs[r * kLd + d] = (row0 + r < a.B && d < a.D) ? a.features[(row0 + r) * a.D + d] : 0.0f;
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
      for (int e = threadIdx.x; e < kCols * kVecPerRow; e += kThreads) {
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

  __device__ void scores(const Args&, float* ss) const {
    const int warp = threadIdx.x / 32, g = warp / 2, h = warp % 2;
    FragC c[2];
    wmma::fill_fragment(c[0], 0.0f);
    wmma::fill_fragment(c[1], 0.0f);
#pragma unroll 4
    for (int kk = 0; kk < Dp; kk += 8) {
      FragA a_hi, a_lo;
      wmma::load_matrix_sync(a_hi, qs + g * 16 * kLd + kk, kLd);
      split(a_hi, a_lo, terms >= 2);
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        FragBt b_hi, b_lo;  // M^T: element (kk + x, col) at ms[col * kLd + kk + x]
        wmma::load_matrix_sync(b_hi, ms + (h * 32 + t * 16) * kLd + kk, kLd);
        split(b_hi, b_lo, terms == 3);
        mma(c[t], a_hi, a_lo, b_hi, b_lo);
      }
    }
#pragma unroll
    for (int t = 0; t < 2; ++t) {
      wmma::store_matrix_sync(ss + g * 16 * kLdS + h * 32 + t * 16, c[t], kLdS, wmma::mem_row_major);
    }
  }

  // O = O * fac (rows whose reference max moved) + P M, for both groups.
  __device__ void accumulate(const Args&, const float* ps, const float* po, const float* fac,
                             const int* rescale) {
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
#pragma unroll 2
    for (int kk = 0; kk < kCols; kk += 8) {
      FragA s_hi, s_lo, t_hi, t_lo;
      wmma::load_matrix_sync(s_hi, ps + g * 16 * kLdS + kk, kLdS);
      wmma::load_matrix_sync(t_hi, po + g * 16 * kLdS + kk, kLdS);
      split(s_hi, s_lo, terms >= 2);
      split(t_hi, t_lo, terms >= 2);
#pragma unroll
      for (int f = 0; f < kOFrags; ++f) {
        FragB b_hi, b_lo;
        wmma::load_matrix_sync(b_hi, ms + kk * kLd + h * kOCols + f * 16, kLd);
        split(b_hi, b_lo, terms == 3);
        mma(o[0][f], s_hi, s_lo, b_hi, b_lo);
        mma(o[1][f], t_hi, t_lo, b_hi, b_lo);
      }
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
  int64_t row0 = 0, start = 0;
  int n = 0;
  acc_t* os = nullptr;  // this split's same-class accumulators, row row0
  acc_t* oo = nullptr;  // other classes

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

  __device__ void load_tile(const Args&, int64_t tile_start, int rows) {
    start = tile_start;
    n = rows;
  }

  __device__ void scores(const Args& a, acc_t* ss) const {
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
                             const int*) {
    for (int64_t e = threadIdx.x; e < kRows * a.D; e += kThreads) {
      const int r = static_cast<int>(e / a.D);
      const int64_t d = e % a.D;
      if (row0 + r >= a.B) continue;
      acc_t s = os[e] * fac[r];
      acc_t o = oo[e] * fac[kRows + r];
      for (int c = 0; c < n; ++c) {
        const acc_t m = static_cast<acc_t>(a.bank[(start + c) * a.D + d]);
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

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// lse kernel: scores/P_same [kRows][kLdS], P_other [kRows][kLdS], state [4][kRows] (max_same,
// sum_same, max_other, sum_other), fac [2][kRows], bank labels [kCols], nan flags [kRows],
// rescale flags [kRows / 16]; then the engine's part.
template <typename acc_t>
__host__ __device__ constexpr size_t lse_common_bytes() {
  return align128(sizeof(acc_t) * (2 * kRows * kLdS + 6 * kRows) + sizeof(int64_t) * kCols +
                  sizeof(int) * (kRows + kRows / 16));
}

// top-k kernel: scores [kRows][kLdS], candidates [kWarps][kCols] (value, row), threshold [kRows],
// count [kRows], live buffer [kRows]; then the engine's part.
template <typename acc_t>
__host__ __device__ constexpr size_t topk_common_bytes() {
  return align128(sizeof(acc_t) * (kRows * kLdS + kWarps * kCols + kRows) +
                  sizeof(int) * (kWarps * kCols + 2 * kRows));
}

__device__ __forceinline__ void split_range(int num_tiles, int splits, int split_id, int* begin,
                                            int* end) {
  *begin = static_cast<int>(int64_t(num_tiles) * split_id / splits);
  *end = static_cast<int>(int64_t(num_tiles) * (split_id + 1) / splits);
}

// ----------------------------------------------------------------------------- lse kernels

template <class E>
__global__ void __launch_bounds__(kThreads, 2) lse_partial_kernel(const typename E::Args a) {
  using acc_t = typename E::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* ss = reinterpret_cast<acc_t*>(smem);
  acc_t* po = ss + kRows * kLdS;
  acc_t* max_same = po + kRows * kLdS;
  acc_t* sum_same = max_same + kRows;
  acc_t* max_other = sum_same + kRows;
  acc_t* sum_other = max_other + kRows;
  acc_t* fac = sum_other + kRows;  // [2][kRows]
  int64_t* labs = reinterpret_cast<int64_t*>(fac + 2 * kRows);
  int* nan_flag = reinterpret_cast<int*>(labs + kCols);
  int* rescale = nan_flag + kRows;

  const int split_id = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  E eng;
  eng.init(smem + lse_common_bytes<acc_t>(), a, split_id, row0);
  if (tid < kRows) {
    max_same[tid] = max_other[tid] = neg_inf<acc_t>();
    sum_same[tid] = sum_other[tid] = acc_t(0);
    nan_flag[tid] = 0;
  }
  int tile_begin, tile_end;
  split_range(a.num_tiles, a.splits, split_id, &tile_begin, &tile_end);

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t start = int64_t(tile) * kCols;
    const int n = static_cast<int>(min(int64_t(kCols), a.N - start));
    __syncthreads();  // the previous tile's sums phase is done with ms, ss, po
    if (tid < kCols) labs[tid] = tid < n ? a.bank_labels[start + tid] : int64_t(0);
    if (tid < kRows / 16) rescale[tid] = 0;
    eng.load_tile(a, start, n);
    __syncthreads();
    eng.scores(a, ss);
    __syncthreads();

    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t row = row0 + r;
      if (row >= a.B) {
        if (lane == 0) fac[r] = fac[kRows + r] = acc_t(1);
        continue;
      }
      const int64_t label = a.labels[row], self = a.self_rows[row];
      acc_t vs[2], vo[2];
      bool bad = false;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        const bool in = c < n && start + c != self;
        const acc_t s = ss[r * kLdS + c] * a.inv_t;
        const bool is_nan = in && s != s;
        bad |= is_nan;
        const bool ok = in && !is_nan;
        const bool same = ok && labs[c] == label;
        vs[h] = same ? s : neg_inf<acc_t>();
        vo[h] = (ok && !same) ? s : neg_inf<acc_t>();
      }
      const acc_t tile_max_s = warp_max(fmax(vs[0], vs[1]));
      const acc_t tile_max_o = warp_max(fmax(vo[0], vo[1]));
      const acc_t old_s = max_same[r], old_o = max_other[r];
      acc_t ref_s = old_s, ref_o = old_o, f_s = 1, f_o = 1;
      if (tile_max_s > old_s + acc_t(kLazyRescale)) {
        ref_s = tile_max_s;
        f_s = rescale_factor(old_s, ref_s);
      }
      if (tile_max_o > old_o + acc_t(kLazyRescale)) {
        ref_o = tile_max_o;
        f_o = rescale_factor(old_o, ref_o);
      }
      acc_t ps[2], pov[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        ps[h] = vs[h] == neg_inf<acc_t>() ? acc_t(0) : exp_acc(vs[h] - ref_s);
        pov[h] = vo[h] == neg_inf<acc_t>() ? acc_t(0) : exp_acc(vo[h] - ref_o);
      }
      const acc_t tile_sum_s = warp_sum(ps[0] + ps[1]);
      const acc_t tile_sum_o = warp_sum(pov[0] + pov[1]);
      const bool any_bad = __any_sync(kFullMask, bad);
      if (a.with_grad) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {  // each lane overwrites only the scores it read
          ss[r * kLdS + lane + 32 * h] = ps[h];
          po[r * kLdS + lane + 32 * h] = pov[h];
        }
      }
      if (lane == 0) {
        max_same[r] = ref_s;
        max_other[r] = ref_o;
        sum_same[r] = sum_same[r] * f_s + tile_sum_s;
        sum_other[r] = sum_other[r] * f_o + tile_sum_o;
        fac[r] = f_s;
        fac[kRows + r] = f_o;
        if (any_bad) nan_flag[r] = 1;
        if (f_s != acc_t(1) || f_o != acc_t(1)) rescale[r / 16] = 1;
      }
    }
    __syncthreads();
    if (a.with_grad) eng.accumulate(a, ss, po, fac, rescale);
  }

  __syncthreads();
  if (tid < kRows && row0 + tid < a.B) {
    const int64_t plane = int64_t(a.splits) * a.Bpad;
    acc_t* st = a.stats + int64_t(split_id) * a.Bpad + row0 + tid;
    st[0 * plane] = max_same[tid];
    st[1 * plane] = sum_same[tid];
    st[2 * plane] = max_other[tid];
    st[3 * plane] = sum_other[tid];
    st[4 * plane] = acc_t(nan_flag[tid]);
  }
  if (a.with_grad) eng.store(a, split_id, row0);
}

// One block per query: merge the splits' partials in split order.
template <typename acc_t>
__global__ void lse_combine_kernel(const acc_t* stats, const acc_t* osum, int splits, int64_t Bpad,
                                   int64_t D, int64_t acc_cols, bool with_grad, acc_t* lse_same,
                                   acc_t* lse_other, acc_t* wmean_same, acc_t* wmean_other) {
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* factor = reinterpret_cast<acc_t*>(smem);  // [2][splits]
  __shared__ acc_t inv_sum[2];
  const int64_t row = blockIdx.x;
  const int64_t plane = int64_t(splits) * Bpad;
  const acc_t* st = stats + row;
  // Every thread finds the maxima itself: splits is small, and this needs no synchronisation.
  acc_t max_s = neg_inf<acc_t>(), max_o = neg_inf<acc_t>();
  bool bad = false;
  for (int s = 0; s < splits; ++s) {
    max_s = fmax(max_s, st[0 * plane + s * Bpad]);
    max_o = fmax(max_o, st[2 * plane + s * Bpad]);
    bad |= st[4 * plane + s * Bpad] != acc_t(0);
  }
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    factor[s] = rescale_factor(st[0 * plane + s * Bpad], max_s);
    factor[splits + s] = rescale_factor(st[2 * plane + s * Bpad], max_o);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum_s = 0, sum_o = 0;
    for (int s = 0; s < splits; ++s) {
      sum_s += st[1 * plane + s * Bpad] * factor[s];
      sum_o += st[3 * plane + s * Bpad] * factor[splits + s];
    }
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    lse_same[row] = bad ? nan : (sum_s > 0 ? max_s + log_acc(sum_s) : neg_inf<acc_t>());
    lse_other[row] = bad ? nan : (sum_o > 0 ? max_o + log_acc(sum_o) : neg_inf<acc_t>());
    inv_sum[0] = bad ? nan : (sum_s > 0 ? acc_t(1) / sum_s : acc_t(0));
    inv_sum[1] = bad ? nan : (sum_o > 0 ? acc_t(1) / sum_o : acc_t(0));
  }
  __syncthreads();
  if (!with_grad) return;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t ws = 0, wo = 0;
    for (int s = 0; s < splits; ++s) {
      ws += osum[(int64_t(s) * Bpad + row) * acc_cols + d] * factor[s];
      wo += osum[(int64_t(splits + s) * Bpad + row) * acc_cols + d] * factor[splits + s];
    }
    wmean_same[row * D + d] = ws * inv_sum[0];
    wmean_other[row * D + d] = wo * inv_sum[1];
  }
}

// ----------------------------------------------------------------------------- top-k kernels

// Merges n_new candidates (distinct rows, any order) into the sorted list (ov, oi, n_old),
// writing the first k of the union, sorted, to (nv, ni). Called by a whole warp.
template <typename acc_t>
__device__ void merge_candidates(const acc_t* cv, const int* ci, int n_new, const acc_t* ov,
                                 const int* oi, int n_old, acc_t* nv, int* ni, int k,
                                 acc_t* threshold, int lane) {
  for (int t = lane; t < n_new; t += 32) {
    const acc_t v = cv[t];
    const int i = ci[t];
    int rank = count_beating(ov, oi, n_old, v, i);
    for (int u = 0; u < n_new; ++u) rank += beats(cv[u], ci[u], v, i);
    if (rank < k) {
      nv[rank] = v;
      ni[rank] = i;
      if (rank == k - 1) *threshold = v;
    }
  }
  for (int p = lane; p < n_old; p += 32) {
    const acc_t v = ov[p];
    const int i = oi[p];
    int rank = p;
    for (int u = 0; u < n_new; ++u) rank += beats(cv[u], ci[u], v, i);
    if (rank < k) {
      nv[rank] = v;
      ni[rank] = i;
      if (rank == k - 1) *threshold = v;
    }
  }
}

template <class E>
__global__ void __launch_bounds__(kThreads) topk_partial_kernel(const typename E::Args a) {
  using acc_t = typename E::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* ss = reinterpret_cast<acc_t*>(smem);
  acc_t* cand_v = ss + kRows * kLdS;         // [kWarps][kCols]
  acc_t* threshold = cand_v + kWarps * kCols;  // [kRows]: the k-th value once the list is full
  int* cand_i = reinterpret_cast<int*>(threshold + kRows);
  int* count = cand_i + kWarps * kCols;
  int* live = count + kRows;  // which of the two buffers holds the list

  const int split_id = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  E eng;
  eng.init(smem + topk_common_bytes<acc_t>(), a, split_id, row0);
  if (tid < kRows) {
    threshold[tid] = neg_inf<acc_t>();
    count[tid] = 0;
    live[tid] = 0;
  }
  int tile_begin, tile_end;
  split_range(a.num_tiles, a.splits, split_id, &tile_begin, &tile_end);
  acc_t* wv = cand_v + warp * kCols;
  int* wi = cand_i + warp * kCols;
  const unsigned lanes_below = (1u << lane) - 1u;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t start = int64_t(tile) * kCols;
    const int n = static_cast<int>(min(int64_t(kCols), a.N - start));
    __syncthreads();
    eng.load_tile(a, start, n);
    __syncthreads();
    eng.scores(a, ss);
    __syncthreads();

    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t row = row0 + r;
      if (row >= a.B) continue;
      const int64_t self = a.self_rows[row];
      const int n_old = count[r];
      const bool full = n_old == a.k;
      const acc_t th = threshold[r];
      const acc_t v0 = ss[r * kLdS + lane], v1 = ss[r * kLdS + lane + 32];
      // Not full: any non-NaN value; full: strictly above the k-th (a tie has the higher row).
      const bool take0 = lane < n && start + lane != self && (full ? v0 > th : v0 == v0);
      const bool take1 = lane + 32 < n && start + lane + 32 != self && (full ? v1 > th : v1 == v1);
      const unsigned m0 = __ballot_sync(kFullMask, take0);
      const unsigned m1 = __ballot_sync(kFullMask, take1);
      const int n_new = __popc(m0) + __popc(m1);
      if (n_new == 0) continue;
      if (take0) {
        const int p = __popc(m0 & lanes_below);
        wv[p] = v0;
        wi[p] = static_cast<int>(start + lane);
      }
      if (take1) {
        const int p = __popc(m0) + __popc(m1 & lanes_below);
        wv[p] = v1;
        wi[p] = static_cast<int>(start + lane + 32);
      }
      __syncwarp();
      const int64_t base = (int64_t(split_id) * a.Bpad + row) * 2;
      const int cur = live[r];
      merge_candidates(wv, wi, n_new, a.list_v + (base + cur) * a.k, a.list_i + (base + cur) * a.k,
                       n_old, a.list_v + (base + 1 - cur) * a.k, a.list_i + (base + 1 - cur) * a.k,
                       a.k, &threshold[r], lane);
      __syncwarp();  // the merged list (global) and the threshold are visible to the whole warp
      if (lane == 0) {
        count[r] = min(a.k, n_old + n_new);
        live[r] = 1 - cur;
      }
      __syncwarp();
    }
  }

  __syncthreads();
  if (tid < kRows && row0 + tid < a.B) {
    int* m = a.meta + (int64_t(split_id) * a.Bpad + row0 + tid) * 2;
    m[0] = count[tid];
    m[1] = live[tid];
  }
}

// One block per query: merge the splits' sorted lists pairwise (a tree over the splits), then
// write the first k, padded with -inf / -1. Lists are written to the free buffer of the left
// partner, so no list is overwritten while it is read.
template <typename acc_t>
__global__ void topk_combine_kernel(acc_t* list_v, int* list_i, const int* meta, int splits,
                                    int64_t Bpad, int k, acc_t* out_v, int64_t* out_i) {
  __shared__ int count[kMaxSplits];
  __shared__ int live[kMaxSplits];
  const int64_t row = blockIdx.x;
  auto list = [&](int s, int buffer) { return ((int64_t(s) * Bpad + row) * 2 + buffer) * k; };
  for (int s = threadIdx.x; s < splits; s += blockDim.x) {
    count[s] = meta[(int64_t(s) * Bpad + row) * 2];
    live[s] = meta[(int64_t(s) * Bpad + row) * 2 + 1];
  }
  __syncthreads();
  for (int width = 1; width < splits; width *= 2) {
    for (int s = 0; s + width < splits; s += 2 * width) {
      const int ca = count[s], cb = count[s + width];
      const int64_t la = list(s, live[s]), lb = list(s + width, live[s + width]);
      const int64_t out = list(s, 1 - live[s]);
      for (int e = threadIdx.x; e < ca + cb; e += blockDim.x) {
        acc_t v;
        int i, rank;
        if (e < ca) {
          v = list_v[la + e];
          i = list_i[la + e];
          rank = e + count_beating(list_v + lb, list_i + lb, cb, v, i);
        } else {
          v = list_v[lb + e - ca];
          i = list_i[lb + e - ca];
          rank = (e - ca) + count_beating(list_v + la, list_i + la, ca, v, i);
        }
        if (rank < k) {
          list_v[out + rank] = v;
          list_i[out + rank] = i;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      for (int s = 0; s + width < splits; s += 2 * width) {
        count[s] = min(k, count[s] + count[s + width]);
        live[s] = 1 - live[s];
      }
    }
    __syncthreads();
  }
  const int c = count[0];
  const int64_t l = list(0, live[0]);
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    out_v[row * k + t] = t < c ? list_v[l + t] : neg_inf<acc_t>();
    out_i[row * k + t] = t < c ? int64_t(list_i[l + t]) : int64_t(-1);
  }
}

// ----------------------------------------------------------------------------- host side

template <class E>
struct EngineTag {
  using type = E;
};

// An attribute of the current device (ATen/cuda/CUDAContext.h would pull in the cuBLAS and
// cuSPARSE headers, which a minimal toolkit lacks).
int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

// Calls f(EngineTag<E>{}) with the engine for these dtypes and D.
template <typename F>
void with_engine(const at::Tensor& features, const at::Tensor& bank, F&& f) {
  const int64_t D = features.size(1);
  if (features.scalar_type() == at::kDouble) {
    f(EngineTag<GenericEngine<double, double>>{});
    return;
  }
  const bool tensor_cores = D <= 128 && device_attribute(cudaDevAttrComputeCapabilityMajor) >= 8;
  auto pick = [&](auto bank_tag) {
    using bank_t = typename decltype(bank_tag)::type;
    if (!tensor_cores) {
      f(EngineTag<GenericEngine<float, bank_t>>{});
    } else if (D <= 64) {
      f(EngineTag<TensorCoreEngine<64, bank_t>>{});
    } else {
      f(EngineTag<TensorCoreEngine<128, bank_t>>{});
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
  const bool tf32 = at::globalContext().allowTF32CuBLAS();
  a.terms = tf32 ? 1 : (bank.scalar_type() == at::kFloat ? 3 : 2);
  a.vec_ok = E::acc_cols(a.D) == a.D &&
             reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0;
  return a;
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

template <class E>
void launch_lse(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& indices,
                const at::Tensor& bank, const at::Tensor& bank_labels, double temperature,
                bool with_grad, at::Tensor& lse_same, at::Tensor& lse_other,
                at::Tensor& wmean_same, at::Tensor& wmean_other) {
  using acc_t = typename E::acc_t;
  auto a = make_args<E>(features, bank, indices, temperature);
  a.labels = labels.data_ptr<int64_t>();
  a.bank_labels = bank_labels.data_ptr<int64_t>();
  a.with_grad = with_grad;
  const int64_t query_blocks = a.Bpad / kRows;
  const size_t smem = lse_common_bytes<acc_t>() + E::smem_bytes(a.D);
  auto kernel = lse_partial_kernel<E>;
  a.splits = choose_splits(kernel, smem, query_blocks, a.num_tiles, kMaxSplits);
  const int64_t acc_cols = E::acc_cols(a.D);
  at::Tensor stats = at::empty({5, a.splits, a.Bpad}, features.options());
  at::Tensor osum = at::empty({with_grad ? 2 : 0, a.splits, a.Bpad, acc_cols}, features.options());
  a.stats = stats.data_ptr<acc_t>();
  a.osum = with_grad ? osum.data_ptr<acc_t>() : nullptr;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(static_cast<unsigned>(query_blocks), a.splits), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  lse_combine_kernel<acc_t><<<static_cast<unsigned>(a.B), 128, 2 * a.splits * sizeof(acc_t), stream>>>(
      a.stats, a.osum, a.splits, a.Bpad, a.D, acc_cols, with_grad, lse_same.data_ptr<acc_t>(),
      lse_other.data_ptr<acc_t>(), with_grad ? wmean_same.data_ptr<acc_t>() : nullptr,
      with_grad ? wmean_other.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <class E>
void launch_topk(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                 int64_t k, at::Tensor& values, at::Tensor& indices) {
  using acc_t = typename E::acc_t;
  auto a = make_args<E>(queries, bank, exclude, 1.0);
  a.k = static_cast<int>(k);
  const int64_t query_blocks = a.Bpad / kRows;
  const size_t smem = topk_common_bytes<acc_t>() + E::smem_bytes(a.D);
  auto kernel = topk_partial_kernel<E>;
  const int64_t split_bytes = a.Bpad * 2 * k * int64_t(sizeof(acc_t) + sizeof(int));
  const int cap = static_cast<int>(std::max<int64_t>(1, kTopkWorkspaceBytes / split_bytes));
  a.splits = choose_splits(kernel, smem, query_blocks, a.num_tiles, cap);
  at::Tensor list_v = at::empty({a.splits, a.Bpad, 2, k}, queries.options());
  at::Tensor list_i = at::empty({a.splits, a.Bpad, 2, k}, queries.options().dtype(at::kInt));
  at::Tensor meta = at::empty({a.splits, a.Bpad, 2}, queries.options().dtype(at::kInt));
  a.list_v = list_v.data_ptr<acc_t>();
  a.list_i = list_i.data_ptr<int>();
  a.meta = meta.data_ptr<int>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(static_cast<unsigned>(query_blocks), a.splits), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  topk_combine_kernel<acc_t><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
      a.list_v, a.list_i, a.meta, a.splits, a.Bpad, a.k, values.data_ptr<acc_t>(),
      indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// k > kMaxFastK: materialise the B x N inner products and sort (B x N memory). Same order and
// padding as the streaming kernels: excluded rows and NaN go last and come out as -inf / -1.
void topk_materialised(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                       int64_t k, at::Tensor& values, at::Tensor& indices) {
  const at::Tensor dots = at::mm(queries, bank.to(queries.scalar_type()).t());
  const at::Tensor rows = at::arange(bank.size(0), exclude.options());
  const at::Tensor excluded = rows.unsqueeze(0).eq(exclude.unsqueeze(1)).logical_or_(dots.isnan());
  const at::Tensor key = dots.masked_fill(excluded, -std::numeric_limits<double>::infinity());
  const at::Tensor by_value = std::get<1>(at::sort(key, /*stable=*/true, 1, /*descending=*/true));
  const at::Tensor excluded_sorted = excluded.gather(1, by_value).to(at::kByte);
  const at::Tensor eligible_first =
      std::get<1>(at::sort(excluded_sorted, /*stable=*/true, 1, /*descending=*/false));
  const at::Tensor order = by_value.gather(1, eligible_first).narrow(1, 0, k);
  const at::Tensor dropped = excluded.gather(1, order);
  values.copy_(key.gather(1, order).masked_fill_(dropped, -std::numeric_limits<double>::infinity()));
  indices.copy_(order.masked_fill(dropped, -1));
}

void run_topk(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
              int64_t k, at::Tensor& values, at::Tensor& indices) {
  if (k == 0 || queries.size(0) == 0) return;
  if (k > kMaxFastK) {
    topk_materialised(queries, bank, exclude, k, values, indices);
    return;
  }
  with_engine(queries, bank, [&](auto tag) {
    launch_topk<typename decltype(tag)::type>(queries, bank, exclude, k, values, indices);
  });
}

void check_common(const at::Tensor& features, const at::Tensor& bank, const at::Tensor& self_rows,
                  int64_t k, const char* features_name, const char* self_name) {
  check_bank_inputs(features, bank, self_rows, k, features_name, self_name);
  TORCH_CHECK(bank.size(0) < std::numeric_limits<int>::max(),
              "bank must have fewer than 2^31 - 1 rows for the CUDA backend, got ", bank.size(0));
  // The kernels only compare bank rows with these, never index with them, so an out-of-range
  // value cannot read out of bounds; the check (one device sync) is skipped under graph capture.
  if (self_rows.numel() > 0 &&
      c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None) {
    const auto [low_t, high_t] = at::aminmax(self_rows);
    const int64_t low = low_t.item<int64_t>(), high = high_t.item<int64_t>();
    TORCH_CHECK(low >= -1 && high < bank.size(0), self_name, " must be in [-1, N=", bank.size(0),
                "), got ", low < -1 ? low : high);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
snca_forward_cuda(const at::Tensor& features_in, const at::Tensor& labels_in,
                  const at::Tensor& indices_in, const at::Tensor& bank_in,
                  const at::Tensor& bank_labels_in, double temperature, bool with_grad, int64_t k) {
  TORCH_CHECK(features_in.is_cuda(), "features must be a CUDA tensor, got ", features_in.device());
  const c10::cuda::CUDAGuard guard(features_in.device());
  check_common(features_in, bank_in, indices_in, k, "features", "indices");
  check_label_inputs(features_in, labels_in, bank_in, bank_labels_in, temperature);
  const at::Tensor features = features_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor bank_labels = bank_labels_in.contiguous();

  const int64_t rows = features.size(0);
  const int64_t dim = features.size(1);
  const auto opts = features.options();
  at::Tensor lse_same = at::empty({rows}, opts);
  at::Tensor lse_other = at::empty({rows}, opts);
  at::Tensor wmean_same = at::empty({with_grad ? rows : 0, dim}, opts);
  at::Tensor wmean_other = at::empty({with_grad ? rows : 0, dim}, opts);
  at::Tensor topk_values = at::empty({rows, k}, opts);
  at::Tensor topk_indices = at::empty({rows, k}, opts.dtype(at::kLong));
  if (rows > 0) {
    with_engine(features, bank, [&](auto tag) {
      launch_lse<typename decltype(tag)::type>(features, labels, indices, bank, bank_labels,
                                               temperature, with_grad, lse_same, lse_other,
                                               wmean_same, wmean_other);
    });
    run_topk(features, bank, indices, k, topk_values, topk_indices);
  }
  return {lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices};
}

std::tuple<at::Tensor, at::Tensor> bank_topk_cuda(const at::Tensor& queries_in,
                                                  const at::Tensor& bank_in, int64_t k,
                                                  const at::Tensor& exclude_in) {
  TORCH_CHECK(queries_in.is_cuda(), "queries must be a CUDA tensor, got ", queries_in.device());
  const c10::cuda::CUDAGuard guard(queries_in.device());
  check_common(queries_in, bank_in, exclude_in, k, "queries", "exclude");
  const at::Tensor queries = queries_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor exclude = exclude_in.contiguous();
  const int64_t rows = queries.size(0);
  at::Tensor values = at::empty({rows, k}, queries.options());
  at::Tensor indices = at::empty({rows, k}, queries.options().dtype(at::kLong));
  run_topk(queries, bank, exclude, k, values, indices);
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(snca_ext, CUDA, m) {
  m.impl("snca_forward", &snca_forward_cuda);
  m.impl("bank_topk", &bank_topk_cuda);
}

}  // namespace snca_ext
