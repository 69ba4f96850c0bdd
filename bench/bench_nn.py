"""fastformer.nn modules against torch.nn's, side by side in one run.

For ``TransformerEncoderLayer`` and ``MultiheadAttention`` (self-attention,
``batch_first=True``, even head count — so torch's native fast path is eligible
in eval) it times eval (forward under ``torch.no_grad``, where torch takes its
fused ``_transformer_encoder_layer_fwd`` / ``_native_multi_head_attention``
path) and train (forward + backward), ours and torch's interleaved
(``common.paired_ratio``), and writes ``bench/results/<device>/nn[-quick].json``.

    python bench/bench_nn.py                 # CPU: fp32, 2 threads, d_model 256/512, seq 256-1024
    python bench/bench_nn.py --quick         # seconds; CI smoke
    python bench/bench_nn.py --device cuda   # GPU: bf16, d_model 768/1024, seq 512-4096 (bench/gpu.sh)

Rows: ``provider`` ``fastformer.nn`` / ``torch.nn`` with ``time_ms``; ours also carries
``speedup_vs_best_peer`` = torch time / ours (> 1: ours faster; median of paired rounds).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import fastformer  # noqa: E402
import fastformer.nn as ffnn  # noqa: E402
from fastformer.ops.attention.problem import validate_attention_inputs  # noqa: E402
from fastformer.ops.attention.registry import select_backend  # noqa: E402


@dataclass(frozen=True)
class Config:
    module: str  # encoder_layer | mha | mha_weights (need_weights=True, torch's default)
    d_model: int
    heads: int
    batch: int
    seqlen: int
    dtype: str
    mode: str  # eval | train

    def label(self) -> str:
        return f"{self.module:<13} {self.mode:<5} {self.dtype} B{self.batch} L{self.seqlen} d{self.d_model} H{self.heads}"


def default_configs(device: str, quick: bool) -> List[Config]:
    """Fixed sets (change them here, in code). About 1-8k tokens per batch: B = tokens // L."""
    if quick:
        return [Config(m, 64, 4, 2, 64, "float32", mode) for m in ("encoder_layer", "mha") for mode in ("eval", "train")]
    configs = []
    if device == "cpu":
        # Shortest and longest of the 256-1024 range only: the 2 shared cores make each
        # configuration cost ~1 minute of paired runs.
        for d in (256, 512):
            for L in (256, 1024):
                for mode in ("eval", "train"):
                    for m in ("encoder_layer", "mha"):
                        configs.append(Config(m, d, d // 64, max(1, 1024 // L), L, "float32", mode))
                configs.append(Config("mha_weights", d, d // 64, max(1, 1024 // L), L, "float32", "eval"))
        return configs
    # GPU: 8k tokens per batch, so the GEMM shapes (and their autotuning) repeat across L;
    # three lengths keep the set inside its suite time limit with Triton autotuning.
    for d in (768, 1024):
        for L in (512, 1024, 4096):
            for mode in ("eval", "train"):
                for m in ("encoder_layer", "mha"):
                    configs.append(Config(m, d, d // 64, max(1, 8192 // L), L, "bfloat16", mode))
    return configs


def build(cfg: Config, device: str) -> Tuple[nn.Module, nn.Module, torch.Tensor]:
    dtype = getattr(torch, cfg.dtype)
    kw = dict(device=device, dtype=dtype)
    if cfg.module == "encoder_layer":
        # torch's defaults (dim_feedforward 4·d, dropout 0.1, relu), batch_first for its fast path.
        ref = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, batch_first=True, **kw)
        ours = ffnn.TransformerEncoderLayer(cfg.d_model, cfg.heads, 4 * cfg.d_model, batch_first=True, **kw)
    else:
        ref = nn.MultiheadAttention(cfg.d_model, cfg.heads, batch_first=True, **kw)
        ours = ffnn.MultiheadAttention(cfg.d_model, cfg.heads, batch_first=True, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(cfg.batch, cfg.seqlen, cfg.d_model, device=device, dtype=dtype)
    return ref, ours, x


def step_fn(cfg: Config, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    module.train(cfg.mode == "train")
    need_weights = cfg.module == "mha_weights"

    def forward(inp):
        if cfg.module == "encoder_layer":
            return module(inp)
        return module(inp, inp, inp, need_weights=need_weights)[0]

    if cfg.mode == "eval":
        def run():
            with torch.no_grad():
                return forward(x)
        return run

    xg = x.detach().requires_grad_(True)

    def run_train():
        module.zero_grad(set_to_none=True)
        out = forward(xg)
        out.backward(torch.ones_like(out))
    return run_train


def attention_backend_used(cfg: Config, device: str) -> str:
    """Which fastformer attention backend the module's attention call dispatches to."""
    dtype = getattr(torch, cfg.dtype)
    q = torch.empty(cfg.batch, cfg.heads, cfg.seqlen, cfg.d_model // cfg.heads, device=device, dtype=dtype)
    return select_backend(validate_attention_inputs(q, q, q, dropout_p=0.1 if cfg.mode == "train" else 0.0)).name


def run(device: str, quick: bool, attention_backend: str = "auto") -> dict:
    if device == "cpu":
        torch.set_num_threads(2)
    env = common.environment(device)
    configs = default_configs(device, quick)
    print(f"# nn benchmark on {env['device']} (torch {env['torch']}, flags {','.join(env['cpu_flags'])}); "
          f"speedup = torch.nn / fastformer.nn", flush=True)
    rows = []
    for i, cfg in enumerate(configs):
        ref, ours, x = build(cfg, device)
        base = asdict(cfg)
        try:
            with fastformer.use_backend(attention_backend):
                paired = common.paired_ratio(step_fn(cfg, ours, x), step_fn(cfg, ref, x), device,
                                             rounds=3 if device == "cpu" else 5, quick=quick)
                used = attention_backend_used(cfg, device)
            speedup = 1.0 / paired["ratio_a_over_b"]  # median of the paired per-round ratios
            rows.append({**base, "provider": "fastformer.nn", "time_ms": paired["a_s"] * 1e3, "best_peer": "torch.nn",
                         "speedup_vs_best_peer": speedup, "attention_backend": used})
            rows.append({**base, "provider": "torch.nn", "time_ms": paired["b_s"] * 1e3, "attention_backend": "torch"})
            print(f"[{i + 1}/{len(configs)}] {cfg.label()}  ours {paired['a_s'] * 1e3:9.2f} ms  torch "
                  f"{paired['b_s'] * 1e3:9.2f} ms  x{speedup:.2f}  (attention: {used})", flush=True)
        except Exception as exc:  # one failing config must not sink the rest
            rows.append({**base, "provider": "fastformer.nn", "error": f"{type(exc).__name__}: {exc}"})
            print(f"[{i + 1}/{len(configs)}] {cfg.label()}  ERROR {rows[-1]['error']}", flush=True)
        del ref, ours, x
    payload = {"backends": fastformer.backends(), "attention_backend_requested": attention_backend, "results": rows}
    path = common.write_results("nn-quick" if quick else "nn", payload, env)
    print(f"# wrote {path}")
    return payload


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny set for CI smoke")
    p.add_argument("--attention-backend", default="auto", help="fastformer attention backend inside our modules "
                   "(default: auto, i.e. what users get)")
    args = p.parse_args(argv)
    run(common.pick_device(args.device), args.quick, args.attention_backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
