// The host side of the kernels' launches, shared by snca_forward.cu and bank_topk.cu: the device's
// configuration (tile_config.h), the engine for the tensors' dtypes, the kernel arguments, the split
// count, the common input checks.
#pragma once

#include "engine_generic.cuh"
#include "engine_mma16.cuh"
#include "engine_tf32.cuh"
#include "stream_common.cuh"

namespace snca_ext {
namespace {

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

// The current device's opt-in shared memory per block (99 KB on sm_86/89/120, 163 KB on sm_80,
// 227 KB on sm_90). The environment variable SNCA_EXT_SMEM_OPTIN may lower it (never raise it),
// so that one GPU can run the configurations of the smaller ones (benchmarks/edge_shapes.py does).
inline int device_smem_optin() {
  const int optin = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
  const char* limit = std::getenv("SNCA_EXT_SMEM_OPTIN");
  return limit ? std::min(optin, std::atoi(limit)) : optin;
}

// The tile configuration for these features on the current device (tile_config.h).
inline tile::Features feature_kind(at::ScalarType dtype) {
  if (dtype == at::kDouble) return tile::Features::kFloat64;
  if (dtype == at::kBFloat16 || dtype == at::kHalf) return tile::Features::k16Bit;
  return tile::Features::kFloat32;
}

inline tile::Config device_config(const at::Tensor& features) {
  const int optin = device_smem_optin();
  const tile::Config c = tile::choose_config(features.size(1), feature_kind(features.scalar_type()), optin);
  TORCH_CHECK(c.fits, "snca_ext's CUDA kernels need ", std::max(c.lse_smem, c.topk_smem),
              " bytes of shared memory per block; this GPU allows ", optin);
  return c;
}

// Calls f(EngineTag<E>{}) with the engine of configuration c for these dtypes. k16Bit: the caller
// has kernels for the 16-bit engine (snca_forward's lse pass; bf16/fp16 features, D <= 128, reach
// only that caller: bank_topk's queries are fp32, and the op upcasts 16-bit features at D > 128).
template <bool k16Bit = false, typename F>
void with_engine(const at::Tensor& features, const at::Tensor& bank, const tile::Config& c, F&& f) {
  if (features.scalar_type() == at::kDouble) {
    f(EngineTag<GenericEngine<double, double>>{});
    return;
  }
  const at::ScalarType ft = features.scalar_type();
  TORCH_CHECK(ft == at::kFloat || (k16Bit && c.stages > 0), "features dtype ", ft,
              " has no CUDA engine here");
  auto pick = [&](auto bank_tag) {
    using bank_t = typename decltype(bank_tag)::type;
    if constexpr (k16Bit) {
      if (c.stages > 0) {
        auto pick16 = [&](auto feat_tag) {
          using feat_t = typename decltype(feat_tag)::type;
          if (c.dp == 64) {
            f(EngineTag<Mma16Engine<64, feat_t, bank_t>>{});
          } else {
            f(EngineTag<Mma16Engine<128, feat_t, bank_t>>{});
          }
        };
        if (ft == at::kBFloat16) {
          pick16(EngineTag<c10::BFloat16>{});
        } else {
          pick16(EngineTag<c10::Half>{});
        }
        return;
      }
    }
    if (!c.tensor_cores) {
      f(EngineTag<GenericEngine<float, bank_t>>{});
    } else if (c.dp == 64) {
      f(EngineTag<TensorCoreEngine<64, bank_t, true>>{});
    } else if (c.queries_in_smem) {
      f(EngineTag<TensorCoreEngine<128, bank_t, true>>{});
    } else {
      f(EngineTag<TensorCoreEngine<128, bank_t, false>>{});
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
  a.features = features.data_ptr<typename E::feat_t>();
  a.bank = bank.data_ptr<bank_t>();
  a.self_rows = self_rows.data_ptr<int64_t>();
  a.B = features.size(0);
  a.N = bank.size(0);
  a.D = features.size(1);
  a.Bpad = (a.B + kRows - 1) / kRows * kRows;
  a.num_tiles = static_cast<int>((a.N + kCols - 1) / kCols);
  a.inv_t = static_cast<acc_t>(1.0 / temperature);
  a.tf32_only = at::globalContext().allowTF32CuBLAS();
  a.vec_ok = E::acc_cols(a.D) == a.D &&
             reinterpret_cast<uintptr_t>(bank.data_ptr()) % 16 == 0;
  return a;
}

// The zero-padded [Bpad, Dp] copy of the queries for an engine that reads them from global memory
// (an undefined tensor for the others); it must stay alive until the kernels have run.
// Prepared as the tensor-core engine's init prepares the queries it keeps in shared memory: planes
// [2][Bpad][Dp] of (hi, lo) = (tf32(x), tf32(x - hi)) by truncation, non-finite values as 0.
template <class E>
at::Tensor pad_queries(const at::Tensor& features, typename E::Args& a) {
  if (!E::kPaddedQueries) return at::Tensor();
  constexpr int64_t kTf32Mask = -8192;  // 0xffffe000: the sign, the exponent, 10 mantissa bits
  const at::Tensor x = at::where(features.isfinite(), features, 0.0).contiguous();
  const at::Tensor hi = at::bitwise_and(x.view(at::kInt), kTf32Mask).view(at::kFloat);
  const at::Tensor lo = at::bitwise_and((x - hi).contiguous().view(at::kInt), kTf32Mask).view(at::kFloat);
  at::Tensor padded = at::zeros({2, a.Bpad, E::acc_cols(a.D)}, features.options());
  padded.select(0, 0).narrow(0, 0, a.B).narrow(1, 0, a.D).copy_(hi);
  padded.select(0, 1).narrow(0, 0, a.B).narrow(1, 0, a.D).copy_(lo);
  a.queries_padded = padded.data_ptr<float>();
  return padded;
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
  // value cannot read out of bounds. Checked on the device: reading the range on the host would
  // synchronise every call (and could not run under CUDA graph capture).
  if (self_rows.numel() > 0) {
    const std::string message =
        std::string(self_name) + " must be in [-1, N=" + std::to_string(bank.size(0)) + ")";
    at::_assert_async(at::logical_and(self_rows.ge(-1), self_rows.lt(bank.size(0))).all(), message);
  }
}

}  // namespace
}  // namespace snca_ext
