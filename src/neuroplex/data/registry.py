"""Datasets: MNIST-1D (generated offline, cached), scikit-learn digits, Fashion-MNIST and other
IDX files, image .npz files and folders (neuroplex.data.images), and user feature files.

``load_dataset(cfg)`` returns a :class:`Dataset` of samples ``[n, *input_shape]`` and int64
labels ``[n]`` split into train / val / test. Splits are stratified by label when possible and
seeded by ``cfg.split_seed``, so the same config always gives identical tensors. Vectors are
float32, standardised per feature with statistics of the training split only. Images (and
``data.shape: image``) keep their stored pixels (uint8 stays uint8) and become float32 per batch
through :meth:`Split.inputs`, standardised per channel with training-split statistics and, for
training batches, augmented (neuroplex.data.pixels). Read a split's model inputs with
``split.inputs(...)``, never ``split.x`` directly.

A bad user file raises :class:`~neuroplex.errors.DataError` with one line naming the file and
the problem, e.g. ``data error: /x/foo.npz: array 'x' has shape (10,), expected 2-D``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroplex.config import AugmentConfig, DataConfig
from neuroplex.data.builtin import (
    DIGITS_CLASSES,
    DIGITS_FEATURES,
    DIGITS_SAMPLES,
    MNIST1D_CLASSES,
    MNIST1D_FEATURES,
    MNIST1D_VARIANTS,
    digits_arrays,
    mnist1d_arrays,
)
from neuroplex.data.images import (
    FASHION_MNIST_CLASSES,
    fashion_mnist_root,
    read_idx_dataset,
    read_images,
)
from neuroplex.data.pixels import Draw, Pixels, channel_stats, draw_augmentation
from neuroplex.data.preprocess import image_preprocessing, vector_preprocessing
from neuroplex.data.userfiles import read_data_file
from neuroplex.errors import DataError

STD_FLOOR = 1e-8
Parts = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Split:
    """One split: samples ``x`` [n, *input_shape] and labels ``y`` [n] int64 in 0..C-1.

    Without ``pixels``, ``x`` holds float32 model inputs. With it, ``x`` holds stored images
    (uint8 or float32, as ``[n, c, *s]`` or flattened ``[n, c * prod(s)]``) that
    :meth:`inputs` turns into float32 inputs.
    """

    x: torch.Tensor
    y: torch.Tensor
    pixels: Pixels | None = None

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def inputs(
        self, idx: torch.Tensor | slice | None = None, draw: Draw | None = None
    ) -> torch.Tensor:
        """Float32 model inputs ``[b, *input_shape]`` of samples ``idx`` (all when None),
        augmented by ``draw`` (images only)."""
        x = self.x if idx is None else self.x[idx]
        return x if self.pixels is None else self.pixels.inputs(x, draw)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Model inputs ``[b, *input_shape]`` and labels ``[b]``, in order, ``batch_size`` at a
        time (the interface evaluation shares with streamed splits, neuroplex.data.stream)."""
        for start in range(0, len(self), batch_size):
            rows = slice(start, start + batch_size)
            yield self.inputs(rows), self.y[rows]


