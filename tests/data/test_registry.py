"""Tests of neuroplex.data.registry: built-in datasets, caching, splits, standardisation."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import get_args

import mnist1d.data
import numpy as np
import pytest
import torch

from neuroplex.config import DataConfig
from neuroplex.data.registry import Dataset, cache_dir, describe_datasets, load_dataset


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("NEUROPLEX_CACHE", str(cache))
    return cache


def _count_make_dataset(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap mnist1d's make_dataset; the returned list grows by one per call."""
    calls: list[int] = []
    real = mnist1d.data.make_dataset

    def counting(args, *a, **kw):
        calls.append(args.num_samples)
        return real(args, *a, **kw)

    monkeypatch.setattr(mnist1d.data, "make_dataset", counting)
    return calls


def _same(a: Dataset, b: Dataset) -> bool:
    pairs = [(a.train, b.train), (a.test, b.test)]
    if a.val is not None and b.val is not None:
        pairs.append((a.val, b.val))
    return all(torch.equal(p.x, q.x) and torch.equal(p.y, q.y) for p, q in pairs)


# ---------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_standard_sizes_and_cache_reuse(
    _tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_make_dataset(monkeypatch)
    cfg = DataConfig(name="mnist1d", val_fraction=0.1)
    ds = load_dataset(cfg)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (3600, 400, 1000)
    assert (ds.n_features, ds.n_classes) == (40, 10)
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.train.x.shape == (3600, 40) and ds.train.x.dtype == torch.float32
    assert ds.train.y.dtype == torch.int64 and set(ds.test.y.tolist()) == set(range(10))
    assert calls == [5000]
    files = list(_tmp_cache.glob("*.npz"))
    assert len(files) == 1 and "5000" in files[0].name
    again = load_dataset(cfg)
    assert calls == [5000]  # served from the cache
    assert _same(ds, again)


def test_mnist1d_restores_global_rng_state(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_make_dataset(monkeypatch)
    random.seed(123)
    np.random.seed(456)
    py_state, np_state = random.getstate(), np.random.get_state()
    load_dataset(DataConfig(name="mnist1d", num_samples=200))
    assert calls == [200]
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_mnist1d_corrupt_cache_is_regenerated(
    _tmp_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200)
    first = load_dataset(cfg)
    (cached,) = _tmp_cache.glob("*.npz")
    cached.write_bytes(b"not a zip file")
    calls = _count_make_dataset(monkeypatch)
    second = load_dataset(cfg)
    assert calls == [200]
    assert _same(first, second)
    assert np.load(cached)["x"].shape == (160, 40)  # rewritten, readable


def test_mnist1d_val_zero_and_determinism() -> None:
    cfg = DataConfig(name="mnist1d", num_samples=200, val_fraction=0)
    ds = load_dataset(cfg)
    assert ds.val is None and (len(ds.train), len(ds.test)) == (160, 40)
    assert _same(ds, load_dataset(cfg))


def test_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("NEUROPLEX_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "neuroplex"


def test_describe_datasets_does_not_generate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_make_dataset(monkeypatch)
    info = {d["name"]: d for d in describe_datasets()}
    assert list(info) == list(get_args(DataConfig.model_fields["name"].annotation))
    assert (info["mnist1d"]["samples"], info["mnist1d"]["features"]) == (5000, 40)
    assert (info["digits"]["samples"], info["digits"]["features"]) == (1797, 64)
    assert all(d["classes"] == 10 for d in (info["mnist1d"], info["digits"]))
    assert ".npz" in info["file"]["description"] and ".csv" in info["file"]["description"]
    assert calls == []


def test_mnist1d_shifted_is_another_distribution_of_the_same_shape() -> None:
    shifted = load_dataset(DataConfig(name="mnist1d_shifted", standardize=False))
    plain = load_dataset(DataConfig(name="mnist1d", standardize=False))
    assert shifted.train.x.shape == plain.train.x.shape and shifted.n_classes == 10
    assert not torch.equal(shifted.train.x, plain.train.x)

    # wider padding: the signal occupies less of the sequence, so more steps are near zero
    def quiet(x: torch.Tensor) -> float:
        return float((x.abs() < 0.1).float().mean())

    assert quiet(shifted.train.x) != pytest.approx(quiet(plain.train.x), abs=1e-3)


# ---------------------------------------------------------------------------------------------
# digits, splits, standardisation


def test_digits_sizes_and_stratification() -> None:
    ds = load_dataset(DataConfig(name="digits", test_fraction=0.2, val_fraction=0.1))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1293, 144, 360)
    assert (ds.n_features, ds.n_classes) == (64, 10)
    total = Counter(ds.train.y.tolist()) + Counter(ds.val.y.tolist()) + Counter(ds.test.y.tolist())
    for split in (ds.train, ds.val, ds.test):
        counts = Counter(split.y.tolist())
        for c in range(10):  # each class's share matches the whole to within one sample
            assert abs(counts[c] - total[c] * len(split) / 1797) <= 1.5


def test_digits_deterministic_and_seed_dependent() -> None:
    a = load_dataset(DataConfig(name="digits", split_seed=3))
    b = load_dataset(DataConfig(name="digits", split_seed=3))
    c = load_dataset(DataConfig(name="digits", split_seed=4))
    assert _same(a, b)
    assert not torch.equal(a.test.y, c.test.y)


def test_standardise_uses_train_statistics_only() -> None:
    ds = load_dataset(DataConfig(name="digits", standardize=True))
    x = ds.train.x.double()
    varying = x.std(dim=0) > 0  # digits has always-zero pixels: they stay 0
    assert torch.allclose(x.mean(dim=0), torch.zeros(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=0, unbiased=False)[varying], torch.ones(1).double(), atol=1e-4)
    test_mean = ds.test.x.double().mean(dim=0)
    assert test_mean.abs().max() > 1e-3  # test statistics were not used
    raw = load_dataset(DataConfig(name="digits", standardize=False))
    assert raw.train.x.max() == 16 and torch.equal(raw.train.y, ds.train.y)
    assert torch.isfinite(ds.train.x).all()


# ---------------------------------------------------------------------------------------------
# user files: good
