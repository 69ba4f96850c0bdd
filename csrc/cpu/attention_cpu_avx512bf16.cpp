// CPU attention kernels for AVX-512 with AVX512_BF16 (e.g. AMD Zen 4, Intel
// Cooper Lake / Sapphire Rapids): the avx512 fp32 kernels (the shared body of
// attention_cpu_impl.h, compiled for this target) plus bf16 kernels in which both
// products of a tile, Q K^T and P V (and the backward's five), are bf16 dot
// products with fp32 accumulation (vdpbf16ps): twice the multiply-adds per
// instruction of fp32 FMAs, and half the operand bytes. P and dS are rounded to
// bf16 before their products, as in the GPU flash kernels; softmax, the running
// max/sum and every accumulator stay fp32. Operand layouts: attention_cpu.h.
//
// Compiled with `#pragma GCC target` (this file alone), chosen at run time by
// attention_cpu.cpp when cpu_features() reports avx512_bf16.
#if defined(__x86_64__)
#include <immintrin.h>

#define FF_ISA avx512bf16
#define FF_ISA_NAME "avx512_bf16"
#define FF_W 16
#define FF_MR 12
#define FF_TARGET "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma"
#define FF_HAS_BF16 1  // forward_tile_rows may write P in bf16
#include "attention_cpu_impl.h"  // FF_KERNELS undefined: the table is defined below

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastformer {
namespace cpu_attn {
namespace avx512bf16 {

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")

typedef uint32_t word_t __attribute__((may_alias, aligned(4)));  // a bf16 pair read from any buffer

// ---------------------------------------------------------------- bf16 GEMM

// C[0:R, 0:NR] (+)= sum_kp A(r, kp) . B[kp, 0:NR], A(r, kp) the bf16 pair at
// A + r * a_rs + kp * a_cs (words), B one pair panel (kp-th row at B + kp * 2 * NR).
template <int R>
static inline void micro_bf16(int64_t KP, const uint32_t* A, int64_t a_rs, int64_t a_cs, const uint16_t* B,
                              float* C, int64_t ldc, bool acc) {
  static_assert(NR == 32, "two zmm of fp32 accumulators per row = 32 bf16 pairs");
  __m512 c0[R], c1[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    c0[r] = acc ? _mm512_loadu_ps(C + r * ldc) : _mm512_setzero_ps();
    c1[r] = acc ? _mm512_loadu_ps(C + r * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t kp = 0; kp < KP; ++kp) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B + kp * 2 * NR);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B + kp * 2 * NR + 32);
    const word_t* a = reinterpret_cast<const word_t*>(A + kp * a_cs);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[r * a_rs]);
      c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);
      c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(C + r * ldc, c0[r]);
    _mm512_storeu_ps(C + r * ldc + 16, c1[r]);
  }
}

template <int R>
static inline void micro_bf16_tail(int64_t rows, int64_t KP, const uint32_t* A, int64_t a_rs, int64_t a_cs,
                                   const uint16_t* B, float* C, int64_t ldc, bool acc) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_bf16<R>(KP, A, a_rs, a_cs, B, C, ldc, acc);
    else
      micro_bf16_tail<R - 1>(rows, KP, A, a_rs, a_cs, B, C, ldc, acc);
  }
}

// C (M x ceil(N/NR)*NR, row stride ldc) (+)= A (M x KP pairs) * B, B's panel p at
// B + p * b_panel_stride (bf16 elements). Columns past N come from zero padding.
static void gemm_bf16(int64_t M, int64_t N, int64_t KP, const uint32_t* A, int64_t a_rs, int64_t a_cs,
                      const uint16_t* B, int64_t b_panel_stride, float* C, int64_t ldc, bool acc) {
  for (int64_t p = 0; p * NR < N; ++p) {
    const uint16_t* Bp = B + p * b_panel_stride;
    float* Cp = C + p * NR;
    int64_t r = 0;
    for (; r + MR <= M; r += MR) micro_bf16<MR>(KP, A + r * a_rs, a_rs, a_cs, Bp, Cp + r * ldc, ldc, acc);
    if (r < M) micro_bf16_tail<MR - 1>(M - r, KP, A + r * a_rs, a_rs, a_cs, Bp, Cp + r * ldc, ldc, acc);
  }
}

