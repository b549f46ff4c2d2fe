"""Starting the pipeline's processes (``train.parallel: N``, see distributed/pipeline.py).

``neuroplex train CONFIG`` starts the N workers on this machine (``torch.multiprocessing``, a
file rendezvous in a temporary directory) and waits for them; under ``torchrun`` this process is
one of the ranks (N stage groups x R data-parallel replicas) and runs its worker itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from neuroplex.config import Config
from neuroplex.distributed.failures import (
    summary_after_spawn_failure,
    under_torchrun,
    worker_failure,
)
from neuroplex.distributed.parallel import PipelineError, PipelineWorld
from neuroplex.distributed.pipeline import Job, run_worker
from neuroplex.errors import ConfigError, NeuroplexError, TrainingDiverged
from neuroplex.interrupts import raising
from neuroplex.train.progress import NullProgress
from neuroplex.train.runlock import run_dir_lock


def train_pipeline(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    stop_after_epoch: int | None,
    progress: NullProgress | None,
) -> dict[str, Any]:
    """Run ``cfg`` as a pipeline of ``cfg.train.parallel`` stage groups; return the summary.

    Under torchrun this process is one of the ranks; otherwise it starts the workers, waits, and
    raises the error a worker reported (or a PipelineError naming the rank that died).
    """
    shown = type(progress) if progress is not None else NullProgress
    if under_torchrun():
        job = Job(cfg, run_dir, resume, stop_after_epoch, shown, None)
        rank = int(os.environ["RANK"])
        with run_dir_lock(run_dir, enabled=rank == 0):
            return run_worker(rank, job, launched_world(cfg))
    with run_dir_lock(run_dir):
        return spawn_workers(cfg, run_dir, resume, stop_after_epoch, shown)


def launched_world(cfg: Config) -> PipelineWorld:
    """This rank's place among the ranks torchrun started: N groups x R replicas."""
    n, size = cfg.train.parallel, int(os.environ["WORLD_SIZE"])
    if size % n:
        raise ConfigError(
            f"train.parallel = {n}: torchrun started {size} processes; expected a multiple of "
            f"{n} (stage groups x data-parallel replicas)"
        )
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    return PipelineWorld(rank, size, local_rank, replicas=size // n)


def spawn_workers(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    stop_after_epoch: int | None,
    progress: type[NullProgress],
) -> dict[str, Any]:
    """Start ``cfg.train.parallel`` workers on this machine and wait for them."""
    n = cfg.train.parallel
    errors = mp.get_context("spawn").SimpleQueue()
    with tempfile.TemporaryDirectory(prefix="neuroplex-pipeline-") as tmp:
        job = Job(cfg, run_dir, resume, stop_after_epoch, progress, f"file://{tmp}/store")
        try:
            with quiet_spawn():
                context = mp.spawn(_worker, args=(job, errors), nprocs=n, join=False)
                join_workers(context)
        except ProcessException as e:  # the others were terminated: no hang
            error = worker_failure(e, errors, run_dir)
            if isinstance(error, PipelineError | TrainingDiverged):
                summary_after_spawn_failure(cfg, run_dir, error)
            raise error from e
    return json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))


def join_workers(context: mp.ProcessContext) -> None:
    """Wait for every worker. Interrupted (Ctrl-C reaches the workers too; SIGTERM only this
    process, which passes it on at once), make sure each worker gets SIGINT, so rank 0 writes the
    interrupted summary, then wait for them to end."""
    try:
        while not context.join():
            pass
    except KeyboardInterrupt as e:
        grace = 0.0 if getattr(e, "signal_name", "SIGINT") == "SIGTERM" else STOP_GRACE_S
        for p in context.processes:
            p.join(grace)
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


def _worker(rank: int, job: Job, errors: Any) -> None:
    """Entry point of spawned pipeline process ``rank``; a NeuroplexError goes to the parent."""
    signal.signal(signal.SIGINT, raising(KeyboardInterrupt))  # the parent's stop request
    try:
        run_worker(rank, job, PipelineWorld(rank, job.cfg.train.parallel, local_rank=rank))
    except NeuroplexError as e:
        errors.put((rank, e))
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # the parent reports the interruption, in one line
        raise SystemExit(130) from None
