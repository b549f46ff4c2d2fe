"""Training on data given from Python (arrays, tensors, a Dataset, DataLoaders) gives the
numbers of the equivalent .npz file run, and resumes exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch.utils.data import BatchSampler, DataLoader, TensorDataset

from neuroplex.cli import run as cli
from neuroplex.config import load_config
from neuroplex.data.registry import load_dataset
from neuroplex.data.stream import SeededSampler
from neuroplex.errors import ConfigError
from neuroplex.files import read_jsonl
from neuroplex.train import train

TIMING = {"samples_per_s", "wall_time"}
SMALL = [
    "model.stages=[{kind: dense, width: 32, dropout: 0.1}]",
    "train.epochs=3",
    "train.batch_size=64",
    "threads=1",
]


def metrics(run_dir) -> list[dict]:
    rows = read_jsonl(run_dir / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.data, data.target


@pytest.fixture
def npz_run(digits, tmp_path):
    """The .npz file run every Python source is compared with: (its config, its metrics)."""

    def run(*overrides: str, name: str = "file"):
        path = tmp_path / "digits.npz"
        np.savez(path, x=digits[0], y=digits[1])
        cfg = load_config(None, [*SMALL, *overrides, "data.name=file", f"data.path={path}"])
        train(cfg, tmp_path / name)
        return cfg, metrics(tmp_path / name)

    return run


def sources(x: np.ndarray, y: np.ndarray) -> dict:
    return {
        "numpy arrays": (x, y),
        "torch tensors": (torch.tensor(x), torch.tensor(y)),
        "list labels": (x, y.tolist()),
        "torch Dataset": TensorDataset(torch.tensor(x), torch.tensor(y)),
    }


@pytest.mark.parametrize("kind", list(sources(np.zeros((1, 1)), np.zeros(1))))
def test_arrays_tensors_and_dataset_train_like_the_npz_file(kind, digits, npz_run, tmp_path):
    _, expected = npz_run()
    summary = train(load_config(None, SMALL), tmp_path / "py", data=sources(*digits)[kind])
    assert metrics(tmp_path / "py") == expected
    assert summary["dataset"]["name"] == "python"
    assert "name: python" in (tmp_path / "py" / "config.yaml").read_text()


def test_image_arrays_train_like_the_image_npz_file(digits, tmp_path):
    images = digits[0].reshape(-1, 8, 8)
    path = tmp_path / "images.npz"
    np.savez(path, x=images, y=digits[1])
    conv = [
        "model.stages=[{kind: conv, channels: 4}, {kind: flatten}]",
        "train.epochs=2",
        "data.shape=image",
    ]
    cfg = load_config(None, [*SMALL, *conv, "data.name=images", f"data.path={path}"])
    train(cfg, tmp_path / "file")
    train(load_config(None, [*SMALL, *conv]), tmp_path / "py", data=(images, digits[1]))
    assert metrics(tmp_path / "py") == metrics(tmp_path / "file")


def test_image_dataloaders_stream_like_the_image_npz_file(digits, tmp_path):
    images = digits[0].reshape(-1, 8, 8).astype(np.float32)
    path = tmp_path / "images.npz"
    np.savez(path, x=images, y=digits[1])
    conv = ["model.stages=[{kind: conv, channels: 4}, {kind: flatten}]", "data.shape=image"]
    cfg = load_config(None, [*SMALL, *conv, "data.name=images", f"data.path={path}"])
    train(cfg, tmp_path / "file")
    summary = train(
        load_config(None, [*SMALL, *conv]), tmp_path / "py", data=loaders(raw_splits(cfg))
    )
    assert summary["dataset"]["input_shape"] == [1, 8, 8]
    for mine, theirs in zip(metrics(tmp_path / "py"), metrics(tmp_path / "file"), strict=True):
        for key in ("train_loss", "val_loss", "test_loss", "test_acc"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6)


def raw_splits(cfg) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The file run's own train / val / test samples, unstandardised."""
    data = load_dataset(cfg.data.model_copy(update={"standardize": False}))
    splits = {k: getattr(data, k) for k in ("train", "val", "test")}
    return {k: (split.inputs(), split.y) for k, split in splits.items()}


