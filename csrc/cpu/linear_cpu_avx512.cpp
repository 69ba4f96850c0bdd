// The decoding GEMM for AVX-512F: 16-float vectors, 4 rows of x per pass (16 zmm accumulators).
#if defined(__x86_64__)
#define FF_ISA avx512
#define FF_ISA_NAME "avx512"
#define FF_W 16
#define FF_MB 4
#define FF_TARGET "avx512f,avx2,fma"
#define FF_KERNELS kernels_avx512
#include "linear_cpu_impl.h"
#endif
