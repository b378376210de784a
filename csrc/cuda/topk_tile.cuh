// The streaming top-k, shared by topk_partial_kernel (bank_topk.cu, a pass over the bank of its
// own) and lse_topk_partial_kernel (snca_forward.cu, the top-k inside the lse pass).
//
// Top-k (k <= kMaxFastK = 1024). Per query and split, a sorted list of up to k (value, row) lives
// in the workspace (global memory, L2-resident), double-buffered, beside a buffer of up to
// kTopkBuffer = 256 candidates. A bank row is a candidate only if it beats the list's k-th value
// (the rejection threshold, BlockSelect style; rows arrive in increasing order within a split, so
// a tie with the k-th loses). A warp ballots the candidates of a row of the tile and appends them
// to the buffer; a full buffer (and, at the end, every non-empty one) is sorted in shared memory
// (bitonic) and merged into the list by rank: an element's new position is its old position plus
// the number of the other side's elements that beat it (binary search in the sorted other side),
// which yields the sorted top k directly. So the list is rewritten once per 256 candidates, not
// once per tile (which made k = 1024 twenty times slower than torch.topk on an H200: every tile
// of a split brings candidates at that k). Once the list is full few rows pass, so the common
// tile costs one ballot per query row. Larger k falls back to materialising B x N inner products
// and sorting them (documented, slow, exact).
// Order: larger value first, NaN above +inf (as torch.topk), ties to the lower bank row; the
// query's own row is never a candidate; fewer than k candidates pad the tail with -inf / -1.
#pragma once

#include "stream_common.cuh"

namespace snca_ext {
namespace {

// Sorts one warp's candidates (cv, ci)[0, kTopkBuffer) in the top-k order (bitonic network in
// shared memory; the rows are distinct, so the order is total).
template <typename acc_t>
__device__ __forceinline__ void warp_sort(acc_t* cv, int* ci, int lane) {
  for (int size = 2; size <= kTopkBuffer; size *= 2) {
    for (int stride = size / 2; stride > 0; stride /= 2) {
      for (int p = lane; p < kTopkBuffer / 2; p += 32) {
        const int x = 2 * p - (p & (stride - 1)), y = x + stride;
        const acc_t vx = cv[x], vy = cv[y];
        const int ix = ci[x], iy = ci[y];
        // Blocks with bit `size` clear end up in the top-k order, the others reversed.
        if ((x & size) == 0 ? beats(vy, iy, vx, ix) : beats(vx, ix, vy, iy)) {
          cv[x] = vy;
          cv[y] = vx;
          ci[x] = iy;
          ci[y] = ix;
        }
      }
      __syncwarp();
    }
  }
}

// Merges the nb buffered candidates of one query (global buffer at buf) into its sorted list:
// sort them, then place every element of both sorted sides at its rank (its position plus the
// number of the other side's elements that beat it, a binary search), writing the first k to the
// free list buffer. Called by a whole warp.
template <typename acc_t, class Args>
__device__ __forceinline__ void flush_candidates(const Args& a, int64_t list_base, int64_t buf, int nb,
                                                 acc_t* cv, int* ci, int* count, int* live,
                                                 acc_t* threshold, int lane) {
  for (int t = lane; t < kTopkBuffer; t += 32) {
    cv[t] = t < nb ? a.buf_v[buf + t] : neg_inf<acc_t>();
    ci[t] = t < nb ? a.buf_i[buf + t] : std::numeric_limits<int>::max();  // after every real entry
  }
  __syncwarp();
  warp_sort(cv, ci, lane);
  const int n_old = *count, cur = *live;
  const acc_t* ov = a.list_v + (list_base + cur) * a.k;
  const int* oi = a.list_i + (list_base + cur) * a.k;
  acc_t* nv = a.list_v + (list_base + 1 - cur) * a.k;
  int* ni = a.list_i + (list_base + 1 - cur) * a.k;
  for (int t = lane; t < nb; t += 32) {
    const acc_t v = cv[t];
    const int i = ci[t];
    const int rank = t + count_beating(ov, oi, n_old, v, i);
    if (rank < a.k) {
      nv[rank] = v;
      ni[rank] = i;
      if (rank == a.k - 1) *threshold = v;
    }
  }
  for (int p = lane; p < n_old; p += 32) {
    const acc_t v = ov[p];
    const int i = oi[p];
    const int rank = p + count_beating(cv, ci, nb, v, i);
    if (rank < a.k) {
      nv[rank] = v;
      ni[rank] = i;
      if (rank == a.k - 1) *threshold = v;
    }
  }
  __syncwarp();  // the merged list (global) and the threshold are visible to the whole warp
  if (lane == 0) {
    *count = min(a.k, n_old + nb);
    *live = 1 - cur;
  }
  __syncwarp();
}

// The top-k state of a block in shared memory (tile::topk_state_bytes): a sort scratch per warp
// [kWarps][kTopkBuffer] (value, row), and per query row the k-th value once the list is full, the
// entries in the list, which of the two list buffers holds it, the candidates waiting in the
// buffer.
template <typename acc_t>
struct TopkState {
  acc_t* cand_v;
  acc_t* threshold;
  int* cand_i;
  int* count;
  int* live;
  int* buffered;

