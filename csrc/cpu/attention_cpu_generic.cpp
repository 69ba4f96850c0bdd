// CPU attention kernels for any processor: the extension's baseline ISA
// (SSE2 on x86-64), 4-float vectors. Used when AVX2+FMA is missing.
#define FF_ISA generic
#define FF_ISA_NAME "generic"
#define FF_W 4
#define FF_MR 4
#define FF_KERNELS kernels_generic
#include "attention_cpu_impl.h"
