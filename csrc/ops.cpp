// Schemas of the fused SNCA ops. The per-device kernels live in cpu/ and cuda/ and register
// themselves with TORCH_LIBRARY_IMPL; the Triton twins are registered from Python.
//
// snca_forward streams the bank once and returns, per query i (s_ij = <f_i, m_j> / T, the
// query's own row idx_i excluded):
//   lse_same[i]   = logsumexp_{j : y_j == y_i} s_ij        (-inf when there is no such row)
//   lse_other[i]  = logsumexp_{j : y_j != y_i} s_ij        (-inf when there is no such row)
//   wmean_same    = sum_{same} softmax_same(s)_ij  m_j     [B, D] when with_grad, else [0, D]
//   wmean_other   = sum_{other} softmax_other(s)_ij m_j    [B, D] when with_grad, else [0, D]
//                   (zero rows for an empty group; d lse / d f_i = wmean / T, README "How it works")
//   topk_values   = the k largest <f_i, m_j> (j != idx_i), descending, ties to the lower j
//   topk_indices  = their bank rows; -1 (value -inf) where fewer than k rows are eligible
// Accumulation is in fp32 (fp64 for fp64 features); the bank may be fp32, fp64 (with fp64
// features), bf16 or fp16 (with fp32, bf16 or fp16 features).
#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda/tile_config.h"

// setup.py passes the TORCH_CUDA_ARCH_LIST it built the CUDA kernels for (commas for semicolons)
// when it builds them; nothing otherwise.
#ifdef SNCA_CUDA_ARCHS
#define SNCA_STRINGIFY_(...) #__VA_ARGS__
#define SNCA_STRINGIFY(...) SNCA_STRINGIFY_(__VA_ARGS__)
#define SNCA_CUDA_ARCH_STRING SNCA_STRINGIFY(SNCA_CUDA_ARCHS)
#else
#define SNCA_CUDA_ARCH_STRING ""
#endif

namespace {

std::string cuda_archs() { return SNCA_CUDA_ARCH_STRING; }

// The tile configuration the CUDA kernels pick for features of dimension `dim` and dtype
// `features_dtype` on a device with `smem_optin` bytes of opt-in shared memory per block:
// [tensor_cores, padded D, queries_in_smem, lse kernel bytes, top-k kernel bytes, fits, stages]
// (stages: the 16-bit engine's bank tiles in flight, 0 for the other engines).
std::vector<int64_t> cuda_tile_config(int64_t dim, c10::ScalarType features_dtype, int64_t smem_optin) {
  using snca_ext::tile::Features;
  TORCH_CHECK(dim > 0, "dim must be > 0, got ", dim);
  TORCH_CHECK(features_dtype == c10::kFloat || features_dtype == c10::kDouble ||
                  features_dtype == c10::kBFloat16 || features_dtype == c10::kHalf,
              "features_dtype must be float32, float64, bfloat16 or float16, got ", features_dtype);
  const Features kind = features_dtype == c10::kDouble  ? Features::kFloat64
                        : features_dtype == c10::kFloat ? Features::kFloat32
                                                        : Features::k16Bit;
  const auto c = snca_ext::tile::choose_config(dim, kind, smem_optin);
  return {c.tensor_cores, c.dp,   c.queries_in_smem, int64_t(c.lse_smem), int64_t(c.topk_smem),
          c.fits,         c.stages};
}

}  // namespace

TORCH_LIBRARY(snca_ext, m) {
  m.def(
      "snca_forward(Tensor features, Tensor labels, Tensor indices, Tensor bank, "
      "Tensor bank_labels, float temperature, bool with_grad, int k) -> "
      "(Tensor lse_same, Tensor lse_other, Tensor wmean_same, Tensor wmean_other, "
      "Tensor topk_values, Tensor topk_indices)");
  // The k largest <q_i, m_j> over the bank, j != exclude[i] (exclude[i] = -1 excludes nothing).
  m.def("bank_topk(Tensor queries, Tensor bank, int k, Tensor exclude) -> (Tensor values, Tensor indices)");
  // The TORCH_CUDA_ARCH_LIST the CUDA kernels were built for ("" when they were not): ops.py skips
  // the cuda backend on a GPU this list has no code for.
  m.def("_cuda_archs() -> str", &cuda_archs);
  m.def("_cuda_tile_config(int dim, ScalarType features_dtype, int smem_optin) -> int[]", &cuda_tile_config);
}

// Lets `import snca_ext._C` load the library that carries the registrations above.
extern "C" {
#include <Python.h>
static struct PyModuleDef snca_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&snca_module); }
}
