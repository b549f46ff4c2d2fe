"""Pipelined stage parallelism for local learning (``train.parallel: N``).

The stages are split into N contiguous groups balanced by the measured time of each stage with
its aux net (distributed/balance.py), one process each, joined by ``torch.distributed`` (gloo on
CPU, nccl on GPU). Two launches (distributed/launch.py):

- ``neuroplex train CONFIG``: that process starts the N workers (``torch.multiprocessing``) and
  waits for them;
- ``torchrun --nnodes M --nproc-per-node P -m neuroplex train CONFIG``: the M x P ranks torchrun
  starts (on one machine or many; rendezvous and failure handling are torch.distributed's elastic
  agent) are N stage groups x R = M * P / N data-parallel replicas, rank = group * R + replica.
  The replicas of a group average their gradients (DDP over the group's ranks).

Rank 0 (group 0, replica 0) reads the batches in the loop's epoch order (each replica of group 0
its shard) and trains group 0 exactly as ``Local`` does, then sends the detached output (any
shape) and the labels to the same replica of group 1, which trains group 1 and sends on; the last
group owns the head. No gradient goes back. Sends and receives are asynchronous with two batches in
flight (distributed.parallel.Pipe), so communication overlaps compute.

Every process builds the whole model and the whole ``Local`` method from the same seed (so the
same initialisation) and trains only its group; each stage draws dropout masks from its own
stream (methods/streams.py), so the parameters equal the sequential run's. At the end of each epoch
the groups' state (stages, aux nets, optimizer state, random streams) and step totals are gathered
into rank 0, which then holds the whole model: it evaluates, and the one loop writes metrics and
checkpoints in the sequential run's format. Resume loads the whole checkpoint in every process.

A worker that dies or stalls ends the run in bounded time: every wait has a deadline
(``NEUROPLEX_DIST_TIMEOUT`` seconds, default 300), the others fail naming the lost rank, one error
line is reported and ``summary.json`` says what happened (distributed/failures.py); the last
checkpoint stays resumable.

Shape legend: ``b`` batch, ``*shape`` one sample's activation shape (``d``, or ``c, h, w``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from neuroplex import files
from neuroplex.config import Config
from neuroplex.distributed.balance import (
    Plan,
    make_plan,
    read_plan,
    transfer_seconds,
    write_plan,
)
from neuroplex.distributed.failures import (
    summary_after_peer_loss,
    under_torchrun,
    with_resume_hint,
)
from neuroplex.distributed.parallel import (
    Pipe,
    PipelineError,
    PipelineWorld,
    data_parallel,
    join_process_group,
    peer_guard,
)
from neuroplex.methods.local import Local
from neuroplex.network import stage_out_shape
from neuroplex.train.evaluate import evaluate_splits
from neuroplex.train.loop import EpochTotals, epoch_batches, finish_epoch, run_epochs, train_batch
from neuroplex.train.memory import ActivationMeter
from neuroplex.train.method import StepResult
from neuroplex.train.progress import NullProgress
from neuroplex.train.rundir import LoopState, restore, start_run_dir
from neuroplex.train.setup import Setup, build_setup

EXIT_AT = "NEUROPLEX_PIPELINE_EXIT_AT"  # test hook "RANK:STEP": that process dies after STEP steps
CRASH_AT = "NEUROPLEX_PIPELINE_CRASH_AT"  # test hook "N:LOG": rank 0 dies at its N-th write
# (0-based; N < 0: never), after appending the path of every write to the file LOG


@dataclass(frozen=True)
class Job:
    """What every pipeline process is given (pickled to the spawned processes)."""

    cfg: Config
    run_dir: Path
    resume: bool
    stop_after_epoch: int | None
    progress: type[NullProgress]  # instantiated by rank 0
    init_method: str | None  # rendezvous of the process group (None: torchrun's environment)


def run_worker(rank: int, job: Job, world: PipelineWorld) -> dict[str, Any]:
    """Build the run, join the group, train this process's stage group through the one loop."""
    cfg = job.cfg
    torch.set_num_threads(cfg.threads or 1)
    # Built before the process group exists, so Local does not wrap its stages in DDP over every
    # rank: only a group's replicas average their gradients.
    s = build_setup(cfg, world)
    join_process_group(rank, world.size, world.local_rank, job.init_method)
    try:
        install_crash_hook(rank)
        state = restore(job.run_dir, s) if job.resume else start_run_dir(job.run_dir, s)
        plan = agree_on_plan(s, job)
        pipe = Pipe(rank, world.size, replicas=world.replicas)
        s.method = StageGroup(s.method, plan.ranges[world.group], pipe, replica_group(world))
        progress = job.progress() if world.is_main else NullProgress()
        try:
            return run_epochs(s, state, job.run_dir, job.stop_after_epoch, progress, pipeline_epoch)
        except PipelineError as e:
            error = PipelineError(with_resume_hint(str(e), job.run_dir))
            if under_torchrun():
                summary_after_peer_loss(job.run_dir, s, error)
            raise error from None
    finally:
        dist.destroy_process_group()


