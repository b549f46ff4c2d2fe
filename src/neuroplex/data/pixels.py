"""Images as stored samples: per-channel scaling and augmentation, applied per batch.

Image splits keep their pixels as stored (uint8 for IDX files, PNG/JPEG folders and uint8
.npz files), so Fashion-MNIST's 60,000 training images take 47 MB, not 188 MB as float32;
each batch becomes float32 through :meth:`Pixels.inputs`.

Shape legend: ``b`` batch, ``c`` channels, ``s`` the spatial sizes (``h, w`` or ``l``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from neuroplex.config import AugmentConfig

STD_FLOOR = 1e-8
STATS_CHUNK = 4096  # samples per float64 chunk when summing float images


@dataclass(frozen=True)
class Pixels:
    """How stored samples become model inputs: images of ``shape`` ``(c, *s)``, scaled per
    channel to ``(x - mean) / std`` (``mean``, ``std`` ``[c]`` float32, from the training
    split)."""

    shape: tuple[int, ...]
    mean: Tensor
    std: Tensor

    def inputs(self, x: Tensor, draw: Draw | None = None) -> Tensor:
        """Stored samples ``[b, *stored]`` (``stored`` is ``shape`` or its product) to float32
        inputs of the same shape, augmented by ``draw`` (before scaling) when given."""
        b, stored = len(x), x.shape[1:]
        x = x.reshape(b, *self.shape)  # (b, c, *s)
        if draw is not None:
            x = draw.apply(x)
        per_channel = (1, -1) + (1,) * (len(self.shape) - 1)
        x = (x.float() - self.mean.view(per_channel)) / self.std.view(per_channel)
        return x.reshape(b, *stored)


@dataclass(frozen=True)
class Draw:
    """Augmentation of a batch: crop offsets ``[b, len(s)]`` into the ``pad``-padded images
    (None: no crop) and flips ``[b]`` bool (None: no flip)."""

    pad: int
    offsets: Tensor | None
    flips: Tensor | None

    def apply(self, x: Tensor) -> Tensor:
        """Augment images ``[b, c, *s]`` (any dtype): crop, then flip the last axis."""
        if self.offsets is not None:
            x = random_crop(x, self.offsets, self.pad)
        if self.flips is not None:
            flips = self.flips.view(-1, *(1,) * (x.dim() - 1))
            x = torch.where(flips, x.flip(-1), x)
        return x

    def map(self, fn: Callable[[Tensor], Tensor]) -> Draw:
        """The same draw with ``fn`` applied to the per-sample tensors (e.g. a rank's shard)."""
        offsets = None if self.offsets is None else fn(self.offsets)
        flips = None if self.flips is None else fn(self.flips)
        return Draw(self.pad, offsets, flips)


def draw_augmentation(
    cfg: AugmentConfig, spatial: int, n: int, key: tuple[int, int, int]
) -> Draw | None:
    """Per-sample augmentation of a batch of ``n`` images with ``spatial`` spatial axes, drawn
    from ``key`` = (seed, epoch, step) alone, so a resumed run draws the same; None if off."""
    if cfg.crop == 0 and not cfg.flip:
        return None
    seed, epoch, step = key
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + step) % 2**63)
    offsets = torch.randint(0, 2 * cfg.crop + 1, (n, spatial), generator=gen) if cfg.crop else None
    flips = torch.rand(n, generator=gen) < 0.5 if cfg.flip else None
    return Draw(cfg.crop, offsets, flips)


def random_crop(x: Tensor, offsets: Tensor, pad: int) -> Tensor:
    """Crops of ``x`` ``[b, c, *s]`` zero-padded by ``pad`` on every spatial side, each sample
    starting at its ``offsets`` ``[b, len(s)]`` (0 .. 2 * pad); output ``[b, c, *s]``."""
    spatial = x.shape[2:]
    out = F.pad(x, (pad, pad) * len(spatial))  # (b, c, *(s + 2 pad))
    offsets = offsets.to(x.device)
    for axis, size in enumerate(spatial):
        dim = 2 + axis
        index = offsets[:, axis, None] + torch.arange(size, device=x.device)  # (b, size)
        view = [len(x)] + [1] * (out.dim() - 1)
        view[dim] = size
        shape = list(out.shape)
        shape[dim] = size
        out = out.gather(dim, index.view(view).expand(shape))
    return out


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) standard deviation per channel of images ``x`` ``[n, c, *s]``,
    float64 ``[c]``; a constant channel gets std 1. uint8 images are counted exactly by
    histogram; others take two passes of float64 chunks (never a full float64 copy)."""
    if x.dtype == np.uint8:
        values = np.arange(256, dtype=np.float64)
        counts = np.stack(
            [np.bincount(x[:, i].reshape(-1), minlength=256) for i in range(x.shape[1])]
        )
        n = counts.sum(axis=1)
        mean = counts @ values / n
        var = (counts * (values - mean[:, None]) ** 2).sum(axis=1) / n
    else:
        mean = _chunked_mean(x, lambda chunk: chunk)
        var = _chunked_mean(
            x, lambda chunk: (chunk - mean.reshape(1, -1, *(1,) * (x.ndim - 2))) ** 2
        )
    std = np.sqrt(var)
    return mean, np.where(std < STD_FLOOR, 1.0, std)


def _chunked_mean(x: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Per-channel mean of ``fn`` of float64 chunks of ``x`` ``[n, c, *s]``: ``[c]``."""
    axes = (0, *range(2, x.ndim))
    total = np.zeros(x.shape[1])
    for start in range(0, len(x), STATS_CHUNK):
        total += fn(x[start : start + STATS_CHUNK].astype(np.float64)).sum(axis=axes)
    return total / (x.size // x.shape[1])
