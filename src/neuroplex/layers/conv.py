"""Stages on feature maps: convolutions, ResNet basic blocks, global pooling, flattening.

One code path for 1-D signals ``[b, c, L]`` and 2-D images ``[b, c, h, w]``: the number of
spatial dimensions ``n`` (1 or 2) picks ``nn.Conv1d`` / ``nn.Conv2d`` and their pools; nothing
else differs. Every stage exposes ``out_shape`` (its output without the batch dimension).

Shape legend: ``b`` batch, ``c`` channels, ``L`` length, ``h``/``w`` height/width; ``*s`` the
spatial dimensions (``L`` or ``h, w``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from neuroplex.layers.sparse_conv import SparseConv
from neuroplex.wiring import Wiring

NormFactory = Callable[[int], nn.Module]  # channels -> norm module
CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}
POOLS: dict[tuple[str, int], type[nn.Module]] = {
    ("max", 1): nn.MaxPool1d,
    ("max", 2): nn.MaxPool2d,
    ("avg", 1): nn.AvgPool1d,
    ("avg", 2): nn.AvgPool2d,
}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels at every position (as ConvNeXt's). ``[b, c, *s]`` ->
    the same shape."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)


def conv_length(size: int, kernel: int, stride: int) -> int:
    """Output size of a convolution with padding ``kernel // 2`` along one dimension."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def spatial_dims(in_shape: tuple[int, ...]) -> int:
    """1 for ``(c, L)``, 2 for ``(c, h, w)``; ValueError for anything else."""
    if len(in_shape) not in (2, 3):
        raise ValueError(
            f"needs a feature map (c, L) or (c, h, w) as input, got shape {tuple(in_shape)}"
        )
    return len(in_shape) - 1


def make_norm(norm: NormFactory | None, channels: int) -> nn.Module:
    return norm(channels) if norm is not None else nn.Identity()


class ConvBlock(nn.Module):
    """Conv (padding ``kernel // 2``, no bias when normed) -> norm -> activation -> pool; with
    a ``wiring`` (``c_in -> c_out`` channels) the conv is a :class:`SparseConv`.

    Shapes: ``[b, c_in, *s] -> [b, c_out, *s']`` with ``s' = conv_length(s, kernel, stride)``,
    then divided (floor) by ``pool_size`` when ``pool`` is ``"max"`` or ``"avg"``.
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int,
        *,
        kernel: int = 3,
        stride: int = 1,
        norm: NormFactory | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        pool: str = "none",
        pool_size: int = 2,
        wiring: Wiring | None = None,
    ) -> None:
        super().__init__()
        bias = norm is None
        self.conv = (
            CONVS[n](c_in, c_out, kernel, stride, kernel // 2, bias=bias)
            if wiring is None
            else SparseConv(wiring, n, kernel, stride, bias)
        )
        self.norm = make_norm(norm, c_out)
        self.act = act_layer()
        self.pool = POOLS[pool, n](pool_size) if pool != "none" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class ConvStage(nn.Sequential):
    """``layers`` ConvBlocks of ``channels``; the first has ``stride``, and every block ends in
    ``pool``. With ``wirings`` (one per layer, channels to channels) the convs are SparseConvs,
    and ``ensemble_labels`` names the output ensemble of every output channel.
    Shapes: ``[b, *in_shape] -> [b, *out_shape]``."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        channels: int,
        layers: int = 1,
        *,
        kernel: int = 3,
        stride: int = 1,
        pool: str = "none",
        pool_size: int = 2,
        norm: NormFactory | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
        wirings: list[Wiring] | None = None,
    ) -> None:
        n = spatial_dims(in_shape)
        c, *sizes = in_shape
        blocks = []
        for i in range(layers):
            s = stride if i == 0 else 1
            block = ConvBlock(
                c, channels, n, kernel=kernel, stride=s, norm=norm, act_layer=act_layer,
                pool=pool, pool_size=pool_size, wiring=None if wirings is None else wirings[i],
            )  # fmt: skip
            blocks.append(block)
            sizes = [conv_length(size, kernel, s) for size in sizes]
            if pool != "none":
                sizes = [size // pool_size for size in sizes]
            c = channels
        if min(sizes) < 1:
            raise ValueError(
                f"{layers} layers with stride {stride} and pool {pool} shrink the feature map "
                f"{tuple(in_shape)} to nothing; use fewer layers, a smaller stride or less pooling"
            )
        super().__init__(*blocks)
        self.out_shape = (channels, *sizes)
        if wirings is not None:
            last = wirings[-1].out_sizes
            self.ensemble_labels = np.repeat(np.arange(len(last)), last)


class BasicBlock(nn.Module):
    """ResNet basic block: ``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``, the first
    conv with ``stride``; the shortcut is a 1×1 conv with ``stride`` + norm when the shape
    changes, else the identity. Shapes: ``[b, c_in, *s] -> [b, c_out, *s']``."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        n: int,
        *,
        kernel: int = 3,
        stride: int = 1,
        norm: NormFactory | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        conv, bias = CONVS[n], norm is None
        self.conv1 = conv(c_in, c_out, kernel, stride, kernel // 2, bias=bias)
        self.norm1 = make_norm(norm, c_out)
        self.act1 = act_layer()
        self.conv2 = conv(c_out, c_out, kernel, 1, kernel // 2, bias=bias)
        self.norm2 = make_norm(norm, c_out)
        self.act2 = act_layer()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            proj = conv(c_in, c_out, 1, stride, bias=bias)
            self.shortcut = nn.Sequential(proj, make_norm(norm, c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(h)) + self.shortcut(x))


class ResidualStage(nn.Sequential):
    """``blocks`` BasicBlocks of ``channels``; the first has ``stride`` (and a projection
    shortcut when the shape changes). Shapes: ``[b, *in_shape] -> [b, *out_shape]``."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        channels: int,
        blocks: int = 2,
        *,
        kernel: int = 3,
        stride: int = 1,
        norm: NormFactory | None = None,
        act_layer: type[nn.Module] = nn.ReLU,
    ) -> None:
        n = spatial_dims(in_shape)
        c, *sizes = in_shape
        parts = []
        for i in range(blocks):
            s = stride if i == 0 else 1
            block = BasicBlock(c, channels, n, kernel=kernel, stride=s, norm=norm,
                               act_layer=act_layer)  # fmt: skip
            parts.append(block)
            sizes = [conv_length(size, kernel, s) for size in sizes]
            c = channels
        super().__init__(*parts)
        self.out_shape = (channels, *sizes)


class GlobalPool(nn.Module):
    """Average or maximum over every position: ``[b, c, *s] -> [b, c]``."""

    def __init__(self, in_shape: tuple[int, ...], mode: str = "avg") -> None:
        super().__init__()
        spatial_dims(in_shape)
        self.mode = mode
        self.out_shape = (in_shape[0],)
        self.d_out = in_shape[0]

    def forward(self, x: Tensor) -> Tensor:
        flat = x.flatten(2)  # [b, c, positions]
        return flat.mean(-1) if self.mode == "avg" else flat.amax(-1)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class Flatten(nn.Module):
    """Every value of a feature map as one vector: ``[b, *in_shape] -> [b, prod(in_shape)]``
    (channel-major, as ``torch.flatten``)."""

    def __init__(self, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.d_out = math.prod(in_shape)
        self.out_shape = (self.d_out,)

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)
