// Flash-attention forward on tensor cores (FlashAttention-2 schedule).
//
// One CTA of 4 warps owns a 128-query tile of one (batch, head); each warp owns
// 32 query rows (two 16-row MMA tiles). Q is loaded once; K and V tiles (64 keys
// at head dim 64, 32 at 128; launch_plan.h) stream through a
// two-stage cp.async pipeline (tile n+1 is in flight while tile n is computed).
// Scores S = Q·Kᵀ and the output accumulator O stay in registers as MMA
// fragments; the online softmax works in log2 units (exp2f) with running
// max m and sum l per row, and the probabilities feed the P·V MMA directly
// from the S fragments. Causal tiles entirely above the diagonal are never
// loaded; explicit masks are read per element through their strides.
#pragma once

#include "flash_common.cuh"
#include "launch_plan.h"

namespace fastformer {
namespace cuda {

// Scale (log2 units) and mask one 16 x BN score tile of a warp in place.
// row_base: the query index of fragment row g; key0: the first key of the tile.
// Keys past the end and (causal) past the diagonal become -inf; an explicit mask
// (`mask_bh` non-null) is added. Limits are kept relative to the tile, in 32 bits,
// so the per-element test is one compare.
template <typename T, int BN>
__device__ __forceinline__ void scale_and_mask_scores(float (&s)[BN / 8][4], const AttentionParams& p,
                                                      const char* mask_bh, int64_t row_base, int64_t key0,
                                                      int lane, bool check) {
  const float scale_log2 = p.scale * kLog2e;
  if (!check) {
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] *= scale_log2;
    return;
  }
  const int t = lane & 3;
  int last[2];  // last visible tile column of rows g and g + 8 (-1: none)
  const char* mrow[2] = {nullptr, nullptr};
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t row = row_base + 8 * r;
    int64_t l = int64_t(p.len_k) - 1 - key0;
    if (p.is_causal) l = min(l, row + p.causal_offset - key0);
    last[r] = int(max(int64_t(-1), min(l, int64_t(BN))));
    if (mask_bh != nullptr && row < p.len_q) mrow[r] = mask_row<T>(p, mask_bh, row, key0);
  }
#pragma unroll
  for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * t + (e & 1);
      const int r = e >> 1;
      float x = s[j][e] * scale_log2;
      if (col > last[r]) {
        x = -INFINITY;
      } else if (mrow[r] != nullptr) {
        x += mask_log2<T>(p, mrow[r], col);
      }
      s[j][e] = x;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(128) flash_fwd_kernel(const AttentionParams p) {
  constexpr plan::FlashTile kTile = plan::flash_fwd_tile(D);
  constexpr int BM = kTile.block_rows, BN = kTile.block_cols, THREADS = 32 * kTile.warps, STAGES = kTile.stages;
  constexpr int MT = kTile.m_tiles;  // 16-row MMA tiles per warp
  static_assert(BM == 16 * MT * kTile.warps, "each warp owns MT 16-row tiles");
  static_assert(STAGES == 2, "the pipeline below is written for two stages");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * D;            // STAGES tiles of BN x D
  T* sV = sK + STAGES * BN * D;   // STAGES tiles of BN x D

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  // Reverse tile order: under a causal mask the last query tiles do the most work,
  // so they start first and the short ones fill the tail.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = int64_t(m_block) * BM;
  const int valid_q = int(min(int64_t(BM), int64_t(p.len_q) - row0));

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + row0 * p.q_stride_l;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  // out / lse rows of this tile; recomputed where used so no pointer stays live across the loop.
  auto out_ptr = [&]() { return reinterpret_cast<T*>(p.out) + ((int64_t(b) * p.heads_q + h) * p.len_q + row0) * D; };
  auto lse_ptr = [&]() { return p.lse + (int64_t(b) * p.heads_q + h) * p.len_q + row0; };
  const char* mask_bh = mask_plane<T>(p, b, h);

  const int64_t n_end = plan::causal_key_tile_end(row0, BM, BN, p.len_k, p.is_causal, p.causal_offset);
  const int warp_row = warp * 16 * MT;  // first row of this warp inside the tile

  if (n_end <= 0) {  // every row of the tile sees no key: output 0, lse -inf
    T* out = out_ptr();
    float* lse = lse_ptr();
    for (int i = tid; i < valid_q * D; i += THREADS) out[i] = TypeTraits<T>::from_float(0.f);
    for (int i = tid; i < valid_q; i += THREADS) lse[i] = -INFINITY;
    return;
  }

  load_tile_async<BM, D, THREADS>(sQ, q, p.q_stride_l, valid_q, tid);
  {
    const int valid_k = int(min(int64_t(BN), int64_t(p.len_k)));
    load_tile_async<BN, D, THREADS>(sK, k, p.k_stride_s, valid_k, tid);
    load_tile_async<BN, D, THREADS>(sV, v, p.v_stride_s, valid_k, tid);
  }
  cp_async_commit();

  float o[MT][D / 8][4];
#pragma unroll
  for (int mi = 0; mi < MT; ++mi)
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[mi][j][0] = o[mi][j][1] = o[mi][j][2] = o[mi][j][3] = 0.f;
  float m_run[MT][2], l_run[MT][2];  // rows g and g + 8 of each m-tile: running max (log2 units), this thread's sum
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) m_run[mi][0] = m_run[mi][1] = -INFINITY, l_run[mi][0] = l_run[mi][1] = 0.f;
  // Per-lane ldmatrix offsets (see frag_addr). Q fragments are re-read from shared
  // memory each tile rather than held: 32 registers per m-tile fewer at head dim 128.
  const uint32_t q_off = lane_off_a<D>(lane), k_off = lane_off_b_nk<D>(lane), v_off = lane_off_b_kn<D>(lane);
  const uint32_t sQ_u = smem_u32(sQ);

