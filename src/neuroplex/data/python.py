"""Data given from Python: ``train(cfg, run_dir, data=...)``, recorded as ``data.name: python``.

``data`` is one of:

- ``(x, y)``: numpy arrays or torch tensors, samples ``x`` ``[n, d]`` (vectors) or ``[n, h, w]``
  / ``[n, c, h, w]`` (images) and labels ``y`` ``[n]`` (integers or strings). Validated and split
  into train / val / test by ``data.test_fraction`` and ``data.val_fraction`` exactly as a file
  with the same arrays (``data.name: file`` for vectors, ``images`` for images), so the run's
  numbers are the file run's.
- a map-style torch ``Dataset`` of ``(x, y)`` pairs: read once into memory, then the same.
- a mapping ``{"train": ..., "val": ..., "test": ...}`` of pairs or Datasets (your own splits;
  without ``"val"``, val is carved from train by ``data.val_fraction``), or of DataLoaders (any
  re-iterable of ``(x, y)`` batches): streamed batch by batch (neuroplex.data.stream).

Problems raise :class:`~neuroplex.errors.DataError` with one line naming the argument
(``data``, ``data['test']``, ``data[7]``) and what was expected.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from neuroplex.config import DataConfig
from neuroplex.data.images import check_images
from neuroplex.data.registry import (
    Dataset,
    Parts,
    _assemble,
    _assemble_images,
    _split_three,
    _with_val,
)
from neuroplex.data.stream import StreamDataset, is_stream, stream_dataset
from neuroplex.data.userfiles import check_features, encode_labels
from neuroplex.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
Pair = tuple[np.ndarray, np.ndarray]


def dataset_from_python(source: Any, cfg: DataConfig) -> Dataset | StreamDataset:
    """The dataset of ``source`` (see the module docstring) under ``cfg``'s split and
    standardisation settings."""
    if source is None:
        raise ConfigError(
            "data.name = 'python': the data is given from Python, train(cfg, run_dir, "
            "data=...); the command line cannot load it (neuroplex.load_model(RUN_DIR) runs a "
            "trained model on your own inputs)"
        )
    if isinstance(source, Mapping):
        return _from_splits(source, cfg)
    if is_stream(source):
        raise DataError(
            "data: a DataLoader streams one split; pass {'train': loader, 'test': loader} "
            "(and 'val': loader)"
        )
    x, y = read_pair("data", source)
    x, labels, names = validate("data", x, y)
    parts = _split_three(x, labels, len(names), cfg, "data")
    return _assemble_parts(cfg, parts, names, fingerprint({"data": (x, labels)}))


def _from_splits(source: Mapping, cfg: DataConfig) -> Dataset | StreamDataset:
    """Given splits: train and test, val optional (else carved from train)."""
    keys = list(source)
    if not {"train", "test"} <= set(keys) or not set(keys) <= set(SPLITS):
        raise DataError(f"data: has keys {keys}; expected 'train' and 'test', and optionally 'val'")
    streams = [is_stream(source[k]) for k in keys]
    if any(streams):
        if not all(streams):
            raise DataError("data: mixes DataLoaders and arrays; give every split the same way")
        return stream_dataset({k: source[k] for k in SPLITS if k in source}, cfg)
    raw = {k: read_pair(f"data[{k!r}]", source[k]) for k in SPLITS if k in source}
    checked = {k: check_samples(f"data[{k!r}]", *pair) for k, pair in raw.items()}
    _same_sample_shape(checked)
    labels, names = encode_labels("data", np.concatenate([y for _, y in raw.values()]))
    cuts = np.cumsum([len(y) for _, y in raw.values()])[:-1]
    parts: Parts = {k: (checked[k], y) for k, y in zip(raw, np.split(labels, cuts), strict=True)}
    digest = fingerprint(parts)
    if "val" not in parts:
        parts = _with_val(parts["train"], parts["test"], len(names), cfg, "data['train']")
    return _assemble_parts(cfg, parts, names, digest)


def _assemble_parts(cfg: DataConfig, parts: Parts, names: list[str], digest: str) -> Dataset:
    """Tensors of the splits, as the file datasets make them (vectors or images)."""
    images = parts["train"][0].ndim > 2 or cfg.shape == "image"
    data = (
        _assemble_images(cfg, parts, names)
        if images
        else _assemble("python", parts, names, cfg.standardize)
    )
    return replace(data, fingerprint=digest)


def validate(where: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
    """Checked samples (:func:`check_samples`), labels 0..C-1 and class names."""
    x = check_samples(where, x, y)
    labels, names = encode_labels(where, y)
    return x, labels, names


def check_samples(where: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Samples checked against labels ``y`` ``[n]`` by the rules of the files
    (neuroplex.data.userfiles, .images): float64 vectors ``[n, d]`` or images ``[n, c, h, w]``."""
    return check_images(where, x, y) if x.ndim in (3, 4) else check_features(where, x, y)


def _same_sample_shape(parts: dict[str, np.ndarray]) -> None:
    shapes = {k: x.shape[1:] for k, x in parts.items()}
    for key, shape in shapes.items():
        if shape != shapes["train"]:
            raise DataError(
                f"data[{key!r}]: samples have shape {shape}; data['train'] has {shapes['train']}"
            )


def read_pair(where: str, source: Any) -> Pair:
    """Arrays ``(x, y)`` of a pair of arrays/tensors or of a map-style torch Dataset."""
    if isinstance(source, (tuple, list)) and len(source) == 2:
        return as_array(f"{where} x", source[0]), as_array(f"{where} y", source[1])
    if isinstance(source, IterableDataset):
        raise DataError(
            f"{where}: an IterableDataset has no random access; wrap it in a DataLoader and "
            "pass {'train': loader, 'test': loader}"
        )
    if isinstance(source, torch.utils.data.Dataset) and hasattr(source, "__len__"):
        return _read_dataset(where, source)
    raise DataError(
        f"{where}: got {type(source).__name__}; expected (x, y) arrays or tensors, a torch "
        "Dataset of (x, y) pairs, or a mapping of splits {'train': ..., 'test': ...}"
    )


def _read_dataset(where: str, dataset: torch.utils.data.Dataset) -> Pair:
    """Every ``(x, y)`` item of ``dataset``, stacked: ``x`` ``[n, ...]``, ``y`` ``[n]``."""
    xs, ys = [], []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"{where}[{i}]: got {type(item).__name__}, expected an (x, y) pair")
        xs.append(as_array(f"{where}[{i}] x", item[0]))
        ys.append(as_array(f"{where}[{i}] y", item[1]))
        if xs[-1].shape != xs[0].shape:
            raise DataError(
                f"{where}[{i}]: x has shape {xs[-1].shape}, {where}[0] has {xs[0].shape}"
            )
        if ys[-1].size != 1:
            raise DataError(f"{where}[{i}]: y has shape {ys[-1].shape}, expected one label")
    if not xs:
        raise DataError(f"{where}: contains no samples")
    return np.stack(xs), np.concatenate([y.reshape(1) for y in ys])


def as_array(where: str, value: Any) -> np.ndarray:
    """``value`` (numpy array, torch tensor, list, number) as a numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:
        raise DataError(f"{where}: not an array ({e})") from None


def fingerprint(parts: Mapping[str, Pair]) -> str:
    """sha256 of the arrays (shapes, dtypes, bytes): a resumed run checks it gets the same data."""
    digest = hashlib.sha256()
    for key, arrays in parts.items():
        for array in arrays:
            digest.update(f"{key}{array.shape}{array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
