// The generic engine: fp64 features (any D), or 32-bit features with D > 128 (16-bit features with
// D > 128 are upcast to fp32 at the op's entry and come here too). Scalar FMA loops.
#pragma once

#include "stream_common.cuh"

namespace snca_ext {
namespace {

// Any D, fp64 (or fp32 with D > 128): scalar FMA loops reading the inputs through the cache and
// keeping the accumulators of the block's rows in the workspace. Correct, not fast.
template <typename acc_type, typename bank_type>
struct GenericEngine {
  using acc_t = acc_type;
  using feat_t = acc_type;
  using bank_t = bank_type;
  using Args = StreamArgs<acc_t, bank_t>;
  // The tile's start and row count come as arguments, not members: a member written in one call
  // and read in the next was kept in local memory (a stack frame) by ptxas.
  int64_t row0 = 0;
  acc_t* os = nullptr;  // this split's same-class accumulators, row row0
  acc_t* oo = nullptr;  // other classes

  static constexpr bool kPaddedQueries = false;
  static constexpr bool kFragmentSoftmax = false;  // the lse kernel's row phase, through ss
  static constexpr int kMinBlocks = 2;
  static int64_t acc_cols(int64_t D) { return D; }
  static size_t smem_bytes(int64_t, int) { return 0; }

  __device__ void init(unsigned char*, const Args& a, int split_id, int64_t first_row) {
    row0 = first_row;
    if (!a.with_grad) return;
    os = a.osum + (int64_t(split_id) * a.Bpad + row0) * a.D;
    oo = a.osum + (int64_t(a.splits + split_id) * a.Bpad + row0) * a.D;
    for (int64_t e = threadIdx.x; e < kRows * a.D; e += kThreads) {
      os[e] = acc_t(0);
      oo[e] = acc_t(0);
    }
  }

  __device__ bool load_tile(const Args&, int64_t, int) { return false; }

  // IEEE inner products: non-finite values need no special path here.
  __device__ void scores(const Args& a, acc_t* ss, int64_t start, int n, bool) const {
    for (int e = threadIdx.x; e < kRows * kCols; e += kThreads) {
      const int r = e / kCols, c = e % kCols;
      acc_t s = 0;
      if (row0 + r < a.B && c < n) {
        const acc_t* f = a.features + (row0 + r) * a.D;
        const bank_t* m = a.bank + (start + c) * a.D;
        for (int64_t d = 0; d < a.D; ++d) s += f[d] * static_cast<acc_t>(m[d]);
      }
      ss[r * kLdS + c] = s;
    }
  }

  __device__ void accumulate(const Args& a, const acc_t* ps, const acc_t* po, const acc_t* fac,
                             const int*, int64_t start, int n) {
    for (int64_t e = threadIdx.x; e < kRows * a.D; e += kThreads) {
      const int r = static_cast<int>(e / a.D);
      const int64_t d = e % a.D;
      if (row0 + r >= a.B) continue;
      acc_t s = os[e] * fac[r];
      acc_t o = oo[e] * fac[kRows + r];
      for (int c = 0; c < n; ++c) {
        // As in the tensor-core engine: a non-finite bank value has weight 0 and counts as 0.
        const acc_t raw = static_cast<acc_t>(a.bank[(start + c) * a.D + d]);
        const acc_t m = isfinite(raw) ? raw : acc_t(0);
        s += ps[r * kLdS + c] * m;
        o += po[r * kLdS + c] * m;
      }
      os[e] = s;
      oo[e] = o;
    }
  }

  __device__ void store(const Args&, int, int64_t) const {}
};

}  // namespace
}  // namespace snca_ext