  __device__ explicit TopkState(unsigned char* p) {
    cand_v = reinterpret_cast<acc_t*>(p);
    threshold = cand_v + kWarps * kTopkBuffer;
    cand_i = reinterpret_cast<int*>(threshold + kRows);
    count = cand_i + kWarps * kTopkBuffer;
    live = count + kRows;
    buffered = live + kRows;
  }

  // Before the first tile (the tile loop's first __syncthreads orders it).
  __device__ void init() {
    if (threadIdx.x < kRows) {
      threshold[threadIdx.x] = neg_inf<acc_t>();
      count[threadIdx.x] = live[threadIdx.x] = buffered[threadIdx.x] = 0;
    }
  }

  // One tile: the raw inner products ss [kRows][kLdS] of the block's queries with bank rows
  // start..start + n, a warp per query row.
  template <class Args>
  __device__ void tile_rows(const Args& a, const acc_t* ss, int split_id, int64_t row0, int64_t start,
                            int n) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    acc_t* wv = cand_v + warp * kTopkBuffer;
    int* wi = cand_i + warp * kTopkBuffer;
    const unsigned lanes_below = (1u << lane) - 1u;
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t row = row0 + r;
      if (row >= a.B) continue;
      const int64_t self = a.self_rows[row];
      const int64_t q = int64_t(split_id) * a.Bpad + row;
      const acc_t v0 = ss[r * kLdS + lane], v1 = ss[r * kLdS + lane + 32];
      const bool in0 = lane < n && start + lane != self;
      const bool in1 = lane + 32 < n && start + lane + 32 != self;
      // Not full: any value (NaN included); full: strictly above the k-th (a tie has the higher
      // row). The threshold moves only when the buffer is merged: until then it lets through a
      // few rows more than needed, which the merge drops.
      bool take0 = in0 && (count[r] < a.k || ranks_above(v0, threshold[r]));
      bool take1 = in1 && (count[r] < a.k || ranks_above(v1, threshold[r]));
      unsigned m0 = __ballot_sync(kFullMask, take0), m1 = __ballot_sync(kFullMask, take1);
      int n_new = __popc(m0) + __popc(m1);
      if (n_new == 0) continue;
      int nb = buffered[r];
      if (nb + n_new > kTopkBuffer) {  // full buffer: merge it, then filter with the new threshold
        flush_candidates(a, q * 2, q * kTopkBuffer, nb, wv, wi, &count[r], &live[r], &threshold[r], lane);
        nb = 0;
        take0 = in0 && (count[r] < a.k || ranks_above(v0, threshold[r]));
        take1 = in1 && (count[r] < a.k || ranks_above(v1, threshold[r]));
        m0 = __ballot_sync(kFullMask, take0);
        m1 = __ballot_sync(kFullMask, take1);
        n_new = __popc(m0) + __popc(m1);
      }
      acc_t* bv = a.buf_v + q * kTopkBuffer + nb;
      int* bi = a.buf_i + q * kTopkBuffer + nb;
      if (take0) {
        const int p = __popc(m0 & lanes_below);
        bv[p] = v0;
        bi[p] = static_cast<int>(start + lane);
      }
      if (take1) {
        const int p = __popc(m0) + __popc(m1 & lanes_below);
        bv[p] = v1;
        bi[p] = static_cast<int>(start + lane + 32);
      }
      __syncwarp();  // the buffer (global) is visible to the whole warp; every lane has read nb
      if (lane == 0) buffered[r] = nb + n_new;
      __syncwarp();
    }
  }

