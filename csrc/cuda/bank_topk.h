// The streaming top-k of bank_topk.cu, also run by snca_forward when k > 0 and its top-k cannot run
// inside the lse pass (snca_forward.cu: launch_lse).
#pragma once

#include <ATen/ATen.h>

namespace snca_ext {

// values/indices [B, k] preallocated; queries, bank, exclude contiguous, on the current device and
// checked (check_common in stream_launch.cuh).
void run_topk_cuda(const at::Tensor& queries, const at::Tensor& bank, const at::Tensor& exclude,
                   int64_t k, at::Tensor& values, at::Tensor& indices);

}  // namespace snca_ext
