"""Tests of neuroplex.data.images through load_dataset: IDX datasets (Fashion-MNIST's place search),
image .npz files and folders, their errors, and per-channel standardisation. All files are
small and made here; the real Fashion-MNIST files are never read."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from neuroplex.config import DataConfig, load_config
from neuroplex.data import images
from neuroplex.data.registry import load_dataset
from neuroplex.errors import ConfigError, DataError

NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> None:
    """uint8 IDX file from the specification: 00 00 08 ndim, big-endian sizes, bytes."""
    raw = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    raw += array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)


def idx_folder(root: Path, n_train=60, n_test=20, classes=10, size=6, gz=True, seed=0):
    """Four IDX files of random images in ``root``; returns (x_train, y_train, x_test, y_test)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, (n_train, size, size)),
        np.arange(n_train) % classes,
        rng.integers(0, 256, (n_test, size, size)),
        np.arange(n_test) % classes,
    )
    for name, array in zip(NAMES.values(), arrays, strict=True):
        write_idx(root / name, array, gz)
    return arrays


@pytest.fixture
def no_system_copy(tmp_path, monkeypatch):
    """Pretend the Debian package is not installed and $NEUROPLEX_DATA is unset."""
    monkeypatch.setattr(images, "SYSTEM_ROOT", tmp_path / "usr-share-fashion-mnist")
    monkeypatch.delenv("NEUROPLEX_DATA", raising=False)


def one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# IDX datasets


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_neuroplex_data_and_keeps_the_official_test_split(
    tmp_path, monkeypatch, no_system_copy, gz
):
    x, y, x_test, y_test = idx_folder(tmp_path / "data" / "fashion-mnist", gz=gz)
    monkeypatch.setenv("NEUROPLEX_DATA", str(tmp_path / "data"))
    ds = load_dataset(DataConfig(name="fashion_mnist", val_fraction=0.2, shape="image"))
    assert ds.train.x.dtype == torch.uint8 and ds.input_shape == (1, 6, 6)
    assert torch.equal(ds.test.x, torch.from_numpy(x_test[:, None].astype(np.uint8)))
    assert torch.equal(ds.test.y, torch.from_numpy(y_test))
    assert (len(ds.train), len(ds.val)) == (48, 12)
    # train + val are exactly the official training images, each once
    seen = torch.cat([ds.train.x, ds.val.x]).reshape(60, -1).numpy()
    assert sorted(map(bytes, seen)) == sorted(map(bytes, x.astype(np.uint8).reshape(60, -1)))
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"


def test_fashion_mnist_flat_is_the_same_pixels_as_vectors(tmp_path, monkeypatch, no_system_copy):
    idx_folder(tmp_path / "fashion-mnist")
    image = load_dataset(DataConfig(name="fashion_mnist", root=tmp_path / "fashion-mnist",
                                    shape="image"))  # fmt: skip
    flat = load_dataset(DataConfig(name="fashion_mnist", root=tmp_path / "fashion-mnist"))
    assert flat.input_shape == (36,) and flat.n_features == 36
    assert torch.equal(flat.test.inputs(), image.test.inputs().reshape(20, 36))


def test_missing_fashion_mnist_names_every_place_and_how_to_get_it(
    tmp_path, monkeypatch, no_system_copy
):
    monkeypatch.setenv("NEUROPLEX_DATA", str(tmp_path / "data"))
    partial = tmp_path / "data" / "fashion-mnist"
    partial.mkdir(parents=True)
    write_idx(partial / NAMES["train_images"], np.zeros((2, 2, 2)))
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="fashion_mnist"))
    message = one_line(info)
    assert str(partial) in message and str(images.SYSTEM_ROOT) in message
    assert "missing train_labels, test_images, test_labels" in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message