def agree_on_plan(s: Setup, job: Job) -> Plan:
    """Rank 0 reads the run's split (resume) or measures and records a new one (the first two
    groups' first ranks time the transfers with it); every rank gets it."""
    world: PipelineWorld = s.world  # type: ignore[assignment]
    box: list[Plan | None] = [None]
    if world.is_main and job.resume:
        box = [read_plan(job.run_dir, len(s.model.stages), world.groups, world.replicas)]
    needed = [box[0] is None]
    with peer_guard(world.rank, "receiving the stage split"):
        dist.broadcast_object_list(needed, src=0)
    if needed[0]:
        transfers = transfer_seconds(s, s.cfg.train.pipeline.timing_batches)
        if world.is_main:
            box = [make_plan(s, world.groups, world.replicas, transfers)]
            write_plan(job.run_dir, box[0])
    with peer_guard(world.rank, "receiving the stage split"):
        dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


def replica_group(world: PipelineWorld) -> dist.ProcessGroup | None:
    """The process group of this rank's stage group's replicas (None: one replica). Every rank
    creates every group, in the same order, as torch.distributed requires."""
    if world.replicas == 1:
        return None
    mine = None
    for g in range(world.groups):
        ranks = list(range(g * world.replicas, (g + 1) * world.replicas))
        group = dist.new_group(ranks)
        mine = group if g == world.group else mine
    return mine


def install_crash_hook(rank: int) -> None:
    """The kill test's hook (``CRASH_AT``): rank 0 logs each write and dies at the N-th."""
    spec = os.environ.get(CRASH_AT)
    if not spec or rank != 0:
        return
    n, _, log = spec.partition(":")
    seen: list[Path] = []

    def hook(path: Path) -> None:
        seen.append(path)
        if log:
            with open(log, "a", encoding="utf-8") as f:
                f.write(f"{path}\n")
        if len(seen) - 1 == int(n):
            os._exit(3)  # as SIGKILL would: no clean-up

    files.crash_hooks.append(hook)


