// The only PYBIND11_MODULE of fastformer._C. Each kernel family adds a
// register_*(m) function declared here and defined next to its binding code,
// so this file stays a list.
#include <torch/extension.h>

#include <string>

#include "cpu/cpu_features.h"

// setup.py (csrc/fastformer_build.py) defines these for a CUDA build: the toolkit and the archs compiled.
#ifndef FASTFORMER_CUDA_TOOLKIT
#define FASTFORMER_CUDA_TOOLKIT ""
#endif
#ifndef FASTFORMER_CUDA_ARCHS
#define FASTFORMER_CUDA_ARCHS ""
#endif

namespace fastformer {
void register_cpu_attention(pybind11::module& m);  // cpu/attention_cpu.cpp
void register_cpu_linear(pybind11::module& m);     // cpu/linear_cpu.cpp
void register_cpu_activation(pybind11::module& m);  // cpu/activation_cpu.cpp
void register_launch_plan(pybind11::module& m);    // launch_plan_binding.cpp (CUDA launch planning, every build)
#ifdef FASTFORMER_WITH_CUDA
void register_cuda_kernels(pybind11::module& m);   // cuda/attention_binding.cpp
#endif
}  // namespace fastformer

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastformer compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("cpu_features", &fastformer::cpu_feature_names,
        "x86 features detected at run time (the CPU kernels dispatch on them)");
  fastformer::register_cpu_attention(m);
  fastformer::register_cpu_linear(m);
  fastformer::register_cpu_activation(m);
  fastformer::register_launch_plan(m);
#ifdef FASTFORMER_WITH_CUDA
  fastformer::register_cuda_kernels(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  // What this binary was built with (python -m fastformer.info prints it; bench/gpu.sh checks a carried wheel).
  pybind11::dict info;
  info["cuda_toolkit"] = std::string(FASTFORMER_CUDA_TOOLKIT);
  const std::string archs = FASTFORMER_CUDA_ARCHS;
  pybind11::list arch_list;
  for (size_t start = 0; start < archs.size();) {
    size_t end = archs.find(',', start);
    if (end == std::string::npos) end = archs.size();
    arch_list.append(archs.substr(start, end - start));
    start = end + 1;
  }
  info["cuda_archs"] = arch_list;
#ifdef TORCH_VERSION_MAJOR
  info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
                  std::to_string(TORCH_VERSION_PATCH);
#endif
  m.attr("build_info") = info;
}
