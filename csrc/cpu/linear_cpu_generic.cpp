// The decoding GEMM for any processor: 4-float vectors (SSE2 on x86-64, NEON on arm64), 2 rows of x per pass.
#define FF_ISA generic
#define FF_ISA_NAME "generic"
#define FF_W 4
#define FF_MB 2
#define FF_KERNELS kernels_generic
#include "linear_cpu_impl.h"
