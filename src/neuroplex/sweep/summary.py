"""A sweep's table: the runs' own summaries, per cell mean ± std over seeds, the best cell.

Selection is on validation accuracy: the cell with the highest mean ``val_acc`` (the final
epoch's, the model ``test_acc`` is of) is marked best; its test accuracy is reported, never
used to choose. Only completed runs count (``n``); the others are listed with their status.
Also: :func:`list_runs`, the key figures of every run directory under a folder.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from neuroplex.errors import NeuroplexError
from neuroplex.files import atomic_write_json, atomic_write_text, read_json
from neuroplex.sweep.grid import Run

SELECT = "val_acc"
# summary.json figures averaged per cell: (key, column heading, format)
FIGURES = (
    ("val_acc", "val acc (final epoch)", "percent"),
    ("test_acc", "test acc (final epoch)", "percent"),
    ("test_acc_at_best_val", "test acc (best-val checkpoint)", "percent"),
    ("train_time_s", "train time per run", "seconds"),
)


def run_figures(run_dir: Path) -> dict[str, Any]:
    """Status and key figures of one run directory, from its summary.json."""
    path = run_dir / "summary.json"
    if not path.is_file():
        started = (run_dir / "config.yaml").is_file()
        return {"status": "unfinished" if started else "not started"}
    summary = read_json(path)
    keys = ("status", "epochs", "params", "best_val_acc", *(key for key, _, _ in FIGURES))
    return {key: summary.get(key) for key in keys}


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (0 for one value) and count; ``None`` figures for none."""
    if not values:
        return {"mean": None, "std": None, "n": 0}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.mean(values), "std": spread, "n": len(values)}


def cell_record(name: str, params: dict[str, str], runs: list[Run]) -> dict[str, Any]:
    """One cell: its runs' figures and, over the completed ones, mean ± std of each figure."""
    rows = [
        {"seed": run.seed, "run_dir": str(run.run_dir), **run_figures(run.run_dir)} for run in runs
    ]
    done = [row for row in rows if row["status"] == "completed"]
    stats = {
        key: mean_std([row[key] for row in done if row[key] is not None]) for key, _, _ in FIGURES
    }
    return {"name": name, "params": params, "n": len(done), **stats, "runs": rows}


def best_cell(cells: list[dict[str, Any]]) -> str | None:
    """The name of the cell with the highest mean validation accuracy (the first of a tie);
    ``None`` when no cell has one (no validation split, or no completed run)."""
    scored = [c for c in cells if c[SELECT]["mean"] is not None]
    return max(scored, key=lambda c: c[SELECT]["mean"])["name"] if scored else None


def collect(
    config: Path | None, seeds: list[int], grid: dict[str, list[str]], runs: list[Run]
) -> dict[str, Any]:
    """The sweep.json content."""
    cells = []
    for cell in dict.fromkeys(run.cell for run in runs):
        mine = [run for run in runs if run.cell == cell]
        cells.append(cell_record(cell.name, dict(cell.params), mine))
    return {
        "config": str(config) if config is not None else None,
        "seeds": seeds,
        "grid": grid,
        "selection": f"highest mean {SELECT} (final epoch) over the completed seeds",
        "best": best_cell(cells),
        "cells": cells,
    }


def write_sweep(
    out: Path, config: Path | None, seeds: list[int], grid: dict[str, list[str]], runs: list[Run]
) -> dict[str, Any]:
    """Write ``sweep.json``, ``sweep.md`` and ``sweep.png`` into ``out``; the sweep.json
    content."""
    from neuroplex.report.plots import save_png, sweep_figure

    result = collect(config, seeds, grid, runs)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "sweep.json", result)
    atomic_write_text(out / "sweep.md", markdown(result))
    save_png(sweep_figure(result["cells"], result["best"], SELECT), out / "sweep.png")
    return result


def fmt(stat: dict[str, Any], kind: str) -> str:
    """``84.2% ± 0.6`` (percent) or ``12 s`` (seconds); ``—`` without a value."""
    if stat["mean"] is None:
        return "—"
    if kind == "seconds":
        return f"{stat['mean']:.0f} s"
    return f"{100 * stat['mean']:.1f}% ± {100 * stat['std']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    """sweep.md: one row per cell, the best one marked ★."""
    keys = list(result["grid"])
    heading = ["", *keys, "n", *(title for _, title, _ in FIGURES)]
    lines = [
        f"# Sweep of `{result['config'] or 'the default config'}`",
        "",
        f"Seeds {', '.join(map(str, result['seeds']))}; mean ± std over the completed runs (n). "
        f"★ = best cell, selected on validation accuracy ({result['selection']}); test "
        "accuracy is reported, not used to choose.",
        "",
        "| " + " | ".join(heading) + " |",
        "|" + "---|" * len(heading),
    ]
    for cell in result["cells"]:
        mark = "★" if cell["name"] == result["best"] else ""
        values = [cell["params"][key] for key in keys]
        figures = [fmt(cell[key], kind) for key, _, kind in FIGURES]
        lines.append("| " + " | ".join([mark, *values, str(cell["n"]), *figures]) + " |")
    unfinished = [r for c in result["cells"] for r in c["runs"] if r["status"] != "completed"]
    for row in unfinished:
        lines.append(f"\nNot counted: `{row['run_dir']}` ({row['status']}).")
    return "\n".join(lines) + "\n"


def list_runs(root: Path) -> list[dict[str, Any]]:
    """Every run directory under ``root`` (a folder holding a config.yaml), sorted by path,
    with its status and key figures."""
    if not root.is_dir():
        raise NeuroplexError(f"{root}: not a directory")
    dirs = sorted(path.parent for path in root.rglob("config.yaml"))
    return [{"run_dir": str(d), **run_figures(d)} for d in dirs]
