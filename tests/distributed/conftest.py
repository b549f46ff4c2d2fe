"""What the pipeline tests share: a tiny data file and config, the sequential local run they are
compared with, and the comparison."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroplex.config import Config, load_config
from neuroplex.files import read_jsonl
from neuroplex.train.checkpoint import load_checkpoint
from neuroplex.train.loop import train

# Four stages, dropout in three: each stage draws from its own stream, so a pipeline draws the
# sequential run's masks wherever the stage runs, and resume must restore the streams exactly.
STAGES = (
    "[{kind: dense, width: 24, dropout: 0.2}, {kind: dense, width: 16, dropout: 0.1}, "
    "{kind: dense, width: 16, dropout: 0.1}, {kind: dense, width: 12}]"
)
TIMING = {"samples_per_s", "wall_time"}


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """A small learnable .npz (3 classes from the sign pattern of two features; 288 training
    samples, 9 batches of 32): no generation or scikit-learn import in the spawned processes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def tiny_config(data_file, *extra: str) -> Config:
    return load_config(
        None,
        [
            "data.name=file",
            f"data.path={data_file}",
            f"model.stages={STAGES}",
            "train.method=local",
            "train.aux.kind=linear",
            "train.epochs=2",
            "train.batch_size=32",
            "train.lr=0.01",
            "threads=1",
            *extra,
        ],
    )


@pytest.fixture(scope="session")
def tiny(data_file):
    """``tiny(*overrides)``: the tiny local-learning config."""
    return lambda *extra: tiny_config(data_file, *extra)


def sequential_run(cfg: Config, run_dir):
    torch.set_num_threads(1)  # as each pipeline process
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(name="sequential_run", scope="session")
def sequential_run_fixture():
    """``sequential_run(cfg, run_dir)``: train ``cfg`` in this process, as the reference."""
    return sequential_run


@pytest.fixture(scope="session")
def sequential(tiny, tmp_path_factory):
    """The sequential local run of the tiny config (one process, one thread)."""
    return sequential_run(tiny(), tmp_path_factory.mktemp("runs") / "sequential")


def assert_same_run(run_dir, reference, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same checkpointed tensors (model, aux nets, optimizer state, random streams) and the same
    metrics, but for timing."""
    got, want = load_checkpoint(run_dir, "last").tensors, load_checkpoint(reference).tensors
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=rtol, atol=atol, msg=key)
    rows, ref_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert len(rows) == len(ref_rows) > 0
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row.keys() == ref.keys()
        for key in row.keys() - TIMING:
            assert row[key] == pytest.approx(ref[key], rel=max(rtol, 1e-6)), key


@pytest.fixture(scope="session")
def same_run():
    return assert_same_run
