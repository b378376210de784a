// CUDA kernels of snca_forward: the twin of csrc/cpu's, same contract (csrc/ops.cpp). The tile
// loop and the split-KV design are described in stream_common.cuh, the engines in engine_*.cuh. With
// k > 0 the top-k (topk_tile.cuh) runs inside the lse pass where its state fits
// (lse_topk_partial_kernel), else as a second pass over the bank (bank_topk.cu).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "bank_topk.h"
#include "stream_launch.cuh"
#include "topk_tile.cuh"

namespace snca_ext {
namespace {

// ----------------------------------------------------------------------------- lse kernels

// The lse kernel's tile loop for the generic engine: the softmax row by row from the scores in
// shared memory, a warp per query row, the lanes over the columns.
template <class E>
__device__ __forceinline__ void lse_tiles_by_rows(const typename E::Args& a) {
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
    const bool fix = __syncthreads_or(eng.load_tile(a, start, n)) != 0;
    eng.scores(a, ss, start, n, fix);
    __syncthreads();

    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t row = row0 + r;
      if (row >= a.B) {
        if (lane == 0) fac[r] = fac[kRows + r] = acc_t(1);
        if (a.with_grad) {  // zero weights: the padding rows' sums read defined memory (initcheck)
          ss[r * kLdS + lane] = ss[r * kLdS + lane + 32] = acc_t(0);
          po[r * kLdS + lane] = po[r * kLdS + lane + 32] = acc_t(0);
        }
        continue;
      }
      const int64_t label = a.labels[row], self = a.self_rows[row];
      acc_t vs[2], vo[2];
      int flags = 0;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int c = lane + 32 * h;
        const bool in = c < n && start + c != self;
        const acc_t s = ss[r * kLdS + c] * a.inv_t;
        const bool same = in && labs[c] == label;
        // NaN and +inf are flagged for their group (its lse is then NaN or +inf, whatever the
        // rest) and kept out of the sums, which would turn them into NaN for the whole group.
        const bool summed = in && (s == s) && s != std::numeric_limits<acc_t>::infinity();
        if (in && s != s) flags |= same ? kNanSame : kNanOther;
        if (in && s == std::numeric_limits<acc_t>::infinity()) flags |= same ? kInfSame : kInfOther;
        vs[h] = (summed && same) ? s : neg_inf<acc_t>();
        vo[h] = (summed && !same) ? s : neg_inf<acc_t>();
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
        // One exp per score: a score is in one group at most (the other holds -inf there).
        const bool in_same = vs[h] != neg_inf<acc_t>();
        const acc_t v = in_same ? vs[h] : vo[h];
        const acc_t e = v == neg_inf<acc_t>() ? acc_t(0) : exp_acc(v - (in_same ? ref_s : ref_o));
        ps[h] = in_same ? e : acc_t(0);
        pov[h] = in_same ? acc_t(0) : e;
      }
      const acc_t tile_sum_s = warp_sum(ps[0] + ps[1]);
      const acc_t tile_sum_o = warp_sum(pov[0] + pov[1]);
      flags = static_cast<int>(__reduce_or_sync(kFullMask, static_cast<unsigned>(flags)));
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
        nan_flag[r] |= flags;
        if (f_s != acc_t(1) || f_o != acc_t(1)) rescale[r / 16] = 1;
      }
    }
    __syncthreads();
    if (a.with_grad) eng.accumulate(a, ss, po, fac, rescale, start, n);
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

