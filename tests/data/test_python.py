"""Tests of neuroplex.data.python: data given from Python is validated like files, one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from neuroplex.config import DataConfig
from neuroplex.data.python import dataset_from_python
from neuroplex.errors import DataError

CFG = DataConfig(name="python")
RNG = np.random.default_rng(0)
X, Y = RNG.normal(size=(60, 5)), np.arange(60) % 3


class Stream(IterableDataset):
    def __iter__(self):
        yield from zip(X, Y, strict=True)


def bad_sources() -> list[tuple[object, str]]:
    nan = X.copy()
    nan[4, 2] = np.nan
    return [
        ((X[:, 0], Y), r"data: array 'x' has shape \(60,\), expected 2-D"),
        ((X, Y[:-1]), "data: 'x' has 60 samples but 'y' has 59 labels"),
        ((nan, Y), r"x contains 1 NaN or infinite values \(first in sample 4"),
        ((X, np.zeros(60)), "only 1 class"),
        ((X, Y + 0.5), "is not an integer"),
        ((X.astype(str), Y), "expected numbers"),
        ((X[:, :, None, None, None], Y), r"expected 2-D \[samples, features\]"),
        ({"train": (X, Y)}, "expected 'train' and 'test'"),
        ({"train": (X, Y), "test": (X[:, :4], Y)}, r"data\['test'\]: samples have shape \(4,\)"),
        ({"train": DataLoader(TensorDataset(torch.tensor(X))), "test": (X, Y)}, "mixes"),
        (DataLoader(TensorDataset(torch.tensor(X), torch.tensor(Y))), "streams one split"),
        (Stream(), "IterableDataset has no random access"),
        (TensorDataset(torch.tensor(X)), r"data\[0\]: got tuple, expected an \(x, y\) pair"),
        ("x.npz", "got str; expected"),
    ]


@pytest.mark.parametrize(("source", "message"), bad_sources())
def test_bad_python_data_is_a_one_line_data_error(source, message):
    with pytest.raises(DataError, match=message) as info:
        dataset_from_python(source, CFG)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith("data error: data")


def test_string_labels_are_encoded_across_given_splits():
    names = np.array(["cat", "dog", "emu"])
    data = dataset_from_python(
        {"train": (X, names[Y]), "test": (X[:9], np.array(["emu"] * 9))}, CFG
    )
    assert data.class_names == ["cat", "dog", "emu"]
    assert data.test.y.tolist() == [2] * 9
    assert len(data.train) + len(data.val) == 60  # val carved from train (val_fraction 0.1)


def test_given_val_split_is_kept_and_standardised_with_train_statistics():
    data = dataset_from_python({"train": (X, Y), "val": (X[:7], Y[:7]), "test": (X, Y)}, CFG)
    mean, std = X.mean(axis=0), X.std(axis=0)
    expected = ((X[:7] - mean) / std).astype(np.float32)
    assert np.array_equal(data.val.x.numpy(), expected)
    assert data.fingerprint is not None
