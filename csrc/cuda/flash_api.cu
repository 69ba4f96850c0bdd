// Dispatch of the flash-attention launchers over dtype and head dim. The
// launchers themselves are instantiated one per file (flash_{fwd,bwd}_hdim*_*.cu);
// only their declarations are seen here, so this file compiles no kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "launch.h"
#include "launch_plan.h"

namespace fastformer {
namespace cuda {

template <typename T, int D>
int launch_flash_fwd(const AttentionParams& p, void* stream);
template <typename T, int D>
int launch_flash_bwd(const AttentionParams& p, void* stream);

namespace {

bool supported(const AttentionParams& p, int max_smem_optin) {
  return plan::flash_unsupported(int(p.dtype), p.head_dim, p.batch, p.heads_q, p.heads_kv, p.len_q, p.len_k,
                                 max_smem_optin)
      .empty();
}

template <bool kBackward>
int dispatch(const AttentionParams& p, void* stream) {
#define FF_FLASH_CASE(TYPE, DIM) \
  return kBackward ? launch_flash_bwd<TYPE, DIM>(p, stream) : launch_flash_fwd<TYPE, DIM>(p, stream)
  if (p.dtype == DType::kBFloat16) {
    if (p.head_dim == 64) FF_FLASH_CASE(__nv_bfloat16, 64);
    if (p.head_dim == 128) FF_FLASH_CASE(__nv_bfloat16, 128);
  } else if (p.dtype == DType::kFloat16) {
    if (p.head_dim == 64) FF_FLASH_CASE(__half, 64);
    if (p.head_dim == 128) FF_FLASH_CASE(__half, 128);
  }
#undef FF_FLASH_CASE
  return int(cudaErrorInvalidValue);
}

}  // namespace

int flash_attention_forward(const AttentionParams& p, int /*sm_count*/, int max_smem_optin, void* stream) {
  if (!supported(p, max_smem_optin)) return int(cudaErrorInvalidValue);
  return dispatch<false>(p, stream);
}

int flash_attention_backward(const AttentionParams& p, int /*sm_count*/, int max_smem_optin, void* stream) {
  if (!supported(p, max_smem_optin)) return int(cudaErrorInvalidValue);
  return dispatch<true>(p, stream);
}

}  // namespace cuda
}  // namespace fastformer
