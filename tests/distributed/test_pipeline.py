"""Pipelined stage parallelism launched by ``neuroplex train``: the same parameters as sequential
local learning for N = 2, 3, 4 (dropout included), a dead worker ends the run in bounded time with
a summary and a resumable checkpoint, a run killed at each kind of write or stopped by SIGTERM
resumes to the uninterrupted run, and bad configs are one-line errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from neuroplex.config import load_config, to_yaml
from neuroplex.distributed.balance import PLAN
from neuroplex.distributed.parallel import PipelineError
from neuroplex.distributed.pipeline import CRASH_AT, EXIT_AT
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.train.checkpoint import checkpoint_root, load_checkpoint
from neuroplex.train.loop import train

SUMMARY_TIMING = {"train_time_s", "peak_rss_bytes"}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_n_processes_give_the_sequential_parameters(tiny, sequential, same_run, tmp_path, n):
    summary = train(tiny(f"train.parallel={n}"), tmp_path / "pipeline")
    assert summary["status"] == "completed" and summary["ranks"] == n
    assert summary["steps"] == json.loads((sequential / "summary.json").read_text())["steps"]
    same_run(tmp_path / "pipeline", sequential)
    plan = json.loads((tmp_path / "pipeline" / PLAN).read_text())
    assert plan["balance"] == "time" and len(plan["stage_seconds"]) == 4
    assert [i for a, b in plan["groups"] for i in range(a, b + 1)] == [0, 1, 2, 3]
    assert len(plan["groups"]) == n and sum(plan["shares"]) == pytest.approx(1.0)
    # every boundary's transfer timed by both sides
    assert len(plan["transfer_seconds"]) == 3
    assert all(send > 0 and receive > 0 for send, receive in plan["transfer_seconds"])


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
        (["train.pipeline.balance=speed"], ["train.pipeline.balance", "speed"]),
    ],
)
def test_bad_parallel_config_is_a_one_line_error(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert "\n" not in message and message.startswith("config error: ")
    for word in words:
        assert word in message


def test_a_dead_worker_ends_the_run_writes_a_summary_and_the_checkpoint_resumes(
    tiny, sequential, same_run, tmp_path, monkeypatch
):
    cfg = tiny("train.parallel=2")
    run_dir = tmp_path / "pipeline"
    monkeypatch.setenv("NEUROPLEX_DIST_TIMEOUT", "30")  # a stalled wait would end within 30 s
    monkeypatch.setenv(EXIT_AT, "1:14")  # rank 1 dies in epoch 2 (9 steps per epoch)
    start = time.monotonic()
    with pytest.raises(PipelineError, match="rank 1") as info:
        train(cfg, run_dir)
    assert time.monotonic() - start < 60  # bounded: no hang (not a speed measurement)
    assert "--resume" in str(info.value) and "\n" not in str(info.value)
    assert load_checkpoint(run_dir).state["loop"]["epoch"] == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == str(info.value)
    assert summary["epochs"] == 1 and summary["steps"] == 9  # as of the checkpoint kept
    assert "epoch-0001" in summary["error"]
    monkeypatch.delenv(EXIT_AT)
    assert train(cfg, run_dir, resume=True)["status"] == "completed"
    same_run(run_dir, sequential)


def run_state(run_dir: Path) -> dict:
    """What a finished run leaves that must not depend on interruptions."""
    summary = json.loads((run_dir / "summary.json").read_text())
    last = json.loads((checkpoint_root(run_dir) / "index.json").read_text())["last"]
    tensors = load_file(str(checkpoint_root(run_dir) / last / "tensors.safetensors"))
    return {
        "metrics": [
            {k: v for k, v in r.items() if k not in {"samples_per_s", "wall_time"}}
            for r in read_jsonl(run_dir / "metrics.jsonl")
        ],
        "summary": {k: v for k, v in summary.items() if k not in SUMMARY_TIMING},
        "tensors": {k: v.tobytes() for k, v in tensors.items()},
        "plan": json.loads((run_dir / PLAN).read_text())["groups"],
    }


def kind(path: str) -> str:
    name = Path(path).name
    return "checkpoint dir" if name.startswith("epoch-") else name


def test_killed_at_each_kind_of_write_resumes_to_the_same_run(tiny, tmp_path, monkeypatch):
    """Rank 0, the writer, dies (``os._exit``, as SIGKILL) at the first write of each kind —
    the stage split, a metrics line, checkpoint tensors — and at the last index update and the
    summary; every resumed run equals the uninterrupted one."""
    cfg = tiny("train.parallel=2", "train.pipeline.balance=params")  # the same split each time
    log = tmp_path / "writes.log"
    monkeypatch.setenv(CRASH_AT, f"-1:{log}")
    train(cfg, tmp_path / "reference")
    expected = run_state(tmp_path / "reference")
    kinds = [kind(p) for p in log.read_text().splitlines()]
    picked = [kinds.index(k) for k in (PLAN, "metrics.jsonl", "tensors.safetensors")]
    picked += [len(kinds) - 1 - kinds[::-1].index(k) for k in ("index.json", "summary.json")]
    for n in picked:
        run_dir = tmp_path / f"kill-{n}"
        monkeypatch.setenv(CRASH_AT, str(n))
        with pytest.raises(PipelineError, match="rank 0"):
            train(cfg, run_dir)
        monkeypatch.delenv(CRASH_AT)
        train(cfg, run_dir, resume=True)
        assert run_state(run_dir) == expected, f"killed at write {n} ({kinds[n]})"


def test_sigterm_writes_an_interrupted_summary_exits_143_and_resumes(
    tiny, sequential_run, same_run, tmp_path
):
    cfg = tiny("train.parallel=2", "train.epochs=40")
    config = tmp_path / "tiny.yaml"
    config.write_text(to_yaml(cfg))
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "neuroplex", "train", str(config), "--run-dir", str(run_dir)]
    env = {**os.environ, "CI": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and read_jsonl(metrics)):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [ln for ln in err.splitlines() if not ln.startswith("epoch ")]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM): "), err
    assert "--resume" in lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "--resume" in summary["error"]
    assert train(cfg, run_dir, resume=True)["status"] == "completed"
    same_run(run_dir, sequential_run(tiny("train.epochs=40"), tmp_path / "sequential"))


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


def test_two_processes_on_conv_stages_give_the_sequential_parameters(
    image_file, sequential_run, same_run, tmp_path
):
    sequential = sequential_run(tiny_conv(image_file), tmp_path / "sequential")
    summary = train(tiny_conv(image_file, "train.parallel=2"), tmp_path / "pipeline")
    assert summary["status"] == "completed" and summary["ranks"] == 2
    first = json.loads((tmp_path / "pipeline" / PLAN).read_text())["groups"][0]
    assert first[1] in (0, 1)  # rank 0 sends a feature map (the pool stage comes last)
    same_run(tmp_path / "pipeline", sequential)
