"""Per-tile bf16 (and fp32) GEMM on the CPU: our vdpbf16ps micro-kernel against torch's own tile GEMMs.

Issue 20 asks whether a well-kept library does the attention kernel's small bf16 GEMMs faster
than our micro-kernel. Torch's CPU flash attention calls one of two per tile:
``at::native::cpublas::brgemm`` (oneDNN's batch-reduce GEMM ukernel, B packed in the VNNI pair
layout) where ``cpublas::could_pack(bf16)`` holds (AMX machines), else ``cpublas::gemm`` (BLAS
layout, bf16 in, fp32 out). This script compiles a small C++ harness (``load_inline``) that
includes ``csrc/cpu/attention_cpu_avx512bf16.cpp`` and times, on one thread, interleaved, ours
and brgemm on the tile shapes the attention kernels use:

    Q·Kᵀ tile   M = BQ rows, N = BK keys, K = head dim       (BQ = 96, BK = 128)
    P·V  tile   M = BQ rows, N = head dim, K = BK keys

Each routine computes C (fp32, M×N, row-major) = A (bf16, M×K) · B (bf16, K×N) with B already in
its routine's packed layout (packing happens once per call in the attention kernels, so it is
not timed here). Results: ``bench/results/<device>/cpu_tile_gemm.json``, GFLOP/s per routine and
``speedup_vs_best_peer`` = brgemm time ÷ ours (> 1: ours faster). ``cpublas::gemm``'s bf16→fp32
overload is not exported from libtorch, so it cannot be timed from outside torch.

    python bench/cpu_tile_gemm.py            # needs avx512_bf16 (skips with the reason otherwise)
    python bench/cpu_tile_gemm.py --quick    # fewer repetitions
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

HARNESS = r"""
#include <torch/extension.h>
#include <ATen/native/CPUBlas.h>
#include <chrono>
#include <random>
#include "attention_cpu_avx512bf16.cpp"

using namespace fastformer::cpu_attn;
namespace blas = at::native::cpublas;

static uint16_t bf16_bits(float f) { at::BFloat16 b(f); return b.x; }

// Times ours() against brgemm() (interleaved rounds of `reps` calls, the minimum of each) and
// measures both against the exact product C2. C0: ours (row stride ldc0), C1: brgemm (N).
// Returns {ours_ns, brgemm_ns (or -1 when it throws), max |ours - exact|, max |brgemm - exact|}.
template <typename Ours, typename Brgemm>
std::vector<double> race(const Ours& ours, const Brgemm& brg, bool is_vnni, const std::vector<float>& C0,
                         int64_t ldc0, const std::vector<float>& C1, const std::vector<double>& C2, int64_t M,
                         int64_t N, int64_t reps, int64_t rounds) {
  bool have_brgemm = true;
  try { brg(); } catch (const std::exception&) { have_brgemm = false; }
  auto time = [&](auto&& fn) {
    auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < reps; ++r) fn();
    return std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / reps;
  };
  double best[2] = {1e30, 1e30};
  for (int64_t round = 0; round < rounds; ++round) {
    best[0] = std::min(best[0], time(ours));
    if (have_brgemm) best[1] = std::min(best[1], time(brg));
  }
  if (have_brgemm) blas::brgemm_release(is_vnni);
  ours();
  double d0 = 0, d1 = 0;
  for (int64_t i = 0; i < M; ++i) for (int64_t n = 0; n < N; ++n) {
    d0 = std::max(d0, std::abs((double)C0[i * ldc0 + n] - C2[i * N + n]));
    if (have_brgemm) d1 = std::max(d1, std::abs((double)C1[i * N + n] - C2[i * N + n]));
  }
  return {best[0], have_brgemm ? best[1] : -1.0, d0, d1};
}

// race()'s four numbers; exact = the products of the bf16-rounded inputs summed in double.
std::vector<double> compare(int64_t M, int64_t N, int64_t K, int64_t reps, int64_t rounds) {
  constexpr int64_t NR = avx512bf16::NR;
  const int64_t KP = (K + 1) / 2, Npad = (N + NR - 1) / NR * NR;
  std::mt19937 gen(0);
  std::normal_distribution<float> dist;
  std::vector<float> a(M * K), b(K * N);
  for (auto& x : a) x = dist(gen);
  for (auto& x : b) x = dist(gen);
  // A: row-major bf16 (M x 2*KP, zero pad) = pairs (M x KP words)
  std::vector<uint16_t> A(M * 2 * KP, 0);
  for (int64_t i = 0; i < M; ++i) for (int64_t k = 0; k < K; ++k) A[i * 2 * KP + k] = bf16_bits(a[i * K + k]);
  // ours: pair panels, panel p = B[:, p*NR:(p+1)*NR] as (KP, NR, 2)
  const int64_t panel = KP * 2 * NR;
  std::vector<uint16_t> Bp(panel * (Npad / NR), 0);
  for (int64_t k = 0; k < K; ++k) for (int64_t n = 0; n < N; ++n)
    Bp[(n / NR) * panel + (k / 2) * 2 * NR + (n % NR) * 2 + (k % 2)] = bf16_bits(b[k * N + n]);
  // brgemm: VNNI (KP, N, 2)
  std::vector<at::BFloat16> Bv(KP * N * 2, at::BFloat16(0.f));
  for (int64_t k = 0; k < K; ++k) for (int64_t n = 0; n < N; ++n)
    Bv[(k / 2) * N * 2 + n * 2 + (k % 2)].x = bf16_bits(b[k * N + n]);
  std::vector<float> C0(M * Npad), C1(M * N);
  std::vector<double> C2(M * N, 0.0);
  for (int64_t i = 0; i < M; ++i) for (int64_t k = 0; k < K; ++k) for (int64_t n = 0; n < N; ++n)
    C2[i * N + n] += (double)(float)at::BFloat16(a[i * K + k]) * (double)(float)at::BFloat16(b[k * N + n]);

  auto ours = [&] {
    avx512bf16::gemm_bf16(M, N, KP, reinterpret_cast<const uint32_t*>(A.data()), KP, 1, Bp.data(), panel,
                          C0.data(), Npad, false);
  };
  auto brg = [&] {
    blas::brgemm(M, N, 2 * KP, 2 * KP, N, N, false, reinterpret_cast<const at::BFloat16*>(A.data()), Bv.data(),
                 C1.data(), true);
  };
  return race(ours, brg, /*is_vnni=*/true, C0, Npad, C1, C2, M, N, reps, rounds);
}

