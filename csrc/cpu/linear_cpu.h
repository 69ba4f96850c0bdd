// Skinny GEMM for decoding on the CPU: y = x W^T + b with few rows of x (one new
// token per sequence) against a large weight. At M = 1..8 the product is a few
// matrix-vector products, bound by reading W from memory once; torch's CPU
// F.linear (MKL's sgemv) reads it at about 9 GB/s on the machines we measured,
// well under what two cores stream (bench/NOTES.md, "CPU linear for decoding").
//
// Plain C++ (no ATen) so each instruction set compiles its own copy of
// linear_cpu_impl.h (linear_cpu_{generic,avx2,avx512}.cpp); linear_cpu.cpp is
// the torch-facing binding and picks one at run time.
#pragma once

#include <cstdint>

namespace fastformer {
namespace cpu_linear {

struct Args {
  const float* x = nullptr;  // (M, K) float32, rows contiguous with stride ldx
  const uint16_t* x_bf16 = nullptr;  // the same rows as bfloat16, for kernels with bf16_x (else null)
  int64_t M = 0, K = 0, ldx = 0;
  const void* w = nullptr;   // (N, K), row stride ldw (elements), float32 or bfloat16
  int64_t ldw = 0;
  const void* bias = nullptr;  // (N,) same dtype as w, or null
  void* y = nullptr;           // (M, N), row stride ldy, float32 or bfloat16
  int64_t ldy = 0;
  bool bf16 = false;           // w, bias and y are bfloat16 (x was widened to float32, or kept: x_bf16)
};

// Computes columns [n0, n1) of y for every row of x.
struct Kernels {
  const char* name;
  void (*columns)(const Args& a, int64_t n0, int64_t n1);
  bool bf16_x;  // bf16 problems read x as bfloat16 (x_bf16), not widened
};

extern const Kernels kernels_generic;
#if defined(__x86_64__)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
extern const Kernels kernels_avx512bf16;
#endif

}  // namespace cpu_linear
}  // namespace fastformer
