// CPU attention kernels for AVX-512F: 16-float vectors, a 12 x 32 micro-kernel
// (24 zmm accumulators + 2 for the B panel + broadcasts, of 32 registers).
#if defined(__x86_64__)
#define FF_ISA avx512
#define FF_ISA_NAME "avx512"
#define FF_W 16
#define FF_MR 12
#define FF_TARGET "avx512f,avx2,fma"
#define FF_KERNELS kernels_avx512
#include "attention_cpu_impl.h"
#endif
