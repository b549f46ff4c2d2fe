"""Built-in datasets: scikit-learn digits and MNIST-1D (generated offline, cached as .npz)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np

from neuroplex.files import atomic_write

log = logging.getLogger(__name__)

MNIST1D_FEATURES = 40
MNIST1D_CLASSES = 10
DIGITS_SAMPLES = 1797
DIGITS_FEATURES = 64
DIGITS_CLASSES = 10
_MNIST1D_ARRAYS = ("x", "y", "x_test", "y_test")
# Generation arguments changed from mnist1d's defaults. `mnist1d_shifted` is a shifted
# distribution (wider padding and translation, stronger scaling; other samples): a user's own
# data for `neuroplex customize`, built in. A network trained on mnist1d loses ~13 points on it.
MNIST1D_VARIANTS: dict[str, dict[str, Any]] = {
    "mnist1d": {},
    "mnist1d_shifted": {"padding": [48, 72], "max_translation": 60, "scale_coeff": 0.5, "seed": 7},
}


def digits_arrays() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn digits: x [1797, 64] float64, y [1797] int64, class names '0'..'9'."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64), [str(i) for i in range(DIGITS_CLASSES)]


def mnist1d_arrays(
    num_samples: int, changes: dict[str, Any], cache: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """MNIST-1D (x [0.8N, 40], y [0.8N], x_test [0.2N, 40], y_test [0.2N]) generated with the
    default arguments updated by ``changes``; from the cache folder ``cache`` if there."""
    args = _mnist1d_args(num_samples)
    vars(args).update(changes)
    key = {k: v for k, v in vars(args).items() if k != "url"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
    path = cache / f"mnist1d_n{num_samples}_{digest}.npz"
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
