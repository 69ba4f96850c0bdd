// Fused flash-style attention on the CPU: the plain-C++ side shared by the
// torch-facing binding (attention_cpu.cpp) and the per-ISA kernels
// (attention_cpu_{generic,avx2,avx512}.cpp, one body in attention_cpu_impl.h).
//
// The ISA files see raw pointers only (no ATen), so each can be compiled for
// its own instruction set with `#pragma GCC target` while the extension keeps
// plain -O3 flags; attention_cpu.cpp picks one at run time from cpu_features().
//
// Packed operand layouts ("panels"). A matrix X (R x C) is stored as
// ceil(C/NR) panels, panel p holding rows 0..R-1 of columns p*NR..p*NR+NR-1
// contiguously (NR floats per row, zero-padded past C). A micro-kernel then
// streams one panel while broadcasting elements of the other operand.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastformer {
namespace cpu_attn {

// The mask view (B, Hq, L, S) read through its strides (stride 0 where broadcast).
struct MaskView {
  const void* data = nullptr;
  int kind = 0;  // kMaskNone / kMaskBool / kMaskF32 / kMaskBF16
  int64_t sb = 0, sh = 0, sl = 0, ss = 0;
};
enum MaskKind { kMaskNone = 0, kMaskBool = 1, kMaskF32 = 2, kMaskBF16 = 3 };

struct DropoutSpec {
  bool on = false;
  uint64_t seed = 0, offset = 0;
  uint32_t threshold = 0;  // keep when hash >= threshold (threshold = p * 2^32)
  float keep_scale = 1.f;  // 1 / (1 - p), 0 when p == 1
};

// The keep decision for attention weight (bh, i, j), bh = b * Hq + h. A pure
// function of the seed, offset and position (a counter-based hash), so the
// backward and the debug helper regenerate the forward's mask exactly.
inline uint32_t dropout_hash(const DropoutSpec& d, int64_t bh, int64_t i, int64_t j, int64_t L, int64_t S) {
  uint64_t x = ((uint64_t)bh * (uint64_t)L + (uint64_t)i) * (uint64_t)S + (uint64_t)j;
  x ^= d.seed * 0x9E3779B97F4A7C15ull;
  x += d.offset * 0xD1B54A32D192ED03ull + 0x632BE59BD9B4E019ull;
  // murmur3's 64-bit finaliser: every input bit flips each output bit with p ~ 1/2.
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdull;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ull;
  x ^= x >> 33;
  return (uint32_t)(x >> 32);
}

// ALiBi slopes (B, Hq) float32 read through strides (stride 0 where broadcast).
struct SlopesView {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0;
};

struct Problem {
  int64_t B = 0, Hq = 0, Hkv = 0, L = 0, S = 0, E = 0, Ev = 0;
  float scale = 1.f;
  // Key j is visible to query i iff i + diag_offset - window_left <= j <= i + diag_offset + window_right,
  // each side only when limited (causal: limit_right with window_right = 0). diag_offset is 0
  // (top-left) or S - L (bottom-right).
  bool limit_left = false, limit_right = false;
  int64_t window_left = 0, window_right = 0;
  int64_t diag_offset = 0;
  // Logit soft-cap (FlashAttention / Gemma 2): scores become softcap * tanh(scale * qk / softcap).
  bool softcap = false;
  float softcap_in = 0.f, softcap_out = 0.f;  // scale / softcap, softcap * log2(e)
  // ALiBi: scores get -slope[b, h] * |i + S - L - j| (bottom-right aligned distance).
  SlopesView slopes;
  MaskView mask;
  DropoutSpec dropout;
  int64_t BQ = 64, BK = 64;  // query / key block sizes (BK a multiple of NR)
  int64_t Epad = 0, Evpad = 0;  // E, Ev rounded up to NR
};

// A strided float matrix view (the "A" operands read in place: q and dO in fp32).
struct Strided4 {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0, se = 0;
  const float* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sl; }
};

