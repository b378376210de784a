// The tile configuration of the CUDA kernels and its shared-memory footprint: plain C++ (no CUDA
// header), so that ops.cpp can expose the choice as an op (snca_ext::_cuda_tile_config) and a test
// can check, without a GPU, that every configuration the kernels can pick fits every architecture.
//
// Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin): sm_80 166,912 bytes,
// sm_86/sm_89/sm_120 101,376, sm_90/sm_100 232,448. The fp32 tensor-core engine at D = 65..128
// keeps the queries (split once into hi and lo) in shared memory when that fits (138,624 bytes:
// sm_80, sm_90) and otherwise reads them through L1/L2 from a zero-padded copy prepared the same
// way (71,040 bytes: sm_86/89/120). The 16-bit engine (bf16/fp16 features, D <= 128) streams the
// bank through 3 shared-memory stages where they fit (108,416 bytes at D = 128: sm_80, sm_90) and
// 2 elsewhere (90,496 bytes: sm_86/89/120).
#pragma once

#include <cstddef>
#include <cstdint>

namespace snca_ext {
namespace tile {

constexpr int kRows = 64;                     // queries per block
constexpr int kCols = 64;                     // bank rows per tile
constexpr int kThreads = 256;                 // 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = kRows / kWarps;  // query rows per warp in the row phase
constexpr int kLdS = kCols + 4;               // scores row stride (+4: rows in different banks)

constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// lse kernel: scores/P_same [kRows][kLdS], P_other [kRows][kLdS], state [4][kRows] (max_same,
// sum_same, max_other, sum_other), fac [2][kRows], bank labels [kCols] (int64), nan flags [kRows],
// rescale flags [kRows / 16], same-class chunk flags [kRows / 16]; then the engine's part.
constexpr size_t lse_common_bytes(size_t acc_bytes) {
  return align128(acc_bytes * (2 * kRows * kLdS + 6 * kRows) + 8 * kCols +
                  sizeof(int) * (kRows + 2 * (kRows / 16)));
}

constexpr int kTopkBuffer = 256;  // candidates buffered per query before a merge (a power of 2)

// The streaming top-k's state (topk_tile.cuh: TopkState): a sort scratch [kWarps][kTopkBuffer]
// (value, row), threshold [kRows], count [kRows], live buffer [kRows], buffered candidates [kRows].
constexpr size_t topk_state_bytes(size_t acc_bytes) {
  return acc_bytes * (kWarps * kTopkBuffer + kRows) + sizeof(int) * (kWarps * kTopkBuffer + 3 * kRows);
}

// top-k kernel: scores [kRows][kLdS], then the top-k state; then the engine's part.
constexpr size_t topk_common_bytes(size_t acc_bytes) {
  return align128(acc_bytes * kRows * kLdS + topk_state_bytes(acc_bytes));
}

// The lse kernel with the top-k inside (tensor-core engine, fp32): the top-k state between the lse
// kernel's part and the engine's part (17,408 bytes).
constexpr size_t lse_topk_extra_bytes() { return align128(topk_state_bytes(4)); }

// The tensor-core engine: the bank tile [kCols][Dp + 4] as fp32 and, when they are kept in shared
// memory, the queries split once as (hi, lo) [2][kRows][Dp + 4].
constexpr size_t tensor_core_bytes(int dp, bool queries_in_smem) {
  return 4 * size_t((queries_in_smem ? 2 * kRows : 0) + kCols) * (dp + 4);
}

// The 16-bit engine (engine_mma16.cuh): the queries [kRows][Dp + 8] and, per pipeline stage, a
// bank tile [kCols][Dp + 8] in the features' dtype and its labels [kCols] (int64). Rows padded by
// 16 bytes: the 8 rows an ldmatrix reads then start in 8 different 16-byte bank groups.
constexpr int kPad16 = 8;
constexpr size_t mma16_bytes(int dp, int stages) {
  return 2 * size_t(kRows) * (dp + kPad16) + size_t(stages) * (2 * size_t(kCols) * (dp + kPad16) + 8 * kCols);
}

enum class Features { kFloat32, kFloat64, k16Bit };  // bf16 and fp16 features share a layout

struct Config {
  bool tensor_cores;     // false: the generic FMA engine (fp64, or D > 128)
  int dp;                // the tensor-core engine's padded D (64 or 128), else 0
  bool queries_in_smem;  // tensor-core engines: queries staged in shared memory
  size_t lse_smem;       // dynamic shared memory of the lse kernel, bytes
  size_t topk_smem;      // dynamic shared memory of the top-k kernel, bytes (16-bit features: the
                         // fp32 engine's, which runs their top-k when it is not in the lse pass)
  bool fits;             // both fit smem_optin
  int stages;            // 16-bit engine: bank tiles in flight (cp.async pipeline), else 0
};

// The configuration for features of dimension D and kind `features` on a device whose opt-in
// shared memory per block is smem_optin bytes: the fastest one that fits. 16-bit features with
// D > 128 are upcast to fp32 by the op and get the fp32 configuration (the generic engine).
inline Config choose_config(int64_t D, Features features, int64_t smem_optin) {
  if (features == Features::k16Bit && D <= 128) {
    Config c = choose_config(D, Features::kFloat32, smem_optin);
    c.queries_in_smem = true;
    for (int stages : {3, 2}) {
      c.stages = stages;
      c.lse_smem = lse_common_bytes(4) + mma16_bytes(c.dp, stages);
      if (c.lse_smem <= size_t(smem_optin)) break;
    }
    c.fits = c.lse_smem <= size_t(smem_optin) && c.topk_smem <= size_t(smem_optin);
    return c;
  }
  const bool fp64 = features == Features::kFloat64;
  Config c{};
  const size_t acc = fp64 ? 8 : 4;
  c.tensor_cores = !fp64 && D <= 128;
  if (!c.tensor_cores) {
    c.lse_smem = lse_common_bytes(acc);
    c.topk_smem = topk_common_bytes(acc);
  } else {
    c.dp = D <= 64 ? 64 : 128;
    // Only the D = 128 engine has a variant with the queries outside shared memory.
    for (bool in_smem : {true, false}) {
      c.queries_in_smem = in_smem;
      c.lse_smem = lse_common_bytes(acc) + tensor_core_bytes(c.dp, in_smem);
      c.topk_smem = topk_common_bytes(acc) + tensor_core_bytes(c.dp, in_smem);
      if (c.dp == 64 || (c.lse_smem <= size_t(smem_optin) && c.topk_smem <= size_t(smem_optin))) break;
    }
  }
  c.fits = c.lse_smem <= size_t(smem_optin) && c.topk_smem <= size_t(smem_optin);
  return c;
}

}  // namespace tile
}  // namespace snca_ext
