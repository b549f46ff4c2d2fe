"""Finished runs: load a run directory's config and checkpoint, evaluate it, evaluate its exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroplex.config import load_config
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_json
from neuroplex.train.checkpoint import Checkpoint, load_checkpoint, load_module_state
from neuroplex.train.evaluate import evaluate
from neuroplex.train.rewiring import restore_wirings
from neuroplex.train.rundir import load_method_state
from neuroplex.train.setup import Setup, build_setup

SPLITS = ("train", "val", "test")


def load_run(run_dir: Path, which: str = "best") -> tuple[Setup, Checkpoint]:
    """Rebuild a run from its ``config.yaml`` and load its ``best`` or ``last`` checkpoint."""
    if which not in ("best", "last"):
        raise NeuroplexError(f"--checkpoint {which!r}: expected best or last")
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise NeuroplexError(f"{run_dir}: not a run directory (no config.yaml)")
    s = build_setup(load_config(config_path))
    ckpt = load_checkpoint(run_dir, which)
    restore_wirings(s.model, ckpt.state.get("wirings", {}))  # a rewired run's layers
    load_module_state(s.model, ckpt.tensors, "model.")
    return s, ckpt


def split_of(s: Setup, split: str):
    if split not in SPLITS:
        raise NeuroplexError(f"--split {split!r}: expected one of {', '.join(SPLITS)}")
    data = getattr(s.data, split)
    if data is None:
        raise NeuroplexError("--split val: this run has no validation split (data.val_fraction=0)")
    return data


def evaluate_run(run_dir: str | Path, *, split: str = "test", which: str = "best") -> dict:
    """Loss and accuracy of a run's checkpoint on one split."""
    run_dir = Path(run_dir)
    s, ckpt = load_run(run_dir, which)
    data = split_of(s, split)
    return {
        "run_dir": str(run_dir),
        "split": split,
        "checkpoint": which,
        "epoch": ckpt.state["loop"]["epoch"],
        "samples": len(data),
        **evaluate(s.model, data),
    }


def evaluate_exits(run_dir: str | Path, *, split: str = "test", which: str = "best") -> dict:
    """Early-exit policies of a local run; writes ``exits.json`` and ``exits.png``."""
    from neuroplex.report.plots import exits_figure, save_png
    from neuroplex.train.exits import best_saving, exit_report

    run_dir = Path(run_dir)
    s, ckpt = load_run(run_dir, which)
    if s.cfg.train.method != "local":
        raise NeuroplexError(
            f"{run_dir}: --exits needs a run trained with train.method=local (its auxiliary "
            f"heads are the exit classifiers); this run used {s.cfg.train.method}"
        )
    load_method_state(s, ckpt)
    data = split_of(s, split)
    heads = [*s.method.aux, s.model.head]
    # The gates learn when a stage's answer is right: that needs data the network did not fit.
    gate_split = "val" if s.data.val is not None else "train"
    fit = getattr(s.data, gate_split)
    report: dict[str, Any] = {"split": split, "checkpoint": which, "gates_trained_on": gate_split}
    report.update(exit_report(s.model, heads, fit.inputs(), fit.y, data.inputs(), data.y))
    for key in ("confidence", "gate"):
        report[f"{key}_best_within_1pt"] = best_saving(report[key], report["full"])
    atomic_write_json(run_dir / "exits.json", report)
    save_png(exits_figure(report), run_dir / "exits.png")
    return report
