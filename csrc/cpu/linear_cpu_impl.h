// The decoding GEMM's body (see linear_cpu.h), written once over GCC vector
// extensions and compiled per instruction set: a .cpp defines FF_ISA (the
// namespace), FF_W (floats per vector), FF_MB (x rows per pass: the M x 4
// accumulators plus 4 weight vectors must fit the register file) and
// optionally FF_TARGET (the `#pragma GCC target` string), FF_KERNELS.
//
// Each pass reads a group of 4 weight rows once, streaming them with one
// vector load per row per step, against up to FF_MB rows of x (which stay in
// L1): 4 independent memory streams per thread keep the prefetchers busy, and
// the x rows reuse each loaded weight vector. Each output is a W-lane partial
// sum reduced by a tree at the end (fp32 throughout, bias added in fp32 before
// the one rounding to bf16).
#include <cstring>

#include "bf16_bits.h"
#include "linear_cpu.h"
#include "vec.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastformer {
namespace cpu_linear {
namespace FF_ISA {

using namespace cpu_vec::FF_ISA;

#ifdef FF_TARGET
#pragma GCC push_options
FF_TARGET_PRAGMA(FF_TARGET)
#endif

constexpr int R = 4;  // weight rows per group

template <bool BF16>
static inline vf wload(const void* w, int64_t i) {
  if constexpr (BF16) return vload_bf16(static_cast<const uint16_t*>(w) + i);
  return vload(static_cast<const float*>(w) + i);
}

template <bool BF16>
static inline float wscalar(const void* w, int64_t i) {
  if constexpr (BF16) return bf16_to_float(static_cast<const uint16_t*>(w)[i]);
  return static_cast<const float*>(w)[i];
}

// y[m0 .. m0+MB) x [n, n+RR): RR weight rows (4, or 1 for the remainder) against MB rows of x.
template <bool BF16, int MB, int RR>
static inline void group(const Args& a, int64_t m0, int64_t n) {
  const int64_t K = a.K, Kv = K / W * W;
  const float* x = a.x + m0 * a.ldx;
  vf acc[MB][RR];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < RR; ++r) acc[m][r] = vf{};
  // Software prefetch of the next group's rows at the same column: the hardware prefetchers
  // alone leave short rows (K = 384: 1.5 KiB) at 10-14 GB/s; with it 15-27 GB/s (NOTES).
  const int64_t pf = R * a.ldw * (BF16 ? 2 : 4);  // bytes ahead
  for (int64_t k = 0; k < Kv; k += W) {
    vf wv[RR];
#pragma GCC unroll 4
    for (int r = 0; r < RR; ++r) {
      const int64_t i = (n + r) * a.ldw + k;
      __builtin_prefetch(static_cast<const char*>(a.w) + i * (BF16 ? 2 : 4) + pf, 0, 3);
      wv[r] = wload<BF16>(a.w, i);
    }
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) {
      const vf xv = vload(x + m * a.ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < RR; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < RR; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = Kv; k < K; ++k) s += x[m * a.ldx + k] * wscalar<BF16>(a.w, (n + r) * a.ldw + k);
      if (a.bias) s += wscalar<BF16>(a.bias, n + r);
      const int64_t at = (m0 + m) * a.ldy + n + r;
      if constexpr (BF16) {
        static_cast<uint16_t*>(a.y)[at] = float_to_bf16(s);
      } else {
        static_cast<float*>(a.y)[at] = s;
      }
    }
  }
}

// Every row of x against weight rows [n, n + RR): FF_MB rows of x per pass, then halves for the
// rest (4, 2, 1). The group's weight rows are read from memory by the first pass; the later
// passes find them in L1/L2 (4 rows of K = 1536 floats are 24 KiB).
template <bool BF16, int MB, int RR>
static inline void all_rows(const Args& a, int64_t n, int64_t m) {
  for (; m + MB <= a.M; m += MB) group<BF16, MB, RR>(a, m, n);
  if constexpr (MB > 1) {
    if (m < a.M) all_rows<BF16, MB / 2, RR>(a, n, m);
  }
}

template <bool BF16>
static void columns_t(const Args& a, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + R <= n1; n += R) all_rows<BF16, FF_MB, R>(a, n, 0);
  for (; n < n1; ++n) all_rows<BF16, FF_MB, 1>(a, n, 0);
}

static void columns(const Args& a, int64_t n0, int64_t n1) {
  if (a.bf16) {
    columns_t<true>(a, n0, n1);
  } else {
    columns_t<false>(a, n0, n1);
  }
}

#ifdef FF_TARGET
#pragma GCC pop_options
#endif

}  // namespace FF_ISA

const Kernels FF_KERNELS = {FF_ISA_NAME, &FF_ISA::columns, false};

}  // namespace cpu_linear
}  // namespace fastformer

#pragma GCC diagnostic pop
