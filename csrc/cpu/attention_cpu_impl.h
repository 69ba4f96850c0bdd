// The CPU attention kernels, written once over GCC vector extensions and
// compiled once per instruction set: a .cpp defines
//   FF_ISA     the namespace (generic / avx2 / avx512)
//   FF_W       floats per vector register (4 / 8 / 16)
//   FF_MR      rows of the register-blocked micro-kernel
//   FF_TARGET  (optional) the `#pragma GCC target` string, e.g. "avx2,fma"
//   FF_KERNELS the name of the Kernels table to define
// and includes this file. Vector extensions let the compiler emit ymm/zmm FMAs
// for the target while the source stays one (no intrinsics per ISA); ATen's
// at::vec would only get the extension's baseline ISA (see bench/NOTES.md).
//
// Both products of a tile are one small GEMM each, C (M x N) (+)= A (M x K) B,
// with B packed in panels (attention_cpu.h) and A read in place through two
// strides, so transposed operands (P^T, dS^T in the backward) cost nothing.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "attention_cpu.h"
#include "bf16_bits.h"
#include "vec.h"

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastformer {
namespace cpu_attn {
namespace FF_ISA {

using namespace cpu_vec::FF_ISA;

#ifdef FF_TARGET
#pragma GCC push_options
FF_TARGET_PRAGMA(FF_TARGET)
#endif

constexpr int NR = 2 * W;  // micro-kernel columns: two vector registers
constexpr int MR = FF_MR;  // micro-kernel rows: 2*MR accumulators stay in registers
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// tanh(x) and its derivative 1 - tanh(x)^2 (stored through `deriv` when set), in two ranges:
//  |x| < 1/2: t = x + x^3 R(x^2), R a degree-4 minimax polynomial for (tanh(x) - x) / x^3
//           (relative error 1e-7 with fp32 coefficients); the correction is at most 8% of
//           x, so t is within about half an ulp of rounding. 1 - t^2 >= 0.78: no cancellation.
//  |x| >= 1/2: t = sign(x) (1 - e) / (1 + e) and 1 - t^2 = 4e / (1 + e)^2, e = exp(-2|x|) <= 0.37,
//           both without cancellation; near saturation 1 - t^2 computed from t would keep
//           none of its digits (t = 1 - 3e-7 at |x| = 8). Runs only for vectors with such a lane:
//           soft-capped scores mostly sit well inside the cap (|score| < cap / 2).
static inline vf vtanh(vf x, vf* deriv) {
  const vf y = x * x;
  vf r = vsplat(-7.117979228e-03f);
  r = r * y + 2.157240920e-02f;
  r = r * y - 5.395178869e-02f;
  r = r * y + 1.333332509e-01f;
  r = r * y - 3.333333433e-01f;
  vf t = (x * y) * r + x;
  if (deriv) *deriv = 1.f - t * t;
  const vi sign = (vi)x & (int32_t)0x80000000;
  const vf a = (vf)((vi)x ^ sign);
  const vi far = a >= vsplat(0.5f);
  if (vany(far)) {
    const vf e = vexp2(a * (-2.f * kLog2e));
    const vf inv = 1.f / (1.f + e);
    const vf tf = (vf)((vi)((1.f - e) * inv) | sign);
    t = vselect(far, tf, t);
    if (deriv) *deriv = vselect(far, 4.f * e * inv * inv, *deriv);
  }
  return t;
}

// ---------------------------------------------------------------- GEMM

// C[0:R, 0:NR] (+)= sum_k A(r, k) * B[k * b_rs + 0:NR], A(r, k) = A[r * a_rs + k * a_cs].
template <int R>
static inline void micro(int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B, int64_t b_rs,
                         float* C, int64_t ldc, bool acc) {
  vf c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? vload(C + r * ldc) : vf{};
    c1[r] = acc ? vload(C + r * ldc + W) : vf{};
  }
  for (int64_t k = 0; k < K; ++k) {
    const vf b0 = vload(B + k * b_rs), b1 = vload(B + k * b_rs + W);
    const float* a = A + k * a_cs;
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const float s = a[r * a_rs];
      c0[r] += s * b0;
      c1[r] += s * b1;
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    vstore(C + r * ldc, c0[r]);
    vstore(C + r * ldc + W, c1[r]);
  }
}

template <int R>
static inline void micro_tail(int64_t rows, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                              int64_t b_rs, float* C, int64_t ldc, bool acc) {
  if constexpr (R > 0) {
    if (rows == R)
      micro<R>(K, A, a_rs, a_cs, B, b_rs, C, ldc, acc);
    else
      micro_tail<R - 1>(rows, K, A, a_rs, a_cs, B, b_rs, C, ldc, acc);
  }
}

// C (M x ceil(N/NR)*NR, row stride ldc) (+)= A (M x K, strides a_rs/a_cs) * B, where
// B's panel p (K x NR, row stride b_rs) starts at B + p * b_panel_stride. Columns past N are
// computed from the zero padding and may be written (ldc leaves room).
static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                 int64_t b_rs, int64_t b_panel_stride, float* C, int64_t ldc, bool acc) {
  for (int64_t p = 0; p * NR < N; ++p) {
    const float* Bp = B + p * b_panel_stride;
    float* Cp = C + p * NR;
    int64_t r = 0;
    for (; r + MR <= M; r += MR) micro<MR>(K, A + r * a_rs, a_rs, a_cs, Bp, b_rs, Cp + r * ldc, ldc, acc);
    if (r < M) micro_tail<MR - 1>(M - r, K, A + r * a_rs, a_rs, a_cs, Bp, b_rs, Cp + r * ldc, ldc, acc);
  }
}

// ---------------------------------------------------------------- row operations

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The causal / right-window edge inside a key tile: row i sees the tile's first keys_seen keys
// (j0 .. i + diag_offset + window_right; <= 0 when none, >= n when all of a tile of n).
static inline int64_t keys_seen(const Problem& p, int64_t i, int64_t j0) {
  return p.limit_right ? i + 1 + p.diag_offset + p.window_right - j0 : std::numeric_limits<int64_t>::max();
}

// The keys a sub-block of rows ending at row `last` computes on an edge tile: those its last row
// sees, rounded up to whole panels (the extra keys are masked for every row of it), at most n.
static inline int64_t keys_computed(const Problem& p, int64_t last, int64_t j0, int64_t n) {
  return std::min(n, round_up(keys_seen(p, last, j0), NR));
}

// Rows first .. first+rows-1 against the key tile j0 .. j0+n-1, as fn(r0, mr, ne): rows
// first+r0 .. +mr-1 over the tile's first ne keys. On an `edge` tile (the causal / right-window
// edge crosses it) the rows run in sub-blocks of NR, each over keys_computed (the extra keys are
// masked for all its rows), and a sub-block that sees no key of the tile is skipped; otherwise
// one block over all n keys. The four kernels (fp32 / bf16, forward / backward) tile this way.
template <typename Fn>
static inline void for_tile_sub_blocks(const Problem& p, int64_t first, int64_t rows, int64_t j0, int64_t n, bool edge,
                                       const Fn& fn) {
  const int64_t step = edge ? NR : rows;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t mr = std::min(step, rows - r0);
    const int64_t ne = edge ? keys_computed(p, first + r0 + mr - 1, j0, n) : n;
    if (ne > 0) fn(r0, mr, ne);
  }
}

