// Flash-attention backward on tensor cores, deterministic.
//
// Choice: two kernels and no atomics. FlashAttention-2 computes dq with fp32
// atomicAdd from the dk/dv kernel, which makes dq depend on the order CTAs
// finish. Here the dk/dv kernel (one CTA per 64-key tile of one kv head, looping
// over every query tile of every query head in its GQA group) and the dq kernel
// (one CTA per 64-query tile, looping over key tiles like the forward) each
// recompute P = exp(S - lse): about 1.4x the MMA work of the atomic scheme,
// bit-reproducible results, no fp32 dq scratch and no GQA reduction pass.
//
// Both start from delta = rowsum(dO ∘ O) (flash_bwd_preprocess_kernel), then
//   dV = Pᵀ·dO,  dP = dO·Vᵀ,  dS = P ∘ (dP − delta),  dK = scale·dSᵀ·Q,  dQ = scale·dS·K.
// Rows whose lse is -inf (no visible key) have P = 0 and get zero gradients.
#pragma once

#include "flash_fwd_kernel.cuh"

namespace fastformer {
namespace cuda {

// delta[row] = sum_d dout[row, d] * out[row, d] over the rows of (B, Hq, L, D), one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(32 * plan::kPreprocessRowsPerBlock)
    flash_bwd_preprocess_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                                int64_t rows) {
  const int64_t row = int64_t(blockIdx.x) * plan::kPreprocessRowsPerBlock + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  float acc = 0.f;
#pragma unroll
  for (int d = lane * 2; d < D; d += 64) {
    const int64_t i = row * D + d;
    acc += TypeTraits<T>::to_float(dout[i]) * TypeTraits<T>::to_float(out[i]) +
           TypeTraits<T>::to_float(dout[i + 1]) * TypeTraits<T>::to_float(out[i + 1]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
  if (lane == 0) delta[row] = acc;
}

// lse (natural log) -> log2 units, with -inf (row sees nothing) mapped to +inf so exp2(s - lse) = 0.
__device__ __forceinline__ float lse_to_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// ------------------------------------------------------------------------- dk, dv

template <typename T, int D>
__global__ void __launch_bounds__(128) flash_bwd_dkdv_kernel(const AttentionParams p) {
  constexpr plan::FlashTile kTile = plan::flash_bwd_dkdv_tile(D);
  constexpr int BN = kTile.block_rows;  // keys owned by the CTA, 16 per warp
  constexpr int BM = kTile.block_cols;  // queries per pipeline step
  constexpr int THREADS = 32 * kTile.warps;
  static_assert(BN == 16 * kTile.warps && kTile.m_tiles == 1 && kTile.stages == 2, "tile shape assumed below");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;      // 2 stages of BM x D
  T* sdO = sQ + 2 * BM * D;  // 2 stages of BM x D
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * D);  // 2 stages of BM (log2 units)
  float* sDelta = sLse + 2 * BM;                              // 2 stages of BM

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int hk = blockIdx.y, b = blockIdx.z;
  const int group = p.heads_q / p.heads_kv;
  const int64_t key0 = int64_t(blockIdx.x) * BN;
  const int valid_k = int(min(int64_t(BN), int64_t(p.len_k) - key0));
  const int warp_row = warp * 16;

  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h + key0 * p.k_stride_s;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h + key0 * p.v_stride_s;

  // The (query head, query tile) steps this key tile takes part in, flattened so the
  // pipeline runs on across the heads of the GQA group.
  const int64_t m_begin = plan::causal_query_tile_begin(key0, BM, p.is_causal, p.causal_offset);
  const int64_t q_tiles = plan::ceil_div(p.len_q, BM);
  const int64_t per_head = q_tiles > m_begin ? q_tiles - m_begin : 0;
  const int64_t steps = per_head * group;

  auto issue = [&](int64_t step, int stage) {
    const int h = hk * group + int(step / per_head);
    const int64_t q0 = (m_begin + step % per_head) * BM;
    const int valid = int(min(int64_t(BM), int64_t(p.len_q) - q0));
    const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + q0 * p.q_stride_l;
    const int64_t bh_row = (int64_t(b) * p.heads_q + h) * p.len_q + q0;
    load_tile_async<BM, D, THREADS>(sQ + stage * BM * D, q, p.q_stride_l, valid, tid);
    load_tile_async<BM, D, THREADS>(sdO + stage * BM * D, reinterpret_cast<const T*>(p.dout) + bh_row * D, D, valid,
                                    tid);
    for (int i = tid; i < BM; i += THREADS) {
      sLse[stage * BM + i] = i < valid ? lse_to_log2(p.lse_fwd[bh_row + i]) : INFINITY;
      sDelta[stage * BM + i] = i < valid ? p.delta[bh_row + i] : 0.f;
    }
  };

  load_tile_async<BN, D, THREADS>(sK, k, p.k_stride_s, valid_k, tid);
  load_tile_async<BN, D, THREADS>(sV, v, p.v_stride_s, valid_k, tid);
  if (steps > 0) issue(0, 0);
  cp_async_commit();

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
    dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  }
  const uint32_t a_off = lane_off_a<D>(lane), nk_off = lane_off_b_nk<D>(lane), kn_off = lane_off_b_kn<D>(lane);
  const uint32_t sK_u = smem_u32(sK), sV_u = smem_u32(sV);
  const float scale_log2 = p.scale * kLog2e;

  for (int64_t step = 0; step < steps; ++step) {
    const int stage = int(step & 1);
    if (step + 1 < steps) issue(step + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const int h = hk * group + int(step / per_head);
    const int64_t q0 = (m_begin + step % per_head) * BM;
    const uint32_t sQ_u = smem_u32(sQ + stage * BM * D), sdO_u = smem_u32(sdO + stage * BM * D);
    const float* lse2 = sLse + stage * BM;
    const float* dlt = sDelta + stage * BM;

    // Sᵀ = K · Qᵀ: this warp's 16 keys x BM queries.
    float s[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_addr<D>(sK_u, warp_row, kk, a_off));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, frag_addr<D>(sQ_u, nn * 16, kk, nk_off));
        mma_16816<T>(s[2 * nn], a, bf[0], bf[1]);
        mma_16816<T>(s[2 * nn + 1], a, bf[2], bf[3]);
      }
    }