def test_idx_dataset_with_named_files_and_label_values_as_classes(tmp_path):
    rng = np.random.default_rng(1)
    for key, n in (("train", 30), ("test", 9)):
        write_idx(tmp_path / f"emnist-{key}-images", rng.integers(0, 256, (n, 4, 5)))
        write_idx(tmp_path / f"emnist-{key}-labels", 3 + np.arange(n) % 3)  # labels 3, 4, 5
    files = {f"{k}_{w}": f"emnist-{k}-{w}" for k in ("train", "test") for w in ("images", "labels")}
    ds = load_dataset(DataConfig(name="idx", root=tmp_path, idx_files=files, val_fraction=0))
    assert ds.class_names == ["3", "4", "5"] and ds.input_shape == (20,)
    assert ds.test.y.tolist() == [0, 1, 2] * 3 and ds.val is None


def test_idx_transpose_reads_emnist_column_major_images(tmp_path):
    rng = np.random.default_rng(2)
    upright = {key: rng.integers(0, 256, (n, 4, 7)) for key, n in (("train", 20), ("test", 5))}
    for key, x in upright.items():  # EMNIST stores image [r, c] at byte c * rows + r
        stored = np.stack([img.flatten(order="F").reshape(7, 4) for img in x])
        write_idx(tmp_path / NAMES[f"{key}_images"], stored)
        write_idx(tmp_path / NAMES[f"{key}_labels"], np.arange(len(x)) % 2)
    cfg = {"name": "idx", "root": tmp_path, "shape": "image", "standardize": False}
    ds = load_dataset(DataConfig(**cfg, val_fraction=0, idx_files={"transpose": True}))
    assert ds.input_shape == (1, 4, 7)
    assert np.array_equal(np.asarray(ds.test.x)[:, 0], upright["test"])
    as_stored = load_dataset(DataConfig(**cfg, val_fraction=0))
    assert as_stored.input_shape == (1, 7, 4)


def test_idx_needs_a_root():
    with pytest.raises(ValueError, match="root: missing"):
        DataConfig(name="idx")


@pytest.mark.parametrize(
    ("break_it", "fragments"),
    [
        (lambda r: write_idx(r / NAMES["test_labels"], np.arange(19) % 10),
         ["19 labels", "has 20 images"]),
        (lambda r: write_idx(r / NAMES["train_images"], np.zeros((60, 36))),
         ["uint8 (60, 36)", "expected uint8 images [n, rows, cols]"]),
        (lambda r: (r / NAMES["test_images"]).write_bytes(b"\x00\x00\x08\x03" + bytes(8)),
         ["3 dimensions", "16 header bytes"]),
        (lambda r: (r / NAMES["train_labels"]).unlink(),
         ["train-labels-idx1-ubyte: file not found (nor with .gz)", "data.idx_files.train_labels"]),
    ],
)  # fmt: skip
def test_bad_idx_datasets_are_one_line_errors(tmp_path, break_it, fragments):
    idx_folder(tmp_path, gz=False)
    break_it(tmp_path)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="idx", root=tmp_path))
    message = one_line(info)
    for fragment in fragments:
        assert fragment in message


def test_fashion_mnist_labels_out_of_range_are_an_error(tmp_path):
    idx_folder(tmp_path, classes=12)
    with pytest.raises(DataError, match=r"not all in 0\.\.9"):
        load_dataset(DataConfig(name="fashion_mnist", root=tmp_path))


# ---------------------------------------------------------------------------------------------
# per-channel standardisation