// A float mask value in the log2 domain. Finite fills beyond +-kMaskLimit (finfo.min, the
// padding fill of Hugging Face models) would overflow to -+inf once scaled by log2(e):
// they saturate instead, so a row of equal huge fills stays a row of equal finite scores
// (uniform weights over its keys, as torch gives) while -inf still means "masked".
// kMaskLimit * log2(e) = 3.3e38 leaves room below FLT_MAX for the scaled q.k term.
constexpr float kMaskLimit = 2.3e38f;
static inline float mask_log2(float x) {
  if (std::fabs(x) > kMaskLimit && std::isfinite(x)) x = std::copysign(kMaskLimit, x);
  return x * kLog2e;
}

// Scores that need no pass of their own before the softmax: no soft-cap, ALiBi or float
// mask (bool masks and window limits write -inf, the same scaled or not) and a positive
// scale (so max(s) * c = max(s * c), both rounded alike). Their scale c = scale * log2(e) is
// applied in the exp pass.
static inline bool raw_scores(const Problem& p) {
  return !p.softcap && p.slopes.data == nullptr && (p.mask.kind == kMaskNone || p.mask.kind == kMaskBool) &&
         p.scale > 0.f;
}

// The exp pass forms a weight's exponent as (round(s * exp_scale) - shift) * exp_units from the
// scores score_row leaves. Raw scores: the scale, then log2(e): the difference is taken in natural
// units, as torch's exp(s - m), so the backward's round(s * scale) - lse is exact for the row's
// largest score (row_lse). Scores already in the log2 domain: 1 and 1.
static inline float exp_scale(const Problem& p) { return raw_scores(p) ? p.scale : 1.f; }
static inline float exp_units(const Problem& p) { return raw_scores(p) ? kLog2e : 1.f; }

