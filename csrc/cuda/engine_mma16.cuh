// The tensor-core engine of bf16/fp16 features (D <= 128; the op upcasts 16-bit features with
// D > 128 to fp32 and the generic engine takes them): the arithmetic of plain PyTorch under
// torch.autocast, on mma.sync.aligned.m16n8k16 with fp32 accumulation.
//
// Semantics (the features' dtype decides, as autocast does). The bank is read in the features'
// dtype: a bank of that dtype as it is, an fp32 bank or one of the other 16-bit dtype rounded to
// it at the tile load (round to nearest even, as bank.to(dtype) would). A score is one 16-bit
// MMA per product: the products of two 16-bit values are exact and the MMA adds them in fp32.
// The softmax state (reference maxima, sums) is fp32; the softmax weights P = exp(s - ref) <= 1
// are rounded to the features' dtype for the two weighted sums (as FlashAttention and an autocast
// matmul P.to(dtype) @ M.to(dtype) do; exp(s - ref) >= the normalised weight, so fp16 underflows
// no more often than autocast's), accumulated in fp32. The reference is the running maximum
// itself, not the fp32 engine's lazy one (kLazyRescale): the largest weight is then exactly 1,
// as autocast's dominant normalised weight is nearly, where a lazy reference leaves it anywhere
// in [1, e^8] with a mantissa that bf16 rounds by up to 2^-8. In the emulation at T = 0.005 that
// made the gradient's error twice autocast's; with the running maximum it is a sixth of it. The
// extra rescales cost nothing on the common path: the weighted sums fold each tile in with an
// FFMA by the factor (accumulate()) and the sums take it in their FFMA.
//
// Tensor-core rounding (stream_common.cuh). The scores start from zero in every tile and carry
// their accumulator through D only (8 k-steps at D = 128, 4 at D <= 64): a biased rounding of the
// MMA's accumulation then touches at most 8 additions of exact products whose inputs were rounded
// to 8 (bf16) or 11 (fp16) significant bits, negligible against that rounding. The weighted sums
// accumulate one tile (4 k-steps of 16 bank rows) from zero and add it into the running fp32
// registers with an ordinary add (round to nearest), as the fp32 engine does: over a split's
// hundreds of tiles an RZ bias would build up. tests/test_cuda_emulation.py replays both under RN
// and RZ accumulation.
//
// Fragments. Each operand is read from shared memory with ldmatrix (.x4: four 8 x 8 matrices of
// 16-bit values, lane l giving the address of row l % 8 of matrix l / 8), which yields exactly the
// m16n8k16 layouts of the PTX ISA (lane 4 g + t, g = lane / 4, t = lane % 4):
//   A (row-major 16 x 16): a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..), a2 = (g, 2t+8..), a3 = (g + 8, 2t+8..)
//   B (16 x 8, "col"):     b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C (fp32 16 x 8):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g + 8, 2t..)   (as m16n8k8: the lse
//                          kernel's softmax runs on these registers unchanged)
// Scores S = Q M^T: A = the queries [row][d], B = the bank tile [bank row][d] (k = d contiguous:
// the "col" layout, plain ldmatrix). Weighted sums O = P M: A = P [row][bank row], B = the bank
// tile with k = bank row, n = d, stored with n contiguous: ldmatrix .trans, which hands lane 4 g + t
// the elements (2t..2t+1, g) of each 8 x 8 matrix, the b0/b1 layout.
//
// Bank conflicts. Every 16-bit plane (queries, bank stages, the weights P) has rows padded by 16
// bytes (tile::kPad16): row strides of 272 (D = 128), 144 (D = 64, P) bytes, both 16 modulo 128,
// so the 8 rows of one ldmatrix matrix start in 8 distinct 16-byte groups of the 128-byte bank
// window: conflict-free, for the plain and the .trans loads alike (padding costs 1 KB per tile,
// where an XOR swizzle would cost an address computation per load). The cp.async writes of a warp
// cover whole 256-byte rows: each quarter-warp phase writes 128 contiguous bytes, conflict-free.
// The weights' 32-bit stores (lane 4 g + t: word 36 g + t + const) hit 32 distinct banks.
//
// Feeding the tensor cores. A bank tile in the features' dtype is half the bytes of the fp32
// engine's fp32 tile (17,408 bytes at D = 128 with the padding), which pays for a cp.async
// pipeline: tile i + S - 1 (and its labels) is copied (cp.async.cg, 16 bytes, straight from L2
// to shared memory, no registers) while tile i is computed, S = 3 stages where they fit (sm_80,
// sm_90: 108,416 bytes with the lse state at D = 128) and 2 elsewhere (sm_86/89/120: 90,496).
// A bank of another dtype (fp32, or the other 16-bit one) cannot go through cp.async, which does
// not convert: it is loaded, rounded and stored by the threads into the tile's stage (the
// converting path, synchronous: no N x D converted copy of the bank is made); so is a bank whose
// rows are not whole 16-byte vectors (D != 64, 128 or a misaligned pointer).
// Why 8 warps of 16 x 32 scores and 16 x Dp/2 accumulators each, one block per SM at D = 128: the
// two groups' weighted-sum accumulators take 2 x Dp/2 x 16 / 32 = 64 registers per thread at
// D = 128, the two groups' chunks of a tile 16 more and their weights' A fragments 32 (shared B
// fragments, accumulate()); with the scores (16), the class masks (8), the queries' A fragments
// (32: kept in registers for the whole split at D = 128, 8 ldmatrix a tile fewer) and the softmax
// state the lse kernel uses about 250 registers (static_report.py), so it is compiled for one
// block of 8 warps per SM at D = 128 (kMinBlocks: two would cap it at 128 registers), and for two
// at D = 64 (128 registers, 75,648 bytes of shared memory: there the queries' fragments are read
// from shared memory each tile, and the top-k pass, which spilled, is compiled for one block).
// Inside a block the pipeline hides the bank's latency: the report puts the tile at about 765
// warp-instructions per warp, ~1,530 issue cycles per SM for 8 warps on 4 schedulers, against
// ~1,300 cycles to stream its 17 KB at an SM's share of an H100's HBM bandwidth; 2 tiles in flight
// cover the latency (a GPU run must confirm it).
//
// Non-finite values: the contract of the fp32 engine (stream_common.cuh). The MMAs see finite
// operands only: non-finite queries are stored as 0 (queries_bad), and every thread checks the
// bank chunks it copied (exponent all ones); a tile holding one has those values set to 0, then
// each lane recomputes its scores in IEEE fp32 from the raw inputs (the bank rounded to the
// features' dtype) and keeps that value where it is not finite.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "stream_common.cuh"