// ---------------------------------------------------------------- conversions

// X^T in pairs: word (r', j) at Y + r' * ldy + j holds (X[2r', j], X[2r'+1, j]) in
// bf16, a missing row 2r'+1 = rows read as zero. The transposed A operand of
// dV += P^T dO and dK += dS^T Q (a_rs = 1, a_cs = ldy).
static inline void rows_to_bf16_pairs_t(int64_t rows, int64_t npad, const float* X, int64_t ldx, uint32_t* Y,
                                        int64_t ldy) {
  for (int64_t r = 0; r < rows; r += 2) {
    const float* x0 = X + r * ldx;
    const float* x1 = X + (r + 1) * ldx;
    const bool second = r + 1 < rows;
    for (int64_t j = 0; j < npad; j += 16) {
      const __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x0 + j)));
      __m512i w = lo;
      if (second) {
        const __m512i hi = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x1 + j)));
        w = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      }
      _mm512_storeu_si512(Y + (r / 2) * ldy + j, w);
    }
  }
}

// ---------------------------------------------------------------- forward

static inline int64_t pairs(int64_t n) { return (n + 1) / 2; }

static int64_t bf16_forward_scratch(const Problem& p) {
  return p.BQ * p.BK /*St*/ + p.BQ * p.BK / 2 /*P in bf16*/ + p.BQ * p.Evpad + 2 * p.BQ;
}

// One (batch, head, query block), as forward_item with bf16 products.
static void bf16_forward_item(const Bf16ForwardArgs& a, int64_t item, float* scratch) {
  const Problem& p = a.p;
  const int64_t BH = p.B * p.Hq, nqb = (p.L + p.BQ - 1) / p.BQ;
  const int64_t qb = nqb - 1 - item / BH, bh = item % BH;  // last (causal: heaviest) blocks first
  const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / (p.Hq / p.Hkv);
  const int64_t i0 = qb * p.BQ, mq = std::min(p.BQ, p.L - i0);
  const int64_t BK = p.BK, Evpad = p.Evpad, EP = pairs(p.E);
  float* St = scratch;
  uint16_t* Pb = reinterpret_cast<uint16_t*>(St + p.BQ * BK);  // (BQ, BK) bf16
  float* O = St + p.BQ * BK + p.BQ * BK / 2;
  float* m = O + p.BQ * Evpad;
  float* l = m + p.BQ;
  std::fill(O, O + mq * Evpad, 0.f);
  std::fill(m, m + mq, kNegInf);
  std::fill(l, l + mq, 0.f);

  // Tiles outside the causal / window limits are skipped (as forward_item); j_begin is a
  // panel boundary, so even: key pairs stay pairs of V's panel rows.
  int64_t j_end = p.S, j_begin = 0;
  if (p.limit_right) j_end = std::clamp<int64_t>(i0 + mq + p.diag_offset + p.window_right, 0, p.S);
  if (p.limit_left) j_begin = std::clamp<int64_t>(i0 + p.diag_offset - p.window_left, 0, j_end) / NR * NR;
  const uint32_t* A = a.q.row(b, h, i0);
  const uint16_t* kt = a.kt_panels + (b * p.Hkv + hk) * a.kt_head_stride;
  const uint16_t* vp = a.v_panels + (b * p.Hkv + hk) * a.v_head_stride;
  const int64_t kt_panel = EP * 2 * NR, v_panel = pairs(p.S) * 2 * NR;

  for (int64_t j0 = j_begin; j0 < j_end; j0 += BK) {
    const int64_t n = std::min(BK, j_end - j0);
    // The edge tile in sub-blocks (as forward_item).
    for_tile_sub_blocks(p, i0, mq, j0, n, keys_seen(p, i0, j0) < n, [&](int64_t r0, int64_t mr, int64_t ne) {
      uint16_t* Pr = Pb + r0 * BK;
      gemm_bf16(mr, ne, EP, A + r0 * a.q.sl, a.q.sl, 1, kt + (j0 / NR) * kt_panel, kt_panel, St, BK, false);
      forward_tile_rows(p, b, h, i0 + r0, mr, j0, ne, St, BK, m + r0, l + r0, O + r0 * Evpad, Evpad, Pr);
      // j0 is even (j_begin a multiple of NR, BK of NR), so key pairs of the tile are pairs of V's panel rows.
      gemm_bf16(mr, p.Ev, pairs(ne), reinterpret_cast<const uint32_t*>(Pr), BK / 2, 1, vp + (j0 / 2) * 2 * NR,
                v_panel, O + r0 * Evpad, Evpad, true);
    });
  }

  for (int64_t r = 0; r < mq; ++r) {
    const int64_t i = i0 + r;
    uint16_t* out = a.out.row(b, h, i);
    if (m[r] == kNegInf || l[r] == 0.f) {  // every key masked: torch gives 0
      std::fill(out, out + p.Ev, (uint16_t)0);
      a.lse[bh * p.L + i] = kNegInf;
      continue;
    }
    const float inv = 1.f / l[r];
    const float* o = O + r * Evpad;
    for (int64_t e = 0; e < p.Ev; ++e) out[e] = float_to_bf16(o[e] * inv);
    a.lse[bh * p.L + i] = row_lse(p, m[r], l[r]);
  }
}

