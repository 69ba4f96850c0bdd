// GELU-tanh passes for AVX2 + FMA: 8-float vectors.
#if defined(__x86_64__)
#define FF_ISA avx2
#define FF_ISA_NAME "avx2"
#define FF_W 8
#define FF_TARGET "avx2,fma"
#define FF_KERNELS kernels_avx2
#include "activation_cpu_impl.h"
#endif
