"""Run a sweep: every run of the plan (neuroplex.sweep.grid), ``jobs`` processes at once.

A run whose summary says completed (or diverged: the same config diverges again) is skipped; a
run directory holding an unfinished run is resumed through the run's own resume (exact); any
other run starts fresh. So an interrupted sweep continues where it stopped when the same
command is given again. With ``jobs > 1`` each process trains with ``cores // jobs`` torch
threads (unless the config sets ``threads``).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from neuroplex.config import Config, load_config, to_yaml
from neuroplex.errors import NeuroplexError, TrainingDiverged
from neuroplex.files import read_json
from neuroplex.interrupts import raising
from neuroplex.sweep.grid import Run, parse_grid, parse_seeds, plan
from neuroplex.sweep.summary import write_sweep
from neuroplex.train.loop import train

DONE = ("completed", "diverged")


def sweep(
    config: str | Path | None,
    *,
    seeds: str | list[int] = "0",
    grid: list[str] | dict[str, list[str]] | None = None,
    out: str | Path,
    jobs: int = 1,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Train every (grid cell, seed) of ``config`` into ``out``; write ``sweep.json``,
    ``sweep.md`` and ``sweep.png`` there; return the sweep.json content. ``seeds`` and ``grid``
    as on the command line (``"0-4"``, ``["train.lr=1e-3,3e-3"]``) or parsed; ``say`` gets one
    line per run started."""
    if jobs < 1:
        raise NeuroplexError(f"--jobs {jobs}: expected an integer >= 1")
    seeds = parse_seeds(seeds) if isinstance(seeds, str) else list(seeds)
    grid = parse_grid(grid or []) if not isinstance(grid, dict) else grid
    config = Path(config) if config is not None else None
    runs = plan(config, seeds, grid, Path(out))
    todo = [(run, resumable(run)) for run in runs if not finished(run)]
    resumed = sum(resume for _, resume in todo)
    say(
        f"sweep: {len(runs)} runs in {out}: {len(runs) - len(todo)} done, {resumed} to resume, "
        f"{len(todo) - resumed} to start, {min(jobs, max(len(todo), 1))} at a time"
    )
    execute(todo, jobs, say)
    return write_sweep(Path(out), config, seeds, grid, runs)


def finished(run: Run) -> bool:
    """Whether ``run`` has a final summary (and is of the same config)."""
    path = run.run_dir / "summary.json"
    return resumable(run) and path.is_file() and read_json(path).get("status") in DONE


def resumable(run: Run) -> bool:
    """Whether ``run.run_dir`` holds a run (of this config: another is refused, one line)."""
    saved = run.run_dir / "config.yaml"
    if not saved.is_file():
        return False
    if to_yaml(load_config(saved)) != to_yaml(run.cfg):
        raise NeuroplexError(
            f"{run.run_dir}: holds a run of another config than this sweep's (the config or "
            "the grid changed?); choose another --out"
        )
    return True


def execute(todo: list[tuple[Run, bool]], jobs: int, say: Callable[[str], None]) -> None:
    """Train the runs: in this process for ``jobs == 1``, else ``jobs`` spawned processes at a
    time with the cores split among them. After an error no new run starts; the runs under way
    end, then the first error is raised. Interrupted (Ctrl-C, SIGTERM), every process under way
    is stopped (its run writes an interrupted summary) before the interrupt goes on."""
    if jobs == 1 or len(todo) <= 1:
        for i, (run, resume) in enumerate(todo, 1):
            say(f"[{i}/{len(todo)}] {'resume' if resume else 'start'} {run.run_dir}")
            say(f"[{i}/{len(todo)}] {train_one(run.cfg, run.run_dir, resume, None)}")
        return
    Processes(jobs, say).run(todo)


class Processes:
    """At most ``jobs`` runs at once, one spawned process each."""

    def __init__(self, jobs: int, say: Callable[[str], None]) -> None:
        self.jobs, self.say = jobs, say
        self.threads = max(1, len(os.sched_getaffinity(0)) // jobs)
        self.context = mp.get_context("spawn")
        self.errors = self.context.SimpleQueue()  # one line per failed run
        self.running: dict[Any, Run] = {}  # process -> its run

    def run(self, todo: list[tuple[Run, bool]]) -> None:
        pending, failures, done = list(todo), [], 0
        try:
            while pending or self.running:
                while pending and not failures and len(self.running) < self.jobs:
                    self.start(*pending.pop(0))
                for process in self.wait_any():
                    done += 1
                    failures += self.finish(process, f"[{done}/{len(todo)}]")
        except KeyboardInterrupt:
            for process in self.running:
                process.terminate()  # SIGTERM: the run stops as after Ctrl-C
            for process in self.running:
                process.join()
            raise
        if failures:
            raise NeuroplexError(failures[0])

    def start(self, run: Run, resume: bool) -> None:
        args = (run.cfg, run.run_dir, resume, self.threads, self.errors)
        process = self.context.Process(target=child, args=args)
        process.start()
        self.running[process] = run
        self.say(f"{'resume' if resume else 'start'} {run.run_dir} (process {process.pid})")

    def wait_any(self) -> list[Any]:
        sentinels = {process.sentinel: process for process in self.running}
        return [sentinels[s] for s in mp.connection.wait(list(sentinels))]

    def finish(self, process: Any, count: str) -> list[str]:
        """Reap ``process``; its failure as a one-item list (else empty)."""
        run = self.running.pop(process)
        process.join()
        if process.exitcode == 0:
            self.say(f"{count} {read_json(run.run_dir / 'summary.json')['status']} {run.run_dir}")
            return []
        message = self.errors.get() if not self.errors.empty() else None
        self.say(f"{count} failed {run.run_dir}")
        return [message or f"{run.run_dir}: its process ended with exit code {process.exitcode}"]


def child(cfg: Config, run_dir: Path, resume: bool, threads: int, errors: Any) -> None:
    """One run in a spawned process: Ctrl-C is left to the parent (which passes it on as
    SIGTERM, once); a user error goes back as one line."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, raising(Terminated))
    try:
        train_one(cfg, run_dir, resume, threads)
    except KeyboardInterrupt:
        raise SystemExit(143) from None
    except (NeuroplexError, OSError) as e:
        message = " ".join(str(e).split())
        errors.put(message if str(run_dir) in message else f"{run_dir}: {message}")
        raise SystemExit(2) from None


class Terminated(KeyboardInterrupt):
    """SIGTERM from the sweep, raised like Ctrl-C so that the run writes its summary."""

    signal_name = "SIGTERM"


def train_one(cfg: Config, run_dir: Path, resume: bool, threads: int | None) -> str:
    """Train (or resume) one run; its final status. A diverged run is a result, not an error."""
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return train(cfg, run_dir, resume=resume)["status"]
    except TrainingDiverged:
        return "diverged"