  // After the last tile: merge what is left in the buffers, write the lists' meta. Called by the
  // whole block.
  template <class Args>
  __device__ void finish(const Args& a, int split_id, int64_t row0) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
      const int r = warp * kRowsPerWarp + rr;
      const int64_t q = int64_t(split_id) * a.Bpad + row0 + r;
      if (row0 + r < a.B && buffered[r] > 0) {
        flush_candidates(a, q * 2, q * kTopkBuffer, buffered[r], cand_v + warp * kTopkBuffer,
                         cand_i + warp * kTopkBuffer, &count[r], &live[r], &threshold[r], lane);
      }
    }
    __syncthreads();
    if (threadIdx.x < kRows && row0 + threadIdx.x < a.B) {
      int* m = a.meta + (int64_t(split_id) * a.Bpad + row0 + threadIdx.x) * 2;
      m[0] = count[threadIdx.x];
      m[1] = live[threadIdx.x];
    }
  }
};

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


// The workspace of the top-k partials of a launch: lists, candidate buffers, meta.
struct TopkWorkspace {
  at::Tensor list_v, list_i, buf_v, buf_i, meta;

  // Splits that fit kTopkWorkspaceBytes for Bpad queries and this k.
  static int cap(int64_t Bpad, int64_t k, size_t acc_bytes) {
    const int64_t split_bytes = Bpad * (2 * k + kTopkBuffer) * int64_t(acc_bytes + sizeof(int));
    return static_cast<int>(std::max<int64_t>(1, kTopkWorkspaceBytes / split_bytes));
  }

  template <class Args>
  TopkWorkspace(Args& a, int64_t k, const at::TensorOptions& options) {
    using acc_t = std::remove_pointer_t<decltype(a.list_v)>;
    list_v = at::empty({a.splits, a.Bpad, 2, k}, options);
    list_i = at::empty({a.splits, a.Bpad, 2, k}, options.dtype(at::kInt));
    buf_v = at::empty({a.splits, a.Bpad, kTopkBuffer}, options);
    buf_i = at::empty({a.splits, a.Bpad, kTopkBuffer}, options.dtype(at::kInt));
    meta = at::empty({a.splits, a.Bpad, 2}, options.dtype(at::kInt));
    a.k = static_cast<int>(k);
    a.list_v = list_v.data_ptr<acc_t>();
    a.list_i = list_i.data_ptr<int>();
    a.buf_v = buf_v.data_ptr<acc_t>();
    a.buf_i = buf_i.data_ptr<int>();
    a.meta = meta.data_ptr<int>();
  }

  // The combine of the partials into values/indices [B, k].
  template <class Args>
  static void combine(const Args& a, at::Tensor& values, at::Tensor& indices, cudaStream_t stream) {
    using acc_t = std::remove_pointer_t<decltype(a.list_v)>;
    topk_combine_kernel<acc_t><<<static_cast<unsigned>(a.B), kThreads, 0, stream>>>(
        a.list_v, a.list_i, a.meta, a.splits, a.Bpad, a.k, values.data_ptr<acc_t>(),
        indices.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace
}  // namespace snca_ext
