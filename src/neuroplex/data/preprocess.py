"""How raw samples become model inputs: saved with a run (``preprocessing.json``) and with an
exported model (``model.json``), and applied by :class:`Preprocess`.

Vectors: ``(x - mean) / std`` per feature in float64, then float32 — what the training splits
saw (neuroplex.data.registry); without standardisation mean is 0 and std 1. Images: reshaped to
``image_shape`` ``(c, *s)``, ``(x - mean) / std`` per channel in float32
(neuroplex.data.pixels), then to the model's input shape (flat for ``data.shape: flat``).

Shape legend: ``b`` batch, ``d`` features, ``c`` channels, ``s`` spatial sizes.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuroplex.data.pixels import Pixels
from neuroplex.errors import DataError

KINDS = ("vector", "image")


def vector_preprocessing(
    input_shape: tuple[int, ...],
    standardization: tuple[np.ndarray, np.ndarray] | None,
    class_names: list[str],
) -> dict[str, Any]:
    """Vectors ``input_shape`` ``(d,)`` standardised by ``(mean, std)`` ``[d]`` (None: not)."""
    d = math.prod(input_shape)
    mean, std = standardization if standardization is not None else (np.zeros(d), np.ones(d))
    return {
        "kind": "vector",
        "input_shape": list(input_shape),
        "standardized": standardization is not None,
        "mean": np.broadcast_to(mean, (d,)).astype(np.float64).tolist(),
        "std": np.broadcast_to(std, (d,)).astype(np.float64).tolist(),
        "classes": list(class_names),
    }


def image_preprocessing(
    input_shape: tuple[int, ...], pixels: Pixels, class_names: list[str]
) -> dict[str, Any]:
    """Images ``pixels.shape`` ``(c, *s)`` scaled per channel, fed as ``input_shape``."""
    return {
        "kind": "image",
        "input_shape": list(input_shape),
        "image_shape": list(pixels.shape),
        "mean": pixels.mean.tolist(),
        "std": pixels.std.tolist(),
        "classes": list(class_names),
    }


class Preprocess(nn.Module):
    """Raw samples ``[b, ...]`` (any shape holding ``prod(input_shape)`` values per sample,
    any numeric dtype) -> float32 model inputs ``[b, *input_shape]``, as in training."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__()
        check_preprocessing(info)
        self.kind = info["kind"]
        self.input_shape = tuple(info["input_shape"])
        self.image_shape = tuple(info.get("image_shape") or self.input_shape)
        dtype = torch.float64 if self.kind == "vector" else torch.float32
        # not in state_dict: they travel as JSON (model.json, preprocessing.json)
        self.register_buffer("mean", torch.tensor(info["mean"], dtype=dtype), persistent=False)
        self.register_buffer("std", torch.tensor(info["std"], dtype=dtype), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """Raw ``x`` ``[b, ...]`` -> ``[b, *input_shape]`` float32."""
        b, values = x.shape[0], math.prod(self.input_shape)
        if math.prod(x.shape[1:]) != values:
            raise DataError(
                f"input has shape {tuple(x.shape)}; expected raw samples [b, "
                f"{', '.join(map(str, self.input_shape))}] ({values} values per sample)"
            )
        if self.kind == "vector":
            x = (x.reshape(b, -1).double() - self.mean) / self.std  # (b, d)
            return x.float().reshape(b, *self.input_shape)
        per_channel = (1, -1) + (1,) * (len(self.image_shape) - 1)
        x = x.reshape(b, *self.image_shape).float()  # (b, c, *s)
        x = (x - self.mean.view(per_channel)) / self.std.view(per_channel)
        return x.reshape(b, *self.input_shape)


def check_preprocessing(info: Any, source: str = "preprocessing") -> None:
    """DataError unless ``info`` is a preprocessing dict of this module's form."""
    if not isinstance(info, dict) or info.get("kind") not in KINDS:
        raise DataError(f"{source}: expected a mapping with kind one of {KINDS}")
    shape = info.get("input_shape")
    if not isinstance(shape, list) or not shape or not all(isinstance(n, int) for n in shape):
        raise DataError(f"{source}: input_shape = {shape!r}, expected a list of integers")
    channels = math.prod(shape) if info["kind"] == "vector" else (info.get("image_shape") or [0])[0]
    for key in ("mean", "std"):
        values = info.get(key)
        if not isinstance(values, list) or len(values) != channels:
            raise DataError(f"{source}: {key} must be a list of {channels} numbers")
