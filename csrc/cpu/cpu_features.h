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

// A kernel family's table for cpu_isa(): each family compiles one table per instruction set
// and asks here which one runs (one place maps the ISA names, whatever the family).
template <typename Table>
const Table& table_for_cpu_isa(const Table& generic, const Table& avx2, const Table& avx512,
                               const Table& avx512_bf16) {
  const std::string& isa = cpu_isa();
  if (isa == "avx512_bf16") return avx512_bf16;
  if (isa == "avx512") return avx512;
  if (isa == "avx2") return avx2;
  return generic;
}

}  // namespace fastformer
