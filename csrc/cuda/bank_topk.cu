// CUDA kernels of bank_topk (and of snca_forward's top-k when it cannot run inside the lse pass):
// the twin of csrc/cpu's, same contract (csrc/ops.cpp). The streaming top-k itself is in
// topk_tile.cuh. Larger k than kMaxFastK falls back to materialising B x N inner products and
// sorting them (documented, slow, exact).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "bank_topk.h"
#include "stream_launch.cuh"
#include "topk_tile.cuh"

namespace snca_ext {
namespace {

// ----------------------------------------------------------------------------- top-k kernel

template <class E>
__global__ void __launch_bounds__(kThreads, 1) topk_partial_kernel(const typename E::Args a) {
  using acc_t = typename E::acc_t;
  extern __shared__ __align__(128) unsigned char smem[];
  acc_t* ss = reinterpret_cast<acc_t*>(smem);
  TopkState<acc_t> state(reinterpret_cast<unsigned char*>(ss + kRows * kLdS));
  const int split_id = blockIdx.y;
  const int64_t row0 = int64_t(blockIdx.x) * kRows;
  E eng;
  eng.init(smem + topk_common_bytes<acc_t>(), a, split_id, row0);
  state.init();
  int tile_begin, tile_end;
  split_range(a.num_tiles, a.splits, split_id, &tile_begin, &tile_end);
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t start = int64_t(tile) * kCols;
    const int n = static_cast<int>(min(int64_t(kCols), a.N - start));
    __syncthreads();
    const bool fix = __syncthreads_or(eng.load_tile(a, start, n)) != 0;
    eng.scores(a, ss, start, n, fix);
    __syncthreads();
    state.tile_rows(a, ss, split_id, row0, start, n);
  }
  state.finish(a, split_id, row0);
}

// ----------------------------------------------------------------------------- host side

template <class E>
void launch_topk(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                 int64_t k, at::Tensor& values, at::Tensor& indices) {
  using acc_t = typename E::acc_t;
  auto a = make_args<E>(queries, bank, exclude, 1.0);
  const at::Tensor queries_padded = pad_queries<E>(queries, a);
  a.k = static_cast<int>(k);
  const int64_t query_blocks = a.Bpad / kRows;
  const size_t smem = topk_common_bytes<acc_t>() + E::smem_bytes(a.D, a.stages);
  auto kernel = topk_partial_kernel<E>;
  a.splits = choose_splits(kernel, smem, query_blocks, a.num_tiles,
                           TopkWorkspace::cap(a.Bpad, k, sizeof(acc_t)));
  const TopkWorkspace workspace(a, k, queries.options());

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  kernel<<<dim3(static_cast<unsigned>(query_blocks), a.splits), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TopkWorkspace::combine(a, values, indices, stream);
}

// k > kMaxFastK: materialise the B x N inner products and sort (B x N memory). Same order and
// padding as the streaming kernels: a descending stable sort puts NaN first and ties in row
// order; the excluded rows go last and come out as -inf / -1.
void topk_materialised(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                       int64_t k, at::Tensor& values, at::Tensor& indices) {
  const at::Tensor dots = at::mm(queries, bank.to(queries.scalar_type()).t());
  const at::Tensor rows = at::arange(bank.size(0), exclude.options());
  const at::Tensor excluded = rows.unsqueeze(0).eq(exclude.unsqueeze(1));
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
  with_engine(queries, bank, device_config(queries), [&](auto tag) {
    launch_topk<typename decltype(tag)::type>(queries, bank, exclude, k, values, indices);
  });
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
  auto [values, indices] = empty_topk_outputs(queries, k);
  run_topk(queries, bank, exclude, k, values, indices);
  return {values, indices};
}


}  // namespace

void run_topk_cuda(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                   int64_t k, at::Tensor& values, at::Tensor& indices) {
  run_topk(queries, bank, exclude, k, values, indices);
}

TORCH_LIBRARY_IMPL(snca_ext, CUDA, m) { m.impl("bank_topk", &bank_topk_cuda); }

}  // namespace snca_ext
