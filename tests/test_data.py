"""Tests of neuroplex.data: built-in datasets, caching, splits, standardisation, bad files."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import mnist1d.data
import numpy as np
import pytest
import torch

from neuroplex.config import DataConfig
from neuroplex.data import Dataset, cache_dir, describe_datasets, load_dataset
from neuroplex.errors import DataError


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
    assert set(info) == {"mnist1d", "digits", "file"}
    assert (info["mnist1d"]["samples"], info["mnist1d"]["features"]) == (5000, 40)
    assert (info["digits"]["samples"], info["digits"]["features"]) == (1797, 64)
    assert all(d["classes"] == 10 for d in (info["mnist1d"], info["digits"]))
    assert ".npz" in info["file"]["description"] and ".csv" in info["file"]["description"]
    assert calls == []


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


def _blobs(n: int = 60, d: int = 3, classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = np.arange(n) % classes
    return rng.normal(size=(n, d)) + y[:, None], y


def test_good_npz(tmp_path: Path) -> None:
    x, y = _blobs()
    path = tmp_path / "good.npz"
    np.savez(path, x=x, y=y + 5)  # labels 5, 6, 7 are remapped to 0..2
    ds = load_dataset(DataConfig(name="file", path=path, val_fraction=0.1, test_fraction=0.2))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (43, 5, 12)
    assert ds.class_names == ["5", "6", "7"] and ds.n_classes == 3 and ds.n_features == 3
    assert set(ds.train.y.tolist()) == {0, 1, 2}
    assert ds.name == "file"


def test_good_npz_float_integer_labels(tmp_path: Path) -> None:
    x, y = _blobs(classes=2)
    path = tmp_path / "f.npz"
    np.savez(path, x=x.astype(np.float32), y=y.astype(np.float64))
    ds = load_dataset(DataConfig(name="file", path=path, val_fraction=0))
    assert ds.class_names == ["0", "1"] and ds.val is None


def test_good_csv_string_labels(tmp_path: Path) -> None:
    x, y = _blobs(n=30)
    names = np.array(["zebra", "ant", "cat"])[y]
    lines = ["f1,species,f2,f3"]
    lines += [f"{a},{s},{b},{c}" for (a, b, c), s in zip(x, names, strict=True)]
    path = tmp_path / "good.csv"
    path.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(name="file", path=path, label_column="species", val_fraction=0.0)
    ds = load_dataset(cfg)
    assert ds.class_names == ["ant", "cat", "zebra"] and ds.n_features == 3
    assert len(ds.train) + len(ds.test) == 30
    by_index = load_dataset(DataConfig(name="file", path=path, label_column=1, val_fraction=0.0))
    assert _same(ds, by_index)


def test_tiny_classes_fall_back_to_plain_split(tmp_path: Path) -> None:
    x = np.arange(20.0).reshape(10, 2)
    y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 2])  # classes 1 and 2 have one sample
    path = tmp_path / "tiny.npz"
    np.savez(path, x=x, y=y)
    ds = load_dataset(DataConfig(name="file", path=path, val_fraction=0.1, test_fraction=0.2))
    assert (len(ds.train), len(ds.val), len(ds.test)) == (7, 1, 2)


# ---------------------------------------------------------------------------------------------
# user files: bad


def _load_file(path: Path, **kw) -> Dataset:
    return load_dataset(DataConfig(name="file", path=path, **kw))


def _expect(path: Path, pattern: str, **kw) -> str:
    with pytest.raises(DataError, match=pattern) as info:
        _load_file(path, **kw)
    message = str(info.value)
    assert message.startswith("data error: ") and str(path) in message
    assert "\n" not in message
    return message


def _npz(tmp_path: Path, name: str = "bad.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _csv(tmp_path: Path, text: str, name: str = "bad.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_missing_file(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.npz", "file not found")


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text("1,2\n")
    _expect(path, r"expected \.npz or \.csv")


def test_npz_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip archive")
    _expect(path, "not a readable .npz")


def test_npz_missing_array_lists_contents(tmp_path: Path) -> None:
    path = _npz(tmp_path, features=np.zeros((4, 2)), y=np.zeros(4))
    message = _expect(path, "missing array 'x'")
    assert "'features'" in message and "'y'" in message


def test_npz_x_not_2d(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros(10), y=np.zeros(10))
    _expect(path, r"array 'x' has shape \(10,\), expected 2-D \[samples, features\]")


def test_npz_y_not_1d(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((10, 2)), y=np.zeros((10, 1)))
    _expect(path, r"array 'y' has shape \(10, 1\), expected 1-D")


def test_npz_length_mismatch(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((10, 2)), y=np.zeros(9))
    _expect(path, "'x' has 10 samples but 'y' has 9 labels")


def test_npz_nan_and_inf(tmp_path: Path) -> None:
    x, y = _blobs()
    x[7, 1], x[9, 0] = np.nan, np.inf
    path = _npz(tmp_path, x=x, y=y)
    _expect(path, r"2 NaN or infinite values \(first in sample 7")


def test_npz_non_integer_labels(tmp_path: Path) -> None:
    x, y = _blobs()
    y = y.astype(float)
    y[4] = 0.5
    _expect(_npz(tmp_path, x=x, y=y), r"label 0\.5 \(sample 4.*not an integer")


def test_npz_single_class(tmp_path: Path) -> None:
    x, _ = _blobs()
    _expect(_npz(tmp_path, x=x, y=np.full(60, 3)), "only 1 class.*need at least 2")


def test_npz_object_array(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.array([[1, "a"], [2, None]], dtype=object), y=np.zeros(2))
    _expect(path, "cannot read arrays")


def test_too_few_samples(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((4, 2)), y=np.array([0, 1, 2, 3]))
    _expect(path, r"too few samples.*train=2, val=1, test=1.*train >= 4")


def test_too_few_for_val(tmp_path: Path) -> None:
    path = _npz(tmp_path, x=np.zeros((3, 2)), y=np.array([0, 1, 0]))
    _expect(path, r"too few samples.*val >= 1", val_fraction=0.5, test_fraction=0.5)


def test_csv_empty(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, ""), "file is empty")


def test_csv_no_header(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "1,2,0\n3,4,1\n"), "expected a header row")


def test_csv_header_only(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "a,b,label\n"), "no data rows")


def test_csv_label_column_not_found(tmp_path: Path) -> None:
    message = _expect(_csv(tmp_path, "a,b,class\n1,2,0\n"), "label column 'label' not found")
    assert "'a', 'b', 'class'" in message


def test_csv_label_index_out_of_range(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "a,b\n1,0\n"), "index 5 out of range", label_column=5)


def test_csv_non_numeric_feature(tmp_path: Path) -> None:
    path = _csv(tmp_path, "a,b,label\n1,2,x\n3,oops,y\n")
    _expect(path, r"line 3, column 'b': value 'oops' is not a number")


def test_csv_ragged_rows(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "a,b,label\n1,2,x\n3,y\n"), "line 3 has 2 values.*3 columns")


def test_csv_nan_feature(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "a,label\n1,x\nnan,y\n2,x\n"), "1 NaN or infinite values")


def test_csv_fractional_labels(tmp_path: Path) -> None:
    _expect(_csv(tmp_path, "a,label\n1,0\n2,1.5\n3,1\n"), r"label 1\.5.*not an integer")