// The row's scores from raw q.k, before the mask, in the log2 domain (raw scores, see
// raw_scores, stay as they are: the exp pass scales them): scaled, or soft-capped
// (softcap_out * tanh(s * softcap_in), with the tanh's derivative stored through `deriv` when
// set, the backward's), then the ALiBi bias; one pass over the row. s[n:npad] = -inf, so
// vector loops need no tail.
static inline void score_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, int64_t npad,
                             float* s, float* deriv) {
  if (raw_scores(p)) {  // scaled in the exp pass (exp_scale)
    for (int64_t j = n; j < npad; ++j) s[j] = kNegInf;
    return;
  }
  const bool alibi = p.slopes.data != nullptr;
  // ALiBi: s[j] -= slope * |d0 - j|, d0 the distance to key j0 (bottom-right aligned).
  const vf sl = vsplat(alibi ? p.slopes.data[b * p.slopes.sb + h * p.slopes.sh] * kLog2e : 0.f);
  vf dist = vsplat((float)(i + p.S - p.L - j0));
  for (int t = 0; t < W; ++t) dist[t] -= (float)t;
  const vi abs_bits = vi{} + 0x7fffffff;
  const vf scale = vsplat(p.scale * kLog2e), cap_in = vsplat(p.softcap_in), cap_out = vsplat(p.softcap_out);
  for (int64_t j = 0; j < npad; j += W, dist -= (float)W) {
    vf x = vload(s + j);
    if (p.softcap) {
      vf dt;
      x = vtanh(x * cap_in, deriv ? &dt : nullptr) * cap_out;
      if (deriv) vstore(deriv + j, dt);
    } else {
      x = x * scale;
    }
    if (alibi) x -= sl * (vf)((vi)dist & abs_bits);
    vstore(s + j, x);
  }
  for (int64_t j = n; j < npad; ++j) s[j] = kNegInf;
}

// The mask and the window/causal limits for query i on keys j0 .. j0+n-1, in the log2 domain.
static inline void mask_row(const Problem& p, int64_t b, int64_t h, int64_t i, int64_t j0, int64_t n, float* s) {
  const MaskView& m = p.mask;
  if (m.kind != kMaskNone) {
    const int64_t base = b * m.sb + h * m.sh + i * m.sl + j0 * m.ss;
    if (m.kind == kMaskBool) {
      const bool* mb = static_cast<const bool*>(m.data) + base;
      // Added, not assigned, as torch's kernels add the bool mask's -inf bias: a NaN or inf score
      // at a masked key (a NaN key row) still makes the row NaN, as torch's output is.
      for (int64_t j = 0; j < n; ++j)
        if (!mb[j * m.ss]) s[j] += kNegInf;
    } else if (m.kind == kMaskF32) {
      const float* mf = static_cast<const float*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) s[j] += mask_log2(mf[j * m.ss]);
    } else {
      const uint16_t* mh = static_cast<const uint16_t*>(m.data) + base;
      for (int64_t j = 0; j < n; ++j) s[j] += mask_log2(bf16_to_float(mh[j * m.ss]));
    }
  }
  if (p.limit_right) {
    const int64_t first_hidden = std::max<int64_t>(0, i + p.diag_offset + p.window_right + 1 - j0);
    for (int64_t j = first_hidden; j < n; ++j) s[j] = kNegInf;
  }
  if (p.limit_left) {
    const int64_t first_visible = std::min<int64_t>(n, std::max<int64_t>(0, i + p.diag_offset - p.window_left - j0));
    for (int64_t j = 0; j < first_visible; ++j) s[j] = kNegInf;
  }
}

static inline bool any_nan(const float* s, int64_t npad) {
  for (int64_t j = 0; j < npad; j += W) {
    const vf x = vload(s + j);
    if (vany(x != x)) return true;
  }
  return false;
}

static inline float row_max(const float* s, int64_t npad) {
  vf m0 = vsplat(kNegInf), m1 = m0;  // two chains: the max's latency, not its throughput, bound one
  int64_t j = 0;
  for (; j + 2 * W <= npad; j += 2 * W) {
    const vf x0 = vload(s + j), x1 = vload(s + j + W);
    m0 = x0 > m0 ? x0 : m0;  // NaN never wins (as torch's max over finite scores)
    m1 = x1 > m1 ? x1 : m1;
  }
  if (j < npad) {
    const vf x = vload(s + j);
    m0 = x > m0 ? x : m0;
  }
  return hmax(m1 > m0 ? m1 : m0);
}

// x as computed, never fused into the operation that follows. The exponent of a weight is
// round(s * c) - shift: for the row's largest score that must be exactly 0, as it was when the
// scaling had a pass of its own. A fused multiply-add would leave the product's rounding error
// there instead, up to 2^13 for scores of 1e11 (tests/test_replayed_bug_reports.py,
// test_huge_scores), and 2^8192 overflows.
static inline vf vkeep(vf x) {
#if defined(__x86_64__)
  asm("" : "+v"(x));
  return x;
#else
  volatile vf y = x;
  return y;
#endif
}

// The exponent (round(s * c) - shift) * k of the weights (see vkeep, exp_scale).
static inline vf weight_exponent(const float* s, vf c, vf shift, vf k) { return (vkeep(vload(s) * c) - shift) * k; }

