"""Loggers and callbacks: TensorBoard and CSV files read back, user hooks, missing extras."""

from __future__ import annotations

import csv
import math
import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from typer.testing import CliRunner

from neuroplex.cli import app
from neuroplex.config import load_config
from neuroplex.errors import ConfigError, NeuroplexError
from neuroplex.files import read_jsonl
from neuroplex.train import Callback, loop


class Recorder(Callback):
    def __init__(self) -> None:
        self.steps, self.epochs, self.ends = [], [], []

    def on_step(self, log) -> None:
        self.steps.append(log)

    def on_epoch(self, record) -> None:
        self.epochs.append(record)

    def on_end(self, summary) -> None:
        self.ends.append(summary)


def scalars(run_dir, tag: str) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def steps_per_epoch(summary) -> int:
    return math.ceil(summary["dataset"]["train"] / 64)


def test_tensorboard_holds_every_step_and_epoch(tiny_config, tmp_path):
    recorder = Recorder()
    summary = loop.train(tiny_config, tmp_path / "run", callbacks=[recorder])
    losses = scalars(tmp_path / "run", "step/loss")
    assert [s for s, _ in losses] == list(range(1, summary["steps"] + 1))
    for (step, value), log in zip(losses, recorder.steps, strict=True):
        assert step == log.step and value == pytest.approx(log.loss, rel=1e-6)  # float32 in TB
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    test_acc = scalars(tmp_path / "run", "epoch/test_acc")
    assert test_acc == [(r["step"], pytest.approx(r["test_acc"], rel=1e-6)) for r in records]
    assert [s for s, _ in scalars(tmp_path / "run", "step/lr")] == [s for s, _ in losses]


def test_csv_columns_are_the_metrics_jsonl_keys(tiny_config, tmp_path):
    loop.train(tiny_config, tmp_path / "run")
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == list(records[0])
    assert [float(r["test_acc"]) for r in rows] == [r["test_acc"] for r in records]
    with open(tmp_path / "run" / "steps.csv", newline="") as f:
        steps = list(csv.DictReader(f))
    assert [int(r["step"]) for r in steps] == list(range(1, records[-1]["step"] + 1))
    assert list(steps[0]) == ["step", "epoch", "loss", "lr"]


def test_a_callback_sees_every_step_epoch_and_the_end(tiny_config, tmp_path):
    recorder = Recorder()
    summary = loop.train(tiny_config, tmp_path / "run", callbacks=[recorder])
    per_epoch = steps_per_epoch(summary)
    assert [log.step for log in recorder.steps] == list(range(1, 3 * per_epoch + 1))
    assert [log.epoch for log in recorder.steps] == [i // per_epoch for i in range(3 * per_epoch)]
    assert recorder.epochs == read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert recorder.ends == [summary]


def test_a_resumed_run_logs_each_step_once(tiny_config, tmp_path, kill_at):
    """Killed in epoch 3 (checkpoint after epoch 2): the resumed session logs from the
    checkpoint's next step; TensorBoard and steps.csv show each step once, with the values of
    an uninterrupted run."""
    full = loop.train(tiny_config, tmp_path / "full")
    per_epoch = steps_per_epoch(full)
    first = Recorder()
    with pytest.raises(KeyboardInterrupt):
        kill = kill_at(2 * per_epoch + 2)
        loop.train(tiny_config, tmp_path / "run", callbacks=[first], progress=kill)
    second = Recorder()
    loop.train(tiny_config, tmp_path / "run", resume=True, callbacks=[second])
    assert first.ends[0]["status"] == "interrupted"
    assert [log.step for log in second.steps] == list(range(2 * per_epoch + 1, full["steps"] + 1))
    assert scalars(tmp_path / "run", "step/loss") == scalars(tmp_path / "full", "step/loss")
    with open(tmp_path / "run" / "steps.csv") as a, open(tmp_path / "full" / "steps.csv") as b:
        assert a.read() == b.read()
    with open(tmp_path / "run" / "metrics.csv") as a:
        assert len(a.read().splitlines()) == 1 + 3  # header and three epochs


def test_plasticity_events_and_routing_loads_reach_tensorboard(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: sparse, width: 32, ensembles: 4}, "
            "{kind: moe, width: 16, experts: 2, k: 1, expert_hidden: 8}]",
            "train.epochs=1",
            "train.batch_size=64",
            "train.plasticity={kind: set, every: 5, fraction: 0.2}",
        ],
    )
    recorder = Recorder()
    loop.train(cfg, tmp_path / "run", callbacks=[recorder])
    events = read_jsonl(tmp_path / "run" / "plasticity.jsonl")
    assert events and [e for log in recorder.steps for e in log.events] == events
    layer = events[0]["layer"]
    grown = scalars(tmp_path / "run", f"plasticity/{layer}/grown")
    assert grown == [(e["step"], e["grown"]) for e in events if e["layer"] == layer]
    record = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    load = scalars(tmp_path / "run", "epoch/stage1.load.0")
    assert load == [(record["step"], pytest.approx(record["stage1.load.0"], rel=1e-6))]


