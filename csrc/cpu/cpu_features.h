// Run-time CPU feature detection, so one distributed build picks the best
// code path on whatever x86 processor it lands on (no -march=native).
#pragma once

#include <string>
#include <vector>

namespace fastformer {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512_bf16 = false;
};

const CpuFeatures& cpu_features();
std::vector<std::string> cpu_feature_names();

// The instruction-set level the CPU kernels run at: "avx512_bf16", "avx512", "avx2" or
// "generic", the widest this processor supports, or FASTFORMER_CPU_ISA when set to one it
// supports (tests and benchmarks compare the variants that way). Decided once per process.
const std::string& cpu_isa();

}  // namespace fastformer