namespace snca_ext {
namespace {

namespace mma16 {

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8 x 8 matrices of 16-bit values; lane l gives the address of row l % 8 of matrix l / 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// The same, each matrix transposed (lane 4 g + t receives its elements (2t, g), (2t + 1, g)).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

// Four 8 x 8 matrices of 16-bit values to shared memory (sm_90): the inverse of ldmatrix_x4, lane
// 4 g + t giving elements (g, 2 t..2 t + 1) of matrix j in r_j, lane l the address of row l % 8 of
// matrix l / 8.
__device__ __forceinline__ void stmatrix_x4(uint32_t address, uint32_t r0, uint32_t r1, uint32_t r2,
                                            uint32_t r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1,%2,%3,%4};\n" ::"r"(address), "r"(r0),
               "r"(r1), "r"(r2), "r"(r3)
               : "memory");
#endif
}

// 16 bytes global -> shared without registers; bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

// 8 bytes (a bank label): cp.async.cg takes 16-byte copies only, .ca takes 4, 8 or 16.
__device__ __forceinline__ void cp_async_8(uint32_t dst, const void* src, int bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Until at most `pending` of this thread's groups are in flight (an immediate in PTX). The
// "memory" clobber keeps the compiler from moving a read of the copied bytes above the wait:
// load_tile() reads a thread's own chunks right after it, with no barrier between.
__device__ __forceinline__ void cp_async_wait(int pending) {
  if (pending >= 2) {
    asm volatile("cp.async.wait_group 2;\n" ::: "memory");
  } else if (pending == 1) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  }
}

// The 16-bit formats: the MMA's type name, the packing of two fp32 values (round to nearest even;
// the first value in the low half: the lower column), and the non-finite test on packed pairs.
template <typename T>
struct Format;

template <>
struct Format<c10::BFloat16> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  // Bit 15 or 31 set where that half's exponent is all ones: (e & mask) + one carries into the
  // top bit of the half only then, and never across halves.
  __device__ __forceinline__ static uint32_t non_finite(uint32_t w) {
    return ((w & 0x7f807f80u) + 0x00800080u) & 0x80008000u;
  }
  // Per half the larger, NaN if either is NaN (max.NaN.bf16x2, sm_80+).
  __device__ __forceinline__ static uint32_t max_nan(uint32_t x, uint32_t y) {
    uint32_t r;
    asm("max.NaN.bf16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(y));
    return r;
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Format<c10::Half> {
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static uint32_t non_finite(uint32_t w) {
    return ((w & 0x7c007c00u) + 0x04000400u) & 0x80008000u;
  }
  __device__ __forceinline__ static uint32_t max_nan(uint32_t x, uint32_t y) {
    uint32_t r;
    asm("max.NaN.f16x2 %0, %1, %2;\n" : "=r"(r) : "r"(x), "r"(y));
    return r;
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

}  // namespace mma16

// Warp w computes scores rows 16 (w / 2).., columns 32 (w % 2).. of the tile (the fp32 engine's
// layout, which the lse kernel's softmax reads), and owns the weighted-sum accumulator rows
// 16 (w / 2).., columns (Dp / 2) (w % 2)..
template <int Dp, typename feat_type, typename bank_type>
struct Mma16Engine {
  static_assert(Dp == 64 || Dp == 128, "Dp must be 64 or 128");
  using acc_t = float;
  using feat_t = feat_type;
  using bank_t = bank_type;
  using Args = StreamArgs<float, bank_t, feat_t>;
  using F = mma16::Format<feat_t>;
  static constexpr int kLd = Dp + tile::kPad16;     // 16-bit elements per row of the queries and tiles
  static constexpr int kLdP = kCols + tile::kPad16;  // per row of the weights P (in the fp32 planes)
  static constexpr int kOCols = Dp / 2;              // accumulator columns per warp
  static constexpr int kONt = kOCols / 8;            // their n-tiles of 8
  static constexpr int kSNt = 4;                     // score n-tiles of 8 per warp (32 bank rows)
  static constexpr int kSharedGroups = Dp == 128 ? 2 : 1;  // groups per B fragment (accumulate())
  static constexpr int kChunksPerRow = Dp / 8;       // 16-byte vectors per bank row
  static constexpr int kChunksPerThread = kCols * kChunksPerRow / kThreads;
  static constexpr bool kCopies = std::is_same<feat_t, bank_t>::value;  // cp.async can take the bank
  static_assert(kCols * kChunksPerRow % kThreads == 0, "whole vectors per thread");

  static constexpr bool kPaddedQueries = false;
  static constexpr bool kFragmentSoftmax = true;
  static constexpr bool kStagesLabels = true;  // each stage holds its tile's labels
  static constexpr bool kFastWeights = true;   // the lse kernel's weights_fast(), exp_fast, lane sums
  static constexpr bool kSkipsEmptySame = false;  // accumulate() does both groups every tile
  static constexpr int kMinBlocks = Dp == 64 ? 2 : 1;
  static int64_t acc_cols(int64_t) { return Dp; }
  static size_t smem_bytes(int64_t, int stages) { return tile::mma16_bytes(Dp, stages); }

  feat_t* qs;              // [kRows][kLd]
  feat_t* tiles;           // [stages][kCols][kLd]
  int64_t* labels;         // [stages][kCols]
  int stages;
  int tile_end;
  int next;                // the next tile to prefetch
  int stage;               // the stage of the current tile
  bool direct;             // cp.async path (the bank's dtype, whole aligned vectors)
  bool queries_bad;        // a query of this block holds a non-finite value
  float o[2][kONt][4];     // C fragments of the weighted sums (same class, other classes)
  // At D = 128 (one block an SM: up to 255 registers) the queries' A fragments stay in registers.
  static constexpr bool kQueryFragments = Dp == 128;
  uint32_t qf[kQueryFragments ? Dp / 16 : 1][4];

  __device__ feat_t* tile_at(int s) const { return tiles + s * kCols * kLd; }
  __device__ const int64_t* tile_labels() const { return labels + stage * kCols; }

  // This lane's weights of the tile, rounded to the features' dtype and packed in pairs (packed[u][i]:
  // row 16 rg + g + 8 i, tile columns 32 h + 8 u + 2 t, + 1: the C fragments' places), into the
  // first bytes of the fp32 planes ps (same class: the halves that same_mask keeps) and po (the
  // others) as [kRows][kLdP] rows of 16-bit values. On sm_90 with stmatrix, the inverse of the
  // accumulate() ldmatrix: matrix j of x4 number p holds rows 8 (j % 2).., columns 8 (2 p + j / 2)..
  // of the warp's 16 x 32 block, which the lane's registers packed[2 p + j / 2][j % 2] are, and lane
  // l gives the address of row l % 8 of matrix l / 8 (4 instructions where 16 stores take 16).
  __device__ __forceinline__ static void store_weights(float* ps, float* po, int rg, int h, int lane,
                                                       const uint32_t (&packed)[kSNt][2],
                                                       const uint32_t (&same_mask)[kSNt][2]) {
    // stmatrix on sm_90 at D = 128 (at D = 64, 128 registers, its x4 operands' 8 live registers
    // made the top-k kernel spill).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    constexpr bool kStmatrix = Dp == 128;
#else
    constexpr bool kStmatrix = false;
#endif
    if constexpr (kStmatrix) {
      const int j = lane / 8;
      const int at = (rg * 16 + 8 * (j % 2) + lane % 8) * kLdP + h * 32 + 8 * (j / 2);
      const uint32_t s_addr = mma16::smem_address(reinterpret_cast<feat_t*>(ps) + at);
      const uint32_t o_addr = mma16::smem_address(reinterpret_cast<feat_t*>(po) + at);
#pragma unroll
      for (int p = 0; p < kSNt / 2; ++p) {
        uint32_t w[4], m[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          w[r] = packed[2 * p + r / 2][r % 2];
          m[r] = same_mask[2 * p + r / 2][r % 2];
        }
        mma16::stmatrix_x4(s_addr + 2 * 16 * p, w[0] & m[0], w[1] & m[1], w[2] & m[2], w[3] & m[3]);
        mma16::stmatrix_x4(o_addr + 2 * 16 * p, w[0] & ~m[0], w[1] & ~m[1], w[2] & ~m[2], w[3] & ~m[3]);
      }
    } else {
      const int g = lane / 4, t = lane % 4;
#pragma unroll
      for (int u = 0; u < kSNt; ++u) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int at = ((rg * 16 + g + 8 * i) * kLdP + h * 32 + 8 * u + 2 * t) / 2;
          reinterpret_cast<uint32_t*>(ps)[at] = packed[u][i] & same_mask[u][i];
          reinterpret_cast<uint32_t*>(po)[at] = packed[u][i] & ~same_mask[u][i];
        }
      }
    }
  }

  // Starts the copies of tile `tile` into stage s: its labels always, the tile itself when the bank
  // can go as it is (else load_tile converts it); one commit group per call, empty past the
  // split's end, so that the wait counts stay uniform.
  __device__ void prefetch(const Args& a, int tile, int s) {
    if (tile < tile_end) {
      const int64_t start = int64_t(tile) * kCols;
      const int n = static_cast<int>(min(int64_t(kCols), a.N - start));
      if (threadIdx.x < kCols) {
        mma16::cp_async_8(mma16::smem_address(labels + s * kCols + threadIdx.x),
                          a.bank_labels + start + threadIdx.x, int(threadIdx.x) < n ? 8 : 0);
      }
      if (direct) {
        const int j0 = threadIdx.x / kChunksPerRow, v = threadIdx.x % kChunksPerRow;
        const uint32_t dst = mma16::smem_address(tile_at(s) + j0 * kLd + v * 8);
        const bank_t* src = a.bank + (start + j0) * Dp + v * 8;
        constexpr int kRowStep = kThreads / kChunksPerRow;
        // Rows past the bank's end are zero-filled: a copy of 0 bytes reads nothing from its source
        // address (which may then point past the bank).
#pragma unroll
        for (int it = 0; it < kChunksPerThread; ++it) {
          mma16::cp_async_16(dst + 2 * it * kRowStep * kLd, src + it * kRowStep * Dp,
                             j0 + it * kRowStep < n ? 16 : 0);
        }
      }
    }
    mma16::cp_async_commit();
  }

  __device__ void init(unsigned char* smem, const Args& a, int split_id, int64_t row0) {
    stages = a.stages;
    qs = reinterpret_cast<feat_t*>(smem);
    tiles = qs + kRows * kLd;
    labels = reinterpret_cast<int64_t*>(tiles + stages * kCols * kLd);
    direct = kCopies && a.vec_ok;
    int tile_begin;
    split_range(a.num_tiles, a.splits, split_id, &tile_begin, &tile_end);
    next = tile_begin;
    stage = stages - 1;
    bool bad = false;
    for (int e = threadIdx.x; e < kRows * Dp; e += kThreads) {
      const int r = e / Dp, d = e % Dp;
      const bool inside = row0 + r < a.B && d < a.D;
      const float x = inside ? static_cast<float>(a.features[(row0 + r) * a.D + d]) : 0.0f;
      const bool finite = isfinite(x);
      bad |= !finite;
      qs[r * kLd + d] = feat_t(finite ? x : 0.0f);
    }
    queries_bad = __syncthreads_or(bad) != 0;
    if constexpr (kQueryFragments) {
#pragma unroll
      for (int k = 0; k < Dp; k += 16) mma16::ldmatrix_x4(qf[k / 16], query_fragments_address() + 2 * k);
    }
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int f = 0; f < kONt; ++f) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[grp][f][e] = 0.0f;
      }
    }
    // The pipeline's first stages (the lse kernel's first __syncthreads orders them after init).
    for (int s = 0; s + 1 < stages; ++s) prefetch(a, next++, s);
  }

  // Makes tile (start / kCols) ready in its stage: starts the copy of the tile stages - 1 ahead
  // into the stage the previous tile used (free: the tile loop's __syncthreads precedes this), then
  // waits for this tile's copies. True when this thread met a non-finite value in the chunks it
  // copied (the caller ORs it over the block, which also publishes every thread's copies).
  __device__ bool load_tile(const Args& a, int64_t start, int n) {
    stage = stage + 1 == stages ? 0 : stage + 1;
    prefetch(a, next++, stage == 0 ? stages - 1 : stage - 1);
    mma16::cp_async_wait(stages - 1);
    feat_t* ms = tile_at(stage);
    if (direct) {
      // The largest magnitude of this thread's chunks, NaN if one holds a NaN (two instructions
      // per pair of values): not finite exactly when one of them is not.
      uint32_t top = 0;
      constexpr int kRowStep = kThreads / kChunksPerRow;
      const feat_t* mine = ms + (threadIdx.x / kChunksPerRow) * kLd + (threadIdx.x % kChunksPerRow) * 8;
#pragma unroll
      for (int it = 0; it < kChunksPerThread; ++it) {
        const uint4 v = *reinterpret_cast<const uint4*>(mine + it * kRowStep * kLd);
        top = F::max_nan(top, F::max_nan(v.x & 0x7fff7fffu, v.y & 0x7fff7fffu));
        top = F::max_nan(top, F::max_nan(v.z & 0x7fff7fffu, v.w & 0x7fff7fffu));
      }
      return F::non_finite(top) != 0;
    }
    uint32_t bad = 0;
    // The converting path: rounded to the features' dtype (as bank.to(dtype)), zero-padded.
#pragma unroll 1
    for (int e = threadIdx.x; e < kCols * Dp; e += kThreads) {
      const int j = e / Dp, d = e % Dp;
      const feat_t x = feat_t((j < n && d < a.D) ? static_cast<float>(a.bank[(start + j) * a.D + d]) : 0.0f);
      bad |= !isfinite(static_cast<float>(x));
      ms[j * kLd + d] = x;
    }
    return bad != 0;
  }

  // Lane l's ldmatrix address for the queries' A fragments (k-step 0): row l % 8 (+ 8 for
  // matrices 1 and 3) of the warp's 16 rows, column 8 (l / 16).
  __device__ uint32_t query_fragments_address() const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    return mma16::smem_address(qs + ((warp / 2) * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * kLd + 8 * (lane / 16));
  }

  // S = Q M^T (raw inner products) in C fragments: c[u] holds rows 16 (w / 2) + g (c[u][0..1]) and
  // + 8 (c[u][2..3]), columns 32 (w % 2) + 8 u + 2 t (+ 1) of the tile, for warp w, lane 4 g + t.
  // fix: the tile holds a non-finite bank value (see the file's comment).
  __device__ void scores_frag(const Args& a, int64_t start, int n, bool fix, float (&c)[kSNt][4]) const {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int rg = warp / 2, h = warp % 2;
    feat_t* ms = tile_at(stage);
    if (fix) {
#pragma unroll 1
      for (int e = threadIdx.x; e < kCols * Dp; e += kThreads) {
        feat_t& x = ms[(e / Dp) * kLd + e % Dp];
        if (!isfinite(static_cast<float>(x))) x = feat_t(0.0f);
      }
      __syncthreads();
    }
#pragma unroll
    for (int u = 0; u < kSNt; ++u) {
#pragma unroll
      for (int e = 0; e < 4; ++e) c[u][e] = 0.0f;
    }
    // Lane l addresses row l % 8 (+ 8 for matrices 1 and 3) of the A operand, column 8 (l / 16):
    // matrices (rows 0-7, k 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15) = a0..a3. For B, row
    // l % 8 of n-tile 2 p + l / 16, column 8 ((l / 8) % 2): matrices (n-tile 2p, k 0-7), (2p, 8-15),
    // (2p + 1, 0-7), (2p + 1, 8-15) = b0, b1 of n-tile 2p, b0, b1 of 2p + 1.
    const int qrow = rg * 16 + lane % 8 + 8 * ((lane / 8) % 2), mrow = h * 32 + 8 * (lane / 16) + lane % 8;
    const uint32_t qa = mma16::smem_address(qs + qrow * kLd + 8 * (lane / 16));
    const uint32_t mb = mma16::smem_address(ms + mrow * kLd + 8 * ((lane / 8) % 2));
#pragma unroll
    for (int k = 0; k < Dp; k += 16) {
      uint32_t af[4];
      if constexpr (kQueryFragments) {
#pragma unroll
        for (int r = 0; r < 4; ++r) af[r] = qf[k / 16][r];
      } else {
        mma16::ldmatrix_x4(af, qa + 2 * k);
      }
#pragma unroll
      for (int p = 0; p < kSNt / 2; ++p) {
        uint32_t bf[4];
        mma16::ldmatrix_x4(bf, mb + 2 * (p * 16 * kLd + k));
        F::mma(c[2 * p], af, bf[0], bf[1]);
        F::mma(c[2 * p + 1], af, bf[2], bf[3]);
      }
    }
    if (fix || queries_bad) ieee_scores_where_not_finite<feat_t>(a, start, n, c);
  }

  // O = O * fac + P M for both groups, P = the 16-bit weights store_weights() left in ps, po.
  // fac[grp][i]: the rescale factor of group grp in this lane's row 16 (w / 2) + g + 8 i. Each
  // accumulator n-tile pair takes the tile's 4 k-steps from zero (the chunk), then is folded into
  // the running sums with one FFMA (the rescale rides on it: fac is 1 in most tiles, and then the
  // FFMA is the plain add). At D = 128 the two groups share every B fragment (one ldmatrix for 4
  // MMAs; kSharedGroups); at D = 64, compiled for 2 blocks an SM (128 registers), the second
  // group's 16 A-fragment registers would spill, so the groups take turns. Neither group is
  // skipped: a skip of the same-class products where no row of the warp has a same-class weight
  // would save little (with 16 rows of distinct labels among 1,000 classes, some row meets its
  // class in 64 % of the tiles; at 10 classes in all of them) and would cost the groups' shared
  // fragment loads.
  __device__ void accumulate(const float* ps, const float* po, const float (&fac)[2][2], const int*) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int rg = warp / 2, h = warp % 2;
    // A = P rows 16 rg.., k = bank rows (the lanes' addresses as for the queries in scores_frag).
    // B = the tile, k = bank row 16 kk + l % 8 (+ 8 for matrices 1 and 3), n = columns
    // kOCols h + 8 (l / 16): matrices (k 0-7, n-tile 2p), (8-15, 2p), (0-7, 2p + 1), (8-15, 2p + 1).
    const int arow = (rg * 16 + lane % 8 + 8 * ((lane / 8) % 2)) * kLdP + 8 * (lane / 16);
    const uint32_t mb = mma16::smem_address(tile_at(stage) + (lane % 8 + 8 * ((lane / 8) % 2)) * kLd +
                                            h * kOCols + 8 * (lane / 16));
    const uint32_t pa[2] = {mma16::smem_address(reinterpret_cast<const feat_t*>(ps) + arow),
                            mma16::smem_address(reinterpret_cast<const feat_t*>(po) + arow)};
