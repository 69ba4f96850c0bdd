// Torch-facing entry points of the CUDA kernels: argument checks and the
// tensor -> raw pointer/stride translation. Only <torch/extension.h> and the
// CUDA-free launch.h are included (the CPU torch wheel has no ATen CUDA
// headers), so the caller passes the current stream as an integer
// (torch.cuda.current_stream().cuda_stream), the device's SM count and its
// opt-in shared memory per block, and sets the current device. Outputs are
// allocated by the caller, so kernels never allocate.
#include <torch/extension.h>

#include <cstdint>
#include <string>

#include "launch.h"
#include "launch_plan.h"

namespace fastformer {
namespace cuda {
namespace {

DType dtype_of(const torch::Tensor& t, const char* name, bool allow_fp32) {
  if (t.scalar_type() == torch::kHalf) return DType::kFloat16;
  if (t.scalar_type() == torch::kBFloat16) return DType::kBFloat16;
  if (allow_fp32 && t.scalar_type() == torch::kFloat) return DType::kFloat32;
  TORCH_CHECK(false, name, " must be float16 or bfloat16", allow_fp32 ? " or float32" : "", ", got ",
              t.scalar_type());
  return DType::kFloat16;
}

void check_cuda(const torch::Tensor& t, const char* name, const torch::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
}

void check_shape(const torch::Tensor& t, const char* name, std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.dim() == int64_t(shape.size()), name, " must have ", shape.size(), " dimensions, got shape ",
              t.sizes());
  int i = 0;
  for (int64_t s : shape) {
    TORCH_CHECK(t.size(i) == s, name, " has shape ", t.sizes(), ", expected size ", s, " at dim ", i);
    ++i;
  }
}

// cp.async moves 16-byte rows: the base pointer and every stride must keep each row 16-byte aligned.
void check_rows_16b(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(-1) == 1, name, " must be contiguous in its last dimension, got strides ", t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
  for (int i = 0; i < t.dim() - 1; ++i) {
    TORCH_CHECK(t.size(i) == 1 || (t.stride(i) * int64_t(t.element_size())) % 16 == 0, name, "'s stride ",
                t.stride(i), " at dim ", i, " must be a multiple of 16 bytes");
  }
}

void check_status(int status, const char* what) {
  TORCH_CHECK(status == 0, "fastformer CUDA ", what, " failed to launch (cudaError ", status,
              "); rerun with CUDA_LAUNCH_BLOCKING=1 for the failing kernel");
}

void fill_mask(AttentionParams& p, const c10::optional<torch::Tensor>& mask, const torch::Tensor& q,
               int64_t B, int64_t H, int64_t L, int64_t S) {
  p.mask = nullptr;
  p.mask_kind = MaskKind::kNone;
  p.mask_stride_b = p.mask_stride_h = p.mask_stride_l = p.mask_stride_s = 0;
  if (!mask.has_value()) return;
  const torch::Tensor& m = *mask;
  check_cuda(m, "mask", q);
  check_shape(m, "mask", {B, H, L, S});
  TORCH_CHECK(m.scalar_type() == torch::kBool || m.scalar_type() == q.scalar_type(),
              "mask must be bool or q's dtype (", q.scalar_type(), "), got ", m.scalar_type());
  p.mask = m.data_ptr();
  p.mask_kind = m.scalar_type() == torch::kBool ? MaskKind::kBool : MaskKind::kFloat;
  p.mask_stride_b = m.stride(0);
  p.mask_stride_h = m.stride(1);
  p.mask_stride_l = m.stride(2);
  p.mask_stride_s = m.stride(3);
}

// Checks q, k, v (and the mask) and fills the problem part of the params.
AttentionParams problem_params(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const c10::optional<torch::Tensor>& mask, double scale, bool is_causal,
                               int64_t causal_offset, int64_t max_smem_optin) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got device ", q.device());
  check_cuda(k, "k", q);
  check_cuda(v, "v", q);
  TORCH_CHECK(q.dim() == 4, "q must be (B, Hq, L, E), got shape ", q.sizes());
  const DType dtype = dtype_of(q, "q", false);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "k and v must have q's dtype ", q.scalar_type(), ", got ", k.scalar_type(), " and ", v.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  TORCH_CHECK(k.dim() == 4, "k must be (B, Hkv, S, E), got shape ", k.sizes());
  const int64_t Hkv = k.size(1), S = k.size(2);
  check_shape(k, "k", {B, Hkv, S, E});
  check_shape(v, "v", {B, Hkv, S, E});
  check_rows_16b(q, "q");
  check_rows_16b(k, "k");
  check_rows_16b(v, "v");
  const std::string reason =
      plan::flash_unsupported(int(dtype), int(E), B, Hq, Hkv, L, S, max_smem_optin);
  TORCH_CHECK(reason.empty(), "flash attention: ", reason);

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_stride_b = q.stride(0), p.q_stride_h = q.stride(1), p.q_stride_l = q.stride(2);
  p.k_stride_b = k.stride(0), p.k_stride_h = k.stride(1), p.k_stride_s = k.stride(2);
  p.v_stride_b = v.stride(0), p.v_stride_h = v.stride(1), p.v_stride_s = v.stride(2);
  fill_mask(p, mask, q, B, Hq, L, S);
  p.batch = int(B), p.heads_q = int(Hq), p.heads_kv = int(Hkv), p.len_q = int(L), p.len_k = int(S);
  p.head_dim = int(E);
  p.scale = float(scale);
  p.is_causal = is_causal;
  p.causal_offset = causal_offset;
  p.dtype = dtype;
  return p;
}

void check_output(const torch::Tensor& t, const char* name, const torch::Tensor& q, c10::ScalarType dtype,
                  std::initializer_list<int64_t> shape) {
  check_cuda(t, name, q);
  check_shape(t, name, shape);
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

// out (B, Hq, L, E) and lse (B, Hq, L) float32 are written.
void flash_fwd(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const c10::optional<torch::Tensor>& mask, torch::Tensor& out, torch::Tensor& lse, double scale,
               bool is_causal, int64_t causal_offset, int64_t stream, int64_t sm_count, int64_t max_smem_optin) {
  AttentionParams p = problem_params(q, k, v, mask, scale, is_causal, causal_offset, max_smem_optin);
  check_output(out, "out", q, q.scalar_type(), {q.size(0), q.size(1), q.size(2), q.size(3)});
  check_output(lse, "lse", q, torch::kFloat, {q.size(0), q.size(1), q.size(2)});
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  check_status(flash_attention_forward(p, int(sm_count), int(max_smem_optin), reinterpret_cast<void*>(stream)),
               "flash attention forward");
}

// dq, dk, dv (shaped like q, k, v, contiguous) are written; delta (B, Hq, L) float32 is scratch.
void flash_bwd(const torch::Tensor& dout, const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
               const torch::Tensor& out, const torch::Tensor& lse, const c10::optional<torch::Tensor>& mask,
               torch::Tensor& delta, torch::Tensor& dq, torch::Tensor& dk, torch::Tensor& dv, double scale,
               bool is_causal, int64_t causal_offset, int64_t stream, int64_t sm_count, int64_t max_smem_optin) {
  AttentionParams p = problem_params(q, k, v, mask, scale, is_causal, causal_offset, max_smem_optin);
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3), Hkv = k.size(1), S = k.size(2);
  check_output(dout, "dout", q, q.scalar_type(), {B, Hq, L, E});
  check_output(out, "out", q, q.scalar_type(), {B, Hq, L, E});
  check_output(lse, "lse", q, torch::kFloat, {B, Hq, L});
  check_output(delta, "delta", q, torch::kFloat, {B, Hq, L});
  check_output(dq, "dq", q, q.scalar_type(), {B, Hq, L, E});
  check_output(dk, "dk", q, q.scalar_type(), {B, Hkv, S, E});
  check_output(dv, "dv", q, q.scalar_type(), {B, Hkv, S, E});
  p.dout = dout.data_ptr();
  p.out_fwd = out.data_ptr();
  p.lse_fwd = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  check_status(flash_attention_backward(p, int(sm_count), int(max_smem_optin), reinterpret_cast<void*>(stream)),
               "flash attention backward");
}

bool aligned16(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

SoftmaxParams softmax_params(const torch::Tensor& x, const c10::optional<torch::Tensor>& mask, double scale,
                             bool is_causal, int64_t rows_per_matrix, int64_t causal_offset) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, cols), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  const DType dtype = dtype_of(x, "x", true);
  const int64_t R = x.size(0), N = x.size(1);
  const std::string reason = plan::softmax_unsupported(int(dtype), R, N);
  TORCH_CHECK(reason.empty(), "softmax: ", reason);
  TORCH_CHECK(rows_per_matrix >= 1 && R % rows_per_matrix == 0, "rows_per_matrix must be >= 1 and divide rows (",
              R, "), got ", rows_per_matrix);
  SoftmaxParams p{};
  p.x = x.data_ptr();
  p.rows = R, p.cols = N, p.row_stride = N;
  p.rows_per_matrix = rows_per_matrix;
  p.mask_g2 = 1;
  p.mask = nullptr;
  p.mask_kind = MaskKind::kNone;
  if (mask.has_value()) {
    const torch::Tensor& m = *mask;
    check_cuda(m, "mask", x);
    TORCH_CHECK(m.dim() == 4, "mask must be a 4-D view (G1, G2, L, N), got shape ", m.sizes());
    TORCH_CHECK(m.size(2) == rows_per_matrix && m.size(3) == N && m.size(0) * m.size(1) * m.size(2) == R,
                "mask of shape ", m.sizes(), " does not cover x of shape ", x.sizes(), " with rows_per_matrix ",
                rows_per_matrix);
    TORCH_CHECK(m.scalar_type() == torch::kBool || m.scalar_type() == x.scalar_type(),
                "mask must be bool or x's dtype (", x.scalar_type(), "), got ", m.scalar_type());
    p.mask = m.data_ptr();
    p.mask_kind = m.scalar_type() == torch::kBool ? MaskKind::kBool : MaskKind::kFloat;
    p.mask_g2 = m.size(1);
    p.mask_stride_g1 = m.stride(0), p.mask_stride_g2 = m.stride(1);
    p.mask_stride_l = m.stride(2), p.mask_stride_n = m.stride(3);
  }
  p.scale = float(scale);
  p.is_causal = is_causal;
  p.causal_offset = causal_offset;
  p.dtype = dtype;
  return p;
}