// The row phase, in two parts around the exchange of the maxima: rows_fast (both tensor-core
// engines) and weights_fast (the 16-bit engine, E::kFastWeights; the fp32 engine's weights take
// expf on s = c / T in the tile loop, for its fp32 contract). About 10 instructions per score where
// the per-score tests of eligibility and non-finite values took 20 (the 16-bit engine's MMAs leave
// the row phase most of the tile's instructions: gpu_checks/static_report.py --profile). Per score,
// on the common path:
//   rows_fast     the label comparison (2: int64), the group's maximum (1: a predicated max) and
//                 the group's 16-bit lane mask (1)
//   weights_fast  the group's bit (1), exp(c / T - ref) (FFMA + FMUL + MUFU: 3), the group's sum (1,
//                 predicated), half a 16-bit pack and the mask of each plane (1.5), the stores (1)
// - Eligibility leaves the common path: a lane whose two rows are queries, in a whole tile that
//   holds neither row's own bank row, masks nothing; any other lane (the bank's last tile, the one
//   tile of a row's own bank row, the padding rows of the last query block) sets its ineligible
//   scores to -inf in a loop of its own, and -inf then weighs exactly 0 everywhere below.
// - The maxima are taken on the raw inner products c (s = c / T is monotone in c, and so is its
//   rounding) with max.NaN: a NaN score reaches its group's maximum, a score that is +inf or
//   overflows to it makes the scaled maximum +inf, so the four scaled maxima tell a lane whether
//   it holds a non-finite score. Such a lane flags them for their group (its lse is then NaN or
//   +inf, whatever the rest), replaces them by -inf and takes its maxima again, in a loop of its
//   own (rare: a NaN/inf input or an fp32 overflow of the scores).
// - The group of a score is kept as a 16-bit lane mask per pair of columns (0xffff in the half of
//   a same-class score), which selects the two planes' weights from one packed pair (one LOP3
//   each) where a select per score and group and a pack per plane would take twice as many.
// - exp(s - ref) = 2^((s - ref) log2 e) on the MUFU unit (ex2.approx.ftz: about 2 ulp, results
//   below 2^-126 flushed to 0, which a sum with a term >= e^-8 cannot see): the weights are
//   rounded to 8 (bf16) or 11 (fp16) bits for the weighted sums anyway, and s - ref is formed
//   first (exactly, for the terms near the maximum), so the exponent's error stays at the level
//   of the fp32 score's own rounding. (Folding log2 e into 1/T would save the FMUL but overflow
//   for finite scores above 2^127 / log2 e.) A reference still at -inf (no member yet) counts as 0.
// tests/test_cuda_emulation.py replays this arithmetic (the MUFU's own rounding aside).
// Whether value q (0, 1) of a pair is in its row's class: one bit of its half of rows_fast()'s mask.
__device__ __forceinline__ bool same_class(uint32_t mask, int q) { return (mask & (q ? 0x80000000u : 1u)) != 0; }

__device__ __forceinline__ float max_nan(float x, float y) {
  float r;
  asm("max.NaN.f32 %0, %1, %2;\n" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

// Lane 4 g + t of warp half h holds, per row i (R_i), the columns w0 + 8 u + q, w0 = 32 h + 2 t.
// self_tile[i]: the tile of row i's own bank row (-1: none); tile: this tile; both_valid: the
// lane's two rows are queries.
template <int kNt, class Args>
__device__ __forceinline__ void rows_fast(const Args& a, float (&c)[kNt][4], const int64_t* lab,
                                          const int64_t (&label)[2], bool both_valid, const bool (&valid)[2],
                                          const int64_t (&self)[2], const int (&self_tile)[2], int tile,
                                          int64_t start, int n, int h, int t, int (&flags)[2],
                                          uint32_t (&same_mask)[kNt][2], float (&tmax)[2][2]) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  const int w0 = h * 32 + 2 * t;
  if (!(both_valid && n == kCols && tile != self_tile[0] && tile != self_tile[1])) {
#pragma unroll 1
    for (int e = 0; e < kNt * 4; ++e) {
      const int i = (e % 4) / 2, col = w0 + 8 * (e / 4) + e % 2;
      const bool in = (i ? valid[1] : valid[0]) && col < n && start + col != (i ? self[1] : self[0]);
      if (!in) set_score(c, e, -kInf);
    }
  }
  const int64_t* lab_t = lab + w0;
#pragma unroll
  for (int u = 0; u < kNt; ++u) {
    const longlong2 pair = *reinterpret_cast<const longlong2*>(lab_t + 8 * u);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint32_t mask = 0;
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        if ((q ? pair.y : pair.x) == label[i]) {
          tmax[0][i] = max_nan(tmax[0][i], c[u][2 * i + q]);
          mask |= 0xffffu << (16 * q);
        } else {
          tmax[1][i] = max_nan(tmax[1][i], c[u][2 * i + q]);
        }
      }
      same_mask[u][i] = mask;
    }
  }
  bool finite = true;
#pragma unroll
  for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tmax[grp][i] *= a.inv_t;
      finite &= tmax[grp][i] < kInf;  // false for NaN too; -inf: an empty group
    }
  }
  if (!finite) {
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) tmax[grp][i] = -kInf;
    }
