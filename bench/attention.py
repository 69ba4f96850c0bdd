"""The main benchmark: fastformer's attention backends against naive attention and torch.

For each configuration (sequence length, causal or not, head dim, dtype) and
each available provider it reports time, TFLOP/s (GFLOP/s on CPU), peak
memory and the max error against a float64 reference, prints a table, and
writes ``bench/results/<device>/attention[-quick].json``.

    python bench/attention.py                # this machine's default set
    python bench/attention.py --quick        # seconds; CI smoke
    python bench/attention.py --device cuda  # the GPU set (bench/gpu.sh)

Providers: every available fastformer backend (``ff-naive``, ``ff-reference``,
``ff-cpu``, ``ff-triton``, ``ff-cuda``) and, on CUDA, torch's SDPA with each of
its backends forced (flash, efficient, cudnn, math) and FlexAttention.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastformer  # noqa: E402


@dataclass(frozen=True)
class Config:
    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str
    mode: str  # fwd | fwd_bwd | bwd

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def label(self) -> str:
        c = "causal" if self.causal else "full"
        return f"{self.mode} {self.dtype} B{self.batch} H{self.heads} L{self.seqlen} d{self.head_dim} {c}"


def default_configs(device: str, quick: bool) -> List[Config]:
    """The fixed configuration sets (no cherry-picking: change them here, in code)."""
    if quick:
        return [Config(1, 2, L, 32, c, "float32", "fwd") for L in (128, 256) for c in (False, True)]
    if device == "cpu":
        return [
            Config(1, 8, L, 64, c, "float32", m)
            for m in ("fwd",)
            for c in (False, True)
            for L in (256, 512, 1024, 2048)
        ]
    # GPU: ~16k tokens per batch (B = 16384 / L), H·d = 2048, bf16; sized so the whole
    # set (with Triton autotuning and FlexAttention compiles) fits one device call.
    # Most important first: a run cut short by its time limit keeps what it measured.
    configs = [Config(16384 // L, 16, L, 128, c, "bfloat16", "fwd") for c in (False, True) for L in (1024, 4096, 16384)]
    configs += [Config(16384 // L, 16, L, 128, c, "bfloat16", "fwd_bwd") for c in (False, True) for L in (1024, 4096, 16384)]
    configs += [Config(16384 // L, 32, L, 64, c, "bfloat16", "fwd") for c in (False, True) for L in (1024, 4096, 16384)]
    configs += [Config(4, 16, 4096, 128, c, "float16", "fwd") for c in (False, True)]
    configs += [Config(1, 16, 65536, 128, c, "bfloat16", "fwd") for c in (False, True)]
    return configs


# ----------------------------------------------------------------------------- providers

def _torch_sdpa(backend_name: Optional[str]):
    def run(q, k, v, causal):
        if backend_name is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(getattr(SDPBackend, backend_name)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _flex():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    compiled = torch.compile(flex_attention, dynamic=False)
    masks: Dict[tuple, object] = {}

    def run(q, k, v, causal):
        if not causal:
            return compiled(q, k, v)
        key = (q.shape[-2], k.shape[-2])
        if key not in masks:
            masks[key] = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, key[0], key[1], device=q.device)
        return compiled(q, k, v, block_mask=masks[key])

    return run


def _fastformer(name: str):
    def run(q, k, v, causal):
        return fastformer.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=name)

    return run


def providers(device: str) -> Dict[str, Callable]:
    """Every provider that can run on ``device`` here, by display name."""
    out: Dict[str, Callable] = {}
    report = fastformer.backends()
    for name in ("naive", "reference", "cpu", "triton", "cuda"):
        if not report[name]["available"]:
            continue
        if name == "triton" and device != "cuda":
            continue  # the interpreter is a test vehicle, not a benchmark subject
        out[f"ff-{name}"] = _fastformer(name)
    if device == "cuda":
        for b in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            out[f"torch-{b.split('_')[0].lower()}"] = _torch_sdpa(b)
        try:
            out["flex"] = _flex()
        except Exception as exc:  # older torch
            print(f"FlexAttention unavailable: {exc}")
    else:
        out["torch-sdpa"] = _torch_sdpa(None)
    return out


PEERS_PREFIX = ("torch-", "flex")


# ----------------------------------------------------------------------------- measurement

def _inputs(cfg: Config, device: str, requires_grad: bool):
    shape = (cfg.batch, cfg.heads, cfg.seqlen, cfg.head_dim)
    return [torch.randn(shape, device=device, dtype=cfg.torch_dtype, requires_grad=requires_grad) for _ in range(3)]


def _reference64(q, k, v, causal):
    with torch.no_grad():
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)


def measure(cfg: Config, name: str, fn: Callable, device: str, quick: bool, ref: Optional[torch.Tensor], inputs,
            noise: float = 0.0):
    q, k, v = inputs
    grad = cfg.mode != "fwd"
    row = {"provider": name, **asdict(cfg)}
    try:
        if cfg.mode == "fwd":
            def step():
                with torch.no_grad():
                    return fn(q, k, v, cfg.causal)
        else:
            dout = torch.randn(q.shape[:-1] + (v.shape[-1],), device=device, dtype=q.dtype)
            if cfg.mode == "fwd_bwd":
                def step():
                    out = fn(q, k, v, cfg.causal)
                    return torch.autograd.grad(out, (q, k, v), dout)
            else:
                out_saved = fn(q, k, v, cfg.causal)

                def step():
                    return torch.autograd.grad(out_saved, (q, k, v), dout, retain_graph=True)
        step()  # compile / autotune / warm caches before timing and memory
        common.synchronize(device)
        row["peak_bytes"] = common.peak_memory(step, device)
        timing = common.time_stats(step, device, quick=quick)
        t = timing.median_s
        row["spread"] = timing.spread
        row["repeats"] = timing.reps
        if common.is_noisy(timing.spread, noise):
            row["noisy"] = True
        flops = common.attention_flops(cfg.batch, cfg.heads, cfg.seqlen, cfg.seqlen, cfg.head_dim,
                                       causal=cfg.causal, mode=cfg.mode)
        row["time_ms"] = t * 1e3
        row["tflops"] = flops / t / 1e12
        if ref is not None:
            with torch.no_grad():
                out = fn(q, k, v, cfg.causal)
            row["max_error"] = (out.double() - ref).abs().max().item()
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        row["error"] = f"out of memory: {str(exc).splitlines()[0][:120]}"
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        if grad:
            for t_ in inputs:
                t_.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def add_ratios(rows: List[dict]) -> None:
    """Per configuration: each provider's speed-up over naive and over the best torch peer."""
    by_cfg: Dict[tuple, List[dict]] = {}
    for r in rows:
        by_cfg.setdefault(tuple(r[k] for k in ("batch", "heads", "seqlen", "head_dim", "causal", "dtype", "mode")), []).append(r)
    for group in by_cfg.values():
        ok = [r for r in group if "time_ms" in r]
        naive = next((r["time_ms"] for r in ok if r["provider"] == "ff-naive"), None)
        peers = [r for r in ok if r["provider"].startswith(PEERS_PREFIX)]
        best = min(peers, key=lambda r: r["time_ms"]) if peers else None
        for r in ok:
            if naive:
                r["speedup_vs_naive"] = naive / r["time_ms"]
            if best:
                r["best_peer"] = best["provider"]
                r["speedup_vs_best_peer"] = best["time_ms"] / r["time_ms"]


