"""User data files: read and validate a ``.npz`` (arrays ``x``, ``y``) or ``.csv`` file.

Every problem raises :class:`~neuroplex.errors.DataError` with one line naming the file and what
is wrong with it, e.g. ``data error: /x/foo.npz: array 'x' has shape (10,), expected 2-D``.
"""

from __future__ import annotations

import csv
import zipfile
import zlib
from pathlib import Path

import numpy as np

from neuroplex.errors import DataError

FLOAT32_MAX = float(np.finfo(np.float32).max)


def read_data_file(
    path: Path, label_column: str | int = "label"
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read and validate a .npz (arrays x, y) or .csv file.

    Returns x [n, d] float64 (finite), y [n] int64 in 0..C-1, and the C class names.
    Raises DataError naming the file and the problem.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: is a directory, expected a .npz or .csv file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        x_raw, y_raw = read_npz(path)
    elif suffix == ".csv":
        x_raw, y_raw = _read_csv(path, label_column)
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}: expected .npz or .csv")
    x = check_features(path, x_raw, y_raw)
    y, names = encode_labels(path, y_raw)
    return x, y, names


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz archive, unchecked."""
    bad = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)
    try:
        data = np.load(path, allow_pickle=False)
    except bad:
        raise DataError(
            f"{path}: not a readable .npz archive (expected a zip of arrays from numpy.savez)"
        ) from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single .npy array, expected an .npz with arrays x, y")
    with data:
        missing = [k for k in ("x", "y") if k not in data.files]
        if missing:
            has = ", ".join(repr(k) for k in data.files) or "none"
            raise DataError(f"{path}: missing array {missing[0]!r}; the file has arrays: {has}")
        try:
            return np.asarray(data["x"]), np.asarray(data["y"])
        except bad as e:
            raise DataError(f"{path}: cannot read arrays x, y ({_short(e)})") from None


def _read_csv(path: Path, label_column: str | int) -> tuple[np.ndarray, np.ndarray]:
    """Features (strings parsed to float64) [n, d] and raw string labels [n] of a CSV file."""
    rows = _csv_rows(path)
    header = [h.strip() for h in rows[0][1]]
    if all(_is_number(h) for h in header):
        raise DataError(f"{path}: first row is numeric, expected a header row naming the columns")
    col = _label_index(path, header, label_column)
    if len(rows) == 1:
        raise DataError(f"{path}: has a header but no data rows")
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise DataError(
                f"{path}: line {line} has {len(row)} values, the header has {len(header)} columns"
            )
    labels = np.array([row[col].strip() for _, row in rows[1:]], dtype=str)
    features = [row[:col] + row[col + 1 :] for _, row in rows[1:]]
    names = header[:col] + header[col + 1 :]
    try:
        x = np.array(features, dtype=np.float64).reshape(len(features), len(names))
    except ValueError:
        raise DataError(f"{path}: {_first_non_number(rows[1:], col, header)}") from None
    return x, labels


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """Non-blank rows of a CSV file with their 1-based line numbers; DataError if none."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a UTF-8 text file") from None
    except (OSError, csv.Error) as e:
        raise DataError(f"{path}: cannot read CSV ({_short(e)})") from None
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _label_index(path: Path, header: list[str], label_column: str | int) -> int:
    if isinstance(label_column, int):
        if not 0 <= label_column < len(header):
            raise DataError(
                f"{path}: label column index {label_column} out of range: "
                f"the header has {len(header)} columns (0..{len(header) - 1})"
            )
        return label_column
    if label_column.strip() not in header:
        names = ", ".join(repr(h) for h in header)
        raise DataError(f"{path}: label column {label_column!r} not found; header columns: {names}")
    return header.index(label_column.strip())


def _first_non_number(rows: list[tuple[int, list[str]]], col: int, header: list[str]) -> str:
    """Describe the first feature value that is not a number."""
    for line, row in rows:
        for j, value in enumerate(row):
            if j != col and not _is_number(value):
                return f"line {line}, column {header[j]!r}: value {value!r} is not a number"
    return "feature values are not numbers"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_features(path: str | Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Validate shapes and values of ``x`` [n, d] against ``y`` [n] (from ``path``, named in
    errors); return x as float64."""
    if x.ndim != 2:
        hint = "; for images use data.name: images" if x.ndim in (3, 4) else ""
        raise DataError(
            f"{path}: array 'x' has shape {x.shape}, expected 2-D [samples, features]{hint}"
        )
    if y.ndim != 1:
        raise DataError(f"{path}: array 'y' has shape {y.shape}, expected 1-D [samples]")
    if len(x) != len(y):
        raise DataError(f"{path}: 'x' has {len(x)} samples but 'y' has {len(y)} labels")
    if len(x) == 0:
        raise DataError(f"{path}: contains no samples")
    if x.shape[1] == 0:
        raise DataError(f"{path}: 'x' has no feature columns")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: array 'x' has dtype {x.dtype}, expected numbers")
    x = x.astype(np.float64)
    bad = ~np.isfinite(x)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise DataError(
            f"{path}: x contains {int(bad.sum())} NaN or infinite values "
            f"(first in sample {row}, 0-based)"
        )
    largest = float(np.abs(x).max())
    if largest > FLOAT32_MAX:  # training is float32; standardising would overflow to 0 or inf
        raise DataError(
            f"{path}: x holds values up to {largest:.3g}; neuroplex trains in float32, so "
            f"|x| must be at most {FLOAT32_MAX:.3g}: rescale the features"
        )
    return x


def encode_labels(path: str | Path, y: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Map labels ``y`` [n] (integers or strings) to 0..C-1 (sorted); return them and names."""
    if y.dtype.kind in "US":
        y = _maybe_numeric(y.astype(str))
    if y.dtype.kind in "US":
        values, codes = np.unique(y, return_inverse=True)
        names = [str(v) for v in values]
    elif y.dtype.kind in "biuf":
        values, codes = np.unique(_integer_labels(path, y), return_inverse=True)
        names = [str(int(v)) for v in values]
    else:
        raise DataError(f"{path}: labels have dtype {y.dtype}, expected integers or strings")
    if len(names) < 2:
        raise DataError(f"{path}: labels have only 1 class ({names[0]!r}); need at least 2")
    return codes.reshape(-1).astype(np.int64), names


def _maybe_numeric(labels: np.ndarray) -> np.ndarray:
    """String labels as float64 when every one parses as a number, else unchanged."""
    try:
        return labels.astype(np.float64)
    except ValueError:
        return labels


def _integer_labels(path: str | Path, y: np.ndarray) -> np.ndarray:
    """Numeric labels ``y`` [n] as int64; DataError for NaN/inf or non-integer values."""
    if y.dtype.kind in "biu":
        return y.astype(np.int64)
    bad = ~np.isfinite(y) | (y != np.round(y))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(
            f"{path}: label {float(y[i])} (sample {i}, 0-based) is not an integer; "
            "labels must be integers or strings"
        )
    return y.astype(np.int64)


def _short(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