#pragma unroll 1
    for (int e = 0; e < kNt * 4; ++e) {
      float x = 0.0f;
      uint32_t mask = 0;
#pragma unroll
      for (int v = 0; v < kNt * 4; ++v) {  // without a dynamic index, as set_score
        if (v == e) {
          x = c[v / 4][v % 4];
          mask = same_mask[v / 4][(v % 4) / 2];
        }
      }
      const float s = x * a.inv_t;
      const bool second = (e % 4) >= 2, same = same_class(mask, e % 2);
      if (s != s || s == kInf) {
        const int f = s != s ? (same ? kNanSame : kNanOther) : (same ? kInfSame : kInfOther);
        flags[0] |= second ? 0 : f;
        flags[1] |= second ? f : 0;
        x = -kInf;
        set_score(c, e, x);
      }
      // The selects by (group, row) keep tmax in registers.
      const float m00 = fmaxf(tmax[0][0], x), m01 = fmaxf(tmax[0][1], x);
      const float m10 = fmaxf(tmax[1][0], x), m11 = fmaxf(tmax[1][1], x);
      tmax[0][0] = same && !second ? m00 : tmax[0][0];
      tmax[0][1] = same && second ? m01 : tmax[0][1];
      tmax[1][0] = !same && !second ? m10 : tmax[1][0];
      tmax[1][1] = !same && second ? m11 : tmax[1][1];
    }
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) tmax[grp][i] *= a.inv_t;
    }
  }
}

__device__ __forceinline__ float exp_fast(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// The exponent's base per group and row: the reference, or 0 while it is still -inf (the group has
// no member yet, so each of its values is -inf, and exp(-inf - 0) = 0 without a branch).
__device__ __forceinline__ void exp_bases(const float (&ref)[2][2], float (&base)[2][2]) {
#pragma unroll
  for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      base[grp][i] = ref[grp][i] == -std::numeric_limits<float>::infinity() ? 0.0f : ref[grp][i];
    }
  }
}

// A weight into its group's running sum of row i (a predicated add each).
__device__ __forceinline__ void add_to_group(float (&part)[2][2], bool same, int i, float p) {
  if (same) {
    part[0][i] += p;
  } else {
    part[1][i] += p;
  }
}

// The weights exp(c / T - ref) of the inner products rows_fast() left in c (-inf: none), summed
// per group into part and, with the gradient, handed to the weighted sums (E::store_weights, one
// packed pair per row and n-tile, split between the planes by same_mask).
template <class E, int kNt>
__device__ __forceinline__ void weights_fast(bool with_grad, float inv_t, const float (&c)[kNt][4],
                                                 const uint32_t (&same_mask)[kNt][2], const float (&ref)[2][2],
                                                 float* ps, float* po, int rg, int h, int lane,
                                                 float (&part)[2][2]) {
  float base[2][2];
  exp_bases(ref, base);
  uint32_t packed[kNt][2];
#pragma unroll
  for (int u = 0; u < kNt; ++u) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float p[2];
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const bool same = same_class(same_mask[u][i], q);
        p[q] = exp_fast(fmaf(c[u][2 * i + q], inv_t, -(same ? base[0][i] : base[1][i])));
        add_to_group(part, same, i, p[q]);
      }
      packed[u][i] = E::F::pack(p[0], p[1]);
    }
  }
  if (with_grad) E::store_weights(ps, po, rg, h, lane, packed, same_mask);
}

// The fp32 engine's weights (its fp32 contract): s = c / T rounded to fp32, then expf(s - base),
// each rounded (__fmul_rn keeps the compiler from fusing the two into one FFMA), left in c for
// E::put_weights and summed per group into part. chunks gets bit 4 h + u for each 8 bank rows
// with a same-class value of this lane's rows (accumulate() skips the others; an ineligible
// same-class value or one whose weight underflowed only costs its exact zero products).
template <int kNt>
__device__ __forceinline__ void weights_expf(float inv_t, float (&c)[kNt][4], const uint32_t (&same_mask)[kNt][2],
                                             const float (&ref)[2][2], int h, float (&part)[2][2],
                                             unsigned& chunks) {
  float base[2][2];
  exp_bases(ref, base);
#pragma unroll
  for (int u = 0; u < kNt; ++u) {
    chunks |= (same_mask[u][0] | same_mask[u][1]) != 0 ? 1u << (4 * h + u) : 0u;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = e / 2;
      const bool same = same_class(same_mask[u][i], e % 2);
      const float p = exp_acc(__fmul_rn(c[u][e], inv_t) - (same ? base[0][i] : base[1][i]));
      c[u][e] = p;
      add_to_group(part, same, i, p);
    }
  }
}

