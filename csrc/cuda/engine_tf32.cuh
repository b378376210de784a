// The tensor-core engine of fp32 features (D <= 128): mma.sync m16n8k8 TF32 with split precision.
// The tile loop that drives it and the split-KV design: stream_common.cuh, snca_forward.cu.
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
#pragma once

#include "stream_common.cuh"

namespace snca_ext {
namespace {


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
  using feat_t = float;
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
  static size_t smem_bytes(int64_t, int) { return tile::tensor_core_bytes(Dp, kQueriesInSmem); }
  static constexpr bool kStagesLabels = false;  // the lse kernel loads each tile's labels
  static constexpr bool kFastWeights = false;   // the lse kernel's weights with expf (fp32 contract)
  static constexpr bool kSkipsEmptySame = true;  // accumulate() skips chunks without a same-class weight

  // The lse kernel's softmax hands this lane's weights of row `row`, tile columns col and col + 1,
  // to the weighted sums: fp32 [kRows][kLdS] planes, same class and other classes.
  __device__ __forceinline__ static void put_weights(float* ps, float* po, int row, int col, float p0,
                                                     float p1, bool s0, bool s1) {
    const int at = row * kLdS + col;
    *reinterpret_cast<float2*>(ps + at) = make_float2(s0 ? p0 : 0.0f, s1 ? p1 : 0.0f);
    *reinterpret_cast<float2*>(po + at) = make_float2(s0 ? 0.0f : p0, s1 ? 0.0f : p1);
  }

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
    if (fix || queries_bad) ieee_scores_where_not_finite<float>(a, start, n, c);
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
    store_weighted_sums<Dp>(a, split_id, row0, o);
  }
};

}  // namespace
}  // namespace snca_ext
