"""Attention variants (issue 18): sliding window, ALiBi, soft-cap, paged KV cache.

Three measurements, on the CPU backend here and the Triton backend on a GPU:

* ``window``: forward (and forward+backward) time of causal sliding-window
  attention at a fixed window ``W`` (default 256) as ``L`` grows; with tile
  skipping the time per query (``time / L``) stays flat: cost ~ L·W, not L².
  The dense causal time at the same ``L`` is measured alongside (up to
  ``--dense-max-len``) to show the difference.
* ``overhead``: ALiBi, soft-cap and both vs plain causal attention, timed in
  paired, interleaved rounds (plain, variant, plain, variant, …): the median
  per-round ratio, robust to a loaded machine.
* ``paged_decode``: ``decode_attention`` over a paged cache (``block_table``)
  vs the same cache contiguous, paired rounds. On CPU this times the PyTorch
  path (a gather of the pages; there is no C++ decode kernel), on a GPU the
  Triton split-K kernel.

The JSON records the machine's load (``os.getloadavg`` before and after) and
noise (:func:`common.machine_noise`): on a shared machine read the paired
ratios, not the absolute times.

    python bench/bench_variants.py                 # CPU, full set
    python bench/bench_variants.py --quick         # seconds
    python bench/bench_variants.py --device cuda   # (bench/gpu.sh via suite.py)

Writes ``bench/results/<device-slug>/variants[-quick].json``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastformer  # noqa: E402


def _attn(backend, **variant):
    def fn(q, k, v):
        return fastformer.attention(q, k, v, is_causal=True, backend=backend, **variant)
    return fn


def _step(fn, q, k, v, mode, dout):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def run():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    return run


def _inputs(B, H, L, D, dtype, device, grad):
    q, k, v = (torch.randn(B, H, L, D, dtype=dtype, device=device, requires_grad=grad) for _ in range(3))
    return q, k, v, torch.randn(B, H, L, D, dtype=dtype, device=device)


def window_scaling(args, device, backend, dtype):
    rows = []
    W = args.window
    for mode in args.modes:
        for L in args.seqlens:
            q, k, v, dout = _inputs(1, args.heads, L, args.head_dim, dtype, device, mode != "fwd")
            run = _step(_attn(backend, window_size=(W - 1, 0)), q, k, v, mode, dout)
            t = common.time_fn(run, device, quick=args.quick)
            pairs = sum(min(i + 1, W) for i in range(L))  # visible (query, key) pairs
            row = {"provider": f"fastformer-{backend}", "section": "window", "mode": mode, "seqlen": L, "window": W,
                   "heads": args.heads, "head_dim": args.head_dim, "dtype": str(dtype).split(".")[-1],
                   "time_ms": t * 1e3, "us_per_query": t * 1e6 / L,
                   "gflops": (4 if mode == "fwd" else 14) * pairs * args.heads * args.head_dim / t / 1e9}
            if L <= args.dense_max_len:
                dense = _step(_attn(backend), q, k, v, mode, dout)
                td = common.time_fn(dense, device, quick=args.quick)
                row["dense_causal_ms"] = td * 1e3
                row["speedup_vs_dense_causal"] = td / t
            rows.append(row)
            print(f"window {mode:7s} L={L:6d} W={W}: {t * 1e3:9.2f} ms ({t * 1e6 / L:.2f} us/query)"
                  + (f", dense causal {row['dense_causal_ms']:.2f} ms" if "dense_causal_ms" in row else ""),
                  flush=True)
    # Growth exponent: least-squares slope of log(time) vs log(L) over all L (1 = linear, 2 = quadratic).
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) >= 2:
            xs = [math.log(r["seqlen"]) for r in mine]
            ys = [math.log(r["time_ms"]) for r in mine]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            exponent = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            dense = [r for r in mine if "dense_causal_ms" in r]
            for r in mine:
                r["growth_exponent"] = exponent
            print(f"window {mode}: time grows as L^{exponent:.2f} over L={mine[0]['seqlen']}..{mine[-1]['seqlen']}"
                  + (f" (dense causal: L^{math.log(dense[-1]['dense_causal_ms'] / dense[0]['dense_causal_ms']) / math.log(dense[-1]['seqlen'] / dense[0]['seqlen']):.2f})"
                     if len(dense) >= 2 else ""), flush=True)
    return rows


def overhead(args, device, backend, dtype):
    rows = []
    L = args.overhead_len
    slopes = torch.rand(args.heads, device=device) * 0.5
    variants = {"alibi": dict(alibi_slopes=slopes), "softcap": dict(softcap=30.0),
                "alibi+softcap": dict(alibi_slopes=slopes, softcap=30.0)}
    for mode in args.modes:
        q, k, v, dout = _inputs(1, args.heads, L, args.head_dim, dtype, device, mode != "fwd")
        plain = _step(_attn(backend), q, k, v, mode, dout)
        for name, var in variants.items():
            run = _step(_attn(backend, **var), q, k, v, mode, dout)
            pair = common.paired_ratio(run, plain, device, rounds=args.rounds, quick=args.quick)
            rows.append({"provider": f"fastformer-{backend}", "section": "overhead", "variant": name, "mode": mode,
                         "seqlen": L, "heads": args.heads, "head_dim": args.head_dim,
                         "dtype": str(dtype).split(".")[-1], "time_ms": pair["a_s"] * 1e3,
                         "plain_ms": pair["b_s"] * 1e3, "overhead_vs_plain": pair["ratio_a_over_b"] - 1.0,
                         "rounds": 2 if args.quick else args.rounds})
            print(f"overhead {mode:7s} {name:14s} L={L}: {pair['a_s'] * 1e3:8.2f} ms vs plain {pair['b_s'] * 1e3:8.2f} ms"
                  f" -> {100 * (pair['ratio_a_over_b'] - 1):+.1f}% (median of paired rounds)", flush=True)
    return rows


def paged_decode(args, device, dtype):
    rows = []
    B, Hkv, G, D, S = args.decode_batch, args.decode_kv_heads, 4, args.head_dim, args.decode_len
    for page in args.page_sizes:
        blocks_per_seq = S // page
        k = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
        v = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
        # The same cache, paged: sequence b's pages scattered in a shared pool (a random permutation).
        perm = torch.randperm(B * blocks_per_seq, device=device)
        table = perm.view(B, blocks_per_seq).to(torch.int32)
        pool_k = torch.empty(B * blocks_per_seq, page, Hkv, D, dtype=dtype, device=device)
        pool_v = torch.empty_like(pool_k)
        pool_k[perm] = k.view(B, Hkv, blocks_per_seq, page, D).permute(0, 2, 3, 1, 4).reshape(-1, page, Hkv, D)
        pool_v[perm] = v.view(B, Hkv, blocks_per_seq, page, D).permute(0, 2, 3, 1, 4).reshape(-1, page, Hkv, D)
        q = torch.randn(B, Hkv * G, 1, D, dtype=dtype, device=device)
        lens = torch.full((B,), S, dtype=torch.int32, device=device)

        def contiguous():
            return fastformer.decode_attention(q, k, v, lens)

        def paged():
            return fastformer.decode_attention(q, pool_k, pool_v, lens, block_table=table)

        err = (paged().double() - contiguous().double()).abs().max().item()
        pair = common.paired_ratio(paged, contiguous, device, rounds=args.rounds, quick=args.quick)
        rows.append({"provider": "fastformer-decode-" + ("triton" if device == "cuda" else "torch"),
                     "section": "paged_decode", "batch": B, "kv_heads": Hkv, "q_heads": Hkv * G, "cache_len": S,
                     "page_size": page, "head_dim": D, "dtype": str(dtype).split(".")[-1],
                     "time_ms": pair["a_s"] * 1e3, "contiguous_ms": pair["b_s"] * 1e3,
                     "paged_over_contiguous": pair["ratio_a_over_b"], "max_abs_diff": err})
        print(f"paged decode page={page:4d} S={S}: {pair['a_s'] * 1e3:.3f} ms vs contiguous {pair['b_s'] * 1e3:.3f} ms"
              f" (x{pair['ratio_a_over_b']:.2f}); max |diff| {err:.1e}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sections", nargs="+", default=["window", "overhead", "paged_decode"],
                   choices=["window", "overhead", "paged_decode"])
    p.add_argument("--modes", nargs="+", default=None, choices=["fwd", "fwd_bwd"])
    p.add_argument("--seqlens", nargs="+", type=int, default=None)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--dense-max-len", type=int, default=None, help="also time dense causal up to this L")
    p.add_argument("--overhead-len", type=int, default=None)
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="default bfloat16 on a GPU, float32 on CPU; another dtype writes variants-<dtype>.json")
    p.add_argument("--rounds", type=int, default=None, help="paired rounds (default 15 on CPU, 7 on a GPU)")
    p.add_argument("--page-sizes", nargs="+", type=int, default=[16, 256])
    p.add_argument("--decode-len", type=int, default=None)
    p.add_argument("--decode-batch", type=int, default=None)
    p.add_argument("--decode-kv-heads", type=int, default=8)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    gpu = device == "cuda"
    backend = "triton" if gpu else "cpu"
    default_dtype = torch.bfloat16 if gpu else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    name = "variants" + ("" if dtype == default_dtype else f"-{args.dtype}") + ("-quick" if args.quick else "")
    if args.quick:
        args.seqlens = args.seqlens or [256, 512]
        args.window = min(args.window, 64)
        args.modes = args.modes or ["fwd"]
    args.modes = args.modes or ["fwd", "fwd_bwd"]
    args.seqlens = args.seqlens or ([1024, 2048, 4096, 8192, 16384] if gpu else [1024, 2048, 4096, 8192])
    args.dense_max_len = args.dense_max_len if args.dense_max_len is not None else (16384 if gpu else 4096)
    args.overhead_len = args.overhead_len or (256 if args.quick else (4096 if gpu else 2048))
    args.heads = args.heads or (16 if gpu else 4)
    args.rounds = args.rounds or (7 if gpu else 15)  # the shared CPUs here: more rounds for a stable median
    args.decode_len = args.decode_len or (512 if args.quick else (8192 if gpu else 4096))
    args.decode_batch = args.decode_batch or (2 if args.quick else (16 if gpu else 4))
    env = common.environment(device)
    info = fastformer.backends()[backend]
    if not info["available"]:
        path = common.write_results(name, {"results": [], "skipped": f"backend {backend} unavailable: {info['reason']}"}, env)
        print(f"skipped: backend {backend} unavailable ({info['reason']}); wrote {path}")
        return 0
    load_before = os.getloadavg()
    noise = common.machine_noise(device, args.quick)
    print(f"# load average {load_before[0]:.2f} ({os.cpu_count()} CPUs); {common.describe_noise(noise)[2:]}", flush=True)
    rows = []
    if "window" in args.sections:
        rows += window_scaling(args, device, backend, dtype)
    if "overhead" in args.sections:
        rows += overhead(args, device, backend, dtype)
    if "paged_decode" in args.sections:
        rows += paged_decode(args, device, dtype)
    # One set of columns for every section (bench/report.py takes the table's header from the first row).
    columns = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in columns} for r in rows]
    path = common.write_results(name, {"results": rows, "args": vars(args), "threads": torch.get_num_threads(),
                                 "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                 "cpu_count": os.cpu_count(), "machine_noise": noise}, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
