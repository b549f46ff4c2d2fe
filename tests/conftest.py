"""Shared fixtures: an isolated dataset cache and a tiny, fast config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from neuroplex.config import Config, load_config, merge
from neuroplex.train.progress import NullProgress


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own NEUROPLEX_CACHE, shared within a session for speed."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("NEUROPLEX_CACHE", str(cache))
    return cache


TINY_OVERRIDES = [
    "name=tiny",
    "data.name=digits",
    "model.stages=[{kind: dense, width: 32, dropout: 0.1}, {kind: dense, width: 16}]",
    "train.epochs=3",
    "train.batch_size=64",
    "train.lr=0.01",
]


@pytest.fixture
def tiny_config() -> Config:
    """Two small dense stages on scikit-learn digits, 3 epochs: trains in about a second."""
    return load_config(None, TINY_OVERRIDES)


class KillAt(NullProgress):
    """Simulates the process being killed at a given step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def advance(self, step: int, loss: float) -> None:
        if step == self.step:
            raise KeyboardInterrupt


@pytest.fixture
def kill_at() -> type[KillAt]:
    """``kill_at(step)``: a progress display that interrupts training at ``step``."""
    return KillAt


SMALL = {
    "name": "small",
    "threads": 1,  # a tiny model: one thread is faster, above all on a busy machine
    "data": {"name": "digits"},
    "model": {"stages": [{"kind": "dense", "width": 16}]},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.01},
    "log": {"tensorboard": False},
}


def write_small_yaml(directory: Path, changes: dict[str, Any] | None = None) -> Path:
    """``directory/small.yaml``: one dense stage on digits, 2 epochs of 9 steps (for tests that
    train many runs), with ``changes`` merged in."""
    path = directory / "small.yaml"
    path.write_text(yaml.safe_dump(merge(SMALL, changes or {})), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def small_yaml():
    """``small_yaml(directory, changes=None)``: write the small config, return its path."""
    return write_small_yaml
