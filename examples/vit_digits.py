"""Train a small ViT on scikit-learn's bundled 8x8 handwritten digits (no download).

    OMP_NUM_THREADS=1 python examples/vit_digits.py   # about 8 minutes on 2 shared CPU cores; 97.5% test accuracy
    python examples/vit_digits.py --smoke    # a few steps (CI)
    torchrun --nproc_per_node 2 examples/vit_digits.py

The 8x8 images are cut into 2x2 patches (16 tokens + a class token).

Measured on an AMD EPYC with 2 cores shared with other jobs (bench/NOTES.md, Models):
50 epochs in 494 s, 97.5% test accuracy. On such a machine keep OMP_NUM_THREADS=1: two OpenMP threads on oversubscribed
cores made these tiny models' steps 10-25x slower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import setup  # noqa: E402

from fastformer.models import ViT  # noqa: E402


def load_digits_split(seed: int = 0):
    """(x_train, y_train, x_test, y_test): images (N, 1, 8, 8) scaled to [0, 1]; 20% test, stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.2, random_state=seed, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


@torch.no_grad()
def accuracy(model, x, y, batch=512) -> float:
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item() for i in range(0, len(y), batch))
    return correct / len(y)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--patch", type=int, default=2)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--pool", default="avg", choices=["token", "avg"])
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--smoke", action="store_true", help="a few steps on a slice of the data")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="fastformer attention backend (auto, cpu, triton, cuda, reference)")
    args = p.parse_args(argv)
    d = setup(args.device, args.backend)
    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te = load_digits_split()
    if args.smoke:
        args.epochs, x_tr, y_tr = 1, x_tr[:256], y_tr[:256]
    x_tr, y_tr, x_te, y_te = (t.to(d.device) for t in (x_tr, y_tr, x_te, y_te))

    model = ViT(img_size=8, patch_size=args.patch, in_chans=1, num_classes=10, embed_dim=64, depth=args.depth, num_heads=4,
                mlp_ratio=2.0, drop_rate=args.dropout, global_pool=args.pool).to(d.device)
    net = d.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * ((len(y_tr) + args.batch - 1) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(1)  # same permutation on every rank; each takes its shard
    t0 = time.time()
    bar = d.progress(total=steps)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(y_tr), generator=gen).to(d.device)
        for i in range(0, len(y_tr), args.batch):
            idx = perm[i:i + args.batch][d.shard(min(args.batch, len(y_tr) - i))]
            loss = F.cross_entropy(net(x_tr[idx]), y_tr[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", refresh=False)
        if (epoch + 1) % 10 == 0 or epoch + 1 == args.epochs:
            d.log(f"epoch {epoch + 1:3d}  loss {loss.item():.3f}  test acc {accuracy(model, x_te, y_te):.4f}  "
                  f"({time.time() - t0:.0f}s)")
    bar.close()
    result = {"test_accuracy": accuracy(model, x_te, y_te), "seconds": time.time() - t0, "epochs": args.epochs}
    d.log(f"final test accuracy {result['test_accuracy']:.4f} on {len(y_te)} images in {result['seconds']:.0f}s")
    d.close()
    return result


if __name__ == "__main__":
    main()