// The weights 2^((s * c - shift) * k) of a row, handed to store(j, e0, e1) two vectors at a time
// (columns j .. j + 2W - 1); returns their sum. Two independent exp2 chains and sums in
// flight. npad (a multiple of W) may end with a single vector: its pair is zero, and the
// store writes only the first when j + W = npad.
template <int Degree, typename Store>
static inline float exp2_row_to(const float* s, int64_t npad, float c, float shift, float k, Store store) {
  vf sum0{}, sum1{};
  const vf sh = vsplat(shift), cv = vsplat(c), kv = vsplat(k);
  int64_t j = 0;
  for (; j + 2 * W <= npad; j += 2 * W) {
    const vf e0 = vexp2_weight<Degree>(weight_exponent(s + j, cv, sh, kv));
    const vf e1 = vexp2_weight<Degree>(weight_exponent(s + j + W, cv, sh, kv));
    store(j, e0, e1, true);
    sum0 += e0;
    sum1 += e1;
  }
  if (j < npad) {
    const vf e = vexp2_weight<Degree>(weight_exponent(s + j, cv, sh, kv));
    store(j, e, vf{}, false);
    sum0 += e;
  }
  return hsum(sum0 + sum1);
}

// s = 2^((s * c - shift) * k) in place, the scaling folded into this pass; returns the row sum.
static inline float exp2_row(float* s, int64_t npad, float c, float shift, float k) {
  return exp2_row_to<7>(s, npad, c, shift, k, [s](int64_t j, vf e0, vf e1, bool both) {
    vstore(s + j, e0);
    if (both) vstore(s + j + W, e1);
  });
}

// x * c rounded once, never fused into what follows (the scalar vkeep).
static inline float keep_product(float x, float c) {
  float y = x * c;
#if defined(__x86_64__)
  asm("" : "+x"(y));
#else
  volatile float z = y;
  y = z;
#endif
  return y;
}

// The row's natural-log log-sum-exp from the forward's running max ms (of the scores as
// score_row leaves them) and sum l (of 2^((round(s * c) - round(ms * c)) * k), exp_scale).
// Raw scores: round(ms * scale) + ln(l), in the units of the backward's exponent
// round(s * scale) - lse, as torch's flash kernels keep it: for the row's largest score that is
// -ln(l) rounded once, 0 when ln(l) is under half an ulp of lse. With the exponents taken in the
// log2 domain (round(s * scale * log2 e) - shift), the backward's weights carried an error
// common to the row at |scores| ~ 100 (lse through ln 2 and back, and the max's rounding at
// 1.44x the magnitude), and dV = P^T dO with it: up to 7.6x the error rule's bound
// (tests/test_replayed_bug_reports.py, test_large_scores_dv).
static inline float row_lse(const Problem& p, float ms, float l) {
  if (raw_scores(p)) return keep_product(ms, p.scale) + std::log2(l) * kLn2;
  return (ms + std::log2(l)) * kLn2;  // scores already in the log2 domain (exp_scale 1)
}

// row_lse's inverse for the backward's exp pass: the shift it subtracts, in the units of
// round(s * exp_scale): lse itself for raw scores, lse * log2(e) for log2-domain ones.
static inline float lse_shift(const Problem& p, float lse) { return raw_scores(p) ? lse : lse * kLog2e; }

#ifdef FF_HAS_BF16
// The bf16 kernels' operands: 16 floats rounded to bf16 (nearest even) at y.
static inline void store_bf16(uint16_t* y, vf x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(y), (__m256i)_mm512_cvtneps_pbh((__m512)x));
}

// Rows 0..rows-1 of X (fp32, row stride ldx, npad columns, npad a multiple of 16)
// as bf16 rows, row stride ldy bf16 elements.
static inline void rows_to_bf16(int64_t rows, int64_t npad, const float* X, int64_t ldx, uint16_t* Y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < npad; j += W) store_bf16(Y + r * ldy + j, vload(X + r * ldx + j));
}

// exp2_row writing the weights straight to bf16 (y), never to s: one pass, and the
// degree-4 exp2, whose 2.8e-6 relative error vanishes in the rounding to bf16 (2^-9).
// A pair of vectors is rounded by one vcvtne2ps2bf16 and stored as one 64-byte row.
static inline float exp2_row_bf16(const float* s, int64_t npad, float c, float shift, float k, uint16_t* y) {
  return exp2_row_to<4>(s, npad, c, shift, k, [y](int64_t j, vf e0, vf e1, bool both) {
    if (both)
      _mm512_storeu_si512(y + j, (__m512i)_mm512_cvtne2ps_pbh((__m512)e1, (__m512)e0));
    else
      store_bf16(y + j, e0);
  });
}
#endif

static inline void scale_vec(float* x, int64_t npad, float a) {
  for (int64_t j = 0; j < npad; j += W) vstore(x + j, vload(x + j) * a);
}

