"""Image datasets read from where users keep them: IDX files (Fashion-MNIST, MNIST, ...), an
image .npz, and a folder of PNG/JPEG files (one subfolder per class).

Each reader returns images ``[n, c, h, w]`` as stored (uint8, or float32 from a float .npz),
labels ``[n]`` int64 in 0..C-1 and the C class names. Nothing is downloaded. Problems raise
:class:`~neuroplex.errors.DataError` with one line naming the file, the value and what was
expected.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from neuroplex.config import IdxFilesConfig
from neuroplex.data.idx import read_idx
from neuroplex.data.userfiles import encode_labels, read_npz
from neuroplex.errors import DataError
from neuroplex.files import atomic_write

SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# torchvision's ImageFolder extensions; other files in a class folder are ignored, as there
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IDX_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray]


# ---------------------------------------------------------------------------------------------
# IDX files


def fashion_mnist_root(root: Path | None, files: IdxFilesConfig) -> Path:
    """The folder holding the four Fashion-MNIST files: ``root`` if given, else the first of
    ``$NEUROPLEX_DATA/fashion-mnist`` and ``/usr/share/datasets/fashion-mnist`` that has them."""
    env = os.environ.get("NEUROPLEX_DATA")
    if root is not None:
        places = [root]
    else:
        places = [Path(env).expanduser() / "fashion-mnist"] if env else []
        places.append(SYSTEM_ROOT)
    looked = []
    for place in places:
        missing = [name for name, path in _idx_paths(place, files).items() if path is None]
        if not missing:
            return place
        looked.append(f"{place} (missing {', '.join(missing)})")
    if env is None and root is None:
        looked.insert(0, "$NEUROPLEX_DATA/fashion-mnist ($NEUROPLEX_DATA not set)")
    raise DataError(
        f"fashion_mnist: the IDX files are not in {'; '.join(looked)}. Install them with "
        "`apt-get install dataset-fashion-mnist`, or download the four files "
        "(train-images-idx3-ubyte.gz, ...) from https://github.com/zalandoresearch/fashion-mnist "
        "into $NEUROPLEX_DATA/fashion-mnist or the folder given as data.root"
    )


def read_idx_dataset(
    root: Path, files: IdxFilesConfig, class_names: list[str] | None = None
) -> tuple[Arrays, Arrays, list[str]]:
    """Train ``(x [n, 1, h, w] uint8, y [n])`` and test arrays from the four IDX files, and the
    class names (``class_names`` when given, else the label values)."""
    paths = _idx_paths(root, files)
    for name, path in paths.items():
        if path is None:
            where = Path(getattr(files, name))
            raise DataError(
                f"{root / where}: file not found (nor with .gz); set data.idx_files.{name}"
            )
    train = _idx_pair(paths["train_images"], paths["train_labels"], files.transpose)
    test = _idx_pair(paths["test_images"], paths["test_labels"], files.transpose)
    values = np.unique(np.concatenate([train[1], test[1]]))
    if class_names is not None and not set(values.tolist()) <= set(range(len(class_names))):
        raise DataError(
            f"{paths['train_labels']}: labels {values.tolist()} are not all in "
            f"0..{len(class_names) - 1}"
        )
    if class_names is None:
        class_names = [str(int(v)) for v in values]
        train = train[0], np.searchsorted(values, train[1])
        test = test[0], np.searchsorted(values, test[1])
    return train, test, class_names


def _idx_paths(root: Path, files: IdxFilesConfig) -> dict[str, Path | None]:
    """Each IDX file of ``files`` under ``root``, as named or with ``.gz``; None if neither."""
    found: dict[str, Path | None] = {}
    for key in IDX_KEYS:
        path = root / getattr(files, key)
        gz = path.with_name(path.name + ".gz")
        found[key] = path if path.is_file() else gz if gz.is_file() else None
    return found


def _idx_pair(images_path: Path, labels_path: Path, transpose: bool) -> Arrays:
    """Images ``[n, 1, h, w]`` uint8 and labels ``[n]`` int64 of an images/labels IDX pair;
    ``transpose``: the file stores ``[n, w, h]`` (EMNIST), swapped back here."""
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: IDX array is {images.dtype} {images.shape}, "
            "expected uint8 images [n, rows, cols]"
        )
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{labels_path}: IDX array is {labels.dtype} {labels.shape}, expected integer "
            "labels [n]"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels, but {images_path} has {len(images)} images"
        )
    if transpose:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    return images[:, None], labels.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# image .npz


def read_images(path: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``[n, c, h, w]``, labels 0..C-1 and class names of an image .npz or folder."""
    if path.is_dir():
        return read_image_folder(path, cache)
    if not path.exists():
        raise DataError(f"{path}: not found, expected an image .npz or a folder of class folders")
    if path.suffix.lower() != ".npz":
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}: expected an image .npz or a folder"
        )
    return read_image_npz(path)


