"""Streamed data: DataLoaders (any re-iterable of ``(x, y)`` batches) trained by the same loop,
batch by batch, for data that does not fit in memory.

Before training, one pass over the training loader finds the sample shape, the classes (labels
must be integers 0..C-1; C = the largest training label + 1) and, with ``data.standardize``, the
per-feature (vectors ``[b, d]``) or per-channel (images ``[b, c, *s]``) mean and standard
deviation (float64, merged batch by batch with Chan et al.'s pairwise update). Every batch is
checked as it arrives (sample shape, finite values, labels in range) and scaled like in-memory
data (neuroplex.data.preprocess). An epoch is one pass over the training loader, in its batch
size (``train.batch_size`` does not apply); the loop calls ``set_epoch(epoch)`` on the loader,
its sampler or its batch sampler where they have one (as for ``DistributedSampler``).

A loader is iterated under torch random state of its own, seeded by (``seed``, epoch) for
training and fixed for evaluation (:func:`own_random_state`), so whatever it draws from torch's
global random state (``shuffle=True``'s permutation, worker seeds, torch-random transforms in the
main process) neither disturbs the training's random stream nor depends on it. Resume is
therefore exact when a loader's order is a function of the epoch: ``shuffle=False``,
``shuffle=True`` without a ``generator=`` of its own, :class:`SeededSampler` (neuroplex's own
order of in-memory data), ``DistributedSampler``. It is not exact for a loader with its own
``generator=`` (its state is not in the checkpoint), an ``IterableDataset`` whose order varies
between passes, or random augmentation drawn from numpy's or Python's random state (or in
worker processes).

Shape legend: ``b`` batch, ``d`` features, ``c`` channels, ``s`` spatial sizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from neuroplex.config import AugmentConfig, DataConfig
from neuroplex.data.preprocess import Preprocess
from neuroplex.errors import ConfigError, DataError

STD_FLOOR = 1e-8


def epoch_order(n: int, seed: int, epoch: int, device: torch.device | None = None) -> Tensor:
    """Shuffled indices ``[n]`` for ``epoch``, a function of (seed, epoch): resume needs no
    state. The order the loop draws for in-memory data."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).to(device or "cpu")


class SeededSampler(torch.utils.data.Sampler[int]):
    """A DataLoader sampler drawing :func:`epoch_order` (``n`` samples, ``seed``) for the epoch
    set by ``set_epoch``: the same order as neuroplex's in-memory data, and an exact resume."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


def is_stream(source: Any) -> bool:
    """Whether ``source`` is an iterable of batches (a DataLoader), not arrays or a Dataset."""
    if isinstance(source, torch.utils.data.DataLoader):
        return True
    data_like = (tuple, list, dict, str, bytes, np.ndarray, Tensor, torch.utils.data.Dataset)
    return hasattr(source, "__iter__") and not isinstance(source, data_like)


@dataclass
class Scan:
    """What one pass over the training loader found."""

    sample_shape: tuple[int, ...]
    n_classes: int
    samples: int
    batches: int
    smallest_batch: int
    mean: np.ndarray  # [k] float64: k features (vectors) or channels (images)
    std: np.ndarray


@dataclass
class StreamSplit:
    """One streamed split: raw batches from ``loader``, checked, then scaled by ``prep``."""

    where: str  # "data['train']", named in errors
    loader: Iterable
    sample_shape: tuple[int, ...]
    n_classes: int
    prep: Preprocess
    samples: int = 0  # counted in the last full pass

    def __len__(self) -> int:
        return self.samples

    def batches(
        self, batch_size: int | None = None, seed: int = 0
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Model inputs ``[b, *input_shape]`` float32 and labels ``[b]`` int64 of one pass, in
        the loader's batches (``batch_size`` is the loader's own; the argument is ignored),
        drawn under a random state of their own seeded by ``seed`` (:func:`own_random_state`)."""
        seen = 0
        raw = checked_batches(self.where, self.loader, self.sample_shape, self.n_classes)
        for x, y in own_random_state(raw, seed):
            seen += len(y)
            yield self.prep(x), y
        self.samples = seen


