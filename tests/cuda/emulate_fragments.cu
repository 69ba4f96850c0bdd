// CPU emulation of the flash kernels' fragment plumbing (runs without a GPU).
//
// Fills swizzled shared-memory tiles exactly as load_tile_async does (swz), then
// walks the kernels' ldmatrix addressing (lane_off_* + frag_addr) and MMA loops for
// one CTA, with ldmatrix(.trans) and mma.m16n8k16 emulated from the PTX ISA's
// fragment layouts, and compares against plain matrix products:
//   S  = Q·Kᵀ      (A row-major tile, B from a [n][k] tile)      forward, dq
//   O  = P·V       (A from the S accumulators, B from a [k][n] tile via .trans)
//   Sᵀ = K·Qᵀ, dV = Pᵀ·dO with 32- and 64-wide query steps           dk/dv
// Built and run by tests/test_cuda_compile.py (nvcc, host code only). Exit 0 = all match.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "flash_common.cuh"

using fastformer::cuda::frag_addr;
using fastformer::cuda::lane_off_a;
using fastformer::cuda::lane_off_b_kn;
using fastformer::cuda::lane_off_b_nk;
using fastformer::cuda::swz;

namespace {

std::vector<float> smem;  // one float per 16-bit element; byte address = 2 * index

struct Pair { float lo, hi; };

// ldmatrix.x4: lanes 8j..8j+7 give the row addresses of matrix j.
void ldmatrix_x4(Pair (&out)[32][4], const uint32_t (&addr)[32], bool trans) {
  for (int lane = 0; lane < 32; ++lane) {
    for (int j = 0; j < 4; ++j) {
      const int g = lane >> 2, t = lane & 3;
      if (!trans) {
        const size_t base = addr[8 * j + g] / 2;
        out[lane][j] = {smem[base + 2 * t], smem[base + 2 * t + 1]};
      } else {
        out[lane][j] = {smem[addr[8 * j + 2 * t] / 2 + g], smem[addr[8 * j + 2 * t + 1] / 2 + g]};
      }
    }
  }
}

// mma.m16n8k16 row.col: d += a * b over a warp's fragments.
void mma(float (&d)[32][4], const Pair (&a)[32][4], const Pair (&b)[32][2]) {
  float A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    A[g][2 * t] = a[lane][0].lo, A[g][2 * t + 1] = a[lane][0].hi;
    A[g + 8][2 * t] = a[lane][1].lo, A[g + 8][2 * t + 1] = a[lane][1].hi;
    A[g][8 + 2 * t] = a[lane][2].lo, A[g][8 + 2 * t + 1] = a[lane][2].hi;
    A[g + 8][8 + 2 * t] = a[lane][3].lo, A[g + 8][8 + 2 * t + 1] = a[lane][3].hi;
    B[2 * t][g] = b[lane][0].lo, B[2 * t + 1][g] = b[lane][0].hi;
    B[8 + 2 * t][g] = b[lane][1].lo, B[8 + 2 * t + 1][g] = b[lane][1].hi;
    C[g][2 * t] = d[lane][0], C[g][2 * t + 1] = d[lane][1];
    C[g + 8][2 * t] = d[lane][2], C[g + 8][2 * t + 1] = d[lane][3];
  }
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) C[i][n] += A[i][k] * B[k][n];
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane >> 2, t = lane & 3;
    d[lane][0] = C[g][2 * t], d[lane][1] = C[g][2 * t + 1];
    d[lane][2] = C[g + 8][2 * t], d[lane][3] = C[g + 8][2 * t + 1];
  }
}

// Random rows x D matrix, stored into the swizzled tile at element offset `tile` like load_tile_async.
template <int D>
std::vector<float> fill_tile(size_t tile, int rows) {
  std::vector<float> m(size_t(rows) * D);
  for (auto& x : m) x = float(std::rand() % 17 - 8) / 8.f;  // exact in fp32 sums
  for (int r = 0; r < rows; ++r)
    for (int chunk = 0; chunk < D / 8; ++chunk)
      for (int i = 0; i < 8; ++i) smem[tile + swz<D>(r, chunk * 8) + i] = m[size_t(r) * D + chunk * 8 + i];
  return m;
}

int failures = 0;
void expect(bool ok, const char* what, int a, int b, float got, float want) {
  if (!ok && failures++ < 10) std::printf("MISMATCH %s (%d, %d): got %g want %g\n", what, a, b, got, want);
}