void softmax_fwd(const torch::Tensor& x, const c10::optional<torch::Tensor>& mask, torch::Tensor& y, double scale,
                 bool is_causal, int64_t rows_per_matrix, int64_t causal_offset, int64_t stream,
                 int64_t max_smem_optin) {
  SoftmaxParams p = softmax_params(x, mask, scale, is_causal, rows_per_matrix, causal_offset);
  check_cuda(y, "y", x);
  TORCH_CHECK(y.sizes() == x.sizes() && y.scalar_type() == x.scalar_type() && y.is_contiguous(),
              "y must be contiguous and shaped like x (", x.sizes(), ", ", x.scalar_type(), ")");
  p.y = y.data_ptr();
  p.aligned = aligned16(x) && aligned16(y);
  check_status(softmax_forward(p, 0, int(max_smem_optin), reinterpret_cast<void*>(stream)), "softmax forward");
}

void softmax_bwd(const torch::Tensor& y, const torch::Tensor& dy, torch::Tensor& dx, double scale, int64_t stream,
                 int64_t max_smem_optin) {
  SoftmaxParams p = softmax_params(y, c10::nullopt, scale, false, 1, 0);
  for (const auto& [t, name] : {std::pair<const torch::Tensor&, const char*>{dy, "dy"}, {dx, "dx"}}) {
    check_cuda(t, name, y);
    TORCH_CHECK(t.sizes() == y.sizes() && t.scalar_type() == y.scalar_type() && t.is_contiguous(), name,
                " must be contiguous and shaped like y (", y.sizes(), ", ", y.scalar_type(), ")");
  }
  p.y = const_cast<void*>(y.data_ptr());
  p.dy = dy.data_ptr();
  p.dx = dx.data_ptr();
  p.aligned = aligned16(y) && aligned16(dy) && aligned16(dx);
  check_status(softmax_backward(p, 0, int(max_smem_optin), reinterpret_cast<void*>(stream)), "softmax backward");
}

}  // namespace
}  // namespace cuda