// ---------------------------------------------------------------- tile rows (shared by every kernel)

// The online-softmax step of a forward tile: rows 0..mq-1 of St (row stride BK)
// hold the raw scores of queries i0.. against keys j0..j0+n-1 and become the
// (dropped) weights 2^(s - m), zero in columns n..npad-1 (npad = n rounded up to
// W); the running max m and sum l advance and the O rows are rescaled. With Pb
// (the bf16 kernels), the weights go to Pb (row stride BK, bf16) instead.
static inline void forward_tile_rows(const Problem& p, int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0,
                                     int64_t n, float* St, int64_t BK, float* m, float* l, float* O, int64_t Evpad,
                                     uint16_t* Pb = nullptr) {
  const int64_t npad = round_up(n, W), bh = b * p.Hq + h;
  // m holds the running max of the scores as score_row leaves them (raw, or in the log2 domain);
  // the weights' shift is round(m * c), the same for either order of max and the (positive) c,
  // and row_lse turns m into the lse the backward subtracts.
  const float c = exp_scale(p), k = exp_units(p);
  for (int64_t r = 0; r < mq; ++r) {
    float* s = St + r * BK;
    const int64_t i = i0 + r;
    score_row(p, b, h, i, j0, n, npad, s, nullptr);
    mask_row(p, b, h, i, j0, n, s);
    float ms_new = std::max(m[r], row_max(s, npad));
    if (ms_new == kNegInf) {
      if (!any_nan(s, npad)) {  // nothing visible yet in this row
        std::fill(s, s + npad, 0.f);
        if (Pb) std::fill(Pb + r * BK, Pb + r * BK + npad, (uint16_t)0);
        continue;
      }
      // Every visible score is NaN (a NaN query row): row_max skips NaN, but torch's softmax
      // gives NaN weights, so the row's output and lse must be NaN, not a masked row's zeros
      // (pytorch#141128 was torch's own CPU kernel making this mistake). A NaN shift does it:
      // alpha, the weights and l become NaN, and stay so over later tiles (max(NaN, x) = NaN).
      ms_new = std::numeric_limits<float>::quiet_NaN();
    }
    const float m_new = keep_product(ms_new, c);
    const float alpha = std::exp2((keep_product(m[r], c) - m_new) * k);
#ifdef FF_HAS_BF16
    const bool direct = Pb && !p.dropout.on;  // the weights straight to bf16, never to s
    const float rs = direct ? exp2_row_bf16(s, npad, c, m_new, k, Pb + r * BK) : exp2_row(s, npad, c, m_new, k);
#else
    const float rs = exp2_row(s, npad, c, m_new, k);
#endif
    l[r] = l[r] * alpha + rs;
    if (alpha != 1.f) scale_vec(O + r * Evpad, Evpad, alpha);
    m[r] = ms_new;
    if (p.dropout.on) {  // the normaliser l uses the undropped weights, as torch
      const DropoutSpec& d = p.dropout;
      for (int64_t j = 0; j < n; ++j)
        s[j] *= dropout_hash(d, bh, i, j0 + j, p.L, p.S) >= d.threshold ? d.keep_scale : 0.f;
    }
#ifdef FF_HAS_BF16
    if (Pb && !direct) rows_to_bf16(1, npad, s, BK, Pb + r * BK, BK);
#endif
  }
}

// The elementwise part of a backward tile: rows 0..mq-1 of SP hold the raw
// scores and of DP the products dO V^T; SP becomes the (dropped) weights P and DP
// becomes dS = P * (dP - Delta) * scale, both zero in columns n..npad-1.
// lse and delta are the (B, Hq, L) arrays.
static inline void backward_tile_rows(const Problem& p, const float* lse_all, const float* delta_all, int64_t b,
                                      int64_t h, int64_t i0, int64_t mq, int64_t j0, int64_t n, float* SP, float* DP,
                                      int64_t BK) {
  const int64_t npad = round_up(n, W), bh = b * p.Hq + h;
  thread_local std::vector<float> cap_deriv;  // one row's 1 - tanh(scale * qk / softcap)^2
  if (p.softcap && (int64_t)cap_deriv.size() < npad) cap_deriv.resize(npad);
  float* T = p.softcap ? cap_deriv.data() : nullptr;
  const float c = exp_scale(p), k = exp_units(p);
  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    float* s = SP + r * BK;
    float* d = DP + r * BK;
    const float lse = lse_all[bh * p.L + i];
    if (lse == kNegInf) {  // dead row: no weights, no gradient
      std::fill(s, s + npad, 0.f);
      std::fill(d, d + npad, 0.f);
      continue;
    }
    score_row(p, b, h, i, j0, n, npad, s, T);
    mask_row(p, b, h, i, j0, n, s);
    exp2_row(s, npad, c, lse_shift(p, lse), k);  // P = exp(scores - lse), see row_lse
    const float delta = delta_all[bh * p.L + i];
    if (p.dropout.on) {
      const DropoutSpec& dr = p.dropout;
      for (int64_t j = 0; j < n; ++j) {
        const float z = dropout_hash(dr, bh, i, j0 + j, p.L, p.S) >= dr.threshold ? dr.keep_scale : 0.f;
        d[j] = s[j] * (d[j] * z - delta) * p.scale;
        s[j] *= z;
      }
      for (int64_t j = n; j < npad; ++j) d[j] = 0.f;
    } else {
      const vf dl = vsplat(delta);
      for (int64_t j = 0; j < npad; j += W) vstore(d + j, vload(s + j) * (vload(d + j) - dl) * p.scale);
    }
    if (p.softcap)  // d(softcap * tanh(x / softcap)) / dx = 1 - tanh^2; padding columns stay 0
      for (int64_t j = 0; j < npad; j += W) vstore(d + j, vload(d + j) * vload(T + j));
  }
}

