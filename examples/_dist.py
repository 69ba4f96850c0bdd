"""What every example shares: optional torchrun set-up, device choice, logging on rank 0.

    python examples/vit_digits.py                       # one process
    torchrun --nproc_per_node 2 examples/vit_digits.py  # DistributedDataParallel (gloo on CPU, nccl on GPU)
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import fastformer


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    _scope: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model under DDP when launched by torchrun with several processes, else itself."""
        if self.world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def shard(self, n: int) -> slice:
        """This rank's part of a global batch of ``n`` items."""
        return slice(self.rank, n, self.world)

    def log(self, *args) -> None:
        """Print on rank 0 (above a running progress bar, if any)."""
        if self.main:
            tqdm.write(" ".join(str(a) for a in args))

    def progress(self, iterable=None, total: int = None, desc: str = "train", unit: str = "step") -> tqdm:
        """A tqdm progress bar over the training loop on rank 0 (silent on the others):
        wrap an iterable, or pass ``total`` and call ``update()``."""
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not self.main, mininterval=1.0,
                    dynamic_ncols=True)

    def close(self) -> None:
        self._scope.close()
        if self.world > 1:
            dist.destroy_process_group()


def setup(device: str = "auto", backend: str = "auto") -> Dist:
    """Process group (under torchrun), device, and the attention backend until ``close()``."""
    d = _setup(device)
    d._scope.enter_context(fastformer.use_backend(backend))
    return d


def _setup(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank = dist.get_rank()
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            return Dist(rank, world, torch.device("cuda", local))
        return Dist(rank, world, torch.device("cpu"))
    return Dist(0, 1, torch.device("cuda" if use_cuda else "cpu"))