// A per-head matrix X (R x C) as the fp32 micro-kernel's B operand: columns in panels of NR,
// element (r, c) of panel c / NR at head(b, h) + (c / NR) * ps + r * rs. Either packed panels
// (rs = NR, ps = R * NR) or, for a float32 X with contiguous rows whose width is a multiple of NR,
// X itself read in place (rs = its row stride, ps = NR): no copy, no pass over memory.
struct PanelsB {
  const float* data = nullptr;
  int64_t sb = 0, sh = 0;  // head (b, h) starts at data + b * sb + h * sh
  int64_t rs = 0, ps = 0;
  const float* head(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
  const float* at(const float* head, int64_t r, int64_t c0, int64_t nr) const { return head + (c0 / nr) * ps + r * rs; }
};

// An output the kernels write row by row: row (b, h, i) at data + b * sb + h * sh + i * sl, its
// elements contiguous. A contiguous (B, H, L, E) tensor, or a (B, H, L, E) view of another layout:
// a transposed (B, L, H, E) tensor (FlashAttention's layout: attention_qkvpacked's output) or one
// slice of a packed (B, L, 3, H, E) gradient (its dq, dk, dv), written in place, no copy after.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;
  T* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sl; }
};

// dQ's partial sums: `chunks` accumulators of (B, Hq, L) rows Epad wide (chunk c at c * chunk_stride
// from rows.data); with one chunk and no column padding, dq itself (any row-strided layout).
struct DqPartials {
  Rows<float> rows;
  int64_t chunk_stride = 0;
  float* row0(int64_t chunk, int64_t b, int64_t h) const { return rows.row(b, h, 0) + chunk * chunk_stride; }
};

// Zero rows [0, n) of width `width` at `base`, `sl` floats apart (one fill when they are adjacent).
inline void zero_rows(float* base, int64_t n, int64_t width, int64_t sl) {
  if (sl == width) {
    std::fill_n(base, n * width, 0.f);
    return;
  }
  for (int64_t i = 0; i < n; ++i) std::fill_n(base + i * sl, width, 0.f);
}

struct ForwardArgs {
  Problem p;
  Strided4 q;  // (B, Hq, L, E) fp32
  PanelsB kt;  // per kv head: K^T (E x S), packed
  PanelsB v;   // per kv head: V (S x Ev)
  Rows<float> out;       // (B, Hq, L, Ev) fp32
  float* lse = nullptr;  // (B, Hq, L) contiguous
};

struct BackwardArgs {
  Problem p;
  Strided4 q;   // (B, Hq, L, E) fp32
  Strided4 dout;  // (B, Hq, L, Ev) fp32
  PanelsB kt;  // per kv head: K^T (E x S), packed
  PanelsB vt;  // per kv head: V^T (Ev x S), packed
  PanelsB k;   // per kv head: K (S x E)
  PanelsB qb;  // per q head: Q (L x E)
  PanelsB dob; // per q head: dO (L x Ev)
  const float* lse = nullptr;    // (B, Hq, L)
  const float* delta = nullptr;  // (B, Hq, L): rowsum(dO * O)
  DqPartials dq;                 // each item zeroes its rows
  Rows<float> dk;                // (B, Hkv, S, E) fp32
  Rows<float> dv;                // (B, Hkv, S, Ev) fp32
  int64_t chunks = 1;            // key tiles of one kv head are split round-robin over chunks
};

// ---- bfloat16 operands of the bf16 dot-product kernels (AVX512_BF16 vdpbf16ps)
//
// vdpbf16ps multiplies adjacent pairs of bf16 values and adds both products to
// one fp32 lane, so every operand is stored with the reduction index in pairs.
// "Pair panels" of X (R x C), reduced over R: ceil(C/NR) panels, panel p holding
// ceil(R/2) row pairs, each NR columns x 2 bf16 (X[2r', c], X[2r'+1, c]) adjacent,
// zero-padded past R and C. The "A" operands hold their reduction index
// contiguously: A(r, kp) is the 32-bit word (two bf16) at a + r * rs + kp * cs.

// A (B, H, L, E) bf16 tensor with E even and unit stride, viewed in 32-bit words.
struct PairsView {
  const uint32_t* data = nullptr;
  int64_t sb = 0, sh = 0, sl = 0;  // strides in words (pairs)
  const uint32_t* row(int64_t b, int64_t h, int64_t i) const { return data + b * sb + h * sh + i * sl; }
};

