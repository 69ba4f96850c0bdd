"""fastformer.models against the same architectures in transformers (and timm), side by side.

CPU (fp32): a small GPT (6 layers, d 384, 6 heads, seq 256, char vocab — nanoGPT's
shakespeare-char shape) — one training step (forward + backward + AdamW) and greedy
generation of 256 new tokens with the KV cache — against GPT2LMHeadModel holding
the same weights with ``attn_implementation="sdpa"`` and ``generate(do_sample=False)``.
GPU (bf16): GPT-2 small (124M) training tokens/s and generation at batch 1 and 32
vs transformers; ViT-B/16 inference and training vs timm (when importable).

Each pair runs interleaved (``paired_wall``: one call each per round, medians); rows carry ``time_ms`` and,
for ours, ``speedup_vs_best_peer`` = peer time / ours (> 1: ours faster).

    python bench/bench_models.py                 # CPU set (a few minutes on 2 cores)
    python bench/bench_models.py --quick         # seconds; CI smoke
    python bench/bench_models.py --device cuda   # GPU set (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from fastformer.models import GPT, GPTConfig, ViT  # noqa: E402


def paired_wall(fa: Callable, fb: Callable, device: str, rounds: int) -> Dict[str, float]:
    """One call of a then one of b per round, wall-clock with device syncs; medians.

    A model step or a whole generation is long (ms to s), so single calls time well and
    the cost stays bounded (``common.paired_ratio``'s repeat-until-stable loop would run a
    multi-second generate dozens of times)."""
    import statistics
    import time

    fa(), fb()  # warm-up (allocator, autotuning, lazy imports)
    ta, tb, ratios = [], [], []
    for _ in range(rounds):
        for fn, acc in ((fa, ta), (fb, tb)):
            common.synchronize(device)
            t0 = time.perf_counter()
            fn()
            common.synchronize(device)
            acc.append(time.perf_counter() - t0)
        ratios.append(ta[-1] / tb[-1])
    return {"a_s": statistics.median(ta), "b_s": statistics.median(tb), "ratio_a_over_b": statistics.median(ratios)}


def _hf_sdpa(ours: GPT):
    hf = ours.to_hf()
    hf.config._attn_implementation = "sdpa"  # the same switch attn_implementation="sdpa" sets
    return hf


def _train_step(model, opt, ids, tgt, hf: bool, dtype):
    def step():
        with torch.autocast(ids.device.type, dtype=dtype, enabled=dtype != torch.float32):
            if hf:
                loss = model(ids, labels=tgt).loss
            else:
                loss = model(ids, tgt)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def gpt_rows(device: str, quick: bool, cfg: GPTConfig, batch: int, seqlen: int, gen_batches: List[int],
             prompt: int, new_tokens: int, dtype: torch.dtype, rounds: int) -> List[Dict]:
    torch.manual_seed(0)
    ours = GPT(cfg).to(device)
    theirs = _hf_sdpa(ours).to(device)
    rows = []
    shape = f"L{cfg.n_layer} d{cfg.n_embd} H{cfg.n_head} V{cfg.vocab_size}"

    # training: tokens/s of forward + backward + AdamW
    ids = torch.randint(0, cfg.vocab_size, (batch, seqlen), device=device)
    tgt = torch.randint(0, cfg.vocab_size, (batch, seqlen), device=device)
    ours.train(), theirs.train()
    # theirs computes the loss on shifted labels (labels[:, 1:]); ours on given targets: same FLOPs
    fa = _train_step(ours, torch.optim.AdamW(ours.parameters(), lr=1e-4), ids, tgt, False, dtype)
    fb = _train_step(theirs, torch.optim.AdamW(theirs.parameters(), lr=1e-4), ids, tgt, True, dtype)
    r = paired_wall(fa, fb, device, rounds)
    tokens = batch * seqlen
    name = f"gpt train {shape} B{batch} T{seqlen} {str(dtype).split('.')[-1]}"
    rows.append(dict(provider="fastformer", config=name, time_ms=r["a_s"] * 1e3, tokens_per_s=tokens / r["a_s"],
                     speedup_vs_best_peer=1.0 / r["ratio_a_over_b"], best_peer="transformers-sdpa"))
    rows.append(dict(provider="transformers-sdpa", config=name, time_ms=r["b_s"] * 1e3, tokens_per_s=tokens / r["b_s"]))
    print(f"{name}: ours {r['a_s'] * 1e3:.1f} ms, transformers {r['b_s'] * 1e3:.1f} ms, "
          f"speedup {1.0 / r['ratio_a_over_b']:.2f}x", flush=True)

    # greedy generation with the KV cache; the training steps above moved the two models'
    # weights apart (different optimisers' states), so re-export ours: same weights again
    ours.eval()
    theirs = _hf_sdpa(ours).to(device).eval()
    if dtype != torch.float32:
        ours.to(dtype), theirs.to(dtype)
    for gb in gen_batches:
        p = torch.randint(0, cfg.vocab_size, (gb, prompt), device=device)
        mask = torch.ones_like(p)

        def ga():
            return ours.generate(p, new_tokens, temperature=0.0)

        def gb_():
            return theirs.generate(p, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   do_sample=False, pad_token_id=0)

        # Random weights give near-uniform logits, where fp32 rounding differences flip
        # argmax ties: report how many leading generated tokens agree.
        a_tok, b_tok = ga()[:, prompt:], gb_()[:, prompt:]
        differ = (a_tok != b_tok).any(0).nonzero()
        same = int(differ[0, 0]) if len(differ) else new_tokens
        r = paired_wall(ga, gb_, device, rounds)
        name = f"gpt generate {shape} B{gb} prompt{prompt} +{new_tokens} {str(dtype).split('.')[-1]}"
        n = gb * new_tokens
        rows.append(dict(provider="fastformer", config=name, time_ms=r["a_s"] * 1e3, tokens_per_s=n / r["a_s"],
                         speedup_vs_best_peer=1.0 / r["ratio_a_over_b"], best_peer="transformers-sdpa",
                         matching_prefix_tokens=same))
        rows.append(dict(provider="transformers-sdpa", config=name, time_ms=r["b_s"] * 1e3, tokens_per_s=n / r["b_s"]))
        print(f"{name}: ours {r['a_s'] * 1e3:.1f} ms, transformers {r['b_s'] * 1e3:.1f} ms, "
              f"speedup {1.0 / r['ratio_a_over_b']:.2f}x, first {same}/{new_tokens} tokens equal", flush=True)
    return rows


def vit_rows(device: str, quick: bool, rounds: int) -> List[Dict]:
    try:
        import timm
    except ImportError:
        print("timm not importable: ViT rows skipped", flush=True)
        return []
    name_cfg = "vit_base_patch16_224" if not quick else "vit_tiny_patch16_224"
    batch = 64 if not quick else 2
    theirs = timm.create_model(name_cfg, pretrained=False).to(device)
    dims = dict(vit_base_patch16_224=(768, 12, 12), vit_tiny_patch16_224=(192, 12, 3))[name_cfg]
    ours = ViT(img_size=224, patch_size=16, num_classes=1000, embed_dim=dims[0], depth=dims[1], num_heads=dims[2])
    ours.load_state_dict(theirs.state_dict())
    ours.to(device)
    x = torch.randn(batch, 3, 224, 224, device=device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []

    def infer(m):
        def f():
            with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                return m(x)
        return f

    def train(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
        y = torch.randint(0, 1000, (batch,), device=device)

        def f():
            with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return f

    for mode, make in (("inference", infer), ("train", train)):
        (ours.eval(), theirs.eval()) if mode == "inference" else (ours.train(), theirs.train())
        r = paired_wall(make(ours), make(theirs), device, rounds)
        name = f"{name_cfg} {mode} B{batch} {str(dtype).split('.')[-1]}"
        rows.append(dict(provider="fastformer", config=name, time_ms=r["a_s"] * 1e3,
                         images_per_s=batch / r["a_s"], speedup_vs_best_peer=1.0 / r["ratio_a_over_b"],
                         best_peer="timm"))
        rows.append(dict(provider="timm", config=name, time_ms=r["b_s"] * 1e3, images_per_s=batch / r["b_s"]))
        print(f"{name}: ours {r['a_s'] * 1e3:.1f} ms, timm {r['b_s'] * 1e3:.1f} ms, "
              f"speedup {1.0 / r['ratio_a_over_b']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    if device == "cpu":
        common.steady_cpu_allocator()  # as the attention benchmarks: glibc's long-run state, not fresh mmaps per call
    env = common.environment(device)
    try:
        import transformers  # noqa: F401
    except ImportError:
        path = common.write_results("models" + ("-quick" if args.quick else ""),
                                    {"results": [], "skipped": "transformers not importable"}, env)
        print(f"transformers not importable; wrote {path}")
        return 0
    rows: List[Dict] = []
    if args.quick:
        cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=2, n_head=2, n_embd=64)
        rows += gpt_rows(device, True, cfg, batch=2, seqlen=32, gen_batches=[1], prompt=4, new_tokens=16,
                         dtype=torch.float32, rounds=1)
    elif device == "cpu":
        cfg = GPTConfig(vocab_size=65, block_size=512, n_layer=6, n_head=6, n_embd=384)
        rows += gpt_rows(device, False, cfg, batch=4, seqlen=256, gen_batches=[1], prompt=16, new_tokens=256,
                         dtype=torch.float32, rounds=7)
    else:
        cfg = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
        # transformers' generate costs seconds per call here (per-token launch overhead):
        # 128 new tokens and 3 rounds keep the whole set inside the suite's 240 s
        rows += gpt_rows(device, False, cfg, batch=8, seqlen=1024, gen_batches=[1, 32], prompt=128,
                         new_tokens=128, dtype=torch.bfloat16, rounds=3)
        rows += vit_rows(device, False, rounds=10)
    payload = {"results": rows}
    path = common.write_results("models" + ("-quick" if args.quick else ""), payload, env)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