// ---------------------------------------------------------------- forward

static int64_t forward_scratch(const Problem& p) { return p.BQ * p.BK + p.BQ * p.Evpad + 2 * p.BQ; }

// One (batch, head, query block): online softmax over key tiles, O(BQ * (BK + Ev)) memory.
static void forward_item(const ForwardArgs& a, int64_t item, float* scratch) {
  const Problem& p = a.p;
  const int64_t BH = p.B * p.Hq, nqb = (p.L + p.BQ - 1) / p.BQ;
  const int64_t qb = nqb - 1 - item / BH, bh = item % BH;  // last (causal: heaviest) blocks first
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t i0 = qb * p.BQ, mq = std::min(p.BQ, p.L - i0);
  const int64_t BK = p.BK, Evpad = p.Evpad;
  float* St = scratch;
  float* O = St + p.BQ * BK;
  float* m = O + p.BQ * Evpad;
  float* l = m + p.BQ;
  std::fill(O, O + mq * Evpad, 0.f);
  std::fill(m, m + mq, kNegInf);
  std::fill(l, l + mq, 0.f);

  // Causal / window: keys outside [first row's left limit, last row's right limit]
  // are hidden from every row, so those tiles are skipped, not masked (a window of
  // width W costs O(W) per row). j_begin is a panel boundary (kt panels are NR wide).
  int64_t j_end = p.S, j_begin = 0;
  if (p.limit_right) j_end = std::clamp<int64_t>(i0 + mq + p.diag_offset + p.window_right, 0, p.S);
  if (p.limit_left) j_begin = std::clamp<int64_t>(i0 + p.diag_offset - p.window_left, 0, j_end) / NR * NR;
  const float* A = a.q.row(b, h, i0);
  const float* kt = a.kt.head(b, hk);
  const float* vh = a.v.head(b, hk);

  for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
    const int64_t n = std::min(BK, j_end - j0);
    // A tile whose first row does not see its last key runs in sub-blocks (for_tile_sub_blocks).
    for_tile_sub_blocks(p, i0, mq, j0, n, keys_seen(p, i0, j0) < n, [&](int64_t r0, int64_t mr, int64_t ne) {
      gemm(mr, ne, p.E, A + r0 * a.q.sl, a.q.sl, a.q.se, a.kt.at(kt, 0, j0, NR), a.kt.rs, a.kt.ps, St, BK, false);
      forward_tile_rows(p, b, h, i0 + r0, mr, j0, ne, St, BK, m + r0, l + r0, O + r0 * Evpad, Evpad);
      gemm(mr, p.Ev, ne, St, BK, 1, a.v.at(vh, j0, 0, NR), a.v.rs, a.v.ps, O + r0 * Evpad, Evpad, true);
    });
  }

  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    float* out = a.out.row(b, h, i);
    if (m[r] == kNegInf || l[r] == 0.f) {  // every key masked: torch gives 0
      std::fill(out, out + p.Ev, 0.f);
      a.lse[bh * p.L + i] = kNegInf;
      continue;
    }
    const float inv = 1.f / l[r];
    const float* o = O + r * Evpad;
    for (int64_t e = 0; e < p.Ev; ++e) out[e] = o[e] * inv;
    a.lse[bh * p.L + i] = row_lse(p, m[r], l[r]);
  }
}

// ---------------------------------------------------------------- backward

