// Vector helpers shared by the CPU kernels' per-instruction-set bodies
// (attention_cpu_impl.h, linear_cpu_impl.h, activation_cpu_impl.h), written
// once over GCC vector extensions. The including .cpp defines, before it:
//   FF_ISA     the namespace of this compilation (generic / avx2 / avx512 / avx512bf16)
//   FF_W       floats per vector register (4 / 8 / 16)
//   FF_TARGET  (optional) the `#pragma GCC target` string, e.g. "avx2,fma"
// A body uses them with `using namespace cpu_vec::FF_ISA;` and sets the same
// target for its own functions with FF_TARGET_PRAGMA. One instruction set per
// translation unit: the functions are static, each .cpp compiles its own copy.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if !defined(FF_ISA) || !defined(FF_W)
#error "define FF_ISA and FF_W before including vec.h"
#endif

#define FF_DO_PRAGMA(x) _Pragma(#x)
#define FF_TARGET_PRAGMA(t) FF_DO_PRAGMA(GCC target(t))

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastformer {
namespace cpu_vec {
namespace FF_ISA {

#ifdef FF_TARGET
#pragma GCC push_options
FF_TARGET_PRAGMA(FF_TARGET)
#endif

constexpr int W = FF_W;
constexpr float kLog2e = 1.4426950408889634f;

typedef float vf __attribute__((vector_size(W * 4)));
typedef float vfu __attribute__((vector_size(W * 4), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(W * 4)));
typedef uint16_t vhu __attribute__((vector_size(W * 2), aligned(2)));  // W bf16 values, unaligned

static inline vf vload(const float* p) { return *reinterpret_cast<const vfu*>(p); }
static inline void vstore(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
static inline vf vsplat(float s) { return vf{} + s; }
// mask lanes all ones or all zeros. A vector ?: (one blend): written as bit masks, GCC folded the
// AND into the operand's computation and evaluated a division twice (activation_cpu_impl.h).
static inline vf vselect(vi mask, vf a, vf b) { return mask != 0 ? a : b; }

// W bf16 values widened to float (exact: a bf16 is a float's high half).
static inline vf vload_bf16(const uint16_t* p) {
  const vhu h = *reinterpret_cast<const vhu*>(p);
  return (vf)(__builtin_convertvector(h, vi) << 16);
}

// W floats rounded to bf16, nearest even: float_to_bf16 (bf16_bits.h) lane by lane. Non-NaN
// values get c10::BFloat16's bits exactly; a NaN stays a quiet NaN with its sign and payload
// (c10 returns the canonical 0x7fc0: a NaN either way).
static inline void vstore_bf16(uint16_t* p, vf x) {
  const vi u = (vi)x;
  const vi rounded = (vi)((uint32_t __attribute__((vector_size(W * 4))))(u + 0x7fff + ((u >> 16) & 1)) >> 16);
  const vi nan = (u & 0x7fffffff) > 0x7f800000;
  const vi quiet = (vi)((uint32_t __attribute__((vector_size(W * 4))))u >> 16) | 0x40;
  const vi bits = (rounded & ~nan) | (quiet & nan);
#if FF_W == 16 && defined(__x86_64__)
  // One vpmovdw: GCC lowers the generic narrowing to a pack, a permute and a stack round trip.
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16((__m512i)bits));
#else
  *reinterpret_cast<vhu*>(p) = __builtin_convertvector(bits, vhu);
#endif
}

// The polynomial part of vexp2: 2^f for |f| <= 1/2.
template <int Degree>
static inline vf exp2_poly(vf f) {
  vf p;
  if constexpr (Degree == 7) {
    p = vsplat(1.525273380405984e-05f);
    p = p * f + 1.5403530393381606e-04f;
    p = p * f + 1.3333558146428443e-03f;
    p = p * f + 9.618129107628477e-03f;
    p = p * f + 5.550410866482158e-02f;
    p = p * f + 2.402265069591007e-01f;
    p = p * f + 6.931471805599453e-01f;
    p = p * f + 1.f;
  } else {  // degree 4, relative error 2.8e-6 (p(0) = 1 exactly): for results rounded to bf16 next
    static_assert(Degree == 4, "vexp2: degree 7 or 4");
    p = vsplat(9.582576342e-03f);
    p = p * f + 5.590682849e-02f;
    p = p * f + 2.402410656e-01f;
    p = p * f + 6.931241155e-01f;
    p = p * f + 1.f;
  }
  return p;
}

// 2^x for x <= 0 (attention weights): exact 0 below -126 (and for -inf), NaN stays NaN;
// x > 127 is taken as 127 (callers with positive arguments handle that range themselves).
// Range reduction x = n + f with n = round(x), |f| <= 1/2, by the "magic number"
// rounding (x + 1.5 * 2^23 leaves round(x) in the low mantissa bits, round-to-nearest
// mode; no floor/convert round trip), then a degree-7 polynomial (relative error
// < 1e-8, under fp32 rounding) and 2^n built from n's bits. 17 vector operations.
// (The softmax runs vexp2_weight, below, once per score.)
template <int Degree = 7>
static inline vf vexp2(vf x) {
  const vi tiny = x < vsplat(-126.f);
  vf xc = x < vsplat(-126.f) ? vsplat(-126.f) : x;
  xc = xc > vsplat(127.f) ? vsplat(127.f) : xc;
  const vf magic = vsplat(12582912.f);  // 1.5 * 2^23
  const vf t = xc + magic;              // round(xc) in the low mantissa bits
  const vf f = xc - (t - magic);
  const vf p = exp2_poly<Degree>(f);
  // (bits(t) + 127) << 23: the low 9 bits of bits(t) are n (two's complement), so this is
  // (n + 127) << 23, the exponent field of 2^n, for n in [-126, 127].
  const vf r = p * (vf)(((vi)t + 127) << 23);
  return (vf)((vi)r & ~tiny);
}

// vexp2 for softmax weights: x <= 0 up to a rounding (a score minus the row's max or its
// log-sum-exp), so no upper clamp. Same results as vexp2 for x <= 0 (the same f, polynomial
// and n; exact 0 below -126 and for -inf, never a subnormal; NaN stays NaN). On AVX-512,
// n = round(x) is one vrndscaleps and p * 2^n one zero-masked vscalefps: 8 instructions a
// vector with the degree-4 polynomial instead of vexp2's 13 (its bit assembly and clamps).
template <int Degree = 7>
static inline vf vexp2_weight(vf x) {
#if FF_W == 16 && defined(__x86_64__)
  const __mmask16 keep = _mm512_cmp_ps_mask((__m512)x, _mm512_set1_ps(-126.f), _CMP_NLT_UQ);  // NaN kept
  const vf n = (vf)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vf p = exp2_poly<Degree>(x - n);
  return (vf)_mm512_maskz_scalef_ps(keep, (__m512)p, (__m512)n);
#else
  return vexp2<Degree>(x);
#endif
}

// Horizontal reduction of one vector by op(kept, other): a tree (log2 W dependent steps, not W).
template <typename Op>
static inline float hreduce(vf v, Op op) {
  float a[W];
  std::memcpy(a, &v, sizeof(v));
#pragma GCC unroll 8
  for (int w = W / 2; w >= 1; w /= 2)
#pragma GCC unroll 16
    for (int t = 0; t < w; ++t) a[t] = op(a[t], a[t + w]);
  return a[0];
}

// NaN lanes never win the max (as the row maxima over finite scores need).
static inline float hmax(vf v) { return hreduce(v, [](float a, float b) { return b > a ? b : a; }); }
static inline float hsum(vf v) { return hreduce(v, [](float a, float b) { return a + b; }); }

// True if any lane of the mask is set (one instruction on x86).
static inline bool vany(vi m) {
#if FF_W == 16 && defined(__x86_64__)
  return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif FF_W == 8 && defined(__x86_64__)
  return _mm256_movemask_ps((__m256)m) != 0;
#elif FF_W == 4 && defined(__x86_64__)
  return _mm_movemask_ps((__m128)m) != 0;
#else
  for (int t = 0; t < W; ++t)
    if (m[t]) return true;
  return false;
#endif
}

#ifdef FF_TARGET
#pragma GCC pop_options
#endif

}  // namespace FF_ISA
}  // namespace cpu_vec
}  // namespace fastformer

#pragma GCC diagnostic pop
