// Device building blocks of the flash kernels: inline-PTX tensor-core MMA,
// ldmatrix, cp.async, a swizzled shared-memory layout and the fragment maps.
//
// Fragment layout of mma.sync.aligned.m16n8k16 (lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1)  a1 = (g+8, 2t..)  a2 = (g, 8+2t..)  a3 = (g+8, 8+2t..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g)  b1 = (k 8+2t.., n g)
//   C (16x8, f32):  c0,c1 = (g, 2t..2t+1)  c2,c3 = (g+8, 2t..2t+1)
// So the C fragments of two neighbouring n-tiles are exactly the A fragment of
// one k-tile: softmax probabilities go from the QKᵀ accumulator to the PV MMA
// without touching shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "launch.h"
#include "type_traits.cuh"

namespace fastformer {
namespace cuda {

// D = A * B + D, fp32 accumulate.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// 16-byte global -> shared copy; src_bytes = 0 zero-fills (rows past the end).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Shared-memory tile of ROWS x D 16-bit elements, row-major, with the 16-byte
// chunks of each row XOR-swizzled by (row % 8): the 8 rows one ldmatrix phase
// reads then hit 8 different bank groups instead of one (D >= 64, so a row has
// at least 8 chunks).
template <int D>
__host__ __device__ __forceinline__ int swz(int row, int col) {  // col in elements, a multiple of 8 for chunk starts
  return row * D + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

// Copy a ROWS x D tile from global (row stride `stride` elements) into swizzled
// shared memory; rows >= valid_rows are zero-filled. All THREADS threads take part.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, int64_t stride, int valid_rows, int tid) {
  constexpr int kChunksPerRow = D / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % THREADS == 0, "tile chunks must divide evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / THREADS; ++i) {
    const int c = tid + i * THREADS;
    const int row = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const bool valid = row < valid_rows;
    // Out-of-range rows still need a legal address; they copy 0 bytes from row 0.
    const T* src = gmem + (valid ? int64_t(row) * stride : 0) + chunk * 8;
    cp_async_16(smem_u32(smem + swz<D>(row, chunk * 8)), src, valid);
  }
}

// Fragment loads from a swizzled tile (host-callable too: tests/cuda/emulate_fragments.cu
// checks this index math against an emulation of ldmatrix and mma on the CPU). Each lane's ldmatrix row address splits into
// a per-lane part computed once (`lane_off`, bytes) and a per-step part: the
// 16-row block (`row0`, added) and the 16-column block (`col16`, XORed into the
// chunk bits; 2 * col16 ^ (row % 8) == (2 * col16) ^ (row % 8) since bit 0 of
// 2 * col16 is clear). This keeps address registers to a handful per operand
// instead of one per (row block, column block) pair.
template <int D>
__host__ __device__ __forceinline__ uint32_t frag_addr(uint32_t tile, int row0, int col16, uint32_t lane_off) {
  return tile + uint32_t(row0) * (2 * D) + (lane_off ^ (uint32_t(col16) << 5));
}

// A operand (16 x 16, row-major tile): lane reads row (lane % 16), chunk (lane / 16).
template <int D>
__host__ __device__ __forceinline__ uint32_t lane_off_a(int lane) {
  return uint32_t(lane & 15) * (2 * D) + (uint32_t((lane >> 4) ^ (lane & 7)) << 4);
}
// B operand of two n-tiles from a tile stored [n][k] (ldmatrix, no transpose):
// matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
template <int D>
__host__ __device__ __forceinline__ uint32_t lane_off_b_nk(int lane) {
  const int mi = lane >> 3;
  return uint32_t((lane & 7) + ((mi >> 1) << 3)) * (2 * D) + (uint32_t((mi & 1) ^ (lane & 7)) << 4);
}
// B operand of two n-tiles from a tile stored [k][n] (ldmatrix.trans):
// matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int D>
__host__ __device__ __forceinline__ uint32_t lane_off_b_kn(int lane) {
  const int mi = lane >> 3;
  return uint32_t((lane & 7) + ((mi & 1) << 3)) * (2 * D) + (uint32_t((mi >> 1) ^ (lane & 7)) << 4);
}

__device__ __forceinline__ float warp_max4(float x) {  // over the 4 lanes of one fragment row
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float warp_sum4(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Base pointer of the (b, h) mask plane, as bytes (strides are in elements of the mask dtype).
template <typename T>
__device__ __forceinline__ const char* mask_plane(const AttentionParams& p, int b, int h) {
  if (p.mask_kind == MaskKind::kNone) return nullptr;
  const int64_t esize = p.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
  return reinterpret_cast<const char*>(p.mask) + (int64_t(b) * p.mask_stride_b + int64_t(h) * p.mask_stride_h) * esize;
}

// Pointer to mask[b, h, row, col0] inside a plane.
template <typename T>
__device__ __forceinline__ const char* mask_row(const AttentionParams& p, const char* plane, int64_t row,
                                                int64_t col0) {
  const int64_t esize = p.mask_kind == MaskKind::kBool ? 1 : int64_t(sizeof(T));
  return plane + (row * p.mask_stride_l + col0 * p.mask_stride_s) * esize;
}

// Mask value (log2 units, -inf = masked) of column `col` past a mask_row pointer.
template <typename T>
__device__ __forceinline__ float mask_log2(const AttentionParams& p, const char* row_ptr, int col) {
  if (p.mask_kind == MaskKind::kBool) {
    return row_ptr[int64_t(col) * p.mask_stride_s] ? 0.f : -INFINITY;
  }
  return TypeTraits<T>::to_float(reinterpret_cast<const T*>(row_ptr)[int64_t(col) * p.mask_stride_s]) * kLog2e;
}

}  // namespace cuda
}  // namespace fastformer
