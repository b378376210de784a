// Input checks shared by every compiled backend of the fused op, so that a direct call of
// torch.ops.snca_ext.* fails with the same message on every device. Each backend checks the
// values of the row indices itself: the CPU kernel reads memory with them, the CUDA kernels only
// compare with them.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>

namespace snca_ext {

// The kernels scale the scores by 1 / T in float32: T outside these bounds makes it +inf or a
// subnormal down to 0 (0 * -inf = NaN for an ineligible score), not a temperature anyone trains at.
constexpr double kMinTemperature = 2.94e-39;  // 1 / FLT_MAX, rounded up
constexpr double kMaxTemperature = 8.5e37;    // 1 / FLT_MIN (the smallest normal float), rounded down

inline bool temperature_inverse_is_normal(double temperature) {
  return temperature >= kMinTemperature && temperature <= kMaxTemperature;
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& like, const char* name,
                              const char* like_name) {
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), " like ",
              like_name, ", got ", t.device());
}

// Shapes and dtypes of (features or queries, bank, own rows) and the range of k.
inline void check_bank_inputs(const at::Tensor& features, const at::Tensor& bank,
                              const at::Tensor& self_rows, int64_t k, const char* features_name,
                              const char* self_name) {
  check_same_device(bank, features, "bank", features_name);
  check_same_device(self_rows, features, self_name, features_name);
  TORCH_CHECK(features.dim() == 2, features_name, " must be 2-D [B, D], got ", features.dim(),
              "-D");
  TORCH_CHECK(bank.dim() == 2, "bank must be 2-D [N, D], got ", bank.dim(), "-D");
  TORCH_CHECK(bank.size(0) > 0, "bank must have at least one row");
  TORCH_CHECK(bank.size(1) == features.size(1), "bank must have D=", features.size(1),
              " columns like ", features_name, ", got ", bank.size(1));
  const auto ft = features.scalar_type();
  const auto bt = bank.scalar_type();
  TORCH_CHECK(ft == at::kFloat || ft == at::kDouble || ft == at::kBFloat16 || ft == at::kHalf,
              features_name, " must be float32, float64, bfloat16 or float16, got ", ft);
  const bool bank_ok = ft == at::kDouble
                           ? bt == at::kDouble
                           : (bt == at::kFloat || bt == at::kBFloat16 || bt == at::kHalf);
  TORCH_CHECK(bank_ok, "bank dtype ", bt, " does not go with ", features_name, " dtype ", ft,
              " (expected float64 with float64 ", features_name,
              ", else float32, bfloat16 or float16)");
  TORCH_CHECK(self_rows.dim() == 1 && self_rows.size(0) == features.size(0), self_name,
              " must have B=", features.size(0), " entries, got shape ", self_rows.sizes());
  TORCH_CHECK(self_rows.scalar_type() == at::kLong, self_name, " must be int64, got ",
              self_rows.scalar_type());
  TORCH_CHECK(k >= 0 && k <= bank.size(0), "k must be in [0, N=", bank.size(0), "], got ", k);
}

// The extra inputs of snca_forward: labels, bank_labels and the temperature.
inline void check_label_inputs(const at::Tensor& features, const at::Tensor& labels,
                               const at::Tensor& bank, const at::Tensor& bank_labels,
                               double temperature) {
  check_same_device(labels, features, "labels", "features");
  check_same_device(bank_labels, features, "bank_labels", "features");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0 && temperature_inverse_is_normal(temperature),
              "temperature must be a finite number > 0 whose inverse is a normal float32 (", kMinTemperature,
              " to ", kMaxTemperature, "), got ", temperature);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == features.size(0) &&
                  labels.scalar_type() == at::kLong,
              "labels must be int64 with B=", features.size(0), " entries, got ",
              labels.scalar_type(), " of shape ", labels.sizes());
  TORCH_CHECK(bank_labels.dim() == 1 && bank_labels.size(0) == bank.size(0) &&
                  bank_labels.scalar_type() == at::kLong,
              "bank_labels must be int64 with N=", bank.size(0), " entries, got ",
              bank_labels.scalar_type(), " of shape ", bank_labels.sizes());
}

// The accumulation dtype of features of dtype ft: float64 for float64, else float32 (bfloat16 and
// float16 features included: their products accumulate, and their softmax state lives, in fp32).
inline at::ScalarType accumulation_dtype(at::ScalarType ft) {
  return ft == at::kDouble ? at::kDouble : at::kFloat;
}

// The outputs of snca_forward, allocated alike by every backend (shapes in ops.cpp): lse_same,
// lse_other [B]; wmean_same, wmean_other [B, D] when with_grad, else [0, D]; topk values and
// indices [B, k]. All in the accumulation dtype.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
empty_forward_outputs(const at::Tensor& features, bool with_grad, int64_t k) {
  const int64_t rows = features.size(0), dim = features.size(1);
  const auto opts = features.options().dtype(accumulation_dtype(features.scalar_type()));
  return {at::empty({rows}, opts),
          at::empty({rows}, opts),
          at::empty({with_grad ? rows : 0, dim}, opts),
          at::empty({with_grad ? rows : 0, dim}, opts),
          at::empty({rows, k}, opts),
          at::empty({rows, k}, opts.dtype(at::kLong))};
}

// The outputs of bank_topk: values [B, k] in the queries' dtype, indices [B, k] int64.
inline std::tuple<at::Tensor, at::Tensor> empty_topk_outputs(const at::Tensor& queries, int64_t k) {
  const int64_t rows = queries.size(0);
  return {at::empty({rows, k}, queries.options()), at::empty({rows, k}, queries.options().dtype(at::kLong))};
}

}  // namespace snca_ext
