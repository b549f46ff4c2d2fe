"""User data files (.npz, .csv): good files load, every bad file gets a one-line DataError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from neuroplex.config import DataConfig
from neuroplex.data.registry import Dataset, load_dataset
from neuroplex.errors import DataError


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
    for a, b in ((ds.train, by_index.train), (ds.test, by_index.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


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
