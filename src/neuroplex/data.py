"""Datasets: MNIST-1D (generated offline, cached), scikit-learn digits, and user files.

``load_dataset(cfg)`` returns a :class:`Dataset` of float32 features ``[n, d]`` and int64
labels ``[n]`` split into train / val / test. Splits are stratified by label when possible and
seeded by ``cfg.split_seed``, so the same config always gives identical tensors. Features are
standardised with statistics of the training split only.

A bad user file raises :class:`~neuroplex.errors.DataError` with one line naming the file and
the problem, e.g. ``data error: /x/foo.npz: array 'x' has shape (10,), expected 2-D``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroplex.config import DataConfig
from neuroplex.datafile import read_data_file
from neuroplex.errors import DataError
from neuroplex.files import atomic_write

log = logging.getLogger(__name__)

MNIST1D_FEATURES = 40
MNIST1D_CLASSES = 10
DIGITS_SAMPLES = 1797
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
STD_FLOOR = 1e-8
_MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")
# Generation arguments changed from mnist1d's defaults. `mnist1d_shifted` is a shifted
# distribution (wider padding and translation, stronger scaling; other samples): a user's own
# data for `neuroplex customize`, built in. A network trained on mnist1d loses ~13 points on it.
MNIST1D_VARIANTS: dict[str, dict[str, Any]] = {
    "mnist1d": {},
    "mnist1d_shifted": {"padding": [48, 72], "max_translation": 60, "scale_coeff": 0.5, "seed": 7},
}


@dataclass(frozen=True)
class Split:
    """One split: features ``x`` [n, d] float32 and labels ``y`` [n] int64 in 0..C-1."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Dataset:
    """Train / val / test splits; ``val`` is None when ``val_fraction`` is 0."""

    name: str
    train: Split
    val: Split | None
    test: Split
    n_features: int
    n_classes: int
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(d,)`` for vectors, ``(c, L)`` or ``(c, h, w)`` for images."""
        return tuple(self.train.x.shape[1:])


def cache_dir() -> Path:
    """Cache directory: ``$NEUROPLEX_CACHE``, default ``~/.cache/neuroplex``."""
    env = os.environ.get("NEUROPLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "neuroplex"


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load, split and (optionally) standardise the dataset described by ``cfg``.

    Raises DataError (one line, naming the file) for unusable user files.
    """
    if cfg.name in MNIST1D_VARIANTS:
        x, y, x_test, y_test = _mnist1d_arrays(cfg.num_samples, MNIST1D_VARIANTS[cfg.name])
        names = [str(i) for i in range(MNIST1D_CLASSES)]
        source = "mnist1d"
        keep, val = _carve(y, cfg.val_fraction, len(names), len(y_test), cfg.split_seed, source)
        parts = {"train": (x[keep], y[keep]), "test": (x_test, y_test)}
        if val is not None:
            parts["val"] = (x[val], y[val])
    else:
        if cfg.name == "digits":
            x, y, names = _digits_arrays()
            source = "digits"
        else:
            assert cfg.path is not None  # enforced by DataConfig
            x, y, names = read_data_file(Path(cfg.path), cfg.label_column)
            source = str(cfg.path)
        parts = _split_three(x, y, len(names), cfg, source)
    return _assemble(cfg.name, parts, names, cfg.standardize)


def describe_datasets() -> list[dict[str, Any]]:
    """One dict per dataset (name, samples, features, classes, description), without loading.

    For ``file`` the sizes are None (they depend on the file); the description says what the
    file must contain.
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
            "name": "file",
            "samples": None,
            "features": None,
            "classes": None,
            "description": "your data.path: a .npz with arrays x [samples, features] and "
            "y [samples], or a .csv with a header row, a label column (data.label_column) "
            "and numeric feature columns; labels are integers or strings, >= 2 classes",
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

    return Dataset(
        name=name,
        train=split("train"),
        val=split("val") if "val" in parts else None,
        test=split("test"),
        n_features=int(x_train.shape[1]),
        n_classes=len(class_names),
        class_names=list(class_names),
    )


# ---------------------------------------------------------------------------------------------
# built-in datasets


def _digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn digits: x [1797, 64] float64, y [1797] int64, class names '0'..'9'."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64), [str(i) for i in range(DIGITS_CLASSES)]


def _mnist1d_arrays(
    num_samples: int, changes: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D (x [0.8N, 40], y [0.8N], x_test [0.2N, 40], y_test [0.2N]) generated with the
    default arguments updated by ``changes``; from the cache if there."""
    args = _mnist1d_args(num_samples)
    vars(args).update(changes)
    key = {k: v for k, v in vars(args).items() if k != "url"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = cache_dir() / f"mnist1d_n{num_samples}_{digest}.npz"
    cached = _read_mnist1d_cache(path)
    if cached is not None:
        return cached
    arrays = _generate_mnist1d(args)
    try:
        atomic_write(path, lambda p: _savez(p, arrays))
    except OSError as e:
        log.warning("could not cache MNIST-1D at %s: %s", path, e)
    return arrays


def _savez(path: Path, arrays: tuple[np.ndarray, ...]) -> None:
    with open(path, "wb") as f:  # a file handle: np.savez would append ".npz" to a path
        np.savez(f, **dict(zip(_MNIST1D_ARRAYS, arrays, strict=True)))


def _read_mnist1d_cache(path: Path) -> tuple[np.ndarray, ...] | None:
    """The cached arrays, or None when the file is missing or unusable (then regenerated)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y, x_test, y_test = (np.asarray(data[k]) for k in _MNIST1D_ARRAYS)
    except Exception as e:  # any corruption: regenerate rather than fail
        log.warning("ignoring unreadable MNIST-1D cache %s: %s", path, e)
        return None
    ok = (
        x.ndim == 2
        and x_test.ndim == 2
        and x.shape[1] == x_test.shape[1] == MNIST1D_FEATURES
        and y.shape == (len(x),)
        and y_test.shape == (len(x_test),)
    )
    if not ok:
        log.warning("ignoring MNIST-1D cache %s with unexpected shapes", path)
        return None
    return x, y, x_test, y_test


def _mnist1d_args(num_samples: int) -> Any:
    _headless_matplotlib()
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    args.num_samples = num_samples
    return args


def _generate_mnist1d(args: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Run ``make_dataset`` offline, restoring the global Python and NumPy RNG states after."""
    from mnist1d.data import make_dataset

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    return (
        np.asarray(data["x"], dtype=np.float64),
        np.asarray(data["y"], dtype=np.int64),
        np.asarray(data["x_test"], dtype=np.float64),
        np.asarray(data["y_test"], dtype=np.int64),
    )


def _headless_matplotlib() -> None:
    """mnist1d imports pyplot: pick the Agg backend unless the user already chose one."""
    if "matplotlib.pyplot" in sys.modules or os.environ.get("MPLBACKEND"):
        return
    import matplotlib

    matplotlib.use("Agg")