def unwrapped(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


class StageGroup:
    """The method of one pipeline process: ``Local`` on its stages (data parallel over the
    group's replicas, if any); the output goes on to the next group. Checkpoint state is the
    whole ``Local``'s (rank 0 holds it after a gather)."""

    def __init__(
        self,
        local: Local,
        stages: range,
        pipe: Pipe,
        replicas: dist.ProcessGroup | None = None,
    ) -> None:
        self.local, self.stages, self.pipe = local, stages, pipe
        self.optimizers = local.optimizers
        if replicas is not None:
            for i in stages:
                local.trainees[i] = data_parallel(local.trainees[i], replicas)

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """Train the group on ``x [b, *shape_in]`` (the previous group's output), ``y [b]``; send
        the output ``[b, *shape_out]`` and ``y`` on. The loss is the group's last local loss."""
        result, h = self.local.train_stages(self.stages, x, y, lr)
        if not self.pipe.last:
            self.pipe.send(h, y)
        return result

    def batches(self, s: Setup, epoch: int, done_steps: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's inputs for ``epoch``: group 0 reads the data (its replica's shard of
        each global batch), the others receive."""
        batches = epoch_batches(s, epoch, done_steps)
        if self.pipe.first:
            return (
                s.data.train_batch(idx, (s.cfg.seed, epoch, done_steps + i), s.world.shard)
                for i, idx in enumerate(batches)
            )
        shape = stage_out_shape(s.model.stages[self.stages.start - 1])
        dtype = next(s.model.parameters()).dtype
        sizes = [len(s.world.shard(idx)) for idx in batches]
        return self.pipe.receive(sizes, shape, dtype, s.device)

    def part(self) -> dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]]:
        """State this process trains: per stage, (stage + aux/head, optimizer) state dicts and
        the stage's random stream."""
        local = self.local
        trainees, optimizers, streams = local.trainees, local.optimizers, local.streams
        return {
            i: (
                unwrapped(trainees[i]).state_dict(),
                optimizers[i].state_dict(),
                streams.state(range(i, i + 1)),
            )
            for i in self.stages
        }

    def load_part(
        self, part: dict[int, tuple[dict[str, Any], dict[str, Any], dict[str, Tensor]]]
    ) -> None:
        for i, (module, optimizer, stream) in part.items():
            unwrapped(self.local.trainees[i]).load_state_dict(module)
            self.local.optimizers[i].load_state_dict(optimizer)
            self.local.streams.load_state(stream, range(i, i + 1))

    def modules(self) -> list[nn.Module]:
        return self.local.modules()

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.local.state()

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        self.local.load_state(tensors, meta)


def pipeline_epoch(
    s: Setup,
    state: LoopState,
    meter: ActivationMeter,
    epoch: int,
    run_dir: Path,
    progress: NullProgress,
) -> dict[str, Any]:
    """One epoch of this process's stage group, then the epoch's record, the same on every
    process (the loop's ``run_epoch`` for a pipeline)."""
    group: StageGroup = s.method  # type: ignore[assignment]
    s.model.train()
    totals = EpochTotals()
    # Every clock starts together: otherwise a later group's epoch would also time rank 0
    # writing the last epoch's checkpoint, which the sequential run's clock leaves out.
    with peer_guard(s.world.rank, "starting the epoch"):
        dist.barrier()
    t0 = time.perf_counter()
    for batch in group.batches(s, epoch, state.step):
        loss = train_batch(s, state, meter, batch, totals, run_dir)
        if os.environ.get(EXIT_AT) == f"{s.world.rank}:{state.step}":
            os._exit(3)  # test hook: die as a crashed worker would, without any clean-up
        progress.advance(state.step, loss)
    group.pipe.flush()
    totals.seconds = time.perf_counter() - t0
    totals.activation_peak = meter.peak
    whole, evaluation = gather_epoch(s, group, totals)
    return finish_epoch(s, state, epoch, whole, evaluation)


def gather_epoch(
    s: Setup, group: StageGroup, totals: EpochTotals
) -> tuple[EpochTotals, dict[str, float]]:
    """Collect every group's state (from its first replica) into rank 0's model, which it
    evaluates; every process gets the whole run's totals and the evaluation."""
    world: PipelineWorld = s.world  # type: ignore[assignment]
    parts: list[Any] | None = [None] * world.size if world.is_main else None
    mine = group.part() if world.replica == 0 else {}
    with peer_guard(world.rank, "gathering the epoch's state"):
        dist.gather_object((totals, mine), parts, dst=0)
    box: list[Any] = [None]
    if parts is not None:
        for _, part in parts[1:]:
            group.load_part(part)
        merged = merge_totals([t for t, _ in parts], world.replicas)
        box = [(merged, evaluate_splits(s.model, s.data))]
    with peer_guard(world.rank, "receiving the epoch's evaluation"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_totals(per_rank: list[EpochTotals], replicas: int = 1) -> EpochTotals:
    """The whole run's totals from every rank's (rank = group * replicas + replica): a group's
    replicas add up their samples (statistics averaged over them); loss and accuracy are the
    head's (last group); statistics of every stage; the epoch took as long as the slowest
    process."""
    groups = [add_replicas(per_rank[g : g + replicas]) for g in range(0, len(per_rank), replicas)]
    stats: dict[str, float] = {}
    for totals in groups:
        stats.update(totals.stat_sums)
    return replace(
        groups[-1],
        seconds=max(t.seconds for t in per_rank),
        activation_peak=max(t.activation_peak for t in per_rank),
        stat_sums=stats,
    )


def add_replicas(replicas: list[EpochTotals]) -> EpochTotals:
    """One group's totals: sums over its replicas, statistics averaged."""
    keys = replicas[0].stat_sums.keys()
    n = len(replicas)
    return replace(
        replicas[0],
        loss_sum=sum(t.loss_sum for t in replicas),
        correct=sum(t.correct for t in replicas),
        seen=sum(t.seen for t in replicas),
        stat_sums={k: sum(t.stat_sums[k] for t in replicas) / n for k in keys},
    )
