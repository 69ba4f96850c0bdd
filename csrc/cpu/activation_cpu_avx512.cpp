// GELU-tanh passes for AVX-512F (also what avx512_bf16 processors run: the pass is bound by
// memory, and bf16 values are widened on load and rounded on store either way).
#if defined(__x86_64__)
#define FF_ISA avx512
#define FF_ISA_NAME "avx512"
#define FF_W 16
#define FF_TARGET "avx512f,avx2,fma"
#define FF_KERNELS kernels_avx512
#include "activation_cpu_impl.h"
#endif