    // Pᵀ = exp2(Sᵀ·scale + mask − lse). Element (key, query): masked when the key is
    // past the end, past the causal diagonal, or masked out explicitly.
    const bool check = key0 + BN > p.len_k || p.mask_kind != MaskKind::kNone ||
                       (p.is_causal && key0 + BN - 1 > q0 + p.causal_offset);
    const char* mask_bh = mask_plane<T>(p, b, h);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = j * 8 + 2 * t + (e & 1);            // query column inside the tile
        const int kr = warp_row + g + ((e >> 1) << 3);     // key row inside the tile
        float x = s[j][e] * scale_log2;
        if (check) {
          const int64_t key = key0 + kr, query = q0 + qc;
          if (key >= p.len_k || (p.is_causal && key > query + p.causal_offset)) {
            x = -INFINITY;
          } else if (mask_bh != nullptr && query < p.len_q) {
            x += mask_log2<T>(p, mask_row<T>(p, mask_bh, query, key), 0);
          }
        }
        s[j][e] = exp2f(x - lse2[qc]);
      }
    }

    // dV += Pᵀ · dO.
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[4];
      a[0] = TypeTraits<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = TypeTraits<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = TypeTraits<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = TypeTraits<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, frag_addr<D>(sdO_u, kk * 16, dd, kn_off));
        mma_16816<T>(dv[2 * dd], a, bf[0], bf[1]);
        mma_16816<T>(dv[2 * dd + 1], a, bf[2], bf[3]);
      }
    }

    // dPᵀ = V · dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − delta), in place of dPᵀ.
    float dp[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_addr<D>(sV_u, warp_row, kk, a_off));
#pragma unroll
      for (int nn = 0; nn < BM / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, frag_addr<D>(sdO_u, nn * 16, kk, nk_off));
        mma_16816<T>(dp[2 * nn], a, bf[0], bf[1]);
        mma_16816<T>(dp[2 * nn + 1], a, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - dlt[j * 8 + 2 * t + (e & 1)]);

    // dK += dSᵀ · Q (scaled once at the end).