// W x W transpose in registers: log2(W) stages, stage H swapping the off-diagonal H x H blocks
// of every 2H x 2H block (two 2-source shuffles per pair of rows: vpermt2ps on AVX-512).
template <int H, int... J>
static inline vf swap_lo(vf a, vf b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & H) == 0 ? J : W + J - H)...);
}
template <int H, int... J>
static inline vf swap_hi(vf a, vf b, std::integer_sequence<int, J...>) {
  return __builtin_shufflevector(a, b, ((J & H) == 0 ? J + H : W + J)...);
}
template <int H>
static inline void transpose_stage(vf* m) {
  if constexpr (H >= 1) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i)
      if ((i & H) == 0) {
        const vf a = m[i], b = m[i + H];
        m[i] = swap_lo<H>(a, b, std::make_integer_sequence<int, W>{});
        m[i + H] = swap_hi<H>(a, b, std::make_integer_sequence<int, W>{});
      }
    transpose_stage<H / 2>(m);
  }
}

// Delta_i = sum_e dO[i, e] * O[i, e], accumulated in the same order and with the
// same (contracted) multiply-adds as the micro-kernel's dO V^T, so dP - Delta is
// exactly 0 where it should be (one visible key: O = v, dS = 0, as torch).
static void row_dots(int64_t rows, int64_t n, const float* a, int64_t a_rs, const float* b, int64_t b_rs,
                     float* out) {
  // W rows at a time, one per vector lane: each lane runs `acc += x * y` over e = 0..n-1, the
  // micro-kernel's own statement (`c += s * b`, contracted to the same FMA, or not, as the
  // target has it), so Delta is the very sum dP's gemm forms for a key equal to y. (A scalar
  // loop compiled apart rounded differently on AVX-512 and left single-key rows a ~1e-6
  // gradient, dP - Delta != 0; the previous fix ran the micro-kernel on a one-column panel:
  // 32 times the work, 5 % of an L = 256 backward.) The rows are transposed into lanes first:
  // W x W blocks in registers for full groups of rows (a scalar copy of each element was 7 % of
  // an L = 256 training-layout backward), element by element for the rest.
  std::vector<float> at, bt;
  for (int64_t r0 = 0; r0 < rows; r0 += W) {
    const int64_t m = std::min<int64_t>(W, rows - r0);
    vf acc = vf{};
    int64_t e0 = 0;
    if (m == W) {
      for (; e0 + W <= n; e0 += W) {
        vf x[W], y[W];
#pragma GCC unroll 16
        for (int t = 0; t < W; ++t) {
          x[t] = vload(a + (r0 + t) * a_rs + e0);
          y[t] = vload(b + (r0 + t) * b_rs + e0);
        }
        transpose_stage<W / 2>(x);
        transpose_stage<W / 2>(y);
#pragma GCC unroll 16
        for (int e = 0; e < W; ++e) acc += x[e] * y[e];
      }
    }
    if (e0 < n) {
      at.resize((n - e0) * W);
      bt.resize((n - e0) * W);
      for (int64_t t = 0; t < W; ++t) {  // lanes past the last row repeat it (their sums are dropped)
        const int64_t r = r0 + std::min<int64_t>(t, m - 1);
        for (int64_t e = e0; e < n; ++e) {
          at[(e - e0) * W + t] = a[r * a_rs + e];
          bt[(e - e0) * W + t] = b[r * b_rs + e];
        }
      }
      for (int64_t e = e0; e < n; ++e) {
        const vf x = vload(at.data() + (e - e0) * W), y = vload(bt.data() + (e - e0) * W);
        acc += x * y;
      }
    }
    float c[W];
    std::memcpy(c, &acc, sizeof(acc));
    for (int64_t t = 0; t < m; ++t) out[r0 + t] = c[t];
  }
}

static int64_t backward_scratch(const Problem& p) {
  return 2 * p.BQ * p.BK + p.BK * p.Epad + p.BK * p.Evpad;
}

