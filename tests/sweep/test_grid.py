"""Seeds and grids from the command line: the runs they make, one-line errors for bad ones."""

from __future__ import annotations

import pytest

from neuroplex.errors import NeuroplexError
from neuroplex.sweep.grid import cells, parse_grid, parse_seeds, plan


@pytest.mark.parametrize(
    ("text", "seeds"),
    [("3", [3]), ("0-4", [0, 1, 2, 3, 4]), ("0,2,5", [0, 2, 5]), ("0-2, 7", [0, 1, 2, 7])],
)
def test_seeds(text, seeds):
    assert parse_seeds(text) == seeds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "expected seeds as N, A-B"),
        ("a", "expected seeds as N, A-B"),
        ("-1", "expected seeds as N, A-B"),
        ("3-1", "range 3-1 is empty"),
        ("0-2,1", "a seed is given twice"),
    ],
)
def test_bad_seeds_are_one_line(text, fragment):
    with pytest.raises(NeuroplexError, match=fragment) as e:
        parse_seeds(text)
    assert str(e.value).startswith(f"--seeds {text!r}: ") and "\n" not in str(e.value)


def test_the_grid_is_the_product_last_key_fastest():
    grid = parse_grid(["model.stages.0.m=0,1,3", "train.lr = 1e-3, 3e-3"])
    assert grid == {"model.stages.0.m": ["0", "1", "3"], "train.lr": ["1e-3", "3e-3"]}
    names = [c.name for c in cells(grid)]
    assert names == [
        f"model.stages.0.m={m}_train.lr={lr}" for m in ("0", "1", "3") for lr in ("1e-3", "3e-3")
    ]
    assert cells({}) == [cells({})[0]] and cells({})[0].name == ""


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        (["train.lr"], "expected KEY=V1,V2,..."),
        (["=1,2"], "expected KEY=V1,V2,..."),
        (["train.lr=1e-3,"], "expected KEY=V1,V2,..."),
        (["seed=0,1"], "give seeds with --seeds"),
        (["train.lr=1,2", "train.lr=3"], "train.lr is already a grid key"),
        (["train.lr=1,1"], "a value is given twice"),
    ],
)
def test_bad_grid_items_are_one_line(items, fragment):
    with pytest.raises(NeuroplexError, match=fragment) as e:
        parse_grid(items)
    assert str(e.value).startswith("--grid '") and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            "train.lr=1e-3,abc",
            "--grid 'train.lr=1e-3,abc': train.lr = 'abc': must be a valid number",
        ),
        ("train.lrr=1,2", "--grid 'train.lrr=1,2': train.lrr: unknown key; did you mean 'lr'?"),
        (
            "model.stages.5.width=8",
            "--grid 'model.stages.5.width=8': model.stages has 4 entries; index 5 is out of range",
        ),
    ],
)
def test_a_bad_grid_value_names_its_grid_item(tmp_path, item, message):
    with pytest.raises(NeuroplexError) as e:
        plan(None, [0], parse_grid([item]), tmp_path)
    assert str(e.value).startswith(message)


def test_runs_get_their_cell_and_seed(tmp_path):
    runs = plan(None, [0, 4], parse_grid(["train.lr=1e-3,3e-3"]), tmp_path)
    assert [(r.cfg.train.lr, r.cfg.seed) for r in runs] == [
        (1e-3, 0),
        (1e-3, 4),
        (3e-3, 0),
        (3e-3, 4),
    ]
    assert runs[1].run_dir == tmp_path / "train.lr=1e-3" / "seed4"
    assert plan(None, [2], {}, tmp_path)[0].run_dir == tmp_path / "seed2"


def test_cells_that_would_share_a_directory_are_refused(tmp_path):
    with pytest.raises(NeuroplexError, match="would share the directory"):
        plan(None, [0], parse_grid(["name=a b,a:b"]), tmp_path)
