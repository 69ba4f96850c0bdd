// Fused scaled + masked (explicit or causal) softmax over the last dimension,
// forward and backward; one CTA per row.
//
// Forward, rows that fit in shared memory (the common case, up to ~28k columns
// on an H100): the row is read from global memory once; the scaled, masked
// scores are kept in shared memory as float32 while the block reduces the max,
// exponentiated in place while it reduces the sum, then normalised and written.
// Longer rows use the online softmax: one read computes the running (max, sum)
// per thread (rescaled once per 16-byte vector), a second read writes.
// Backward: dx = scale · y ∘ (dy − Σ y∘dy), reading y and dy once when cached.
// Rows with no visible column produce 0 (forward) and 0 gradients.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"
#include "launch_plan.h"
#include "type_traits.cuh"

namespace fastformer {
namespace cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// VEC consecutive elements as floats; one 16-byte access when VEC * sizeof(T) == 16.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* src, float (&f)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 u = *reinterpret_cast<const uint4*>(src);
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = TypeTraits<T>::to_float(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) f[i] = TypeTraits<T>::to_float(src[i]);
  }
}
template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* dst, const float (&f)[VEC]) {
  if constexpr (VEC * sizeof(T) == 16) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = TypeTraits<T>::from_float(f[i]);
    *reinterpret_cast<uint4*>(dst) = u;
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) dst[i] = TypeTraits<T>::from_float(f[i]);
  }
}

// What row `row` sees: its mask row (null without a mask) and its last visible column.
struct RowView {
  const char* mask;
  int64_t mask_stride;  // bytes between columns
  int64_t last;         // columns > last are masked (causal); INT64_MAX otherwise
};

template <typename T>
__device__ __forceinline__ RowView row_view(const SoftmaxParams& p, int64_t row) {
  RowView v{nullptr, 0, INT64_MAX};
  const int64_t g = row / p.rows_per_matrix, i = row % p.rows_per_matrix;
  if (p.is_causal) v.last = i + p.causal_offset;
  if (p.mask_kind != MaskKind::kNone) {
    const int64_t esize = p.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
    const int64_t off = (g / p.mask_g2) * p.mask_stride_g1 + (g % p.mask_g2) * p.mask_stride_g2 + i * p.mask_stride_l;
    v.mask = reinterpret_cast<const char*>(p.mask) + off * esize;
    v.mask_stride = p.mask_stride_n * esize;
  }
  return v;
}

// Score of column j in log2 units: x · scale + mask, -inf where masked.
template <typename T>
__device__ __forceinline__ float score_log2(const SoftmaxParams& p, const RowView& v, int64_t j, float x,
                                            float scale_log2) {
  if (j > v.last) return -INFINITY;
  float z = x * scale_log2;
  if (v.mask != nullptr) {
    const char* m = v.mask + j * v.mask_stride;
    if (p.mask_kind == MaskKind::kBool) {
      if (!*reinterpret_cast<const bool*>(m)) z = -INFINITY;
    } else {
      z += TypeTraits<T>::to_float(*reinterpret_cast<const T*>(m)) * kLog2e;
    }
  }
  return z;
}

__device__ __forceinline__ float exp2_shifted(float z, float m) {  // exp2(z - m), 0 when the row max is -inf
  return m == -INFINITY ? 0.f : exp2f(z - m);
}

// Block-wide reductions through 32 floats of shared memory (blockDim.x is a multiple of 32).
__device__ __forceinline__ float block_max(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : -INFINITY;
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, off));
  return v;
}
__device__ __forceinline__ float block_sum(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  v = lane < warps ? red[lane] : 0.f;
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
  return v;
}

template <typename T, int VEC, bool CACHED>
__global__ void softmax_fwd_kernel(const SoftmaxParams p) {
  extern __shared__ __align__(16) float zcache[];  // CACHED: the row's scores, float32
  __shared__ float red[32];
  const int64_t row = blockIdx.x;
  const T* x = reinterpret_cast<const T*>(p.x) + row * p.row_stride;
  T* y = reinterpret_cast<T*>(p.y) + row * p.cols;
  const RowView view = row_view<T>(p, row);
  const float scale_log2 = p.scale * kLog2e;
  const int64_t nvec = p.cols / VEC;

  float m = -INFINITY, s = 0.f;
  for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
    float f[VEC];
    load_vec<T, VEC>(x + vi * VEC, f);
    float vmax = -INFINITY;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      f[i] = score_log2<T>(p, view, vi * VEC + i, f[i], scale_log2);
      vmax = fmaxf(vmax, f[i]);
    }
    if constexpr (CACHED) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) zcache[vi * VEC + i] = f[i];
      m = fmaxf(m, vmax);
    } else {
      const float m_new = fmaxf(m, vmax);
      s *= exp2_shifted(m, m_new);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s += exp2_shifted(f[i], m_new);
      m = m_new;
    }
  }

  float row_max, row_sum;
  if constexpr (CACHED) {
    // Each thread revisits exactly the columns it wrote, so no barrier is needed here.
    row_max = block_max(m, red);
    for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        const float e = exp2_shifted(zcache[vi * VEC + i], row_max);
        zcache[vi * VEC + i] = e;
        s += e;
      }
    }
    row_sum = block_sum(s, red);
  } else {
    row_max = block_max(m, red);
    row_sum = block_sum(s * exp2_shifted(m, row_max), red);
  }
  const float inv = row_sum > 0.f ? 1.f / row_sum : 0.f;

  for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
    float f[VEC];
    if constexpr (CACHED) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = zcache[vi * VEC + i] * inv;
    } else {
      load_vec<T, VEC>(x + vi * VEC, f);
#pragma unroll
      for (int i = 0; i < VEC; ++i) f[i] = exp2_shifted(score_log2<T>(p, view, vi * VEC + i, f[i], scale_log2), row_max) * inv;
    }
    store_vec<T, VEC>(y + vi * VEC, f);
  }
}