// The same for fp32 (the kernels' fp32 path, AVX-512 FMAs; B in NR-column panels).
std::vector<double> compare_f32(int64_t M, int64_t N, int64_t K, int64_t reps, int64_t rounds) {
  constexpr int64_t NR = avx512bf16::NR;
  const int64_t Npad = (N + NR - 1) / NR * NR;
  std::mt19937 gen(0);
  std::normal_distribution<float> dist;
  std::vector<float> A(M * K), B(K * N), Bp(K * Npad, 0.f), C0(M * Npad), C1(M * N);
  for (auto& x : A) x = dist(gen);
  for (auto& x : B) x = dist(gen);
  for (int64_t k = 0; k < K; ++k) for (int64_t n = 0; n < N; ++n) Bp[(n / NR) * K * NR + k * NR + n % NR] = B[k * N + n];
  std::vector<double> C2(M * N, 0.0);
  for (int64_t i = 0; i < M; ++i) for (int64_t k = 0; k < K; ++k) for (int64_t n = 0; n < N; ++n)
    C2[i * N + n] += (double)A[i * K + k] * (double)B[k * N + n];
  auto ours = [&] { avx512bf16::gemm(M, N, K, A.data(), K, 1, Bp.data(), K * NR, C0.data(), Npad, false); };
  auto brg = [&] { blas::brgemm(M, N, K, K, N, N, false, A.data(), B.data(), C1.data(), false); };
  return race(ours, brg, /*is_vnni=*/false, C0, Npad, C1, C2, M, N, reps, rounds);
}
"""


def build():
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        "ff_tile_gemm", cpp_sources=HARNESS, functions=["compare", "compare_f32"],
        extra_include_paths=[str(REPO / "csrc" / "cpu")], extra_cflags=["-O3", "-std=c++17"], verbose=False)


def shapes(quick: bool):
    rows = []
    for d in (64, 128):
        rows.append(("QK^T", 96, 128, d))
        rows.append(("PV", 96, d, 128))
    if not quick:
        rows.append(("QK^T", 12, 128, 64))  # one micro-kernel row block (decode-like)
        rows.append(("QK^T", 96, 512, 64))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu", choices=["cpu", "auto"], help="CPU only (suite compatibility)")
    args = p.parse_args(argv)
    env = common.environment("cpu")
    flags = common.cpu_flags()
    if "avx512_bf16" not in flags:
        path = common.write_results("cpu_tile_gemm", {"results": [], "skipped": "no avx512_bf16 on this CPU"}, env)
        print(f"skipped: no avx512_bf16 on this CPU (flags: {','.join(flags)}); wrote {path}")
        return 0
    torch.set_num_threads(1)
    mod = build()
    reps, rounds = (200, 5) if args.quick else (2000, 9)
    print(f"# per-tile bf16 GEMM, 1 thread, {rounds} interleaved rounds x {reps} calls, min per routine; "
          f"{common.cpu_model()}")
    rows = []
    for dtype, (name, M, N, K) in [(dt, sh) for dt in ("bfloat16", "float32") for sh in shapes(args.quick)]:
        ours, brg, d_ours, d_brg = (mod.compare if dtype == "bfloat16" else mod.compare_f32)(M, N, K, reps, rounds)
        flop = 2.0 * M * N * K
        cfg = f"{dtype} {name} M{M} N{N} K{K}"
        rows.append(dict(provider="ff-microkernel", config=cfg, M=M, N=N, K=K, time_ns=ours, gflops=flop / ours,
                         max_abs_err=d_ours, **(dict(speedup_vs_best_peer=brg / ours, best_peer="torch-brgemm")
                                               if brg > 0 else {})))
        if brg > 0:
            rows.append(dict(provider="torch-brgemm", config=cfg, M=M, N=N, K=K, time_ns=brg, gflops=flop / brg,
                             max_abs_err=d_brg))
        print(f"{cfg:<31} ours {flop / ours:6.1f} GFLOP/s  brgemm "
              f"{(flop / brg if brg > 0 else float('nan')):6.1f}  "
              + (f"ours ÷ brgemm time x{ours / brg:.2f}" if brg > 0 else "brgemm unavailable")
              + f"  max|err| vs exact: ours {d_ours:.1e}, brgemm {d_brg:.1e}")
    path = common.write_results("cpu_tile_gemm" + ("-quick" if args.quick else ""), {"results": rows}, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
