// One instantiation per file so the kernels compile in parallel (see flash_fwd_kernel.cuh).
#include "flash_fwd_kernel.cuh"

namespace fastformer {
namespace cuda {
template int launch_flash_fwd<__half, 128>(const AttentionParams&, void*);
}  // namespace cuda
}  // namespace fastformer
