"""Teach the encoder-decoder Transformer to write numbers in English words.

    OMP_NUM_THREADS=1 python examples/translate_numbers.py   # about 16 minutes on 2 shared CPU cores; exact match >= 95% (beam 4)
    python examples/translate_numbers.py --smoke   # a few steps (CI)
    torchrun --nproc_per_node 2 examples/translate_numbers.py

Source: the digits of a number in 0..99,999 ("40213"); target: its words
("forty thousand two hundred thirteen"). A held-out set of numbers never seen
in training is decoded with beam search and scored by exact match.

Measured on an AMD EPYC with 2 cores shared with other jobs (bench/NOTES.md, Models):
--steps 1000 trained in 648 s to 100% exact match (the default 1500 steps: ~16 minutes).
On such a machine keep OMP_NUM_THREADS=1: two OpenMP threads on oversubscribed cores
made these tiny models' steps 10-25x slower.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import setup  # noqa: E402

from fastformer.models import Seq2SeqConfig, Seq2SeqTransformer  # noqa: E402

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SPECIAL = ["<pad>", "<bos>", "<eos>"]
SRC_VOCAB = SPECIAL + list("0123456789")
TGT_VOCAB = SPECIAL + ONES + TENS[2:] + ["hundred", "thousand"]
MAX_N = 100_000


def words(n: int) -> list:
    if n < 20:
        return [ONES[n]]
    if n < 100:
        return [TENS[n // 10]] + ([ONES[n % 10]] if n % 10 else [])
    if n < 1000:
        return [ONES[n // 100], "hundred"] + (words(n % 100) if n % 100 else [])
    return words(n // 1000) + ["thousand"] + (words(n % 1000) if n % 1000 else [])


def encode_batch(numbers, device):
    """(src (B, 5+1), tgt_in (B, T), tgt_out (B, T)) padded with 0."""
    s_ids = [[SRC_VOCAB.index(ch) for ch in str(n)] + [2] for n in numbers]
    t_ids = [[TGT_VOCAB.index(w) for w in words(n)] for n in numbers]
    S = max(map(len, s_ids))
    T = max(map(len, t_ids)) + 1
    src = torch.tensor([s + [0] * (S - len(s)) for s in s_ids])
    tgt_in = torch.tensor([[1] + t + [0] * (T - 1 - len(t)) for t in t_ids])
    tgt_out = torch.tensor([t + [2] + [0] * (T - 1 - len(t)) for t in t_ids])
    return src.to(device), tgt_in.to(device), tgt_out.to(device)


def decode_words(ids) -> str:
    out = []
    for i in ids.tolist():
        if i == 2:
            break
        if i > 2:
            out.append(TGT_VOCAB[i])
    return " ".join(out)


@torch.no_grad()
def exact_match(model, numbers, device, beam_size: int, batch: int = 250) -> float:
    model.eval()
    hits = 0
    for i in range(0, len(numbers), batch):
        chunk = numbers[i:i + batch]
        src, _, _ = encode_batch(chunk, device)
        hyp = model.generate(src, max_len=12, beam_size=beam_size)
        hits += sum(decode_words(h) == " ".join(words(n)) for h, n in zip(hyp, chunk))
    return hits / len(numbers)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--test", type=int, default=1000, help="held-out numbers to score")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="fastformer attention backend (auto, cpu, triton, cuda, reference)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.test, args.batch = 3, 8, 16
    d = setup(args.device, args.backend)
    torch.manual_seed(0)
    rng = random.Random(0)
    test = rng.sample(range(MAX_N), args.test)
    held_out = set(test)

    cfg = Seq2SeqConfig(src_vocab_size=len(SRC_VOCAB), tgt_vocab_size=len(TGT_VOCAB), d_model=64, num_heads=4,
                        num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=128, dropout=0.0, max_len=16)
    model = Seq2SeqTransformer(cfg).to(d.device)
    net = d.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    batch_rng = random.Random(1)  # same global batch on every rank; each trains on its shard
    t0 = time.time()
    bar = d.progress(range(1, args.steps + 1))
    for step in bar:
        model.train()
        numbers = []
        while len(numbers) < args.batch:
            # small numbers are rare under uniform sampling: draw a digit count first
            digits = batch_rng.randint(1, 5)
            n = batch_rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)
            if n not in held_out:
                numbers.append(n)
        src, tgt_in, tgt_out = encode_batch(numbers[d.shard(len(numbers))], d.device)
        _, loss = net(src, tgt_in, tgt_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 10 == 0 or step == args.steps:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 250 == 0 or step == args.steps:
            d.log(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f}s)")
    t1 = time.time()
    greedy = exact_match(model, test, d.device, beam_size=1)
    beam = exact_match(model, test, d.device, beam_size=args.beam)
    src, _, _ = encode_batch(test[:3], d.device)
    for n, h in zip(test[:3], model.generate(src, max_len=12, beam_size=args.beam)):
        d.log(f"  {n} -> {decode_words(h)}")
    result = {"exact_match_beam": beam, "exact_match_greedy": greedy, "beam_size": args.beam,
              "train_seconds": t1 - t0, "steps": args.steps, "test_numbers": len(test)}
    d.log(f"exact match on {len(test)} held-out numbers: beam {args.beam} {beam:.4f}, greedy {greedy:.4f} "
          f"(train {t1 - t0:.0f}s)")
    d.close()
    return result


if __name__ == "__main__":
    main()