#pragma unroll
    for (int g0 = 0; g0 < 2; g0 += kSharedGroups) {
      uint32_t ap[kSharedGroups][4][4];  // [group g0 + j][k-step]
#pragma unroll
      for (int j = 0; j < kSharedGroups; ++j) {
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) mma16::ldmatrix_x4(ap[j][kk], pa[g0 + j] + 2 * 16 * kk);
      }
#pragma unroll
      for (int p = 0; p < kONt / 2; ++p) {
        float tile[kSharedGroups][2][4] = {};  // [group g0 + j][n-tile of the pair]
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t bf[4];
          mma16::ldmatrix_x4_trans(bf, mb + 2 * (kk * 16 * kLd + p * 16));
#pragma unroll
          for (int j = 0; j < kSharedGroups; ++j) {
            F::mma(tile[j][0], ap[j][kk], bf[0], bf[1]);
            F::mma(tile[j][1], ap[j][kk], bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int j = 0; j < kSharedGroups; ++j) {
#pragma unroll
          for (int f = 0; f < 2; ++f) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              o[g0 + j][2 * p + f][e] = fmaf(o[g0 + j][2 * p + f][e], fac[g0 + j][e / 2], tile[j][f][e]);
            }
          }
        }
      }
    }
  }

  __device__ void store(const Args& a, int split_id, int64_t row0) const {
    store_weighted_sums<Dp>(a, split_id, row0, o);
  }
};

}  // namespace
}  // namespace snca_ext
