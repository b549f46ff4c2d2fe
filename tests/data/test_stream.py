"""Tests of neuroplex.data.stream: streamed statistics, per-batch checks, loader order."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from neuroplex.config import DataConfig
from neuroplex.data.python import dataset_from_python
from neuroplex.data.stream import SeededSampler, merge_moments, own_random_state
from neuroplex.errors import ConfigError, DataError

CFG = DataConfig(name="python")


def test_merged_moments_equal_numpy_on_the_whole_array():
    rng = np.random.default_rng(1)
    values = 1e4 + rng.normal(size=(1000, 3)) * [1.0, 1e-3, 50.0]  # a large offset
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    for start in range(0, 1000, 77):
        count, mean, m2 = merge_moments(count, mean, m2, values[start : start + 77])
    assert count == 1000
    np.testing.assert_allclose(mean, values.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(np.sqrt(m2 / count), values.std(axis=0), rtol=1e-9)


def splits(x: torch.Tensor, y: torch.Tensor, **kwargs) -> dict[str, DataLoader]:
    data = TensorDataset(x, y)
    return {k: DataLoader(data, batch_size=16, **kwargs) for k in ("train", "test")}


def test_image_stream_is_scaled_per_channel_with_the_training_statistics():
    rng = np.random.default_rng(2)
    x = torch.tensor(
        rng.normal(size=(40, 2, 3, 3)) * np.array([1.0, 5.0])[:, None, None] + 3,
        dtype=torch.float32,
    )
    y = torch.arange(40) % 4
    data = dataset_from_python(splits(x, y), DataConfig(name="python", shape="image"))
    assert data.input_shape == (2, 3, 3) and data.n_classes == 4 and data.steps_per_epoch(99) == 3
    mean = x.double().mean(dim=(0, 2, 3))
    std = x.double().std(dim=(0, 2, 3), unbiased=False)
    inputs = torch.cat([xb for xb, _ in data.test.batches()])
    expected = (x - mean.float().view(1, 2, 1, 1)) / std.float().view(1, 2, 1, 1)
    torch.testing.assert_close(inputs, expected, rtol=1e-5, atol=1e-5)
    assert len(data.test) == 40
    flat = dataset_from_python(splits(x, y), CFG)  # data.shape: flat flattens, as in memory
    assert flat.input_shape == (18,)
    flat_inputs = torch.cat([xb for xb, _ in flat.test.batches()])
    assert torch.equal(flat_inputs, inputs.reshape(40, 18))


def test_bad_batches_are_one_line_errors():
    x, y = torch.randn(32, 4), torch.arange(32) % 2
    bad_test = {"train": DataLoader(TensorDataset(x, y), batch_size=8)}
    bad_test["test"] = DataLoader(TensorDataset(x, y + 5), batch_size=8)
    data = dataset_from_python(bad_test, CFG)
    with pytest.raises(
        DataError, match=r"data\['test'\] batch 0: label 6; expected integers in 0..1"
    ):
        list(data.test.batches())
    wide = {"train": bad_test["train"], "test": DataLoader(TensorDataset(torch.randn(8, 5), y[:8]))}
    with pytest.raises(DataError, match=r"samples of shape \(5,\); the training data has \(4,\)"):
        list(dataset_from_python(wide, CFG).test.batches())
    nan = x.clone()
    nan[3, 1] = float("nan")
    with pytest.raises(DataError, match=r"data\['train'\] batch 0: x contains NaN"):
        dataset_from_python(splits(nan, y), CFG)
    with pytest.raises(DataError, match="labels have dtype torch.float32"):
        dataset_from_python(splits(x, y.float()), CFG)
    with pytest.raises(DataError, match="yielded no batches"):
        dataset_from_python({"train": Nothing(), "test": Nothing()}, CFG)
    with pytest.raises(ConfigError, match="data.augment"):
        dataset_from_python(
            splits(x, y), DataConfig(name="python", shape="image", augment={"flip": True})
        )


class Nothing:
    """An iterable of no batches."""

    def __iter__(self):
        return iter(())


def test_seeded_sampler_order_depends_on_the_epoch_only():
    sampler = SeededSampler(50, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(50)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first


def lazily(loader):
    """The loader's batches, its iterator made at the first draw (as the loop does)."""
    yield from loader


def test_loader_draws_leave_the_training_random_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.arange(20)), batch_size=5, shuffle=True)
    first = [b for (b,) in own_random_state(lazily(loader), seed=7)]
    assert torch.equal(torch.rand(3), expected)  # the shuffle drew from its own state
    again = [b for (b,) in own_random_state(lazily(loader), seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
