"""Atomic file writes: write a temp file in the same directory, fsync, rename over the target.

A process killed at any instant leaves either the old file or the new one, never a torn one.
Every write passes a :func:`crash_point`, where the kill test (tests/test_reliability.py) makes
the process "die" at the Nth write of each kind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroplex.errors import NeuroplexError

crash_hooks: list[Callable[[Path], None]] = []  # the kill test's; empty otherwise


def crash_point(path: Path) -> None:
    """A moment at which a kill could strike the write of ``path``: call the test hooks."""
    for hook in crash_hooks:
        hook(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` and atomically move the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~current_umask())  # mkstemp makes 0600 files
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    crash_point(path)  # a kill here leaves the temp file: the next run start removes it
    os.replace(tmp_path, path)
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def json_line(record: dict[str, Any]) -> str:
    """One record as a JSON Lines line (sorted keys, newline-terminated)."""
    return json.dumps(record, sort_keys=True) + "\n"


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and fsync (a torn last line is skipped by ``read_jsonl``)."""
    line = json_line(record)
    with open(path, "a", encoding="utf-8") as f:
        f.write(line[: len(line) // 2])
        f.flush()
        crash_point(Path(path))  # a kill here leaves a torn last line
        f.write(line[len(line) // 2 :])
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike, key: str | None = None) -> list[dict[str, Any]]:
    """Read complete JSON lines; a final line cut short by a crash is ignored. Each line must
    be a JSON object (holding an integer ``key``, if given), else NeuroplexError names it."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            records.append(_record(path, number, line, key))
    return records


def _record(path: str | os.PathLike, number: int, line: str, key: str | None) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict):
        raise NeuroplexError(f"{path}: line {number} is not a JSON object (edited or corrupted)")
    value = record.get(key) if key is not None else 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise NeuroplexError(
            f"{path}: line {number} has no integer {key!r} (edited or corrupted); got {value!r}"
        )
    return record


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; NeuroplexError naming the file if it is not one."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise NeuroplexError(f"{path}: not a JSON object (edited or corrupted)")
    return data


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