#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      uint32_t a[4];
      a[0] = TypeTraits<T>::pack(dp[2 * kk][0], dp[2 * kk][1]);
      a[1] = TypeTraits<T>::pack(dp[2 * kk][2], dp[2 * kk][3]);
      a[2] = TypeTraits<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      a[3] = TypeTraits<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, frag_addr<D>(sQ_u, kk * 16, dd, kn_off));
        mma_16816<T>(dk[2 * dd], a, bf[0], bf[1]);
        mma_16816<T>(dk[2 * dd + 1], a, bf[2], bf[3]);
      }
    }
    (void)h;
    __syncthreads();  // this stage is refilled by the next step's prefetch
  }
  cp_async_wait<0>();

  // Store dk, dv (B, Hkv, S, D) contiguous; key tiles no query sees store zeros.
  const int64_t out_row0 = (int64_t(b) * p.heads_kv + hk) * p.len_k + key0;
  T* dk_out = reinterpret_cast<T*>(p.dk) + out_row0 * D;
  T* dv_out = reinterpret_cast<T*>(p.dv) + out_row0 * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + 8 * r;
    if (row < valid_k) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int64_t off = int64_t(row) * D + j * 8 + 2 * t;
        *reinterpret_cast<uint32_t*>(dk_out + off) =
            TypeTraits<T>::pack(dk[j][2 * r] * p.scale, dk[j][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv_out + off) = TypeTraits<T>::pack(dv[j][2 * r], dv[j][2 * r + 1]);
      }
    }
  }
}

// ------------------------------------------------------------------------- dq

template <typename T, int D>
__global__ void __launch_bounds__(128) flash_bwd_dq_kernel(const AttentionParams p) {
  constexpr plan::FlashTile kTile = plan::flash_bwd_dq_tile(D);
  constexpr int BM = kTile.block_rows, BN = kTile.block_cols, THREADS = 32 * kTile.warps;
  static_assert(BM == 16 * kTile.warps && kTile.m_tiles == 1 && kTile.stages == 2, "tile shape assumed below");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;          // 2 stages of BN x D
  T* sV = sK + 2 * BN * D;       // 2 stages of BN x D

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int m_block = gridDim.x - 1 - blockIdx.x;  // heavy causal tiles first, as in the forward
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int64_t row0 = int64_t(m_block) * BM;
  const int valid_q = int(min(int64_t(BM), int64_t(p.len_q) - row0));
  const int warp_row = warp * 16;

  const T* q = reinterpret_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + row0 * p.q_stride_l;
  const T* k = reinterpret_cast<const T*>(p.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = reinterpret_cast<const T*>(p.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t bh_row = (int64_t(b) * p.heads_q + h) * p.len_q + row0;
  T* dq_out = reinterpret_cast<T*>(p.dq) + bh_row * D;
  const char* mask_bh = mask_plane<T>(p, b, h);

  const int64_t n_end = plan::causal_key_tile_end(row0, BM, BN, p.len_k, p.is_causal, p.causal_offset);
  if (n_end <= 0) {
    for (int i = tid; i < valid_q * D; i += THREADS) dq_out[i] = TypeTraits<T>::from_float(0.f);
    return;
  }

  load_tile_async<BM, D, THREADS>(sQ, q, p.q_stride_l, valid_q, tid);
  load_tile_async<BM, D, THREADS>(sdO, reinterpret_cast<const T*>(p.dout) + bh_row * D, D, valid_q, tid);
  {
    const int valid_k = int(min(int64_t(BN), int64_t(p.len_k)));
    load_tile_async<BN, D, THREADS>(sK, k, p.k_stride_s, valid_k, tid);
    load_tile_async<BN, D, THREADS>(sV, v, p.v_stride_s, valid_k, tid);
  }
  cp_async_commit();

  // Per-row constants of rows g and g + 8 (padding rows: lse +inf, so P = 0).
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + 8 * r;
    lse2[r] = row < valid_q ? lse_to_log2(p.lse_fwd[bh_row + row]) : INFINITY;
    dlt[r] = row < valid_q ? p.delta[bh_row + row] : 0.f;
  }

  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
  const uint32_t a_off = lane_off_a<D>(lane), nk_off = lane_off_b_nk<D>(lane), kn_off = lane_off_b_kn<D>(lane);
  const uint32_t sQ_u = smem_u32(sQ), sdO_u = smem_u32(sdO);

  for (int64_t n = 0; n < n_end; ++n) {
    const int stage = int(n & 1);
    if (n + 1 < n_end) {
      const int64_t key_next = (n + 1) * BN;
      const int valid_k = int(min(int64_t(BN), int64_t(p.len_k) - key_next));
      load_tile_async<BN, D, THREADS>(sK + (stage ^ 1) * BN * D, k + key_next * p.k_stride_s, p.k_stride_s, valid_k, tid);
      load_tile_async<BN, D, THREADS>(sV + (stage ^ 1) * BN * D, v + key_next * p.v_stride_s, p.v_stride_s, valid_k, tid);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint32_t sK_u = smem_u32(sK + stage * BN * D), sV_u = smem_u32(sV + stage * BN * D);

    // S = Q · Kᵀ and dP = dO · Vᵀ, 16 rows x BN keys per warp.
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_addr<D>(sQ_u, warp_row, kk, a_off));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, frag_addr<D>(sK_u, nn * 16, kk, nk_off));
        mma_16816<T>(s[2 * nn], a, bf[0], bf[1]);
        mma_16816<T>(s[2 * nn + 1], a, bf[2], bf[3]);
      }
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldmatrix_x4(a, frag_addr<D>(sdO_u, warp_row, kk, a_off));
#pragma unroll
      for (int nn = 0; nn < BN / 16; ++nn) {
        uint32_t bf[4];
        ldmatrix_x4(bf, frag_addr<D>(sV_u, nn * 16, kk, nk_off));
        mma_16816<T>(dp[2 * nn], a, bf[0], bf[1]);
        mma_16816<T>(dp[2 * nn + 1], a, bf[2], bf[3]);
      }
    }

    const int64_t key0 = n * BN;
    const bool check = key0 + BN > p.len_k || mask_bh != nullptr ||
                       (p.is_causal && key0 + BN - 1 > row0 + p.causal_offset);
    scale_and_mask_scores<T, BN>(s, p, mask_bh, row0 + warp_row + g, key0, lane, check);
    // dS = P ∘ (dP − delta), P = exp2(S − lse).
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = exp2f(s[j][e] - lse2[e >> 1]) * (dp[j][e] - dlt[e >> 1]);

    // dQ += dS · K (scaled once at the end).
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = TypeTraits<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      a[1] = TypeTraits<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      a[2] = TypeTraits<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = TypeTraits<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, frag_addr<D>(sK_u, kk * 16, dd, kn_off));
        mma_16816<T>(dq[2 * dd], a, bf[0], bf[1]);
        mma_16816<T>(dq[2 * dd + 1], a, bf[2], bf[3]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = warp_row + g + 8 * r;
    if (row < valid_q) {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        *reinterpret_cast<uint32_t*>(dq_out + int64_t(row) * D + j * 8 + 2 * t) =
            TypeTraits<T>::pack(dq[j][2 * r] * p.scale, dq[j][2 * r + 1] * p.scale);
      }
    }
  }
}

