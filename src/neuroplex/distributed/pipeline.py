"""Pipelined stage parallelism for local learning (``train.parallel: N``).

The stages are split into N contiguous groups balanced by parameter count (a stage plus its aux
net, or the head for the last stage), one process each, started by ``torch.multiprocessing`` and
joined by ``torch.distributed`` (gloo on CPU, nccl on GPU). Rank 0 reads the batches in the loop's
epoch order and trains group 0 exactly as ``Local`` does, then sends the detached output and the
labels to rank 1, which trains group 1 and sends on; the last group owns the head. No gradient goes
back. Sends and receives are asynchronous with two batches in flight (train.parallel.Pipe), so
communication overlaps compute.

Every process builds the whole model and the whole ``Local`` method from the same seed (so the
same initialisation) and trains only its group. At the end of each epoch the groups' state (stages,
aux nets, optimizer state) and step totals are gathered into rank 0, which then holds the whole
model: it evaluates, and the one loop writes metrics and checkpoints in the sequential run's
format. Resume loads the whole checkpoint in every process (each gets its own RNG state back).

A worker that dies or stalls ends the run in bounded time: every wait has a deadline
(``NEUROPLEX_DIST_TIMEOUT`` seconds, default 300), the others fail naming the lost rank, and the
parent raises one error; the last checkpoint stays resumable.

Shape legend: ``b`` batch, ``d`` features.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from itertools import accumulate
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException

from neuroplex.config import Config
from neuroplex.distributed.parallel import (
    Pipe,
    PipelineError,
    PipelineWorld,
    join_process_group,
    peer_guard,
)
from neuroplex.errors import ConfigError, NeuroplexError
from neuroplex.methods.local import Local
from neuroplex.network import stage_out_shape
from neuroplex.train.checkpoint import INDEX, checkpoint_root
from neuroplex.train.evaluate import evaluate_splits
from neuroplex.train.loop import EpochTotals, epoch_batches, finish_epoch, run_epochs, train_batch
from neuroplex.train.memory import ActivationMeter
from neuroplex.train.method import StepResult
from neuroplex.train.progress import NullProgress
from neuroplex.train.rundir import LoopState, restore, start_run_dir
from neuroplex.train.setup import Setup, build_setup

EXIT_AT = "NEUROPLEX_PIPELINE_EXIT_AT"  # test hook "RANK:STEP": that process dies after STEP steps


@dataclass(frozen=True)
class Job:
    """What every pipeline process is given (pickled to the spawned processes)."""

    cfg: Config
    run_dir: Path
    resume: bool
    stop_after_epoch: int | None
    progress: type[NullProgress]  # instantiated by rank 0
    init_method: str  # rendezvous of the process group


def train_pipeline(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    stop_after_epoch: int | None,
    progress: NullProgress | None,
) -> dict[str, Any]:
    """Run ``cfg`` as ``cfg.train.parallel`` pipeline processes; wait; return the summary.

    Raises the error a worker reported (or a PipelineError naming the rank that died).
    """
    n = cfg.train.parallel
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"train.parallel = {n}: cannot run under torchrun (data parallel); "
            "start it with plain `neuroplex train`"
        )
    errors = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="neuroplex-pipeline-") as tmp:
        shown = type(progress) if progress is not None else NullProgress
        job = Job(cfg, run_dir, resume, stop_after_epoch, shown, f"file://{tmp}/store")
        try:
            with quiet_spawn():
                context = mp.spawn(_worker, args=(job, errors), nprocs=n, join=False)
                join_workers(context)
        except ProcessException as e:  # the others were terminated: no hang
            raise worker_failure(e, errors, run_dir) from e
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def join_workers(context: mp.ProcessContext) -> None:
    """Wait for every worker. Interrupted (Ctrl-C reaches the workers too; SIGTERM only this
    process), make sure each worker gets SIGINT, so rank 0 writes the interrupted summary, then
    wait for them to end."""
    try:
        while not context.join():
            pass
    except KeyboardInterrupt:
        for p in context.processes:
            p.join(STOP_GRACE_S)
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in context.processes:
            p.join(STOP_WAIT_S)
            if p.is_alive():
                p.kill()
        raise


STOP_GRACE_S = 2.0  # a worker that got Ctrl-C itself has ended by then, or is writing the summary
STOP_WAIT_S = 60.0  # then a worker still running is killed


@contextmanager
def quiet_spawn() -> Iterator[None]:
    """Silence torch's warning that it is terminating the other workers after one failed: the
    error reported is the one line the user needs."""
    logger = logging.getLogger("torch.multiprocessing.spawn")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def worker_failure(e: ProcessException, errors: Any, run_dir: Path) -> NeuroplexError:
    """The error to report when a worker ended the run: the root cause a worker reported (a lost
    peer is only a consequence), else what happened to the first rank that failed (``--debug``
    shows its traceback)."""
    reported: dict[int, NeuroplexError] = {}
    while not errors.empty():
        rank, error = errors.get()
        reported.setdefault(rank, error)
    causes = [err for err in reported.values() if not isinstance(err, PipelineError)]
    if causes:
        return causes[0]
    if e.error_index in reported:
        what = str(reported[e.error_index])
    elif isinstance(e, ProcessRaisedException):
        last = e.msg.strip().splitlines()[-1] if e.msg.strip() else "unknown error"
        what = f"pipeline rank {e.error_index} failed: {last}"
    else:
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        what = f"pipeline rank {e.error_index} died ({how})"
    if (checkpoint_root(run_dir) / INDEX).is_file():
        what += (
            f"; the last checkpoint in {checkpoint_root(run_dir)} is kept: continue with "
            f"`neuroplex train --resume {run_dir}`"
        )
    return PipelineError(what)


def _worker(rank: int, job: Job, errors: Any) -> None:
    """Entry point of pipeline process ``rank``; a NeuroplexError goes to the parent."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the parent's stop request
    try:
        run_worker(rank, job)
    except NeuroplexError as e:
        errors.put((rank, e))
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # the parent reports the interruption, in one line
        raise SystemExit(130) from None