def read_image_npz(path: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``x`` ``[n, c, h, w]`` (uint8, or float32 when stored as floats) from arrays
    ``x`` ``[n, h, w]`` or ``[n, c, h, w]`` and ``y`` ``[n]``, labels 0..C-1, class names."""
    return check_image_arrays(path, *read_npz(path))


def check_image_arrays(
    source: str | Path, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validate images ``x`` ``[n, h, w]`` or ``[n, c, h, w]`` and labels ``y`` ``[n]`` (from
    ``source``, named in errors); images ``[n, c, h, w]``, labels 0..C-1, class names."""
    x = check_images(source, x, y)
    labels, names = encode_labels(source, y)
    return x, labels, names


def check_images(source: str | Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Images ``x`` ``[n, h, w]`` or ``[n, c, h, w]`` checked against labels ``y`` ``[n]``, as
    ``[n, c, h, w]`` uint8 or float32."""
    if x.ndim not in (3, 4):
        raise DataError(
            f"{source}: array 'x' has shape {x.shape}, expected images [n, h, w] or [n, c, h, w]"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{source}: array 'y' has shape {y.shape}, expected [{len(x)}] labels")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{source}: array 'x' has dtype {x.dtype}, expected uint8 or float")
    if len(x) == 0:
        raise DataError(f"{source}: contains no samples")
    x = x[:, None] if x.ndim == 3 else x
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise DataError(f"{source}: x contains NaN or infinite values")
    return x


# ---------------------------------------------------------------------------------------------
# image folder


def read_image_folder(folder: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images ``[n, c, h, w]`` uint8 (memory-mapped from a cache under ``cache``, decoded with
    Pillow the first time), labels 0..C-1 and class names of a class-per-subfolder folder."""
    files, names = _folder_files(folder)
    labels = np.array([c for _, c in files], dtype=np.int64)
    key = [
        str(folder.resolve()),
        *(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p, _ in files),
    ]
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:16]
    path = cache / f"images-{digest}.npy"  # a new name whenever a file changes
    try:
        return np.load(path, mmap_mode="r"), labels, names
    except (OSError, ValueError):  # not cached yet (or unreadable): decode
        pass
    x = _decode(files)
    try:
        atomic_write(path, lambda p: _save_npy(p, x))
    except OSError as e:
        log.warning("could not cache the decoded images of %s at %s: %s", folder, path, e)
    return x, labels, names


def _folder_files(folder: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(image file, class index) pairs in sorted order, and the sorted class folder names."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder, expected one subfolder of images per class")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise DataError(
            f"{folder}: has {len(classes)} class subfolders, expected at least 2 "
            "(one subfolder of PNG/JPEG files per class)"
        )
    files = []
    for index, name in enumerate(classes):
        found = sorted(
            p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not found:
            raise DataError(f"{folder / name}: no image files (expected PNG or JPEG files)")
        files += [(p, index) for p in found]
    return files, classes


def _decode(files: list[tuple[Path, int]]) -> np.ndarray:
    """Decode every file to ``[n, c, h, w]`` uint8: c = 1 if all are greyscale, else 3 (RGB)."""
    from PIL import Image, UnidentifiedImageError

    arrays, size = [], None
    for path, _ in files:
        try:
            with Image.open(path) as image:
                grey = image.mode in ("1", "L", "LA", "I", "I;16")
                array = np.asarray(image.convert("L" if grey else "RGB"))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DataError(f"{path}: unreadable image ({str(e) or type(e).__name__})") from None
        size = size or (array.shape[1], array.shape[0], path)
        if (array.shape[1], array.shape[0]) != size[:2]:
            raise DataError(
                f"{path}: image is {array.shape[1]}x{array.shape[0]}, but {size[2]} is "
                f"{size[0]}x{size[1]}; all images must have one size"
            )
        arrays.append(array)
    colour = any(a.ndim == 3 for a in arrays)
    out = np.empty((len(arrays), 3 if colour else 1, size[1], size[0]), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    return out


def _save_npy(path: Path, x: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file handle: np.save would append ".npy" to a path
        np.save(f, x)
