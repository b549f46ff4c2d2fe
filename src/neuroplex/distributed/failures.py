"""When a pipeline process dies: one error line naming the lost rank, and a ``summary.json`` that
says what happened, what checkpoint is kept and how to continue.

Launched by ``neuroplex train`` (``torch.multiprocessing``), the parent waits for the workers and
writes the summary; launched by ``torchrun``, the surviving process holding the run directory's
lock does (rank 0, or, if rank 0 is the one lost, the first other rank to take the lock).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch.multiprocessing.spawn import ProcessException, ProcessRaisedException

from neuroplex.config import Config
from neuroplex.distributed.parallel import PipelineError, PipelineWorld
from neuroplex.errors import CheckpointError, NeuroplexError, TrainingDiverged
from neuroplex.train.checkpoint import INDEX, checkpoint_root, load_checkpoint
from neuroplex.train.rundir import LoopState, kept_checkpoint, loop_state, write_summary
from neuroplex.train.runlock import RunDirBusy, run_dir_lock
from neuroplex.train.setup import Setup, build_setup


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resume_command(run_dir: Path) -> str:
    """How to continue ``run_dir``: the same launch with ``--resume``."""
    if under_torchrun():
        return f"relaunch the same torchrun command with `--resume {run_dir}`"
    return f"continue with `neuroplex train --resume {run_dir}`"


def with_resume_hint(message: str, run_dir: Path) -> str:
    """``message`` and, if the run has a checkpoint, where it is and how to resume."""
    if not (checkpoint_root(run_dir) / INDEX).is_file():
        return message
    return f"{message}; {kept_checkpoint(run_dir)}: {resume_command(run_dir)}"


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
        return reported[e.error_index]  # the hint is in it already
    if isinstance(e, ProcessRaisedException):
        last = e.msg.strip().splitlines()[-1] if e.msg.strip() else "unknown error"
        what = f"pipeline rank {e.error_index} failed: {last}"
    else:
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        what = f"pipeline rank {e.error_index} died ({how})"
    return PipelineError(with_resume_hint(what, run_dir))


def checkpointed_state(run_dir: Path) -> LoopState:
    """The loop state of the last checkpoint (where a resume continues); a fresh state if the run
    has none or it cannot be read."""
    try:
        return loop_state(load_checkpoint(run_dir, "last").state["loop"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return LoopState()


def write_failure_summary(run_dir: Path, s: Setup, error: NeuroplexError) -> dict[str, Any]:
    """``summary.json`` of a run a process loss (or a diverged stage on another process) ended:
    status ``diverged`` or ``failed``, the error with the resume hint, figures up to the last
    checkpoint."""
    status = "diverged" if isinstance(error, TrainingDiverged) else "failed"
    return write_summary(run_dir, s, checkpointed_state(run_dir), status=status, error=str(error))


def summary_after_spawn_failure(cfg: Config, run_dir: Path, error: NeuroplexError) -> None:
    """The parent of spawned workers writes the summary (it holds the lock). Nothing if the run
    never got its config; a model that cannot even be built again leaves only the error line."""
    if not (run_dir / "config.yaml").is_file():
        return
    try:
        s = build_setup(cfg, PipelineWorld(0, cfg.train.parallel))
    except (NeuroplexError, OSError, RuntimeError):
        return
    write_failure_summary(run_dir, s, error)


def summary_after_peer_loss(run_dir: Path, s: Setup, error: PipelineError) -> None:
    """Under torchrun: rank 0 writes the summary; another rank writes it only if it can take the
    run directory's lock within a few seconds (rank 0 is gone: the kernel releases its lock as
    it exits) and no process wrote one since this one started."""
    if s.world.is_main:
        write_failure_summary(run_dir, s, error)
        return
    if not (run_dir / "config.yaml").is_file():
        return  # this node does not see the run directory
    deadline = time.monotonic() + LOCK_WAIT_S
    while True:
        try:
            with run_dir_lock(run_dir):
                if not written_since_start(run_dir / "summary.json"):
                    main = PipelineWorld(0, s.world.size)  # write as the run's writer would
                    write_failure_summary(run_dir, replace(s, world=main), error)
                return
        except RunDirBusy:
            if time.monotonic() > deadline:
                return  # rank 0 is alive and writes it
            time.sleep(0.1)


LOCK_WAIT_S = 5.0
STARTED = time.time()  # when this process imported the pipeline


def written_since_start(path: Path) -> bool:
    return path.is_file() and path.stat().st_mtime >= STARTED
