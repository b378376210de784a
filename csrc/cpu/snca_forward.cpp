// CPU kernel of snca_ext::snca_forward: the two class-masked log-sum-exps, optionally the
// one-pass gradient accumulators and a top-k, in one streaming pass (stream_tile.h).
#include <torch/library.h>

#include "../checks.h"
#include "stream_tile.h"

namespace snca_ext {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
snca_forward_cpu(const at::Tensor& features_in, const at::Tensor& labels_in,
                 const at::Tensor& indices_in, const at::Tensor& bank_in,
                 const at::Tensor& bank_labels_in, double temperature, bool with_grad, int64_t k) {
  // Autograd is handled one level up (register_autograd); the tile GEMMs run on OpenMP threads,
  // which do not inherit a dispatch guard, so the inputs are detached instead.
  at::Tensor features = features_in.detach().contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor indices = indices_in.contiguous();
  const at::Tensor bank = bank_in.contiguous();
  const at::Tensor bank_labels = bank_labels_in.contiguous();
  check_bank_inputs(features, bank, indices, k, "features", "indices");
  check_label_inputs(features, labels, bank, bank_labels, temperature);
  check_rows_in_bank(indices, bank.size(0), "indices");
  // The CPU computes bfloat16/float16 features in float32 (exact products of the rounded
  // inputs, no 16-bit rounding anywhere after), more accurate than a 16-bit GPU product.
  features = features.to(accumulation_dtype(features.scalar_type()));

  at::Tensor lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices;
  std::tie(lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices) =
      empty_forward_outputs(features, with_grad, k);
  const int64_t rows = features.size(0);
  if (rows > 0) {
    const StreamOptions opt{true, with_grad, k, temperature};
    AT_DISPATCH_FLOATING_TYPES(features.scalar_type(), "snca_forward_cpu", [&] {
      stream_bank<scalar_t>(features, labels, indices, bank, bank_labels, opt, &lse_same,
                            &lse_other, &wmean_same, &wmean_other, &topk_values, &topk_indices);
    });
  }
  return {lse_same, lse_other, wmean_same, wmean_other, topk_values, topk_indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(snca_ext, CPU, m) { m.impl("snca_forward", &snca_forward_cpu); }

}  // namespace cpu
}  // namespace snca_ext