// One function (about 200 lines) on purpose: the per-lane softmax state lives in registers across
// the tile loop, and the static report counts the loop's instructions from its source lines.
// The lse kernel's tile loop for the tensor-core engine: the softmax on the scores where the MMAs
// leave them, in registers (TensorCoreEngine::scores_frag): lane 4 g + t of warp w holds rows
// R_i = 16 (w / 2) + g + 8 i (i = 0, 1) and 8 columns of the tile's half w % 2. Each lane keeps the
// state of its two rows in registers: the reference maxima (the same in the 8 lanes that hold a
// row: they compute them from the same values), and the running sums of its warp's half of the
// columns (the two halves are added at the end). Per tile, one exchange of the row maxima
// between the two halves through shared memory; the weights go to shared memory for the
// weighted sums only. One exp per score; the arithmetic of the row phase it replaces
// (lse_tiles_by_rows), but for the order of the fp32 additions of the sums.
//
// kTopk: the top-k of the same pass (topk_tile.cuh), on the raw scores of each tile, staged in the
// other-class weights' buffer before the softmax writes its weights there; its state sits between
// the lse part of shared memory and the engine's (tile::lse_topk_extra_bytes()).
template <class E, bool kTopk>
__device__ __forceinline__ void lse_tiles_in_registers(const typename E::Args& a) {
  constexpr int kNt = E::kSNt;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  extern __shared__ __align__(128) unsigned char smem[];
  float* ps = reinterpret_cast<float*>(smem);  // same-class weights [kRows][kLdS]
  float* po = ps + kRows * kLdS;                // other-class weights [kRows][kLdS]
  float* xchg = po + kRows * kLdS;              // [2 halves][2 groups][kRows] (+ 2 kRows unused)
  int64_t* labs = reinterpret_cast<int64_t*>(xchg + 6 * kRows);
  int* nan_flag = reinterpret_cast<int*>(labs + kCols);
  int* same_chunks = nan_flag + kRows + kRows / 16;  // [kRows / 16]

  const int split_id = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int rg = warp / 2, h = warp % 2;
  E eng;
  eng.init(smem + lse_common_bytes<float>() + (kTopk ? tile::lse_topk_extra_bytes() : 0), a, split_id, row0);
  TopkState<float> topk(smem + lse_common_bytes<float>());
  if (kTopk) topk.init();
  if (tid < kRows) nan_flag[tid] = 0;
  int rows[2];
  bool valid[2];
  int64_t label[2], self[2];
  int self_tile[2];            // the tile of the row's own bank row, -1 for none (rows_fast)
  float ref[2][2], sum[2][2];  // [group: same, other][i]
  int flags[2] = {0, 0};
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    rows[i] = rg * 16 + g + 8 * i;
    valid[i] = row0 + rows[i] < a.B;
    label[i] = valid[i] ? a.labels[row0 + rows[i]] : int64_t(0);
    self[i] = valid[i] ? a.self_rows[row0 + rows[i]] : int64_t(-1);
    self_tile[i] = self[i] >= 0 ? static_cast<int>(self[i] / kCols) : -1;
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
      ref[grp][i] = -kInf;
      sum[grp][i] = 0.0f;
    }
  }
  const bool both_valid = valid[0] && valid[1];
  int tile_begin, tile_end;
  split_range(a.num_tiles, a.splits, split_id, &tile_begin, &tile_end);

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t start = int64_t(tile) * kCols;
    const int n = static_cast<int>(min(int64_t(kCols), a.N - start));
    __syncthreads();  // the previous tile is done with ms, ps, po, xchg
    if (!E::kStagesLabels && tid < kCols) labs[tid] = tid < n ? a.bank_labels[start + tid] : int64_t(0);
    if (E::kSkipsEmptySame && tid < kRows / 16) same_chunks[tid] = 0;
    const bool fix = __syncthreads_or(eng.load_tile(a, start, n)) != 0;
    const int64_t* lab = labs;  // this tile's bank labels
    if constexpr (E::kStagesLabels) lab = eng.tile_labels();
    float c[kNt][4];
    eng.scores_frag(a, start, n, fix, c);
    if constexpr (kTopk) {
      float* dst = po + rows[0] * kLdS + h * 32 + 2 * t;
#pragma unroll
      for (int u = 0; u < kNt; ++u) {
        *reinterpret_cast<float2*>(dst + u * 8) = make_float2(c[u][0], c[u][1]);
        *reinterpret_cast<float2*>(dst + 8 * kLdS + u * 8) = make_float2(c[u][2], c[u][3]);
      }
      __syncthreads();
      // Done with po before the weights go there: the exchange of the maxima below syncs first.
      topk.tile_rows(a, po, split_id, row0, start, n);
    }

    // Scores, eligibility, group, non-finite flags, this lane's maxima (both engines: the values
    // the row phase leaves are the same whichever way they are computed, so the fp32 engine's
    // arithmetic, which its weights below take on, is unchanged).
    uint32_t same_mask[kNt][2];  // 0xffff in the half of a same-class value (rows_fast)
    float tmax[2][2] = {{-kInf, -kInf}, {-kInf, -kInf}};
    rows_fast<kNt>(a, c, lab, label, both_valid, valid, self, self_tile, tile, start, n, h, t, flags, same_mask,
                   tmax);
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float m = tmax[grp][i];
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 1));
        m = fmaxf(m, __shfl_xor_sync(kFullMask, m, 2));
        if (t == 0) xchg[(2 * h + grp) * kRows + rows[i]] = m;
      }
    }
    __syncthreads();

    // The lazy move of the reference maxima (the same decision in every lane holding the row).
    // The 16-bit engine keeps the running maximum itself (engine_mma16.cuh: its rescales ride on
    // FFMAs it does anyway, and the largest weight is then exactly 1 before its 16-bit rounding).
    float fac[2][2];
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float tile_max = fmaxf(xchg[grp * kRows + rows[i]], xchg[(2 + grp) * kRows + rows[i]]);
        if constexpr (E::kFastWeights) {
          // Without a branch: the factor is exactly 1 where the maximum stays (both -inf too), and
          // exp(-inf) = 0 where the group had no member yet.
          const float moved = fmaxf(ref[grp][i], tile_max);
          fac[grp][i] = moved == ref[grp][i] ? 1.0f : exp_fast(ref[grp][i] - moved);
          ref[grp][i] = moved;
        } else {
          fac[grp][i] = 1.0f;
          if (tile_max > ref[grp][i] + kLazyRescale) {
            fac[grp][i] = rescale_factor(ref[grp][i], tile_max);
            ref[grp][i] = tile_max;
          }
        }
      }
    }
    // One exp per score: a score is in one group only.
    float part[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    unsigned chunks = 0;  // bit 4 h + u: a same-class weight in bank rows 32 h + 8 u..
    if constexpr (E::kFastWeights) {
      weights_fast<E>(a.with_grad, a.inv_t, c, same_mask, ref, ps, po, rg, h, lane, part);
    } else {
      weights_expf<kNt>(a.inv_t, c, same_mask, ref, h, part, chunks);
    }
    // The running sums: the 16-bit weights (kFastWeights) keep one per lane (the reference is the
    // same in the lanes of a row) and add the 4 lanes of a row at the end; the fp32 engine adds
    // them every tile.
#pragma unroll
    for (int grp = 0; grp < 2; ++grp) {
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float p = part[grp][i];
        if constexpr (!E::kFastWeights) {
          p += __shfl_xor_sync(kFullMask, p, 1);
          p += __shfl_xor_sync(kFullMask, p, 2);
        }
        sum[grp][i] = sum[grp][i] * fac[grp][i] + p;
      }
    }
    if (a.with_grad) {
      if constexpr (!E::kFastWeights) {
#pragma unroll
        for (int u = 0; u < kNt; ++u) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            // same_class() of q = 0 and 1 as the bits themselves (a mask and a shift, no compares).
            const bool s0 = same_mask[u][i] & 1u, s1 = same_mask[u][i] >> 31;
            E::put_weights(ps, po, rows[i], h * 32 + u * 8 + 2 * t, c[u][2 * i], c[u][2 * i + 1], s0, s1);
          }
        }
      }
      if constexpr (E::kSkipsEmptySame) {
        chunks = __reduce_or_sync(kFullMask, chunks);
        if (lane == 0 && chunks != 0) atomicOr(&same_chunks[rg], static_cast<int>(chunks));
      }
      __syncthreads();
      eng.accumulate(ps, po, fac, same_chunks);
    }
  }

  __syncthreads();
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if constexpr (E::kFastWeights) {
#pragma unroll
      for (int grp = 0; grp < 2; ++grp) {
        sum[grp][i] += __shfl_xor_sync(kFullMask, sum[grp][i], 1);
        sum[grp][i] += __shfl_xor_sync(kFullMask, sum[grp][i], 2);
      }
    }
    int f = flags[i];
    f |= __shfl_xor_sync(kFullMask, f, 1);
    f |= __shfl_xor_sync(kFullMask, f, 2);
    if (t == 0) {
      if (f != 0) atomicOr(&nan_flag[rows[i]], f);
      if (h == 1) {
        xchg[rows[i]] = sum[0][i];
        xchg[kRows + rows[i]] = sum[1][i];
      }
    }
  }
  __syncthreads();
  if (h == 0 && t == 0) {
    const int64_t plane = int64_t(a.splits) * a.Bpad;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (!valid[i]) continue;
      float* st = a.stats + int64_t(split_id) * a.Bpad + row0 + rows[i];
      st[0 * plane] = ref[0][i];
      st[1 * plane] = sum[0][i] + xchg[rows[i]];
      st[2 * plane] = ref[1][i];
      st[3 * plane] = sum[1][i] + xchg[kRows + rows[i]];
      st[4 * plane] = float(nan_flag[rows[i]]);
    }
  }
  if (a.with_grad) eng.store(a, split_id, row0);
  if constexpr (kTopk) topk.finish(a, split_id, row0);
}

