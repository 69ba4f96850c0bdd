// Launchers of the CUDA kernels, callable from plain C++.
//
// This header has no CUDA or torch types on purpose: the torch-facing binding
// (attention_binding.cpp) includes it without the CUDA toolkit's headers, and
// the .cu files that define the launchers include no torch headers (the CPU
// torch wheel ships none for CUDA). Everything crosses as raw pointers,
// int64 strides (in elements) and sizes; the stream is a cudaStream_t passed
// as void*. Every launcher returns the cudaError_t of its launch as an int
// (0 = success), which the binding turns into a RuntimeError.
#pragma once

#include <cstdint>

namespace fastformer {
namespace cuda {

// Element types the kernels are instantiated for.
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// Mask kinds: none, bool (true = attend) or float (added to the scaled scores).
enum class MaskKind : int { kNone = 0, kBool = 1, kFloat = 2 };

// One attention problem in the canonical layout q (B, Hq, L, E), k (B, Hkv, S, E),
// v (B, Hkv, S, E), out (B, Hq, L, E); strides in elements, the last dim contiguous.
struct AttentionParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_stride_b, q_stride_h, q_stride_l;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  int64_t v_stride_b, v_stride_h, v_stride_s;

  // The mask, read through its strides (0 along broadcast dimensions); q's dtype when float.
  const void* mask;
  MaskKind mask_kind;
  int64_t mask_stride_b, mask_stride_h, mask_stride_l, mask_stride_s;

  int batch, heads_q, heads_kv, len_q, len_k, head_dim;
  float scale;           // applied to q·kᵀ before the mask is added
  bool is_causal;
  int64_t causal_offset;  // key j is visible to query i when j <= i + causal_offset (0 top-left, S-L bottom-right)
  DType dtype;

  // Forward outputs (contiguous): out (B, Hq, L, E) in dtype, lse (B, Hq, L) float32 (natural log).
  void* out;
  float* lse;

  // Backward inputs/outputs (contiguous, shaped like q/k/v/out): dout and out are read,
  // dq, dk, dv written; delta (B, Hq, L) float32 is scratch the launcher fills first.
  const void* dout;
  const void* out_fwd;
  const float* lse_fwd;
  float* delta;
  void* dq;
  void* dk;
  void* dv;
};

// The flash-attention forward: out and lse. Returns a cudaError_t.
int flash_attention_forward(const AttentionParams& params, int sm_count, int max_smem_optin, void* stream);

// The flash-attention backward: dq, dk, dv (deterministic, see flash_bwd_kernel.cuh).
int flash_attention_backward(const AttentionParams& params, int sm_count, int max_smem_optin, void* stream);

// Fused scaled, masked softmax over the last dimension of rows (R, N).
//
// Row r is query i = r % rows_per_matrix of matrix g = r / rows_per_matrix; the mask is
// a 4-D view (G1, G2, L, N) with G1 * G2 * L == R (strides in elements, 0 allowed),
// read as mask[g / G2, g % G2, i, j]. Causal: key j visible when j <= i + causal_offset.
struct SoftmaxParams {
  const void* x;    // forward input (R, N), rows contiguous with stride row_stride
  void* y;          // forward output / backward input y (R, N)
  const void* dy;   // backward: upstream gradient (R, N)
  void* dx;         // backward output (R, N)
  int64_t rows, cols, row_stride;
  int64_t rows_per_matrix;  // L
  int64_t mask_g2;          // G2
  const void* mask;
  MaskKind mask_kind;
  int64_t mask_stride_g1, mask_stride_g2, mask_stride_l, mask_stride_n;
  float scale;
  bool is_causal;
  int64_t causal_offset;
  DType dtype;
  bool aligned;  // x, y, dy, dx are 16-byte aligned (allows 16-byte vector access)
};

int softmax_forward(const SoftmaxParams& params, int sm_count, int max_smem_optin, void* stream);
int softmax_backward(const SoftmaxParams& params, int sm_count, int max_smem_optin, void* stream);

}  // namespace cuda
}  // namespace fastformer
