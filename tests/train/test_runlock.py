"""One writer per run directory: the second writer gets one line naming the holder's pid."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from neuroplex.files import read_jsonl
from neuroplex.train import loop
from neuroplex.train.progress import NullProgress
from neuroplex.train.runlock import LOCK, RunDirBusy, run_dir_lock

# An independent holder: the fcntl protocol written out by hand in another process.
HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, str(os.getpid()).encode())
print("held", flush=True)
time.sleep(120)
"""


def untimed(run) -> list[dict]:
    rows = read_jsonl(run / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in ("samples_per_s", "wall_time")} for r in rows]


class PauseAt(NullProgress):
    """Blocks the training thread at ``step`` until ``go`` is set."""

    def __init__(self, step: int) -> None:
        self.step, self.paused, self.go = step, threading.Event(), threading.Event()

    def advance(self, step: int, loss: float) -> None:
        if step == self.step:
            self.paused.set()
            assert self.go.wait(60)


def test_second_writer_in_another_process_is_refused_naming_its_pid(tiny_config, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run / LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(
            RunDirBusy,
            match=rf"in use by another neuroplex process \(pid "
            rf"{holder.pid}\)",
        ):
            loop.train(tiny_config, run)
        assert not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # SIGKILL: the kernel releases the lock
        holder.wait()
    loop.train(tiny_config, run)  # the dead holder's lock file is no obstacle
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]


def test_train_and_resume_while_a_run_trains_are_refused_and_it_logs_each_epoch_once(
    tiny_config, tmp_path
):
    run = tmp_path / "run"
    first = loop.train(tiny_config, tmp_path / "alone")
    pause = PauseAt(25)  # in epoch 2 (21 steps per epoch)
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(loop.train(tiny_config, run, progress=pause))
    )
    worker.start()
    try:
        assert pause.paused.wait(60)
        for resume in (False, True):
            with pytest.raises(RunDirBusy, match=f"pid {os.getpid()}"):
                loop.train(tiny_config, run, resume=resume)
    finally:
        pause.go.set()
        worker.join()
    assert [r["epoch"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2, 3]
    assert untimed(run) == untimed(tmp_path / "alone")
    assert result["test_acc"] == first["test_acc"]


def test_lock_is_released_when_the_block_ends_or_raises(tmp_path):
    with pytest.raises(ZeroDivisionError), run_dir_lock(tmp_path / "run"):
        raise ZeroDivisionError
    with run_dir_lock(tmp_path / "run"):
        assert (tmp_path / "run" / LOCK).read_text().strip() == str(os.getpid())
