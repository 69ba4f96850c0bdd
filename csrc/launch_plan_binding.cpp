// C.cuda_launch_plan & co.: the CUDA kernels' launch planning (csrc/cuda/launch_plan.h,
// plain C++) exposed in every build, so it is unit-tested without a GPU and the
// Python "cuda" backend applies the same argument rules before it launches.
#include <torch/extension.h>

#include <stdexcept>
#include <string>

#include "cuda/launch_plan.h"

namespace fastformer {
namespace {

namespace plan = cuda::plan;

int dtype_code(const std::string& dtype) {
  if (dtype == "float16") return 0;
  if (dtype == "bfloat16") return 1;
  if (dtype == "float32") return 2;
  throw std::invalid_argument("dtype must be 'float16', 'bfloat16' or 'float32', got '" + dtype + "'");
}

pybind11::dict kernel_dict(const plan::KernelPlan& k) {
  pybind11::dict d;
  d["kernel"] = k.kernel;
  d["grid"] = pybind11::make_tuple(k.grid.x, k.grid.y, k.grid.z);
  d["threads"] = k.threads;
  d["smem_bytes"] = k.smem_bytes;
  return d;
}

// {"reason": "" or why not, "kernels": [launches in order]} for op "forward" or "backward".
pybind11::dict flash_plan(const std::string& op, const std::string& dtype, int64_t head_dim, int64_t batch,
                          int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k, int64_t max_smem_optin) {
  if (op != "forward" && op != "backward")
    throw std::invalid_argument("op must be 'forward' or 'backward', got '" + op + "'");
  const int dt = dtype_code(dtype);
  pybind11::dict d;
  const std::string reason =
      plan::flash_unsupported(dt, int(head_dim), batch, heads_q, heads_kv, len_q, len_k, max_smem_optin);
  d["reason"] = reason;
  pybind11::list kernels;
  if (reason.empty()) {
    if (op == "forward") {
      kernels.append(kernel_dict(plan::flash_fwd_plan(dt, int(head_dim), batch, heads_q, len_q)));
    } else {
      kernels.append(kernel_dict(plan::flash_bwd_preprocess_plan(batch, heads_q, len_q)));
      kernels.append(kernel_dict(plan::flash_bwd_dkdv_plan(dt, int(head_dim), batch, heads_kv, len_k)));
      kernels.append(kernel_dict(plan::flash_bwd_dq_plan(dt, int(head_dim), batch, heads_q, len_q)));
    }
  }
  d["kernels"] = kernels;
  return d;
}

pybind11::dict softmax_plan(const std::string& dtype, int64_t rows, int64_t cols, int64_t row_stride, bool aligned,
                            bool backward, int64_t max_smem_optin) {
  const int dt = dtype_code(dtype);
  pybind11::dict d;
  d["reason"] = plan::softmax_unsupported(dt, rows, cols);
  const plan::SoftmaxPlan p = plan::softmax_plan(dt, rows, cols, row_stride, aligned, backward, max_smem_optin);
  d["threads"] = p.threads;
  d["vec"] = p.vec;
  d["cached"] = p.cached;
  d["smem_bytes"] = p.smem_bytes;
  d["grid"] = pybind11::make_tuple(p.grid.x, p.grid.y, p.grid.z);
  return d;
}

}  // namespace

void register_launch_plan(pybind11::module& m) {
  using namespace pybind11::literals;
  m.def("cuda_launch_plan", &flash_plan,
        "Launches of the CUDA flash-attention forward/backward for a problem: "
        "{'reason': '' or why unsupported, 'kernels': [{'kernel','grid','threads','smem_bytes'}]}",
        "op"_a, "dtype"_a, "head_dim"_a, "batch"_a, "heads_q"_a, "heads_kv"_a, "len_q"_a, "len_k"_a,
        "max_smem_optin"_a);
  m.def("cuda_softmax_plan", &softmax_plan, "Launch of the CUDA softmax for rows (R, N)", "dtype"_a, "rows"_a,
        "cols"_a, "row_stride"_a, "aligned"_a, "backward"_a, "max_smem_optin"_a);
  m.def("cuda_causal_key_tile_end", &plan::causal_key_tile_end,
        "Key tiles [0, end) a query tile visits (causal tiles past the diagonal skipped)", "row0"_a, "rows"_a,
        "cols"_a, "len_k"_a, "is_causal"_a, "causal_offset"_a);
  m.def("cuda_causal_query_tile_begin", &plan::causal_query_tile_begin,
        "First query tile that sees any key of the key tile starting at key0", "key0"_a, "rows"_a, "is_causal"_a,
        "causal_offset"_a);
  pybind11::dict tiles;
  for (int d : {64, 128}) {
    pybind11::dict t;
    auto tile = [](const plan::FlashTile& f) { return pybind11::make_tuple(f.block_rows, f.block_cols, f.warps, f.stages); };
    t["forward"] = tile(plan::flash_fwd_tile(d));
    t["backward_dkdv"] = tile(plan::flash_bwd_dkdv_tile(d));
    t["backward_dq"] = tile(plan::flash_bwd_dq_tile(d));
    t["smem_bytes"] = pybind11::make_tuple(plan::flash_fwd_smem(d), plan::flash_bwd_dkdv_smem(d), plan::flash_bwd_dq_smem(d));
    tiles[pybind11::int_(d)] = t;
  }
  m.attr("cuda_flash_tiles") = tiles;
}

}  // namespace fastformer
