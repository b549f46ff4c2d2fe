import json
import math

import pytest

from neuroplex.config import load_config
from neuroplex.errors import ConfigError, TrainingDiverged
from neuroplex.files import read_jsonl
from neuroplex.train import loop, rundir
from neuroplex.train.checkpoint import read_index
from neuroplex.train.runs import evaluate_run

TIMING = {"samples_per_s", "wall_time"}


def metrics(run_dir) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING}
        for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


def with_epochs(cfg, epochs: int):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": epochs})})


def test_training_learns_and_writes_the_run_dir(tiny_config, tmp_path):
    summary = loop.train(tiny_config, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert summary["status"] == "completed"
    assert summary["test_acc"] > 0.6  # digits, 3 epochs of a tiny MLP; chance is 0.1
    assert summary["steps"] == 3 * math.ceil(summary["dataset"]["train"] / 64)
    assert summary["activation_bytes_peak"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_same_seed_same_metrics_other_seed_differs(tiny_config, tmp_path):
    loop.train(tiny_config, tmp_path / "a")
    loop.train(tiny_config, tmp_path / "b")
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    other = tiny_config.model_copy(update={"seed": 1})
    loop.train(other, tmp_path / "c")
    assert metrics(tmp_path / "a") != metrics(tmp_path / "c")


def test_resume_after_two_epochs_is_bit_identical_to_four_uninterrupted(tiny_config, tmp_path):
    cfg = with_epochs(tiny_config, 4)
    loop.train(cfg, tmp_path / "full")
    first = loop.train(cfg, tmp_path / "split", stop_after_epoch=2)
    assert first["status"] == "stopped" and first["epochs"] == 2
    done = loop.train(cfg, tmp_path / "split", resume=True)
    assert done["status"] == "completed"
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    for key in ("test_acc", "best_val_acc", "best_epoch", "steps", "activation_bytes_peak"):
        assert done[key] == full[key]


def test_killed_mid_epoch_resumes_from_last_checkpoint_exactly(tiny_config, tmp_path, kill_at):
    loop.train(tiny_config, tmp_path / "full")
    steps_per_epoch = math.ceil(1293 / 64)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_config, tmp_path / "killed", progress=kill_at(2 * steps_per_epoch + 5))
    assert read_index(tmp_path / "killed")["last"] == "epoch-0002"
    loop.train(tiny_config, tmp_path / "killed", resume=True)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "full")


def test_killed_between_metrics_and_checkpoint_drops_the_orphan_line(
    tiny_config, tmp_path, monkeypatch
):
    loop.train(tiny_config, tmp_path / "full")
    real_save, calls = rundir.save_checkpoint, []

    def save_then_die(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # epoch 2's metrics are written, its checkpoint is not
        return real_save(*args, **kwargs)

    monkeypatch.setattr(rundir, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.train(tiny_config, tmp_path / "run")
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 2
    monkeypatch.setattr(rundir, "save_checkpoint", real_save)
    loop.train(tiny_config, tmp_path / "run", resume=True)
    assert metrics(tmp_path / "run") == metrics(tmp_path / "full")


def test_nan_loss_stops_with_step_and_epoch_and_keeps_last_good_checkpoint(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: dense, width: 16, norm: none, activation: relu}]",
            "train.epochs=2",
            "train.optimizer=sgd",
            "train.momentum=0",
            "train.grad_clip=null",
            "train.schedule=constant",
            "train.lr=1e30",
        ],
    )
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) at step \d+ \(epoch 1\)"):
        loop.train(cfg, run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "loss became" in summary["error"]
    assert not (run / "checkpoints").exists()  # nothing bad was checkpointed


def test_steps_overrides_epochs_and_schedule_ends_at_min_lr(tiny_config, tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: dense, width: 8}]",
            "train.steps=30",
            "train.batch_size=64",
            "train.min_lr_ratio=0.1",
        ],
    )
    summary = loop.train(cfg, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    assert summary["steps"] == 30 and rows[-1]["step"] == 30
    assert len(rows) == 2  # 21 steps per epoch
    assert rows[-1]["lr"] == pytest.approx(
        cfg.train.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 29 / 30)))
    )


def test_new_run_refuses_an_existing_run_dir(tiny_config, tmp_path):
    loop.train(tiny_config, tmp_path / "run", stop_after_epoch=1)
    with pytest.raises(ConfigError, match="--resume"):
        loop.train(tiny_config, tmp_path / "run")


def test_resume_with_a_different_config_is_refused(tiny_config, tmp_path):
    loop.train(tiny_config, tmp_path / "run", stop_after_epoch=1)
    with pytest.raises(ConfigError, match="different config"):
        loop.train(with_epochs(tiny_config, 5), tmp_path / "run", resume=True)


def test_best_checkpoint_follows_validation_accuracy(tiny_config, tmp_path):
    loop.train(tiny_config, tmp_path / "run")
    rows = metrics(tmp_path / "run")
    best = max(rows, key=lambda r: (r["val_acc"], -r["epoch"]))
    assert read_index(tmp_path / "run")["best"] == f"epoch-{best['epoch']:04d}"
    evaluated = evaluate_run(tmp_path / "run", which="best")
    assert evaluated["acc"] == best["test_acc"]
