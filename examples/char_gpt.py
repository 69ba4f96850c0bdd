"""A character-level GPT trained on text that ships with Python, then sampling.

The corpus is ``pydoc_data.topics`` (the English help pages behind ``help()``,
~0.8 MB of prose and code in every CPython install): no download.

    OMP_NUM_THREADS=1 python examples/char_gpt.py   # about 13 minutes on 2 shared CPU cores (below)
    python examples/char_gpt.py --smoke     # a few steps (CI)
    torchrun --nproc_per_node 2 examples/char_gpt.py

Measured on an AMD EPYC with 2 cores shared with other jobs (bench/NOTES.md, Models):
600 steps in 768 s, validation loss 1.17 nats/char. On such a machine keep OMP_NUM_THREADS=1: two OpenMP threads on oversubscribed
cores made these tiny models' steps 10-25x slower.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import setup  # noqa: E402

from fastformer.models import GPT, GPTConfig  # noqa: E402


def corpus() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--sample", type=int, default=300, help="characters to generate at the end")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="fastformer attention backend (auto, cpu, triton, cuda, reference)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.block, args.sample = 3, 4, 32, 20
    d = setup(args.device, args.backend)
    torch.manual_seed(0)
    text = corpus()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]

    cfg = GPTConfig(vocab_size=len(chars), block_size=args.block, n_layer=4, n_head=4, n_embd=128,
                    dropout=0.0, pos_embedding="rotary")
    model = GPT(cfg).to(d.device)
    net = d.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(d.rank)  # each rank draws its own windows

    def batch(source, n):
        ix = torch.randint(len(source) - args.block - 1, (n,), generator=gen)
        x = torch.stack([source[i:i + args.block] for i in ix])
        y = torch.stack([source[i + 1:i + 1 + args.block] for i in ix])
        return x.to(d.device), y.to(d.device)

    @torch.no_grad()
    def val_loss(n_batches=10):
        model.eval()
        losses = [model(*batch(val, args.batch))[1].item() for _ in range(n_batches)]
        return sum(losses) / len(losses)

    t0 = time.time()
    per_rank = max(1, args.batch // d.world)
    bar = d.progress(range(1, args.steps + 1))
    for step in bar:
        model.train()
        _, loss = net(*batch(train, per_rank))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if step % 100 == 0 or step == args.steps:
            d.log(f"step {step:5d}  train loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    vl = val_loss(2 if args.smoke else 20)
    prompt = torch.tensor([[stoi[c] for c in "The "]], device=d.device)
    out = model.generate(prompt, args.sample, temperature=0.8, top_k=20,
                         generator=torch.Generator(device=d.device).manual_seed(0))
    sample = "".join(chars[i] for i in out[0].tolist())
    d.log(f"validation loss {vl:.3f} nats/char ({vl / math.log(2):.2f} bits/char); uniform would be "
          f"{math.log(len(chars)):.2f} nats\n--- sample ---\n{sample}\n--------------")
    result = {"val_loss": vl, "vocab": len(chars), "seconds": time.time() - t0, "steps": args.steps, "sample": sample}
    d.close()
    return result


if __name__ == "__main__":
    main()
