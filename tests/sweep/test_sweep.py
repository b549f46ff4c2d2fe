"""Sweeps: the product of seeds and grid values, a table of the runs' own figures, resume."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from typer.testing import CliRunner

from neuroplex.cli import app
from neuroplex.errors import NeuroplexError
from neuroplex.files import read_jsonl
from neuroplex.sweep import run as sweep_run
from neuroplex.sweep.run import sweep
from neuroplex.train import loop
from neuroplex.train.runlock import run_dir_lock

GRID = ["train.lr=1e-2,3e-3"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def without_timing(run_dir: Path) -> list[dict]:
    timing = ("samples_per_s", "wall_time")
    return [
        {k: v for k, v in r.items() if k not in timing}
        for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, small_yaml):
    base = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROPLEX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        result = sweep(small_yaml(base), seeds="0-1", grid=GRID, out=base / "out")
    return base / "out", result


def test_two_seeds_by_two_values_make_four_runs_and_their_table(swept):
    out, result = swept
    dirs = sorted(p.parent for p in out.rglob("summary.json"))
    assert [str(d.relative_to(out)) for d in dirs] == [
        "train.lr=1e-2/seed0",
        "train.lr=1e-2/seed1",
        "train.lr=3e-3/seed0",
        "train.lr=3e-3/seed1",
    ]
    assert json.loads((out / "sweep.json").read_text()) == result
    table = (out / "sweep.md").read_text()
    for cell, lr in zip(result["cells"], ("1e-2", "3e-3"), strict=True):
        runs = [summary(out / f"train.lr={lr}" / f"seed{s}") for s in (0, 1)]
        assert [r["seed"] for r in runs] == [0, 1] and cell["n"] == 2
        for key in ("val_acc", "test_acc", "test_acc_at_best_val"):
            values = [r[key] for r in runs]
            assert cell[key]["mean"] == statistics.mean(values)
            assert cell[key]["std"] == statistics.stdev(values)
        test = [100 * r["test_acc"] for r in runs]
        shown = f"{statistics.mean(test):.1f}% ± {statistics.stdev(test):.1f}"
        row = next(line for line in table.splitlines() if f"| {lr} |" in line)
        assert shown in row
    val = {c["name"]: c["val_acc"]["mean"] for c in result["cells"]}
    assert result["best"] == max(val, key=val.get)
    best_row = next(line for line in table.splitlines() if line.startswith("| ★"))
    assert result["best"].split("=")[1] in best_row
    assert (out / "sweep.png").stat().st_size > 0


def test_runs_lists_every_run_with_its_figures(swept):
    out, _ = swept
    result = CliRunner().invoke(app, ["runs", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for run_dir in sorted(p.parent for p in out.rglob("summary.json")):
        line = next(x for x in result.stdout.splitlines() if str(run_dir.relative_to(out)) in x)
        s = summary(run_dir)
        assert "completed" in line and f"{100 * s['test_acc']:.2f}%" in line


def test_a_killed_sweep_resumes_without_rerunning_finished_runs(
    tmp_path, monkeypatch, kill_at, small_yaml
):
    config = small_yaml(tmp_path)
    calls: list[tuple[str, bool]] = []

    def recorded(cfg, run_dir, *, resume, progress=None):
        calls.append((str(Path(run_dir).relative_to(tmp_path / "out")), resume))
        return loop.train(cfg, run_dir, resume=resume, progress=progress)

    def killed_in_second_run(cfg, run_dir, *, resume):
        kill = kill_at(12) if len(calls) == 1 else None  # epoch 2 of run 2 (9 steps per epoch)
        return recorded(cfg, run_dir, resume=resume, progress=kill)

    monkeypatch.setattr(sweep_run, "train", killed_in_second_run)
    with pytest.raises(KeyboardInterrupt):
        sweep(config, seeds="0-1", grid=["train.lr=1e-2"], out=tmp_path / "out")
    first = tmp_path / "out" / "train.lr=1e-2" / "seed0"
    before = (first / "summary.json").stat().st_mtime_ns, (first / "metrics.jsonl").read_bytes()
    assert summary(tmp_path / "out" / "train.lr=1e-2" / "seed1")["status"] == "interrupted"
    calls.clear()
    monkeypatch.setattr(sweep_run, "train", recorded)
    result = sweep(config, seeds="0-1", grid=["train.lr=1e-2"], out=tmp_path / "out")
    assert calls == [("train.lr=1e-2/seed1", True)]
    assert (
        (first / "summary.json").stat().st_mtime_ns,
        (first / "metrics.jsonl").read_bytes(),
    ) == before
    assert result["cells"][0]["n"] == 2
    resumed = tmp_path / "out" / "train.lr=1e-2" / "seed1"
    loop.train(sweep_run.load_config(resumed / "config.yaml"), tmp_path / "alone")
    assert without_timing(resumed) == without_timing(tmp_path / "alone")  # exact resume


def test_processes_at_once_give_the_runs_of_one_process(tmp_path, small_yaml):
    """Two processes at once; the second run fails (this test holds its directory's lock): one
    line naming it, after the other run ends; given again, the sweep trains only that run."""
    config = small_yaml(tmp_path)  # threads: 1 set, so the processes and the run alone agree
    busy = tmp_path / "out" / "seed1"
    with run_dir_lock(busy), pytest.raises(NeuroplexError) as e:
        sweep(config, seeds="0-1", out=tmp_path / "out", jobs=2)
    assert str(e.value).startswith(f"{busy}: in use by another neuroplex process")
    assert "\n" not in str(e.value)
    loop.train(sweep_run.load_config(config, ["seed=0"]), tmp_path / "alone")
    assert without_timing(tmp_path / "out" / "seed0") == without_timing(tmp_path / "alone")
    result = sweep(config, seeds="0-1", out=tmp_path / "out", jobs=2)
    assert [r["status"] for r in result["cells"][0]["runs"]] == ["completed"] * 2


def test_an_out_dir_of_another_config_is_refused(swept, tmp_path, small_yaml):
    out, _ = swept
    config = small_yaml(tmp_path, {"train": {"epochs": 3}})
    with pytest.raises(NeuroplexError, match="holds a run of another config"):
        sweep(config, seeds="0-1", grid=GRID, out=out)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seeds", "4-1"], "--seeds '4-1': range 4-1 is empty"),
        (["--grid", "train.lr"], "--grid 'train.lr': expected KEY=V1,V2,..."),
        (["--grid", "train.lr=0.1,-1"], "--grid 'train.lr=0.1,-1': train.lr = -1"),
        (["--jobs", "0"], "--jobs 0: expected an integer >= 1"),
    ],
)
def test_bad_sweep_arguments_are_one_line(tmp_path, args, fragment, small_yaml):
    result = CliRunner().invoke(
        app, ["sweep", str(small_yaml(tmp_path)), "--out", str(tmp_path / "o"), *args]
    )
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {fragment}") and result.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_runs_of_a_missing_folder_is_one_line(tmp_path):
    result = CliRunner().invoke(app, ["runs", str(tmp_path / "nope")])
    assert (
        result.exit_code == 2 and result.stderr == f"error: {tmp_path / 'nope'}: not a directory\n"
    )