template <class E>
__global__ void __launch_bounds__(kThreads, E::kMinBlocks) lse_partial_kernel(const typename E::Args a) {
  if constexpr (E::kFragmentSoftmax) {
    lse_tiles_in_registers<E, false>(a);
  } else {
    lse_tiles_by_rows<E>(a);
  }
}

// The same with the top-k in the pass (tensor-core engines only), compiled for one block an SM
// whatever the engine: at D = 64 the 16-bit engine's top-k pass spilled within the 128 registers
// of two (stream_launch.cuh asks the occupancy of the compiled kernel).
template <class E>
__global__ void __launch_bounds__(kThreads, 1) lse_topk_partial_kernel(const typename E::Args a) {
  lse_tiles_in_registers<E, true>(a);
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
  int flags = 0;
  for (int s = 0; s < splits; ++s) {
    max_s = fmax(max_s, st[0 * plane + s * Bpad]);
    max_o = fmax(max_o, st[2 * plane + s * Bpad]);
    flags |= static_cast<int>(st[4 * plane + s * Bpad]);
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
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    // Each group on its own: NaN if it holds a NaN score, else +inf if it holds a +inf one. The
    // gradient of such a group is undefined: NaN, as autograd through torch.logsumexp gives.
    const bool nan_s = flags & kNanSame, nan_o = flags & kNanOther;
    const bool inf_s = flags & kInfSame, inf_o = flags & kInfOther;
    lse_same[row] = nan_s ? nan : inf_s ? inf : (sum_s > 0 ? max_s + log_acc(sum_s) : neg_inf<acc_t>());
    lse_other[row] = nan_o ? nan : inf_o ? inf : (sum_o > 0 ? max_o + log_acc(sum_o) : neg_inf<acc_t>());
    inv_sum[0] = (nan_s || inf_s) ? nan : (sum_s > 0 ? acc_t(1) / sum_s : acc_t(0));
    inv_sum[1] = (nan_o || inf_o) ? nan : (sum_o > 0 ? acc_t(1) / sum_o : acc_t(0));
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


// ----------------------------------------------------------------------------- host side

// The lse partials and their combine; with k > 0, also the top-k when it fits in the same pass
// (tensor-core engine, k <= kMaxFastK, the top-k state fits the opt-in shared memory): returns
// whether it did.
template <class E>
bool launch_lse(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& indices,
                const at::Tensor& bank, const at::Tensor& bank_labels, double temperature,
                bool with_grad, at::Tensor& lse_same, at::Tensor& lse_other,
                at::Tensor& wmean_same, at::Tensor& wmean_other, int64_t k, at::Tensor& topk_values,
                at::Tensor& topk_indices, int stages) {
  using acc_t = typename E::acc_t;
  auto a = make_args<E>(features, bank, indices, temperature);
  a.stages = stages;
  const at::Tensor queries_padded = pad_queries<E>(features, a);
  a.labels = labels.data_ptr<int64_t>();
  a.bank_labels = bank_labels.data_ptr<int64_t>();
  a.with_grad = with_grad;
  const int64_t query_blocks = a.Bpad / kRows;
  size_t smem = lse_common_bytes<acc_t>() + E::smem_bytes(a.D, a.stages);
  const bool fused = E::kFragmentSoftmax && k > 0 && k <= kMaxFastK &&
                     smem + tile::lse_topk_extra_bytes() <= size_t(device_smem_optin());
  auto kernel = lse_partial_kernel<E>;
  if constexpr (E::kFragmentSoftmax) {
    if (fused) kernel = lse_topk_partial_kernel<E>;
  }
  if (fused) smem += tile::lse_topk_extra_bytes();
  a.splits = choose_splits(kernel, smem, query_blocks, a.num_tiles,
                           fused ? TopkWorkspace::cap(a.Bpad, k, sizeof(acc_t)) : kMaxSplits);
  std::optional<TopkWorkspace> workspace;
  // Workspaces in the accumulation dtype (fp32 for 16-bit features).
  const at::TensorOptions acc_options = features.options().dtype(lse_same.scalar_type());
  if (fused) workspace.emplace(a, k, acc_options);
  const int64_t acc_cols = E::acc_cols(a.D);
  at::Tensor stats = at::empty({5, a.splits, a.Bpad}, acc_options);
  at::Tensor osum = at::empty({with_grad ? 2 : 0, a.splits, a.Bpad, acc_cols}, acc_options);
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
  if (fused) TopkWorkspace::combine(a, topk_values, topk_indices, stream);
  return fused;
}


std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
snca_forward_cuda(const at::Tensor& features_in, const at::Tensor& labels_in,
                  const at::Tensor& indices_in, const at::Tensor& bank_in,
                  const at::Tensor& bank_labels_in, double temperature, bool with_grad, int64_t k) {
  TORCH_CHECK(features_in.is_cuda(), "features must be a CUDA tensor, got ", features_in.device());
  const c10::cuda::CUDAGuard guard(features_in.device());
  check_common(features_in, bank_in, indices_in, k, "features", "indices");
  check_label_inputs(features_in, labels_in, bank_in, bank_labels_in, temperature);
  // bf16/fp16 features with D <= 128 go to the 16-bit engine as they are; with D > 128 they are
  // upcast to fp32 here and take the generic engine (exact fp32 arithmetic on the rounded values).
  const bool low = features_in.scalar_type() == at::kBFloat16 || features_in.scalar_type() == at::kHalf;
  const at::Tensor features =
      (low && features_in.size(1) <= 128 ? features_in
                                         : features_in.to(accumulation_dtype(features_in.scalar_type())))
          .contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor bank_labels = bank_labels_in.contiguous();

  // std::tie, not a structured binding: the lambda below captures these (a C++20 feature).
  at::Tensor lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices;
  std::tie(lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices) =
      empty_forward_outputs(features, with_grad, k);
  if (features.size(0) > 0) {
    bool topk_done = false;
    const tile::Config config = device_config(features);
    with_engine<true>(features, bank, config, [&](auto tag) {
      topk_done = launch_lse<typename decltype(tag)::type>(features, labels, indices, bank, bank_labels,
                                                           temperature, with_grad, lse_same, lse_other,
                                                           wmean_same, wmean_other, k, topk_values,
                                                           topk_indices, config.stages);
    });
    // The top-k as a pass of its own runs the fp32 engines: 16-bit queries upcast (B x D), exact.
    if (!topk_done) {
      run_topk_cuda(features.to(lse_same.scalar_type()), bank, indices, k, topk_values, topk_indices);
    }
  }
  return {lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices};
}


}  // namespace

TORCH_LIBRARY_IMPL(snca_ext, CUDA, m) { m.impl("snca_forward", &snca_forward_cuda); }

}  // namespace snca_ext