// One CTA: 4 warps x MT x 16 rows of the row tile (A, ROWS x D) against a COLS x D tile (B, stored [n][k]),
// then the result (as P) times a COLS x D tile stored [k][n] (.trans) — the forward's two products.
template <int D, int COLS, int MT>
void run_case(const char* name) {
  constexpr int ROWS = 64 * MT;  // 4 warps x MT 16-row MMA tiles
  smem.assign(size_t(ROWS + 2 * COLS) * D, 0.f);
  const size_t tA = 0, tB = size_t(ROWS) * D, tV = tB + size_t(COLS) * D;
  const auto A = fill_tile<D>(tA, ROWS), Bm = fill_tile<D>(tB, COLS), V = fill_tile<D>(tV, COLS);
  uint32_t offA[32], offNK[32], offKN[32];
  for (int l = 0; l < 32; ++l) offA[l] = lane_off_a<D>(l), offNK[l] = lane_off_b_nk<D>(l), offKN[l] = lane_off_b_kn<D>(l);

  for (int w = 0; w < 4 * MT; ++w) {
    // m-tile (w % MT) of warp (w / MT): rows warp_row + 16 * mi as the forward kernel addresses them.
    const int warp_row = (w / MT) * 16 * MT + 16 * (w % MT);
    static float s[COLS / 8][32][4];
    for (auto& frag : s) for (auto& l : frag) for (float& x : l) x = 0.f;
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t addr[32];
      Pair a[32][4];
      for (int l = 0; l < 32; ++l) addr[l] = frag_addr<D>(uint32_t(tA * 2), warp_row, kk, offA[l]);
      ldmatrix_x4(a, addr, false);
      for (int nn = 0; nn < COLS / 16; ++nn) {
        Pair bf[32][4], b0[32][2], b1[32][2];
        for (int l = 0; l < 32; ++l) addr[l] = frag_addr<D>(uint32_t(tB * 2), nn * 16, kk, offNK[l]);
        ldmatrix_x4(bf, addr, false);
        for (int l = 0; l < 32; ++l) b0[l][0] = bf[l][0], b0[l][1] = bf[l][1], b1[l][0] = bf[l][2], b1[l][1] = bf[l][3];
        mma(s[2 * nn], a, b0);
        mma(s[2 * nn + 1], a, b1);
      }
    }
    // S against the product; keep the exact values for the P·V check.
    std::vector<float> S(16 * COLS);
    for (int j = 0; j < COLS / 8; ++j)
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          const int r = (l >> 2) + (e >= 2 ? 8 : 0), c = j * 8 + 2 * (l & 3) + (e & 1);
          float want = 0.f;
          for (int k = 0; k < D; ++k) want += A[size_t(warp_row + r) * D + k] * Bm[size_t(c) * D + k];
          expect(s[j][l][e] == want, name, warp_row + r, c, s[j][l][e], want);
          S[r * COLS + c] = s[j][l][e];
        }
    // O = S · V with A fragments built from the accumulators as the kernels pack them.
    static float o[D / 8][32][4];
    for (auto& frag : o) for (auto& l : frag) for (float& x : l) x = 0.f;
    for (int kk = 0; kk < COLS / 16; ++kk) {
      Pair a[32][4];
      for (int l = 0; l < 32; ++l) {
        a[l][0] = {s[2 * kk][l][0], s[2 * kk][l][1]};
        a[l][1] = {s[2 * kk][l][2], s[2 * kk][l][3]};
        a[l][2] = {s[2 * kk + 1][l][0], s[2 * kk + 1][l][1]};
        a[l][3] = {s[2 * kk + 1][l][2], s[2 * kk + 1][l][3]};
      }
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t addr[32];
        Pair bf[32][4], b0[32][2], b1[32][2];
        for (int l = 0; l < 32; ++l) addr[l] = frag_addr<D>(uint32_t(tV * 2), kk * 16, dd, offKN[l]);
        ldmatrix_x4(bf, addr, true);
        for (int l = 0; l < 32; ++l) b0[l][0] = bf[l][0], b0[l][1] = bf[l][1], b1[l][0] = bf[l][2], b1[l][1] = bf[l][3];
        mma(o[2 * dd], a, b0);
        mma(o[2 * dd + 1], a, b1);
      }
    }
    for (int j = 0; j < D / 8; ++j)
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e) {
          const int r = (l >> 2) + (e >= 2 ? 8 : 0), c = j * 8 + 2 * (l & 3) + (e & 1);
          float want = 0.f;
          for (int k = 0; k < COLS; ++k) want += S[r * COLS + k] * V[size_t(k) * D + c];
          expect(o[j][l][e] == want, name, warp_row + r, c, o[j][l][e], want);
        }
  }
  std::printf("%s: %s\n", name, failures ? "FAILED" : "ok");
}

}  // namespace

int main() {
  std::srand(1234);
  run_case<64, 64, 2>("head dim 64, 64-wide step, 2 m-tiles per warp (forward at d64)");
  run_case<64, 64, 1>("head dim 64, 64-wide step (dq, dk/dv at d64)");
  run_case<128, 64, 1>("head dim 128, 64-wide step (forward, dq at d128)");
  run_case<128, 32, 1>("head dim 128, 32-wide step (dk/dv at d128)");
  return failures ? 1 : 0;
}
