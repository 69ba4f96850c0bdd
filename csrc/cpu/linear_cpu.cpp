// Torch-facing side of the decoding GEMM (linear_cpu.h): argument checks, the
// float32 copy of x, the thread split over weight rows, the ISA variant.
#include <ATen/Parallel.h>
#include <ATen/autocast_mode.h>
#include <torch/extension.h>

#include <algorithm>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "linear_cpu.h"

namespace fastformer {
namespace cpu_linear {
namespace {

const Kernels& kernels() {
#if defined(__x86_64__)
  static const Kernels& chosen =
      table_for_cpu_isa(kernels_generic, kernels_avx2, kernels_avx512, kernels_avx512bf16);
  return chosen;
#else
  return kernels_generic;
#endif
}

// Work handed to one thread at least: below this many weight bytes the thread
// start-up costs more than it saves.
constexpr int64_t kMinBytesPerThread = 32 * 1024;

// Why the kernel cannot take these inputs, or "" when it can. max_rows < 0: any row count.
std::string unsupported(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                        int64_t max_rows) {
  if (!x.device().is_cpu() || !weight.device().is_cpu()) return "x and weight must be CPU tensors";
  if (x.layout() != at::kStrided || weight.layout() != at::kStrided) return "x and weight must be strided tensors";
  const auto dtype = weight.scalar_type();
  if (dtype != at::kFloat && dtype != at::kBFloat16) return "weight must be float32 or bfloat16";
  if (x.scalar_type() != dtype) return "x and weight must have one dtype";
  if (x.dim() < 1 || weight.dim() != 2) return "x must be (..., K) and weight (N, K)";
  const int64_t K = weight.size(1), N = weight.size(0);
  if (x.size(-1) != K) return "x's last dim must equal weight's in_features";
  if (K > 1 && weight.stride(1) != 1) return "weight must have unit stride along in_features";
  if (K == 0 || N == 0) return "empty weight";
  const int64_t rows = x.numel() / K;
  if (rows < 1 || (max_rows >= 0 && rows > max_rows)) return "row count outside the kernel's range";
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    if (!b.device().is_cpu() || b.layout() != at::kStrided || b.scalar_type() != dtype || b.dim() != 1 ||
        b.size(0) != N)
      return "bias must be a CPU tensor (N,) of weight's dtype";
  }
  if (at::GradMode::is_enabled() &&
      (x.requires_grad() || weight.requires_grad() || (bias.has_value() && bias->requires_grad())))
    return "the kernel records no gradient";
  if (at::autocast::is_autocast_enabled(at::kCPU)) return "autocast is on";
  return "";
}

at::Tensor run(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const int64_t K = weight.size(1), N = weight.size(0);
  const auto dtype = weight.scalar_type();
  const Kernels& k = kernels();
  const bool keep_bf16 = dtype == at::kBFloat16 && k.bf16_x;
  // x as contiguous rows (one step's activations: tiny next to the weight), widened to float32
  // unless the kernel multiplies bf16 pairs itself.
  const at::Tensor xr = x.reshape({-1, K});
  const at::Tensor xc = keep_bf16 ? xr.contiguous() : xr.to(at::kFloat).contiguous();
  const int64_t M = xc.size(0);
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, weight.options());
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Args a;
  if (keep_bf16)
    a.x_bf16 = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  else
    a.x = xc.data_ptr<float>();
  a.M = M;
  a.K = K;
  a.ldx = K;
  a.w = weight.data_ptr();
  a.ldw = K <= 1 ? 1 : weight.stride(0);
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.ldy = N;
  a.bf16 = dtype == at::kBFloat16;
  // Groups of 4 weight rows, split into contiguous ranges (one per thread); each
  // thread gets at least kMinBytesPerThread of weight.
  const int64_t groups = (N + 3) / 4;
  const int64_t group_bytes = std::max<int64_t>(1, 4 * K * (int64_t)weight.element_size());
  const int64_t grain = std::max<int64_t>(1, kMinBytesPerThread / group_bytes);
  at::parallel_for(0, groups, grain, [&](int64_t g0, int64_t g1) {
    k.columns(a, g0 * 4, std::min(N, g1 * 4));
  });
  return y;
}

// y = x weight^T + bias for x (..., K), weight (N, K), bias (N,) or None; float32 or bfloat16.
// Raises (naming the reason) on inputs the kernel does not take.
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  const std::string why = unsupported(x, weight, bias, -1);
  TORCH_CHECK_VALUE(why.empty(), "linear_cpu: ", why, " (got x ", x.sizes(), " ", x.scalar_type(), ", weight ",
                    weight.sizes(), " ", weight.scalar_type(), ")");
  return run(x, weight, bias);
}

// The same, or None when the kernel does not take these inputs or is not chosen for them:
// more than max_rows rows of x (per dtype), or a weight under min_weight_bytes. One call
// for ops.linear's "auto" (the checks cost ~0.1 us each here, ~0.1-1 us each in Python).
pybind11::object linear_auto(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                             int64_t max_rows_f32, int64_t max_rows_bf16, int64_t min_weight_bytes) {
  const int64_t max_rows = weight.scalar_type() == at::kBFloat16 ? max_rows_bf16 : max_rows_f32;
  if (max_rows < 1 || weight.numel() * (int64_t)weight.element_size() < min_weight_bytes ||
      !unsupported(x, weight, bias, max_rows).empty())
    return pybind11::none();
  return pybind11::cast(run(x, weight, bias));
}

}  // namespace
}  // namespace cpu_linear

void register_cpu_linear(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("linear_cpu", &cpu_linear::linear,
        "x (..., K) @ weight (N, K)^T + bias on CPU tensors, float32 or bfloat16, for few rows of x (decoding)",
        "x"_a, "weight"_a, "bias"_a = pybind11::none());
  m.def("linear_cpu_auto", &cpu_linear::linear_auto,
        "linear_cpu, or None where the kernel does not take the inputs or the given limits say torch",
        "x"_a, "weight"_a, "bias"_a, "max_rows_f32"_a, "max_rows_bf16"_a, "min_weight_bytes"_a);
  m.def("linear_cpu_isa", [] { return std::string(cpu_linear::kernels().name); },
        "The instruction-set variant the CPU decoding GEMM runs with here");
}

}  // namespace fastformer
