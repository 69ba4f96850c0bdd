"""Forecast a chaotic system with the causal TimeSeriesTransformer.

The logistic map ``x_{t+1} = r x_t (1 - x_t)`` at r = 3.9 (chaotic), observed
with a little noise. The model learns ``x_t`` from the previous ``W`` values;
it is scored one step ahead and over short rollouts against the persistence
baseline (tomorrow = today).

    OMP_NUM_THREADS=1 python examples/forecast_chaos.py   # 1.5-5 minutes on 2 shared CPU cores (below)
    python examples/forecast_chaos.py --smoke   # a few steps (CI)
    torchrun --nproc_per_node 2 examples/forecast_chaos.py

Measured on an AMD EPYC with 2 cores shared with other jobs (bench/NOTES.md): 83 s at
load average ~8, 317 s on a busier day. On such a machine keep OMP_NUM_THREADS=1: two
OpenMP threads on oversubscribed cores made these tiny models' steps 10-25x slower.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _dist import setup  # noqa: E402

from fastformer.models import TimeSeriesTransformer  # noqa: E402
from fastformer.models.timeseries import make_windows, persistence_forecast  # noqa: E402


def logistic_series(n: int, r: float = 3.9, x0: float = 0.3, noise: float = 1e-3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, dtype=torch.float64)
    x[0] = x0
    for t in range(1, n):
        x[t] = r * x[t - 1] * (1 - x[t - 1])
    return (x + noise * torch.randn(n, generator=g, dtype=torch.float64)).float()[:, None]  # (n, 1)


def versus_persistence(model_mse: float, persistence_mse: float) -> str:
    """'12.3x better than persistence' / '1.39x worse than persistence' (by mean squared error)."""
    if model_mse == persistence_mse:
        return "as good as persistence"
    if model_mse < persistence_mse:
        return f"{persistence_mse / model_mse:.3g}x better than persistence" if model_mse > 0 else "exact"
    return f"{model_mse / persistence_mse:.3g}x worse than persistence"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--horizon", type=int, default=3, help="rollout length scored against persistence")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto", help="fastformer attention backend (auto, cpu, triton, cuda, reference)")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 3
    d = setup(args.device, args.backend)
    torch.manual_seed(0)
    series = logistic_series(6000)
    train, test = series[:5000], series[5000:]
    x_tr, y_tr = make_windows(train, args.window)
    model = TimeSeriesTransformer(n_features=1, window=args.window, d_model=64, num_heads=4, num_layers=2)
    model.set_scale(train)
    model = model.to(d.device)
    net = d.wrap(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(1)
    t0 = time.time()
    bar = d.progress(range(1, args.steps + 1))
    for step in bar:
        model.train()
        idx = torch.randint(len(x_tr), (args.batch,), generator=gen)[d.shard(args.batch)]
        pred = net(x_tr[idx].to(d.device))
        loss = torch.nn.functional.mse_loss(pred, y_tr[idx].to(d.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == args.steps:
            bar.set_postfix(mse=f"{loss.item():.2e}", refresh=False)
        if step % 300 == 0 or step == args.steps:
            d.log(f"step {step:5d}  mse {loss.item():.2e}  ({time.time() - t0:.0f}s)")

    model.eval()
    W, H = args.window, args.horizon
    starts = range(W, len(test) - H)
    ctx = torch.stack([test[s - W:s] for s in starts]).to(d.device)  # (M, W, 1)
    truth = torch.stack([test[s:s + H] for s in starts]).to(d.device)  # (M, H, 1)
    pred = model.forecast(ctx, H)
    base = persistence_forecast(ctx, H)
    mse = ((pred - truth) ** 2).mean(dim=(0, 2))  # per horizon step
    mse_base = ((base - truth) ** 2).mean(dim=(0, 2))
    for h in range(H):
        d.log(f"horizon {h + 1}: model mse {mse[h]:.2e}   persistence mse {mse_base[h]:.2e}   "
              f"({versus_persistence(mse[h].item(), mse_base[h].item())})")
    result = {"one_step_mse": mse[0].item(), "persistence_one_step_mse": mse_base[0].item(),
              "rollout_mse": mse.tolist(), "persistence_rollout_mse": mse_base.tolist(),
              "seconds": time.time() - t0, "steps": args.steps}
    d.close()
    return result


if __name__ == "__main__":
    main()
