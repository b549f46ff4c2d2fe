"""The package installs whole: configs reachable by name, py.typed, LICENSE, in the wheel."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from neuroplex.cli import run as cli
from neuroplex.config import load_config, to_yaml
from neuroplex.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the repository's package files (``pip wheel``)."""
    root = tmp_path_factory.mktemp("build")
    for name in ("src", "configs"):
        shutil.copytree(
            REPO / name,
            root / name,
            symlinks=True,
            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
        )
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, root / name)
    command = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-w", "dist", "-q"], cwd=root, check=True, timeout=300)
    (path,) = (root / "dist").glob("neuroplex-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_the_configs_py_typed_and_license(wheel):
    names = wheel.namelist()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("neuroplex/configs/")) == CONFIGS
    for config in CONFIGS:
        shipped = wheel.read(f"neuroplex/configs/{config}")
        assert shipped == (REPO / "configs" / config).read_bytes()
    assert "neuroplex/py.typed" in names
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file).startswith(b"MIT License")
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    assert "License-Expression: MIT" in wheel.read(metadata).decode()


def test_shipped_configs_load_by_name(capsys):
    for config in CONFIGS:
        name = config.removesuffix(".yaml")
        by_name = load_config(name, ["seed=3"])
        assert to_yaml(by_name) == to_yaml(load_config(REPO / "configs" / config, ["seed=3"]))
    assert cli(["config", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(config.removesuffix(".yaml") in listed for config in CONFIGS)
    assert cli(["config", "show", "digits_mlp"]) == 0
    assert capsys.readouterr().out == to_yaml(load_config(REPO / "configs" / "digits_mlp.yaml"))


def test_an_unknown_config_name_lists_the_shipped_ones(capsys):
    with pytest.raises(ConfigError, match="defualt: file not found, nor a shipped config"):
        load_config("defualt")
    assert cli(["train", "defualt"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "default_dense" in err[0]


def test_load_config_takes_a_dict_and_keyword_fields():
    cfg = load_config({"train": {"lr": 1e-3, "epochs": 2}}, ["seed=4"], train={"epochs": 5})
    assert (cfg.train.lr, cfg.train.epochs, cfg.seed) == (1e-3, 5, 4)
    assert load_config(cfg) == cfg
    with pytest.raises(ConfigError, match="train.lrr: unknown key; did you mean 'lr'"):
        load_config({"train": {"lrr": 1}})
    with pytest.raises(ConfigError, match="train.lr = -1: must be greater than 0"):
        load_config(None, train={"lr": -1})
    with pytest.raises(ConfigError, match="expected a YAML path, a shipped config name, a dict"):
        load_config(3)
