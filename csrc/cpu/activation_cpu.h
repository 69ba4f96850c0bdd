// GELU with the tanh approximation (GPT-2's "gelu_new"), forward and backward, on
// the CPU. Torch computes 0.5 x (1 + tanh(u)) with a general-purpose vector tanh
// that costs ~60 cycles a vector: at 1.6 M elements (one MLP of the nanoGPT-size
// model at B 4, T 256) 2.7 ms forward and 3.0 ms backward, 5 % of a training step
// (bench/NOTES.md, "GELU on the CPU"). Written as x s with s = 1 / (1 + exp(-2u)),
// one exp2 and one division a lane, the pass runs at memory speed.
//
// Plain C++ (no ATen) so each instruction set compiles its own copy of
// activation_cpu_impl.h (activation_cpu_{generic,avx2,avx512}.cpp);
// activation_cpu.cpp is the torch-facing binding and picks one at run time.
#pragma once

#include <cstdint>

namespace fastformer {
namespace cpu_act {

// y[i] = gelu_tanh(x[i]) for i in [0, n); float32 or (bf16) bfloat16, contiguous.
typedef void (*Forward)(const void* x, void* y, int64_t n, bool bf16);
// dx[i] = dy[i] * gelu_tanh'(x[i]).
typedef void (*Backward)(const void* dy, const void* x, void* dx, int64_t n, bool bf16);

struct Kernels {
  const char* name;
  Forward gelu_tanh_fwd;
  Backward gelu_tanh_bwd;
};

extern const Kernels kernels_generic;
#if defined(__x86_64__)
extern const Kernels kernels_avx2;
extern const Kernels kernels_avx512;
#endif

}  // namespace cpu_act
}  // namespace fastformer
