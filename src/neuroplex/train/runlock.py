"""One writer per run directory: an OS file lock on ``RUN/.lock``, held for the run's life.

``fcntl.flock`` locks belong to the open file, so the kernel releases them when the holder dies
in any way (exit, exception, SIGKILL); a stale ``.lock`` file is harmless. The holder writes its
pid into the file so that a second writer can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from neuroplex.errors import NeuroplexError

LOCK = ".lock"


class RunDirBusy(NeuroplexError):
    """Another process is writing the run directory."""


@contextmanager
def run_dir_lock(run_dir: Path, *, enabled: bool = True) -> Iterator[None]:
    """Hold the lock of ``run_dir`` (created if missing) for the ``with`` block; raise
    RunDirBusy at once if another process holds it. ``enabled=False`` (ranks that never write)
    does nothing. Directories created here and left empty (the run failed to start) are removed
    again."""
    if not enabled:
        yield
        return
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        _acquire(fd, run_dir)
        yield
    except BaseException:
        if created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()
            for folder in created:
                folder.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def _acquire(fd: int, run_dir: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RunDirBusy(
            f"{run_dir}: in use by another neuroplex process ({_holder(fd)}); wait for it to "
            "end, or choose another --run-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def _holder(fd: int) -> str:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return f"pid {text}" if text.isdigit() else "pid not yet written"
