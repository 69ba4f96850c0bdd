// CPU attention kernels for AVX2 + FMA: 8-float vectors, a 6 x 16 micro-kernel
// (12 ymm accumulators + 2 for the B panel + 1 broadcast = 15 of 16 registers).
#if defined(__x86_64__)
#define FF_ISA avx2
#define FF_ISA_NAME "avx2"
#define FF_W 8
#define FF_MR 6
#define FF_TARGET "avx2,fma"
#define FF_KERNELS kernels_avx2
#include "attention_cpu_impl.h"
#endif
