"""End-to-end tests of the command line (typer's CliRunner keeps stdout and stderr apart)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import neuroplex
from neuroplex.cli import app
from neuroplex.config import load_config
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl

RUNNER = CliRunner()

TINY = {
    "name": "tiny",
    "data": {"name": "digits"},
    "model": {
        "stages": [
            {"kind": "dense", "width": 32, "dropout": 0.1},
            {"kind": "dense", "width": 16},
        ]
    },
    "train": {"epochs": 3, "batch_size": 64, "lr": 0.01},
}
METRIC_KEYS = {
    "epoch",
    "step",
    "train_loss",
    "train_acc",
    "val_acc",
    "test_acc",
    "lr",
    "samples_per_s",
    "wall_time",
}
TIMING = {"samples_per_s", "wall_time"}
SECTIONS = {"name", "seed", "device", "threads", "output_dir", "data", "model", "train", "log"}


def invoke(*args, **kwargs):
    return RUNNER.invoke(app, [str(a) for a in args], **kwargs)


def write_tiny_config(directory: Path) -> Path:
    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY, sort_keys=False), encoding="utf-8")
    return path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / "metrics.jsonl")


def without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, nothing on stdout, exactly one line on stderr starting with 'error:'."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert result.stdout == ""
    return lines[0]


@dataclass
class Trained:
    config: Path
    run: Path
    stdout: str
    summary: dict


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """One tiny run, shared by the tests that only read it (or copy it before changing it)."""
    base = tmp_path_factory.mktemp("cli")
    config = write_tiny_config(base)
    run = base / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEUROPLEX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        result = invoke("train", config, "--run-dir", run)
    assert result.exit_code == 0, (result.output, result.exception)
    return Trained(config, run, result.stdout, read_json(run / "summary.json"))


# ---------------------------------------------------------------------------------------------
# train


def test_tiny_yaml_is_the_conftest_tiny_config(trained, tiny_config):
    assert load_config(trained.config) == tiny_config


def test_train_writes_the_run_dir(trained):
    run = trained.run
    assert load_config(run / "config.yaml") == load_config(trained.config)

    rows = metrics(run)
    assert len(rows) == 3
    for row in rows:
        assert set(row) >= METRIC_KEYS, METRIC_KEYS - set(row)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[0]["step"] < rows[1]["step"] < rows[2]["step"]

    s = trained.summary
    assert s["status"] == "completed"
    assert s["epochs"] == 3
    assert s["steps"] == rows[-1]["step"]
    assert s["test_acc"] == rows[-1]["test_acc"]
    assert s["test_acc"] > 0.5  # digits: chance is 0.1
    assert s["params"] > 0
    assert s["activation_bytes_peak"] > 0
    assert s["peak_rss_bytes"] > 0
    assert s["seed"] == 0
    assert s["versions"]["neuroplex"] == neuroplex.__version__
    assert {"torch", "numpy", "python"} <= set(s["versions"])

    index = read_json(run / "checkpoints" / "index.json")
    assert index["last"] == "epoch-0003"
    assert index["best"] == f"epoch-{s['best_epoch']:04d}"


def test_train_stdout_names_run_dir_and_summary(trained):
    lines = trained.stdout.splitlines()
    assert f"run dir: {trained.run}" in lines
    assert f"summary: {trained.run / 'summary.json'}" in lines
    s = trained.summary
    assert (
        f"status: completed  test acc (final epoch): {s['test_acc']:.4f}  test acc (best val "
        f"checkpoint, epoch {s['best_epoch']}): {s['test_acc_at_best_val']:.4f}"
    ) in lines


@pytest.mark.parametrize("name", ["run[bold]x", "r" * 90], ids=["markup", "long"])
def test_train_stdout_names_any_run_dir_verbatim(tmp_path, trained, name):
    run = tmp_path / name
    result = invoke("train", trained.config, "--run-dir", run, "--stop-after-epoch", 1)
    assert result.exit_code == 0, result.output
    assert (run / "summary.json").is_file()
    lines = result.stdout.splitlines()
    assert f"run dir: {run}" in lines
    assert f"summary: {run / 'summary.json'}" in lines


def test_resume_after_stop_completes_like_an_uninterrupted_run(tmp_path, trained):
    run = tmp_path / "run"
    first = invoke("train", trained.config, "--run-dir", run, "--stop-after-epoch", 1)
    assert first.exit_code == 0, first.output
    assert read_json(run / "summary.json")["status"] == "stopped"
    assert len(metrics(run)) == 1
    assert read_json(run / "checkpoints" / "index.json")["last"] == "epoch-0001"

    second = invoke("train", "--resume", run)
    assert second.exit_code == 0, second.output
    summary = read_json(run / "summary.json")
    assert summary["status"] == "completed"
    assert summary["epochs"] == 3
    rows = metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert without_timing(rows) == without_timing(metrics(trained.run))
    assert summary["test_acc"] == trained.summary["test_acc"]


def test_train_into_existing_run_dir_needs_resume(trained):
    before = (trained.run / "metrics.jsonl").read_text()
    result = invoke("train", trained.config, "--run-dir", trained.run)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "already holds a run" in errors[0]
    assert f"--resume {trained.run}" in errors[0]
    assert result.stderr.splitlines()[-1] == errors[0]
    assert (trained.run / "metrics.jsonl").read_text() == before


def test_resume_with_changed_config_is_refused(trained):
    before = (trained.run / "summary.json").read_text()
    result = invoke("train", "--resume", trained.run, "--set", "train.lr=0.5")
    assert_user_error(result, "--resume", "differs")
    assert (trained.run / "summary.json").read_text() == before


# ---------------------------------------------------------------------------------------------
# eval


def eval_json(*args) -> dict:
    result = invoke("eval", *args)
    assert result.exit_code == 0, (result.output, result.exception)
    return json.loads(result.stdout)


def test_eval_best_checkpoint_matches_summary(trained):
    result = eval_json(trained.run)
    assert result["checkpoint"] == "best"
    assert result["split"] == "test"
    assert result["epoch"] == trained.summary["best_epoch"]
    assert result["samples"] == trained.summary["dataset"]["test"]
    assert result["acc"] == trained.summary["test_acc_at_best_val"]


def test_eval_last_checkpoint_matches_summary(trained):
    result = eval_json(trained.run, "--checkpoint", "last")
    assert result["checkpoint"] == "last"
    assert result["epoch"] == 3
    assert result["acc"] == trained.summary["test_acc"]
    assert result["loss"] == trained.summary["test_loss"]


def test_eval_val_split(trained):
    result = eval_json(trained.run, "--split", "val")
    assert result["split"] == "val"
    assert result["samples"] == trained.summary["dataset"]["val"]
    best = next(r for r in metrics(trained.run) if r["epoch"] == trained.summary["best_epoch"])
    assert result["acc"] == best["val_acc"] == trained.summary["best_val_acc"]


# ---------------------------------------------------------------------------------------------
# config show, datasets


def test_config_show_with_override_prints_every_section(trained):
    result = invoke("config", "show", trained.config, "--set", "train.lr=0.5")
    assert result.exit_code == 0, result.output
    assert re.search(r"^  lr: 0\.5$", result.stdout, re.MULTILINE)
    shown = yaml.safe_load(result.stdout)
    assert set(shown) == SECTIONS
    assert shown["name"] == "tiny"
    assert shown["train"]["lr"] == 0.5
    assert shown["train"]["epochs"] == 3
    assert [s["width"] for s in shown["model"]["stages"]] == [32, 16]
    assert shown["data"]["name"] == "digits"


def test_config_show_model_prints_the_stage_table(trained):
    result = invoke("config", "show", trained.config, "--model")
    assert result.exit_code == 0, result.output
    yaml_part, _, table = result.stdout.partition("model: input [64] -> 10 classes")
    assert set(yaml.safe_load(yaml_part)) == SECTIONS
    for part in ("stage0", "stage1", "head", "params", "total"):
        assert re.search(rf"\b{part}\b", table), part
    assert "stage2" not in table
    assert f"{trained.summary['params']:,}" in table  # the total row matches the trained model


def test_config_show_and_summary_count_the_connections_of_a_rewired_sparse_network(tmp_path):
    sparse = {
        **TINY,
        "model": {"stages": [{"kind": "sparse", "width": 32, "ensembles": 4, "m": 1}]},
        "train": {**TINY["train"], "plasticity": {"kind": "set", "every": 5, "fraction": 0.3}},
    }
    config = tmp_path / "sparse.yaml"
    config.write_text(yaml.safe_dump(sparse, sort_keys=False), encoding="utf-8")
    result = invoke("train", config, "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    summary = read_json(tmp_path / "run" / "summary.json")
    assert (tmp_path / "run" / "plasticity.jsonl").stat().st_size > 0  # SET rewired the layer
    # 64 -> 32 at density 1/2 (+ bias, LayerNorm), then the 32 -> 10 head
    expected = 64 * 32 // 2 + 32 + 2 * 32 + 32 * 10 + 10
    assert summary["params"] == summary["active_params"] == expected
    shown = invoke("config", "show", config, "--model")
    assert re.search(rf"total\W+{expected:,}\b", shown.stdout), shown.stdout


def test_datasets_lists_the_builtin_datasets():
    result = invoke("datasets")
    assert result.exit_code == 0, result.output
    for name in ("mnist1d", "digits", "file"):
        assert re.search(rf"^\W*{name}\b", result.stdout, re.MULTILINE), name


def test_datasets_descriptions_are_shown_verbatim():
    result = invoke("datasets")
    assert result.exit_code == 0
    assert "[samples," in result.stdout
    assert "[samples]" in result.stdout


# ---------------------------------------------------------------------------------------------
# user errors


def _corrupted_run(tmp_path: Path, trained: Trained) -> Path:
    run = tmp_path / "corrupted"
    shutil.copytree(trained.run, run)
    index = read_json(run / "checkpoints" / "index.json")
    tensors = run / "checkpoints" / index["best"] / "tensors.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    return run


USER_ERRORS = [
    pytest.param(
        lambda tmp, t: ["train", tmp / "missing.yaml"],
        ["missing.yaml", "file not found"],
        id="missing-config",
    ),
    pytest.param(
        lambda tmp, t: ["train", t.config, "--set", "train.lr"],
        ["--set 'train.lr'", "KEY=VALUE"],
        id="bad-set-syntax",
    ),
    pytest.param(
        lambda tmp, t: ["train", t.config, "--set", "train.lrr=1"],
        ["train.lrr", "unknown key", "'lr'"],
        id="unknown-key",
    ),
    pytest.param(
        lambda tmp, t: ["train", "--resume", tmp],
        ["--resume", "not a run directory"],
        id="resume-non-run-dir",
    ),
    pytest.param(
        lambda tmp, t: ["config", "show", t.config, "--set", "nope=1"],
        ["nope", "unknown key"],
        id="config-show-unknown-key",
    ),
    pytest.param(
        lambda tmp, t: ["eval", tmp], ["{tmp}", "not a run directory"], id="eval-non-run-dir"
    ),
    pytest.param(
        lambda tmp, t: ["eval", t.run, "--split", "foo"],
        ["--split", "'foo'", "train, val, test"],
        id="eval-bad-split",
    ),
    pytest.param(
        lambda tmp, t: ["eval", t.run, "--checkpoint", "first"],
        ["--checkpoint", "'first'"],
        id="eval-bad-checkpoint",
    ),
    pytest.param(
        lambda tmp, t: ["eval", _corrupted_run(tmp, t)],
        ["checkpoint error", "tensors.safetensors", "checksum"],
        id="eval-corrupted-checkpoint",
    ),
    pytest.param(
        lambda tmp, t: ["compare", t.run, t.run, "--cka", "unbiased"],
        ["--cka 'unbiased'", "debiased, biased"],
        id="compare-bad-cka",
    ),
    pytest.param(
        lambda tmp, t: ["analyze", t.run, "--probe", "3"],
        ["--probe 3", "debiased CKA", "at least 4"],
        id="analyze-probe-too-small-for-debiased-cka",
    ),
    pytest.param(
        lambda tmp, t: ["report", t.run, "--baseline", tmp / "nowhere"],
        ["--baseline {tmp}/nowhere", "not a finished run"],
        id="report-bad-baseline",
    ),
]


@pytest.mark.parametrize(("make_args", "fragments"), USER_ERRORS)
def test_user_errors_exit_2_with_one_line(tmp_path, trained, make_args, fragments):
    args = make_args(tmp_path, trained)
    fragments = [f.replace("{tmp}", str(tmp_path)) for f in fragments]
    assert_user_error(invoke(*args), *fragments)


def test_debug_reraises_the_error(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="file not found"):
        invoke("--debug", "train", missing, catch_exceptions=False)
    # --debug does not stick: the next invocation is back to the one-line error
    assert_user_error(invoke("train", missing), "file not found")


def test_console_entry_point_reports_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "missing.yaml"
    proc = subprocess.run(
        [sys.executable, "-m", "neuroplex", "train", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == [f"error: config error: {missing}: file not found"]
    assert proc.stdout == ""


def test_analyze_prints_structure_vs_function_and_routing(tmp_path):
    from neuroplex.train import train

    stages = (
        "model.stages=[{kind: sparse, width: 32, ensembles: 4, m: 1, pattern: random},"
        " {kind: moe, width: 16, experts: 4, k: 1, expert_hidden: 8}]"
    )
    cfg = load_config(None, ["data.name=digits", stages, "train.epochs=1"])
    train(cfg, tmp_path / "run")
    result = RUNNER.invoke(app, ["analyze", str(tmp_path / "run"), "--probe", "100"])
    assert result.exit_code == 0, result.stderr
    assert re.search(
        r"stage 0: structure vs function, Spearman rho (-?\d\.\d\d|n/a)", result.stdout
    )
    assert re.search(r"stage 1 routing: expert-class MI \d\.\d{3} bits", result.stdout)
    assert re.search(
        r"debiased CKA between consecutive stages: -?\d\.\d\d \(shuffled-rows baseline "
        r"\|CKA\| <= \d\.\d\d\)",
        result.stdout,
    )
    biased = RUNNER.invoke(
        app,
        [
            "compare",
            str(tmp_path / "run"),
            str(tmp_path / "run"),
            "--cka",
            "biased",
            "--probe",
            "50",
            "--json",
        ],
    )
    assert biased.exit_code == 0 and json.loads(biased.stdout)["estimator"] == "biased"


def test_compare_prints_a_labelled_table_of_the_json_figures(trained):
    args = ("compare", trained.run, trained.run, "--probe", "50")
    as_json = json.loads(invoke(*args, "--json").stdout)
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.stdout.splitlines() if "B stage 0" in line)
    assert re.findall(r"B stage \d", header) == ["B stage 0", "B stage 1"]
    for i, row in enumerate(as_json["cka"]):
        line = next(line for line in result.stdout.splitlines() if f"A stage {i} " in line)
        assert re.findall(r"-?\d\.\d\d(?!\d)", line) == [f"{v:.2f}" for v in row]
    shuffled = max(abs(v) for row in as_json["cka_shuffled"] for v in row)
    assert f"shuffled-rows baseline: |CKA| <= {shuffled:.2f}" in result.stdout


def test_report_reanalyses_an_analysis_of_an_older_format(tmp_path, trained):
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    old = {"probe": 10, "stages": [], "cka_between_stages": []}  # written before CKA baselines
    (run / "analysis.json").write_text(json.dumps(old))
    result = invoke("report", run, "--probe", "50")
    assert result.exit_code == 0, result.output
    analysis = read_json(run / "analysis.json")
    assert analysis["probe"] == 50 and analysis["cka_estimator"] == "debiased"
    assert "rows of the second representation shuffled" in (run / "report.html").read_text()
