// The only PYBIND11_MODULE of fastformer._C. Each kernel family adds a
// register_*(m) function declared here and defined next to its binding code,
// so this file stays a list.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

namespace fastformer {
void register_cpu_attention(pybind11::module& m);  // cpu/attention_cpu.cpp
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
  fastformer::register_launch_plan(m);
#ifdef FASTFORMER_WITH_CUDA
  fastformer::register_cuda_kernels(m);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