@dataclass
class StreamDataset:
    """Streamed train / val / test splits (``val`` may be None), with the interface of
    :class:`neuroplex.data.registry.Dataset` that training, evaluation and the summary use."""

    train: StreamSplit
    val: StreamSplit | None
    test: StreamSplit
    n_classes: int
    class_names: list[str]
    info: dict[str, Any]  # the preprocessing (neuroplex.data.preprocess)
    batches_per_epoch: int
    smallest_batch: int  # in the first pass over the training loader
    name: str = "python"
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    fingerprint: str | None = None  # a stream is not hashed

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.info["input_shape"])

    @property
    def n_features(self) -> int:
        return math.prod(self.input_shape)

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.batches_per_epoch

    def preprocessing(self) -> dict[str, Any]:
        return self.info

    def scaling(self) -> dict[str, list[float]] | None:
        if self.info["kind"] != "image":
            return None
        return {"mean": self.info["mean"], "std": self.info["std"]}

    def epoch(self, epoch: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The training batches of ``epoch`` (after ``set_epoch(epoch)`` where there is one),
        drawn under a random state seeded by (``seed``, ``epoch``)."""
        set_epoch(self.train.loader, epoch)
        return self.train.batches(seed=seed * 1_000_003 + epoch)


def own_random_state(items: Iterator[Any], seed: int) -> Iterator[Any]:
    """The items of ``items``, each drawn with torch's global random state swapped for one of
    their own (seeded by ``seed``, carried from item to item): what a loader draws from it (a
    shuffling sampler's seed, worker seeds, torch-random transforms) is a function of ``seed``
    and leaves the training's random stream (dropout, router noise) untouched."""
    own = torch.Generator().manual_seed(seed).get_state()
    while True:
        outer = torch.get_rng_state()
        torch.set_rng_state(own)
        try:
            item = next(items)
        except StopIteration:
            return
        finally:
            own = torch.get_rng_state()
            torch.set_rng_state(outer)
        yield item


def stream_dataset(loaders: dict[str, Iterable], cfg: DataConfig) -> StreamDataset:
    """Streamed splits from ``{"train": loader, "test": loader, "val": loader?}``; one pass over
    the training loader first (shape, classes, statistics)."""
    if cfg.augment.crop or cfg.augment.flip:
        raise ConfigError(
            f"data.augment = {cfg.augment.model_dump()}: not applied to DataLoaders; augment "
            "in your Dataset, or set data.augment.crop: 0 and flip: false"
        )
    set_epoch(loaders["train"], 0)
    scan = scan_stream("data['train']", loaders["train"], cfg.standardize, cfg.shape == "image")
    info = stream_preprocessing(scan, cfg)
    prep = Preprocess(info)
    split = {
        key: StreamSplit(f"data[{key!r}]", loader, scan.sample_shape, scan.n_classes, prep)
        for key, loader in loaders.items()
    }
    split["train"].samples = scan.samples
    return StreamDataset(
        train=split["train"],
        val=split.get("val"),
        test=split["test"],
        n_classes=scan.n_classes,
        class_names=info["classes"],
        info=info,
        batches_per_epoch=_batches_per_epoch(loaders["train"], scan.batches),
        smallest_batch=scan.smallest_batch,
    )


def stream_preprocessing(scan: Scan, cfg: DataConfig) -> dict[str, Any]:
    """The preprocessing dict of a scanned stream, as for in-memory data: vectors scaled per
    feature; images (and ``data.shape: image``) per channel, fed as feature maps with
    ``data.shape: image`` and flattened with ``flat``."""
    shape = scan.sample_shape
    classes = [str(i) for i in range(scan.n_classes)]
    stats = {"mean": scan.mean.tolist(), "std": scan.std.tolist(), "classes": classes}
    if len(shape) == 1 and cfg.shape == "flat":
        return {
            "kind": "vector",
            "input_shape": list(shape),
            "standardized": cfg.standardize,
            **stats,
        }
    image_shape = list(shape) if len(shape) > 1 else [1, *shape]
    input_shape = image_shape if cfg.shape == "image" else [math.prod(shape)]
    return {"kind": "image", "input_shape": input_shape, "image_shape": image_shape, **stats}


def scan_stream(where: str, loader: Iterable, standardize: bool, image: bool = False) -> Scan:
    """One pass over ``loader``: sample shape, classes, counts and (if ``standardize``) the mean
    and std per feature (2-D batches) or per channel (images ``[b, c, *s]``, and 2-D batches
    as one channel when ``image``)."""
    shape, top, samples, batches, smallest = None, -1, 0, 0, math.inf
    count, mean, m2 = 0, np.zeros(0), np.zeros(0)
    for x, y in own_random_state(checked_batches(where, loader, None, None), 0):
        shape = shape or tuple(x.shape[1:])
        if tuple(x.shape[1:]) != shape:
            raise DataError(
                f"{where}: batches hold samples of shape {tuple(x.shape[1:])} and {shape}"
            )
        values = _per_unit(x, image)  # (b * positions, k)
        if standardize:
            count, mean, m2 = merge_moments(count, mean, m2, values)
        top = max(top, int(y.max()))
        samples, batches, smallest = samples + len(y), batches + 1, min(smallest, len(y))
    if shape is None:
        raise DataError(f"{where}: yielded no batches")
    if top < 1:
        raise DataError(f"{where}: labels have only 1 class (0); need at least 2")
    k = shape[0] if len(shape) > 1 else 1 if image else math.prod(shape)
    if standardize:
        std = np.sqrt(m2 / count)
        std = np.where(std < STD_FLOOR, 1.0, std)
    else:
        mean, std = np.zeros(k), np.ones(k)
    return Scan(shape, top + 1, samples, batches, int(smallest), mean, std)


def _per_unit(x: Tensor, image: bool) -> np.ndarray:
    """Vectors ``[b, d]`` as ``[b, d]``; images ``[b, c, *s]`` (``[b, d]`` as one channel when
    ``image``) as ``[b * prod(s), c]``; float64."""
    x = x.double()
    if x.dim() == 2 and image:
        x = x[:, None]  # (b, 1, d)
    if x.dim() > 2:
        x = x.transpose(0, 1).reshape(x.shape[1], -1).T  # (b * s, c)
    return x.numpy()


def merge_moments(
    count: int, mean: np.ndarray, m2: np.ndarray, values: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Count, mean ``[k]`` and sum of squared deviations ``[k]`` of the values seen so far,
    updated with ``values`` ``[m, k]`` (Chan, Golub and LeVeque's pairwise formula)."""
    m = len(values)
    batch_mean = values.mean(axis=0)
    batch_m2 = ((values - batch_mean) ** 2).sum(axis=0)
    if count == 0:
        return m, batch_mean, batch_m2
    total = count + m
    delta = batch_mean - mean
    return total, mean + delta * (m / total), m2 + batch_m2 + delta**2 * (count * m / total)


def checked_batches(
    where: str,
    loader: Iterable,
    sample_shape: tuple[int, ...] | None,
    n_classes: int | None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches of one pass as CPU tensors, each checked: ``x`` ``[b, ...]`` finite
    numbers of ``sample_shape`` (when given), ``y`` ``[b]`` integers in 0..n_classes-1."""
    for i, batch in enumerate(loader):
        at = f"{where} batch {i}"
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise DataError(f"{at}: got {type(batch).__name__}, expected an (x, y) pair")
        x, y = torch.as_tensor(batch[0]).cpu(), torch.as_tensor(batch[1]).cpu()
        _check_x(at, x, sample_shape)
        yield x, _check_y(at, y, len(x), n_classes)


def _check_x(at: str, x: Tensor, sample_shape: tuple[int, ...] | None) -> None:
    if x.dim() < 2 or len(x) == 0:
        raise DataError(f"{at}: x has shape {tuple(x.shape)}, expected [batch, ...] samples")
    if sample_shape is not None and tuple(x.shape[1:]) != sample_shape:
        raise DataError(
            f"{at}: x has samples of shape {tuple(x.shape[1:])}; the training data has "
            f"{sample_shape}"
        )
    if x.dtype == torch.bool or x.is_complex() or not (x.is_floating_point() or _integral(x)):
        raise DataError(f"{at}: x has dtype {x.dtype}, expected numbers")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{at}: x contains NaN or infinite values")


def _check_y(at: str, y: Tensor, n: int, n_classes: int | None) -> Tensor:
    if y.dim() != 1 or len(y) != n:
        raise DataError(f"{at}: y has shape {tuple(y.shape)}, expected [{n}] labels")
    if not _integral(y) or y.dtype == torch.bool:
        raise DataError(f"{at}: labels have dtype {y.dtype}, expected integers 0..C-1")
    y = y.long()
    low, high = int(y.min()), int(y.max())
    if low < 0 or (n_classes is not None and high >= n_classes):
        classes = "0..C-1" if n_classes is None else f"0..{n_classes - 1} (the training labels)"
        bad = low if low < 0 else high
        raise DataError(f"{at}: label {bad}; expected integers in {classes}")
    return y


def _integral(t: Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex()


def set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader, its sampler and its batch sampler (and the batch
    sampler's sampler) where they have one."""
    batch_sampler = getattr(loader, "batch_sampler", None)
    parts = (
        loader,
        getattr(loader, "sampler", None),
        batch_sampler,
        getattr(batch_sampler, "sampler", None),
    )
    done: list[int] = []
    for part in parts:
        if part is not None and id(part) not in done and hasattr(part, "set_epoch"):
            part.set_epoch(epoch)
            done.append(id(part))


def _batches_per_epoch(loader: Iterable, counted: int) -> int:
    """``len(loader)`` if it has one, else the batches counted in the first pass."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return counted
