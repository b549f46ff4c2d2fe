"""What a sweep runs: seeds and a grid parsed from the command line, one config per run.

    --seeds 0-4            seeds 0, 1, 2, 3, 4 (also ``0,2,5``, ``0-2,7``, ``3``)
    --grid KEY=V1,V2,...   a config key (as for --set) and its values, split on commas

The runs are the product: every combination of grid values (a *cell*) with every seed. A run's
directory is ``OUT/CELL/seedS`` (``OUT/seedS`` without a grid), ``CELL`` joining the
``KEY=VALUE`` pairs with ``_``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

from neuroplex.config import Config, load_config
from neuroplex.errors import ConfigError, NeuroplexError

SEEDS_FORMAT = "seeds as N, A-B or a comma list of them (e.g. 0-4 or 0,2,5)"


@dataclass(frozen=True)
class Cell:
    """One combination of grid values: ``(key, value text)`` pairs in --grid order."""

    params: tuple[tuple[str, str], ...]

    @property
    def name(self) -> str:
        """The cell's directory name (``""`` for a sweep without a grid)."""
        text = "_".join(f"{key}={value}" for key, value in self.params)
        return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={value}" for key, value in self.params]


@dataclass(frozen=True)
class Run:
    """One run of a sweep: its cell, seed, resolved config and directory."""

    cell: Cell
    seed: int
    cfg: Config
    run_dir: Path


def parse_seeds(text: str) -> list[int]:
    """``"0-2,7"`` -> ``[0, 1, 2, 7]``; NeuroplexError (one line) for anything else."""
    seeds: list[int] = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise NeuroplexError(f"--seeds {text!r}: expected {SEEDS_FORMAT}")
        first, last = int(match[1]), int(match[2] or match[1])
        if last < first:
            raise NeuroplexError(f"--seeds {text!r}: range {first}-{last} is empty (A > B)")
        seeds.extend(range(first, last + 1))
    if len(set(seeds)) != len(seeds):
        raise NeuroplexError(f"--seeds {text!r}: a seed is given twice")
    return seeds


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-3,3e-3"]`` -> ``{"train.lr": ["1e-3", "3e-3"]}`` (values as typed; the
    config checks them, see :func:`plan`)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        values = [v.strip() for v in text.split(",")]
        if not sep or not key or not all(values):
            raise NeuroplexError(
                f"--grid {item!r}: expected KEY=V1,V2,... (e.g. --grid train.lr=1e-3,3e-3)"
            )
        if key == "seed":
            raise NeuroplexError(f"--grid {item!r}: give seeds with --seeds, e.g. --seeds 0-4")
        if key in grid:
            raise NeuroplexError(f"--grid {item!r}: {key} is already a grid key")
        if len(set(values)) != len(values):
            raise NeuroplexError(f"--grid {item!r}: a value is given twice")
        grid[key] = values
    return grid


def cells(grid: dict[str, list[str]]) -> list[Cell]:
    """Every combination of the grid's values, the last key varying fastest."""
    keys = list(grid)
    return [
        Cell(tuple(zip(keys, values, strict=True)))
        for values in itertools.product(*(grid[k] for k in keys))
    ]


def plan(config: Path | None, seeds: list[int], grid: dict[str, list[str]], out: Path) -> list[Run]:
    """Every run of the sweep, its config validated (a bad grid value is one line naming the
    --grid item)."""
    load_config(config)  # the base config's own errors first, as they are
    runs = []
    names: dict[str, Cell] = {}
    for cell in cells(grid):
        if names.setdefault(cell.name, cell) != cell:
            raise NeuroplexError(
                f"--grid: cells {names[cell.name].overrides} and {cell.overrides} would share "
                f"the directory {cell.name!r}; use values that differ in letters or digits"
            )
        for seed in seeds:
            cfg = run_config(config, cell, seed, grid)
            runs.append(Run(cell, seed, cfg, out / cell.name / f"seed{seed}"))
    return runs


def run_config(config: Path | None, cell: Cell, seed: int, grid: dict[str, list[str]]) -> Config:
    """The config of one run; an error its overrides cause is reported against the --grid item
    (or the --seeds) that gave them."""
    try:
        return load_config(config, [*cell.overrides, f"seed={seed}"])
    except ConfigError as e:
        text = e.args[0]
        if text.startswith(("seed", "--set 'seed=")):
            raise NeuroplexError(f"--seeds: {text}") from None
        for key, _ in cell.params:
            if text.startswith((key, f"--set '{key}=")):
                item = f"{key}={','.join(grid[key])}"
                message = re.sub(r"^--set '[^']*': ", "", text)
                raise NeuroplexError(f"--grid {item!r}: {message}") from None
        raise NeuroplexError(f"--grid cell {' '.join(cell.overrides)}: {text}") from None
