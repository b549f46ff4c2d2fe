"""Tests of neuroplex.data.pixels: augmentation against a numpy reference, its determinism from
(seed, epoch, step), training batches only, and exact resume of a run with augmentation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroplex.config import AugmentConfig, DataConfig, load_config
from neuroplex.data.pixels import channel_stats, draw_augmentation
from neuroplex.data.registry import load_dataset
from neuroplex.files import read_jsonl
from neuroplex.train import loop
from neuroplex.train.checkpoint import read_index


def reference_augment(x: np.ndarray, offsets, flips, pad: int) -> np.ndarray:
    """Per sample: zero-pad every spatial axis by ``pad``, cut at the offsets, maybe flip."""
    out = np.empty_like(x)
    spatial = x.shape[2:]
    for i, sample in enumerate(x):
        padded = np.pad(sample, [(0, 0)] + [(pad, pad)] * len(spatial))
        if offsets is not None:
            cut = tuple(slice(int(o), int(o) + n) for o, n in zip(offsets[i], spatial, strict=True))
            sample = padded[(slice(None), *cut)]
        if flips is not None and flips[i]:
            sample = sample[..., ::-1]
        out[i] = sample
    return out


@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 9)])  # an image [c, h, w] and a signal [c, l]
@pytest.mark.parametrize(("crop", "flip"), [(2, True), (3, False), (0, True)])
def test_crop_and_flip_match_a_numpy_reference(shape, crop, flip):
    x = torch.randint(0, 256, (16, *shape), dtype=torch.uint8)
    draw = draw_augmentation(AugmentConfig(crop=crop, flip=flip), len(shape) - 1, 16, (3, 1, 7))
    offsets = None if draw.offsets is None else draw.offsets.numpy()
    flips = None if draw.flips is None else draw.flips.numpy()
    expected = reference_augment(x.numpy(), offsets, flips, crop)
    assert np.array_equal(draw.apply(x).numpy(), expected)
    if offsets is not None:
        assert offsets.min() >= 0 and offsets.max() <= 2 * crop
        assert len({tuple(o) for o in offsets}) > 1  # drawn per sample
    if flips is not None:
        assert 0 < flips.sum() < 16


def test_draws_are_a_function_of_seed_epoch_and_step():
    cfg = AugmentConfig(crop=4, flip=True)

    def draw(key):
        d = draw_augmentation(cfg, 2, 64, key)
        return torch.cat([d.offsets.flatten(), d.flips.long()])

    assert torch.equal(draw((0, 1, 5)), draw((0, 1, 5)))
    for other in [(1, 1, 5), (0, 2, 5), (0, 1, 6)]:
        assert not torch.equal(draw((0, 1, 5)), draw(other))
    assert draw_augmentation(AugmentConfig(), 2, 64, (0, 1, 5)) is None


def npz_images(tmp_path, n=120, seed=0):
    """A small learnable 2-class image .npz: the class is which half of the image is bright."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.integers(0, 60, (n, 1, 8, 8))
    for i in range(n):
        x[i, 0, :, :4] += 150 * (y[i] == 0)
        x[i, 0, :, 4:] += 150 * (y[i] == 1)
    path = tmp_path / "images.npz"
    np.savez(path, x=x.astype(np.uint8), y=y)
    return path


def test_only_training_batches_are_augmented_and_shards_match(tmp_path):
    path = npz_images(tmp_path)
    plain = load_dataset(DataConfig(name="images", path=path, shape="image"))
    ds = load_dataset(DataConfig(name="images", path=path, shape="image",
                                 augment={"crop": 2, "flip": True}))  # fmt: skip
    idx = torch.arange(16)
    x, y = ds.train_batch(idx, (0, 0, 3))
    assert not torch.equal(x, plain.train.inputs(idx)) and torch.equal(y, ds.train.y[idx])
    assert torch.equal(ds.test.inputs(), plain.test.inputs())  # evaluation is never augmented
    # a data-parallel rank gets its samples augmented exactly as in the global batch
    x1, y1 = ds.train_batch(idx, (0, 0, 3), shard=lambda t: t[1::2])
    assert torch.equal(x1, x[1::2]) and torch.equal(y1, y[1::2])


def test_flat_images_are_augmented_as_images(tmp_path):
    path = npz_images(tmp_path)
    flat = load_dataset(DataConfig(name="images", path=path, augment={"flip": True}))
    image = load_dataset(DataConfig(name="images", path=path, shape="image",
                                    augment={"flip": True}))  # fmt: skip
    idx = torch.arange(20)
    x_flat, _ = flat.train_batch(idx, (0, 0, 0))
    x_image, _ = image.train_batch(idx, (0, 0, 0))
    assert x_flat.shape == (20, 64) and torch.equal(x_flat, x_image.reshape(20, 64))


def test_uint8_stats_by_histogram_equal_numpy():
    x = np.random.default_rng(9).integers(0, 256, (33, 2, 3, 3)).astype(np.uint8)
    mean, std = channel_stats(x)
    assert np.allclose(mean, x.astype(np.float64).mean(axis=(0, 2, 3)), rtol=1e-12)
    assert np.allclose(std, x.astype(np.float64).std(axis=(0, 2, 3)), rtol=1e-12)


def metrics(run_dir) -> list[dict]:
    skip = {"samples_per_s", "wall_time"}
    return [
        {k: v for k, v in r.items() if k not in skip} for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


def test_resume_with_augmentation_is_bit_identical(tmp_path, kill_at):
    path = npz_images(tmp_path)
    cfg = load_config(None, [
        "name=aug", "data.name=images", f"data.path={path}", "data.augment.crop=2",
        "data.augment.flip=true", "model.stages=[{kind: dense, width: 16, dropout: 0.1}]",
        "train.epochs=4", "train.batch_size=16", "train.lr=0.01",
    ])  # fmt: skip
    loop.train(cfg, tmp_path / "full")
    loop.train(cfg, tmp_path / "split", stop_after_epoch=2)
    loop.train(cfg, tmp_path / "split", resume=True)
    assert metrics(tmp_path / "split") == metrics(tmp_path / "full")
    steps_per_epoch = math.ceil(len(load_dataset(cfg.data).train) / 16)
    with pytest.raises(KeyboardInterrupt):  # killed mid-epoch 3: resumes from epoch 2
        loop.train(cfg, tmp_path / "killed", progress=kill_at(2 * steps_per_epoch + 2))
    assert read_index(tmp_path / "killed")["last"] == "epoch-0002"
    loop.train(cfg, tmp_path / "killed", resume=True)
    assert metrics(tmp_path / "killed") == metrics(tmp_path / "full")
    # and the augmentation is in effect: without it the run differs
    off = cfg.model_copy(update={"data": cfg.data.model_copy(update={"augment": AugmentConfig()})})
    loop.train(off, tmp_path / "off")
    assert metrics(tmp_path / "off") != metrics(tmp_path / "full")