class FakeWandb(types.ModuleType):
    """What the W&B logger calls, recorded."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple] = []
        self.util = types.SimpleNamespace(generate_id=lambda: "abc123")

    def init(self, **kwargs):
        self.calls.append(("init", kwargs["id"], kwargs["project"]))
        return self

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def finish(self, exit_code):
        self.calls.append(("finish", exit_code))


def test_wandb_gets_the_same_scalars_as_tensorboard(tiny_config, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config.model_copy(
        update={"log": tiny_config.log.model_copy(update={"wandb": True, "project": "p"})}
    )
    summary = loop.train(cfg, tmp_path / "run")
    assert fake.calls[0] == ("init", "abc123", "p") and fake.calls[-1] == ("finish", 0)
    logged = [c for c in fake.calls if c[0] == "log"]
    losses = [(step, values["step/loss"]) for _, step, values in logged if "step/loss" in values]
    assert len(losses) == summary["steps"]
    assert [(s, pytest.approx(v, rel=1e-6)) for s, v in losses] == scalars(
        tmp_path / "run", "step/loss"
    )
    assert (tmp_path / "run" / "wandb_id").read_text() == "abc123\n"


@pytest.mark.parametrize("key", ["wandb", "mlflow"])
def test_a_missing_extra_is_one_line_before_anything_runs(tiny_config, tmp_path, monkeypatch, key):
    monkeypatch.setitem(sys.modules, key, None)  # import fails, as when it is not installed
    cfg = tiny_config.model_copy(update={"log": tiny_config.log.model_copy(update={key: True})})
    with pytest.raises(ConfigError) as e:
        loop.train(cfg, tmp_path / "run")
    assert str(e.value) == (
        f"config error: log.{key} = true: {key} is not installed; pip install 'neuroplex[{key}]' "
        f"(or set log.{key}: false)"
    )
    assert not (tmp_path / "run").exists()


def test_callbacks_must_have_the_hooks(tiny_config, tmp_path):
    with pytest.raises(NeuroplexError, match=r"callbacks\[0\] = .*: has no on_step"):
        loop.train(tiny_config, tmp_path / "run", callbacks=[object()])
    with pytest.raises(NeuroplexError, match="expected a list"):
        loop.train(tiny_config, tmp_path / "run", callbacks=Recorder())


def test_the_cli_names_the_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    args = ["train", "--set", "log.wandb=true", "--run-dir", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (
        "error: config error: log.wandb = true: wandb is not installed; "
        "pip install 'neuroplex[wandb]' (or set log.wandb: false)\n"
    )


class FakeMlflow(types.ModuleType):
    """What the MLflow logger calls, recorded."""

    def __init__(self) -> None:
        super().__init__("mlflow")
        self.calls: list[tuple] = []

    def set_experiment(self, name):
        self.calls.append(("experiment", name))

    def start_run(self, run_id, run_name):
        self.calls.append(("start", run_id, run_name))
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id or "r1"))

    def log_artifact(self, path):
        self.calls.append(("artifact", path))

    def log_metrics(self, values, step):
        self.calls.append(("metrics", step, values))

    def end_run(self, status):
        self.calls.append(("end", status))


def test_mlflow_gets_every_step_and_epoch_and_a_resume_continues_its_run(
    tiny_config, tmp_path, monkeypatch
):
    fake = FakeMlflow()
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    cfg = tiny_config.model_copy(
        update={"log": tiny_config.log.model_copy(update={"mlflow": True})}
    )
    first = loop.train(cfg, tmp_path / "run", stop_after_epoch=2)
    assert fake.calls[:3] == [
        ("experiment", "neuroplex"),
        ("start", None, "run"),
        ("artifact", str(tmp_path / "run" / "config.yaml")),
    ]
    steps = [c[1] for c in fake.calls if c[0] == "metrics" and "step/loss" in c[2]]
    assert steps == list(range(1, first["steps"] + 1))
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    epochs = [c[2] for c in fake.calls if c[0] == "metrics" and "epoch/test_acc" in c[2]]
    assert [e["epoch/test_acc"] for e in epochs] == [r["test_acc"] for r in records]
    assert fake.calls[-1] == ("end", "FINISHED")
    fake.calls.clear()
    loop.train(cfg, tmp_path / "run", resume=True)
    assert fake.calls[1] == ("start", "r1", "run")  # the same MLflow run, no second artifact
    assert fake.calls[2][0] == "metrics" and fake.calls[2][1] == first["steps"] + 1