// ---------------------------------------------------------------- backward

// Sixteen rows at a time, one per lane, each lane running the micro-kernel's
// sequence of vdpbf16ps over the pairs, so Delta_i equals dP_ij bit for bit when
// O_i = V_j (one visible key) and dS is exactly 0 there, as torch's.
static void bf16_row_dots(int64_t rows, int64_t npairs, const uint32_t* a, int64_t a_rs, const uint32_t* b,
                          int64_t b_rs, float* out) {
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t nr = std::min<int64_t>(16, rows - r0);
    const __mmask16 lanes = (__mmask16)((1u << nr) - 1u);
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i ia = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)a_rs));
    const __m512i ib = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)b_rs));
    __m512 acc = _mm512_setzero_ps();
    for (int64_t kp = 0; kp < npairs; ++kp) {
      const __m512i x = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, ia, a + r0 * a_rs + kp, 4);
      const __m512i y = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, ib, b + r0 * b_rs + kp, 4);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)x, (__m512bh)y);
    }
    _mm512_mask_storeu_ps(out + r0, lanes, acc);
  }
}

static int64_t bf16_backward_scratch(const Problem& p) {
  // SP, DP (fp32); P^T and dS^T in pairs, dS in bf16 (BQ * BK / 2 words each); dK, dV accumulators.
  return 2 * p.BQ * p.BK + 3 * (p.BQ * p.BK / 2) + p.BK * p.Epad + p.BK * p.Evpad;
}