struct Bf16ForwardArgs {
  Problem p;
  PairsView q;                          // (B, Hq, L, E) bf16
  const uint16_t* kt_panels = nullptr;  // per kv head: K^T (E x S), pair panels over keys
  int64_t kt_head_stride = 0;           // in bf16 elements
  const uint16_t* v_panels = nullptr;   // per kv head: V (S x Ev), pair panels over Ev
  int64_t v_head_stride = 0;
  Rows<uint16_t> out;       // (B, Hq, L, Ev) bf16 (bits)
  float* lse = nullptr;     // (B, Hq, L) contiguous
};

struct Bf16BackwardArgs {
  Problem p;
  PairsView q, dout;                    // (B, Hq, L, E), (B, Hq, L, Ev) bf16
  const uint16_t* kt_panels = nullptr;  // per kv head: K^T (E x S), pair panels over keys
  const uint16_t* vt_panels = nullptr;  // per kv head: V^T (Ev x S), pair panels over keys
  const uint16_t* k_panels = nullptr;   // per kv head: K (S x E), pair panels over E
  int64_t kt_head_stride = 0, vt_head_stride = 0, k_head_stride = 0;
  const uint16_t* q_panels = nullptr;   // per q head: Q (L x E), pair panels over E
  const uint16_t* do_panels = nullptr;  // per q head: dO (L x Ev), pair panels over Ev
  int64_t q_head_stride = 0, do_head_stride = 0;
  const float* lse = nullptr;    // (B, Hq, L)
  const float* delta = nullptr;  // (B, Hq, L): rowsum(dO * O)
  DqPartials dq;                 // each item zeroes its rows
  Rows<float> dk;                // (B, Hkv, S, E) fp32
  Rows<float> dv;                // (B, Hkv, S, Ev) fp32
  int64_t chunks = 1;
};

// One instruction-set variant. A work item is independent of every other one.
struct Kernels {
  const char* name;
  int nr;  // panel width in floats
  int64_t (*forward_scratch)(const Problem&);  // floats of scratch per thread
  void (*forward_item)(const ForwardArgs&, int64_t item, float* scratch);
  // out[r] = dot(a[r, :n], b[r, :n]) for r < rows (row strides a_rs, b_rs; unit column stride)
  void (*row_dots)(int64_t rows, int64_t n, const float* a, int64_t a_rs, const float* b, int64_t b_rs, float* out);
  int64_t (*backward_scratch)(const Problem&);
  void (*backward_item)(const BackwardArgs&, int64_t item, float* scratch);
  // One full panel (nr columns) of X = x^T from float x whose rows are contiguous: X(r, t) =
  // src[t * cs + r] for r < R, t < nr, written to d[r * nr + t] (K^T, V^T: Prep::panels).
  void (*pack_panel_t)(const float* src, int64_t cs, int64_t R, float* d);
  // bf16 dot-product kernels: null where the variant has none (bf16 inputs are then widened to fp32).
  int64_t (*bf16_forward_scratch)(const Problem&) = nullptr;
  void (*bf16_forward_item)(const Bf16ForwardArgs&, int64_t item, float* scratch) = nullptr;
  // out[r] = dot(a row r, b row r) over n pairs, in the same order and with the same
  // instruction as the bf16 micro-kernel (so dP - Delta is exact, as in row_dots).
  void (*bf16_row_dots)(int64_t rows, int64_t npairs, const uint32_t* a, int64_t a_rs, const uint32_t* b,
                        int64_t b_rs, float* out) = nullptr;
  int64_t (*bf16_backward_scratch)(const Problem&) = nullptr;
  void (*bf16_backward_item)(const Bf16BackwardArgs&, int64_t item, float* scratch) = nullptr;
};

extern const Kernels kernels_generic;
#if defined(__x86_64__)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
extern const Kernels kernels_avx512bf16;  // AVX-512 + AVX512_BF16: the avx512 fp32 kernels and bf16 ones
#endif

// Forward items: B * Hq * ceil(L / BQ), numbered heaviest (last query block) first.
inline int64_t forward_items(const Problem& p) { return p.B * p.Hq * ((p.L + p.BQ - 1) / p.BQ); }
// Backward items: B * Hkv * chunks.
inline int64_t backward_items(const Problem& p, int64_t chunks) { return p.B * p.Hkv * chunks; }

}  // namespace cpu_attn
}  // namespace fastformer