def run_worker(rank: int, job: Job) -> dict[str, Any]:
    """Build the run, join the group, train this process's stage group through the one loop."""
    cfg = job.cfg
    torch.set_num_threads(cfg.threads or 1)
    world = PipelineWorld(rank, cfg.train.parallel, local_rank=rank)
    # Built before the process group exists, so Local does not wrap its stages in DDP: the
    # pipeline's stages are not data parallel.
    s = build_setup(cfg, world)
    # The same initialisation everywhere; then rank 0 goes on with the run's own random stream
    # (dropout, router noise), as the sequential run's first stages do, and every other process
    # gets a stream of its own, so no two stage groups draw the same masks.
    if rank > 0:
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, rank]).generate_state(1)[0]))
    join_process_group(rank, world.size, rank, job.init_method)
    try:
        groups = split_stages(stage_costs(s.method), world.size)
        s.method = StageGroup(s.method, groups[rank], Pipe(rank, world.size))
        progress = job.progress() if world.is_main else NullProgress()
        state = restore(job.run_dir, s) if job.resume else start_run_dir(job.run_dir, s)
        return run_epochs(s, state, job.run_dir, job.stop_after_epoch, progress, pipeline_epoch)
    finally:
        dist.destroy_process_group()


def stage_costs(local: Local) -> list[int]:
    """Trainable parameters of each stage with its aux net (the head for the last stage): the
    compute per sample of a dense stage, up to a constant."""
    return [
        sum(p.numel() for p in trainee.parameters() if p.requires_grad)
        for trainee in local.trainees
    ]


def split_stages(costs: list[int], n: int) -> list[range]:
    """``n`` contiguous, non-empty groups of stages whose largest total cost is the smallest
    possible (ties: the earliest boundaries)."""
    prefix = [0, *accumulate(costs)]

    @cache
    def best(k: int, end: int) -> tuple[int, tuple[int, ...]]:
        """Stages ``[0, end)`` in ``k`` groups: (largest group cost, first stage of each group)."""
        if k == 1:
            return prefix[end], (0,)
        options = []
        for start in range(k - 1, end):  # the last group is [start, end)
            worst, starts = best(k - 1, start)
            options.append((max(worst, prefix[end] - prefix[start]), (*starts, start)))
        return min(options)

    bounds = [*best(n, len(costs))[1], len(costs)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


class StageGroup:
    """The method of one pipeline process: ``Local`` on its stages; the output goes on to the
    next process. Checkpoint state is the whole ``Local``'s (rank 0 holds it after a gather)."""

    def __init__(self, local: Local, stages: range, pipe: Pipe) -> None:
        self.local, self.stages, self.pipe = local, stages, pipe

    def step(self, x: Tensor, y: Tensor, lr: float) -> StepResult:
        """Train the group on ``x [b, d_in]`` (the previous group's output), ``y [b]``; send the
        output ``[b, d_out]`` and ``y`` on. The loss is the group's last local loss."""
        result, h = self.local.train_stages(self.stages, x, y, lr)
        if not self.pipe.last:
            self.pipe.send(h, y)
        return result

    def batches(self, s: Setup, epoch: int, done_steps: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This process's inputs for ``epoch``: rank 0 reads the data, the others receive."""
        batches = epoch_batches(s, epoch, done_steps)
        if self.pipe.first:
            return (
                s.data.train_batch(idx, (s.cfg.seed, epoch, done_steps + i))
                for i, idx in enumerate(batches)
            )
        shape = stage_out_shape(s.model.stages[self.stages.start - 1])
        dtype = next(s.model.parameters()).dtype
        return self.pipe.receive([len(idx) for idx in batches], shape, dtype, s.device)

    def part(self) -> dict[int, tuple[dict[str, Any], dict[str, Any]]]:
        """State this process trains: per stage, (stage + aux/head, optimizer) state dicts."""
        trainees, optimizers = self.local.trainees, self.local.optimizers
        return {i: (trainees[i].state_dict(), optimizers[i].state_dict()) for i in self.stages}

    def load_part(self, part: dict[int, tuple[dict[str, Any], dict[str, Any]]]) -> None:
        for i, (module, optimizer) in part.items():
            self.local.trainees[i].load_state_dict(module)
            self.local.optimizers[i].load_state_dict(optimizer)

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
    """Collect every group's state into rank 0's model, which it evaluates; every process gets
    the whole run's totals and the evaluation."""
    parts: list[Any] | None = [None] * s.world.size if s.world.is_main else None
    with peer_guard(s.world.rank, "gathering the epoch's state"):
        dist.gather_object((totals, group.part()), parts, dst=0)
    box: list[Any] = [None]
    if parts is not None:
        for _, part in parts[1:]:
            group.load_part(part)
        box = [(merge_totals([t for t, _ in parts]), evaluate_splits(s.model, s.data))]
    with peer_guard(s.world.rank, "receiving the epoch's evaluation"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def merge_totals(per_rank: list[EpochTotals]) -> EpochTotals:
    """Loss and accuracy are the head's (last rank); statistics of every stage; the epoch took
    as long as the slowest process."""
    stats: dict[str, float] = {}
    for totals in per_rank:
        stats.update(totals.stat_sums)
    return replace(
        per_rank[-1],
        seconds=max(t.seconds for t in per_rank),
        activation_peak=max(t.activation_peak for t in per_rank),
        stat_sums=stats,
    )
