// The only PYBIND11_MODULE of fastformer._C. Each kernel family adds a
// register_*(m) function declared here and defined next to its binding code,
// so this file stays a list.
#include <torch/extension.h>

#include "cpu/cpu_features.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastformer compiled kernels (C++ CPU, and CUDA when built with it)";
  m.def("cpu_features", &fastformer::cpu_feature_names,
        "x86 features detected at run time (the CPU kernels dispatch on them)");
#ifdef FASTFORMER_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
