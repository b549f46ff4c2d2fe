"""Finished runs: load a run directory's config and checkpoint, evaluate it, evaluate its exits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from neuroplex.config import load_config
from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_json
from neuroplex.plasticity.rewiring import restore_wirings
from neuroplex.train.checkpoint import Checkpoint, load_checkpoint, load_module_state
from neuroplex.train.evaluate import evaluate
from neuroplex.train.rundir import load_method_state
from neuroplex.train.setup import Setup, build_setup

SPLITS = ("train", "val", "test")


def load_run(
    run_dir: str | Path, which: str = "best", overrides: list[str] | None = None
) -> tuple[Setup, Checkpoint]:
    """Rebuild a run from its ``config.yaml`` (with ``overrides``) and load its ``best`` or
    ``last`` checkpoint. (For the model alone, on raw inputs: :func:`neuroplex.load_model`.)"""
    if which not in ("best", "last"):
        raise NeuroplexError(f"--checkpoint {which!r}: expected best or last")
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise NeuroplexError(f"{run_dir}: not a run directory (no config.yaml)")
    s = build_setup(load_config(config_path, overrides))
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


def evaluate_exits(
    run_dir: str | Path,
    *,
    split: str = "test",
    which: str = "best",
    overrides: list[str] | None = None,
) -> dict:
    """Early-exit policies of a local run; writes ``exits.json`` and ``exits.png``.
    ``overrides`` (``train.exits.KEY=VALUE``) change the exit settings, nothing else."""
    from neuroplex.methods.exits import exit_report
    from neuroplex.report.plots import exits_figure, save_png

    run_dir = Path(run_dir)
    for item in overrides or []:
        if not item.startswith("train.exits."):
            raise NeuroplexError(f"--set {item}: eval --exits accepts only train.exits.* keys")
    s, ckpt = load_run(run_dir, which, overrides)
    if s.cfg.train.method != "local":
        raise NeuroplexError(
            f"{run_dir}: --exits needs a run trained with train.method=local (its auxiliary "
            f"heads are the exit classifiers); this run used {s.cfg.train.method}"
        )
    if s.data.val is None:
        raise NeuroplexError(
            f"{run_dir}: --exits chooses thresholds and λ on the validation split; this run has "
            "none (data.val_fraction=0)"
        )
    load_method_state(s, ckpt)
    cfg = s.cfg.train.exits
    splits = {
        "gates": getattr(s.data, cfg.gate_split),
        "classifiers": getattr(s.data, cfg.classifier_split),
        "val": s.data.val,
        "eval": split_of(s, split),
    }
    data = {name: (d.inputs(), d.y) for name, d in splits.items()}
    report: dict[str, Any] = {"split": split, "checkpoint": which}
    report.update(exit_report(s.model, [*s.method.aux, s.model.head], data, cfg, seed=s.cfg.seed))
    report["settings"] = cfg.model_dump(mode="json")
    atomic_write_json(run_dir / "exits.json", report)
    save_png(exits_figure(report), run_dir / "exits.png")
    return report
