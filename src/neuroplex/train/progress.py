"""Progress reporting: a rich bar on a terminal, one plain line per epoch otherwise.

The loop talks to a reporter through four calls; ``NullProgress`` does nothing (tests, library use).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


def format_epoch(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']:>4}", f"step {record['step']:>6}"]
    for key in ("train_loss", "train_acc", "val_acc", "test_acc"):
        if record.get(key) is not None:
            parts.append(f"{key} {record[key]:.4f}")
    parts.append(f"lr {record['lr']:.2e}")
    parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    return "  ".join(parts)


class NullProgress:
    def start(self, total_steps: int, done_steps: int) -> None: ...
    def advance(self, step: int, loss: float) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


class PlainProgress(NullProgress):
    """One line per epoch on stderr (CI logs, pipes)."""

    def epoch_end(self, record: dict[str, Any]) -> None:
        print(format_epoch(record), file=sys.stderr, flush=True)


class RichProgress(NullProgress):
    """A live bar with the running loss; epoch lines printed above it."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = None

    def start(self, total_steps: int, done_steps: int) -> None:
        self.bar.start()
        self.task = self.bar.add_task("train", total=total_steps, completed=done_steps, loss="-")

    def advance(self, step: int, loss: float) -> None:
        self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.bar.console.print(format_epoch(record), highlight=False)

    def close(self) -> None:
        self.bar.stop()


def default_progress() -> NullProgress:
    """Rich on an interactive terminal, plain lines in CI or when piped."""
    if sys.stderr.isatty() and not os.environ.get("CI"):
        return RichProgress()
    return PlainProgress()