def test_given_splits_train_like_the_npz_file(npz_run, tmp_path):
    cfg, expected = npz_run()
    train(load_config(None, SMALL), tmp_path / "py", data=raw_splits(cfg))
    assert metrics(tmp_path / "py") == expected


def loaders(splits, seed: int = 0, **train_kwargs) -> dict[str, DataLoader]:
    """DataLoaders over the splits; training batches in neuroplex's own order by default."""
    train_set = TensorDataset(*splits["train"])
    if not train_kwargs:
        order = BatchSampler(SeededSampler(len(train_set), seed), 64, drop_last=False)
        train_kwargs = {"batch_sampler": order}
    return {
        "train": DataLoader(train_set, **train_kwargs),
        "val": DataLoader(TensorDataset(*splits["val"]), batch_size=1024),
        "test": DataLoader(TensorDataset(*splits["test"]), batch_size=1024),
    }


def test_dataloaders_stream_like_the_npz_file_unstandardised(npz_run, tmp_path):
    cfg, expected = npz_run("data.standardize=false")
    py_cfg = load_config(None, [*SMALL, "data.standardize=false"])
    summary = train(py_cfg, tmp_path / "py", data=loaders(raw_splits(cfg)))
    assert metrics(tmp_path / "py") == expected
    assert (summary["dataset"]["train"], summary["dataset"]["test"]) == (1293, 360)


def test_dataloaders_standardise_like_the_npz_file(npz_run, tmp_path):
    """The streamed statistics are merged batch by batch, so equal to rounding (the unit test of
    the merge is in tests/data/test_stream.py)."""
    cfg, expected = npz_run()
    train(load_config(None, SMALL), tmp_path / "py", data=loaders(raw_splits(cfg)))
    got = metrics(tmp_path / "py")
    assert [r["epoch"] for r in got] == [r["epoch"] for r in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for key in ("train_loss", "val_loss", "test_loss", "test_acc"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("order", ["seeded sampler", "shuffle=True"])
def test_dataloader_run_resumes_exactly(order, npz_run, tmp_path):
    cfg, _ = npz_run()
    splits = raw_splits(cfg)
    kwargs = {} if order == "seeded sampler" else {"batch_size": 64, "shuffle": True}
    py_cfg = load_config(None, SMALL)
    train(py_cfg, tmp_path / "full", data=loaders(splits, **kwargs))
    train(py_cfg, tmp_path / "cut", data=loaders(splits, **kwargs), stop_after_epoch=1)
    train(py_cfg, tmp_path / "cut", data=loaders(splits, **kwargs), resume=True)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_array_run_resumes_exactly_and_refuses_other_data(digits, tmp_path):
    cfg = load_config(None, SMALL)
    train(cfg, tmp_path / "full", data=digits)
    train(cfg, tmp_path / "cut", data=digits, stop_after_epoch=1)
    changed = (digits[0] + 1.0, digits[1])
    with pytest.raises(ConfigError, match="trained on other data"):
        train(cfg, tmp_path / "cut", data=changed, resume=True)
    train(cfg, tmp_path / "cut", data=digits, resume=True)
    assert metrics(tmp_path / "cut") == metrics(tmp_path / "full")


def test_python_data_needs_the_data(tmp_path):
    cfg = load_config(None, [*SMALL, "data.name=python"])
    with pytest.raises(ConfigError, match="data.name = 'python'"):
        train(cfg, tmp_path / "run")


def test_cli_commands_on_a_python_data_run_are_one_line_errors(digits, tmp_path, capsys):
    train(load_config(None, SMALL), tmp_path / "run", data=digits)
    capsys.readouterr()
    for argv in (["eval", str(tmp_path / "run")], ["train", "--resume", str(tmp_path / "run")]):
        assert cli(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and "data.name = 'python'" in err[0], err