  for (int64_t n = 0; n < n_end; ++n) {
    const int stage = int(n & 1);
    if (n + 1 < n_end) {  // prefetch the next K/V tile into the other stage
      const int64_t key_next = (n + 1) * BN;
      const int valid_k = int(min(int64_t(BN), int64_t(p.len_k) - key_next));
      load_tile_async<BN, D, THREADS>(sK + (stage ^ 1) * BN * D, k + key_next * p.k_stride_s, p.k_stride_s, valid_k, tid);
      load_tile_async<BN, D, THREADS>(sV + (stage ^ 1) * BN * D, v + key_next * p.v_stride_s, p.v_stride_s, valid_k, tid);
    }
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning tile n
    cp_async_wait<1>();
    __syncthreads();

    const uint32_t sK_u = smem_u32(sK + stage * BN * D);
    const uint32_t sV_u = smem_u32(sV + stage * BN * D);

    // S = Q · Kᵀ for this warp's MT x 16 rows x BN keys; each K fragment feeds 2 * MT MMAs.
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mi = 0; mi < MT; ++mi)
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) s[mi][j][0] = s[mi][j][1] = s[mi][j][2] = s[mi][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qf[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) ldmatrix_x4(qf[mi], frag_addr<D>(sQ_u, warp_row + 16 * mi, kk, q_off));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, frag_addr<D>(sK_u, nn * 16, kk, k_off));
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma_16816<T>(s[mi][2 * nn], qf[mi], bf[0], bf[1]);
          mma_16816<T>(s[mi][2 * nn + 1], qf[mi], bf[2], bf[3]);
        }
      }
    }

    const int64_t key0 = n * BN;
    // Bounds and causal checks only where they can bite: the last key tile, tiles that
    // cross the diagonal, and every tile under an explicit mask.
    const bool check = key0 + BN > p.len_k || mask_bh != nullptr ||
                       (p.is_causal && key0 + BN - 1 > row0 + p.causal_offset);
#pragma unroll
    for (int mi = 0; mi < MT; ++mi) {
      scale_and_mask_scores<T, BN>(s[mi], p, mask_bh, row0 + warp_row + 16 * mi + g, key0, lane, check);

      // Online softmax: rescale the running state to the new row max, exponentiate.
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_run[mi][r];
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[mi][j][2 * r], s[mi][j][2 * r + 1]));
        mx = warp_max4(mx);
        // A row with no visible key yet keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f(m_run[mi][r] - m_use);
        m_run[mi][r] = mx;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          s[mi][j][2 * r] = exp2f(s[mi][j][2 * r] - m_use);
          s[mi][j][2 * r + 1] = exp2f(s[mi][j][2 * r + 1] - m_use);
          sum += s[mi][j][2 * r] + s[mi][j][2 * r + 1];
        }
        l_run[mi][r] = l_run[mi][r] * alpha + sum;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          o[mi][j][2 * r] *= alpha;
          o[mi][j][2 * r + 1] *= alpha;
        }
      }
    }

    // O += P · V, P straight from the score fragments; each V fragment feeds 2 * MT MMAs.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mi = 0; mi < MT; ++mi) {
        a[mi][0] = TypeTraits<T>::pack(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        a[mi][1] = TypeTraits<T>::pack(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        a[mi][2] = TypeTraits<T>::pack(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        a[mi][3] = TypeTraits<T>::pack(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, frag_addr<D>(sV_u, kk * 16, dd, v_off));
#pragma unroll
        for (int mi = 0; mi < MT; ++mi) {
          mma_16816<T>(o[mi][2 * dd], a[mi], bf[0], bf[1]);
          mma_16816<T>(o[mi][2 * dd + 1], a[mi], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

  // Normalise and store; rows with no visible key output 0 and lse -inf.
  T* out = out_ptr();
  float* lse = lse_ptr();
#pragma unroll
  for (int mi = 0; mi < MT; ++mi) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float l = warp_sum4(l_run[mi][r]);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = warp_row + 16 * mi + g + 8 * r;
      if (row < valid_q) {
        T* out_row = out + int64_t(row) * D;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) {
          *reinterpret_cast<uint32_t*>(out_row + j * 8 + 2 * t) =
              TypeTraits<T>::pack(o[mi][j][2 * r] * inv, o[mi][j][2 * r + 1] * inv);
        }
        if (t == 0) lse[row] = l > 0.f ? (m_run[mi][r] + log2f(l)) * kLn2 : -INFINITY;
      }
    }
  }
}

template <typename T, int D>
int launch_flash_fwd(const AttentionParams& p, void* stream) {
  const plan::KernelPlan kp = plan::flash_fwd_plan(int(TypeTraits<T>::kDType), D, p.batch, p.heads_q, p.len_q);
  auto kernel = flash_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kp.smem_bytes));
  if (err != cudaSuccess) return int(err);
  kernel<<<dim3(unsigned(kp.grid.x), unsigned(kp.grid.y), unsigned(kp.grid.z)), kp.threads, kp.smem_bytes,
           static_cast<cudaStream_t>(stream)>>>(p);
  return int(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastformer
