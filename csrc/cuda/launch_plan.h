// Launch planning for the CUDA kernels: tile sizes, grids, shared memory and the
// argument rules, as plain constexpr C++ with no CUDA dependency.
//
// The .cu launchers use it to launch, and the CPU build of fastformer._C
// exposes it as C.cuda_launch_plan(...) so tests/test_cuda_launch_plan.py can
// check the planning logic on a machine without a GPU.
#pragma once

#include <cstdint>
#include <string>

// The constexpr helpers are also called from device code.
#if defined(__CUDACC__)
#define FF_PLAN_HD __host__ __device__
#else
#define FF_PLAN_HD
#endif

namespace fastformer {
namespace cuda {
namespace plan {

// ---------------------------------------------------------------- flash attention tiles

// Tile shape of one flash kernel. Every warp owns 16 rows of the tile's "row"
// side (queries for the forward and dq kernels, keys for the dk/dv kernel).
struct FlashTile {
  int block_rows;  // rows owned by one CTA: 16 * warps * m_tiles
  int block_cols;  // columns streamed per step through the shared-memory pipeline
  int warps;
  int stages;      // shared-memory buffers of the streamed tile (cp.async pipeline depth)
  int m_tiles;     // 16-row MMA tiles per warp: each B fragment loaded by ldmatrix feeds 2 * m_tiles MMAs
};

// Forward: queries x keys, 4 warps. At head dim 64 each warp owns 32 query rows (two
// 16-row MMA tiles), so every K/V fragment read from shared memory feeds 4 MMAs: with
// one 16-row tile per warp, ldmatrix traffic (512 B per 2 MMAs) would cap the MMA rate
// near half of an H100's mma.sync peak. At head dim 128 two tiles per warp need 8 bytes
// of spills on sm_80 (O alone is 128 floats per thread), so it stays at 16 rows per warp.
FF_PLAN_HD constexpr FlashTile flash_fwd_tile(int head_dim) {
  return head_dim <= 64 ? FlashTile{128, 64, 4, 2, 2} : FlashTile{64, 64, 4, 2, 1};
}

// Backward dk/dv: keys x queries. The dk and dv accumulators (head_dim/2 floats
// each) dominate; at head dim 128 the query step drops to 32 to stay spill-free.
FF_PLAN_HD constexpr FlashTile flash_bwd_dkdv_tile(int head_dim) {
  return FlashTile{64, head_dim <= 64 ? 64 : 32, 4, 2, 1};
}

// Backward dq: queries x keys, the forward's shape.
FF_PLAN_HD constexpr FlashTile flash_bwd_dq_tile(int head_dim) { return FlashTile{64, 64, 4, 2, 1}; }

FF_PLAN_HD constexpr int element_size(int dtype) { return dtype == 2 ? 4 : 2; }

// Dynamic shared memory of each kernel, in bytes (16-bit elements).
FF_PLAN_HD constexpr int64_t flash_fwd_smem(int head_dim) {
  // Q tile + `stages` (K, V) tile pairs.
  return (int64_t(flash_fwd_tile(head_dim).block_rows) * head_dim +
          int64_t(flash_fwd_tile(head_dim).stages) * 2 * flash_fwd_tile(head_dim).block_cols * head_dim) * 2;
}
FF_PLAN_HD constexpr int64_t flash_bwd_dkdv_smem(int head_dim) {
  // K, V tiles + `stages` (Q, dO) tile pairs + their lse and delta rows (float).
  return (int64_t(flash_bwd_dkdv_tile(head_dim).block_rows) * head_dim * 2 +
          int64_t(flash_bwd_dkdv_tile(head_dim).stages) * 2 * flash_bwd_dkdv_tile(head_dim).block_cols * head_dim) * 2 +
         int64_t(flash_bwd_dkdv_tile(head_dim).stages) * 2 * flash_bwd_dkdv_tile(head_dim).block_cols * 4;
}
FF_PLAN_HD constexpr int64_t flash_bwd_dq_smem(int head_dim) {
  // Q and dO tiles + `stages` (K, V) tile pairs.
  return (int64_t(flash_bwd_dq_tile(head_dim).block_rows) * head_dim * 2 +
          int64_t(flash_bwd_dq_tile(head_dim).stages) * 2 * flash_bwd_dq_tile(head_dim).block_cols * head_dim) * 2;
}

constexpr int kPreprocessRowsPerBlock = 8;  // one warp per row of dout·out

FF_PLAN_HD constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Grid {
  int64_t x = 1, y = 1, z = 1;
};

struct KernelPlan {
  std::string kernel;  // which instantiation runs, e.g. "flash_fwd_hdim128_bf16"
  Grid grid;
  int threads = 0;
  int64_t smem_bytes = 0;
};

// The argument rules, shared by the binding (which reports them as errors) and
// the Python backend (which falls back instead). Returns "" when supported.
inline std::string flash_unsupported(int dtype, int head_dim, int64_t batch, int64_t heads_q, int64_t heads_kv,
                                     int64_t len_q, int64_t len_k, int64_t max_smem_optin) {
  if (dtype != 0 && dtype != 1) return "dtype must be float16 or bfloat16 (tensor-core kernels)";
  if (head_dim != 64 && head_dim != 128) return "head_dim must be 64 or 128, got " + std::to_string(head_dim);
  if (batch < 1 || heads_q < 1 || heads_kv < 1 || len_q < 1 || len_k < 1)
    return "batch, heads, len_q and len_k must be positive";
  if (heads_q % heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  if (heads_q > 65535 || batch > 65535) return "heads_q and batch must be <= 65535 (grid y/z limits)";
  if (len_q > (int64_t(1) << 31) - 1 || len_k > (int64_t(1) << 31) - 1) return "sequence lengths must fit in int32";
  int64_t need = flash_fwd_smem(head_dim);
  if (flash_bwd_dkdv_smem(head_dim) > need) need = flash_bwd_dkdv_smem(head_dim);
  if (flash_bwd_dq_smem(head_dim) > need) need = flash_bwd_dq_smem(head_dim);
  if (need > max_smem_optin)
    return "kernels need " + std::to_string(need) + " bytes of shared memory, device allows " +
           std::to_string(max_smem_optin);
  return "";
}

inline std::string dtype_suffix(int dtype) { return dtype == 0 ? "fp16" : dtype == 1 ? "bf16" : "fp32"; }

inline KernelPlan flash_fwd_plan(int dtype, int head_dim, int64_t batch, int64_t heads_q, int64_t len_q) {
  const FlashTile t = flash_fwd_tile(head_dim);
  KernelPlan p;
  p.kernel = "flash_fwd_hdim" + std::to_string(head_dim) + "_" + dtype_suffix(dtype);
  p.grid = Grid{ceil_div(len_q, t.block_rows), heads_q, batch};
  p.threads = 32 * t.warps;
  p.smem_bytes = flash_fwd_smem(head_dim);
  return p;
}

inline KernelPlan flash_bwd_preprocess_plan(int64_t batch, int64_t heads_q, int64_t len_q) {
  KernelPlan p;
  p.kernel = "flash_bwd_preprocess";
  p.grid = Grid{ceil_div(batch * heads_q * len_q, kPreprocessRowsPerBlock), 1, 1};
  p.threads = 32 * kPreprocessRowsPerBlock;
  return p;
}

inline KernelPlan flash_bwd_dkdv_plan(int dtype, int head_dim, int64_t batch, int64_t heads_kv, int64_t len_k) {
  const FlashTile t = flash_bwd_dkdv_tile(head_dim);
  KernelPlan p;
  p.kernel = "flash_bwd_dkdv_hdim" + std::to_string(head_dim) + "_" + dtype_suffix(dtype);
  p.grid = Grid{ceil_div(len_k, t.block_rows), heads_kv, batch};
  p.threads = 32 * t.warps;
  p.smem_bytes = flash_bwd_dkdv_smem(head_dim);
  return p;
}

inline KernelPlan flash_bwd_dq_plan(int dtype, int head_dim, int64_t batch, int64_t heads_q, int64_t len_q) {
  const FlashTile t = flash_bwd_dq_tile(head_dim);
  KernelPlan p;
  p.kernel = "flash_bwd_dq_hdim" + std::to_string(head_dim) + "_" + dtype_suffix(dtype);
  p.grid = Grid{ceil_div(len_q, t.block_rows), heads_q, batch};
  p.threads = 32 * t.warps;
  p.smem_bytes = flash_bwd_dq_smem(head_dim);
  return p;
}

// Key tiles a query tile [row0, row0 + rows) visits: [0, end). Causal tiles past the
// diagonal are skipped; end <= 0 means every row of the tile sees no key.
FF_PLAN_HD constexpr int64_t causal_key_tile_end(int64_t row0, int rows, int cols, int64_t len_k, bool is_causal,
                                      int64_t causal_offset) {
  const int64_t all = ceil_div(len_k, cols);
  if (!is_causal) return all;
  const int64_t last_key = row0 + rows - 1 + causal_offset;  // largest key any row of the tile sees
  if (last_key < 0) return 0;
  const int64_t end = last_key / cols + 1;
  return end < all ? end : all;
}

// First query tile that sees any key of the key tile [key0, ...): queries i with i + offset >= key0.
FF_PLAN_HD constexpr int64_t causal_query_tile_begin(int64_t key0, int rows, bool is_causal, int64_t causal_offset) {
  if (!is_causal) return 0;
  const int64_t first_query = key0 - causal_offset;
  return first_query <= 0 ? 0 : first_query / rows;
}

// ---------------------------------------------------------------- softmax

struct SoftmaxPlan {
  int threads = 0;
  int vec = 1;            // elements per vector load (16 bytes when aligned, else 1)
  bool cached = false;    // row kept in shared memory (one read); else online, two reads
  int64_t smem_bytes = 0;
  Grid grid;
};

// `aligned`: base pointers are 16-byte aligned (the binding checks the pointers).
inline SoftmaxPlan softmax_plan(int dtype, int64_t rows, int64_t cols, int64_t row_stride, bool aligned,
                                bool backward, int64_t max_smem_optin) {
  SoftmaxPlan p;
  const int esize = element_size(dtype);
  const int vec16 = 16 / esize;
  p.vec = (aligned && cols % vec16 == 0 && row_stride % vec16 == 0) ? vec16 : 1;
  // About four vectors per thread, one CTA per row, 32..1024 threads.
  int64_t want = ceil_div(ceil_div(cols, p.vec), 4);
  want = ceil_div(want, 32) * 32;
  p.threads = int(want < 32 ? 32 : want > 1024 ? 1024 : want);
  // Cache the row in shared memory when it takes at most half the SM's opt-in
  // capacity, so two CTAs still fit per SM. Forward: the scaled, masked scores in
  // float32 (then each element is exponentiated once); backward: y and dy as stored.
  const int64_t cache = backward ? cols * esize * 2 : cols * 4;
  p.cached = cache <= max_smem_optin / 2;
  p.smem_bytes = p.cached ? cache : 0;
  p.grid = Grid{rows, 1, 1};
  return p;
}

inline std::string softmax_unsupported(int dtype, int64_t rows, int64_t cols) {
  if (dtype < 0 || dtype > 2) return "dtype must be float16, bfloat16 or float32";
  if (rows < 0 || cols < 0) return "rows and cols must be non-negative";
  if (rows > (int64_t(1) << 31) - 1) return "rows must be < 2^31 (grid x limit)";
  return "";
}

}  // namespace plan
}  // namespace cuda
}  // namespace fastformer
