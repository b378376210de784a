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
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"

#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// setup.py drops architectures below sm_80 from TORCH_CUDA_ARCH_LIST; this guards a manual build.
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


inline void check_common(const at::Tensor& features, const at::Tensor& bank, const at::Tensor& self_rows,
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


}  // namespace
}  // namespace snca_ext
