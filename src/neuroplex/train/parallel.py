"""Data parallelism across processes: ``torchrun --nproc-per-node N -m neuroplex train CONFIG``.

Every rank runs the same loop on its shard of each global batch; gradients are averaged by
``DistributedDataParallel`` (one DDP wrapper per independently trained part: the whole network for
backprop, each stage with its auxiliary network for local learning). Rank 0 alone writes the run
directory. Distributed code lives here, never inside a layer or a method's arithmetic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from neuroplex.errors import NeuroplexError

TIMEOUT = timedelta(seconds=int(os.environ.get("NEUROPLEX_DIST_TIMEOUT", "300")))


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel ranks (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: Tensor) -> Tensor:
        """This rank's part of a global batch of indices ``[n]``; ``n`` is trimmed to a multiple
        of the world size so every rank holds the same number of samples (DDP averages)."""
        if self.size == 1:
            return idx
        n = len(idx) // self.size * self.size
        return idx[:n][self.rank :: self.size]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over ranks."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        return self.sum([float(flag)])[0] > 0 if self.size > 1 else flag

    def gather(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order."""
        if self.size == 1:
            return [text]
        out: list[str] = [""] * self.size
        dist.all_gather_object(out, text)
        return out


def init_world() -> World:
    """Join the process group torchrun describes in the environment (no-op for one process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        try:
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT)
        except (RuntimeError, ValueError) as e:
            raise NeuroplexError(f"could not join the process group of {size} ranks: {e}") from e
    return World(rank, size, local_rank)


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module) -> nn.Module:
    """``module`` wrapped in DDP when a process group is running, else ``module`` itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
