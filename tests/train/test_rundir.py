"""The run directory: stuck runs, leftovers of a kill, edited run files, what a stop says."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from neuroplex import files
from neuroplex.config import load_config
from neuroplex.errors import CheckpointError, NeuroplexError, TrainingDiverged
from neuroplex.files import read_jsonl
from neuroplex.train import loop
from neuroplex.train.checkpoint import INDEX, STATE, checkpoint_root, read_index

TIMING = {"samples_per_s", "wall_time"}


class Crash(BaseException):
    """Stands in for SIGKILL: nothing in neuroplex catches it."""


def untimed(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(run / "metrics.jsonl")
    ]


@pytest.fixture
def crash_at(monkeypatch):
    """``crash_at(name, n)``: die at the ``n``-th write of a file called ``name``."""

    def arm(name: str, n: int = 1) -> None:
        seen = []

        def hook(path: Path) -> None:
            if path.name == name:
                seen.append(path)
                if len(seen) == n:
                    raise Crash

        monkeypatch.setattr(files, "crash_hooks", [hook])

    yield arm


def with_train(cfg, **changes):
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})


@pytest.mark.parametrize("name", ["metrics.jsonl", "tensors.safetensors", "index.json"])
def test_run_killed_before_its_first_checkpoint_resumes_from_the_start(
    tiny_config, tmp_path, crash_at, name
):
    cfg = with_train(tiny_config, checkpoint_every=5)  # epochs 1 and 2 have no checkpoint
    loop.train(cfg, tmp_path / "full")
    crash_at(name, 2 if name == "metrics.jsonl" else 1)
    with pytest.raises(Crash):
        loop.train(cfg, tmp_path / "run")
    files.crash_hooks.clear()
    assert not (checkpoint_root(tmp_path / "run") / INDEX).exists()
    assert (tmp_path / "run" / "metrics.jsonl").read_text()  # the stuck state of the issue
    with pytest.raises(NeuroplexError, match="already holds a run"):
        loop.train(cfg, tmp_path / "run")
    loop.train(cfg, tmp_path / "run", resume=True)
    assert untimed(tmp_path / "run") == untimed(tmp_path / "full")


def test_resume_cleans_temporary_leftovers_of_a_kill(tiny_config, tmp_path, crash_at):
    crash_at("state.json", 2)  # inside epoch 2's checkpoint, before its rename
    with pytest.raises(Crash):
        loop.train(tiny_config, tmp_path / "run")
    root = checkpoint_root(tmp_path / "run")
    assert [p.name for p in root.glob(".tmp-epoch-0002-*")]
    (tmp_path / "run" / ".metrics.jsonl.abc.tmp").write_text("torn")
    files.crash_hooks.clear()
    loop.train(tiny_config, tmp_path / "run", resume=True, stop_after_epoch=2)
    assert not list(root.glob(".tmp-*"))
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_nan_before_any_checkpoint_says_none_was_written(tmp_path):
    cfg = load_config(
        None,
        [
            "data.name=digits",
            "model.stages=[{kind: dense, width: 16, norm: none, activation: relu}]",
            "train.optimizer=sgd",
            "train.grad_clip=null",
            "train.schedule=constant",
            "train.lr=1e30",
        ],
    )
    with pytest.raises(TrainingDiverged) as err:
        loop.train(cfg, tmp_path / "run")
    assert "no checkpoint was written yet" in str(err.value)
    assert not checkpoint_root(tmp_path / "run").exists()
    assert "kept in" not in str(err.value)


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _last_state(run: Path) -> Path:
    return checkpoint_root(run) / read_index(run)["last"] / STATE


EDITS = [
    pytest.param(
        lambda run: (run / "metrics.jsonl").write_text("garbage\n"), "line 1", id="metrics-garbage"
    ),
    pytest.param(
        lambda run: (run / "metrics.jsonl").write_text('{"a": 1}\n'),
        "'epoch'",
        id="metrics-keyless",
    ),
    pytest.param(
        lambda run: _edit_json(_last_state(run), lambda d: d["loop"].update(step=-5)),
        "checksum",
        id="state-step",
    ),
]


@pytest.mark.parametrize(("edit", "fragment"), EDITS)
def test_edited_run_files_are_one_line_errors_on_resume(tiny_config, tmp_path, edit, fragment):
    run = tmp_path / "run"
    loop.train(tiny_config, run, stop_after_epoch=1)
    edit(run)
    with pytest.raises(NeuroplexError, match=fragment) as err:
        loop.train(tiny_config, run, resume=True)
    assert "\n" not in str(err.value)


def test_checkpoint_state_with_wrong_keys_and_a_recomputed_checksum_is_a_checkpoint_error(
    tiny_config, tmp_path
):
    import hashlib

    run = tmp_path / "run"
    loop.train(tiny_config, run, stop_after_epoch=1)
    for key in ("rng", "method", "loop"):
        copy = tmp_path / key
        shutil.copytree(run, copy)
        path = _last_state(copy)
        state = json.loads(path.read_text())
        state[key] = {"x": 1} if key != "loop" else {**state["loop"], "step": "5"}
        body = {k: v for k, v in state.items() if k != "state_sha256"}
        state["state_sha256"] = hashlib.sha256(
            json.dumps(body, sort_keys=True).encode()
        ).hexdigest()
        path.write_text(json.dumps(state))
        with pytest.raises(CheckpointError, match="does not fit this run"):
            loop.train(tiny_config, copy, resume=True)