@pytest.mark.parametrize("dtype", [np.uint8, np.float64])
def test_per_channel_standardisation_uses_training_statistics(tmp_path, dtype):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (50, 3, 5, 4)).astype(dtype)
    x[:, 1] = x[:, 1] // 4 + 7  # channels with different statistics
    x[:, 2] = 9  # a constant channel: std 1
    y = np.arange(50) % 5
    np.savez(tmp_path / "imgs.npz", x=x, y=y)
    ds = load_dataset(DataConfig(name="images", path=tmp_path / "imgs.npz", shape="image"))
    train = ds.train.x.numpy().astype(np.float64)
    mean = train.mean(axis=(0, 2, 3))
    std = train.std(axis=(0, 2, 3))
    std[2] = 1.0
    assert np.allclose(ds.scaling()["mean"], mean, rtol=1e-6)
    assert np.allclose(ds.scaling()["std"], std, rtol=1e-6)
    expected = (ds.test.x.numpy() - mean[None, :, None, None]) / std[None, :, None, None]
    assert ds.test.inputs().dtype == torch.float32
    assert np.allclose(ds.test.inputs().numpy(), expected, atol=1e-5)
    stored = ds.train.x.dtype
    assert stored == (torch.uint8 if dtype == np.uint8 else torch.float32)


def test_standardize_off_leaves_pixel_values(tmp_path):
    x = np.arange(40 * 9, dtype=np.uint8).reshape(40, 3, 3)
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(40) % 2)
    ds = load_dataset(DataConfig(name="images", path=tmp_path / "a.npz", standardize=False))
    assert torch.equal(ds.test.inputs(), ds.test.x.float())


def test_digits_and_mnist1d_as_images():
    digits = load_dataset(DataConfig(name="digits", shape="image"))
    flat = load_dataset(DataConfig(name="digits", standardize=False))
    raw = load_dataset(DataConfig(name="digits", shape="image", standardize=False))
    assert digits.input_shape == (1, 8, 8) and flat.input_shape == (64,)
    assert torch.equal(raw.test.inputs().reshape(-1, 64), flat.test.inputs())
    assert digits.train.inputs().mean().abs() < 1e-4  # per-channel: one mean for all pixels
    signal = load_dataset(DataConfig(name="mnist1d", shape="image"))
    assert signal.input_shape == (1, 40) and signal.train.inputs().shape == (
        len(signal.train),
        1,
        40,
    )


def test_file_as_image_and_augmenting_vectors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"data.shape = 'image'.*use name: images"):
        load_config(None, ["data.name=file", "data.path=a.npz", "data.shape=image"])
    with pytest.raises(ConfigError, match=r"data.augment = .*crop and flip need images"):
        load_config(None, ["data.name=digits", "data.augment.flip=true"])
    assert load_config(None, ["data.name=digits", "data.shape=image", "data.augment.crop=1"])


# ---------------------------------------------------------------------------------------------
# image .npz


