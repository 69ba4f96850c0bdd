// Element types of the CUDA kernels and their only conversions.
//
// torch's CUDAExtension compiles every .cu with -D__CUDA_NO_HALF_OPERATORS__,
// -D__CUDA_NO_HALF_CONVERSIONS__, -D__CUDA_NO_BFLOAT16_CONVERSIONS__ and
// -D__CUDA_NO_HALF2_OPERATORS__ (torch.utils.cpp_extension.COMMON_NVCC_FLAGS),
// which delete the implicit constructors, conversions and operators of __half /
// __nv_bfloat16 (T(0.f), float(x), a + b, a < b). Kernels therefore convert only
// through TypeTraits<T>::to_float / from_float / pack (explicit intrinsics, round
// to nearest even) and do all arithmetic in float. tests/test_cuda_compile.py
// compiles with torch's own flags, so an implicit conversion fails CI.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "launch.h"

namespace fastformer {
namespace cuda {

template <typename T> struct TypeTraits;

template <> struct TypeTraits<float> {
  static constexpr DType kDType = DType::kFloat32;
  __device__ static __forceinline__ float to_float(float x) { return x; }
  __device__ static __forceinline__ float from_float(float x) { return x; }
};

template <> struct TypeTraits<__half> {
  static constexpr DType kDType = DType::kFloat16;
  __device__ static __forceinline__ float to_float(__half x) { return __half2float(x); }
  __device__ static __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  // Two floats as one 32-bit register of two halves (lo in the low 16 bits), the MMA fragment format.
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

template <> struct TypeTraits<__nv_bfloat16> {
  static constexpr DType kDType = DType::kBFloat16;
  __device__ static __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ static __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ static __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

}  // namespace cuda
}  // namespace fastformer
