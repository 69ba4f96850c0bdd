// The decoding GEMM for processors with AVX512_BF16: bfloat16 weights and x multiply as bf16
// pairs with `vdpbf16ps` (two exact products summed into a float32 lane per instruction), the
// instruction torch's oneDNN bf16 GEMM uses too. The widening path of linear_cpu_impl.h spends
// two instructions per product and lost to oneDNN from 4 rows of x (bench/NOTES.md); float32
// problems run the AVX-512 kernels unchanged.
//
// Both operands are read in place: a weight row and an x row are contiguous along K, which is
// exactly the pair layout vdpbf16ps wants, so nothing is packed. The K tail is a masked load
// (zeros add nothing). The sums run in a different order than the float32 path's.
#if defined(__x86_64__)
#include <immintrin.h>

#include "bf16_bits.h"
#include "linear_cpu.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

namespace fastformer {
namespace cpu_linear {
namespace avx512bf16 {
namespace {

constexpr int R = 4;   // weight rows per group
constexpr int MB = 4;  // x rows per pass: 16 accumulators

// y[m0 .. m0+M) x [n, n+RR): RR weight rows against M rows of x.
template <int M, int RR>
inline void group(const Args& a, int64_t m0, int64_t n) {
  const int64_t K = a.K;
  const uint16_t* w = static_cast<const uint16_t*>(a.w);
  const uint16_t* x = a.x_bf16 + m0 * a.ldx;
  __m512 acc[M][RR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_setzero_ps();
  const int64_t pf = R * a.ldw;  // the next group's rows, same column (as the float path)
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[RR];
    for (int r = 0; r < RR; ++r) {
      const uint16_t* p = w + (n + r) * a.ldw + k;
      _mm_prefetch(reinterpret_cast<const char*>(p + pf), _MM_HINT_T0);
      wv[r] = _mm512_loadu_si512(p);
    }
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * a.ldx + k);
      for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mk = (__mmask32)((1ull << (K - k)) - 1);
    __m512i wv[RR];
    for (int r = 0; r < RR; ++r) wv[r] = _mm512_maskz_loadu_epi16(mk, w + (n + r) * a.ldw + k);
    for (int m = 0; m < M; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + m * a.ldx + k);
      for (int r = 0; r < RR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], (__m512bh)xv, (__m512bh)wv[r]);
    }
  }
  const uint16_t* bias = static_cast<const uint16_t*>(a.bias);
  uint16_t* y = static_cast<uint16_t*>(a.y);
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < RR; ++r) {
      float s = _mm512_reduce_add_ps(acc[m][r]);
      if (bias) s += bf16_to_float(bias[n + r]);
      y[(m0 + m) * a.ldy + n + r] = float_to_bf16(s);
    }
}

template <int M, int RR>
inline void all_rows(const Args& a, int64_t n, int64_t m) {
  for (; m + M <= a.M; m += M) group<M, RR>(a, m, n);
  if constexpr (M > 1) {
    if (m < a.M) all_rows<M / 2, RR>(a, n, m);
  }
}

void columns(const Args& a, int64_t n0, int64_t n1) {
  if (!a.bf16) {
    kernels_avx512.columns(a, n0, n1);
    return;
  }
  int64_t n = n0;
  for (; n + R <= n1; n += R) all_rows<MB, R>(a, n, 0);
  for (; n < n1; ++n) all_rows<MB, 1>(a, n, 0);
}

}  // namespace
}  // namespace avx512bf16

const Kernels kernels_avx512bf16 = {"avx512_bf16", &avx512bf16::columns, true};

}  // namespace cpu_linear
}  // namespace fastformer

#pragma GCC pop_options
#endif
