"""Processes working together: data parallelism (``torchrun --nproc-per-node N -m neuroplex train
CONFIG``) and the links of the stage pipeline (``train.parallel: N``, see distributed/pipeline.py).

Data parallel: every rank runs the same loop on its shard of each global batch; gradients are
averaged by ``DistributedDataParallel`` (one DDP wrapper per independently trained part: the whole
network for backprop, each stage with its auxiliary network for local learning). Rank 0 alone
writes the run directory. Distributed code lives here, never inside a layer or a method's
arithmetic.

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
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
        join_process_group(rank, size, local_rank)
    return World(rank, size, local_rank)


def join_process_group(
    rank: int, size: int, local_rank: int, init_method: str | None = None
) -> None:
    """gloo on CPU, nccl on GPU; ``init_method`` None = torchrun's environment variables."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=size, timeout=TIMEOUT
        )
    except (RuntimeError, ValueError) as e:
        raise NeuroplexError(f"could not join the process group of {size} ranks: {e}") from e


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def data_parallel(module: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """``module`` wrapped in DDP when a process group is running (gradients averaged over
    ``group``, default: every rank), else ``module`` itself."""
    if not dist.is_initialized() or (group is None and dist.get_world_size() == 1):
        return module
    if not any(p.requires_grad for p in module.parameters()):
        return module
    device = next(module.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=group)


# ---------------------------------------------------------------------------------------------
# the stage pipeline


class PipelineError(NeuroplexError):
    """A pipeline process lost a peer: it died, or sent nothing before the deadline."""


@dataclass(frozen=True)
class PipelineWorld(World):
    """A pipeline process's place: stage group ``rank // replicas`` of ``size // replicas``,
    data-parallel replica ``rank % replicas`` of that group. The first group's replicas read
    their shards of each global batch (one replica: the whole batch), and a diverged loss is
    checked where it happens (no collective per step, which would stall the pipeline)."""

    replicas: int = 1

    @property
    def group(self) -> int:
        return self.rank // self.replicas

    @property
    def groups(self) -> int:
        return self.size // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    def shard(self, idx: Tensor) -> Tensor:
        return World(self.replica, self.replicas).shard(idx)

    def any(self, flag: bool) -> bool:
        return flag


@contextmanager
def peer_guard(rank: int, what: str, peer: int | None = None):
    """Turn a communication failure (a peer died, or the deadline passed) into a PipelineError
    naming this rank, what it was doing and, where one peer was involved, the lost rank."""
    try:
        yield
    except RuntimeError as e:
        text = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip())  # gloo's source file and line
        first = text.splitlines()[0].split(". ")[0] if text else type(e).__name__
        lost = f"lost pipeline rank {peer}: " if peer is not None else ""
        raise PipelineError(f"{lost}pipeline rank {rank}: {what} failed: {first}") from None


class Pipe:
    """Links of pipeline process ``rank`` of ``size``: batches ``(h [b, *shape], y [b])`` come
    from the same replica of the previous stage group (rank - replicas) and go to the next
    (rank + replicas), asynchronously (irecv/isend), at most two in flight each way. Any
    activation shape travels (vectors ``[b, d]``, feature maps ``[b, c, h, w]``). Every wait has a
    deadline (``timeout``), so a dead or stalled peer ends the run, never hangs it.
    """

    def __init__(
        self, rank: int, size: int, timeout: timedelta = TIMEOUT, *, replicas: int = 1
    ) -> None:
        self.rank, self.size, self.timeout, self.replicas = rank, size, timeout, replicas
        self._in_flight: deque[tuple[list[dist.Work], tuple[Tensor, Tensor]]] = deque()
        self._sent = self._received = 0

    @property
    def first(self) -> bool:
        return self.rank < self.replicas

    @property
    def last(self) -> bool:
        return self.rank >= self.size - self.replicas

    @property
    def next(self) -> int:
        return self.rank + self.replicas

    @property
    def previous(self) -> int:
        return self.rank - self.replicas

    def send(self, h: Tensor, y: Tensor) -> None:
        """Start sending a batch (``h [b, *shape]``, ``y [b]``) to the next group; the tensors
        are kept alive until sent."""
        if len(self._in_flight) == 2:
            self._wait(self._in_flight.popleft()[0], f"sending to rank {self.next}", self.next)
        tag = 2 * (self._sent % 2)  # alternate tags: the two batches in flight never mix
        batch = (h.contiguous(), y.contiguous())
        # a peer that is gone can make isend itself fail (connection reset), not only its wait
        with peer_guard(self.rank, f"sending to rank {self.next}", self.next):
            works = [dist.isend(t, self.next, tag=tag + i) for i, t in enumerate(batch)]
        self._in_flight.append((works, batch))
        self._sent += 1

    def flush(self) -> None:
        """Wait until every batch sent has been received."""
        while self._in_flight:
            self._wait(self._in_flight.popleft()[0], f"sending to rank {self.next}", self.next)

    def receive(
        self, sizes: list[int], shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches ``(h [b, *shape], y [b])`` of the given sizes from the previous rank, in order
        (``shape``: one sample's, a vector ``(d,)`` or a feature map ``(c, *s)``).
        Double buffering: batch t + 1 is being received while the caller trains on batch t (and
        while this waits for batch t, so the sender never waits for this process to wake up)."""
        posted: deque[tuple[list[dist.Work], tuple[Tensor, Tensor]]] = deque()
        for t in range(len(sizes)):
            for u in range(t + len(posted), min(t + 2, len(sizes))):
                posted.append(self._post(sizes[u], shape, dtype, device))
            works, batch = posted.popleft()
            self._wait(works, f"receiving from rank {self.previous}", self.previous)
            yield batch

    def _post(
        self, b: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[list[dist.Work], tuple[Tensor, Tensor]]:
        batch = (
            torch.empty(b, *shape, dtype=dtype, device=device),
            torch.empty(b, dtype=torch.long, device=device),
        )
        tag = 2 * (self._received % 2)
        with peer_guard(self.rank, f"receiving from rank {self.previous}", self.previous):
            works = [dist.irecv(t, self.previous, tag=tag + i) for i, t in enumerate(batch)]
        self._received += 1
        return works, batch

    def _wait(self, works: list[dist.Work], what: str, peer: int) -> None:
        with peer_guard(self.rank, what, peer):
            for work in works:
                work.wait(self.timeout)