def format_row(r: dict, device: str) -> str:
    if "error" in r:
        return f"  {r['provider']:<16} {r['error']}"
    unit, scale = ("TFLOP/s", 1.0) if device == "cuda" else ("GFLOP/s", 1e3)
    mem = f"{r['peak_bytes'] / 2**20:9.1f} MiB" if r.get("peak_bytes") is not None else "        n/a"
    err = f"{r['max_error']:.2e}" if r.get("max_error") is not None else "n/a"
    extra = ""
    if "speedup_vs_naive" in r:
        extra += f"  x{r['speedup_vs_naive']:.2f} vs naive"
    if "speedup_vs_best_peer" in r:
        extra += f"  x{r['speedup_vs_best_peer']:.2f} vs {r['best_peer']}"
    if r.get("noisy"):
        extra += f"  NOISY (repeats spread {r['spread']:.0%})"
    return f"  {r['provider']:<16} {r['time_ms']:10.3f} ms {r['tflops'] * scale:9.2f} {unit} {mem}  err {err}{extra}"


def run(device: str, quick: bool, only: Optional[List[str]] = None) -> dict:
    env = common.environment(device)
    provs = providers(device)
    if only:
        provs = {k: v for k, v in provs.items() if k in only}
    configs = default_configs(device, quick)
    print(f"# attention benchmark on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
          f"flags {','.join(env['cpu_flags'])}); providers: {', '.join(provs)}", flush=True)
    noise = common.machine_noise(device, quick)
    print(common.describe_noise(noise), flush=True)
    ceil, spreads = common.measure_ceilings(device, quick=quick)
    print(common.describe_ceilings(ceil, spreads, noise), flush=True)
    rows: List[dict] = []
    start = time.perf_counter()
    for i, cfg in enumerate(configs):
        print(f"[{i + 1}/{len(configs)}, {time.perf_counter() - start:.0f} s] {cfg.label()}", flush=True)
        long = cfg.seqlen > 16384
        inputs = _inputs(cfg, device, requires_grad=cfg.mode != "fwd")
        ref = None
        if cfg.mode == "fwd" and cfg.batch * cfg.heads * cfg.seqlen ** 2 <= 2**27:
            ref = _reference64(*inputs, cfg.causal)
        group = []
        for name, fn in provs.items():
            if long and name not in ("ff-triton", "ff-cuda", "torch-flash", "torch-cudnn"):
                continue  # L = 65536 shows what runs at all; naive/math would need tens of GB
            row = measure(cfg, name, fn, device, quick, ref, inputs, noise)
            group.append(row)
        add_ratios(group)
        for row in group:
            print(format_row(row, device), flush=True)
        rows.extend(group)
        del inputs, ref
        # Rewritten after every configuration, so a run stopped by its time limit keeps its results.
        payload = {"ceilings": ceil, "ceilings_spread": spreads, "noise": noise, "providers": list(provs),
                   "results": rows, "complete": i + 1 == len(configs)}
        path = common.write_results("attention-quick" if quick else "attention", payload, env)
    noisy = sum(bool(r.get("noisy")) for r in rows)
    if noisy:
        print(f"# {noisy} of {len(rows)} rows NOISY: their repeats disagree beyond the machine's noise; rerun on a quieter machine")
    print(f"# {len(configs)} configurations in {time.perf_counter() - start:.0f} s; {common.where_results_went(path)}")
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny set for CI smoke")
    p.add_argument("--providers", nargs="*", help="restrict to these providers")
    args = p.parse_args(argv)
    common.steady_cpu_allocator()
    run(common.pick_device(args.device), args.quick, args.providers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