// One (batch, kv head, chunk of key tiles): for each key tile, dK and dV are
// accumulated in registers-to-scratch over every query block of every query
// head of the group (GQA without copies), and dQ into this chunk's partial sum.
static void backward_item(const BackwardArgs& a, int64_t item, float* scratch) {
  const Problem& p = a.p;
  const int64_t chunks = a.chunks;
  const int64_t bhk = item / chunks, chunk = item % chunks;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.Hq / p.Hkv;
  const int64_t BQ = p.BQ, BK = p.BK, Epad = p.Epad, Evpad = p.Evpad;
  const int64_t ntiles = (p.S + BK - 1) / BK;
  float* SP = scratch;           // scores -> P -> dropped P
  float* DP = SP + BQ * BK;      // dO V^T -> dS
  float* dKa = DP + BQ * BK;     // (BK, Epad)
  float* dVa = dKa + BK * Epad;  // (BK, Evpad)
  const float* kt = a.kt.head(b, hk);
  const float* vt = a.vt.head(b, hk);
  const float* kh = a.k.head(b, hk);

  // This item's rows of dQ's partial sum (chunk, b, every head of the group), zeroed here.
  for (int64_t g = 0; g < G; ++g)
    zero_rows(a.dq.row0(chunk, b, hk * G + g), p.L, Epad, a.dq.rows.sl);
  for (int64_t t = chunk; t < ntiles; t += chunks) {  // round-robin: balances causal work
    const int64_t j0 = t * BK, n = std::min(BK, p.S - j0);
    std::fill(dKa, dKa + n * Epad, 0.f);
    std::fill(dVa, dVa + n * Evpad, 0.f);
    // Causal / window: only the query rows that see some key of the tile are visited.
    int64_t q_start = 0, q_end = p.L;
    if (p.limit_right) q_start = std::max<int64_t>(0, j0 - p.diag_offset - p.window_right) / BQ * BQ;
    if (p.limit_left) q_end = std::clamp<int64_t>(j0 + n - p.diag_offset + p.window_left, 0, p.L);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g, bh = b * p.Hq + h;
      const float* qh = a.qb.head(b, h);
      const float* doh = a.dob.head(b, h);
      float* dq = a.dq.row0(chunk, b, h);
      const int64_t dq_sl = a.dq.rows.sl;
      for (int64_t i0 = q_start; i0 < q_end; i0 += BQ) {
        const int64_t mb = std::min(BQ, q_end - i0);
        // A block whose last row does not see the tile's last key runs in sub-blocks
        // (for_tile_sub_blocks): on the diagonal tile of a causal problem that is 3/4 of the work
        // (BQ = BK = 2 NR).
        const bool edge = keys_seen(p, i0 + mb - 1, j0) < n;
        for_tile_sub_blocks(p, i0, mb, j0, n, edge, [&](int64_t r0, int64_t mq, int64_t ne) {
          const int64_t s0 = i0 + r0;
          gemm(mq, ne, p.E, a.q.row(b, h, s0), a.q.sl, a.q.se, a.kt.at(kt, 0, j0, NR), a.kt.rs, a.kt.ps, SP, BK,
               false);
          gemm(mq, ne, p.Ev, a.dout.row(b, h, s0), a.dout.sl, a.dout.se, a.vt.at(vt, 0, j0, NR), a.vt.rs, a.vt.ps,
               DP, BK, false);
          backward_tile_rows(p, a.lse, a.delta, b, h, s0, mq, j0, ne, SP, DP, BK);
          // dV += P^T dO, dK += dS^T Q: A read transposed (a_rs = 1, a_cs = BK).
          gemm(ne, p.Ev, mq, SP, 1, BK, a.dob.at(doh, s0, 0, NR), a.dob.rs, a.dob.ps, dVa, Evpad, true);
          gemm(ne, p.E, mq, DP, 1, BK, a.qb.at(qh, s0, 0, NR), a.qb.rs, a.qb.ps, dKa, Epad, true);
          // dQ += dS K
          gemm(mq, p.E, ne, DP, BK, 1, a.k.at(kh, j0, 0, NR), a.k.rs, a.k.ps, dq + s0 * dq_sl, dq_sl, true);
        });
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(a.dk.row(b, hk, j0 + r), dKa + r * Epad, p.E * sizeof(float));
      std::memcpy(a.dv.row(b, hk, j0 + r), dVa + r * Evpad, p.Ev * sizeof(float));
    }
  }
}

// ---------------------------------------------------------------- operand packing

// Kernels::pack_panel_t: W x W blocks transposed in registers. The scalar loop it replaces
// stored one float per instruction with a stride of NR floats: 8 % of an fp32 forward+backward
// at L = 256, d = 64 (two transposed operands in the backward, one in the forward).
static void pack_panel_t(const float* src, int64_t cs, int64_t R, float* d) {
  int64_t r0 = 0;
  for (; r0 + W <= R; r0 += W)
    for (int64_t t0 = 0; t0 < NR; t0 += W) {
      vf m[W];
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) m[i] = vload(src + (t0 + i) * cs + r0);  // column t0 + i of X
      transpose_stage<W / 2>(m);
#pragma GCC unroll 16
      for (int j = 0; j < W; ++j) vstore(d + (r0 + j) * NR + t0, m[j]);  // row r0 + j of X
    }
  for (; r0 < R; ++r0)
    for (int64_t t = 0; t < NR; ++t) d[r0 * NR + t] = src[t * cs + r0];
}

#ifdef FF_TARGET
#pragma GCC pop_options
#endif

}  // namespace FF_ISA

// A .cpp that adds kernels of its own (attention_cpu_avx512bf16.cpp) leaves
// FF_KERNELS undefined and defines the table itself.
#ifdef FF_KERNELS
extern const Kernels FF_KERNELS;
const Kernels FF_KERNELS = {
    FF_ISA_NAME,      FF_ISA::NR,       FF_ISA::forward_scratch, FF_ISA::forward_item,
    FF_ISA::row_dots, FF_ISA::backward_scratch, FF_ISA::backward_item, FF_ISA::pack_panel_t,
};
#endif

}  // namespace cpu_attn
}  // namespace fastformer

#pragma GCC diagnostic pop