void register_cuda_kernels(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("flash_attention_fwd", &cuda::flash_fwd,
        "Flash attention forward into out (B,Hq,L,E) and lse (B,Hq,L) float32", "q"_a, "k"_a, "v"_a, "mask"_a,
        "out"_a, "lse"_a, "scale"_a, "is_causal"_a, "causal_offset"_a, "stream"_a, "sm_count"_a,
        "max_smem_optin"_a);
  m.def("flash_attention_bwd", &cuda::flash_bwd,
        "Flash attention backward into dq, dk, dv (delta (B,Hq,L) float32 is scratch)", "dout"_a, "q"_a, "k"_a,
        "v"_a, "out"_a, "lse"_a, "mask"_a, "delta"_a, "dq"_a, "dk"_a, "dv"_a, "scale"_a, "is_causal"_a,
        "causal_offset"_a, "stream"_a, "sm_count"_a, "max_smem_optin"_a);
  m.def("softmax_fwd", &cuda::softmax_fwd, "Fused scaled, masked softmax over the rows of x (R, N) into y", "x"_a,
        "mask"_a, "y"_a, "scale"_a, "is_causal"_a, "rows_per_matrix"_a, "causal_offset"_a, "stream"_a,
        "max_smem_optin"_a);
  m.def("softmax_bwd", &cuda::softmax_bwd, "dx = scale * y * (dy - sum(y * dy)) over rows (R, N)", "y"_a, "dy"_a,
        "dx"_a, "scale"_a, "stream"_a, "max_smem_optin"_a);
}

}  // namespace fastformer