@dataclass(frozen=True)
class Dataset:
    """Train / val / test splits; ``val`` is None when ``val_fraction`` is 0. ``augment``
    applies to training batches of images (:meth:`train_batch`)."""

    name: str
    train: Split
    val: Split | None
    test: Split
    n_features: int
    n_classes: int
    class_names: list[str]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # vectors: the per-feature mean and std [d] float64 the splits were standardised with
    standardization: tuple[np.ndarray, np.ndarray] | None = field(default=None, compare=False)
    fingerprint: str | None = None  # sha256 of data given from Python (resume checks it)

    def train_batch(
        self,
        idx: torch.Tensor,
        key: tuple[int, int, int],
        shard: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs ``[b, *input_shape]`` float32 and labels ``[b]`` of the global batch of
        training indices ``idx`` ``[n]``, cut to this rank's part by ``shard``; images are
        augmented per sample by draws for the global batch from ``key`` = (seed, epoch, step)."""
        pixels, draw = self.train.pixels, None
        if pixels is not None:
            draw = draw_augmentation(self.augment, len(pixels.shape) - 1, len(idx), key)
        idx = shard(idx)
        return self.train.inputs(idx, draw and draw.map(shard)), self.train.y[idx]

    def scaling(self) -> dict[str, list[float]] | None:
        """Per-channel ``mean`` and ``std`` the images are standardised with (None: vectors)."""
        pixels = self.train.pixels
        if pixels is None:
            return None
        return {"mean": pixels.mean.tolist(), "std": pixels.std.tolist()}

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(d,)`` for vectors, ``(c, L)`` or ``(c, h, w)`` for images."""
        return tuple(self.train.x.shape[1:])

    def steps_per_epoch(self, batch_size: int) -> int:
        return math.ceil(len(self.train) / batch_size)

    def preprocessing(self) -> dict[str, Any]:
        """How raw samples become model inputs (neuroplex.data.preprocess), as JSON."""
        pixels = self.train.pixels
        if pixels is not None:
            return image_preprocessing(self.input_shape, pixels, self.class_names)
        return vector_preprocessing(self.input_shape, self.standardization, self.class_names)


def cache_dir() -> Path:
    """Cache directory: ``$NEUROPLEX_CACHE``, default ``~/.cache/neuroplex``."""
    env = os.environ.get("NEUROPLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuroplex"


def load_dataset(cfg: DataConfig, source: Any = None) -> Dataset:
    """Load, split and (optionally) standardise the dataset described by ``cfg``; for
    ``data.name: python``, the data ``source`` given from Python (neuroplex.data.python).

    Raises DataError (one line, naming the file) for unusable user files.
    """
    if cfg.name == "python":
        from neuroplex.data.python import dataset_from_python  # it builds on this module

        return dataset_from_python(source, cfg)
    if source is not None:
        raise DataError(
            f"data: given from Python, but data.name = {cfg.name!r}; set data.name: python"
        )
    parts, names = _parts(cfg)
    if cfg.images:
        return _assemble_images(cfg, parts, names)
    return _assemble(cfg.name, parts, names, cfg.standardize)


def _parts(cfg: DataConfig) -> tuple[Parts, list[str]]:
    """The raw train / val / test arrays ``(x [n, ...], y [n])`` and the class names."""
    if cfg.name in MNIST1D_VARIANTS:
        x, y, x_test, y_test = mnist1d_arrays(
            cfg.num_samples, MNIST1D_VARIANTS[cfg.name], cache_dir()
        )
        names = [str(i) for i in range(MNIST1D_CLASSES)]
        return _with_val((x, y), (x_test, y_test), len(names), cfg, "mnist1d"), names
    if cfg.name in ("fashion_mnist", "idx"):
        fashion = cfg.name == "fashion_mnist"
        root = fashion_mnist_root(cfg.root, cfg.idx_files) if fashion else cfg.root
        assert root is not None  # enforced by DataConfig
        given = FASHION_MNIST_CLASSES if fashion else None
        train, test, names = read_idx_dataset(Path(root), cfg.idx_files, given)
        return _with_val(train, test, len(names), cfg, str(root)), names
    if cfg.name == "digits":
        x, y, names = digits_arrays()
        source = "digits"
    else:
        assert cfg.path is not None  # enforced by DataConfig
        path = Path(cfg.path)
        if cfg.name == "images":
            x, y, names = read_images(path, cache_dir())
        else:
            x, y, names = read_data_file(path, cfg.label_column)
        source = str(cfg.path)
    return _split_three(x, y, len(names), cfg, source), names


def describe_datasets() -> list[dict[str, Any]]:
    """One dict per dataset (name, samples, features, classes, description), without loading.

    For ``idx``, ``images`` and ``file`` the sizes are None (they depend on the files); the
    description says what they must contain.
    """
    return [
        {
            "name": "mnist1d",
            "samples": 5000,
            "features": MNIST1D_FEATURES,
            "classes": MNIST1D_CLASSES,
            "description": "MNIST-1D: 1-D signals of the 10 digits, generated offline and cached; "
            "4000 train / 1000 test at the default data.num_samples=5000",
        },
        {
            "name": "mnist1d_shifted",
            "samples": 5000,
            "features": MNIST1D_FEATURES,
            "classes": MNIST1D_CLASSES,
            "description": "MNIST-1D generated with wider padding and translation and stronger "
            "scaling: a shifted distribution, the built-in user data of `neuroplex customize`",
        },
        {
            "name": "digits",
            "samples": DIGITS_SAMPLES,
            "features": DIGITS_FEATURES,
            "classes": DIGITS_CLASSES,
            "description": "scikit-learn 8x8 handwritten digits (bundled, no download); "
            "test split = data.test_fraction",
        },
        {
            "name": "fashion_mnist",
            "samples": 70000,
            "features": 784,
            "classes": 10,
            "description": "Fashion-MNIST, 28x28 grey (official 60000 train / 10000 test) from "
            "its IDX files in data.root, $NEUROPLEX_DATA/fashion-mnist or "
            "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)",
        },
        {
            "name": "idx",
            "samples": None,
            "features": None,
            "classes": None,
            "description": "MNIST-format IDX files (MNIST, KMNIST, EMNIST...) in data.root, named "
            "by data.idx_files (train/test images and labels, .gz optional; EMNIST: "
            "data.idx_files.transpose: true)",
        },
        {
            "name": "images",
            "samples": None,
            "features": None,
            "classes": None,
            "description": "your data.path: an image .npz (x [N, H, W] or [N, C, H, W], uint8 or "
            "float; y [N]) or a folder with one subfolder of PNG/JPEG files per class",
        },
        {
            "name": "file",
            "samples": None,
            "features": None,
            "classes": None,
            "description": "your data.path: a .npz with arrays x [samples, features] and "
            "y [samples], or a .csv with a header row, a label column (data.label_column) "
            "and numeric feature columns; labels are integers or strings, >= 2 classes",
        },
        {
            "name": "python",
            "samples": None,
            "features": None,
            "classes": None,
            "description": "data given from Python: train(cfg, run_dir, data=(x, y)) with numpy "
            "arrays or torch tensors, a torch Dataset, or {'train': ..., 'test': ...} splits of "
            "those or of DataLoaders (streamed)",
        },
    ]


# ---------------------------------------------------------------------------------------------
# splitting and assembly


def _split_three(
    x: np.ndarray, y: np.ndarray, n_classes: int, cfg: DataConfig, source: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Split ``x`` [n, d], ``y`` [n] into test (test_fraction), then val from the rest."""
    n = len(y)
    n_test = _count(cfg.test_fraction, n)
    n_val = _count(cfg.val_fraction, n - n_test)
    _check_sizes(source, n - n_test - n_val, n_val, n_test, n_classes, cfg.val_fraction > 0)
    rest, test = _split_indices(y, n_test, cfg.split_seed)
    parts = {"test": (x[test], y[test])}
    keep, val = _carve(y[rest], cfg.val_fraction, n_classes, n_test, cfg.split_seed, source)
    parts["train"] = (x[rest][keep], y[rest][keep])
    if val is not None:
        parts["val"] = (x[rest][val], y[rest][val])
    return parts


def _with_val(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    cfg: DataConfig,
    source: str,
) -> Parts:
    """Given train and test arrays, carve val (``cfg.val_fraction``) out of train."""
    (x, y), n_test = train, len(test[1])
    keep, val = _carve(y, cfg.val_fraction, n_classes, n_test, cfg.split_seed, source)
    parts = {"train": (x[keep], y[keep]), "test": test}
    if val is not None:
        parts["val"] = (x[val], y[val])
    return parts


def _carve(
    y: np.ndarray, val_fraction: float, n_classes: int, n_test: int, seed: int, source: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """Indices (train, val) of a training part with labels ``y`` [n]; val is None if fraction 0."""
    n_val = _count(val_fraction, len(y))
    _check_sizes(source, len(y) - n_val, n_val, n_test, n_classes, val_fraction > 0)
    if val_fraction == 0:
        return np.arange(len(y)), None
    return _split_indices(y, n_val, seed)


def _count(fraction: float, n: int) -> int:
    """Samples a fraction of ``n`` gets (rounded up, as scikit-learn does)."""
    return math.ceil(fraction * n - 1e-9) if fraction > 0 else 0


def _check_sizes(
    source: str, n_train: int, n_val: int, n_test: int, n_classes: int, want_val: bool
) -> None:
    if n_train >= n_classes and n_test >= 1 and (n_val >= 1 or not want_val):
        return
    need = f"train >= {n_classes} (number of classes), test >= 1"
    need += ", val >= 1" if want_val else ""
    raise DataError(
        f"{source}: too few samples for the split: train={n_train}, val={n_val}, "
        f"test={n_test}; need {need} (add samples or change val_fraction/test_fraction)"
    )


def _split_indices(y: np.ndarray, n_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) of ``y`` [n], ``n_out`` held out; stratified when possible.

    Stratification is impossible when a class has a single sample or there are fewer held-out
    (or kept) samples than classes; then the split is a plain seeded shuffle.
    """
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        kept, out = train_test_split(idx, test_size=n_out, stratify=y, random_state=seed)
    except ValueError:
        kept, out = train_test_split(idx, test_size=n_out, random_state=seed)
    return np.asarray(kept), np.asarray(out)


def _assemble(
    name: str,
    parts: dict[str, tuple[np.ndarray, np.ndarray]],
    class_names: list[str],
    standardize: bool,
) -> Dataset:
    """Standardise with train statistics and convert to tensors (x float32, y int64)."""
    x_train = parts["train"][0].astype(np.float64)
    mean = x_train.mean(axis=0) if standardize else 0.0
    std = x_train.std(axis=0) if standardize else 1.0
    if standardize:
        std = np.where(std < STD_FLOOR, 1.0, std)

    def split(key: str) -> Split:
        x, y = parts[key]
        x = (x.astype(np.float64) - mean) / std
        return Split(
            x=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
        )

    stats = (np.asarray(mean), np.asarray(std)) if standardize else None

    return Dataset(
        name=name,
        train=split("train"),
        val=split("val") if "val" in parts else None,
        test=split("test"),
        n_features=int(x_train.shape[1]),
        n_classes=len(class_names),
        class_names=list(class_names),
        standardization=stats,
    )


def _assemble_images(cfg: DataConfig, parts: Parts, class_names: list[str]) -> Dataset:
    """Images ``[n, c, *s]`` (vectors become one channel: ``[n, 1, 8, 8]`` for digits,
    ``[n, 1, d]`` otherwise) kept as stored, standardised per channel per batch."""
    images = {key: (_as_images(cfg.name, x), y) for key, (x, y) in parts.items()}
    train = images["train"][0]
    if cfg.standardize:
        mean, std = channel_stats(train)
    else:
        mean, std = np.zeros(train.shape[1]), np.ones(train.shape[1])
    pixels = Pixels(
        tuple(train.shape[1:]),
        torch.tensor(mean, dtype=torch.float32),
        torch.tensor(std, dtype=torch.float32),
    )

    def split(key: str) -> Split:
        x, y = images[key]
        x = torch.from_numpy(np.require(x, requirements=["C", "W"]))  # a copy if read-only
        x = x.reshape(len(x), -1) if cfg.shape == "flat" else x
        y = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
        return Split(x=x, y=y, pixels=pixels)

    return Dataset(
        name=cfg.name,
        train=split("train"),
        val=split("val") if "val" in images else None,
        test=split("test"),
        n_features=math.prod(pixels.shape),
        n_classes=len(class_names),
        class_names=list(class_names),
        augment=cfg.augment,
    )


def _as_images(name: str, x: np.ndarray) -> np.ndarray:
    """``x`` as images ``[n, c, *s]``: uint8 kept, other numbers as float32."""
    if x.ndim == 2:
        x = x.reshape(len(x), 1, 8, 8) if name == "digits" else x[:, None]
    return x if x.dtype == np.uint8 else x.astype(np.float32)
