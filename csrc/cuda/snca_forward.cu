// CUDA kernels of snca_forward: the twin of csrc/cpu's, same contract (csrc/ops.cpp). The tile
// loop, the engines and the split-KV design are described in stream_tile.cuh.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bank_topk.h"
#include "stream_tile.cuh"

namespace snca_ext {
namespace {

// ----------------------------------------------------------------------------- lse kernels

template <class E>
__global__ void __launch_bounds__(kThreads, E::kMinBlocks) lse_partial_kernel(const typename E::Args a) {
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
  int* rescale = nan_flag + kRows;        // [kRows / 16]: some row of the 16 moved its reference
  int* same_chunks = rescale + kRows / 16;  // [kRows / 16]: TensorCoreEngine::accumulate

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
    if (tid < kRows / 16) rescale[tid] = same_chunks[tid] = 0;
    const bool fix = __syncthreads_or(eng.load_tile(a, start, n)) != 0;
    eng.scores(a, ss, start, n, fix);
    __syncthreads();

    unsigned same_lo = 0, same_hi = 0;  // columns 0..31, 32..63 with a same-class weight
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
        same_lo |= __ballot_sync(kFullMask, ps[0] != acc_t(0));
        same_hi |= __ballot_sync(kFullMask, ps[1] != acc_t(0));
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
    if (lane == 0 && (same_lo | same_hi)) {
      int chunks = 0;  // bit c: a same-class weight in bank rows 8c..8c+7
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        chunks |= ((same_lo >> (8 * c)) & 0xffu) ? 1 << c : 0;
        chunks |= ((same_hi >> (8 * c)) & 0xffu) ? 1 << (c + 4) : 0;
      }
      atomicOr(&same_chunks[warp * kRowsPerWarp / 16], chunks);
    }
    __syncthreads();
    if (a.with_grad) eng.accumulate(a, ss, po, fac, rescale, same_chunks, start, n);
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

template <class E>
void launch_lse(const at::Tensor& features, const at::Tensor& labels, const at::Tensor& indices,
                const at::Tensor& bank, const at::Tensor& bank_labels, double temperature,
                bool with_grad, at::Tensor& lse_same, at::Tensor& lse_other,
                at::Tensor& wmean_same, at::Tensor& wmean_other) {
  using acc_t = typename E::acc_t;
  auto a = make_args<E>(features, bank, indices, temperature);
  const at::Tensor queries_padded = pad_queries<E>(features, a);
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

  // std::tie, not a structured binding: the lambda below captures these (a C++20 feature).
  at::Tensor lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices;
  std::tie(lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices) =
      empty_forward_outputs(features, with_grad, k);
  if (features.size(0) > 0) {
    with_engine(features, bank, device_config(features), [&](auto tag) {
      launch_lse<typename decltype(tag)::type>(features, labels, indices, bank, bank_labels,
                                               temperature, with_grad, lse_same, lse_other,
                                               wmean_same, wmean_other);
    });
    run_topk_cuda(features, bank, indices, k, topk_values, topk_indices);
  }
  return {lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices};
}


}  // namespace

TORCH_LIBRARY_IMPL(snca_ext, CUDA, m) { m.impl("snca_forward", &snca_forward_cuda); }

}  // namespace snca_ext