template <typename T, int VEC, bool CACHED>
__global__ void softmax_bwd_kernel(const SoftmaxParams p) {
  extern __shared__ __align__(16) unsigned char cache_raw[];  // CACHED: y then dy, as stored
  __shared__ float red[32];
  T* ycache = reinterpret_cast<T*>(cache_raw);
  T* dycache = ycache + p.cols;
  const int64_t row = blockIdx.x;
  const T* y = reinterpret_cast<const T*>(p.y) + row * p.cols;
  const T* dy = reinterpret_cast<const T*>(p.dy) + row * p.cols;
  T* dx = reinterpret_cast<T*>(p.dx) + row * p.cols;
  const int64_t nvec = p.cols / VEC;

  float dot = 0.f;
  for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
    float fy[VEC], fd[VEC];
    load_vec<T, VEC>(y + vi * VEC, fy);
    load_vec<T, VEC>(dy + vi * VEC, fd);
    if constexpr (CACHED) {
      store_vec<T, VEC>(ycache + vi * VEC, fy);  // exact: a T round-trips through float
      store_vec<T, VEC>(dycache + vi * VEC, fd);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) dot += fy[i] * fd[i];
  }
  dot = block_sum(dot, red);
  for (int64_t vi = threadIdx.x; vi < nvec; vi += blockDim.x) {
    float fy[VEC], fd[VEC];
    load_vec<T, VEC>((CACHED ? ycache : y) + vi * VEC, fy);
    load_vec<T, VEC>((CACHED ? dycache : dy) + vi * VEC, fd);
#pragma unroll
    for (int i = 0; i < VEC; ++i) fy[i] = p.scale * fy[i] * (fd[i] - dot);
    store_vec<T, VEC>(dx + vi * VEC, fy);
  }
}

template <typename T>
int launch_softmax(const SoftmaxParams& p, int max_smem_optin, void* stream, bool backward) {
  const plan::SoftmaxPlan sp = plan::softmax_plan(int(p.dtype), p.rows, p.cols, p.row_stride, p.aligned, backward,
                                                  max_smem_optin);
  constexpr int kVec16 = 16 / sizeof(T);
  const bool vec = sp.vec == kVec16;
  void (*kernel)(SoftmaxParams) = nullptr;
  if (!backward) {
    kernel = vec ? (sp.cached ? softmax_fwd_kernel<T, kVec16, true> : softmax_fwd_kernel<T, kVec16, false>)
                 : (sp.cached ? softmax_fwd_kernel<T, 1, true> : softmax_fwd_kernel<T, 1, false>);
  } else {
    kernel = vec ? (sp.cached ? softmax_bwd_kernel<T, kVec16, true> : softmax_bwd_kernel<T, kVec16, false>)
                 : (sp.cached ? softmax_bwd_kernel<T, 1, true> : softmax_bwd_kernel<T, 1, false>);
  }
  if (p.rows == 0) return int(cudaSuccess);
  if (sp.smem_bytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(sp.smem_bytes));
    if (err != cudaSuccess) return int(err);
  }
  kernel<<<unsigned(sp.grid.x), sp.threads, sp.smem_bytes, static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

int dispatch(const SoftmaxParams& p, int max_smem_optin, void* stream, bool backward) {
  switch (p.dtype) {
    case DType::kFloat16: return launch_softmax<__half>(p, max_smem_optin, stream, backward);
    case DType::kBFloat16: return launch_softmax<__nv_bfloat16>(p, max_smem_optin, stream, backward);
    case DType::kFloat32: return launch_softmax<float>(p, max_smem_optin, stream, backward);
  }
  return int(cudaErrorInvalidValue);
}

}  // namespace

int softmax_forward(const SoftmaxParams& p, int /*sm_count*/, int max_smem_optin, void* stream) {
  return dispatch(p, max_smem_optin, stream, false);
}

int softmax_backward(const SoftmaxParams& p, int /*sm_count*/, int max_smem_optin, void* stream) {
  return dispatch(p, max_smem_optin, stream, true);
}

}  // namespace cuda
}  // namespace fastformer