// One (batch, kv head, chunk of key tiles), as backward_item with bf16 products.
static void bf16_backward_item(const Bf16BackwardArgs& a, int64_t item, float* scratch) {
  const Problem& p = a.p;
  const int64_t chunks = a.chunks;
  const int64_t bhk = item / chunks, chunk = item % chunks;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv, G = p.Hq / p.Hkv;
  const int64_t BQ = p.BQ, BK = p.BK, Epad = p.Epad, Evpad = p.Evpad;
  const int64_t EP = pairs(p.E), EvP = pairs(p.Ev);
  const int64_t ntiles = (p.S + BK - 1) / BK;
  float* SP = scratch;
  float* DP = SP + BQ * BK;
  uint32_t* Pt = reinterpret_cast<uint32_t*>(DP + BQ * BK);  // (BQ/2, BK) words: P^T in pairs over queries
  uint32_t* dSt = Pt + BQ * BK / 2;                             // dS^T likewise
  uint16_t* dSb = reinterpret_cast<uint16_t*>(dSt + BQ * BK / 2);  // (BQ, BK) bf16: dS
  float* dKa = reinterpret_cast<float*>(dSb + BQ * BK);
  float* dVa = dKa + BK * Epad;
  const uint16_t* kt = a.kt_panels + bhk * a.kt_head_stride;
  const uint16_t* vt = a.vt_panels + bhk * a.vt_head_stride;
  const uint16_t* kp = a.k_panels + bhk * a.k_head_stride;
  const int64_t kt_panel = EP * 2 * NR, vt_panel = EvP * 2 * NR;
  const int64_t k_panel = pairs(p.S) * 2 * NR, l_panel = pairs(p.L) * 2 * NR;

  // This item's rows of dQ's partial sum (chunk, b, every head of the group), zeroed here.
  for (int64_t g = 0; g < G; ++g)
    zero_rows(a.dq.row0(chunk, b, hk * G + g), p.L, Epad, a.dq.rows.sl);
  for (int64_t t = chunk; t < ntiles; t += chunks) {
    const int64_t j0 = t * BK, n = std::min(BK, p.S - j0);
    std::fill(dKa, dKa + n * Epad, 0.f);
    std::fill(dVa, dVa + n * Evpad, 0.f);
    int64_t q_start = 0, q_end = p.L;  // only the query rows that see some key of the tile
    if (p.limit_right) q_start = std::max<int64_t>(0, j0 - p.diag_offset - p.window_right) / BQ * BQ;
    if (p.limit_left) q_end = std::clamp<int64_t>(j0 + n - p.diag_offset + p.window_left, 0, p.L);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hk * G + g, bh = b * p.Hq + h;
      const uint16_t* qp = a.q_panels + bh * a.q_head_stride;
      const uint16_t* dop = a.do_panels + bh * a.do_head_stride;
      float* dq = a.dq.row0(chunk, b, h);
      const int64_t dq_sl = a.dq.rows.sl;
      for (int64_t i0 = q_start; i0 < q_end; i0 += BQ) {
        const int64_t mb = std::min(BQ, q_end - i0);
        // The edge block in sub-blocks (as backward_item).
        const bool edge = keys_seen(p, i0 + mb - 1, j0) < n;
        for_tile_sub_blocks(p, i0, mb, j0, n, edge, [&](int64_t r0, int64_t mq, int64_t ne) {
          const int64_t s0 = i0 + r0;
          const int64_t npe = round_up(ne, W);
          gemm_bf16(mq, ne, EP, a.q.row(b, h, s0), a.q.sl, 1, kt + (j0 / NR) * kt_panel, kt_panel, SP, BK, false);
          gemm_bf16(mq, ne, EvP, a.dout.row(b, h, s0), a.dout.sl, 1, vt + (j0 / NR) * vt_panel, vt_panel, DP, BK,
                    false);
          backward_tile_rows(p, a.lse, a.delta, b, h, s0, mq, j0, ne, SP, DP, BK);
          rows_to_bf16_pairs_t(mq, npe, SP, BK, Pt, BK);
          rows_to_bf16_pairs_t(mq, npe, DP, BK, dSt, BK);
          rows_to_bf16(mq, npe, DP, BK, dSb, BK);
          // s0 is a multiple of NR (even): query pairs of the block are pairs of the panels' rows.
          gemm_bf16(ne, p.Ev, pairs(mq), Pt, 1, BK, dop + (s0 / 2) * 2 * NR, l_panel, dVa, Evpad, true);
          gemm_bf16(ne, p.E, pairs(mq), dSt, 1, BK, qp + (s0 / 2) * 2 * NR, l_panel, dKa, Epad, true);
          gemm_bf16(mq, p.E, pairs(ne), reinterpret_cast<const uint32_t*>(dSb), BK / 2, 1, kp + (j0 / 2) * 2 * NR,
                    k_panel, dq + s0 * dq_sl, dq_sl, true);
        });
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      std::memcpy(a.dk.row(b, hk, j0 + r), dKa + r * Epad, p.E * sizeof(float));
      std::memcpy(a.dv.row(b, hk, j0 + r), dVa + r * Evpad, p.Ev * sizeof(float));
    }
  }
}

#pragma GCC pop_options

}  // namespace avx512bf16

extern const Kernels kernels_avx512bf16;
const Kernels kernels_avx512bf16 = {
    FF_ISA_NAME,
    avx512bf16::NR,
    avx512bf16::forward_scratch,
    avx512bf16::forward_item,
    avx512bf16::row_dots,
    avx512bf16::backward_scratch,
    avx512bf16::backward_item,
    avx512bf16::pack_panel_t,
    avx512bf16::bf16_forward_scratch,
    avx512bf16::bf16_forward_item,
    avx512bf16::bf16_row_dots,
    avx512bf16::bf16_backward_scratch,
    avx512bf16::bf16_backward_item,
};

}  // namespace cpu_attn
}  // namespace fastformer

#pragma GCC diagnostic pop
#endif