template <typename T, int D>
int launch_flash_bwd(const AttentionParams& p, void* stream) {
  const int dtype = int(TypeTraits<T>::kDType);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const plan::KernelPlan pre = plan::flash_bwd_preprocess_plan(p.batch, p.heads_q, p.len_q);
  flash_bwd_preprocess_kernel<T, D><<<unsigned(pre.grid.x), pre.threads, 0, s>>>(
      reinterpret_cast<const T*>(p.dout), reinterpret_cast<const T*>(p.out_fwd), p.delta,
      int64_t(p.batch) * p.heads_q * p.len_q);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return int(err);

  const plan::KernelPlan kv = plan::flash_bwd_dkdv_plan(dtype, D, p.batch, p.heads_kv, p.len_k);
  auto dkdv = flash_bwd_dkdv_kernel<T, D>;
  err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kv.smem_bytes));
  if (err != cudaSuccess) return int(err);
  dkdv<<<dim3(unsigned(kv.grid.x), unsigned(kv.grid.y), unsigned(kv.grid.z)), kv.threads, kv.smem_bytes, s>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) return int(err);

  const plan::KernelPlan qp = plan::flash_bwd_dq_plan(dtype, D, p.batch, p.heads_q, p.len_q);
  auto dqk = flash_bwd_dq_kernel<T, D>;
  err = cudaFuncSetAttribute(dqk, cudaFuncAttributeMaxDynamicSharedMemorySize, int(qp.smem_bytes));
  if (err != cudaSuccess) return int(err);
  dqk<<<dim3(unsigned(qp.grid.x), unsigned(qp.grid.y), unsigned(qp.grid.z)), qp.threads, qp.smem_bytes, s>>>(p);
  return int(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastformer
