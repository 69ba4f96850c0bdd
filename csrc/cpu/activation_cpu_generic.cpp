// GELU-tanh passes for any processor: 4-float vectors (SSE2 on x86-64, NEON on arm64).
#define FF_ISA generic
#define FF_ISA_NAME "generic"
#define FF_W 4
#define FF_KERNELS kernels_generic
#include "activation_cpu_impl.h"
