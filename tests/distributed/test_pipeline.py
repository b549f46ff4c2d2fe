"""Pipelined stage parallelism: the same parameters as sequential local learning, a dead worker
ends the run in bounded time with a resumable checkpoint, and bad configs are one-line errors."""

import json
import time

import numpy as np
import pytest
import torch
from torch.multiprocessing.spawn import ProcessExitedException, ProcessRaisedException

from neuroplex.config import load_config
from neuroplex.distributed.parallel import PipelineError
from neuroplex.distributed.pipeline import EXIT_AT, split_stages, worker_failure
from neuroplex.errors import ConfigError, TrainingDiverged
from neuroplex.files import read_jsonl
from neuroplex.train.checkpoint import load_checkpoint
from neuroplex.train.loop import train

# Dropout in stage 0 only, which rank 0 trains with the run's own random stream: the masks are
# the sequential run's, and resume must restore the stream exactly.
STAGES = (
    "[{kind: dense, width: 24, dropout: 0.2}, {kind: dense, width: 16}, {kind: dense, width: 16}]"
)
TIMING = {"samples_per_s", "wall_time"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """A small learnable .npz (3 classes from the sign pattern of two features): no generation
    or scikit-learn import in the spawned processes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 12)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0.5).astype(np.int64)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, x=x, y=y)
    return path


def tiny(data_file, *extra: str):
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


@pytest.fixture(scope="module")
def sequential(data_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sequential"
    torch.set_num_threads(1)  # as each pipeline process
    train(tiny(data_file), run_dir)
    return run_dir


def assert_same_run(run_dir, reference):
    """Same checkpointed tensors (model, aux nets, optimizer state) and the same metrics."""
    got, want = load_checkpoint(run_dir, "last").tensors, load_checkpoint(reference).tensors
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    rows, ref_rows = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(reference / "metrics.jsonl")
    assert len(rows) == len(ref_rows) == 2
    for row, ref in zip(rows, ref_rows, strict=True):
        assert row.keys() == ref.keys()
        for key in row.keys() - TIMING:
            assert row[key] == pytest.approx(ref[key], rel=1e-5), key


def test_the_tiny_model_splits_after_stage_0(data_file):
    from neuroplex.distributed.pipeline import stage_costs
    from neuroplex.train.setup import build_setup

    assert split_stages(stage_costs(build_setup(tiny(data_file)).method), 2)[0] == range(0, 1)


def test_groups_are_contiguous_and_minimise_the_largest_cost():
    # four stages as at width 512 on MNIST-1D: a small first stage, then three large ones
    assert split_stages([38, 279, 279, 267], 2) == [range(0, 2), range(2, 4)]
    assert split_stages([5, 1, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 6)]
    assert split_stages([1, 1, 1], 3) == [range(0, 1), range(1, 2), range(2, 3)]
    assert split_stages([1, 2, 3], 1) == [range(0, 3)]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["train.parallel=2"], ["train.parallel = 2", "train.method = 'local'"]),
        (["train.parallel=5", "train.method=local"], ["train.parallel = 5", "number of stages"]),
        (
            ["train.parallel=2", "train.method=local", "train.aux.kind=momentum"],
            ["train.aux.kind = 'momentum'", "train.parallel = 2"],
        ),
        (
            [
                "train.parallel=2",
                "train.method=local",
                "model.stages=[{kind: sparse}, {kind: dense}]",
                "train.plasticity={kind: set}",
            ],
            ["train.plasticity", "train.parallel = 2"],
        ),
    ],
)
def test_bad_parallel_config_is_a_one_line_error(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error: ")
    for word in words:
        assert word in message


def test_two_processes_give_the_sequential_parameters(data_file, sequential, tmp_path):
    summary = train(tiny(data_file, "train.parallel=2"), tmp_path / "pipeline")
    assert summary["status"] == "completed" and summary["ranks"] == 2
    assert summary["steps"] == json.loads((sequential / "summary.json").read_text())["steps"]
    assert_same_run(tmp_path / "pipeline", sequential)


def test_a_dead_worker_ends_the_run_and_the_checkpoint_resumes(
    data_file, sequential, tmp_path, monkeypatch
):
    cfg = tiny(data_file, "train.parallel=2")
    run_dir = tmp_path / "pipeline"
    monkeypatch.setenv("NEUROPLEX_DIST_TIMEOUT", "30")  # a stalled wait would end within 30 s
    monkeypatch.setenv(EXIT_AT, "1:14")  # rank 1 dies in epoch 2 (10 steps per epoch)
    start = time.monotonic()
    with pytest.raises(PipelineError, match="rank 1") as info:
        train(cfg, run_dir)
    assert time.monotonic() - start < 60  # bounded: no hang (not a speed measurement)
    assert "--resume" in str(info.value) and "\n" not in str(info.value)
    assert load_checkpoint(run_dir).state["loop"]["epoch"] == 1
    monkeypatch.delenv(EXIT_AT)
    assert train(cfg, run_dir, resume=True)["status"] == "completed"
    assert_same_run(run_dir, sequential)


class Reports:
    """The parent's error queue, as filled by the workers."""

    def __init__(self, *items):
        self.items = list(items)

    def empty(self):
        return not self.items

    def get(self):
        return self.items.pop(0)


def test_the_reported_error_is_the_root_cause_not_the_lost_peer(tmp_path):
    died = ProcessExitedException("", error_index=0, error_pid=1, exit_code=1)
    lost = PipelineError("pipeline rank 0: sending to rank 1 failed: Connection closed by peer")
    diverged = TrainingDiverged("loss became nan at step 3 (epoch 1)")
    assert worker_failure(died, Reports((0, lost), (1, diverged)), tmp_path) is diverged
    only_lost = worker_failure(died, Reports((0, lost)), tmp_path)
    assert str(only_lost) == str(lost)  # no checkpoint yet: no resume hint
    silent = ProcessExitedException(
        "", error_index=1, error_pid=2, exit_code=-9, signal_name="SIGKILL"
    )
    assert (
        str(worker_failure(silent, Reports(), tmp_path)) == "pipeline rank 1 died (signal SIGKILL)"
    )
    bug = ProcessRaisedException("Traceback ...\n  ...\nIndexError: list index out of range", 1, 2)
    message = str(worker_failure(bug, Reports(), tmp_path))
    assert message == "pipeline rank 1 failed: IndexError: list index out of range"


# ---------------------------------------------------------------------------------------------
# conv stages: feature maps [b, c, h, w] sent between the processes

CONV_STAGES = (
    "[{kind: conv, channels: 4, pool: max}, {kind: residual, channels: 6, blocks: 1, stride: 2},"
    " {kind: pool}]"
)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A small learnable image .npz (uint8 8x8, class = the brighter half of the image)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(240, 8, 8), dtype=np.uint8)
    y = (x[:, :4].mean(axis=(1, 2)) > x[:, 4:].mean(axis=(1, 2))).astype(np.int64)
    path = tmp_path_factory.mktemp("images") / "tiny_images.npz"
    np.savez(path, x=x, y=y)
    return path


def tiny_conv(image_file, *extra: str):
    return load_config(
        None,
        [
            "data.name=images",
            f"data.path={image_file}",
            "data.shape=image",
            f"model.stages={CONV_STAGES}",
            "train.method=local",
            "train.aux.kind=augmented",
            "train.aux.widen=0.5",
            "train.epochs=2",
            "train.batch_size=32",
            "train.lr=0.01",
            "threads=1",
            *extra,
        ],
    )


def test_two_processes_on_conv_stages_give_the_sequential_parameters(image_file, tmp_path):
    from neuroplex.distributed.pipeline import stage_costs
    from neuroplex.train.setup import build_setup

    first = split_stages(stage_costs(build_setup(tiny_conv(image_file)).method), 2)[0]
    assert first.stop in (1, 2)  # rank 0 sends a feature map (the pool stage comes last)
    torch.set_num_threads(1)  # as each pipeline process
    train(tiny_conv(image_file), tmp_path / "sequential")
    summary = train(tiny_conv(image_file, "train.parallel=2"), tmp_path / "pipeline")
    assert summary["status"] == "completed" and summary["ranks"] == 2
    assert_same_run(tmp_path / "pipeline", tmp_path / "sequential")
