#include "cpu_features.h"

#include <cstdlib>

namespace fastformer {

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = [] {
    CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    f.avx2 = __builtin_cpu_supports("avx2");
    f.fma = __builtin_cpu_supports("fma");
    f.avx512f = __builtin_cpu_supports("avx512f");
    f.avx512bw = __builtin_cpu_supports("avx512bw");
    f.avx512vl = __builtin_cpu_supports("avx512vl");
    f.avx512_bf16 = __builtin_cpu_supports("avx512bf16");
#endif
    return f;
  }();
  return features;
}

std::vector<std::string> cpu_feature_names() {
  const CpuFeatures& f = cpu_features();
  std::vector<std::string> names;
  if (f.avx2) names.push_back("avx2");
  if (f.fma) names.push_back("fma");
  if (f.avx512f) names.push_back("avx512f");
  if (f.avx512bw) names.push_back("avx512bw");
  if (f.avx512vl) names.push_back("avx512vl");
  if (f.avx512_bf16) names.push_back("avx512_bf16");
  return names;
}

const std::string& cpu_isa() {
  static const std::string chosen = [] {
    const CpuFeatures& f = cpu_features();
    const char* env = std::getenv("FASTFORMER_CPU_ISA");
    const std::string want = env ? env : "";
    const bool has2 = f.avx2 && f.fma, has512 = has2 && f.avx512f;
    const bool hasbf16 = has512 && f.avx512bw && f.avx512vl && f.avx512_bf16;
    if (want == "generic") return std::string("generic");
    if (want == "avx2" && has2) return std::string("avx2");
    if (want == "avx512" && has512) return std::string("avx512");
    if (hasbf16) return std::string("avx512_bf16");
    if (has512) return std::string("avx512");
    if (has2) return std::string("avx2");
    return std::string("generic");
  }();
  return chosen;
}

}  // namespace fastformer