def test_image_npz_three_and_four_dimensional(tmp_path):
    x3 = np.random.default_rng(3).integers(0, 256, (40, 5, 6)).astype(np.uint8)
    np.savez(tmp_path / "grey.npz", x=x3, y=np.array(["cat", "dog"] * 20))
    grey = load_dataset(DataConfig(name="images", path=tmp_path / "grey.npz", shape="image"))
    assert grey.input_shape == (1, 5, 6) and grey.class_names == ["cat", "dog"]
    x4 = np.random.default_rng(4).random((40, 3, 5, 6)).astype(np.float64)
    np.savez(tmp_path / "rgb.npz", x=x4, y=np.arange(40) % 4)
    rgb = load_dataset(DataConfig(name="images", path=tmp_path / "rgb.npz"))
    assert rgb.input_shape == (90,) and rgb.train.x.dtype == torch.float32
    # every stored sample is one of the file's, unchanged
    rows = {x.tobytes() for x in x4.astype(np.float32)}
    assert all(s.reshape(3, 5, 6).numpy().tobytes() in rows for s in rgb.train.x)


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"x": np.zeros((10, 4)), "y": np.zeros(10)}, ["(10, 4)", "[n, h, w] or [n, c, h, w]"]),
        ({"x": np.zeros((10, 2, 2), np.int32), "y": np.zeros(10)}, ["int32", "uint8 or float"]),
        ({"x": np.zeros((10, 2, 2)), "y": np.zeros(9)}, ["'y' has shape (9,)", "expected [10]"]),
        ({"x": np.full((4, 2, 2), np.nan), "y": np.arange(4) % 2}, ["NaN or infinite"]),
        ({"y": np.zeros(3)}, ["missing array 'x'"]),
    ],
)  # fmt: skip
def test_bad_image_npz_files_are_one_line_errors(tmp_path, arrays, fragments):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="images", path=path))
    message = one_line(info)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_image_path_that_is_missing_or_not_npz(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(DataConfig(name="images", path=tmp_path / "none.npz"))
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_dataset(DataConfig(name="images", path=tmp_path / "a.csv"))


def test_file_with_image_array_points_to_images(tmp_path):
    np.savez(tmp_path / "img.npz", x=np.zeros((4, 2, 2)), y=np.arange(4) % 2)
    with pytest.raises(DataError, match="use data.name: images"):
        load_dataset(DataConfig(name="file", path=tmp_path / "img.npz"))


# ---------------------------------------------------------------------------------------------
# image folders


def image_folder(root: Path, per_class=10, size=(5, 4), modes=("L", "L")) -> dict:
    """Class folders ``a``, ``b`` of PNG files; returns {(class, index): pixels [h, w(, 3)]}."""
    rng = np.random.default_rng(5)
    pixels = {}
    for c, (name, mode) in enumerate(zip(("a", "b"), modes, strict=True)):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            array = rng.integers(0, 256, shape).astype(np.uint8)
            Image.fromarray(array, mode=mode).save(root / name / f"{i:03d}.png")
            pixels[c, i] = array
    (root / "a" / "notes.txt").write_text("not an image: ignored")
    return pixels


def test_image_folder_decodes_classes_in_order_and_caches(tmp_path, monkeypatch):
    pixels = image_folder(tmp_path / "pics")
    cfg = DataConfig(name="images", path=tmp_path / "pics", shape="image", standardize=False,
                     val_fraction=0, test_fraction=0.5)  # fmt: skip
    ds = load_dataset(cfg)
    assert ds.class_names == ["a", "b"] and ds.input_shape == (1, 4, 5)
    expected = {pixels[c, i].tobytes() for c, i in pixels if c == 1}
    got = {x[0].numpy().tobytes() for x, y in zip(ds.test.x, ds.test.y, strict=True) if y == 1}
    assert got <= expected and len(ds.test) == 10
    monkeypatch.setattr(images, "_decode", lambda files: pytest.fail("decoded twice"))
    again = load_dataset(cfg)  # from the memory-mapped cache
    assert torch.equal(again.train.x, ds.train.x) and torch.equal(again.test.y, ds.test.y)


def test_image_folder_with_a_colour_class_is_rgb(tmp_path):
    pixels = image_folder(tmp_path / "pics", modes=("L", "RGB"))
    x, y, names = images.read_image_folder(tmp_path / "pics", tmp_path / "cache")
    assert x.shape == (20, 3, 4, 5) and y.tolist() == [0] * 10 + [1] * 10
    assert np.array_equal(x[0], np.repeat(pixels[0, 0][None], 3, axis=0))
    assert np.array_equal(x[10], pixels[1, 0].transpose(2, 0, 1))


def test_image_folder_errors(tmp_path):
    image_folder(tmp_path / "mixed")
    Image.new("L", (7, 7)).save(tmp_path / "mixed" / "b" / "zz.png")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="images", path=tmp_path / "mixed"))
    assert "zz.png: image is 7x7" in one_line(info) and "is 5x4" in one_line(info)

    image_folder(tmp_path / "broken")
    (tmp_path / "broken" / "a" / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(name="images", path=tmp_path / "broken"))
    assert "bad.jpg: unreadable image" in one_line(info)

    (tmp_path / "one" / "only").mkdir(parents=True)
    with pytest.raises(DataError, match="1 class subfolders, expected at least 2"):
        load_dataset(DataConfig(name="images", path=tmp_path / "one"))
    (tmp_path / "one" / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no image files"):
        load_dataset(DataConfig(name="images", path=tmp_path / "one"))
