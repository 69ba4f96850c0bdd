// Torch-facing side of the GELU-tanh passes (activation_cpu.h): argument checks, the
// thread split, the ISA variant.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <string>

#include "cpu_features.h"
#include "activation_cpu.h"

namespace fastformer {
namespace cpu_act {
namespace {

const Kernels& kernels() {
#if defined(__x86_64__)
  // avx512_bf16 adds nothing to an elementwise pass: the avx512 variant serves both.
  static const Kernels& chosen = table_for_cpu_isa(kernels_generic, kernels_avx2, kernels_avx512, kernels_avx512);
  return chosen;
#else
  return kernels_generic;
#endif
}

// Elements per thread at least: a chunk of 16 K floats (64 KiB) takes ~3 us, about what
// handing it to another thread costs.
constexpr int64_t kGrain = 16 * 1024;

void check(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.layout() == at::kStrided, op, ": ", name,
                    " must be a strided CPU tensor, got ", t.device(), " ", t.layout());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
                   " must be float32 or bfloat16, got ", t.scalar_type());
}

// gelu(x, approximate="tanh") for a CPU tensor x, float32 or bfloat16; a new contiguous tensor.
at::Tensor gelu_tanh(const at::Tensor& x) {
  check("gelu_tanh_cpu", "input", x);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t esize = x.element_size();
  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const Kernels& k = kernels();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    k.gelu_tanh_fwd(xp + i0 * esize, yp + i0 * esize, i1 - i0, bf16);
  });
  return y;
}

// grad_output * gelu'(x) (approximate="tanh"): aten::gelu_backward's arguments and result.
at::Tensor gelu_tanh_backward(const at::Tensor& grad_output, const at::Tensor& x) {
  check("gelu_tanh_backward_cpu", "grad_output", grad_output);
  check("gelu_tanh_backward_cpu", "input", x);
  TORCH_CHECK_VALUE(grad_output.sizes() == x.sizes(), "gelu_tanh_backward_cpu: grad_output ", grad_output.sizes(),
                    " and input ", x.sizes(), " must have one shape");
  TORCH_CHECK_TYPE(grad_output.scalar_type() == x.scalar_type(), "gelu_tanh_backward_cpu: grad_output ",
                   grad_output.scalar_type(), " and input ", x.scalar_type(), " must have one dtype");
  const at::Tensor dyc = grad_output.contiguous(), xc = x.contiguous();
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t esize = x.element_size();
  const char* dyp = static_cast<const char*>(dyc.data_ptr());
  const char* xp = static_cast<const char*>(xc.data_ptr());
  char* dxp = static_cast<char*>(dx.data_ptr());
  const Kernels& k = kernels();
  at::parallel_for(0, xc.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    k.gelu_tanh_bwd(dyp + i0 * esize, xp + i0 * esize, dxp + i0 * esize, i1 - i0, bf16);
  });
  return dx;
}

}  // namespace
}  // namespace cpu_act

void register_cpu_activation(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("gelu_tanh_cpu", &cpu_act::gelu_tanh,
        "gelu(input, approximate='tanh') for a CPU tensor, float32 or bfloat16", "input"_a);
  m.def("gelu_tanh_backward_cpu", &cpu_act::gelu_tanh_backward,
        "grad_output * gelu'(input) with approximate='tanh', CPU tensors of one shape and dtype", "grad_output"_a,
        "input"_a);
  m.def("activation_cpu_isa", [] { return std::string(cpu_act::kernels().name); },
        "The instruction-set variant the CPU activation passes run with here");
}

}  // namespace fastformer
