// The decoding GEMM for AVX2 + FMA: 8-float vectors, 2 rows of x per pass (8 of the 16 ymm registers accumulate).
#if defined(__x86_64__)
#define FF_ISA avx2
#define FF_ISA_NAME "avx2"
#define FF_W 8
#define FF_MB 2
#define FF_TARGET "avx2,fma"
#define FF_KERNELS kernels_avx2
#include "linear_cpu_impl.h"
#endif
